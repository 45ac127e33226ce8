"""The computation of one preference-training micro-batch, shared by `train` and `evaluate_pairs`.

A batch of B pairs runs as one forward of 2B rows, [all chosen rows; all rejected rows] (as TRL does). Reference
outputs are computed first, without gradients; then the trainable module (policy + SparsePO mask networks) runs once,
so that DDP/FSDP see every trainable parameter through a single forward call. The method's extra inputs (token
masks, selections, weights, features) come from, in order: the built-in SparsePO/MaPO masks, batch columns named
``chosen_<name>``/``rejected_<name>``, and the user hook ``config.extra_inputs_fn`` (later sources win).
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .losses import LossOutput, Objective
from .tokens import TokenStats, chunked_token_stats, completion_labels, hidden_states, output_head, token_stats

PAIR_SIDES = ("chosen", "rejected")
BATCH_KEYS = tuple(f"{side}_{key}" for side in PAIR_SIDES for key in ("input_ids", "attention_mask", "completion_mask")
                   ) + ("row_index",)


def split_pairs(rows: Tensor) -> tuple[Tensor, Tensor]:
    """[2B, ...] rows in the trainer's order (chosen first) -> (chosen [B, ...], rejected [B, ...])."""
    half = rows.shape[0] // 2
    return rows[:half], rows[half:]


def _split_stats(stats: dict[str, Tensor | None]) -> tuple[TokenStats, TokenStats]:
    fields = ("logps", "mask", "ref_logps", "kl")
    halves = {name: (None, None) if stats.get(name) is None else split_pairs(stats[name]) for name in fields}
    return tuple(TokenStats(*(halves[name][side] for name in fields)) for side in (0, 1))  # type: ignore[return-value]


def model_outputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, chunk_size: int | None,
                  all_layers: bool) -> dict[str, Any]:
    """One causal-LM forward, aligned with labels (T = L-1): ``logits`` [N, T, V] on the plain path, or ``hidden``
    [N, T, H] plus the head's ``weight``/``bias`` on the chunked path; ``layers`` = per-layer outputs [N, T, H]
    (embedding output excluded) when ``all_layers``."""
    if chunk_size is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_layers,
                    use_cache=False, return_dict=True)
        result: dict[str, Any] = {"logits": out.logits[:, :-1]}
        layers = out.hidden_states[1:] if all_layers else None
    else:
        last, layers = hidden_states(model, input_ids, attention_mask, all_layers=all_layers)
        weight, bias = output_head(model)
        result = {"hidden": last[:, :-1], "weight": weight, "bias": bias}
    result["layers"] = None if layers is None else tuple(h[:, :-1] for h in layers)
    return result


class TrainablePolicy(nn.Module):
    """The trainable part of a run: the policy (plain or PEFT) and, for SparsePO, its mask networks.

    Keeping both in one module gives one optimizer, one checkpoint and one DDP/FSDP-wrapped forward. The mask module
    is stored as ``token_mask``: its parameter names contain "_mask", the rule the official SparsePO code uses to give
    mask parameters their own weight decay. With LoRA the mask module stays outside the PEFT model, so
    ``get_peft_model`` cannot freeze it (the official LoRA config left the masks untrained, papers.md §1.3).
    """

    def __init__(self, policy: nn.Module, token_mask: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.token_mask = token_mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                reference: dict[str, Any] | None = None, *, chunk_size: int | None = None, with_kl: bool = False,
                detach_kl: bool = False, policy_layers: bool = False, as_reference: bool = False,
                reference_layers: bool = False) -> dict[str, Any]:
        """Policy statistics [2B, T] (``logps``, ``mask``, ``ref_logps``, ``kl``), per-layer states (``layers``) and
        SparsePO masks for rows ``input_ids`` [2B, L], given the reference outputs; or, with ``as_reference``, the
        reference outputs themselves (PEFT policy, adapters disabled, no gradient)."""
        if as_reference:  # the PEFT policy with adapters disabled is the reference (no copy of the base model)
            with torch.no_grad(), self.policy.disable_adapter():
                return model_outputs(self.policy, input_ids, attention_mask, chunk_size, reference_layers)
        out = model_outputs(self.policy, input_ids, attention_mask, chunk_size, policy_layers)
        stats = _token_stats(out, labels, reference, chunk_size, with_kl)
        if detach_kl and stats.kl is not None:  # logged only: drop its graph now
            stats.kl = stats.kl.detach()
        result = {"logps": stats.logps, "mask": stats.mask, "ref_logps": stats.ref_logps, "kl": stats.kl,
                  "layers": out["layers"], "reward_masks": None, "kl_masks": None}
        if self.token_mask is not None:
            if reference is None or reference.get("layers") is None:
                raise ValueError("SparsePO masks need the reference model's per-layer hidden states")
            # SparsePOMasks: (reward, kl) masks [2B, T]. One network ("common"): kl_masks stays None, because output
            # casting (mixed precision) would turn the one tensor into two and the loss checks they are the same.
            reward, kl = self.token_mask(reference["layers"], stats.mask)
            result["reward_masks"], result["kl_masks"] = reward, None if kl is reward else kl
        return result


