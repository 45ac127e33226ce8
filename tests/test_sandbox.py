"""The sandbox stops and classifies hostile programs, and the harness (this test process) survives them."""
from __future__ import annotations

import math
import os
import re
import socket
import time
from itertools import combinations

import numpy as np
import pytest

from conftest import processes_with_cmdline
from tokenpo.evaluation import code as code_eval
from tokenpo.evaluation import sandbox
from tokenpo.evaluation.code import estimate_pass_at_k, pass_at_k
from tokenpo.evaluation.sandbox import SandboxLimits, run_python

TIGHT = SandboxLimits(wall_time=2.0, cpu_time=2.0, memory_bytes=512 << 20, max_processes=16,
                      max_output_bytes=1 << 20)


@pytest.fixture(scope="module")
def iso():
    return sandbox.isolation()


def test_isolation_is_strong_when_root(iso):
    if os.geteuid() != 0:
        pytest.skip("uid drop and namespaces as root are what CI uses; this process is not root")
    assert iso.uid == 65534, iso
    assert iso.mode == "root-namespaces", iso.notes
    assert iso.network_namespace and iso.pid_namespace


def test_passing_and_failing_programs_are_classified():
    ok = run_python("print('hello')", TIGHT)
    assert ok.status == "passed" and ok.stdout == "hello\n" and ok.passed
    err = run_python("assert 1 + 1 == 3, 'arithmetic is broken'", TIGHT)
    assert err.status == "failed" and err.message == "AssertionError: arithmetic is broken"
    exc = run_python("def f():\n    return undefined_name\nf()", TIGHT)
    assert exc.status == "failed" and exc.message.startswith("NameError")
    code = run_python("import sys; sys.exit(3)", TIGHT)
    assert code.status == "failed" and code.returncode == 3
    segv = run_python("import ctypes; ctypes.string_at(0)", TIGHT)
    assert segv.status == "crashed" and segv.message == "killed by SIGSEGV"


def test_infinite_loop_times_out():
    res = run_python("while True:\n    pass", SandboxLimits(wall_time=1.0, cpu_time=3.0))
    assert res.status == "timeout" and res.wall_time < 3.0
    cpu = run_python("while True:\n    pass", SandboxLimits(wall_time=10.0, cpu_time=1.0))
    assert cpu.status == "timeout" and "CPU" in cpu.message and cpu.wall_time < 5.0


def test_fork_loop_is_bounded_and_cleaned_up(iso):
    # at most 5,000 forks in the program itself, so a broken sandbox cannot take the machine down; each child
    # becomes `sleep 100.<our pid>`, a command line we can look for afterwards
    marker = f"100.{os.getpid()}"
    program = (
        "import os\n"
        "children = 0\n"
        "for _ in range(5000):\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
        "    children += 1\n"
        "print(children)\n"
    )
    res = run_python(program, TIGHT)
    assert res.status in {"failed", "killed", "timeout"}, res
    if iso.uid is not None or iso.mode == "user-namespaces":
        assert res.status == "failed" and "BlockingIOError" in res.message, res  # RLIMIT_NPROC bound
    deadline = time.monotonic() + 3.0
    while (left := processes_with_cmdline(b"sleep\x00" + marker.encode())) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left and not iso.pid_namespace:
        for pid in left:  # without a PID namespace stragglers are possible: clean up, then report
            os.kill(pid, 9)
    assert not left, f"{len(left)} forked children outlived the sandbox"


def test_huge_allocation_is_a_memory_error():
    res = run_python("block = bytearray(10 * 1024 ** 3)\nprint(len(block))", TIGHT)
    assert res.status == "memory", res
    assert res.stdout == ""


def test_writes_stay_inside_the_sandbox_directory(tmp_path, iso):
    if iso.uid is None:
        pytest.skip(f"filesystem protection needs the uid drop of root mode; isolation here: {iso.mode}")
    target = tmp_path / "outside.txt"
    marker = f"/tmp/tokenpo-sandbox-escape-{os.getpid()}"
    program = (
        "import os\n"
        "open('inside.txt', 'w').write('fine')\n"
        "assert os.path.exists('inside.txt')\n"
        f"try:\n    open({marker!r}, 'w').write('tmp')\nexcept OSError:\n    pass\n"
        f"open({str(target)!r}, 'w').write('pwned')\n"
    )
    res = run_python(program, TIGHT)
    # denied to the sandbox uid, or not even visible (pytest's tmp_path lies under the host's /tmp)
    assert res.status == "failed" and re.match(r"(PermissionError|FileNotFoundError)", res.message), res
    assert not target.exists()
    if iso.private_tmp:
        assert not os.path.exists(marker), "a write to /tmp reached the host's /tmp"
    else:
        if os.path.exists(marker):
            os.unlink(marker)


def test_network_is_unreachable(iso):
    if not iso.network_namespace:
        pytest.skip(f"no network namespace here ({iso.mode})")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            f"conn = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "conn.sendall(b'exfiltrate')\n"
        )
        res = run_python(program, TIGHT)
        assert res.status == "failed" and re.search(r"OSError|ConnectionRefused|timed out", res.message), res
        with pytest.raises(BlockingIOError):
            server.accept()


