"""Figures of the sentiment experiment (drawn in `tokenpo.plots`' style): the reward-vs-KL frontier, mask sparsity
and sequence KL over training, and token heat maps of masks (PNG and HTML)."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from tokenpo import plots  # noqa: F401  (applies the shared style)

METHOD_ORDER = ("dpo", "tdpo1", "tdpo2", "simpo", "mapo", "sparsepo_common", "sparsepo_independent")


def _colour(method: str) -> str:
    """One colour per method; a label such as "dpo (β=0.8)" gets its method's colour."""
    method = method.split(" ")[0]
    return f"C{METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)}"


def frontier(points, frontiers: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "",
             reward_label: str = "reward  P(pos) − P(neg)") -> plt.Figure:
    """Reward vs sequence KL(π_θ‖π_ref): a point per method × β × checkpoint (95 % CI bars on the reward; marker
    size grows with β's rank), the Pareto frontier of each method as a line. `points` is a DataFrame of
    `analysis.frontier_points`."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for method, g in points.groupby("method", sort=False):
        c = _colour(method)
        trained = g[g["step"] > 0]
        betas = sorted(trained["beta"].unique())
        sizes = trained["beta"].map({b: 14 + 22 * i for i, b in enumerate(betas)})
        ax.errorbar(trained["kl"], trained["reward"], yerr=[trained["reward"] - trained["reward_lo"],
                                                              trained["reward_hi"] - trained["reward"]],
                    fmt="none", ecolor=c, alpha=0.25, lw=0.8)
        ax.scatter(trained["kl"], trained["reward"], s=sizes, color=c, alpha=0.7, edgecolors="none")
        kl, reward = frontiers[method]
        ax.plot(kl, reward, "-", color=c, lw=1.6, label=method)
    ref = points[points["step"] == 0]
    if len(ref):
        ax.scatter(ref["kl"].iloc[:1], ref["reward"].iloc[:1], marker="*", s=140, color="black", zorder=5,
                   label="reference")
    ax.set_xlabel("sequence KL(π_θ ‖ π_ref)  (nats, fresh samples)")
    ax.set_ylabel(reward_label)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "reward vs KL: points = β × checkpoint, lines = frontier per method")
    fig.tight_layout()
    return fig


def sparsity_over_steps(curves: Mapping[float, Mapping[str, tuple[np.ndarray, np.ndarray]]], title: str = "",
                        smooth: int = 5) -> plt.Figure:
    """Mask sparsity (share of completion tokens with weight exactly 0) per step, one line per β, in four panels:
    reward / KL mask × chosen / rejected. curves: β -> metric name (e.g. "mask/sparsity_kl_chosen") -> (steps,
    values)."""
    panels = (("reward", "chosen"), ("reward", "rejected"), ("kl", "chosen"), ("kl", "rejected"))
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 5.2), sharex=True, sharey=True)
    for ax, (kind, side) in zip(axes.flat, panels):
        metric = f"mask/sparsity_{kind}_{side}"
        for i, (beta, by_metric) in enumerate(sorted(curves.items())):
            if metric not in by_metric:
                continue
            steps, values = by_metric[metric]
            ax.plot(steps, _smooth(values, smooth), color=plt.cm.viridis(i / max(1, len(curves) - 1)),
                    label=f"β={beta:g}")
        ax.set_title(f"{kind} mask, {side}", fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("sparsity")
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def kl_over_steps(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], title: str = "",
                  smooth: int = 5) -> plt.Figure:
    """Sequence KL Σ_t KL_t(π_ref‖π_θ) on the training pairs per step, chosen and rejected panels, one line per
    method. curves: method -> {"kl/chosen": (steps, values), "kl/rejected": ...}."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), sharey=True)
    for ax, side in zip(axes, ("chosen", "rejected")):
        for method, by_metric in curves.items():
            steps, values = by_metric[f"kl/{side}"]
            ax.plot(steps, _smooth(values, smooth), color=_colour(method), label=method)
        ax.set_title(f"{side} completions", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("sequence KL (nats)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _display_token(token: str) -> str:
    return token.replace(" ", "␣").replace("\n", "⏎") or "EOS"


def mask_heatmap(panels: Sequence[tuple[str, Sequence[str], Mapping[str, Sequence[float]]]],
                 title: str = "") -> plt.Figure:
    """One panel per example: (title, tokens, {mask name: weight per token}); a row per mask, coloured relative to
    the row's largest weight (the printed numbers are the weights), tokens along the x axis."""
    width = max(len(tokens) for _, tokens, _ in panels)
    heights = [len(rows) + 1.6 for _, _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(2.4 + 0.5 * width, 0.42 * sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (label, tokens, rows) in zip(axes[:, 0], panels):
        w = np.array([np.asarray(v, dtype=float) for v in rows.values()])
        scale = np.where(w.max(1, keepdims=True) > 0, w.max(1, keepdims=True), 1.0)
        ax.imshow(w / scale, cmap="Reds", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if w[i, j] / scale[i, 0] > 0.6 else "black")
        ax.set_xticks(range(len(tokens)), [_display_token(t) for t in tokens], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
        ax.set_title(label, fontsize=9, loc="left")
        ax.grid(False)
        ax.tick_params(length=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def mask_heatmap_html(rows: Sequence[tuple[str, Sequence[str], Sequence[float]]],
                      marked: Sequence[Sequence[int]] | None = None) -> str:
    """The same rows as HTML: each token on a red background proportional to its weight (relative to the row's
    largest); hover shows the weight; tokens listed in `marked[i]` (e.g. lexicon words) are underlined."""
    parts = ["<div style='font-family:monospace;font-size:12px;line-height:1.9'>"]
    for i, (label, tokens, weights) in enumerate(rows):
        w = np.asarray(weights, dtype=float)
        scale = w.max() if w.size and w.max() > 0 else 1.0
        underline = set(marked[i]) if marked is not None else set()
        cells = []
        for j, (token, value) in enumerate(zip(tokens, w)):
            alpha = max(0.0, float(value / scale))
            style = f"background:rgba(214,39,40,{alpha:.2f});padding:1px 0"
            if j in underline:
                style += ";text-decoration:underline"
            cells.append(f"<span title='{value:.3f}' style='{style}'>{html.escape(_display_token(token))}</span>")
        parts.append(f"<div><b>{html.escape(label)}</b>: {''.join(cells)}</div>")
    parts.append("</div>")
    return "".join(parts)
