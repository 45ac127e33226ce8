"""Every figure of the companion. Notebooks call these, so figures look the same everywhere.

Each function takes plain data (lists, arrays, dicts), draws on a new or given matplotlib Axes, and returns the
Figure. `save(fig, folder, name)` writes PNG (and optionally PDF) next to a notebook's other results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
}
plt.rcParams.update(STYLE)


def save(fig: plt.Figure, folder: str | Path, name: str, pdf: bool = False) -> Path:
    """Save `fig` as `<folder>/<name>.png` (and `.pdf` if asked); returns the PNG path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    if pdf:
        fig.savefig(folder / f"{name}.pdf", bbox_inches="tight")
    return path


def training_curve(steps: Sequence[int], train_loss: Sequence[float], val_steps: Sequence[int] = (),
                   val_loss: Sequence[float] = (), ylabel: str = "loss (nats / token)", title: str = "") -> plt.Figure:
    """Training loss per step (thin) with held-out validation loss (markers)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(steps, train_loss, lw=0.8, alpha=0.7, label="train")
    if len(val_steps):
        ax.plot(val_steps, val_loss, "o-", ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ per-token figures
def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable labels of single tokens: each id decoded alone, a leading space shown as "␣", newlines as "⏎", and
    the EOS token as "EOS"."""
    labels = []
    for i in ids:
        i = int(i)
        if i == tokenizer.eos_token_id:
            labels.append("EOS")
            continue
        text = tokenizer.decode([i])
        labels.append(text.replace(" ", "␣").replace("\n", "⏎") or "∅")
    return labels


def token_heatmap(tokens: Sequence[str], rows: Mapping[str, Sequence[float]], ax: plt.Axes | None = None,
                  title: str = "", cmap: str = "RdBu_r", row_scale: bool = True, fmt: str = "{:.2g}",
                  colorbar: bool = False) -> plt.Figure:
    """A strip per quantity (rows, top to bottom) over the tokens of one sequence (columns), each cell annotated.

    Colours are centred at 0 (blue < 0 < red). With `row_scale` each row is coloured relative to its own largest
    |value|, so rows of very different size (log-probs, rewards, KL, mask weights) stay readable; the printed
    numbers are the true values. NaN cells are left blank. `colorbar` adds a colour bar (in the rows' units when
    `row_scale` is False, else as a share of each row's largest |value|).
    """
    names = list(rows)
    values = np.array([np.asarray(rows[name], dtype=float) for name in names])
    if values.ndim != 2 or values.shape[1] != len(tokens):
        raise ValueError(f"token_heatmap: every row needs one value per token ({len(tokens)}); got shape "
                         f"{values.shape}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 + 0.62 * len(tokens), 0.5 + 0.42 * len(names)))
    fig = ax.figure
    finite = np.where(np.isfinite(values), np.abs(values), 0.0)
    scale = finite.max(axis=1, keepdims=True) if row_scale else np.full((len(names), 1), finite.max())
    colours = values / np.where(scale > 0, scale, 1.0)
    image = ax.imshow(np.ma.masked_invalid(colours), cmap=cmap, vmin=-1, vmax=1, aspect="auto",
                      interpolation="nearest")
    if colorbar:
        bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        if not row_scale:
            bar.set_ticks([-1, 0, 1], labels=[f"{-scale.max():.2g}", "0", f"{scale.max():.2g}"])
        bar.set_label("weight" if not row_scale else "share of the row's largest |value|", fontsize=8)
        bar.ax.tick_params(labelsize=8)
    for r in range(len(names)):
        for c in range(len(tokens)):
            if np.isfinite(values[r, c]):
                ax.text(c, r, fmt.format(values[r, c] + 0.0), ha="center", va="center", fontsize=7,  # no "-0"
                        color="white" if abs(colours[r, c]) > 0.6 else "black")
    ax.set_xticks(range(len(tokens)), list(tokens), rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    return fig


def token_heatmaps(panels: Mapping[str, tuple[Sequence[str], Mapping[str, Sequence[float]]]], title: str = "",
                   **kwargs) -> plt.Figure:
    """Several `token_heatmap`s stacked vertically, one per panel name (e.g. "chosen", "rejected"): panel ->
    (tokens, rows). Keyword arguments go to `token_heatmap`."""
    widest = max(len(tokens) for tokens, _ in panels.values())
    heights = [len(rows) + 2.2 for _, rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(1.8 + 0.62 * widest, 0.42 * sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, (tokens, rows)) in zip(axes[:, 0], panels.items()):
        token_heatmap(tokens, rows, ax=ax, title=name, **kwargs)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout()
    return fig


def labelled_bars(labels: Sequence[str], values: Sequence[float], xlabel: str = "", title: str = "",
                  ax: plt.Axes | None = None, fmt: str = "{:.3g}", log: bool = False) -> plt.Figure:
    """Horizontal bars, one per label (top to bottom in the given order), each with its value printed; `log`
    puts the values (all > 0) on a log axis, for quantities of very different size."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.32 * len(labels)))
    fig = ax.figure
    positions = np.arange(len(labels))[::-1]
    ax.barh(positions, values, color=["C3" if v < 0 else "C0" for v in values])
    ax.set_yticks(positions, list(labels))
    for y, v in zip(positions, values):
        ax.text(v, y, " " + fmt.format(v) + " ", va="center", ha="left" if v >= 0 else "right", fontsize=8)
    if log:
        if min(values) <= 0:
            raise ValueError("labelled_bars(log=True) needs values > 0")
        ax.set_xscale("log")
    else:
        ax.axvline(0.0, color="black", lw=0.6)
    ax.margins(x=0.15)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
