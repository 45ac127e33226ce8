"""Run untrusted (model-written) Python programs in a separate, limited process (HumanEval checks and pass@k on
top of it: :mod:`tokenpo.evaluation.code`).

Every program gets a fresh `python -I` interpreter in its own process, started through a small launcher and watched
by a supervisor that reports the program's exact exit status and CPU time on a private pipe
(`_sandbox_launcher.py` has the details):

* **an honest verdict**: the program runs under a small wrapper that reads a secret random token from a private
  descriptor before any of the program's code runs, and writes it back on a private pipe only after the program
  (for HumanEval: up to and including `check(entry_point)`) returned normally. A run passes only when the harness
  gets that exact token *and* the process then exits with status 0: `sys.exit(0)`, `os._exit(0)`, an `atexit`
  hook, a swallowing `sys.excepthook`, printed markers, patched builtins, killing the supervisor or scribbling on
  inherited file descriptors all end without the token, and fail;
* **limits** (`resource.setrlimit`, set just before exec): CPU time, address space (memory), number of processes
  (RLIMIT_NPROC), size of any written file, open files, no core dumps; plus a wall-clock limit and a bound on
  captured stdout/stderr enforced by the harness, which kills on overrun;
* **namespaces** (when the machine allows, see `isolation()`): the program runs under `unshare` in new network
  (no interface is up, so no connection anywhere, loopback included), PID (the program sees and can signal only
  its own processes; when the supervisor, PID 1, exits, everything the program forked dies with it), IPC, UTS and
  mount namespaces. In the mount namespace every existing mount is read-only (but /proc and /dev); `/tmp`,
  `/var/tmp`, `/dev/shm`, `/run/lock` (and `/dev/mqueue`) are private size-bounded tmpfs mounts (the interpreter's
  own folders, should it live under one of them, are bound back in read-only), and the working directory is a
  tmpfs of `max_disk_bytes` (the disk quota: a program that fills it gets ENOSPC, status "disk_limit", and it all
  vanishes with the namespace);
* **a seccomp filter** in every mode: no AF_UNIX socket (no Unix-socket file or abstract socket of the host is
  reachable; stream socketpairs still work), no io_uring, and without a network namespace no socket at all;
* **as root** (CI): the program is dropped to an unprivileged uid/gid (default 65534, nobody; supplementary groups
  cleared, every capability dropped) — root ignores RLIMIT_NPROC and may write anywhere;
* a fresh temporary working directory (removed afterwards), closed stdin, a minimal environment, a new session.

The interpreter is the first of this Python, /usr/bin/python3, ... that the sandbox uid can execute (a pyenv
Python under /root is out of its reach), so programs should need only the standard library, as HumanEval's do.

Without namespaces (`isolation().mode == "rlimits-only"`) the limits, the seccomp filter, the uid drop (as root),
the temporary directory and a supervisor that is a child subreaper remain: a program's setsid/double-forked
daemons are still killed when it ends, TCP to 127.0.0.1 is refused by the filter, and the working directory is
bounded by RLIMIT_FSIZE per file plus a watchdog on its total size. What is weaker — the host's /tmp & co. are
shared, the machine's processes are visible — is listed on every result, `SandboxResult.weaker_isolation`
(empty when nothing is): `isolation()` takes a level only if all of it works, and a weaker one never silently.

The wrapper also compiles each part of a program on its own (`run_python(..., then=[...])`; HumanEval checks use
it, so a completion cannot reach into the test's syntax, e.g. with a trailing decorator on `def check`), runs the
later parts (the tests) with the builtins as they were before the program ran (a patched `abs` or `isinstance`
does not reach them), and, via an audit hook, refuses `sys.settrace`/`sys.setprofile` (a trace function could
jump over a test's asserts) and swapping a function's `__code__`.

Limits of the verdict: the wrapper runs in the program's own interpreter, so a program that deliberately digs the
token out of its interpreter's memory (frames, `gc`, `ctypes`) or otherwise rewrites the running test (patching
a module the test imports, e.g. `math.isclose`, or a helper of the prompt the test calls; racing a thread against
it; poking interpreter memory with ctypes), or returns an object whose `__eq__` is always true, can still forge a
pass — as with any in-process harness, OpenAI's included.
"""
from __future__ import annotations

