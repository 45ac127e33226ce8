"""SePO on the sentiment world (notebook 03): oracles trained with DPO on shares of the pairs, their token scores,
and models of other sizes for weak-to-strong supervision. The policies are trained with the sentiment runs'
machinery (`tokenpo.tasks.sentiment.sweep.run`), so SePO's runs and notebook 02's baselines share one cache."""
