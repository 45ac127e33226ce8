"""Figures of the sentiment experiment (drawn in `tokenpo.plots`' style): reward and judges vs KL run by run, the
hacking detectors, mask sparsity over training, mask alignment with its controls. Token heat maps use
`tokenpo.plots.token_heatmaps`."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from tokenpo import plots  # noqa: F401  (applies the shared style)

METHOD_ORDER = ("dpo", "tdpo1", "tdpo2", "simpo", "mapo", "sparsepo_common", "sparsepo_independent")


def colour(label: str) -> str:
    """One colour per method; a label such as "dpo β=0.8" gets its method's colour."""
    method = label.split(" ")[0]
    return f"C{METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)}"


def _style(label: str) -> str:
    """Line style by β rank within a method: solid for the first β of a label list, dashed for the next."""
    return "--" if "β=0.8" in label else "-"


def frontier(points: pd.DataFrame, y: str = "reward", ylabel: str = "reward", levels: Sequence[float] = (),
             zoom_kl: float | None = None, title: str = "") -> plt.Figure:
    """`y` vs sequence KL(π_θ‖π_ref) on fresh samples: every run a thin line from the reference (KL 0) through its
    checkpoints, each label's mean over runs at a grid of KL values (interpolated run by run, drawn only where every
    run reaches) a thick line; the pre-registered KL levels as dotted verticals. No Pareto envelope: a maximum over
    noisy checkpoints is biased upwards. Two panels: every run at full range, and the range up to `zoom_kl` so that a
    method that runs far does not squash the others."""
    panels = 2 if zoom_kl else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    for ax, limit in zip(axes[0], (None, zoom_kl)[:panels]):
        for name, g in points.groupby("label", sort=False):
            c = colour(name)
            reaches = []
            for _, run in g.groupby("seed"):
                run = run.sort_values("step")
                ax.plot(run["kl"], run[y], color=c, alpha=0.25, lw=0.8, ls=_style(name))
                reaches.append(run["kl"].max())
            grid = np.linspace(0, min(reaches), 25)
            curves = [np.interp(grid, run.sort_values("kl")["kl"], run.sort_values("kl")[y])
                      for _, run in g.groupby("seed")]
            ax.plot(grid, np.mean(curves, axis=0), color=c, lw=2.2, ls=_style(name),
                    label=f"{name} ({g['seed'].nunique()} runs)")
        for level in levels:
            ax.axvline(level, color="grey", ls=":", lw=0.9)
        ref = points[points["step"] == 0]
        ax.scatter([0], [ref[y].iloc[0]], marker="*", s=140, color="black", zorder=5, label="reference")
        if limit is not None:
            ax.set_xlim(-0.02 * limit, limit)
            inside = points[points["kl"] <= limit][y]
            pad = 0.05 * (inside.max() - inside.min() + 1e-9)
            ax.set_ylim(inside.min() - pad, inside.max() + pad)
            ax.set_title(f"zoom: KL ≤ {limit:g}", fontsize=9)
        ax.set_xlabel("sequence KL(π_θ ‖ π_ref)  (nats, fresh samples)")
        ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def detectors(points: pd.DataFrame, columns: Mapping[str, str], title: str = "") -> plt.Figure:
    """Hacking detectors per checkpoint vs KL, one panel per column (column -> axis label), each label's runs as
    points and their mean per step as a line."""
    fig, axes = plt.subplots(1, len(columns), figsize=(3.4 * len(columns), 3.4), squeeze=False)
    for ax, (column, name) in zip(axes[0], columns.items()):
        for lab, g in points.groupby("label", sort=False):
            ax.scatter(g["kl"], g[column], s=8, color=colour(lab), alpha=0.35)
            mean = g.groupby("step")[[column, "kl"]].mean().sort_values("kl")
            ax.plot(mean["kl"], mean[column], color=colour(lab), ls=_style(lab), lw=1.6, label=lab)
        ax.set_xlabel("KL (nats)")
        ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def sparsity_over_steps(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], title: str = "",
                        smooth: int = 5) -> plt.Figure:
    """Mask sparsity (share of completion tokens with weight exactly 0) per step: one panel per mask ("reward",
    "kl"), a line per label (mean over its runs, band = min..max). curves: "label|kind" -> [(steps, values) per run]."""
    kinds = ("reward", "kl")
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), sharey=True)
    for ax, kind in zip(axes, kinds):
        for key, runs in curves.items():
            lab, k = key.split("|")
            if k != kind or not runs:
                continue
            steps = runs[0][0]
            values = np.array([_smooth(v, smooth) for _, v in runs])
            ax.plot(steps, values.mean(0), color=colour(lab), ls=_style(lab), label=f"{lab} ({len(runs)} runs)")
            ax.fill_between(steps, values.min(0), values.max(0), color=colour(lab), alpha=0.15)
        ax.set_title(f"{kind} mask", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("sparsity (share of weights = 0)")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def alignment_bars(table: pd.DataFrame, metric: str, baseline: float, xlabel: str, title: str = "") -> plt.Figure:
    """Mean ± 95 % t interval over runs of `metric` per (label, weighting) row of a per-run alignment table, one bar
    per row; controls measured once (random, MaPO) have no interval. `baseline` (0.5 for AUROC, 1 for a mass ratio)
    is the no-alignment line."""
    from scipy import stats

    rows = []
    for (lab, weighting), g in table.groupby(["label", "weighting"], sort=False):
        values = g[metric].dropna().to_numpy()
        if not len(values):            # e.g. no key token in the set: nothing to show
            continue
        half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 \
            else 0.0
        rows.append((f"{lab}: {weighting}" if lab else weighting, values.mean(), half, colour(lab or "control")))
    fig, ax = plt.subplots(figsize=(7.2, 0.7 + 0.3 * len(rows)))
    positions = np.arange(len(rows))[::-1]
    ax.barh(positions, [r[1] for r in rows], xerr=[r[2] for r in rows], color=[r[3] for r in rows], alpha=0.8,
            error_kw={"lw": 1})
    ax.set_yticks(positions, [r[0] for r in rows], fontsize=8)
    ax.axvline(baseline, color="black", lw=0.8)
    lo = min([r[1] - r[2] for r in rows], default=baseline)
    ax.set_xlim(min(lo, baseline) - 0.02 * abs(baseline or 1), None)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")
