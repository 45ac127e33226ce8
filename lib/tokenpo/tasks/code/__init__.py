"""Text-to-code (SparsePO's fourth experiment, notebook 05): programming problems with real tests, pass-vs-fail
preference pairs executed in the sandbox, the method runs, pass@k on held-out problems and the verdicts.

Modules: `problems` (the templated one-line functions, MBPP and HumanEval in HumanEval's format, prompts),
`pipeline` (sampling, sandbox verdicts with each distinct program run once, pairs, the reference trained from
scratch), `runs` (run specs, pass@k evaluator, cached runs), `world` (everything the runs share, one call),
`analysis` (per-run tables and the claims' data), `figures`.
"""
