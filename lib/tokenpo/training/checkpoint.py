"""Run-folder bookkeeping for the trainers: data order, per-step metrics log, atomic checkpoints, resume.

A run folder holds `config.json`, `metrics.jsonl` (one JSON object per optimizer step, appended and flushed as the
run goes) and `checkpoint-<step>/` folders. Every checkpoint is a 🤗 model folder that `from_pretrained` loads (the
policy's `save_pretrained`: config.json and weights, or the PEFT adapters; the tokenizer; each provider with
trainable state by its own `save_pretrained` under `providers/<index>-<Class>/`) plus what resuming needs (🤗
Accelerate's optimizer, scheduler and per-process random states, `trainer_state.json`) and `checksums.sha256`, the
SHA-256 of every file (`sha256sum -c` reads it). It is written into a hidden temporary folder, every file and folder
fsynced, then renamed into place (and the run folder fsynced), so a run killed at any moment leaves either a whole
checkpoint or none. `resume` verifies the checksums of the newest checkpoint, falls back to the newest intact one
(setting damaged ones aside as `checkpoint-<step>.damaged`, with a warning naming them), and drops metric rows
logged after it (they will be logged again, identically).

Data order is a pure function of (seed, epoch), never of an RNG that advances as training goes, so a resumed run
sees exactly the batches the uninterrupted run would have seen: it rebuilds the epoch's permutation and skips the
batches already consumed.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from tokenpo.utils import package_versions

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.sha256"
CONFIG_FILE = "config.json"
# Settings that cannot change what a run computes: they may differ on resume without allow_config_changes.
CONFIG_EXEMPT = ("progress", "out_dir")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class EpochSampler(Sampler[int]):
    """Row order for one epoch: a permutation of `range(n)` drawn from `(seed, epoch)` (or `range(n)` in order).

    `set_epoch(e)` selects the epoch; 🤗 Accelerate's data loaders call it through `dataloader.set_epoch(e)`.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class MetricsLog:
    """Appends one JSON line per step to `path` (main process only), flushing every line."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._handle = None

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()

    def truncate_after(self, step: int) -> None:
        """Keep only complete rows with `row["step"] <= step` (what a checkpoint at `step` had already logged)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(row) + "\n" for row in read_metrics(self.path) if row.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` file (or of the one in a run folder); a torn line (a killed run) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder (renamed into place: ``checkpoint-<step>/`` with a trainer state),
    oldest first. Their checksums are verified on resume (:func:`verify_checkpoint`)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _CHECKPOINT.match(p.name))
             and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder of a run (None if there is none)."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


# ----------------------------------------------------------------------------------------------- files on disk
def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up (the folder itself last), so that a rename of ``folder`` that
    follows is durable with its content."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        for name in dirs:
            _fsync_path(Path(root) / name)
    _fsync_path(folder)


def _publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and its content, rename it to ``final`` (replacing an older folder of that name), fsync the
    parent folder."""
    fsync_tree(tmp)
    if final.exists():  # e.g. a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(final.parent)


def write_checksums(folder: Path) -> None:
    """``checksums.sha256``: one ``<sha256>  <relative path>`` line per file (``sha256sum -c`` format)."""
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS_FILE]
    (folder / CHECKSUMS_FILE).write_text("".join(lines), encoding="utf-8")


def verify_checkpoint(path: Path) -> str | None:
    """None if every file listed in the checkpoint's ``checksums.sha256`` is there with its SHA-256; else what is
    wrong (the first file that fails)."""
    listing = path / CHECKSUMS_FILE
    if not listing.exists():
        return f"no {CHECKSUMS_FILE} (not written by this trainer, or by an older version)"
    try:
        entries = [line.split("  ", 1) for line in listing.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, UnicodeDecodeError) as error:
        return f"{CHECKSUMS_FILE} unreadable ({error})"
    names = {name for _, name in entries}
    if STATE_FILE not in names:
        return f"{CHECKSUMS_FILE} does not list {STATE_FILE}"
    for digest, name in entries:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != digest:
            return f"{name} fails its SHA-256 checksum"
    return None


# ----------------------------------------------------------------------------------------------- model folders
def _trainable(provider) -> bool:
    return any(p.requires_grad for p in provider.parameters())


def provider_folder(index: int, provider) -> str:
    return f"providers/{index}-{type(provider).__name__}"


def save_pretrained_folder(unwrapped, tokenizer, folder: Path) -> None:
    """What ``from_pretrained`` loads: ``unwrapped.policy.save_pretrained`` (the PEFT adapters with LoRA), the
    tokenizer, and every provider with trainable state by its own ``save_pretrained`` (else its ``state_dict`` as
    ``model.safetensors`` and its settings as ``settings.json``) under ``providers/<index>-<Class>/``."""
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_tied_weights():
        unwrapped.policy.save_pretrained(str(folder))
    for index, provider in enumerate(unwrapped.providers):
        if not _trainable(provider):
            continue
        target = folder / provider_folder(index, provider)
        if hasattr(provider, "save_pretrained"):
            provider.save_pretrained(target)
        else:
            from safetensors.torch import save_file

            target.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in provider.state_dict().items()},
                      str(target / "model.safetensors"))
            (target / "settings.json").write_text(json.dumps(json_safe(provider.settings()), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def load_pretrained_folder(unwrapped, folder: Path) -> None:
    """Load what :func:`save_pretrained_folder` wrote back into ``unwrapped`` (policy weights or adapters, trainable
    providers), in place."""
    load_policy_weights(unwrapped.policy, folder)
    for index, provider in enumerate(unwrapped.providers):
        if not _trainable(provider):
            continue
        source = folder / provider_folder(index, provider)
        if hasattr(type(provider), "from_pretrained") and not (source / "settings.json").exists():
            state = type(provider).from_pretrained(source).state_dict()
        else:
            from safetensors.torch import load_file

            state = load_file(str(source / "model.safetensors"))
        provider.load_state_dict(state)


def load_policy_weights(policy, folder: Path) -> None:
    """The weights ``save_pretrained`` wrote into ``folder``, loaded into ``policy`` in place: PEFT adapters through
    ``peft.set_peft_model_state_dict``; a full model from its safetensors file(s), as transformers' Trainer resumes
    (``load_state_dict(strict=False)``; a missing key must be a tied weight), else through ``from_pretrained``."""
    from safetensors.torch import load_file

    from tokenpo.utils import is_peft

    if is_peft(policy):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy, load_file(str(folder / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: adapter weights {result.unexpected_keys[:5]} do not fit the policy")
        return
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    own = policy.state_dict()
    loaded_storage = {own[k].data_ptr() for k in state if k in own}
    if set(state) <= set(own) and all(own[k].data_ptr() in loaded_storage for k in set(own) - set(state)):
        policy.load_state_dict(state, strict=False)
        return
    reloaded = type(policy).from_pretrained(str(folder), dtype=next(policy.parameters()).dtype)
    policy.load_state_dict(reloaded.state_dict())


def register_checkpoint_hooks(accelerator, tokenizer) -> None:
    """Make 🤗 Accelerate's ``save_state`` / ``load_state`` write and read the trained module as a ``from_pretrained``
    folder (:func:`save_pretrained_folder`) instead of its own prefixed ``model.safetensors`` (Accelerate's documented
    pre-hooks); optimizer, scheduler, gradient scaler and random states stay Accelerate's. Under FSDP, DeepSpeed or
    Megatron-LM Accelerate's own sharded format is kept."""
    from accelerate.utils import DistributedType

    own_format = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                  DistributedType.MEGATRON_LM)

    def save_hook(models, weights, output_dir):
        if own_format:
            return
        for model in models:
            if accelerator.is_main_process:
                save_pretrained_folder(accelerator.unwrap_model(model), tokenizer, Path(output_dir))
        weights.clear()

    def load_hook(models, input_dir):
        if own_format:
            return
        for model in models:
            load_pretrained_folder(accelerator.unwrap_model(model), Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------- save, resume
def save_checkpoint(accelerator, out_dir: Path, step: int, state: dict[str, Any], keep_last: int | None) -> Path:
    """``out_dir/checkpoint-<step>``: 🤗 Accelerate's ``save_state`` (the module as a ``from_pretrained`` folder
    through :func:`register_checkpoint_hooks`, optimizer, scheduler, every process's random states), the trainer
    ``state`` (step, epoch, …) and the checksums; written into a temporary folder, fsynced and renamed once complete;
    then all but the newest ``keep_last`` are removed. All processes must call it."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _quiet_tied_weights():
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        write_checksums(tmp)
        _publish(tmp, final)
        if keep_last is not None and keep_last > 0:
            for old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class _DropTiedWeightNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


class _quiet_tied_weights:
    """safetensors stores tied weights (GPT-2's lm_head = wte) once; Accelerate warns about it at every save."""

    def __enter__(self):
        self.logger, self.filter = logging.getLogger("accelerate.utils.other"), _DropTiedWeightNotice()
        self.logger.addFilter(self.filter)

    def __exit__(self, *exc):
        self.logger.removeFilter(self.filter)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` saved into the prepared objects (🤗 Accelerate's ``load_state``, which also
    sets every random state); returns the trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(path))
    return read_state(path)


