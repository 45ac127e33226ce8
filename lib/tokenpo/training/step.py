"""One preference micro-batch, shared by training and evaluation: forwards, per-token statistics, providers, loss.

A batch of B pairs runs as forwards of 2B rows, [all chosen rows; all rejected rows] (as TRL does):

1. **one reference forward**, without gradients, when the objective or a provider needs it: the reference's aligned
   logits (plain path) or final hidden states and head (chunked path), plus exactly what the providers declared in
   their :class:`~tokenpo.providers.base.Needs` — per-layer states, residual sites, MaPO activation statistics
   (recorded by hooks during this same forward);
2. **one forward of the trainable module** (:class:`TrainablePolicy`: the policy and the providers' modules, so
   that DDP/FSDP see every trainable parameter through a single call): the policy forward, the per-token statistics
   (:mod:`tokenpo.tokens`; the full-vocabulary KL only when the objective uses it or ``log_kl`` asks), then every
   provider on a :class:`~tokenpo.providers.base.StepContext`;
3. the objective, a pure function of the statistics and the providers' outputs.

Nothing here knows a method by name: the plan is derived from the objective's registry entry and the providers.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from tokenpo.objectives import LossOutput, Objective
from tokenpo.providers import Provider, StepContext, check_providers, split_pairs
from tokenpo.providers.activations import capture_sites, head_statistic, record_statistics
from tokenpo.providers.base import Needs
from tokenpo.tokens import (TokenStats, align_to_labels, chunked_token_stats, completion_labels, hidden_states,
                            output_head, token_stats)

PAIR_SIDES = ("chosen", "rejected")
BATCH_KEYS = tuple(f"{side}_{key}" for side in PAIR_SIDES for key in ("input_ids", "attention_mask", "completion_mask")
                   ) + ("row_index",)


@dataclass
class StepPlan:
    """What every batch of a run computes, fixed at the start from the objective, its providers and the config."""

    objective: Objective
    hparams: dict[str, Any]
    needs: Needs                     # the union of the providers' needs
    use_reference: bool              # run the reference forward
    with_kl: bool                    # compute the full-vocabulary KL (the loss uses it, or it is logged)
    detach_kl: bool                  # KL only logged, not in the loss
    chunk_size: int | None           # None = plain statistics from full logits; else the chunked path


def make_plan(objective: Objective, hparams: dict[str, Any], providers: Sequence[Provider], *,
              use_reference: bool | None = None, log_kl: bool = False, chunk_size: int | None = None) -> StepPlan:
    """The plan of a run. The reference runs when the objective reads reference statistics (unless a provider
    supplies their offline replacement, ``Objective.reference_free_with``) or a provider needs it; ``use_reference``
    forces it on (e.g. to log the KL of a reference-free method) or off (then nothing may need it)."""
    check_providers(objective, list(providers))
    needs = Needs()
    for provider in providers:
        needs = needs | provider.needs()
    made = {name for p in providers for name in p.provides}
    reads_reference = objective.needs_reference and not (
        objective.reference_free_with and set(objective.reference_free_with) <= made)
    required = reads_reference or objective.needs_kl or needs.uses_reference
    if use_reference is None:
        use_reference = required
    elif required and not use_reference:
        raise ValueError(f"objective {objective.name!r} (or one of its providers: "
                         f"{[type(p).__name__ for p in providers]}) needs the reference model, but "
                         "TrainConfig.use_reference is False")
    with_kl = use_reference and (objective.needs_kl or log_kl)
    return StepPlan(objective, dict(hparams), needs, use_reference, with_kl, with_kl and not objective.needs_kl,
                    chunk_size)


def model_outputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, chunk_size: int | None,
                  all_layers: bool) -> dict[str, Any]:
    """One causal-LM forward, aligned with the labels (T = L-1): ``logits`` [N, T, V] on the plain path, or ``hidden``
    [N, T, H] plus the head's ``weight``/``bias`` on the chunked path; ``layers`` = per-layer outputs [N, T, H]
    (embedding output excluded) when ``all_layers``."""
    if chunk_size is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_layers,
                    use_cache=False, return_dict=True)
        result: dict[str, Any] = {"logits": align_to_labels(out.logits)}
        layers = out.hidden_states[1:] if all_layers else None
    else:
        last, layers = hidden_states(model, input_ids, attention_mask, all_layers=all_layers)
        weight, bias = output_head(model)
        result = {"hidden": align_to_labels(last), "weight": weight, "bias": bias}
    result["layers"] = None if layers is None else tuple(align_to_labels(h) for h in layers)
    return result


def _reference_pass(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, plan: StepPlan) -> dict[str, Any]:
    """The reference forward (the caller disables gradients): outputs of :func:`model_outputs`, plus the providers'
    ``sites`` {(layer, site): [N, T, d]} and ``activations`` {type: [[N, T], ...]} recorded by hooks during it."""
    needs = plan.needs
    hooked = tuple(t for t in needs.reference_activations if t != "logits")
    with ExitStack() as stack:
        stats = stack.enter_context(record_statistics(model, hooked, needs.activation_reduce)) if hooked else {}
        sites = stack.enter_context(capture_sites(model, needs.reference_sites)) if needs.reference_sites else {}
        out = model_outputs(model, input_ids, attention_mask, plan.chunk_size, needs.reference_layers)
    if "logits" in needs.reference_activations:
        stats["logits"] = [head_statistic(model, hidden=out.get("hidden"), logits=out.get("logits"),
                                          reduce=needs.activation_reduce)]
    if out.get("weight") is not None:
        out["weight"] = out["weight"].detach()
        out["bias"] = None if out["bias"] is None else out["bias"].detach()
    out["activations"] = stats
    out["sites"] = {key: align_to_labels(value) for key, value in sites.items()}
    return out


def _token_stats(out: dict[str, Any], labels: Tensor, reference: dict[str, Any] | None, chunk_size: int | None,
                 with_kl: bool) -> TokenStats:
    if chunk_size is None:
        ref_logits = None if reference is None else reference["logits"]
        return token_stats(out["logits"], labels, ref_logits=ref_logits, with_kl=with_kl and ref_logits is not None)
    ref = reference or {}
    return chunked_token_stats(out["hidden"], out["weight"], labels, ref.get("hidden"), ref.get("weight"),
                               bias=out["bias"], ref_bias=ref.get("bias"), chunk_size=chunk_size,
                               with_kl=with_kl and reference is not None)


def _split_stats(stats: TokenStats) -> tuple[TokenStats, TokenStats]:
    halves = {name: (None, None) if getattr(stats, name) is None else split_pairs(getattr(stats, name))
              for name in ("logps", "mask", "ref_logps", "kl")}
    return tuple(TokenStats(*(halves[name][side] for name in ("logps", "mask", "ref_logps", "kl")))
                 for side in (0, 1))  # type: ignore[return-value]


class TrainablePolicy(nn.Module):
    """The trainable part of a run: the policy (plain or PEFT) and the providers (which may own trainable modules,
    e.g. SparsePO's mask networks).

    One module gives one optimizer, one checkpoint and one DDP/FSDP-wrapped forward. With LoRA the providers stay
    outside the PEFT model, so ``get_peft_model`` cannot freeze them (the official SparsePO LoRA configuration left
    its masks untrained).
    """

    def __init__(self, policy: nn.Module, providers: Sequence[Provider] = ()):
        super().__init__()
        self.policy = policy
        self.providers = nn.ModuleList(providers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                reference: dict[str, Any] | None = None, *, plan: StepPlan, batch: dict[str, Any] | None = None,
                step: int = 0, as_reference: bool = False):
        """(chosen, rejected, extra inputs) for rows ``input_ids`` [2B, L], given the reference outputs; or, with
        ``as_reference``, the reference outputs themselves (the PEFT policy with adapters disabled, no gradient)."""
        if as_reference:
            with torch.no_grad(), self.policy.disable_adapter():
                return _reference_pass(self.policy, input_ids, attention_mask, plan)
        needs = plan.needs
        with capture_sites(self.policy, needs.policy_sites) if needs.policy_sites else nullcontext({}) as sites:
            out = model_outputs(self.policy, input_ids, attention_mask, plan.chunk_size, needs.policy_layers)
        stats = _token_stats(out, labels, reference, plan.chunk_size, plan.with_kl)
        if plan.detach_kl and stats.kl is not None:  # logged only: drop its graph now
            stats.kl = stats.kl.detach()
        chosen, rejected = _split_stats(stats)
        extra: dict[str, Any] = {}
        if len(self.providers):
            ref = reference or {}
            ctx = StepContext(batch=batch or {}, labels=labels, chosen=chosen, rejected=rejected,
                              hparams=plan.hparams, step=step, policy_layers=out["layers"],
                              reference_layers=ref.get("layers"),
                              policy_sites={k: align_to_labels(v) for k, v in sites.items()},
                              reference_sites=ref.get("sites"), reference_activations=ref.get("activations"))
            for provider in self.providers:
                extra.update(provider(ctx))
        return chosen, rejected, extra


def reference_outputs(plan: StepPlan, module: nn.Module, reference: nn.Module | None, input_ids: Tensor,
                      attention_mask: Tensor, autocast: Callable[[], Any] = nullcontext) -> dict[str, Any] | None:
    """The reference forward without gradients: a separate model, or (``reference is None``) the prepared
    :class:`TrainablePolicy` called with ``as_reference=True`` (PEFT adapters disabled)."""
    if not plan.use_reference:
        return None
    with torch.no_grad(), autocast():
        if reference is not None:
            return _reference_pass(reference, input_ids, attention_mask, plan)
        return module(input_ids, attention_mask, plan=plan, as_reference=True)


def compute_batch(plan: StepPlan, module: nn.Module, reference: nn.Module | None, batch: dict[str, Tensor],
                  *, step: int = 0, autocast: Callable[[], Any] = nullcontext) -> LossOutput:
    """Per-pair losses [B] and metrics of one collated batch (:class:`tokenpo.data.collator.PreferenceCollator`).

    ``module`` is the (possibly DDP-wrapped) :class:`TrainablePolicy`; ``reference`` a frozen reference model, or None
    to use the PEFT policy with adapters disabled."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}: tokenise the pairs with tokenpo.data.preference.tokenize_pairs and "
                         "batch them with its PreferenceCollator (which adds the dataset row of each pair, row_index)")
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    completion = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    labels = completion_labels(input_ids, completion)
    ref_out = reference_outputs(plan, module, reference, input_ids, attention_mask, autocast)
    with autocast():
        chosen, rejected, extra = module(input_ids, attention_mask, labels, ref_out, plan=plan, batch=batch,
                                         step=step)
    result = plan.objective.fn(chosen, rejected, **plan.hparams, **extra)
    if chosen.kl is not None and "kl/chosen" not in result.metrics:
        result.metrics["kl/chosen"] = chosen.seq_kl.detach().mean()
        result.metrics["kl/rejected"] = rejected.seq_kl.detach().mean()
    return result
