"""One preference trainer for every objective in :mod:`tokenpo.objectives`, on 🤗 Accelerate.

The same call runs in a notebook (one process) and unchanged under ``accelerate launch`` / ``torchrun`` (DDP; FSDP
and DeepSpeed configurations are the user's). Per optimizer step it writes one row of metrics (TRL names — ``loss``,
``rewards/*``, ``logps/*``, ``learning_rate``, ``grad_norm``, ``num_tokens``, with ``log_logit_metrics`` also
``entropy``, ``mean_token_accuracy``, ``logits/*`` — plus ``kl/*``, ``mask/*``, ``step``, ``epoch`` and ``lr``, the
learning rate the step used, equal to ``learning_rate``) to ``<out_dir>/metrics.jsonl`` and to the trackers of
``report_to`` (🤗 Accelerate's: TensorBoard, W&B, …), and every ``save_every`` steps (and at the end) an atomic,
checksummed checkpoint that ``from_pretrained`` loads and from which ``resume=True`` continues bit-for-bit, dropout
included (see :mod:`tokenpo.training.checkpoint`)::

    result = train(policy, reference, tokenized_pairs, TrainConfig(method="sparsepo", max_steps=200), tokenizer)
    result.history[-1]["rewards/accuracies"], result.policy, result.providers

An objective's extra inputs come from its providers (:mod:`tokenpo.providers`): the registry's defaults, or
``TrainConfig(providers=[...])``. The trainer knows no method by name; what each step computes is planned once from
the objective and the providers (:func:`tokenpo.training.step.make_plan`).

Module map: ``config`` (TrainConfig, hyper-parameters, providers, LoRA), ``step`` (one batch: the forwards, the
statistics, the providers, the loss), ``checkpoint`` (data order, metrics log, checkpoints), ``optim`` (parameter
groups, schedules from transformers), ``metrics`` (TRL's logit metrics), ``sft`` (reference models).

Launches: one process, or ``accelerate launch`` / ``torchrun`` with several; without GPUs such a launch trains CPU
processes with gloo (``cpu=True`` is implied), and a launch whose processes did not all join is an error.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import uuid
import warnings
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

from .checkpoint import (METRICS_FILE, EpochSampler, MetricsLog, config_changes, config_record, disk_full_error,
                         is_disk_full, latest_checkpoint, load_checkpoint, read_metrics, read_state,
                         register_checkpoint_hooks, remove_created, resume_point, rng_state, save_checkpoint,
                         save_final, set_rng_state, write_config)
from .config import (TrainConfig, apply_lora, check_hparams, default_collator, disable_dropout, objective_hparams,
                     report_trackers, run_providers)
from .metrics import LogitMetrics, logit_metrics
from .optim import make_scheduler, parameter_groups
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


def _has_distributed_device() -> bool:
    """Whether a device with a collective backend of its own (CUDA/NCCL, XPU, NPU, …) is present; without one, a
    distributed launch must train on the CPU with gloo, which 🤗 Accelerate only picks when told ``cpu=True``."""
    from accelerate.utils import (is_hpu_available, is_mlu_available, is_musa_available, is_npu_available,
                                  is_sdaa_available, is_xpu_available)

    return torch.cuda.is_available() or any(check() for check in (
        is_xpu_available, is_npu_available, is_mlu_available, is_musa_available, is_sdaa_available, is_hpu_available))


def _launcher_world_size() -> int:
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def _check_launch(num_processes: int) -> None:
    """A launcher that asked for several processes must see them all join: torchrun's ``WORLD_SIZE`` against the
    processes Accelerate counts, and 🤗 Accelerate's simple launcher (``accelerate launch --num_processes N`` on a
    machine without GPUs and without ``--multi_gpu``), which starts this one process only but sets MASTER_ADDR."""
    world = _launcher_world_size()
    if world > 1 and num_processes != world:
        raise RuntimeError(f"the launcher set WORLD_SIZE={world} but 🤗 Accelerate sees {num_processes} process(es): "
                           "each would train alone into the same run folder. Check the launch (accelerate config, "
                           "CUDA_VISIBLE_DEVICES) or pass TrainConfig(cpu=True) to train on the CPU with gloo.")
    if world == 1 and "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ \
            and "LOCAL_RANK" not in os.environ:
        raise RuntimeError("accelerate launch was asked for several processes but started only this one (its simple "
                           "launcher, used without GPUs unless told --multi_gpu): relaunch with "
                           "`accelerate launch --multi_gpu --num_processes N script.py` (on a machine without GPUs the "
                           "trainer then trains N CPU processes with gloo) or `torchrun --nproc_per_node N script.py`")


def _run_dir(config: TrainConfig, resume: bool | str | Path) -> Path:
    if config.out_dir is not None:
        return Path(config.out_dir)
    if resume not in (False, None):
        raise ValueError("resume needs TrainConfig.out_dir (the run folder to continue)")
    from accelerate.utils import broadcast_object_list

    name = [f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"]
    broadcast_object_list(name)
    return cache_root() / "runs" / name[0]


def _on_main(state, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process, its result (or its exception) broadcast so that every process returns (or
    raises) the same."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 - re-raised on every process below
            error = caught
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result, None if error is None else (type(error), str(error))]
        broadcast_object_list(box)
        result, remote = box
        if error is None and remote is not None:
            kind, message = remote
            error = kind(message) if issubclass(kind, (ValueError, RuntimeError, OSError)) else RuntimeError(message)
    if error is not None:
        raise error
    return result


# -------------------------------------------------------------------------------------------------------- the loop
def train(policy: nn.Module, reference: nn.Module | None, train_dataset, config: TrainConfig, tokenizer=None,
          collator: Callable | None = None, resume: bool | str | Path = False,
          callbacks: Sequence[Any] | None = None, eval_dataset=None,
          allow_config_changes: Sequence[str] = ()) -> TrainResult:
    """Train ``policy`` on preference pairs with ``config.method``; returns the trained policy and the metrics.

    Args:
        policy: a causal LM (HF ``PreTrainedModel``, or a PEFT model); trained in place.
        reference: a frozen reference model; None = the PEFT policy with adapters disabled (LoRA), else a frozen
            copy of the policy as it is before training (when the method needs a reference at all).
        train_dataset: tokenised pairs (:func:`tokenpo.data.preference.tokenize_pairs`), indexable by row.
        tokenizer: saved into every checkpoint and ``final/``; also gives the default collator's pad token.
        collator: builds the batch (default: ``PreferenceCollator(tokenizer.pad_token_id)``).
        resume: True = continue from the newest intact checkpoint in ``config.out_dir`` (checksums verified; a
            damaged one is set aside with a warning; a folder without a run starts fresh; a run without any
            checkpoint is refused); a path = from that checkpoint. A finished run is left as it is. A fresh run
            refuses a folder that already holds a run.
        callbacks: objects with some of ``on_train_begin`` / ``on_step_end`` / ``on_checkpoint`` / ``on_evaluate``
            (see :class:`TrainCallback`); called on the main process only.
        eval_dataset: pairs evaluated (eval mode, no gradient, random states untouched) every ``config.eval_every``
            steps -> ``eval_metrics.jsonl``.
        allow_config_changes: on resume, the TrainConfig fields (or "num_processes") that may differ from the run's
            ``config.json``; any other difference is refused. Allowed changes take effect (e.g. a new learning rate
            reaches the optimizer) and are recorded in ``config.json``.
    Raises:
        NonFiniteLossError: a NaN/inf loss or gradient norm (names the step and the dataset rows).
        OSError: the disk of the run folder is full (ENOSPC, naming the folder).
    A run that fails (or is interrupted) before its first checkpoint removes what it wrote (the run folder, if it
    made it).
    """
    from accelerate import Accelerator, PartialState

    objective = get_objective(config.method)
    hparams = objective_hparams(objective, config.hparams)
    check_hparams(objective, hparams)
    _fresh_accelerator_state()
    cpu = config.cpu or (_launcher_world_size() > 1 and not _has_distributed_device())
    state = PartialState(cpu=cpu)
    _check_launch(state.num_processes)
    out_dir = _run_dir(config, resume)
    main = state.is_main_process
    record = config_record(config, hparams, state.num_processes)
    field_names = [f.name for f in dataclasses.fields(config)]

    def resolve():
        point = resume_point(out_dir, resume)
        step = read_state(point)["step"] if point is not None else 0
        change = config_changes(out_dir, record, tuple(allow_config_changes), field_names, step) \
            if point is not None else None
        return None if point is None else str(point), change

    resolved, change = _on_main(state, resolve)
    resume_from = Path(resolved) if resolved is not None else None
    fresh = resume_from is None
    created_dir = _on_main(state, lambda: not out_dir.exists())
    existing = _on_main(state, lambda: sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else [])
    trackers = report_trackers(config.report_to)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
                              cpu=cpu, step_scheduler_with_optimizer=False, log_with=trackers or None,
                              project_dir=str(out_dir))
    checkpoints_made: list[Path] = []

    def created() -> list[Path]:
        return [p for p in out_dir.iterdir() if p.name not in existing] if out_dir.exists() else []

    try:
        return _train(policy, reference, train_dataset, config, tokenizer, collator, callbacks, eval_dataset,
                      objective, hparams, accelerator, out_dir, resume_from, change, record, trackers,
                      checkpoints_made)
    except (Exception, KeyboardInterrupt) as error:
        if trackers:
            accelerator.end_training()
        if fresh and not checkpoints_made and main:
            remove_created(out_dir, created_dir, created)
        if is_disk_full(error):
            raise disk_full_error(out_dir, error) from error
        raise


def _train(policy, reference, train_dataset, config: TrainConfig, tokenizer, collator, callbacks, eval_dataset,
           objective, hparams, accelerator, out_dir: Path, resume_from: Path | None, change, record, trackers,
           checkpoints_made: list) -> TrainResult:
    main = accelerator.is_main_process
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
        if config.disable_dropout:
            disable_dropout(reference)
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
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    scheduler = make_scheduler(optimizer, config.schedule, total_steps, warmup, config.provider_freeze_steps,
                               config.provider_warmup_steps)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    unwrapped: TrainablePolicy = accelerator.unwrap_model(module)
    register_checkpoint_hooks(accelerator, tokenizer)
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_dataset, batch_size=config.batch_size, shuffle=False,
                                                     collate_fn=collate))

    # ---- run folder: fresh or resumed
    step, epoch, micro, num_tokens = 0, 0, 0, 0
    restore_rng = None
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        step, epoch, micro = state["step"], state["epoch"], state["micro_batches"]
        num_tokens = state.get("num_tokens", 0)
        # The random states as the checkpoint left them, set again just before the first batch is computed: making
        # the data iterator draws from torch's generator, and the uninterrupted run had made it before the checkpoint
        # (mid-epoch) or makes it after (at an epoch's end).
        restore_rng = rng_state()
        if change is not None:
            _apply_settings(optimizer, scheduler, settings)
    history = read_metrics(out_dir / METRICS_FILE) if step and (out_dir / METRICS_FILE).exists() else []
    eval_history = read_metrics(out_dir / EVAL_METRICS_FILE) if step and (out_dir / EVAL_METRICS_FILE).exists() else []
    if resume_from is not None and step >= total_steps:
        if main:
            warnings.warn(f"run {out_dir} already finished at step {step} ({resume_from.name}): nothing to train, "
                          "nothing written. To train further, raise max_steps or epochs and pass "
                          "allow_config_changes=('max_steps',) or ('epochs',)", UserWarning, stacklevel=3)
        history = [r for r in history if r.get("step", 0) <= step]
        final = out_dir / "final"
        return TrainResult(policy=unwrapped.policy, providers=list(unwrapped.providers), out_dir=out_dir,
                           history=history, eval_history=eval_history, steps=step, last_checkpoint=resume_from,
                           final_dir=final if final.exists() else None)
    log = MetricsLog(out_dir / METRICS_FILE, enabled=main)
    eval_log = MetricsLog(out_dir / EVAL_METRICS_FILE, enabled=main)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.truncate_after(step)
        eval_log.truncate_after(step)
        write_config(out_dir, record, change)
    history = [r for r in history if r.get("step", 0) <= step]
    eval_history = [r for r in eval_history if r.get("step", 0) <= step]
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.init_trackers("tensorboard", config=_tracker_config(record))
    logit_metrics_hook = LogitMetrics(unwrapped.policy, config.chunk_size) if config.log_logit_metrics else None

    def autocast():
        return accelerator.autocast()

    def evaluate_now():
        row = {"step": step, **_evaluate(plan, module, reference, eval_loader, accelerator, autocast,
                                         logit_metrics_hook)}
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
    token_sums: dict[str, torch.Tensor] = {}
    n_micro, step_rows, step_tokens = 0, [], 0
    last_checkpoint = latest_checkpoint(out_dir) if resume_from is not None else None
    try:
        while step < total_steps:
            loader.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, micro) if micro else loader
            if restore_rng is not None and micro == 0:
                set_rng_state(restore_rng)
                restore_rng = None
            for batch in epoch_loader:
                if restore_rng is not None:
                    set_rng_state(restore_rng)
                    restore_rng = None
                with accelerator.accumulate(module):
                    result = compute_batch(plan, module, reference, batch, step=step + 1, autocast=autocast)
                    _check_finite(accelerator, result.losses, batch["row_index"], step + 1)
                    accelerator.backward(result.losses.mean())
                    for name, value in result.metrics.items():
                        sums[name] = sums.get(name, 0.0) + value.detach().float()
                    if logit_metrics_hook is not None:
                        for name, value in logit_metrics_hook.sums(batch).items():
                            token_sums[name] = token_sums.get(name, 0.0) + value
                    step_tokens = step_tokens + batch["chosen_attention_mask"].sum() \
                        + batch["rejected_attention_mask"].sum()
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
                lr = next((lr for name, lr in lrs.items() if name != "providers"), lrs.get("providers"))
                row = {"step": step, "epoch": epoch + micro / len(loader), "lr": lr, "learning_rate": lr}
                if "providers" in lrs:
                    row["lr_providers"] = lrs["providers"]
                row["grad_norm"] = grad_norm
                num_tokens += int(accelerator.reduce(torch.as_tensor(step_tokens, device=accelerator.device)
                                                     .reshape(1).long(), "sum"))
                row["num_tokens"] = num_tokens
                row.update(_reduce_means(accelerator, sums, n_micro))
                if token_sums:
                    row.update(logit_metrics(_reduce_sums(accelerator, token_sums)))
                sums, token_sums, n_micro, step_rows, step_tokens = {}, {}, 0, [], 0
                history.append(row)
                log.append(row)
                accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                                step=step)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}")
                position = (epoch + 1, 0) if micro == len(loader) else (epoch, micro)
                if eval_loader is not None and ((config.eval_every and step % config.eval_every == 0)
                                                or step == total_steps):
                    evaluate_now()
                if config.save_every and (step % config.save_every == 0 or step == total_steps):
                    last_checkpoint = save_checkpoint(
                        accelerator, out_dir, step,
                        {"step": step, "epoch": position[0], "micro_batches": position[1], "total_steps": total_steps,
                         "num_tokens": num_tokens}, config.keep_last)
                    checkpoints_made.append(last_checkpoint)
                    for cb in callbacks if main else ():
                        _call(cb, "on_checkpoint", step, last_checkpoint, unwrapped.policy, list(unwrapped.providers))
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
        if logit_metrics_hook is not None:
            logit_metrics_hook.close()
    final_dir = save_final(accelerator, unwrapped, tokenizer, out_dir) if config.save_final else None
    if trackers:
        accelerator.end_training()
    return TrainResult(policy=unwrapped.policy, providers=list(unwrapped.providers), out_dir=out_dir, history=history,
                       eval_history=eval_history, steps=step, last_checkpoint=last_checkpoint, final_dir=final_dir)


def _apply_settings(optimizer, scheduler, settings: list[dict]) -> None:
    """After loading a checkpoint with allowed config changes: the optimizer's hyper-parameters and the schedule's base
    learning rates of the new config (the loaded states carry the old ones), and the learning rate of the step."""
    inner = getattr(scheduler, "scheduler", scheduler)
    for group, new in zip(optimizer.param_groups, settings):
        group.update({k: v for k, v in new.items() if k in ("weight_decay", "betas", "eps")})
        group["initial_lr"] = new["lr"]
    inner.base_lrs = [new["lr"] for new in settings]
    for group, base, factor in zip(optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]


def _tracker_config(record: dict) -> dict:
    """The run's settings as scalars, for a tracker's hyper-parameter table."""
    flat = {}
    for key, value in {**record["config"], "num_processes": record["num_processes"],
                       **{f"hparams/{k}": v for k, v in record["objective_hparams"].items()}}.items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


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


def _reduce_sums(accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    names = sorted(sums)
    values = accelerator.reduce(torch.stack([torch.as_tensor(sums[n], device=accelerator.device).float()
                                             for n in names]), "sum")
    return {name: float(v) for name, v in zip(names, values.tolist())}


@torch.no_grad()
def _evaluate(plan: StepPlan, module, reference, loader, accelerator, autocast, hook=None) -> dict[str, float]:
    """Metrics over the evaluation pairs, in eval mode; torch's random states are forked, so that evaluating (or
    not) leaves training's random stream, and so a resumed run, unchanged."""
    sums: dict[str, torch.Tensor] = {}
    pairs = torch.zeros((), device=accelerator.device)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    module.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            for batch in loader:
                out = compute_batch(plan, module, reference, batch, autocast=autocast)
                if hook is not None:
                    hook.discard()  # what it kept of this forward is not a training step's
                n = out.losses.shape[0]
                pairs += n
                for name, value in out.metrics.items():
                    sums[name] = sums.get(name, 0.0) + value.float() * n
    finally:
        module.train()
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