def rng_state() -> dict[str, Any]:
    """Every random state a training step may draw from (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def json_safe(value: Any) -> Any:
    """Config values as JSON: callables by qualified name, non-finite floats as strings, other objects by repr."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    return repr(value)


def _rows(out_dir: Path) -> list[dict]:
    return read_metrics(out_dir / METRICS_FILE) if (out_dir / METRICS_FILE).exists() else []


def resume_point(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint a run starts from: None (fresh), the newest intact one (``resume=True``) or the given folder
    (verified too). Checksums are verified; with ``resume=True`` a damaged checkpoint is renamed
    ``checkpoint-<step>.damaged`` with a warning naming it and the one used instead. Refused: a fresh start in a
    folder that already holds a run; ``resume=True`` on a run without any checkpoint (it would be trained again from
    step 0 over it); ``resume=True`` when no checkpoint is intact. Main process only (the trainer broadcasts)."""
    if resume not in (False, None, True):
        path = Path(resume)
        if not path.is_dir() or not (path / STATE_FILE).exists():
            raise ValueError(f"resume={str(resume)!r} is not a checkpoint folder (a checkpoint-<step> folder with "
                             f"{STATE_FILE})")
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
        return path
    checkpoints = list_checkpoints(out_dir)
    if not resume:
        if checkpoints or (out_dir / METRICS_FILE).exists():
            raise ValueError(f"run folder {out_dir} already holds a run: pass resume=True to continue it, or choose "
                             "another TrainConfig.out_dir")
        return None
    if not checkpoints:
        rows = _rows(out_dir)
        if rows or (out_dir / "final").exists():
            saved = ", final/ saved" if (out_dir / "final").exists() else ""
            raise ValueError(f"run folder {out_dir} has no checkpoint to resume from, but holds a run of "
                             f"{len(rows)} steps{saved} (TrainConfig.save_every was None, or it stopped before its "
                             "first checkpoint); resume=True would train it again from step 0 over it. Nothing was "
                             "changed: choose another TrainConfig.out_dir, or delete the folder to start over.")
        return None
    damaged: list[tuple[Path, str]] = []
    for path in reversed(checkpoints):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, reason in damaged:
                aside = _set_aside(bad)
                warnings.warn(f"checkpoint {bad.name} of {out_dir} is damaged ({reason}); set aside as {aside.name}; "
                              f"resuming from {path.name} instead", UserWarning, stacklevel=3)
            return path
        damaged.append((path, problem))
    raise ValueError(f"run folder {out_dir} has no intact checkpoint to resume from: "
                     + "; ".join(f"{p.name}: {reason}" for p, reason in damaged))


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


def config_record(config, hparams: dict, num_processes: int) -> dict[str, Any]:
    """What ``config.json`` holds: the (dataclass) config, the objective's effective hyper-parameters, the process
    count and package versions."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if settings.get("providers") is not None:
        settings["providers"] = [{"class": type(p).__name__, **p.settings()} for p in settings["providers"]]
    return {"config": json_safe(settings), "objective_hparams": json_safe(hparams), "num_processes": num_processes,
            "versions": package_versions()}


def config_changes(out_dir: Path, record: dict[str, Any], allowed: Sequence[str], field_names: Sequence[str],
                   step: int) -> dict[str, Any] | None:
    """Compare the config a run is resumed with to its ``config.json``. A difference in a setting not named in
    ``allowed`` is refused (ValueError naming every differing field, old -> new); allowed ones are returned as the
    entry to record in ``config.json`` (None when nothing differs)."""
    known = set(field_names) | {"num_processes"}
    typos = [name for name in allowed if name not in known]
    if typos:
        raise ValueError(f"allow_config_changes: {typos[0]!r} is not a TrainConfig field (nor 'num_processes')")
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return None
    before = json.loads(path.read_text())
    old = {**before.get("config", {}), "num_processes": before.get("num_processes")}
    new = {**record["config"], "num_processes": record["num_processes"]}
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
               if k not in CONFIG_EXEMPT and old.get(k) != new.get(k)}
    refused = [k for k in changed if k not in allowed]
    if refused:
        listing = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ValueError(f"resuming {out_dir} with a config that differs from its {CONFIG_FILE}: {listing}. The run "
                         "would no longer match an uninterrupted one; to accept, name the fields in "
                         f"train(..., resume=True, allow_config_changes={tuple(refused)!r}) (recorded in "
                         f"{CONFIG_FILE}). Nothing was changed.")
    if not changed:
        return None
    return {"step": step, "allowed": sorted(allowed), "fields": changed}