def test_killing_the_parent_leaves_the_harness_alive(iso):
    me = os.getpid()
    attempts = ["os.kill(os.getppid(), signal.SIGKILL)", "os.kill(-1, signal.SIGKILL)"]
    if iso.uid is not None or iso.pid_namespace:
        attempts.append(f"os.kill({me}, signal.SIGKILL)")  # the harness's own pid, seen from outside
    for attempt in attempts:
        program = f"import os, signal\ntry:\n    {attempt}\nexcept OSError as exc:\n    print(type(exc).__name__)\n"
        res = run_python(program, TIGHT)
        assert res.status in {"passed", "killed", "failed"}, res
        if iso.pid_namespace:  # nothing outside the namespace is visible, the supervisor (pid 1) is root's
            assert res.passed and res.stdout.split() in (["PermissionError"], ["ProcessLookupError"]), res
    assert os.getpid() == me  # still here: a SIGKILL would have ended this test process
    assert run_python("print(1)", TIGHT).passed  # and the sandbox still works


def test_endless_output_is_cut_off():
    res = run_python("import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()", TIGHT)
    assert res.status == "output_limit", res
    assert len(res.stdout) <= TIGHT.max_output_bytes
    chatty = run_python("while True:\n    print('spam' * 100)", TIGHT)
    assert chatty.status == "output_limit"


def test_working_directory_is_removed():
    res = run_python("import os\nprint(os.getcwd())", TIGHT)
    assert res.passed and not os.path.exists(res.stdout.strip())


# --------------------------------------------------------------------------------------------------------- pass@k

def _closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (10, 8, 5), (200, 17, 10), (5, 5, 5),
                                   (100, 1, 100), (7, 2, 3)])
def test_pass_at_k_matches_closed_form(n, c, k):
    assert estimate_pass_at_k(n, c, k)[0] == pytest.approx(_closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_aggregates_tasks():
    results = {"a": [True, False, False, False], "b": [True, True, False, True], "c": [False] * 4}
    got = pass_at_k(results, ks=(1, 2, 4, 8))
    assert set(got) == {"pass@1", "pass@2", "pass@4"}  # 8 > samples per task: left out
    assert got["pass@1"] == pytest.approx((1 / 4 + 3 / 4 + 0) / 3)
    assert got["pass@2"] == pytest.approx((_closed_form(4, 1, 2) + _closed_form(4, 3, 2) + 0) / 3)
    assert got["pass@4"] == pytest.approx(2 / 3)
    # pass@k is the chance that at least one of k draws without replacement is correct: check by enumeration
    outcomes = results["a"]
    draws = list(combinations(range(4), 2))
    assert np.mean([any(outcomes[i] for i in d) for d in draws]) == pytest.approx(_closed_form(4, 1, 2))
    with pytest.raises(ValueError):
        estimate_pass_at_k(3, 4, 1)


# ------------------------------------------------------------------------------------------------------ HumanEval

def _humaneval_problems() -> dict:
    try:
        from tokenpo.data import load_humaneval
        from tokenpo.data.sources import SourceUnavailableError
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"tokenpo.data.load_humaneval is not available: {exc}")
    try:
        problems = load_humaneval()
    except SourceUnavailableError as exc:
        pytest.skip(f"HumanEval could not be fetched: {exc}")
    if not isinstance(problems, dict):
        problems = {p["task_id"]: p for p in problems}
    assert len(problems) == 164
    return problems


def _return_none(solution: str) -> str:
    return re.sub(r"^(\s*)return\b.*$", r"\1return None", solution, flags=re.MULTILINE)


def test_humaneval_canonical_pass_and_mutants_fail():
    problems = _humaneval_problems()
    ids = [f"HumanEval/{i}" for i in range(0, 160, 16)]  # 10 problems spread over the set
    samples = [(t, problems[t]["canonical_solution"]) for t in ids]
    samples += [(t, _return_none(problems[t]["canonical_solution"])) for t in ids]
    results = code_eval.check_completions(problems, samples, timeout=5.0, workers=2)
    canonical, mutated = results[: len(ids)], results[len(ids):]
    assert all(r.passed for r in canonical), [(r.task_id, r.message) for r in canonical if not r.passed]
    assert not any(r.passed for r in mutated), [r.task_id for r in mutated if r.passed]
    assert all(r.status == "failed" for r in mutated)
    by_task = {}
    for r in results:
        by_task.setdefault(r.task_id, []).append(r)
    assert pass_at_k(by_task, ks=(1, 2)) == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1.0)}


def test_fallback_without_namespaces_still_limits_and_classifies(monkeypatch, iso):
    """Where namespaces are unavailable the launcher alone applies the limits (and the uid drop as root)."""
    fallback = sandbox.Isolation("rlimits-only", False, False, False, iso.uid, iso.python)
    monkeypatch.setattr(sandbox, "isolation", lambda: fallback)
    assert run_python("import os\nprint(os.getuid())", TIGHT).stdout.strip() == str(os.getuid() if iso.uid is None
                                                                                     else iso.uid)
    assert run_python("while True:\n    pass", SandboxLimits(wall_time=1.0)).status == "timeout"
    assert run_python("x = bytearray(10 * 1024 ** 3)", TIGHT).status == "memory"
    assert run_python("print('x' * 5_000_000)", TIGHT).status == "output_limit"
    killer = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", TIGHT)
    assert killer.status in {"crashed", "killed", "failed", "passed"}  # the supervisor may die; we do not
    assert run_python("assert False, 'no'", TIGHT).message == "AssertionError: no"
