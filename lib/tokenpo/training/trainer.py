"""One preference trainer for every objective in :mod:`tokenpo.objectives`, on 🤗 Accelerate.

The same call runs in a notebook (one process) and unchanged under ``accelerate launch`` / ``torchrun`` (DDP; FSDP
and DeepSpeed configurations are the user's). Per optimizer step it writes one row of metrics (TRL names plus
``kl/*`` and ``mask/*``, and ``step``, ``epoch``, ``lr``, ``grad_norm``) to ``<out_dir>/metrics.jsonl``, and every
``save_every`` steps an atomic checkpoint from which ``resume=True`` continues bit-for-bit (see
:mod:`tokenpo.training.checkpoint`)::

    result = train(policy, reference, tokenized_pairs, TrainConfig(method="sparsepo", max_steps=200), tokenizer)
    result.history[-1]["rewards/accuracies"], result.policy, result.providers

An objective's extra inputs come from its providers (:mod:`tokenpo.providers`): the registry's defaults, or
``TrainConfig(providers=[...])``. The trainer knows no method by name; what each step computes is planned once from
the objective and the providers (:func:`tokenpo.training.step.make_plan`).

Module map: ``config`` (TrainConfig, hyper-parameters, providers, LoRA), ``step`` (one batch: the forwards, the
statistics, the providers, the loss), ``checkpoint`` (data order, metrics log, checkpoints), ``optim`` (parameter
groups, schedules), ``sft`` (reference models).
"""
from __future__ import annotations

import copy
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tokenpo.cache import cache_root
from tokenpo.objectives import get_objective
from tokenpo.utils import is_peft, set_seed

from .checkpoint import (METRICS_FILE, EpochSampler, MetricsLog, latest_checkpoint, load_checkpoint, read_metrics,
                         resume_point, save_checkpoint, save_final, write_config)
from .config import TrainConfig, apply_lora, default_collator, disable_dropout, objective_hparams, run_providers
from .optim import delayed_factor, parameter_groups, schedule_factor
from .step import StepPlan, TrainablePolicy, compute_batch, make_plan

__all__ = ["TrainConfig", "TrainResult", "TrainCallback", "NonFiniteLossError", "train", "evaluate_pairs"]

EVAL_METRICS_FILE = "eval_metrics.jsonl"


@dataclass
class TrainResult:
    policy: nn.Module                 # the trained policy (a PEFT model when LoRA was used)
    providers: list                   # the run's providers (e.g. the trained SparsePO mask networks)
    out_dir: Path
    history: list[dict]               # one row per optimizer step, as in metrics.jsonl
    eval_history: list[dict]          # rows of eval_metrics.jsonl
    steps: int
    last_checkpoint: Path | None
    final_dir: Path | None            # save_pretrained folder of the policy (+ providers/ with trainable state)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_FILE

    @property
    def metrics(self) -> dict:
        """The last step's metrics."""
        return self.history[-1] if self.history else {}