def write_config(out_dir: Path, record: dict[str, Any], change: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` (a fresh run), or on resume with an allowed change, replace its config and append the
    change to its ``changes``."""
    path = out_dir / CONFIG_FILE
    if change is not None and path.exists():
        before = json.loads(path.read_text())
        record = {**record, "changes": before.get("changes", []) + [change]}
    elif path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def save_final(accelerator, unwrapped, tokenizer, out_dir: Path) -> Path:
    """``out_dir/final``: :func:`save_pretrained_folder` (policy, tokenizer, providers with trainable state) written
    into a temporary folder, fsynced and renamed."""
    final = out_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = out_dir / f".final.{uuid.uuid4().hex}.tmp"
        save_pretrained_folder(unwrapped, tokenizer, tmp)
        _publish(tmp, final)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------- failures
_DISK_FULL_TEXT = ("no space left", "enforce fail", "file write failed", "storagefull", "os error 28",
                   "disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a write that failed for lack of space: ENOSPC/EDQUOT, or
    the messages of torch's zip writer ("enforce fail … file write failed") and safetensors (StorageFull)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(out_dir: Path, error: BaseException) -> OSError:
    try:
        free = f"{shutil.disk_usage(out_dir if out_dir.exists() else out_dir.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return OSError(errno.ENOSPC, f"no space left on the device of run folder {out_dir} ({free}): free some space or "
                                 f"choose another TrainConfig.out_dir (the write failed with: {first_line})")


def remove_created(out_dir: Path, created_dir: bool, created: Callable[[], Sequence[Path]]) -> None:
    """Remove what a failed fresh run wrote: the run folder if it made it, else the files and folders it added."""
    if created_dir:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for path in created():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
