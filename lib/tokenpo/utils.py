"""Small helpers every module shares: seeding, package versions, PEFT unwrapping, a tokenizer's pad id, process
memory."""
from __future__ import annotations

import os
import platform
import random
import sys
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch (all devices); optionally ask PyTorch for deterministic kernels.

    The same seed on the same machine and package versions gives the same numbers.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede CUDA initialisation
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def package_versions(names: tuple[str, ...] = ("tokenpo", "torch", "transformers", "tokenizers", "datasets",
                                                 "accelerate", "peft", "numpy")) -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def is_peft(model: torch.nn.Module) -> bool:
    """A PEFT-wrapped model (adapters that can be disabled)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The 🤗 `PreTrainedModel` inside a PEFT wrapper (LoRA layers stay injected, so adapter state is respected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is masked out anyway)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad


def memory_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc/self/status (Linux). The peak is the
    process's own high-water mark (VmHWM), which `reset_peak_memory` restarts. (getrusage's ru_maxrss is no use in a
    child process: it keeps the parent's size from the fork.)"""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_memory() -> None:
    """Restart this process's peak resident set size at its current size (Linux ≥ 4.0: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
