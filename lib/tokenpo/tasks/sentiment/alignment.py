"""Do the masks weight the tokens that carry the reward? Token weights on held-out pairs whose key tokens are known:
the additive reward's rewarded words (sampled pairs) and the swapped sentiment words (planted pairs).

Per run and per weighting, on every completion token of both sides of the held-out pairs:
* **AUROC** of the weight as a score for "key token" (1 = every key token outweighs every other token, 0.5 = none);
* **mass ratio**: the share of the mask's mass on key tokens over the share of key tokens (1 = a uniform weight;
  averaged over the sequences that have key tokens);
* **mean weight** and **sparsity** (share of weights exactly 0), which separate *selection* (mass moves to key tokens)
  from *scaling* (every weight grows: a learned β, with a mass ratio of 1).
Controls: the same networks untrained (their state at step 0, paired by seed), a random U(0, 1) mask, MaPO's
activation mask (from the reference alone), and the ceiling of what the policy itself moved, |log π_θ − log π_ref|
per token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from tokenpo.providers.mapo import mapo_masks
from tokenpo.providers.random import random_mask
from tokenpo.providers.sparsepo import SparsePOMasks
from tokenpo.tokens import align_to_labels, completion_labels, label_mask, token_stats

from .data import token_lexicon_labels

SIDES = ("chosen", "rejected")
MASK_KINDS = ("reward", "kl", "mapo", "random")


def _completion_values(values: torch.Tensor, labels_mask: torch.Tensor) -> list[np.ndarray]:
    """Per row, the values at the completion's label positions, in token order."""
    return [v[m.bool()].detach().float().cpu().numpy() for v, m in zip(values, labels_mask)]


class ReferenceStates:
    """Batches of held-out pairs with what the analyses read from the reference — its per-layer hidden states
    (aligned with the labels, for the mask networks) and its log-probabilities of the completion tokens (for the
    policy's |log-ratio|) — computed once and reused for every run."""

    @torch.no_grad()
    def __init__(self, reference, tokenized, collator, batch_size: int = 32, hidden: bool = True):
        self.reference, self.batches = reference.eval(), []
        for batch in DataLoader(tokenized, batch_size=batch_size, shuffle=False, collate_fn=collator):
            entry = {}
            for side in SIDES:
                ids, attn = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
                labels = completion_labels(ids, batch[f"{side}_completion_mask"])
                out = reference(input_ids=ids, attention_mask=attn, output_hidden_states=hidden)
                layers = [align_to_labels(h) for h in out.hidden_states[1:]] if hidden else None
                ref_logps = token_stats(align_to_labels(out.logits), labels, with_kl=False).logps
                entry[side] = (ids, attn, label_mask(batch[f"{side}_completion_mask"]), layers, labels, ref_logps)
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
    out: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    for entry in states.batches:
        for side in SIDES:
            ids, attn, labels_mask, layers, _, _ = entry[side]
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


