"""Means with confidence intervals, and reward-vs-KL Pareto frontiers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float
    n: int
    level: float
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(values: Iterable[float], level: float = 0.95, method: str = "normal", n_boot: int = 2000,
            seed: int = 0) -> MeanCI:
    """Mean and a two-sided confidence interval.

    "normal": mean +- z_{(1+level)/2} * s / sqrt(n), s the sample standard deviation (ddof=1) — the CLT
    approximation, fine for n >~ 30. "bootstrap": the percentile interval of `n_boot` resampled means (seeded).
    With one value the interval is (nan, nan).
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("mean_ci got non-finite values")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, math.nan, math.nan, 1, level, method)
    if method == "normal":
        half = NormalDist().inv_cdf((1 + level) / 2) * float(x.std(ddof=1)) / math.sqrt(x.size)
        return MeanCI(mean, mean - half, mean + half, int(x.size), level, method)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return MeanCI(mean, float(low), float(high), int(x.size), level, method)
    raise ValueError(f"method must be 'normal' or 'bootstrap', got {method!r}")


# ------------------------------------------------------------------------------------------------------ frontiers

def pareto_frontier(kl: Sequence[float], reward: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Upper-left Pareto frontier: the points no other point beats with lower-or-equal KL and higher reward.

    Returned sorted by KL (ascending), with strictly increasing reward, so that `max reward for KL <= x` is the
    reward of the last frontier point with kl <= x (see `frontier_reward_at`).
    """
    kl, reward = np.asarray(kl, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    if kl.shape != reward.shape or kl.ndim != 1:
        raise ValueError(f"kl and reward must be 1-D arrays of one length, got {kl.shape} and {reward.shape}")
    if not (np.all(np.isfinite(kl)) and np.all(np.isfinite(reward))):
        raise ValueError("pareto_frontier got non-finite values")
    order = np.lexsort((-reward, kl))  # by KL, and the best reward first among equal KL
    keep, best = [], -np.inf
    for i in order:
        if reward[i] > best:
            keep.append(i)
            best = reward[i]
    keep = np.array(keep, dtype=np.int64)
    return kl[keep], reward[keep]


def frontiers(points: Iterable[tuple[float, float, Any]]) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """Per label, the Pareto frontier of its (kl, reward, label) points (labels in first-seen order)."""
    grouped: dict[Any, tuple[list, list]] = {}
    for kl, reward, label in points:
        grouped.setdefault(label, ([], []))
        grouped[label][0].append(kl)
        grouped[label][1].append(reward)
    return {label: pareto_frontier(k, r) for label, (k, r) in grouped.items()}


def frontier_reward_at(frontier: tuple[np.ndarray, np.ndarray], max_kl: float) -> float:
    """The best reward reachable with KL <= max_kl on a frontier (nan when no point is that close)."""
    kl, reward = frontier
    i = np.searchsorted(kl, max_kl, side="right")
    return float(reward[i - 1]) if i > 0 else math.nan
