"""FPO on the sentiment world (notebook 04): the memory comparison at GPT-2-small head shapes
(`tokenpo.tasks.fpo.memory`) and the search for an SAE feature tied to a behaviour (`tokenpo.tasks.fpo.features`).
The policies are trained with the sentiment runs' machinery (`tokenpo.tasks.sentiment.sweep.run`), so FPO's runs and
notebook 02's baselines share one cache."""
