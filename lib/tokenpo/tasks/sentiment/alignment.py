"""Do the masks weight the sentiment tokens? Token weights of SparsePO / MaPO / random masks on held-out pairs, and
how well a token's weight predicts that it carries sentiment (VADER lexicon) or was planted (swapped word).

The AUROC is pooled over every completion token of both sides of the pairs: 1 = every labelled token outweighs
every other token, 0.5 = no relation. It is compared with the same network untrained and with a random mask, not
only with 0.5, because an untrained network on the reference's states can already rank tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from tokenpo.providers.mapo import mapo_masks
from tokenpo.providers.random import random_mask
from tokenpo.providers.sparsepo import SparsePOMasks
from tokenpo.tokens import align_to_labels, label_mask

from .data import token_lexicon_labels

MASK_KINDS = ("reward", "kl", "mapo", "random")


def _completion_values(values: torch.Tensor, labels_mask: torch.Tensor) -> list[np.ndarray]:
    """Per row, the values at the completion's label positions, in token order."""
    return [v[m.bool()].detach().float().cpu().numpy() for v, m in zip(values, labels_mask)]


class ReferenceStates:
    """Batches of held-out pairs with the reference's per-layer hidden states (aligned with the labels), computed
    once and reused for every mask network (the mask networks only read these states)."""

    @torch.no_grad()
    def __init__(self, reference, tokenized, collator, batch_size: int = 32, hidden: bool = True):
        self.reference, self.batches = reference.eval(), []
        for batch in DataLoader(tokenized, batch_size=batch_size, shuffle=False, collate_fn=collator):
            entry = {}
            for side in ("chosen", "rejected"):
                ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
                layers = None
                if hidden:
                    states = reference(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
                    layers = [align_to_labels(h) for h in states[1:]]
                entry[side] = (ids, attn, label_mask(batch[f"{side}_completion_mask"]), layers)
            self.batches.append(entry)


@torch.no_grad()
def token_masks(states: ReferenceStates, kind: str, masks: SparsePOMasks | None = None,
                seed: int = 0) -> dict[str, list[np.ndarray]]:
    """{"chosen": [...], "rejected": [...]}: per pair, the weight of every completion token (incl. EOS) under
    `kind`: "reward" / "kl" (SparsePO networks `masks` on the reference's hidden states), "mapo" (the reference's
    activations, hook "all", zn_rescale) or "random" (U(0, 1), seeded)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"kind={kind!r}: choose from {MASK_KINDS}")
    if kind in ("reward", "kl") and masks is None:
        raise ValueError(f"mask kind {kind!r} needs the SparsePO mask networks")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    for entry in states.batches:
        for side in ("chosen", "rejected"):
            ids, attn, labels_mask, layers = entry[side]
            if kind == "mapo":
                values = mapo_masks(states.reference, ids, attn, labels_mask)
            elif kind == "random":
                values = random_mask(labels_mask, generator)
            else:
                if layers is None:
                    raise ValueError("these ReferenceStates were built with hidden=False; SparsePO masks need them")
                reward, kl = masks.weights(layers, labels_mask)
                values = reward if kind == "reward" else kl
            out[side] += _completion_values(values, labels_mask)
    return out


def lexicon_labels(tokenized, tokenizer, lexicon=None) -> dict[str, list[np.ndarray]]:
    """Per pair and side, 1 for completion tokens inside a VADER-lexicon word (see `data.token_lexicon_labels`)."""
    if lexicon is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        lexicon = SentimentIntensityAnalyzer().lexicon
    return {side: [token_lexicon_labels(tokenizer, row[f"{side}_ids"], lexicon) for row in tokenized]
            for side in ("chosen", "rejected")}


def planted_labels(tokenized) -> dict[str, list[np.ndarray]]:
    """Per pair and side, 1 at the swapped completion tokens (column `swapped` of planted pairs)."""
    out = {}
    for side in ("chosen", "rejected"):
        labels = []
        for row in tokenized:
            y = np.zeros(len(row[f"{side}_ids"]), dtype=np.int64)
            y[list(row["swapped"])] = 1
            labels.append(y)
        out[side] = labels
    return out


def _flatten(weights: dict[str, list[np.ndarray]], labels: dict[str, list[np.ndarray]]):
    w, y = [], []
    for side in ("chosen", "rejected"):
        if len(weights[side]) != len(labels[side]):
            raise ValueError(f"{side}: weights for {len(weights[side])} rows but labels for {len(labels[side])}")
        for i, (a, b) in enumerate(zip(weights[side], labels[side])):
            if len(a) != len(b):
                raise ValueError(f"{side} row {i}: {len(a)} token weights but {len(b)} labels")
            w.append(a)
            y.append(b)
    return np.concatenate(w), np.concatenate(y)


def alignment_auroc(weights: dict[str, list[np.ndarray]], labels: dict[str, list[np.ndarray]]) -> float:
    """AUROC of token weight as a score for label 1, pooled over all completion tokens of both sides (ties count
    half). nan when all tokens have one label."""
    from sklearn.metrics import roc_auc_score

    w, y = _flatten(weights, labels)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, w))


def mass_share(weights: dict[str, list[np.ndarray]], labels: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Mean over sequences of the share of mask mass on labelled tokens, Σ w·y / Σ w, next to the labelled share of
    tokens Σ y / n (what a uniform mask gives). Sequences without labelled tokens or with zero mass are skipped."""
    mass, base = [], []
    for side in ("chosen", "rejected"):
        for a, b in zip(weights[side], labels[side]):
            if b.sum() == 0 or a.sum() <= 0:
                continue
            mass.append(float((a * b).sum() / a.sum()))
            base.append(float(b.mean()))
    return {"mass_on_labelled": float(np.mean(mass)) if mass else float("nan"),
            "uniform_share": float(np.mean(base)) if base else float("nan"), "sequences": len(mass)}


def sparsity(weights: dict[str, list[np.ndarray]]) -> float:
    """Share of completion tokens with weight exactly 0."""
    flat = np.concatenate([a for side in ("chosen", "rejected") for a in weights[side]])
    return float((flat == 0).mean())


def heatmap_panels(tokenizer, tokenized, weights_by_name: dict[str, dict[str, list[np.ndarray]]],
                   pairs: Sequence[int], side: str = "chosen") -> list[tuple[str, list[str], dict[str, np.ndarray]]]:
    """(title, completion tokens, {mask name: weights}) per pair index, for `figures.mask_heatmap`."""
    panels = []
    for i in pairs:
        tokens = [tokenizer.decode([t]) for t in tokenized[i][f"{side}_ids"]]
        panels.append((f"held-out pair {i}, {side}", tokens, {name: w[side][i] for name, w in weights_by_name.items()}))
    return panels
