"""ConfPO's token selection (docs/equations.md#confpo): the tokens the policy itself finds unlikely.

A token is selected when its probability under the current policy is below the response's mean probability,
log π_θ(y_t|·) < log mean_t π_θ(y_t|·) (official ``cpo_trainer.py::cpo_loss_confpo``). The selection is made from the
policy's own statistics of the step, detached: no extra model, no extra forward. This provider together with the
``confpo`` objective is the whole method — added without touching the trainer (docs/adding-a-method.md).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Provider, StepContext

__all__ = ["LowConfidenceTokens", "low_confidence_tokens"]


def low_confidence_tokens(logps: Tensor, mask: Tensor) -> Tensor:
    """0/1 [B, T]: completion tokens whose probability is below the row's mean token probability (over its
    completion tokens); ``logps`` [B, T] log-probabilities of the label tokens, ``mask`` [B, T]."""
    on = mask > 0
    logps = logps.detach().float()
    mean_p = torch.where(on, logps.exp(), 0.0).sum(-1, keepdim=True) / on.sum(-1, keepdim=True).clamp(min=1)
    return ((logps < mean_p.log()) & on).float()


class LowConfidenceTokens(Provider):
    """The ConfPO provider: ``selections`` = (low-confidence tokens of the chosen rows, of the rejected rows)."""

    provides = ("selections",)

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        return {"selections": tuple(low_confidence_tokens(s.logps, s.mask) for s in (ctx.chosen, ctx.rejected))}
