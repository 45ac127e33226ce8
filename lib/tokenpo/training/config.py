"""`TrainConfig`, and what a run derives from it before training: the objective's hyper-parameters, its providers,
LoRA and dropout.

`TrainConfig` is a dataclass in the manner of TRL's ``DPOConfig``: every field typed and documented next to its value
(``field(metadata={"help": ...})``, grouped), and checked when the config is made — the objective's hyper-parameters
included, so that ``hparams={"beta": "0.1"}`` fails here and not inside the first step. A TRL argument name
(``beta``, ``loss_type``, ``per_device_train_batch_size``, …) is answered with the field that plays its part.
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from tokenpo.objectives import Objective, get_objective
from tokenpo.providers import Provider, default_providers
from tokenpo.tokens import TokenStats
from tokenpo.utils import is_peft, pad_token_id

from .optim import schedule_factor

# TRL (DPOConfig / transformers TrainingArguments) argument -> how to say it here ({value} is the value passed).
TRL_NAMES: dict[str, str] = {
    "beta": 'hparams={{"beta": {value}}} (the objective\'s hyper-parameters; see method=)',
    "loss_type": "method= (an objective of tokenpo.objectives.OBJECTIVES: loss_type='sigmoid' is method='dpo', "
                 "'ipo' is method='ipo', …)",
    "label_smoothing": "no equivalent (robust/cDPO losses are not objectives here)",
    "rpo_alpha": "no equivalent",
    "per_device_train_batch_size": "batch_size={value} (pairs per device per micro-batch)",
    "per_device_eval_batch_size": "batch_size={value} (evaluation uses the training batch size)",
    "gradient_accumulation_steps": "grad_accum={value}",
    "num_train_epochs": "epochs={value}",
    "lr_scheduler_type": "schedule={value!r}",
    "output_dir": "out_dir={value!r}",
    "logging_dir": "out_dir= (TensorBoard events go to <out_dir>/tensorboard)",
    "save_steps": "save_every={value}",
    "save_strategy": "save_every= (None = no checkpoints)",
    "save_total_limit": "keep_last={value}",
    "eval_steps": "eval_every={value}",
    "eval_strategy": "eval_every= and train(..., eval_dataset=...)",
    "logging_steps": "nothing: every optimizer step is logged",
    "adam_beta1": "adam_betas=(beta1, beta2)",
    "adam_beta2": "adam_betas=(beta1, beta2)",
    "adam_epsilon": "adam_eps={value}",
    "bf16": "mixed_precision='bf16'",
    "fp16": "mixed_precision='fp16'",
    "use_cpu": "cpu={value}",
    "no_cuda": "cpu={value}",
    "seed_data": "seed=",
    "data_seed": "seed=",
    "dataloader_drop_last": "drop_last={value}",
    "disable_tqdm": "progress= (progress=False hides the bar)",
    "peft_config": "lora= (peft.LoraConfig or its keyword arguments)",
    "max_length": "tokenize_pairs(..., max_length={value}) (the data side: tokenpo.data.preference)",
    "max_prompt_length": "tokenize_pairs(..., max_prompt_length={value})",
    "max_completion_length": "tokenize_pairs(..., max_length=...)",
    "padding_value": "PreferenceCollator(pad_token_id) (train(..., collator=...))",
    "truncation_mode": "tokenize_pairs(..., truncation=...)",
    "resume_from_checkpoint": "train(..., resume=True) or train(..., resume='<out_dir>/checkpoint-<step>')",
    "model_init_kwargs": "tokenpo.models.load_model(path, **kwargs)",
    "ref_model_init_kwargs": "the reference model you pass to train() (None = a frozen copy of the policy)",
    "precompute_ref_log_probs": "no equivalent (the reference runs with the policy; FPO has an offline cache)",
    "optim": "nothing: the optimizer is AdamW (adam_betas, adam_eps, weight_decay)",
    "run_name": "out_dir=",
    "push_to_hub": "no equivalent: push final/ with save_pretrained's folder yourself",
}


class HyperparameterTypeError(TypeError, ValueError):
    """A hyper-parameter of the wrong type (e.g. ``hparams={"beta": "0.1"}``); also a ValueError, which is what the
    objectives raise for bad values."""


def _help(text: str, group: str, **kwargs) -> Any:
    return field(metadata={"help": " ".join(text.split()), "group": group}, **kwargs)


GROUPS = ("objective", "optimizer", "statistics", "model", "run", "logging", "hardware")


@dataclass
class TrainConfig:
    """Everything a preference-training run depends on (saved as ``config.json`` in the run folder).

    Every field is typed and has its help next to its value (``field(metadata={"help": ..., "group": ...})``, as
    TRL's configs); ``help(TrainConfig)`` lists them by group (``TrainConfig.describe()``). TRL's argument names are
    answered with ours (``TRL_NAMES``): ``beta`` -> ``hparams={"beta": ...}``, ``loss_type`` -> ``method``,
    ``per_device_train_batch_size`` -> ``batch_size``, ``num_train_epochs`` -> ``epochs``, ``output_dir`` ->
    ``out_dir``, …
    """

    # ---------------------------------------------------------------------------------------- what to optimise
    method: str = "dpo"  # help attached below the class (_METHOD_HELP)
    hparams: dict[str, Any] = _help("""Overrides of the objective's registry defaults, e.g. {"beta": 0.8,
        "common": False}; checked against the objective when the config is made.""", "objective",
        default_factory=dict)
    providers: list[Provider] | None = _help("""The objects that make the objective's extra inputs
        (tokenpo.providers); None = the ones its registry entry names (SparsePO mask networks, MaPO masks, SePO
        selections from oracle-score columns). FPO has none by default: pass [FPOFeatures(sae, ...)].""",
        "objective", default=None)
    use_reference: bool | None = _help("""Run a reference model; None = when the objective or a provider needs one.
        True also for a reference-free method, to log its KL (with log_kl).""", "objective", default=None)
    log_kl: bool = _help("""Compute and log kl/{chosen,rejected} whenever a reference runs, even if the loss does not
        use it (a full-vocabulary softmax of both models per token, no gradient). Off: DPO, IPO, SimPO and SePO do
        no full-vocabulary work beyond their own log-probs.""", "objective", default=False)

    # ---------------------------------------------------------------------------------- optimizer and schedule
    learning_rate: float = _help("AdamW learning rate of the policy.", "optimizer", default=1e-6)
    weight_decay: float = _help("AdamW weight decay of the policy's matrices (biases and norms get none).",
                                "optimizer", default=0.0)
    adam_betas: tuple[float, float] = _help("AdamW (beta1, beta2); TRL's adam_beta1/adam_beta2.", "optimizer",
                                            default=(0.9, 0.999))
    adam_eps: float = _help("AdamW epsilon; TRL's adam_epsilon.", "optimizer", default=1e-8)
    provider_learning_rate: float | None = _help("""Learning rate of the providers' trainable parameters (the SparsePO
        mask networks; official code: the policy's); None = learning_rate.""", "optimizer", default=None)
    provider_weight_decay: float = _help("""Weight decay of the providers' trainable parameters (SparsePO official
        code: 0.01).""", "optimizer", default=0.01)
    provider_freeze_steps: int = _help("""Providers' learning rate is 0 for this many first steps (Adam's moments still
        see their gradients).""", "optimizer", default=0)
    provider_warmup_steps: int = _help("""Then it ramps up linearly over this many steps, on top of the schedule.""",
                                       "optimizer", default=0)
    schedule: str = _help("""Learning-rate schedule after warmup_steps of linear warm-up, from transformers'
        get_scheduler: "cosine" | "linear" | "constant" (transformers' constant_with_warmup) | "polynomial" |
        "cosine_with_restarts" | "inverse_sqrt" | "constant_with_warmup"; TRL's lr_scheduler_type.""", "optimizer",
        default="cosine")
    warmup_steps: int = _help("Steps of linear warm-up from 0 (0 = use warmup_ratio).", "optimizer", default=0)
    warmup_ratio: float = _help("Warm-up as a share of all steps, in [0, 1), when warmup_steps is 0.", "optimizer",
                                default=0.0)
    max_steps: int | None = _help("Optimizer steps; None = epochs full passes over the data.", "optimizer",
                                  default=None)
    epochs: int = _help("Passes over the data when max_steps is None; TRL's num_train_epochs.", "optimizer",
                        default=1)
    batch_size: int = _help("""Pairs per device per micro-batch (TRL's per_device_train_batch_size); the global batch
        is batch_size x processes x grad_accum.""", "optimizer", default=8)
    grad_accum: int = _help("Micro-batches per optimizer step; TRL's gradient_accumulation_steps.", "optimizer",
                            default=1)
    max_grad_norm: float | None = _help("Gradient clipping norm (None = none; the norm is logged either way).",
                                        "optimizer", default=1.0)
    shuffle: bool = _help("""Row order per epoch is a permutation drawn from (seed, epoch); False = dataset order.""",
                          "optimizer", default=True)
    drop_last: bool = _help("""Drop a last partial batch (otherwise 🤗 Accelerate pads the last global batch with rows
        from the start when processes > 1).""", "optimizer", default=False)

    # ------------------------------------------------------------------------------------- per-token statistics
    chunk_size: int | None = _help("""None = per-token statistics from full logits; an int = from hidden states,
        never more than chunk_size x vocabulary logits at once (tokenpo.tokens.chunked_token_stats).""",
        "statistics", default=None)

    # -------------------------------------------------------------------------------------------------- model
    lora: Any = _help("""peft.LoraConfig, or its keyword arguments, to train LoRA adapters (TRL's peft_config); None =
        full fine-tuning. The providers' modules are trained either way; without a reference model the reference is
        the policy with its adapters disabled.""", "model", default=None)
    disable_dropout: bool = _help("""Dropout probability 0 in the policy and the reference, as TRL's
        disable_dropout_in_model (the providers' mask networks keep theirs).""", "model", default=True)
    gradient_checkpointing: bool = _help("Trade compute for memory (the policy's gradient_checkpointing_enable).",
                                         "model", default=False)

    # --------------------------------------------------------------------------------- run folder, checkpoints
    out_dir: str | Path | None = _help("""The run folder (TRL's output_dir); None = a new folder under
        <cache>/runs.""", "run", default=None)
    save_every: int | None = _help("""Checkpoint every N optimizer steps and at the end (TRL's save_steps); None = no
        checkpoints. Each checkpoint-<step>/ is a from_pretrained folder plus the optimizer, scheduler and random
        states for resume=True, with SHA-256 checksums.""", "run", default=500)
    keep_last: int | None = _help("Keep the newest K checkpoints (TRL's save_total_limit); None = all.", "run",
                                  default=2)
    save_final: bool = _help("""Write <out_dir>/final: the policy's save_pretrained (adapters only with LoRA), the
        tokenizer, and the providers with trainable state.""", "run", default=True)
    eval_every: int | None = _help("""Evaluate on train(..., eval_dataset=...) every N steps (and before the first and
        after the last), into eval_metrics.jsonl.""", "run", default=None)

    # ---------------------------------------------------------------------------------------------- logging
    report_to: str | list[str] | None = _help("""Trackers of 🤗 Accelerate that receive every metrics row:
        "tensorboard" (events in <out_dir>/tensorboard), "wandb", "mlflow", …, a list of them, "all" or
        "none".""", "logging", default="none")
    log_logit_metrics: bool = _help("""Also log TRL's entropy (mean over completion tokens), mean_token_accuracy
        (chosen completion tokens whose label is the arg-max) and logits/chosen, logits/rejected (mean logit over
        completion tokens): one more pass over the policy's full-vocabulary logits per step, without gradient (on
        the chunked path the logits are recomputed chunk by chunk from the final hidden states).""", "logging",
        default=False)
    progress: bool = _help("Show a tqdm progress bar (TRL's disable_tqdm=False).", "logging", default=True)

    # -------------------------------------------------------------------------------- reproducibility, hardware
    seed: int = _help("Seed of model init, LoRA, data order and dropout.", "hardware", default=42)
    deterministic: bool = _help("Ask PyTorch for deterministic kernels (tokenpo.utils.set_seed).", "hardware",
                                default=True)
    mixed_precision: str = _help('"no" | "fp16" | "bf16" (🤗 Accelerate).', "hardware", default="no")
    cpu: bool = _help("""Force the CPU. Under a distributed launch on a machine without GPUs the CPU (gloo backend) is
        chosen anyway.""", "hardware", default=False)

    def __new__(cls, *args, **kwargs):
        unknown = [name for name in kwargs if name not in cls.__dataclass_fields__]
        if unknown:
            raise TypeError(_unknown_field_message(unknown[0], kwargs[unknown[0]]))
        return super().__new__(cls)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "save_every", "eval_every", "chunk_size", "keep_last"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be None or a positive integer, got {value!r}")
        for name in ("provider_freeze_steps", "provider_warmup_steps", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("learning_rate", "weight_decay", "adam_eps", "provider_weight_decay"):
            _check_number(name, getattr(self, name))
        if self.provider_learning_rate is not None:
            _check_number("provider_learning_rate", self.provider_learning_rate)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError("TrainConfig.mixed_precision must be 'no', 'fp16' or 'bf16', "
                             f"got {self.mixed_precision!r}")
        if not isinstance(self.warmup_ratio, numbers.Real) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not isinstance(self.hparams, dict):
            raise HyperparameterTypeError(f"TrainConfig.hparams must be a dict, got {self.hparams!r}")
        report_trackers(self.report_to)
        schedule_factor(self.schedule, 1, 0)  # validates the name
        objective = get_objective(self.method)
        check_hparams(objective, objective_hparams(objective, self.hparams))

    @classmethod
    def describe(cls) -> str:
        """Every field with its type, default and help, by group."""
        lines = []
        for group in GROUPS:
            lines.append(f"[{group}]")
            for f in fields(cls):
                if f.metadata.get("group") == group:
                    default = f.default if f.default_factory is MISSING else f.default_factory()
                    lines.append(f"  {f.name}: {f.type} = {default!r}\n      {f.metadata['help']}")
        return "\n".join(lines)


# `method` keeps a bare default value: tests/test_architecture.py tells the default method from a branch on a method
# name by that form. Its help is attached here, like the other fields' (dataclasses.Field.metadata).
_METHOD_HELP = ("Objective name from tokenpo.objectives.OBJECTIVES (\"dpo\", \"sparsepo\", \"sepo\", ...); TRL's "
                "loss_type.")
TrainConfig.__dataclass_fields__["method"].metadata = MappingProxyType({"help": _METHOD_HELP, "group": "objective"})
TrainConfig.__doc__ = f"{TrainConfig.__doc__}\n    Fields:\n\n" + "\n".join(
    "    " + line for line in TrainConfig.describe().splitlines())


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")


def _unknown_field_message(name: str, value: Any) -> str:
    head = f"TrainConfig has no field {name!r}"
    if name in TRL_NAMES:
        return f"{head}: TRL's {name}={value!r} is {TRL_NAMES[name].format(value=value)} here"
    close = difflib.get_close_matches(name, list(TrainConfig.__dataclass_fields__), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{head}{hint} (its fields: TrainConfig.describe())"


def report_trackers(report_to: Any) -> list[str]:
    """``report_to`` as 🤗 Accelerate's ``log_with`` list (empty for None / "none")."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if any(not isinstance(n, str) for n in names):
        raise ValueError(f"TrainConfig.report_to must be a tracker name or a list of them, got {report_to!r}")
    names = [n for n in names if n != "none"]
    from accelerate.utils import LoggerType

    known = set(LoggerType.list())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"TrainConfig.report_to has {unknown}: 🤗 Accelerate knows {sorted(known)} (and 'none')")
    return names


def objective_hparams(objective: Objective, overrides: dict[str, Any]) -> dict[str, Any]:
    """The registry defaults of ``objective`` overridden by ``overrides``; ValueError for a name it does not take."""
    accepted = set(inspect.signature(objective.fn).parameters) - {"chosen", "rejected", *objective.input_names}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"TrainConfig.hparams has {unknown}, which objective {objective.name!r} does not take; "
                         f"its hyper-parameters: {sorted(accepted)}")
    return {**objective.defaults, **overrides}


def check_hparams(objective: Objective, hparams: dict[str, Any]) -> None:
    """Surface the objective's own checks of its hyper-parameters now, not in the first step: the objective is called
    once on a dummy pair of one token (no model, no provider inputs); an error it raises about a hyper-parameter
    (its messages start with the name, e.g. "beta must be a finite number > 0, got '0.1'") is raised here, naming
    ``TrainConfig.hparams[name]``. Then a value whose type differs from its default's (a bool, a number, a string)
    is refused."""
    stats = TokenStats(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))
    try:
        objective.fn(stats, stats, **hparams)
    except (ValueError, TypeError) as error:
        message = str(error)
        for name, value in hparams.items():
            if message.startswith((f"{name} ", f"{name}[", f"{name}=")):
                wrong_type = _kind(value) != _kind(objective.defaults.get(name, value)) or isinstance(value, str)
                cls = HyperparameterTypeError if wrong_type else ValueError
                raise cls(f"TrainConfig.hparams[{name!r}] of {objective.name!r}: {message}") from None
    except Exception:  # anything else depends on inputs the dummy pair does not have
        pass
    for name, value in hparams.items():
        default = objective.defaults.get(name)
        if isinstance(default, bool):
            expected, ok = "a bool", isinstance(value, bool)
        elif isinstance(default, numbers.Real):
            expected, ok = "a number", isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif isinstance(default, str):
            expected, ok = "a string", isinstance(value, str)
        else:
            continue
        if not ok:
            raise HyperparameterTypeError(f"TrainConfig.hparams[{name!r}] must be {expected} like its default "
                                          f"{default!r} (objective {objective.name!r}), got {value!r} "
                                          f"({type(value).__name__})")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, numbers.Real) else type(value).__name__


def disable_dropout(model: nn.Module) -> None:
    """Dropout probability 0 everywhere in ``model``, as TRL's ``disable_dropout_in_model`` (every ``nn.Dropout``; the
    trainer applies it to the policy — LoRA dropout included — and to the reference): the policy's log-probs must not
    be noisy relative to the reference's. Written here, not imported, because TRL is not a dependency (only the
    optional `bench` extra); the rule is the same."""
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
