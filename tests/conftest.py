"""Fixtures and helpers shared by several test modules."""
import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is much faster than two on a shared CPU (use with `usefixtures`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def unreachable_registry(monkeypatch):
    """pip sees only an index nobody listens on: no pip.conf (which adds local indexes here), no find-links."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)


def processes_with_cmdline(marker: bytes) -> list[int]:
    """Ids of the live processes whose command line contains `marker` (sandbox escape checks)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if marker in f.read():
                        found.append(int(entry.name))
            except OSError:
                continue
    return found