def _token_stats(out: dict[str, Any], labels: Tensor, reference: dict[str, Any] | None, chunk_size: int | None,
                 with_kl: bool) -> TokenStats:
    if chunk_size is None:
        ref_logits = None if reference is None else reference["logits"]
        return token_stats(out["logits"], labels, ref_logits=ref_logits, with_kl=with_kl and ref_logits is not None)
    ref = reference or {}
    return chunked_token_stats(out["hidden"], out["weight"], labels, ref.get("hidden"), ref.get("weight"),
                               bias=out["bias"], ref_bias=ref.get("bias"), chunk_size=chunk_size,
                               with_kl=with_kl and reference is not None)


@dataclass
class StepInputs:
    """What ``config.extra_inputs_fn(inputs) -> dict`` sees for one micro-batch of B pairs (rows: B chosen, then B
    rejected; T = L-1 label positions). Return objective keyword arguments, e.g. ``{"selections": (s_c, s_r)}``."""

    batch: dict[str, Tensor]                        # the collated batch, on the device
    labels: Tensor                                  # [2B, T] label ids, -100 off the completion
    chosen: TokenStats                              # [B, T] statistics of the chosen rows (with gradients)
    rejected: TokenStats
    policy_layers: tuple[Tensor, ...] | None        # per-layer policy states [2B, T, H], with gradients
    reference_layers: tuple[Tensor, ...] | None     # per-layer reference states [2B, T, H], no gradients
    policy: nn.Module                               # the (unwrapped) policy
    reference: Callable[..., Any] | None            # reference model (None, or a context-managed PEFT policy)
    step: int                                       # the optimizer step being computed (1-based)


@dataclass
class StepPlan:
    """What one run computes per batch, fixed at the start (from the objective and the config)."""

    objective: Objective
    hparams: dict[str, Any]
    use_reference: bool              # run a reference forward
    with_kl: bool                    # full-vocabulary KL computed (needed, or logged)
    detach_kl: bool                  # KL only logged, not in the loss
    reference_layers: bool           # reference per-layer states (SparsePO masks, hooks)
    policy_layers: bool              # policy per-layer states (hooks, e.g. FPO features)
    chunk_size: int | None
    mapo: dict[str, Any] | None      # keyword arguments of masks.mapo_masks, when the method is MaPO
    extra_inputs_fn: Callable[[StepInputs], dict] | None = None


def batch_columns(objective: Objective, hparams: dict[str, Any], batch: dict[str, Tensor]) -> dict[str, Any]:
    """Extra objective inputs found as batch columns ``chosen_<name>``/``rejected_<name>``.

    ``name`` is any keyword of the objective that is not a hyper-parameter (e.g. ``selections``, ``weights``,
    ``features``, ``ref_features``, ``ref_mean_logps``). A column with the shape of ``chosen_input_ids`` [B, L] holds
    one value per input token and is shifted to label positions ([:, 1:], [B, T]); other shapes pass unchanged."""
    names = [p for p in inspect.signature(objective.fn).parameters if p not in ("chosen", "rejected")]
    found = {}
    for name in names:
        if name in hparams or f"chosen_{name}" not in batch:
            continue
        if f"rejected_{name}" not in batch:
            raise ValueError(f"batch has column chosen_{name} but no rejected_{name}")
        pair = []
        for side in PAIR_SIDES:
            value = batch[f"{side}_{name}"]
            if value.shape == batch[f"{side}_input_ids"].shape:
                value = value[:, 1:]
            pair.append(value)
        found[name] = tuple(pair)
    return found


