"""Sentiment control (SparsePO's first experiment, notebook 02): reward classifier, prompts and pairs, planted-token
pairs, the method × β sweep with checkpoint evaluations, mask–lexicon alignment, figures and verdicts.

Modules: `data` (splits, prompts, pairs, planted pairs, lexicon labels), `reward` (the 3-class classifier),
`pipeline` (cached reference SFT and pair sampling), `sweep` (runs and checkpoint evaluation), `alignment` (mask
weights on held-out pairs, AUROC), `analysis` (tables, frontiers, verdicts), `figures`.
"""