@torch.no_grad()
def policy_statistics(states: ReferenceStates, policy) -> dict:
    """What the policy does on the held-out pairs, from one forward per side: |log π_θ(y_t) − log π_ref(y_t)| per
    completion token (where the policy itself moved: the masks' ceiling), the preference accuracy P(mean log π_θ of
    the chosen completion > of the rejected one) and the mean entropy of π_θ over completion positions."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    logratios: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    mean_logps: dict[str, list[torch.Tensor]] = {side: [] for side in SIDES}
    entropy, positions = 0.0, 0
    try:
        for entry in states.batches:
            for side in SIDES:
                ids, attn, labels_mask, _, labels, ref_logps = entry[side]
                logits = align_to_labels(policy(input_ids=ids.to(device), attention_mask=attn.to(device)).logits)
                stats = token_stats(logits, labels.to(device), with_kl=False)
                logps, mask = stats.logps.cpu(), stats.mask.cpu()
                logratios[side] += _completion_values((logps - ref_logps).abs(), labels_mask)
                mean_logps[side].append((logps * mask).sum(-1) / mask.sum(-1).clamp(min=1))
                log_p = logits[mask.bool().to(device)].float().log_softmax(-1)
                entropy += float(-(log_p.exp() * log_p).sum())
                positions += int(mask.sum())
    finally:
        policy.train(was_training)
    chosen, rejected = torch.cat(mean_logps["chosen"]), torch.cat(mean_logps["rejected"])
    return {"logratios": logratios, "accuracy": float((chosen > rejected).float().mean()),
            "entropy": entropy / max(positions, 1)}


def key_token_labels(tokenized, tokenizer, reward) -> dict[str, list[np.ndarray]]:
    """Per pair and side, 1 for completion tokens that carry part of the additive reward (a rewarded word)."""
    return {side: [(reward.token_contributions(tokenizer, row[f"{side}_ids"]) != 0).astype(np.int64)
                   for row in tokenized] for side in SIDES}


def lexicon_labels(tokenized, tokenizer, lexicon=None) -> dict[str, list[np.ndarray]]:
    """Per pair and side, 1 for completion tokens inside a VADER-lexicon word (see `data.token_lexicon_labels`)."""
    if lexicon is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        lexicon = SentimentIntensityAnalyzer().lexicon
    return {side: [token_lexicon_labels(tokenizer, row[f"{side}_ids"], lexicon) for row in tokenized]
            for side in SIDES}


def planted_labels(tokenized) -> dict[str, list[np.ndarray]]:
    """Per pair and side, 1 at the swapped completion tokens (column `swapped` of planted pairs)."""
    out = {}
    for side in SIDES:
        labels = []
        for row in tokenized:
            y = np.zeros(len(row[f"{side}_ids"]), dtype=np.int64)
            y[list(row["swapped"])] = 1
            labels.append(y)
        out[side] = labels
    return out


def _flatten(weights: dict[str, list[np.ndarray]], labels: dict[str, list[np.ndarray]]):
    w, y = [], []
    for side in SIDES:
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
    tokens Σ y / n (what a uniform mask gives), and their ratio. Sequences without labelled tokens or with zero mass
    are skipped."""
    mass, base = [], []
    for side in SIDES:
        for a, b in zip(weights[side], labels[side]):
            if b.sum() == 0 or a.sum() <= 0:
                continue
            mass.append(float((a * b).sum() / a.sum()))
            base.append(float(b.mean()))
    on, uniform = (float(np.mean(mass)), float(np.mean(base))) if mass else (float("nan"), float("nan"))
    return {"mass_on_labelled": on, "uniform_share": uniform, "mass_ratio": on / uniform if mass else float("nan"),
            "sequences": len(mass)}


def alignment_stats(weights: dict[str, list[np.ndarray]], labels: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """AUROC, mass ratio, mean weight and sparsity of one weighting on one labelled set (see the module docstring);
    mean weight and sparsity are averaged per sequence, as the trainer logs mask/mean_* and mask/sparsity_*."""
    flat = [a for side in SIDES for a in weights[side]]
    return {"auroc": alignment_auroc(weights, labels), "mass_ratio": mass_share(weights, labels)["mass_ratio"],
            "mean_weight": float(np.mean([a.mean() for a in flat])),
            "sparsity": float(np.mean([(a == 0).mean() for a in flat]))}


def run_analysis(sets: dict[str, tuple[ReferenceStates, dict[str, list[np.ndarray]]]], model_config, mask_kwargs):
    """The per-run analysis of the sentiment runs. Returns `analyse(policy, masks, initial_masks)` giving
    {"heldout": preference accuracy and entropy of the policy on the first set's pairs,
     "alignment": {set: {weighting: alignment stats}}} with the policy's |log-ratio| and, for SparsePO runs, each mask
    network trained and untrained (its step-0 state), on every labelled set (name -> (states, labels))."""

    def analyse(policy, masks: SparsePOMasks | None, initial: dict | None) -> dict:
        untrained = None
        if masks is not None:
            untrained = SparsePOMasks.from_model_config(model_config, mode=masks.mode, **mask_kwargs)
            untrained.load_state_dict(initial)
            untrained.eval()
        alignment, heldout = {}, {}
        for name, (states, labels) in sets.items():
            policy_stats = policy_statistics(states, policy)
            if not heldout:
                heldout = {"accuracy": policy_stats["accuracy"], "entropy": policy_stats["entropy"]}
            row = {"policy |log-ratio|": alignment_stats(policy_stats["logratios"], labels)}
            for state, net in (("trained", masks), ("untrained", untrained)):
                if net is None:
                    continue
                for kind in (("reward",) if net.mode == "common" else ("reward", "kl")):
                    row[f"{kind} mask {state}"] = alignment_stats(token_masks(states, kind, masks=net.eval()), labels)
            alignment[name] = row
        return {"heldout": heldout, "alignment": alignment}

    return analyse


def heatmap_panels(tokenizer, tokenized, weights_by_name: dict[str, dict[str, list[np.ndarray]]],
                   pairs: Sequence[int], side: str = "chosen") -> dict[str, tuple[list[str], dict[str, np.ndarray]]]:
    """{title: (completion tokens, {weighting: weights})} per pair index, for `tokenpo.plots.token_heatmaps`."""
    from tokenpo.plots import token_labels

    return {f"held-out pair {i}, {side}": (token_labels(tokenizer, tokenized[i][f"{side}_ids"]),
                                            {name: w[side][i] for name, w in weights_by_name.items()})
            for i in pairs}
