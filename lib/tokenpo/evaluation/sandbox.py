"""Run untrusted (model-written) Python programs in a separate, limited process (HumanEval checks and pass@k on
top of it: :mod:`tokenpo.evaluation.code`).

Every program gets a fresh `python -I` interpreter in its own process, started through a small launcher and watched
by a supervisor that reports the program's exact exit status and CPU time on a private pipe:

* **limits** (`resource.setrlimit`, set by the launcher before anything untrusted runs): CPU time, address space
  (memory), number of processes (RLIMIT_NPROC), size of any written file, open files, no core dumps; plus a
  wall-clock limit and a bound on captured stdout/stderr enforced by the harness, which kills on overrun;
* **namespaces** (when the machine allows, see `isolation()`): the program runs under `unshare` in new network
  (no interface is up, so no connection anywhere, loopback included), PID (the program sees and can signal only
  its own processes; when the supervisor, PID 1, exits, everything the program forked dies with it) and mount
  namespaces (a private `/proc`);
* **as root** (CI): the program is dropped to an unprivileged uid/gid (default 65534, nobody; supplementary groups
  cleared) — root ignores RLIMIT_NPROC and may write anywhere — and `/tmp`, `/var/tmp`, `/dev/shm` are replaced by
  private, size-bounded tmpfs mounts, so the only persistent place it can write to is its own working directory;
* a fresh temporary working directory (removed afterwards), closed stdin, a minimal environment, and a new session,
  so a timeout kills the whole process group.

The interpreter is the first of this Python, /usr/bin/python3, ... that the sandbox uid can execute (a pyenv
Python under /root is out of its reach), so programs should need only the standard library, as HumanEval's do.
Without root or user namespaces only the limits, the temporary directory and the process group remain (and, as
root, the uid drop); `isolation()` says which level is in force, `SandboxResult.isolation` records it per run.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping


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


# run as `python -I -S -c <source>`: see that file for the stages (setup, supervise)
_LAUNCHER = (Path(__file__).parent / "_sandbox_launcher.py").read_text(encoding="utf-8")


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
           "launch_error_code": _LAUNCH_ERROR_CODE,
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
