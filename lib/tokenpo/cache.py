"""Content-addressed cache for every step of the pipeline (corpora, tokenizer, models, datasets).

A step is identified by a JSON-able description of its inputs. Running it again with the same inputs finds the
finished folder and loads it instead of recomputing. A folder is only ever visible once complete: it is built under
a temporary name and renamed into place, so an interrupted run leaves nothing half-written behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_DONE = ".complete.json"


def cache_root() -> Path:
    """`$TOKENPO_CACHE`, else `.cache/` at the project root (else `~/.cache/tokenpo` for a non-editable install)."""
    if os.environ.get("TOKENPO_CACHE"):
        root = Path(os.environ["TOKENPO_CACHE"])
    elif (PROJECT_ROOT / "pyproject.toml").exists():
        root = PROJECT_ROOT / ".cache"
    else:
        root = Path.home() / ".cache" / "tokenpo"
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_hash(inputs: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able description of a step's inputs (key order does not matter)."""
    text = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def weights_fingerprint(state_dict, extra: Any = None, length: int = 16) -> str:
    """sha256 of a model's weights (every tensor's name, shape and float32 bytes, in name order) and an optional
    JSON-able `extra` (e.g. a config): the identity of a model for cache keys and for tying files to a model."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:length]


def code_fingerprint(*parts: str, length: int = 16) -> str:
    """sha256 of the source of the named parts of the package (modules "tokens.py" or folders "training"), so that
    a cached result of that code is recomputed when the code changes."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for part in parts:
        path = package / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        if not files or not all(f.exists() for f in files):
            raise ValueError(f"code_fingerprint: no source at {part!r} in {package}")
        for f in files:
            digest.update(str(f.relative_to(package)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:length]


TRAINING_CODE = ("tokens.py", "objectives.py", "providers", "training")


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary sibling, then rename it onto `path` (rename is atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def is_cached(kind: str, inputs: Any) -> bool:
    return (cache_root() / kind / content_hash(inputs) / _DONE).exists()


def cached_step(kind: str, inputs: Any, build: Callable[[Path], Any], root: str | Path | None = None) -> Path:
    """Return the folder holding the output of step `kind` for `inputs`, building it with `build(folder)` if needed.

    `build` writes its files into the (temporary) folder it is given. If it raises, the temporary folder is removed
    and nothing is cached. The inputs are stored beside the output as `.complete.json`, for provenance. Several
    processes may build the same step at once: each builds into its own temporary folder, the first rename wins,
    and the others discard their copy and return the winner's.
    """
    base = Path(root) if root is not None else cache_root()
    final = base / kind / content_hash(inputs)
    if (final / _DONE).exists():
        return final
    tmp = base / kind / f".{final.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        (tmp / _DONE).write_text(json.dumps(inputs, sort_keys=True, indent=2, default=str))
        if final.exists() and not (final / _DONE).exists():   # an incomplete leftover from an older layout
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:                      # a concurrent builder renamed its complete folder first
            if not (final / _DONE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