import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence


STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "disk_limit", "killed", "crashed")
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
_LAUNCH_ERROR_CODE = 86  # exit status of the launcher when it could not set the sandbox up
_COVERED = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")  # private tmpfs in the isolating modes
_DISK_ERRORS = ("[Errno 28]", "[Errno 27]", "No space left on device", "File too large")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. `cpu_time=None` means `ceil(wall_time) + 1` seconds."""

    wall_time: float = 5.0
    cpu_time: float | None = None
    memory_bytes: int = 1 << 30          # address space; Python itself needs ~30 MB
    max_processes: int = 32              # RLIMIT_NPROC: processes/threads of the sandbox uid
    max_output_bytes: int = 1 << 20      # stdout and stderr each; the run is killed beyond it
    max_file_bytes: int = 16 << 20       # largest file it may write (RLIMIT_FSIZE, at most max_disk_bytes)
    max_open_files: int = 128
    tmpfs_bytes: int = 64 << 20          # size of each private /tmp-like mount (isolating modes)
    max_disk_bytes: int = 64 << 20       # quota of the working directory (a tmpfs; in the fallback a watchdog)


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
    weaker_isolation: tuple[str, ...] = ()  # how this run's isolation fell short of the full one; () when it did not

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
    private_tmp: bool         # private /tmp & co., read-only system, tmpfs working directory (isolating modes)
    uid: int | None           # uid the program runs as when the harness is root, else None (unchanged)
    python: str               # interpreter that runs the programs (one the sandbox uid can execute)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def weaknesses(self) -> tuple[str, ...]:
        """How this configuration falls short of the full isolation (root or user namespaces with private mounts);
        every `SandboxResult` carries these (plus what failed in that run) as `weaker_isolation`."""
        out = []
        if self.mode == "rlimits-only":
            out.append("limits-only fallback: no namespaces")
        if not self.pid_namespace:
            out.append("no PID namespace: the program sees the machine's processes and can signal those of its uid "
                       "(other sandboxed runs included); its leftover processes are killed by the supervisor")
        if not self.network_namespace:
            out.append("no network namespace: a seccomp filter refuses every socket instead")
        if not self.private_tmp:
            out.append("no private mounts: the host's /tmp, /var/tmp, /dev/shm, /run/lock are shared (writable "
                       "where world-writable), the system is not read-only, and the working directory is bounded "
                       "by RLIMIT_FSIZE per file plus a watchdog on its total size, not a quota")
        if self.uid is None and self.mode != "user-namespaces":
            out.append("the program runs as the harness's own user")
        return tuple(out)


# run as `python -I -S -c <source>`: see that file for the stages (setup, supervise)
_LAUNCHER = (Path(__file__).parent / "_sandbox_launcher.py").read_text(encoding="utf-8")

# run as `python -I -c <this> <bundle fd> <verdict fd>` in the working directory, as the sandbox uid. The bundle
# (an unlinked, root-only file: nothing on disk that another run of the same uid could rewrite) holds the token and
# the program's parts. It compiles every part (each on its own, so one part cannot change how the next parses, and
# all before any runs), runs them in order as __main__ (file names main.py, main.then1.py, ...: the copies in the
# working directory serve tracebacks and `inspect`), and writes the token back only when the last one returned
# normally. Everything it uses afterwards is bound before the program runs (patched builtins or `os` functions
# cannot reach it), and the later parts (the tests) run with a copy of the builtins taken before the program ran.
_WRAPPER = r'''
def _tokenpo_sandbox(bundle_fd, verdict_fd):
    import json, os, sys
    write, close, read = os.write, os.close, os.read
    try:  # not dumpable: other processes of this uid cannot read this one's memory or open its descriptors
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass
    data = b""
    while True:
        chunk = read(bundle_fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    close(bundle_fd)
    bundle = json.loads(data.decode("utf-8"))
    token = bundle["token"].encode()
    cwd = os.getcwd()
    codes = [compile(text, os.path.join(cwd, name), "exec", dont_inherit=True, optimize=0)  # asserts stay
             for name, text in bundle["parts"]]
    namespace = sys.modules["__main__"].__dict__
    builtins = namespace["__builtins__"]
    namespace.clear()
    namespace.update({"__name__": "__main__", "__doc__": None, "__package__": None, "__loader__": None,
                      "__spec__": None, "__file__": codes[0].co_filename, "__cached__": None,
                      "__builtins__": builtins})
    sys.argv[:] = [bundle["parts"][0][0]]

    def refuse(event, args, blocked=frozenset(("sys.settrace", "sys.setprofile", "sys.monitoring.register_callback")),
               error=RuntimeError):
        # no trace or profile function (one could jump over a test's asserts), and no swapping a function's code
        if event in blocked or (event == "object.__setattr__" and args[1:2] == ("__code__",)):
            raise error(event + " is disabled in the sandbox")

    sys.addaudithook(refuse)
    run, pristine = exec, dict(builtins.__dict__)  # the builtins as they are before the program runs
    del json, os, sys, data, chunk, bundle, cwd, builtins, refuse
    run(codes[0], namespace)
    for code in codes[1:]:  # later parts (the tests) see the pristine builtins, not what the program patched
        namespace["__builtins__"] = pristine
        run(code, namespace)
    write(verdict_fd, token)
    close(verdict_fd)


_tokenpo_sandbox(int(__import__("sys").argv[1]), int(__import__("sys").argv[2]))
'''


def _unshare_prefix(mode: str) -> list[str]:
    exe = shutil.which("unshare") or "unshare"
    prefix = [exe, "--net", "--pid", "--ipc", "--uts", "--mount-proc", "--kill-child"]
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


def _covered() -> list[str]:
    """The private-tmpfs folders of this machine (real paths, existing, no duplicates)."""
    found = []
    for d in _COVERED:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in found:
            found.append(real)
    return found


_PATHS_SNIPPET = ("import json, sys\nprint(json.dumps([sys.executable, sys.prefix, sys.exec_prefix, sys.base_prefix,"
                  " sys.base_exec_prefix] + sys.path))")


@functools.lru_cache(maxsize=None)
def _interpreter_keep(python: str) -> tuple[str, ...]:
    """What of `python`'s installation lies under a private-tmpfs folder and must be bound back in (read-only) for
    it to run there. Raises ValueError when that cannot be done (it lives directly in such a folder)."""
    try:
        out = subprocess.run([python, "-I", "-c", _PATHS_SNIPPET], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        paths = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise ValueError(f"cannot ask {python} for its installation paths: {exc}") from None
    covered = _covered()
    exe = os.path.abspath(python)
    keep: list[str] = []
    for path in [exe, os.path.realpath(exe)] + [os.path.abspath(p) for p in paths if p]:
        if not os.path.exists(path):
            continue
        for root in covered:
            if path == root:
                raise ValueError(f"{python} needs {root} itself, which the sandbox makes private")
            if path.startswith(root + "/"):
                if os.path.isfile(path):  # an interpreter file: its folder, or itself when that is the root
                    parent = os.path.dirname(path)
                    path = parent if parent != root else path
                keep.append(path)
    keep = sorted(set(keep))
    return tuple(p for p in keep if not any(p.startswith(q + "/") for q in keep if q != p))


def _launch(python: str, workdir: str, limits: SandboxLimits, iso: Isolation, fds: dict[str, int]):
    nproc = limits.max_processes
    if iso.uid is None and os.geteuid() != 0:
        nproc += _count_tasks_of_uid(os.geteuid())  # RLIMIT_NPROC counts all of the user's tasks
    rlimits = {
        # SIGXCPU at the limit (unambiguous: rusage may lag the kernel's own count), SIGKILL a second later
        "RLIMIT_CPU": [_cpu_limit(limits), _cpu_limit(limits) + 1],
        "RLIMIT_AS": int(limits.memory_bytes),
        "RLIMIT_FSIZE": int(min(limits.max_file_bytes, limits.max_disk_bytes)),
        "RLIMIT_NOFILE": int(limits.max_open_files),
        "RLIMIT_NPROC": int(nproc),  # binds once the program runs as the sandbox uid (root ignores it)
        "RLIMIT_CORE": 0,
    }
    argv = [python, "-I", "-c", _WRAPPER, str(fds["token_fd"]), str(fds["verdict_fd"])]
    cfg = {"stage": "setup", "workdir": workdir, "private": iso.private_tmp, "covered": _covered(),
           "keep": list(_interpreter_keep(python)) if iso.private_tmp else [],
           "tmpfs_bytes": int(limits.tmpfs_bytes), "disk_bytes": int(limits.max_disk_bytes),
           "rlimits": rlimits, "argv": argv, "uid": iso.uid, **fds, "code": _LAUNCHER,
           "allow_inet": iso.network_namespace, "pid_namespace": iso.pid_namespace,
           "launch_error_code": _LAUNCH_ERROR_CODE,
           "prefix": [] if iso.mode == "rlimits-only" else _unshare_prefix(iso.mode)}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=workdir, env=env, start_new_session=True, pass_fds=tuple(fds.values()))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _disk_usage(root: str, max_entries: int = 20000) -> int:
    """Bytes allocated under `root` (the fallback's watchdog); beyond `max_entries` files, or unreadable folders,
    counts as unbounded."""
    total, entries, todo = 0, 0, [root]
    while todo:
        try:
            with os.scandir(todo.pop()) as it:
                for entry in it:
                    entries += 1
                    st = entry.stat(follow_symlinks=False)
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
        except FileNotFoundError:
            continue
        except OSError:
            return 1 << 62
        if entries > max_entries:
            return 1 << 62
    return total


@dataclass
class _Outcome:
    wait_status: int | None      # the program's own wait status, from the supervisor; None if it never reported
    launcher_code: int           # exit code of the launcher (unshare) process
    stdout: bytes
    stderr: bytes
    why_killed: str | None       # "timeout" | "output_limit" | "disk_limit" when the harness killed the run
    wall: float
    cpu: float
    completed: bool = False      # the wrapper wrote back the token: the program's code ran to its end
    facts: dict = field(default_factory=dict)  # what the supervisor reports about the isolation in force


def _stop(proc: subprocess.Popen, iso: Isolation) -> tuple[bool, int]:
    """End a run early. Without a PID namespace the supervisor gets SIGTERM first, to kill the program's whole
    process tree (setsid daemons included); the launcher's process group gets SIGKILL in any case."""
    if iso.mode == "rlimits-only":
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                _kill_group(proc.pid)
                return True, status
            time.sleep(0.005)
    _kill_group(proc.pid)
    return False, 0


def _run(python: str, workdir: str, limits: SandboxLimits, iso: Isolation, parts: Mapping[str, str]) -> _Outcome:
    """Run the program made of `parts` (file name -> source, in order; also written to `workdir`)."""
    start = time.monotonic()
    deadline = start + limits.wall_time
    token = secrets.token_hex(16)
    status_read, status_write = os.pipe()
    verdict_read, verdict_write = os.pipe()
    with tempfile.TemporaryFile() as bundle:  # unlinked, 0600 of the harness's user
        bundle.write(json.dumps({"token": token, "parts": list(parts.items())}).encode("utf-8"))
        bundle.flush()
        bundle.seek(0)
        try:
            proc = _launch(python, workdir, limits, iso,
                           {"status_fd": status_write, "token_fd": bundle.fileno(), "verdict_fd": verdict_write})
        finally:
            for fd in (status_write, verdict_write):
                os.close(fd)
    watch_disk = not iso.private_tmp  # with private mounts the working directory is a size-bounded tmpfs
    next_disk_check = start + 0.05
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    why_killed = status = None
    with selectors.DefaultSelector() as sel:
        for stream in (proc.stdout, proc.stderr):
            sel.register(stream.fileno(), selectors.EVENT_READ)
        exited = False
        while why_killed is None:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                why_killed = "timeout"
                break
            if watch_disk and now >= next_disk_check:
                next_disk_check = now + 0.05
                if _disk_usage(workdir) > limits.max_disk_bytes:
                    why_killed = "disk_limit"
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
    if why_killed and not exited:
        exited, status = _stop(proc, iso)
    _kill_group(proc.pid)  # always: also clears stragglers of a finished program in rlimits-only mode
    if not exited:
        _, status, _ = os.wait4(proc.pid, 0)
    if watch_disk and why_killed is None and _disk_usage(workdir) > limits.max_disk_bytes:
        why_killed = "disk_limit"  # written between two looks of the watchdog
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = (bytes(b) for b in buffers.values())
    proc.stdout.close()
    proc.stderr.close()
    report, verdict = _read_nonblocking(status_read), _read_nonblocking(verdict_read)
    try:
        facts = json.loads(report.decode())
        wait_status, cpu = int(facts.pop("wait")), float(facts.pop("cpu"))
    except (ValueError, KeyError, TypeError, AttributeError):
        facts, wait_status, cpu = {}, None, 0.0
    return _Outcome(wait_status, proc.returncode, out, err, why_killed, time.monotonic() - start, cpu,
                    completed=secrets.compare_digest(verdict, token.encode()), facts=facts)


def _read_nonblocking(fd: int, size: int = 1 << 16) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return b""
    finally:
        os.close(fd)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _classify(outcome: _Outcome, stderr: str, cpu_limit: int) -> tuple[str, int | None, str]:
    """(status, signal, message) of a finished run."""
    if outcome.why_killed == "output_limit":
        return "output_limit", None, "output exceeded the limit"
    if outcome.why_killed == "timeout":
        return "timeout", None, "wall-clock limit exceeded"
    if outcome.why_killed == "disk_limit":
        return "disk_limit", None, "disk quota of the working directory exceeded"
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
            return "disk_limit", sig, f"file-size limit exceeded ({name})"
        return "killed", sig, f"killed by {name}"
    if code == 0:
        if outcome.completed:
            return "passed", None, ""
        return "failed", None, ("exit status 0 before the program ran to completion (sys.exit, os._exit, an atexit "
                                "hook or a lost completion report)" + (f": {last}" if last else ""))
    if code == _LAUNCH_ERROR_CODE and last.startswith("sandbox launcher:"):
        return "crashed", None, last
    if any(marker in last for marker in _DISK_ERRORS):
        return "disk_limit", None, last
    if "Traceback (most recent call last)" in stderr:
        if last.split(":", 1)[0].strip() == "MemoryError":
            return "memory", None, last
        return "failed", None, last
    if "Fatal Python error" in stderr:
        return "crashed", None, last
    return "failed", None, f"exit status {code}" + (f": {last}" if last else "")


def _weaker(iso: Isolation, facts: dict) -> tuple[str, ...]:
    """The configuration's weaknesses plus what did not take effect in this run (from the supervisor)."""
    out = list(iso.weaknesses())
    if facts:
        if facts.get("seccomp") is not True:
            out.append(f"no seccomp filter ({facts.get('seccomp')}): Unix-socket files and abstract sockets of "
                       "the host are reachable")
            if not iso.network_namespace:
                out.append("network reachable: neither a network namespace nor a seccomp filter")
        if iso.private_tmp and not facts.get("private"):
            out.append("private mounts missing")
        if facts.get("readonly_failed"):
            out.append("left writable (read-only remount failed): " + ", ".join(facts["readonly_failed"]))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """Probe (once) the strongest isolation that works here, by actually running a program under each level, and
    an interpreter the sandbox user can execute (a pyenv Python under /root is out of reach for uid 65534).
    A level is taken only if all of it works (private mounts included); what the chosen one lacks is in
    `Isolation.weaknesses()` and on every result. With TOKENPO_SANDBOX_REQUIRE_FULL=1 in the environment a weaker
    level is an error instead (RuntimeError, with the reasons)."""
    notes = []
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    uid = int(os.environ.get("TOKENPO_SANDBOX_UID", "65534")) if is_root else None
    candidates: list[Isolation] = []
    if shutil.which("unshare"):
        if is_root:
            candidates.append(Isolation("root-namespaces", True, True, True, uid, ""))
        else:  # as root a user namespace maps root to itself, and root ignores RLIMIT_NPROC: not offered then
            candidates.append(Isolation("user-namespaces", True, True, True, None, ""))
            candidates.append(Isolation("user-namespaces", True, True, False, None, ""))  # says so: weaknesses()
    else:
        notes.append("no `unshare` executable")
    candidates.append(Isolation("rlimits-only", False, False, False, uid, ""))
    for cand in candidates:
        for python in _python_candidates():
            ok, why = _probe(replace(cand, python=python))
            if ok:
                chosen = replace(cand, python=python, notes=tuple(notes))
                if chosen.weaknesses() and os.environ.get("TOKENPO_SANDBOX_REQUIRE_FULL", "") not in ("", "0"):
                    raise RuntimeError(f"sandbox isolation is weaker than required ({chosen.mode}): "
                                       + "; ".join(chosen.weaknesses() + chosen.notes))
                return chosen
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
for path in {markers!r}:
    with open(path, "w") as f:
        f.write("probe")
print(os.getuid())
"""


def _probe(cand: Isolation) -> tuple[bool, str]:
    markers = []
    if cand.private_tmp:
        try:
            _interpreter_keep(cand.python)
        except ValueError as exc:
            return False, str(exc)
        tag = secrets.token_hex(8)
        markers = [os.path.join(d, f"tokenpo-probe-{tag}") for d in _covered()]
    workdir = _make_workdir(cand)
    try:
        program = _PROBE_PROGRAM.format(net=cand.network_namespace, pid=cand.pid_namespace, markers=markers)
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(program)
        outcome = _run(cand.python, workdir, SandboxLimits(wall_time=10.0), cand, {"main.py": program})
        out, err = outcome.stdout.decode(errors="replace"), outcome.stderr.decode(errors="replace")
        leaked = [m for m in markers if os.path.lexists(m)]
        for m in leaked:
            os.unlink(m)
        if outcome.wait_status != 0 or outcome.why_killed or not outcome.completed:
            return False, _last_line(err) or f"exit status {outcome.launcher_code}"
        if leaked:
            return False, f"private mounts not effective: {leaked[0]} reached the host"
        if cand.uid is not None and out.strip() != str(cand.uid):
            return False, f"runs as uid {out.strip()}"
        return True, ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _make_workdir(iso: Isolation) -> str:
    workdir = tempfile.mkdtemp(prefix="tokenpo-sandbox-", dir=_sandbox_base())
    if iso.uid is not None and not iso.private_tmp:  # else the supervisor copies it into a tmpfs of the uid
        os.chown(workdir, iso.uid, iso.uid)
    return workdir


def run_python(source: str, limits: SandboxLimits | None = None, *, files: Mapping[str, str] | None = None,
               python: str | None = None, task_id: str | None = None, then: Sequence[str] = ()) -> SandboxResult:
    """Run `source` as `main.py` in a fresh temporary directory under the sandbox; never raises for the program's
    behaviour (only for a broken harness). `files` are extra text files written beside it. `then` are more parts
    of the program (e.g. its tests), run after it in the same `__main__` namespace but each compiled on its own,
    so `source` cannot change how they parse (a trailing decorator or open bracket cannot swallow them), and with
    the builtins as they were before `source` ran. The
    result is "passed" only if every part ran to its end (see the module docstring) and the process exited 0."""
    limits = limits or SandboxLimits()
    iso = isolation()
    python = python or iso.python
    if iso.private_tmp:
        _interpreter_keep(python)  # raises ValueError for an interpreter that cannot run with private mounts
    parts = {"main.py": source, **{f"main.then{i}.py": text for i, text in enumerate(then, 1)}}
    workdir = _make_workdir(iso)
    try:
        for name, text in {**(files or {}), **parts}.items():
            path = os.path.join(workdir, name)
            if os.path.dirname(os.path.abspath(path)) != workdir:
                raise ValueError(f"sandbox file name {name!r} must be a plain file name")
            if files and name in files and name in parts:
                raise ValueError(f"sandbox file name {name!r} is reserved for the program")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        outcome = _run(python, workdir, limits, iso, parts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stdout = outcome.stdout.decode("utf-8", errors="replace")
    stderr = outcome.stderr.decode("utf-8", errors="replace")
    status, sig, message = _classify(outcome, stderr, _cpu_limit(limits))
    code = None if outcome.wait_status is None else os.waitstatus_to_exitcode(outcome.wait_status)
    return SandboxResult(status, message, code, sig, stdout, stderr, outcome.wall, outcome.cpu, iso.mode, task_id,
                         _weaker(iso, outcome.facts))
