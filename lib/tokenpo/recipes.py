"""One-call recipes that chain the trainer and the providers for the methods that need a preparation step.

SePO (docs/equations.md#sepo) needs an *oracle* — the reference trained with DPO on (a share of) the pairs — whose
per-token log-ratio to the reference scores every response token; SePO then trains on the best-scored tokens of
chosen responses and the worst-scored ones of rejected responses, reference-free::

    from tokenpo.recipes import sepo_pairs
    from tokenpo.training import TrainConfig, train

    scored = sepo_pairs(reference, pairs, tokenizer, oracle_fraction=0.5)    # oracle = DPO on half of the pairs
    result = train(policy, None, scored, TrainConfig(method="sepo", max_steps=500), tokenizer)   # top/bottom 30 %

``sepo_pairs`` returns the pairs with the TRL-format columns ``chosen_token_scores``/``rejected_token_scores`` (one
score per completion token) that `tokenpo.providers.SePOSelections` reads.
"""
from __future__ import annotations

import copy

import numpy as np
from torch import nn

from tokenpo.providers.sepo import score_pairs
from tokenpo.training import TrainConfig, train

__all__ = ["train_oracle", "sepo_pairs", "oracle_subset"]


def oracle_subset(n_pairs: int, fraction: float, seed: int = 0) -> list[int]:
    """The rows of a random share `fraction` of `n_pairs` pairs (seeded, sorted): the oracle's training data."""
    if not 0 < fraction <= 1:
        raise ValueError(f"oracle fraction must be a share of the pairs in (0, 1], got {fraction!r}")
    count = max(1, int(round(fraction * n_pairs)))
    return sorted(np.random.default_rng(seed).choice(n_pairs, size=count, replace=False).tolist())


def train_oracle(reference: nn.Module, pairs, tokenizer=None, *, fraction: float = 1.0, seed: int = 0,
                 config: TrainConfig | None = None, collator=None):
    """SePO's oracle: a copy of `reference` trained with DPO on a random share `fraction` of `pairs` (SePO §3.2:
    a moderate random subset is enough, Theorem 2). `config` sets the DPO run (default: 1 epoch, β 0.1, lr 1e-4);
    its method must be "dpo". Returns (oracle in eval mode, TrainResult)."""
    config = config or TrainConfig(method="dpo", learning_rate=1e-4, schedule="constant", progress=False,
                                   save_final=False, save_every=None)
    if config.method != "dpo":
        raise ValueError(f"the SePO oracle is DPO-trained; got TrainConfig(method={config.method!r})")
    subset = pairs.select(oracle_subset(len(pairs), fraction, seed)) if hasattr(pairs, "select") else \
        [pairs[i] for i in oracle_subset(len(pairs), fraction, seed)]
    oracle = copy.deepcopy(reference).requires_grad_(True)
    result = train(oracle, reference, subset, config, tokenizer, collator=collator)
    return result.policy.eval().requires_grad_(False), result


def sepo_pairs(reference: nn.Module, pairs, tokenizer=None, *, oracle: nn.Module | None = None,
               oracle_fraction: float = 1.0, oracle_config: TrainConfig | None = None, seed: int = 0, collator=None,
               batch_size: int = 16, progress: bool = True):
    """`pairs` with SePO's token scores: train the oracle (unless given), then score every completion token,
    s_t = log π_oracle(y_t) − log π_ref(y_t). The oracle must share the reference's tokenizer."""
    if oracle is None:
        oracle, _ = train_oracle(reference, pairs, tokenizer, fraction=oracle_fraction, seed=seed,
                                 config=oracle_config, collator=collator)
    return score_pairs(oracle, reference, pairs, collator=collator, batch_size=batch_size, progress=progress)
