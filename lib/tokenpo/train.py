"""One preference trainer for every objective in :mod:`tokenpo.losses`, on 🤗 Accelerate.

The same call runs in a notebook (one process) and unchanged under ``accelerate launch`` / ``torchrun`` (DDP; FSDP
and DeepSpeed configurations are the user's). Per optimizer step it writes one row of metrics (TRL names, see
DESIGN.md, plus ``step``, ``epoch``, ``lr``, ``grad_norm``) to ``<out_dir>/metrics.jsonl``, and every
``save_every`` steps an atomic checkpoint from which ``resume=True`` continues bit-for-bit (see
:mod:`tokenpo.checkpoint`)::

    result = train(policy, reference, tokenized_pairs, TrainConfig(method="sparsepo", max_steps=200), tokenizer)
    result.history[-1]["rewards/accuracies"], result.policy, result.masks

Extra inputs of token-level methods: SparsePO masks are computed by the trainer (mask networks on the reference's
per-layer hidden states) and MaPO masks by :func:`tokenpo.masks.mapo_masks`; SePO selections, TIS-DPO weights and
FPO features come as batch columns ``chosen_<name>``/``rejected_<name>`` or from ``TrainConfig.extra_inputs_fn``
(see :class:`tokenpo.train_step.StepInputs`).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .cache import cache_root
from .checkpoint import (METRICS_FILE, EpochSampler, MetricsLog, json_safe, latest_checkpoint, list_checkpoints,
                         load_checkpoint, read_metrics, save_checkpoint)
from .losses import Objective, get_objective
from .optim import delayed_factor, parameter_groups, schedule_factor
from .train_step import StepInputs, StepPlan, TrainablePolicy, compute_batch, split_pairs
from .utils import package_versions, set_seed

__all__ = ["TrainConfig", "TrainResult", "TrainCallback", "NonFiniteLossError", "StepInputs", "split_pairs",
           "train", "evaluate_pairs"]

EVAL_METRICS_FILE = "eval_metrics.jsonl"


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
    mixed_precision: "no" | "fp16" | "bf16" (🤗 Accelerate). cpu: force the CPU. progress: show a tqdm bar.
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
            raise ValueError(f"TrainConfig.mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        schedule_factor(self.schedule, 1, 0)  # validates the name


@dataclass
class TrainResult:
    policy: nn.Module                 # the trained policy (a PEFT model when LoRA was used)
    masks: nn.Module | None           # the SparsePO mask networks (None for other methods)
    out_dir: Path
    history: list[dict]               # one row per optimizer step, as in metrics.jsonl
    eval_history: list[dict]          # rows of eval_metrics.jsonl
    steps: int
    last_checkpoint: Path | None
    final_dir: Path | None            # save_pretrained folder of the policy (+ token_mask.safetensors)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def metrics(self) -> dict:
        """The last step's metrics."""
        return self.history[-1] if self.history else {}


