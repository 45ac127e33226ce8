"""Optimizer parameter groups and learning-rate schedules shared by the preference trainer and SFT."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# Our names -> transformers' SchedulerType. "constant" has always meant warm-up, then constant (transformers'
# constant_with_warmup); every other name is transformers' own.
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup",
             "constant_with_warmup": "constant_with_warmup", "polynomial": "polynomial",
             "cosine_with_restarts": "cosine_with_restarts", "inverse_sqrt": "inverse_sqrt"}


def schedule_factor(kind: str, total_steps: int, warmup_steps: int, lr: float = 1.0) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): the lambda of 🤗 transformers'
    `get_scheduler(kind, ...)` itself (`get_{cosine,linear,constant}_schedule_with_warmup`, …), taken from the
    `LambdaLR` it builds.

    Kept as a function, not only as `get_scheduler`'s scheduler, because the providers' parameter group multiplies it
    by a delayed factor (`delayed_factor`: frozen, then ramped up) in one `LambdaLR` with one lambda per group;
    tests/test_trainer_adoption.py checks it equals transformers' schedule step by step. ``lr`` is the base learning
    rate of the group it multiplies (only "polynomial" depends on it: it decays towards an absolute lr_end)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} (transformers' get_scheduler), got {kind!r}")
    from transformers import get_scheduler

    probe = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=lr)
    scheduler = get_scheduler(SCHEDULES[kind], probe, num_warmup_steps=warmup_steps,
                              num_training_steps=max(1, total_steps))
    return scheduler.lr_lambdas[0]


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int,
                   provider_freeze_steps: int = 0, provider_warmup_steps: int = 0,
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's schedule: transformers' `get_scheduler` when no parameter group is the providers'; otherwise one
    `LambdaLR` with transformers' lambda for the policy's groups and the delayed one for the providers'."""
    names = [group.get("name") for group in optimizer.param_groups]
    if "providers" not in names:
        from transformers import get_scheduler

        return get_scheduler(SCHEDULES[kind], optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=max(1, total_steps))
    factors = []
    for group in optimizer.param_groups:
        base = schedule_factor(kind, total_steps, warmup_steps, lr=group["lr"])
        factors.append(delayed_factor(base, provider_freeze_steps, provider_warmup_steps)
                       if group.get("name") == "providers" else base)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


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
