"""Run-folder bookkeeping for the trainers: data order, per-step metrics log, atomic checkpoints, resume.

A run folder holds `config.json`, `metrics.jsonl` (one JSON object per optimizer step, appended and flushed as the
run goes) and `checkpoint-<step>/` folders. A checkpoint is written into a hidden temporary folder and renamed into
place once complete, so a run killed at any moment leaves either a whole checkpoint or none; `resume` picks the
newest complete one and drops metric rows logged after it (they will be logged again, identically).

Data order is a pure function of (seed, epoch), never of an RNG that advances as training goes, so a resumed run
sees exactly the batches the uninterrupted run would have seen: it rebuilds the epoch's permutation and skips the
batches already consumed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from tokenpo.utils import package_versions

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
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
    """Complete checkpoints in a run folder, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _CHECKPOINT.match(p.name))
             and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(accelerator, out_dir: Path, step: int, state: dict[str, Any], keep_last: int | None) -> Path:
    """Save model(s), optimizer, scheduler and every process's RNG states (🤗 Accelerate `save_state`) plus the
    trainer `state` (step, epoch, …) as `out_dir/checkpoint-<step>`; all processes must call it.

    Written to a temporary folder and renamed once complete; then all but the newest `keep_last` are removed."""
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
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore what `save_checkpoint` saved into the prepared objects; returns the trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


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
    if isinstance(value, torch.dtype):
        return str(value)
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    return repr(value)


def resume_point(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint a run starts from: None (fresh), the newest complete one (``resume=True``; None if there is
    none) or the given folder. A fresh start in a folder that already holds a run is refused."""
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


def write_config(out_dir: Path, config, hparams: dict, accelerator, resumed: bool) -> None:
    """``config.json``: the (dataclass) config, the objective's effective hyper-parameters, the process count and
    package versions; on resume, warn if the config differs from the one the run started with."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if settings.get("providers") is not None:
        settings["providers"] = [{"class": type(p).__name__, **p.settings()} for p in settings["providers"]]
    record = {"config": json_safe(settings), "objective_hparams": json_safe(hparams),
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


def save_final(accelerator, unwrapped, tokenizer, out_dir: Path) -> Path:
    """``out_dir/final``: ``save_pretrained`` of ``unwrapped.policy`` (adapters only with PEFT), the tokenizer, and
    every provider with trainable state under ``providers/<index>-<class>/`` (its own ``save_pretrained``), written
    into a temporary folder and renamed."""
    final = out_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = out_dir / f".final.{uuid.uuid4().hex}.tmp"
        unwrapped.policy.save_pretrained(str(tmp))
        for index, provider in enumerate(unwrapped.providers):
            if hasattr(provider, "save_pretrained") and any(p.requires_grad for p in provider.parameters()):
                provider.save_pretrained(tmp / "providers" / f"{index}-{type(provider).__name__}")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
