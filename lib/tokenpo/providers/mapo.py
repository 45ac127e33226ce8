"""MaPO masks: SparsePO's activation-mask variant (docs/equations.md#mapo), a fixed token weight in [0, 1] read
from the reference model's own activations; one mask for the reward and the KL term, no parameters, no gradient.

Official source: SparsePO `src/trainers/mapo_trainer.py` (hook points in :mod:`tokenpo.providers.activations`).
In training the statistics are recorded by hooks during the step's one reference forward (:class:`MaPOMasks`
declares them in its :class:`Needs`); :func:`mapo_masks` computes the same masks for analyses, with a forward of its own.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from tokenpo.utils import unwrap_model

from .activations import HOOK_TYPES, token_statistics
from .base import Needs, Provider, StepContext, split_pairs

MAPPINGS = ("zn_rescale", "sigmoid", "layernorm", "none")

__all__ = ["MAPPINGS", "MaPOMasks", "zn_rescale", "mapo_masks", "mapo_batch_masks", "masks_from_statistics"]


def zn_rescale(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MaPO `zn_rescale` of per-token statistics r [B, T] over each row's completion tokens (mask [B, T]).

        z_t = (r_t − mean_resp r) / (std_resp r + 1e-12)        # unbiased std (torch.std)
        m_t = (z_t − min_resp z) / (max_resp z − min_resp z) · mask_t

    (Mathematically this is a min-max rescale of r; the z step is kept to follow the official code, which also
    casts std/min/max to fp16 — here everything stays float32.) Rows with fewer than 2 completion tokens or a
    constant statistic — where the official code divides by zero — get weight 1 on every completion token (no
    ranking information, so fall back to TDPO-1's uniform weight). Rows without completion tokens get 0.
    """
    mask = mask.bool()
    r = values.float()
    n = mask.sum(-1, keepdim=True)
    mean = (r * mask).sum(-1, keepdim=True) / n.clamp(min=1)
    var = (((r - mean) * mask) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    z = (r - mean) / (var.sqrt() + 1e-12)
    z_min = z.masked_fill(~mask, float("inf")).amin(-1, keepdim=True)
    z_max = z.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    span = z_max - z_min
    ok = (n >= 2) & torch.isfinite(span) & (span > 0)
    scaled = torch.where(ok, (z - z_min) / torch.where(ok, span, torch.ones_like(span)), torch.ones_like(z))
    return scaled * mask


def _masked_layernorm(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z-normalise per row over completion tokens (biased std, eps 1e-5, like F.layer_norm), no rescale."""
    mask = mask.bool()
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (values * mask).sum(-1, keepdim=True) / n
    var = (((values - mean) * mask) ** 2).sum(-1, keepdim=True) / n
    return (values - mean) / torch.sqrt(var + 1e-5) * mask


def _parse_hook(hook) -> tuple[str, ...]:
    if isinstance(hook, str):
        if hook == "all":
            return HOOK_TYPES
        if hook == "uniform":
            return ("uniform",)
        hook = [h.strip() for h in hook.split(",") if h.strip()]
    types = tuple(hook)
    bad = [t for t in types if t not in HOOK_TYPES]
    if not types or bad:
        raise ValueError(f"hook={hook!r}: use 'all', 'uniform', or one or more of {HOOK_TYPES}")
    return types


def masks_from_statistics(stats: Mapping[str, list[torch.Tensor]], labels_mask: torch.Tensor,
                          mapping: str = "zn_rescale") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MaPO masks [B, T] (and per hook type) from per-token statistics aligned with the labels (see
    :func:`tokenpo.providers.activations.record_statistics`): `mapping` per hooked tensor, mean per type, mean over
    types, 0 off the completion, detached."""
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping={mapping!r}: choose from {MAPPINGS}")
    loss_mask = labels_mask.bool()

    def mapped(stat: torch.Tensor) -> torch.Tensor:
        if mapping == "zn_rescale":
            return zn_rescale(stat, loss_mask)
        if mapping == "layernorm":
            return _masked_layernorm(stat, loss_mask)
        return stat

    by_type = {}
    for kind, values in stats.items():
        if not values:
            raise ValueError(f"hook type {kind!r} recorded no activations")
        by_type[kind] = (torch.stack([mapped(s) for s in values]).mean(0) * loss_mask).detach()
    return torch.stack(list(by_type.values())).mean(0).detach(), by_type


def mapo_masks(ref_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels_mask: torch.Tensor, hook="all", mapping: str = "zn_rescale",
               return_by_type: bool = False):
    """MaPO token masks [B, T] from the reference model's activations (docs/equations.md#mapo), detached.

    input_ids, attention_mask: [B, L]; labels_mask: [B, L-1] (= completion_mask[:, 1:]).
    hook: "all" (= mean over the types resid, attn, mlp, logits), "uniform" (m ≡ 1 on the completion = TDPO-1),
          one type, or a tuple / comma list of types. Each type = mean over its hooked tensors and layers.
    mapping (applied to every hooked tensor a, aligned with the labels):
        zn_rescale  per-token mean over the hidden dim, then `zn_rescale` (values in [0, 1])   [official default]
        sigmoid     per-token mean of sigmoid(a)                                                 (values in (0, 1))
        layernorm   per-token mean, z-normalised over the completion (unbounded). The official code calls
                    F.layer_norm(a, normalized_shape=None), which raises, so this is our reading of it.
        none        per-token mean (unbounded). Official: mean over the concatenation of a type's tensors, i.e.
                    weighted by width; here every tensor counts equally.
    Returns m [B, T] (float32, requires_grad False, 0 off the completion); with `return_by_type` also a dict
    type -> [B, T]. The model runs in eval mode, under no_grad; its training flag is restored and all hooks are
    removed afterwards, even on error.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    expected = (input_ids.shape[0], input_ids.shape[1] - 1)
    if tuple(labels_mask.shape) != expected:
        raise ValueError(f"labels_mask must be [B, L-1] = {expected} (pass completion_mask[:, 1:]); "
                         f"got {tuple(labels_mask.shape)}")
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping={mapping!r}: choose from {MAPPINGS}")
    types = _parse_hook(hook)
    if types == ("uniform",):
        ones = labels_mask.bool().float()
        return (ones, {"uniform": ones}) if return_by_type else ones
    model = unwrap_model(ref_model)
    was_training = model.training
    model.eval()
    try:
        stats = token_statistics(model, input_ids, attention_mask, types, _reduce(mapping))
    finally:
        model.train(was_training)
    masks, by_type = masks_from_statistics(stats, labels_mask, mapping)
    return (masks, by_type) if return_by_type else masks


def mapo_batch_masks(ref_model: nn.Module, batch: Mapping[str, torch.Tensor], hook="all",
                     mapping: str = "zn_rescale") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) MaPO masks [B, T] for a collator batch, in one reference forward (sides concatenated;
    every statistic is per sequence, so concatenating changes nothing)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attn = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    comp = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    return split_pairs(mapo_masks(ref_model, ids, attn, comp[:, 1:], hook=hook, mapping=mapping))


def _reduce(mapping: str) -> str:
    return "sigmoid" if mapping == "sigmoid" else "mean"


class MaPOMasks(Provider):
    """The MaPO provider: ``masks`` = (chosen, rejected) [B, T] from the statistics of the hook types of `hook`,
    recorded during the step's reference forward (no second forward). See :func:`mapo_masks` for `hook`/`mapping`."""

    provides = ("masks",)

    def __init__(self, hook="all", mapping: str = "zn_rescale"):
        super().__init__()
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping={mapping!r}: choose from {MAPPINGS}")
        self.hook, self.mapping, self.types = hook, mapping, _parse_hook(hook)

    def needs(self) -> Needs:
        if self.types == ("uniform",):
            return Needs()
        return Needs(reference=True, reference_activations=self.types, activation_reduce=_reduce(self.mapping))

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        labels_mask = ctx.completion_mask
        if self.types == ("uniform",):
            return {"masks": split_pairs(labels_mask)}
        stats = {kind: ctx.reference_activations[kind] for kind in self.types}
        return {"masks": split_pairs(masks_from_statistics(stats, labels_mask, self.mapping)[0])}

    def settings(self) -> dict[str, Any]:
        return {"hook": self.hook if isinstance(self.hook, str) else list(self.hook), "mapping": self.mapping}
