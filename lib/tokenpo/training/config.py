"""`TrainConfig`, and what a run derives from it before training: the objective's hyper-parameters, its providers,
LoRA and dropout."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tokenpo.objectives import Objective
from tokenpo.providers import Provider, default_providers

from tokenpo.utils import is_peft, pad_token_id

from .optim import schedule_factor


@dataclass
class TrainConfig:
    """Everything a preference-training run depends on (saved as ``config.json`` in the run folder).

    > What to optimise
    method: objective name from :data:`tokenpo.objectives.OBJECTIVES` ("dpo", "sparsepo", "sepo", ...).
    hparams: overrides of the objective's registry defaults, e.g. ``{"beta": 0.8, "common": False}``.
    providers: the objects that make the objective's extra inputs (:mod:`tokenpo.providers`); None = the ones its
        registry entry names (e.g. SparsePO mask networks, MaPO masks, SePO selections from oracle-score columns).
        FPO has none by default: pass ``[FPOFeatures(sae, ...)]``.
    use_reference: run a reference model; None = when the objective or a provider needs one. True also for a
        reference-free method, to log its KL (with ``log_kl``).
    log_kl: compute and log ``kl/{chosen,rejected}`` whenever a reference runs, even if the loss does not use it
        (costs a full-vocabulary softmax of both models per token; no gradient). Off by default: DPO, IPO, SimPO and
        SePO do no full-vocabulary work beyond their own log-probs.

    > Optimiser and schedule (AdamW)
    learning_rate, weight_decay (matrices only; biases and norms get none), adam_betas, adam_eps.
    provider_learning_rate / provider_weight_decay: for the providers' trainable parameters (the SparsePO mask
        networks; official code: the policy's lr, weight decay 0.01). None = learning_rate.
    provider_freeze_steps / provider_warmup_steps: their learning rate is 0 for the first steps, then ramps up
        linearly (Adam's moments still see their gradients while frozen).
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

    > Model
    lora: ``peft.LoraConfig`` keyword arguments (or a LoraConfig) to train LoRA adapters; None = full fine-tuning.
        The providers' modules are trained either way; without a reference model the reference is the policy
        with its adapters disabled.
    disable_dropout: set every dropout probability of the policy to 0 (TRL's default; the mask networks keep
        theirs); gradient_checkpointing: trade compute for memory.

    > Run
    out_dir: the run folder; None = a new folder under ``<cache>/runs``.
    save_every / keep_last: checkpoint every N steps (and at the end), keep the newest K. eval_every: evaluate on
    ``eval_dataset`` every N steps (and before the first and after the last). seed: model init, LoRA, data order.
    deterministic: ask PyTorch for deterministic kernels (``tokenpo.utils.set_seed``).
    mixed_precision: "no" | "fp16" | "bf16" (🤗 Accelerate). cpu: force the CPU. progress: show a tqdm bar.
    save_final: write ``out_dir/final`` (policy ``save_pretrained``, tokenizer, providers with trainable state).
    """

    method: str = "dpo"
    hparams: dict[str, Any] = field(default_factory=dict)
    providers: list[Provider] | None = None
    use_reference: bool | None = None
    log_kl: bool = False
    # optimiser and schedule
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    provider_learning_rate: float | None = None
    provider_weight_decay: float = 0.01
    provider_freeze_steps: int = 0
    provider_warmup_steps: int = 0
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
    accepted = set(inspect.signature(objective.fn).parameters) - {"chosen", "rejected", *objective.input_names}
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


def apply_lora(policy: nn.Module, lora: Any) -> nn.Module:
    """``get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **lora))``, or ``policy`` when ``lora`` is None."""
    if lora is None:
        return policy
    from peft import LoraConfig, get_peft_model

    lora_config = lora if isinstance(lora, LoraConfig) else LoraConfig(**{"task_type": "CAUSAL_LM", **dict(lora)})
    if is_peft(policy):
        raise ValueError("TrainConfig.lora is set but the policy already is a PEFT model; pass one or the other")
    return get_peft_model(policy, lora_config)


def run_providers(objective: Objective, config: TrainConfig) -> list[Provider]:
    """The run's providers: ``config.providers``, or fresh instances of the objective's defaults."""
    return list(config.providers) if config.providers is not None else default_providers(objective)


def default_collator(tokenizer):
    """``PreferenceCollator`` padding with the tokenizer's pad token (its EOS when it has none)."""
    if tokenizer is None:
        raise ValueError("pass a collator, or a tokenizer (its pad token id is used by PreferenceCollator)")
    from tokenpo.data.collator import PreferenceCollator

    return PreferenceCollator(pad_token_id(tokenizer))