class TrainCallback:
    """Hooks into a run (main process only); subclass and override what you need, or pass any object with some of
    these methods. ``policy`` is the bare (unwrapped) policy; ``masks`` the SparsePO mask module or None."""

    def on_train_begin(self, policy: nn.Module, masks: nn.Module | None) -> None: ...

    def on_step_end(self, step: int, metrics: dict, policy: nn.Module, masks: nn.Module | None) -> None: ...

    def on_checkpoint(self, step: int, path: Path, policy: nn.Module, masks: nn.Module | None) -> None: ...

    def on_evaluate(self, step: int, metrics: dict, policy: nn.Module, masks: nn.Module | None) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss or gradient norm; names the optimizer step and the dataset rows of the batch."""

    def __init__(self, what: str, step: int, rows: Sequence[int], batch_rows: Sequence[int]):
        self.step, self.rows, self.batch_rows = step, list(rows), list(batch_rows)
        super().__init__(f"non-finite {what} at step {step}: dataset rows {self.rows} "
                         f"(batch rows {self.batch_rows}); the run stopped before applying this update")


# -------------------------------------------------------------------------------------------------------- set-up
def _objective_hparams(objective: Objective, overrides: dict[str, Any]) -> dict[str, Any]:
    accepted = set(inspect.signature(objective.fn).parameters) - {"chosen", "rejected", *objective.extra_inputs}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"TrainConfig.hparams has {unknown}, which objective {objective.name!r} does not take; "
                         f"its hyper-parameters: {sorted(accepted)}")
    return {**objective.defaults, **overrides}


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _apply_lora(policy: nn.Module, lora: Any) -> nn.Module:
    if lora is None:
        return policy
    from peft import LoraConfig, get_peft_model

    lora_config = lora if isinstance(lora, LoraConfig) else LoraConfig(**{"task_type": "CAUSAL_LM", **dict(lora)})
    if _is_peft(policy):
        raise ValueError("TrainConfig.lora is set but the policy already is a PEFT model; pass one or the other")
    return get_peft_model(policy, lora_config)


def _build_masks(policy: nn.Module, config: TrainConfig, hparams: dict[str, Any]) -> nn.Module:
    """SparsePO mask networks sized from the policy's config. With only one term masked (mask_on_reward or
    mask_on_kl False) a single network is built even in independent mode: a second one would get no gradient."""
    from .masks import SparsePOMasks

    one_net = hparams.get("common", True) or not (hparams.get("mask_on_reward", True) and hparams.get("mask_on_kl", True))
    return SparsePOMasks.from_model_config(policy.config, mode="common" if one_net else "independent",
                                           **config.mask_kwargs)


def _run_dir(config: TrainConfig, resume: bool | str | Path, accelerator) -> Path:
    if config.out_dir is not None:
        return Path(config.out_dir)
    if resume:
        raise ValueError("resume needs TrainConfig.out_dir (the run folder to continue)")
    from accelerate.utils import broadcast_object_list

    name = [f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"]
    broadcast_object_list(name)
    return cache_root() / "runs" / name[0]


def _default_collator(tokenizer):
    if tokenizer is None:
        raise ValueError("pass a collator, or a tokenizer (its pad token id is used by PreferenceCollator)")
    from .data.preference import PreferenceCollator

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreferenceCollator(pad)


def _plan(objective: Objective, hparams: dict[str, Any], config: TrainConfig, has_reference_source: bool) -> StepPlan:
    is_mapo, is_sparse = objective.name == "mapo", objective.name == "sparsepo"
    use_reference = config.use_reference
    if use_reference is None:
        use_reference = objective.needs_reference or is_mapo or is_sparse or config.hook_reference_layers
    if (is_sparse or objective.needs_kl) and not use_reference:
        raise ValueError(f"method {objective.name!r} needs a reference model; TrainConfig.use_reference is False")
    with_kl = use_reference and (objective.needs_kl or config.log_kl)
    return StepPlan(objective=objective, hparams=hparams, use_reference=use_reference, with_kl=with_kl,
                    detach_kl=with_kl and not objective.needs_kl,
                    reference_layers=use_reference and (is_sparse or config.hook_reference_layers),
                    policy_layers=config.hook_policy_layers, chunk_size=config.chunk_size,
                    mapo=dict(config.mapo_kwargs) if is_mapo else None, extra_inputs_fn=config.extra_inputs_fn)


# -------------------------------------------------------------------------------------------------------- the loop
def train(policy: nn.Module, reference: nn.Module | None, train_dataset, config: TrainConfig, tokenizer=None,
          collator: Callable | None = None, resume: bool | str | Path = False,
          callbacks: Sequence[Any] | None = None, eval_dataset=None) -> TrainResult:
    """Train ``policy`` on preference pairs with ``config.method``; returns the trained policy and the metrics.

    Args:
        policy: a causal LM (HF ``PreTrainedModel``, or a PEFT model); trained in place.
        reference: a frozen reference model; None = the PEFT policy with adapters disabled (LoRA), else a frozen
            copy of the policy as it is before training (when the method needs a reference at all).
        train_dataset: tokenised pairs (:func:`tokenpo.data.preference.tokenize_pairs`), indexable by row.
        collator: builds the batch dict of CONTEXT.md (default: ``PreferenceCollator(tokenizer.pad_token_id)``).
        resume: True = continue from the newest complete checkpoint in ``config.out_dir`` (start fresh if there is
            none); a path = from that checkpoint. A fresh run refuses a folder that already holds a run.
        callbacks: objects with some of ``on_train_begin`` / ``on_step_end`` / ``on_checkpoint`` / ``on_evaluate``
            (see :class:`TrainCallback`); called on the main process only.
        eval_dataset: pairs evaluated (no gradient) every ``config.eval_every`` steps -> ``eval_metrics.jsonl``.
    Raises:
        NonFiniteLossError: a NaN/inf loss or gradient norm (names the step and the dataset rows).
    """
    from accelerate import Accelerator

    objective = get_objective(config.method)
    hparams = _objective_hparams(objective, config.hparams)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
                              cpu=config.cpu, step_scheduler_with_optimizer=False)
    main = accelerator.is_main_process
    out_dir = _run_dir(config, resume, accelerator)
    resume_from = _resume_point(out_dir, resume)
    callbacks = list(callbacks or [])
    set_seed(config.seed, deterministic=config.deterministic)

    # ---- models: LoRA, reference, mask networks, all before the optimizer sees them
    policy = _apply_lora(policy, config.lora)
    if config.disable_dropout:
        _disable_dropout(policy)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if _is_peft(policy):
            policy.enable_input_require_grads()
    plan = _plan(objective, hparams, config, reference is not None or _is_peft(policy))
    if plan.use_reference and reference is None and not _is_peft(policy):
        reference = copy.deepcopy(policy)
    if reference is not None:
        reference.eval().requires_grad_(False)
        reference.to(accelerator.device)
    token_mask = _build_masks(policy, config, hparams) if objective.name == "sparsepo" else None
    module = TrainablePolicy(policy, token_mask)
    module.train()

    # ---- data, optimizer, schedule
    collate = collator or _default_collator(tokenizer)
    sampler = EpochSampler(len(train_dataset), config.seed, shuffle=config.shuffle)
    loader = accelerator.prepare(DataLoader(train_dataset, batch_size=config.batch_size, sampler=sampler,
                                            collate_fn=collate, drop_last=config.drop_last))
    if len(loader) == 0:
        raise ValueError(f"train_dataset has {len(train_dataset)} pairs: fewer than one batch of {config.batch_size} "
                         f"x {accelerator.num_processes} processes with drop_last=True")
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(
        parameter_groups(module, config.learning_rate, config.weight_decay, config.mask_learning_rate,
                         config.mask_weight_decay),
        lr=config.learning_rate, betas=tuple(config.adam_betas), eps=config.adam_eps)
    base = schedule_factor(config.schedule, total_steps, warmup)
    masked = delayed_factor(base, config.mask_freeze_steps, config.mask_warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [masked if group["name"] == "masks" else base for group in optimizer.param_groups])
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    unwrapped: TrainablePolicy = accelerator.unwrap_model(module)
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_dataset, batch_size=config.batch_size, shuffle=False,
                                                     collate_fn=collate))

    # ---- run folder: fresh or resumed
    log = MetricsLog(out_dir / METRICS_FILE, enabled=main)
    eval_log = MetricsLog(out_dir / EVAL_METRICS_FILE, enabled=main)
    step, epoch, micro = 0, 0, 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        step, epoch, micro = state["step"], state["epoch"], state["micro_batches"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.truncate_after(step)
        eval_log.truncate_after(step)
        _write_config(out_dir, config, hparams, accelerator, resumed=resume_from is not None)
    accelerator.wait_for_everyone()
    history = read_metrics(out_dir / METRICS_FILE) if step and (out_dir / METRICS_FILE).exists() else []
    eval_history = read_metrics(out_dir / EVAL_METRICS_FILE) if step and (out_dir / EVAL_METRICS_FILE).exists() else []

    def autocast():
        return accelerator.autocast()

    def evaluate_now():
        row = {"step": step, **_evaluate(plan, module, unwrapped, reference, eval_loader, accelerator, autocast)}
        eval_history.append(row)
        eval_log.append(row)
        for cb in callbacks if main else ():
            _call(cb, "on_evaluate", step, row, unwrapped.policy, unwrapped.token_mask)

    for cb in callbacks if main else ():
        _call(cb, "on_train_begin", unwrapped.policy, unwrapped.token_mask)
    if eval_loader is not None and step == 0:
        evaluate_now()
    bar = tqdm(total=total_steps, initial=step, desc=f"{config.method}", disable=not (main and config.progress),
               dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    n_micro, step_rows = 0, []
    last_checkpoint = latest_checkpoint(out_dir) if resume_from is not None else None
    while step < total_steps:
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, micro) if micro else loader
        for batch in epoch_loader:
            with accelerator.accumulate(module):
                result = compute_batch(plan, module, reference, batch, unwrapped=unwrapped, step=step + 1,
                                       autocast=autocast)
                _check_finite(accelerator, result.losses, batch["row_index"], step + 1)
                accelerator.backward(result.losses.mean())
                for name, value in result.metrics.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                n_micro += 1
                step_rows.append(batch["row_index"])
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        module.parameters(), config.max_grad_norm if config.max_grad_norm else float("inf"))
                    grad_norm = float(grad_norm)
                    if not math.isfinite(grad_norm):
                        rows = accelerator.gather(torch.cat(step_rows)).tolist()
                        raise NonFiniteLossError("gradient norm", step + 1, rows, rows)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
            scheduler.step()
            step += 1
            row = {"step": step, "epoch": epoch + micro / len(loader),
                   "lr": next((lr for name, lr in lrs.items() if name != "masks"), lrs.get("masks"))}
            if "masks" in lrs:
                row["lr_mask"] = lrs["masks"]
            row["grad_norm"] = grad_norm
            row.update(_reduce_means(accelerator, sums, n_micro))
            sums, n_micro, step_rows = {}, 0, []
            history.append(row)
            log.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}")
            position = (epoch + 1, 0) if micro == len(loader) else (epoch, micro)
            if config.save_every and (step % config.save_every == 0 or step == total_steps):
                last_checkpoint = save_checkpoint(
                    accelerator, out_dir, step,
                    {"step": step, "epoch": position[0], "micro_batches": position[1], "total_steps": total_steps},
                    config.keep_last)
                for cb in callbacks if main else ():
                    _call(cb, "on_checkpoint", step, last_checkpoint, unwrapped.policy, unwrapped.token_mask)
            if eval_loader is not None and ((config.eval_every and step % config.eval_every == 0)
                                            or step == total_steps):
                evaluate_now()
            for cb in callbacks if main else ():
                _call(cb, "on_step_end", step, row, unwrapped.policy, unwrapped.token_mask)
            if step >= total_steps:
                break
        else:
            epoch, micro = epoch + 1, 0
    bar.close()
    log.close()
    eval_log.close()
    final_dir = _save_final(accelerator, unwrapped, tokenizer, out_dir) if config.save_final else None
    return TrainResult(policy=unwrapped.policy, masks=unwrapped.token_mask, out_dir=out_dir, history=history,
                       eval_history=eval_history, steps=step, last_checkpoint=last_checkpoint, final_dir=final_dir)


def _call(callback: Any, hook: str, *args) -> None:
    fn = getattr(callback, hook, None)
    if fn is not None:
        fn(*args)


def _resume_point(out_dir: Path, resume: bool | str | Path) -> Path | None:
    if resume not in (False, None, True):
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"resume={str(resume)!r} is not a checkpoint folder")
        return path
    existing = latest_checkpoint(out_dir)
    if resume:
        return existing
    if existing is not None or (out_dir / METRICS_FILE).exists():
        raise ValueError(f"run folder {out_dir} already holds a run: pass resume=True to continue it, or choose "
                         "another TrainConfig.out_dir")
    return None


def _write_config(out_dir: Path, config: TrainConfig, hparams: dict, accelerator, resumed: bool) -> None:
    record = {"config": json_safe(dataclasses.asdict(config)), "objective_hparams": json_safe(hparams),
              "num_processes": accelerator.num_processes, "versions": package_versions()}
    path = out_dir / "config.json"
    if resumed and path.exists():
        before = json.loads(path.read_text()).get("config")
        if before != record["config"]:
            changed = sorted(k for k in record["config"] if before.get(k) != record["config"][k])
            warnings.warn(f"resuming {out_dir} with a different config ({changed}); the run will not match an "
                          "uninterrupted one", stacklevel=3)
        return
    path.write_text(json.dumps(record, indent=2))


def _check_finite(accelerator, losses: torch.Tensor, row_index: torch.Tensor, step: int) -> None:
    """All processes agree whether any pair's loss is non-finite, so that none is left waiting in a collective."""
    bad = ~torch.isfinite(losses.detach())
    if float(accelerator.reduce(bad.any().float().reshape(1), "sum")) == 0:
        return
    rows = accelerator.gather(row_index.reshape(-1))
    flags = accelerator.gather(bad.long().reshape(-1))
    raise NonFiniteLossError("loss", step, rows[flags.bool()].tolist(), rows.tolist())


