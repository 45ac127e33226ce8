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
    and nothing is cached. The inputs are stored beside the output as `.complete.json`, for provenance.
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
        if final.exists():  # an incomplete leftover from an older layout, or a concurrent builder won
            if (final / _DONE).exists():
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
