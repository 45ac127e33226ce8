"""`TrainConfig`, and what a run derives from it before training: the objective's hyper-parameters, the per-batch
`StepPlan`, LoRA, the reference, and the SparsePO mask networks."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .losses import Objective
from .optim import schedule_factor
from .train_step import StepInputs, StepPlan


@dataclass
class TrainConfig:
    """Everything a preference-training run depends on (saved as ``config.json`` in the run folder).

    > What to optimise
    method: objective name from :data:`tokenpo.losses.OBJECTIVES` ("dpo", "sparsepo", "sepo", ...).
    hparams: overrides of the objective's registry defaults, e.g. ``{"beta": 0.8, "common": False}``.
    use_reference: run a reference model; None = when the method needs one (reference log-probs, KL, SparsePO/MaPO
        masks, ``hook_reference_layers``). False e.g. for FPO with offline reference columns.
    log_kl: compute and log ``kl/{chosen,rejected}`` whenever a reference runs, even if the loss does not use it
        (costs a full-vocabulary softmax of the reference per token; no gradient).

    > Optimiser and schedule (AdamW)
    learning_rate, weight_decay (matrices only; biases and norms get none), adam_betas, adam_eps.
    mask_learning_rate / mask_weight_decay: for parameters whose name contains "_mask" (the SparsePO mask networks;
        official code: same lr, weight decay 0.01). None = learning_rate.
    mask_freeze_steps / mask_warmup_steps: mask learning rate 0 for the first steps, then a linear ramp (Adam's
        moments still see the masks' gradients while frozen).
    schedule: "cosine" | "linear" | "constant", after ``warmup_steps`` (or ``warmup_ratio`` of all steps) of linear
        warm-up, as in 🤗 transformers.
    max_steps: optimizer steps; None = ``epochs`` full passes over the data.
    batch_size: pairs per device per micro-batch; the global batch is batch_size × processes × grad_accum.
    grad_accum, max_grad_norm (None = no clipping; the norm is logged either way).
    shuffle: row order per epoch is a permutation drawn from (seed, epoch); drop_last: drop a last partial batch
        (otherwise 🤗 Accelerate pads the last global batch with rows from the start when processes > 1).

    > Per-token statistics
    chunk_size: None = plain path from full logits; an int = chunked path from hidden states, never more than
        chunk_size × V logits at once (:func:`tokenpo.tokens.chunked_token_stats`).

    > Method inputs
    mask_kwargs: keyword arguments of :class:`tokenpo.masks.SparsePOMasks` beyond the model sizes (e.g. dropout,
        mixer init); common/independent follows ``hparams["common"]``.
    mapo_kwargs: keyword arguments of :func:`tokenpo.masks.mapo_masks` (hook, mapping).
    extra_inputs_fn: ``fn(StepInputs) -> dict`` of extra objective keyword arguments, e.g. SePO selections from
        token scores, FPO pooled SAE features of the policy; hook_policy_layers / hook_reference_layers make the
        per-layer hidden states available to it.

    > Model
    lora: ``peft.LoraConfig`` keyword arguments (or a LoraConfig) to train LoRA adapters; None = full fine-tuning.
        The SparsePO mask networks are trained either way; without a reference model the reference is the policy
        with its adapters disabled.
    disable_dropout: set every dropout probability of the policy to 0 (TRL's default; the mask networks keep
        theirs); gradient_checkpointing: trade compute for memory.

    > Run
    out_dir: the run folder; None = a new folder under ``<cache>/runs``.
    save_every / keep_last: checkpoint every N steps (and at the end), keep the newest K. eval_every: evaluate on
    ``eval_dataset`` every N steps (and before the first and after the last). seed: model init, LoRA, data order.
    deterministic: ask PyTorch for deterministic kernels (``tokenpo.utils.set_seed``).
    mixed_precision: "no" | "fp16" | "bf16" (🤗 Accelerate). cpu: force the CPU. progress: show a tqdm bar.
    save_final: write ``out_dir/final`` (policy ``save_pretrained``, ``token_mask.safetensors``, tokenizer).
    """

    method: str = "dpo"
    hparams: dict[str, Any] = field(default_factory=dict)
    use_reference: bool | None = None
    log_kl: bool = True
    # optimiser and schedule
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    mask_learning_rate: float | None = None
    mask_weight_decay: float = 0.01
    mask_freeze_steps: int = 0
    mask_warmup_steps: int = 0
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    shuffle: bool = True
    drop_last: bool = False
    # per-token statistics
    chunk_size: int | None = None
    # method inputs
    mask_kwargs: dict[str, Any] = field(default_factory=dict)
    mapo_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_inputs_fn: Callable[[StepInputs], dict] | None = None
    hook_policy_layers: bool = False
    hook_reference_layers: bool = False
    # model
    lora: Any = None
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    # run
    out_dir: str | Path | None = None
    save_every: int | None = None
    keep_last: int | None = 2
    eval_every: int | None = None
    seed: int = 42
    deterministic: bool = True
    mixed_precision: str = "no"
    cpu: bool = False
    progress: bool = True
    save_final: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_steps", "save_every", "eval_every", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be None or a positive integer, got {value!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError("TrainConfig.mixed_precision must be 'no', 'fp16' or 'bf16', "
                             f"got {self.mixed_precision!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        schedule_factor(self.schedule, 1, 0)  # validates the name


def objective_hparams(objective: Objective, overrides: dict[str, Any]) -> dict[str, Any]:
    """The registry defaults of ``objective`` overridden by ``overrides``; ValueError for a name it does not take."""
    accepted = set(inspect.signature(objective.fn).parameters) - {"chosen", "rejected", *objective.extra_inputs}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"TrainConfig.hparams has {unknown}, which objective {objective.name!r} does not take; "
                         f"its hyper-parameters: {sorted(accepted)}")
    return {**objective.defaults, **overrides}


def disable_dropout(model: nn.Module) -> None:
    """Dropout probability 0 everywhere in ``model`` (TRL's ``disable_dropout``): the policy's log-probs must not be
    noisy relative to the reference's."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(policy: nn.Module, lora: Any) -> nn.Module:
    """``get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **lora))``, or ``policy`` when ``lora`` is None."""
    if lora is None:
        return policy
    from peft import LoraConfig, get_peft_model

    lora_config = lora if isinstance(lora, LoraConfig) else LoraConfig(**{"task_type": "CAUSAL_LM", **dict(lora)})
    if is_peft(policy):
        raise ValueError("TrainConfig.lora is set but the policy already is a PEFT model; pass one or the other")
    return get_peft_model(policy, lora_config)


def build_masks(policy: nn.Module, config: TrainConfig, hparams: dict[str, Any]) -> nn.Module:
    """SparsePO mask networks sized from the policy's config. With only one term masked (mask_on_reward or
    mask_on_kl False) a single network is built even in independent mode: a second one would get no gradient."""
    from .masks import SparsePOMasks

    both_masked = hparams.get("mask_on_reward", True) and hparams.get("mask_on_kl", True)
    one_net = hparams.get("common", True) or not both_masked
    return SparsePOMasks.from_model_config(policy.config, mode="common" if one_net else "independent",
                                           **config.mask_kwargs)


def default_collator(tokenizer):
    """``PreferenceCollator`` padding with the tokenizer's pad token (its EOS when it has none)."""
    if tokenizer is None:
        raise ValueError("pass a collator, or a tokenizer (its pad token id is used by PreferenceCollator)")
    from .data.preference import PreferenceCollator

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreferenceCollator(pad)


def make_plan(objective: Objective, hparams: dict[str, Any], config: TrainConfig) -> StepPlan:
    """What each batch computes. A hook may declare what it needs through attributes (as the factories of
    :mod:`tokenpo.train_hooks` do): ``needs_policy_layers`` / ``needs_reference_layers`` (OR-ed with the config
    flags) and ``uses_reference`` (True/False; decides when ``config.use_reference`` is None)."""
    hook = config.extra_inputs_fn
    is_mapo, is_sparse = objective.name == "mapo", objective.name == "sparsepo"
    hook_reference_layers = config.hook_reference_layers or bool(getattr(hook, "needs_reference_layers", False))
    use_reference = config.use_reference
    if use_reference is None:
        use_reference = getattr(hook, "uses_reference", None)
    if use_reference is None:
        use_reference = objective.needs_reference or is_mapo or is_sparse or hook_reference_layers
    if (is_sparse or is_mapo or objective.needs_kl or hook_reference_layers) and not use_reference:
        raise ValueError(f"method {objective.name!r} (or its extra_inputs_fn) needs a reference model, but "
                         "TrainConfig.use_reference is False")
    with_kl = use_reference and (objective.needs_kl or config.log_kl)
    return StepPlan(objective=objective, hparams=hparams, use_reference=use_reference, with_kl=with_kl,
                    detach_kl=with_kl and not objective.needs_kl,
                    reference_layers=use_reference and (is_sparse or hook_reference_layers),
                    policy_layers=config.hook_policy_layers or bool(getattr(hook, "needs_policy_layers", False)),
                    chunk_size=config.chunk_size, mapo=dict(config.mapo_kwargs) if is_mapo else None,
                    extra_inputs_fn=hook)
