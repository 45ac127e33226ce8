"""Sequence KL(π_θ ‖ π_ref) of sampled completions, from the per-token statistics of :mod:`tokenpo.tokens`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenpo.tokens import align_to_labels, completion_labels, token_stats

from .sampling import Completions


@dataclass
class KLEstimate:
    sampled: np.ndarray   # [N] sum over completion tokens of log pi_theta(y_t) - log pi_ref(y_t)  (Monte Carlo)
    exact: np.ndarray     # [N] sum over completion positions of KL(pi_theta(.|x,y<t) || pi_ref(.|x,y<t))
    lengths: np.ndarray   # [N] completion tokens


def sequence_kl(policy, reference, prompt_ids, completion_ids=None, *, batch_size: int = 8) -> KLEstimate:
    """Sequence KL(π_θ ‖ π_ref) of sampled completions, two ways.

    `sampled` = Σ_t [log π_θ(y_t|x,y<t) − log π_ref(y_t|x,y<t)]: unbiased for KL(π_θ‖π_ref) of the whole sequence
    when y ~ π_θ (it can be negative for one sample). `exact` = Σ_t KL_t over the full vocabulary at each position
    along the sample (≥ 0; its expectation is the same sequence KL, with lower variance). Pass `Completions` as
    `prompt_ids`, or lists of prompt and completion token ids.

    Both come from :func:`tokenpo.tokens.token_stats` with the roles of the two models swapped: its KL_t(q ‖ p) with
    q = π_θ (in the reference slot) and p = π_ref is the KL(π_θ ‖ π_ref) wanted here.
    """
    if completion_ids is None:
        if not isinstance(prompt_ids, Completions):
            raise ValueError("pass Completions, or prompt_ids and completion_ids")
        prompt_ids, completion_ids = prompt_ids.prompt_ids, prompt_ids.completion_ids
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(policy.parameters()).device
    ref_device = next(reference.parameters()).device
    sampled, exact = [], []
    modes = (policy.training, reference.training)
    policy.eval()
    reference.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompt_ids), batch_size):
                ps, cs = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
                for i, p in enumerate(ps):
                    if not p:
                        raise ValueError(f"sample {start + i}: empty prompt (the first token has no context)")
                width = max(len(p) + len(c) for p, c in zip(ps, cs))
                ids = torch.zeros((len(ps), width), dtype=torch.long)
                attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
                for b, (p, c) in enumerate(zip(ps, cs)):
                    ids[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
                    attention[b, : len(p) + len(c)] = 1
                    completion[b, len(p): len(p) + len(c)] = 1
                labels = completion_labels(ids, completion).to(device)
                logits = policy(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
                ref_logits = reference(input_ids=ids.to(ref_device), attention_mask=attention.to(ref_device)).logits
                swapped = token_stats(align_to_labels(ref_logits).to(device), labels,
                                      ref_logits=align_to_labels(logits), with_kl=True)
                sampled.append(((swapped.ref_logps - swapped.logps) * swapped.mask).sum(-1).double().cpu())
                exact.append(swapped.seq_kl.double().cpu())
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    lengths = np.array([len(c) for c in completion_ids])
    if not sampled:
        return KLEstimate(np.zeros(0), np.zeros(0), lengths)
    return KLEstimate(torch.cat(sampled).numpy(), torch.cat(exact).numpy(), lengths)