class TrainCallback:
    """Hooks into a run (main process only); subclass and override what you need, or pass any object with some of
    these methods. ``policy`` is the bare (unwrapped) policy; ``providers`` the run's providers."""

    def on_train_begin(self, policy: nn.Module, providers: list) -> None: ...

    def on_step_end(self, step: int, metrics: dict, policy: nn.Module, providers: list) -> None: ...

    def on_checkpoint(self, step: int, path: Path, policy: nn.Module, providers: list) -> None: ...

    def on_evaluate(self, step: int, metrics: dict, policy: nn.Module, providers: list) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss or gradient norm; names the optimizer step and the dataset rows of the batch."""

    def __init__(self, what: str, step: int, rows: Sequence[int], batch_rows: Sequence[int]):
        self.step, self.rows, self.batch_rows = step, list(rows), list(batch_rows)
        super().__init__(f"non-finite {what} at step {step}: dataset rows {self.rows} "
                         f"(batch rows {self.batch_rows}); the run stopped before applying this update")


def _run_dir(config: TrainConfig, resume: bool | str | Path, accelerator) -> Path:
    if config.out_dir is not None:
        return Path(config.out_dir)
    if resume:
        raise ValueError("resume needs TrainConfig.out_dir (the run folder to continue)")
    from accelerate.utils import broadcast_object_list

    name = [f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"]
    broadcast_object_list(name)
    return cache_root() / "runs" / name[0]


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
        collator: builds the batch (default: ``PreferenceCollator(tokenizer.pad_token_id)``).
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
    hparams = objective_hparams(objective, config.hparams)
    _fresh_accelerator_state()
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
                              cpu=config.cpu, step_scheduler_with_optimizer=False)
    main = accelerator.is_main_process
    out_dir = _run_dir(config, resume, accelerator)
    resume_from = resume_point(out_dir, resume)
    callbacks = list(callbacks or [])
    set_seed(config.seed, deterministic=config.deterministic)

    # ---- models: LoRA, reference, providers, all before the optimizer sees them
    policy = apply_lora(policy, config.lora)
    if config.disable_dropout:
        disable_dropout(policy)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if is_peft(policy):
            policy.enable_input_require_grads()
    providers = run_providers(objective, config)
    plan = make_plan(objective, hparams, providers, use_reference=config.use_reference, log_kl=config.log_kl,
                     chunk_size=config.chunk_size)
    for provider in providers:
        provider.setup(policy, hparams)
    if plan.use_reference and reference is None and not is_peft(policy):
        reference = copy.deepcopy(policy)
    if reference is not None:
        reference.eval().requires_grad_(False)
        reference.to(accelerator.device)
    module = TrainablePolicy(policy, providers)
    module.train()

    # ---- data, optimizer, schedule
    collate = collator or default_collator(tokenizer)
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
        parameter_groups(module, config.learning_rate, config.weight_decay, config.provider_learning_rate,
                         config.provider_weight_decay),
        lr=config.learning_rate, betas=tuple(config.adam_betas), eps=config.adam_eps)
    base = schedule_factor(config.schedule, total_steps, warmup)
    delayed = delayed_factor(base, config.provider_freeze_steps, config.provider_warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [delayed if group["name"] == "providers" else base for group in optimizer.param_groups])
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
        write_config(out_dir, config, hparams, accelerator, resumed=resume_from is not None)
    accelerator.wait_for_everyone()
    history = read_metrics(out_dir / METRICS_FILE) if step and (out_dir / METRICS_FILE).exists() else []
    eval_history = read_metrics(out_dir / EVAL_METRICS_FILE) if step and (out_dir / EVAL_METRICS_FILE).exists() else []

    def autocast():
        return accelerator.autocast()

    def evaluate_now():
        row = {"step": step, **_evaluate(plan, module, reference, eval_loader, accelerator, autocast)}
        eval_history.append(row)
        eval_log.append(row)
        for cb in callbacks if main else ():
            _call(cb, "on_evaluate", step, row, unwrapped.policy, list(unwrapped.providers))

    for cb in callbacks if main else ():
        _call(cb, "on_train_begin", unwrapped.policy, list(unwrapped.providers))
    if eval_loader is not None and step == 0:
        evaluate_now()
    bar = tqdm(total=total_steps, initial=step, desc=f"{config.method}", disable=not (main and config.progress),
               dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    n_micro, step_rows = 0, []
    last_checkpoint = latest_checkpoint(out_dir) if resume_from is not None else None
    try:
        while step < total_steps:
            loader.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, micro) if micro else loader
            for batch in epoch_loader:
                with accelerator.accumulate(module):
                    result = compute_batch(plan, module, reference, batch, step=step + 1, autocast=autocast)
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
                       "lr": next((lr for name, lr in lrs.items() if name != "providers"), lrs.get("providers"))}
                if "providers" in lrs:
                    row["lr_providers"] = lrs["providers"]
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
                        _call(cb, "on_checkpoint", step, last_checkpoint, unwrapped.policy, list(unwrapped.providers))
                if eval_loader is not None and ((config.eval_every and step % config.eval_every == 0)
                                                or step == total_steps):
                    evaluate_now()
                for cb in callbacks if main else ():
                    _call(cb, "on_step_end", step, row, unwrapped.policy, list(unwrapped.providers))
                if step >= total_steps:
                    break
            else:
                epoch, micro = epoch + 1, 0
    finally:
        bar.close()
        log.close()
        eval_log.close()
    final_dir = save_final(accelerator, unwrapped, tokenizer, out_dir) if config.save_final else None
    return TrainResult(policy=unwrapped.policy, providers=list(unwrapped.providers), out_dir=out_dir, history=history,
                       eval_history=eval_history, steps=step, last_checkpoint=last_checkpoint, final_dir=final_dir)


def _fresh_accelerator_state() -> None:
    """Let a notebook run, say, an fp32 and then a bf16 training in one kernel: 🤗 Accelerate keeps its state in a
    process-wide singleton that refuses a different mixed-precision setting. Only outside a distributed launch
    (where the launcher owns that state) is it cleared before each run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _call(callback: Any, hook: str, *args) -> None:
    fn = getattr(callback, hook, None)
    if fn is not None:
        fn(*args)


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
def _evaluate(plan: StepPlan, module, reference, loader, accelerator, autocast) -> dict[str, float]:
    sums: dict[str, torch.Tensor] = {}
    pairs = torch.zeros((), device=accelerator.device)
    for batch in loader:
        out = compute_batch(plan, module, reference, batch, autocast=autocast)
        n = out.losses.shape[0]
        pairs += n
        for name, value in out.metrics.items():
            sums[name] = sums.get(name, 0.0) + value.float() * n
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[n] for n in names] + [pairs]), "sum")
    return {name: float(v) / float(totals[-1]) for name, v in zip(names, totals[:-1].tolist())}


def evaluate_pairs(policy: nn.Module, reference: nn.Module | None, dataset, config: TrainConfig, tokenizer=None,
                   collator: Callable | None = None, providers: Sequence | None = None) -> dict[str, float]:
    """Metrics of ``config.method`` over ``dataset`` (no gradient, eval mode, one process), e.g. rewards/accuracies of
    a policy on held-out pairs. ``reference`` None with a PEFT policy = adapters disabled; ``providers``: the trained
    ones (``TrainResult.providers``), else ``config.providers`` or the objective's defaults (providers with
    trainable modules, such as SparsePO's, must be the trained ones)."""
    objective = get_objective(config.method)
    hparams = objective_hparams(objective, config.hparams)
    providers = list(providers) if providers is not None else run_providers(objective, config)
    plan = make_plan(objective, hparams, providers, use_reference=config.use_reference, log_kl=config.log_kl,
                     chunk_size=config.chunk_size)
    if plan.use_reference and reference is None and not is_peft(policy):
        raise ValueError(f"method {config.method!r} needs a reference model")
    for provider in providers:
        if getattr(provider, "built", True) is False:
            raise ValueError(f"{type(provider).__name__} has no trained modules: pass TrainResult.providers")
        provider.setup(policy, hparams)
    module = TrainablePolicy(policy, providers)
    device = next(policy.parameters()).device
    module.to(device)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                        collate_fn=collator or default_collator(tokenizer))
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
