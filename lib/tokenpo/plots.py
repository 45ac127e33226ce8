"""Every figure of the companion. Notebooks call these, so figures look the same everywhere.

Each function takes plain data (lists, arrays, dicts), draws on a new or given matplotlib Axes, and returns the
Figure. `save(fig, folder, name)` writes PNG (and optionally PDF) next to a notebook's other results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt

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
