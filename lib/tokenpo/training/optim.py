"""Optimizer parameter groups and learning-rate schedules shared by the preference trainer and SFT."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")


def schedule_factor(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based), as 🤗 transformers'
    `get_{cosine,linear,constant}_schedule_with_warmup`: linear warm-up from 0, then cosine/linear decay to 0 at
    `total_steps`, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def delayed_factor(base: Callable[[int], float], freeze_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """`base`, but 0 for the first `freeze_steps` steps and then ramped up linearly over `warmup_steps` steps."""

    def factor(step: int) -> float:
        if step < freeze_steps:
            return 0.0
        ramp = min(1.0, (step - freeze_steps + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return base(step) * ramp

    return factor


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, provider_lr: float | None = None,
                     provider_weight_decay: float | None = None, provider_prefix: str = "providers.") -> list[dict]:
    """AdamW parameter groups over the trainable parameters of `model`.

    - "decay": matrices (dim >= 2) of the policy, with `weight_decay`;
    - "no_decay": biases and norm weights of the policy, without weight decay;
    - "providers": every parameter whose name starts with `provider_prefix` (the providers' modules inside
      :class:`tokenpo.training.step.TrainablePolicy`, e.g. SparsePO's mask networks), with their own `provider_lr`
      (default `lr`) and `provider_weight_decay` (default `weight_decay`).
    Empty groups are left out; every group carries its "name".
    """
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "providers": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if provider_prefix and name.startswith(provider_prefix):
            groups["providers"].append(param)
        elif param.dim() >= 2:
            groups["decay"].append(param)
        else:
            groups["no_decay"].append(param)
    settings = {
        "decay": (lr, weight_decay),
        "no_decay": (lr, 0.0),
        "providers": (lr if provider_lr is None else provider_lr,
                      weight_decay if provider_weight_decay is None else provider_weight_decay),
    }
    out = [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
           for name, params in groups.items() if params]
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out
