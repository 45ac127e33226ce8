"""Evaluation: sampling from a policy (`sampling`), sequence KL to the reference (`kl`), confidence intervals and
reward-vs-KL frontiers (`stats`), reward scorers (`scorers`), and sandboxed code execution with pass@k (`sandbox`,
`code`).

Alignment follows :mod:`tokenpo.tokens`: for `input_ids [B, L]`, `logits[:, :-1]` predicts `input_ids[:, 1:]`.
"""
from .code import check_completions, check_correctness, estimate_pass_at_k, pass_at_k
from .kl import KLEstimate, sequence_kl
from .sampling import Completions, generate_completions
from .scorers import (SCORERS, ClassifierSentiment, CodeCorrectness, Harmlessness, Relevance, RougeL, VaderSentiment,
                      get_scorer, rouge_l)
from .stats import MeanCI, frontier_reward_at, frontiers, mean_ci, pareto_frontier

__all__ = ["Completions", "generate_completions", "KLEstimate", "sequence_kl", "MeanCI", "mean_ci", "pareto_frontier",
           "frontiers", "frontier_reward_at", "SCORERS", "ClassifierSentiment", "CodeCorrectness", "Harmlessness",
           "Relevance", "RougeL", "VaderSentiment", "get_scorer", "rouge_l", "check_completions",
           "check_correctness", "estimate_pass_at_k", "pass_at_k"]
