"""Input validation and TRL/DESIGN-named metrics shared by the objectives in :mod:`tokenpo.losses`."""
from __future__ import annotations

import torch
from torch import Tensor

from tokenpo.tokens import TokenStats

Pair = tuple[Tensor, Tensor]


def check_stats(chosen: TokenStats, rejected: TokenStats, *, reference: bool = False, kl: bool = False) -> None:
    for side, stats in (("chosen", chosen), ("rejected", rejected)):
        shape = tuple(stats.mask.shape)
        if len(shape) != 2:
            raise ValueError(f"{side}.mask must be [B, T], got {shape}")
        needed = {"logps": stats.logps, "ref_logps": stats.ref_logps if reference else 0,
                  "kl": stats.kl if kl else 0}
        for name, value in needed.items():
            if value is None:
                raise ValueError(f"{side}.{name} is None but this objective needs it"
                                 + (" (compute the token statistics with a reference model)" if reference else ""))
            if isinstance(value, Tensor) and tuple(value.shape) != shape:
                raise ValueError(f"{side}.{name} has shape {tuple(value.shape)}, expected {shape} like {side}.mask")
        empty = (stats.mask.sum(-1) <= 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{side} row(s) {empty} have an empty completion (mask sums to 0); drop them upstream")
    if chosen.mask.shape != rejected.mask.shape:
        raise ValueError(f"chosen and rejected statistics differ in shape: {tuple(chosen.mask.shape)} vs "
                         f"{tuple(rejected.mask.shape)} (pad both sides to the same length)")


def check_positive(**hparams: float) -> None:
    for name, value in hparams.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def check_nonnegative(**hparams: float) -> None:
    for name, value in hparams.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def token_pair(name: str, pair: Pair | None, chosen: TokenStats, rejected: TokenStats,
                binary: bool = False) -> Pair:
    """Validate a (chosen, rejected) pair of [B, T] token weights and zero it off the completion."""
    if pair is None:
        raise ValueError(f"missing required extra input {name}=(chosen, rejected)")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a (chosen, rejected) pair of [B, T] tensors")
    out = []
    for side, values, stats in (("chosen", pair[0], chosen), ("rejected", pair[1], rejected)):
        if tuple(values.shape) != tuple(stats.mask.shape):
            raise ValueError(f"{name}[{side}] has shape {tuple(values.shape)}, expected {tuple(stats.mask.shape)} "
                             f"like the {side} token statistics")
        on_completion = values.detach()[stats.mask > 0]
        if not torch.isfinite(on_completion).all():
            raise ValueError(f"{name}[{side}] has non-finite values on completion tokens")
        if (on_completion < 0).any():
            row = int((values.detach() * stats.mask < 0).any(-1).nonzero()[0])
            raise ValueError(f"{name}[{side}] has negative values (first in row {row}); token weights must be >= 0")
        if binary and not ((on_completion == 0) | (on_completion == 1)).all():
            raise ValueError(f"{name}[{side}] must be 0/1 on completion tokens")
        out.append(values * stats.mask.to(values.dtype))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------- metrics
def base_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, chosen: TokenStats,
             rejected: TokenStats) -> dict[str, Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen.seq_logps.detach().mean(),
        "logps/rejected": rejected.seq_logps.detach().mean(),
    }
    if chosen.kl is not None and rejected.kl is not None:
        metrics["kl/chosen"] = chosen.seq_kl.detach().mean()
        metrics["kl/rejected"] = rejected.seq_kl.detach().mean()
    return metrics


def mask_metrics(metrics: dict[str, Tensor], kind: str, masks: Pair, chosen: TokenStats,
                  rejected: TokenStats) -> None:
    """mask/{sparsity,mean}_{kind}_{side}: per row, the share of its completion tokens with weight exactly 0 and its
    mean weight over them; then the batch mean of those per-row values.

    Averaging per row first (as :func:`tokenpo.masks.mask_summary`) makes the logged value of a global batch the
    same however it is split over processes or accumulation steps (each micro-batch mean is a mean of row values).
    """
    for side, values, stats in (("chosen", masks[0], chosen), ("rejected", masks[1], rejected)):
        on = stats.mask > 0
        values = values.detach().float()
        count = on.sum(-1).clamp(min=1)
        zeros = ((values == 0) & on).sum(-1) / count
        means = torch.where(on, values, 0.0).sum(-1) / count
        metrics[f"mask/sparsity_{kind}_{side}"] = zeros.float().mean()
        metrics[f"mask/mean_{kind}_{side}"] = means.mean()