def reference_outputs(plan: StepPlan, module: nn.Module, reference: nn.Module | None, input_ids: Tensor,
                      attention_mask: Tensor, autocast: Callable[[], Any] = nullcontext) -> dict[str, Any] | None:
    """Reference forward without gradients: a separate model, or (``reference is None``) the prepared
    :class:`TrainablePolicy` called with ``as_reference=True`` (PEFT adapters disabled)."""
    if not plan.use_reference:
        return None
    with torch.no_grad(), autocast():
        if reference is not None:
            out = model_outputs(reference, input_ids, attention_mask, plan.chunk_size, plan.reference_layers)
        else:
            out = module(input_ids, attention_mask, chunk_size=plan.chunk_size, as_reference=True,
                         reference_layers=plan.reference_layers)
    if out.get("weight") is not None:
        out["weight"] = out["weight"].detach()
        out["bias"] = None if out["bias"] is None else out["bias"].detach()
    return out


def compute_batch(plan: StepPlan, module: nn.Module, reference: nn.Module | None, batch: dict[str, Tensor],
                  *, unwrapped: TrainablePolicy | None = None, step: int = 0,
                  autocast: Callable[[], Any] = nullcontext) -> LossOutput:
    """Per-pair losses [B] and metrics of one collated batch (see CONTEXT.md for its keys).

    ``module`` is the (possibly DDP-wrapped) :class:`TrainablePolicy`; ``unwrapped`` the bare one (defaults to
    ``module``); ``reference`` a frozen reference model, or None to use the PEFT policy with adapters disabled."""
    unwrapped = module if unwrapped is None else unwrapped
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}: use tokenpo.data.preference.PreferenceCollator (or a collator "
                         "giving the batch dict of CONTEXT.md, including the dataset row of each pair, row_index)")
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    completion = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    labels = completion_labels(input_ids, completion)
    ref_out = reference_outputs(plan, module, reference, input_ids, attention_mask, autocast)
    with autocast():
        out = module(input_ids, attention_mask, labels, ref_out, chunk_size=plan.chunk_size, with_kl=plan.with_kl,
                     detach_kl=plan.detach_kl, policy_layers=plan.policy_layers)
    chosen, rejected = _split_stats(out)

    extra: dict[str, Any] = {}
    name = plan.objective.name
    if out["reward_masks"] is not None:
        extra["reward_masks"] = split_pairs(out["reward_masks"])
        extra["kl_masks"] = extra["reward_masks"] if out["kl_masks"] is None else split_pairs(out["kl_masks"])
    if plan.mapo is not None:
        extra["masks"] = split_pairs(_mapo_masks(plan, unwrapped, reference, input_ids, attention_mask, out["mask"]))
    extra.update(batch_columns(plan.objective, plan.hparams, batch))
    if plan.extra_inputs_fn is not None:
        ref_model = reference if reference is not None else _DisabledAdapterReference(unwrapped.policy)
        hook_inputs = StepInputs(batch=batch, labels=labels, chosen=chosen, rejected=rejected,
                                 policy_layers=out["layers"],
                                 reference_layers=None if ref_out is None else ref_out.get("layers"),
                                 policy=unwrapped.policy, reference=ref_model if plan.use_reference else None,
                                 step=step)
        extra.update(plan.extra_inputs_fn(hook_inputs) or {})
    missing = [n for n in plan.objective.extra_inputs if n not in extra]
    if missing:
        raise ValueError(f"objective {name!r} needs extra inputs {missing}: add batch columns "
                         + ", ".join(f"chosen_{n}/rejected_{n}" for n in missing)
                         + " or return them from TrainConfig.extra_inputs_fn")
    result = plan.objective.fn(chosen, rejected, **plan.hparams, **extra)
    if chosen.kl is not None and "kl/chosen" not in result.metrics:
        result.metrics["kl/chosen"] = chosen.seq_kl.detach().mean()
        result.metrics["kl/rejected"] = rejected.seq_kl.detach().mean()
    return result


class _DisabledAdapterReference:
    """Calls the PEFT policy with its adapters disabled and without gradients: the reference, for hooks."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def _mapo_masks(plan: StepPlan, unwrapped: TrainablePolicy, reference: nn.Module | None, input_ids: Tensor,
                attention_mask: Tensor, labels_mask: Tensor) -> Tensor:
    from .masks import mapo_masks

    with torch.no_grad():
        if reference is not None:
            return mapo_masks(reference, input_ids, attention_mask, labels_mask, **plan.mapo)
        with unwrapped.policy.disable_adapter():
            return mapo_masks(unwrapped.policy, input_ids, attention_mask, labels_mask, **plan.mapo)
