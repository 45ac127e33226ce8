"""Random token weights and selections, for ablations (the official SparsePO `RandomMask`, SePO-rand)."""
from __future__ import annotations

import torch

from .sepo import sepo_selection

__all__ = ["random_mask", "random_selection"]


def _uniform(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) of mask's shape drawn on the generator's device (so a CPU generator works for CUDA masks and gives
    the same numbers on every device), moved to mask's device."""
    device = generator.device if generator is not None else mask.device
    return torch.rand(mask.shape, generator=generator, device=device).to(mask.device)


def random_mask(mask: torch.Tensor, generator: torch.Generator | None = None, kind: str = "uniform",
                p: float = 0.5) -> torch.Tensor:
    """Random token weights [B, T], 0 off `mask`: "uniform" U(0, 1) (official `RandomMask` ablation) or
    "bernoulli" (1 with probability p)."""
    u = _uniform(mask, generator)
    if kind == "uniform":
        return u * mask.bool()
    if kind == "bernoulli":
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got {p}")
        return (u < p).float() * mask.bool()
    raise ValueError(f"kind={kind!r}: choose 'uniform' or 'bernoulli'")


def random_selection(mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                     min_count: int = 1) -> torch.Tensor:
    """SePO-rand: 0/1 [B, T] with exactly `selection_counts(mask, ratio)` uniformly random completion tokens per row."""
    u = _uniform(mask, generator)
    return sepo_selection(u, mask, ratio, highest=True, min_count=min_count)