def _reduce_means(accelerator, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Average per-micro-batch metric means over the accumulation steps, then over processes (equal batch sizes)."""
    names = sorted(sums)
    if not names:
        return {}
    values = torch.stack([torch.as_tensor(sums[n], device=accelerator.device).float() / count for n in names])
    values = accelerator.reduce(values, "mean")
    return {name: float(v) for name, v in zip(names, values.tolist())}


@torch.no_grad()
def _evaluate(plan: StepPlan, module, unwrapped, reference, loader, accelerator, autocast) -> dict[str, float]:
    sums: dict[str, torch.Tensor] = {}
    pairs = torch.zeros((), device=accelerator.device)
    for batch in loader:
        out = compute_batch(plan, module, reference, batch, unwrapped=unwrapped, autocast=autocast)
        n = out.losses.shape[0]
        pairs += n
        for name, value in out.metrics.items():
            sums[name] = sums.get(name, 0.0) + value.float() * n
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[n] for n in names] + [pairs]), "sum")
    return {name: float(v) / float(totals[-1]) for name, v in zip(names, totals[:-1].tolist())}


def _save_final(accelerator, unwrapped: TrainablePolicy, tokenizer, out_dir: Path) -> Path:
    """`save_pretrained` of the policy (adapters only with PEFT) and the mask networks, written atomically."""
    final = out_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = out_dir / f".final.{uuid.uuid4().hex}.tmp"
        unwrapped.policy.save_pretrained(str(tmp))
        if unwrapped.token_mask is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in unwrapped.token_mask.state_dict().items()},
                      str(tmp / "token_mask.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def evaluate_pairs(policy: nn.Module, reference: nn.Module | None, dataset, config: TrainConfig, tokenizer=None,
                   collator: Callable | None = None, masks: nn.Module | None = None) -> dict[str, float]:
    """Metrics of ``config.method`` over ``dataset`` (no gradient, eval mode, one process), e.g. rewards/accuracies of
    a policy on held-out pairs. ``reference`` None with a PEFT policy = adapters disabled; ``masks`` the SparsePO
    networks (TrainResult.masks)."""
    objective = get_objective(config.method)
    hparams = _objective_hparams(objective, config.hparams)
    plan = _plan(objective, hparams, config, reference is not None or _is_peft(policy))
    if plan.use_reference and reference is None and not _is_peft(policy):
        raise ValueError(f"method {config.method!r} needs a reference model")
    if objective.name == "sparsepo" and masks is None:
        raise ValueError("evaluating SparsePO needs the trained mask networks (TrainResult.masks)")
    module = TrainablePolicy(policy, masks)
    device = next(policy.parameters()).device
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                        collate_fn=collator or _default_collator(tokenizer))
    sums: dict[str, float] = {}
    pairs = 0
    modes = [(m, m.training) for m in (module, reference) if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out = compute_batch(plan, module, reference, batch)
                n = out.losses.shape[0]
                pairs += n
                for name, value in out.metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * n
    finally:
        for m, training in modes:
            m.train(training)
    return {name: value / pairs for name, value in sums.items()}
