"""Figures of the code experiment (in `tokenpo.plots`' style): pass@k against k per method, and each run's pass@k
minus DPO's on the same seed. Mask sparsity over training and token heat maps reuse
`tokenpo.tasks.sentiment.figures.sparsity_over_steps` and `tokenpo.plots.token_heatmaps`."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from tokenpo import plots  # noqa: F401  (applies the shared style)
from tokenpo.tasks.sentiment.figures import colour


def pass_at_k_curves(runs: pd.DataFrame, ks: Sequence[int], anchor: dict, title: str = "") -> plt.Figure:
    """pass@k against k (log axis): per label its mean over runs (line, band = min..max over runs), the reference
    dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    columns = [f"pass@{k}" for k in ks]
    for name, g in runs.groupby("label", sort=False):
        values = g[columns].to_numpy()
        ax.plot(ks, values.mean(0), color=colour(name), marker="o", lw=1.8, label=f"{name} ({len(g)} runs)")
        ax.fill_between(ks, values.min(0), values.max(0), color=colour(name), alpha=0.12)
    ax.plot(ks, [anchor[c] for c in columns], color="black", ls="--", marker="*", label="reference π_ref")
    ax.set_xscale("log")
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k on held-out problems")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def paired_differences(runs: pd.DataFrame, ks: Sequence[int], baseline: str, title: str = "") -> plt.Figure:
    """One panel per k: every run's pass@k minus the baseline run's on the same seed (dots), their mean (bar); 0 is
    "as DPO"."""
    others = [name for name in runs["label"].unique() if name != baseline]
    fig, axes = plt.subplots(1, len(ks), figsize=(3.3 * len(ks), 0.9 + 0.42 * len(others)), sharey=True,
                             squeeze=False)
    base = runs[runs["label"] == baseline].set_index("seed")
    positions = np.arange(len(others))[::-1]
    for ax, k in zip(axes[0], ks):
        column = f"pass@{k}"
        for y, name in zip(positions, others):
            g = runs[runs["label"] == name].set_index("seed")
            diff = (g[column] - base[column].reindex(g.index)).dropna()
            ax.barh(y, diff.mean(), color=colour(name), alpha=0.35)
            ax.scatter(diff.to_numpy(), np.full(len(diff), y), color=colour(name), s=14, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"pass@{k}", fontsize=9)
        ax.set_xlabel(f"minus {baseline.split(' ')[0]}'s (same seed)")
    axes[0, 0].set_yticks(positions, others, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
