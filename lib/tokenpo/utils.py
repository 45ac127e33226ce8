"""Small helpers every module shares: seeding and the record of package versions."""
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
