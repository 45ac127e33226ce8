"""Ready-made ``TrainConfig.extra_inputs_fn`` hooks for the methods whose extra inputs depend on the batch:
SePO token selections and FPO pooled SAE features.

A hook is called once per micro-batch with a :class:`tokenpo.train_step.StepInputs` and returns objective keyword
arguments as (chosen, rejected) pairs. The factories below also declare what the trainer must compute for them
(attributes ``needs_policy_layers``, ``needs_reference_layers``, ``uses_reference``; see ``make_plan``).

TIS-DPO weights need no hook: precompute them per completion token and store them as dataset columns
``chosen_weights``/``rejected_weights`` (the trainer shifts [B, L] token columns to label positions).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .train_step import PAIR_SIDES, StepInputs, split_pairs

__all__ = ["sepo_inputs", "fpo_inputs"]


def _token_column(inputs: StepInputs, side: str, column: str) -> Tensor:
    key = f"{side}_{column}"
    if key not in inputs.batch:
        raise ValueError(f"batch has no column {key!r} (per-token scores, one value per input token)")
    values = inputs.batch[key]
    return values[:, 1:] if values.shape == inputs.batch[f"{side}_input_ids"].shape else values


def sepo_inputs(ratio_chosen: float = 0.3, ratio_rejected: float = 0.3, column: str | None = "token_scores",
                seed: int = 0, min_count: int = 1) -> Callable[[StepInputs], dict]:
    """SePO selections (papers.md §2.1): the top ``ratio_chosen`` of each chosen response's tokens and the bottom
    ``ratio_rejected`` of each rejected one, ranked by the oracle scores in batch columns ``chosen_<column>`` /
    ``rejected_<column>`` (:func:`tokenpo.masks.oracle_scores`, stored per input token [B, L] or per label [B, T]).

    ``column=None`` gives SePO-rand: uniformly random tokens, drawn per dataset row from (seed, row_index), so the
    same row gets the same tokens whatever the batching, process count or resumption.
    """
    from .masks import sepo_selection

    def hook(inputs: StepInputs) -> dict:
        selections = []
        stats = {"chosen": inputs.chosen, "rejected": inputs.rejected}
        for side, ratio in zip(PAIR_SIDES, (ratio_chosen, ratio_rejected)):
            mask = stats[side].mask
            if column is None:
                scores = _row_uniforms(inputs.batch["row_index"], side, seed, mask.shape[1]).to(mask.device)
                highest = True
            else:
                scores = _token_column(inputs, side, column).to(mask.device)
                highest = side == "chosen"
            selections.append(sepo_selection(scores, mask, ratio, highest=highest, min_count=min_count))
        return {"selections": tuple(selections)}

    hook.uses_reference = False  # SePO's policy loss is reference-free; the oracle scored offline
    return hook


def _row_uniforms(row_index: Tensor, side: str, seed: int, length: int) -> Tensor:
    rows = [np.random.default_rng([seed, int(r), PAIR_SIDES.index(side)]).random(length) for r in row_index.tolist()]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def _layer_position(n_layers: int, layer: int, site: str) -> int:
    """Index into the trainer's per-layer states (HF ``hidden_states[1:]``: block outputs, except that the last one
    is after the final norm) of the residual stream at (layer, site) as :func:`tokenpo.sae.capture_residual` reads
    it."""
    if site == "final_norm":
        return n_layers - 1
    if site != "block_out":
        raise ValueError(f"site={site!r}: choose 'block_out' or 'final_norm'")
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer={layer} out of range for a {n_layers}-layer model")
    position = layer % n_layers
    if position == n_layers - 1:
        raise ValueError("the last block's output (before the final norm) is not among the per-layer states the "
                         "trainer collects (HF's last hidden state is after the final norm): train the SAE on "
                         "site='final_norm' (the official FPO code's choice) or on an earlier layer")
    return position


def fpo_inputs(sae, layer: int = -1, site: str = "block_out", pooling: str = "official",
               cache=None) -> Callable[[StepInputs], dict]:
    """FPO inputs (papers.md §3): pooled SAE features of the policy's residual stream at (layer, site), with
    gradients, and the reference's — from the live reference model (official code) or, with ``cache``
    (:class:`tokenpo.sae.FPOReferenceCache`, built with the same SAE, layer, site and pooling), from the offline
    cache together with its length-normalised reference log-probs (the paper's setting: no reference model at all).

    The SAE is frozen here. Note that ``pooling="official"`` divides by the padded length T of the batch the
    features were computed in, so cached features match the trainer's only with the same batching; ``"paper"``
    (mean over completion tokens) does not depend on it.
    """
    from .sae import pooled_features

    sae.requires_grad_(False)

    def pooled(layers, stats, no_grad: bool) -> tuple[Tensor, Tensor]:
        position = _layer_position(len(layers), layer, site)
        halves = split_pairs(layers[position])
        with torch.set_grad_enabled(not no_grad and torch.is_grad_enabled()):
            return tuple(pooled_features(sae.to(h.device), h, s.mask, mode=pooling) for h, s in zip(halves, stats))

    def hook(inputs: StepInputs) -> dict:
        stats = (inputs.chosen, inputs.rejected)
        out = {"features": pooled(inputs.policy_layers, stats, no_grad=False)}
        if cache is None:
            out["ref_features"] = pooled(inputs.reference_layers, stats, no_grad=True)
            return out
        ref = cache.get(inputs.batch["row_index"], device=inputs.chosen.mask.device)
        out["ref_features"] = (ref["ref_features_chosen"], ref["ref_features_rejected"])
        out["ref_mean_logps"] = (ref["ref_logps_mean_chosen"], ref["ref_logps_mean_rejected"])
        return out

    hook.needs_policy_layers = True
    hook.needs_reference_layers = cache is None
    hook.uses_reference = cache is None
    return hook
