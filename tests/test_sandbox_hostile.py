"""Hostile programs against the sandbox's verdict, isolation and fallback mode (see the issue in sandbox.py's
docstring): a wrong answer never passes by ending early or faking the report; private /tmp-like folders, no host
Unix socket and a disk quota in every isolating mode; the limits-only fallback says so on every result, kills
daemons and keeps TCP off."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from conftest import processes_with_cmdline
from tokenpo.evaluation import sandbox
from tokenpo.evaluation.code import check_correctness
from tokenpo.evaluation.sandbox import SandboxLimits, run_python

TIGHT = SandboxLimits(wall_time=3.0, cpu_time=3.0, memory_bytes=512 << 20, max_processes=16,
                      max_output_bytes=1 << 20)
QUOTA = 8 << 20  # a small disk quota keeps the flood tests fast


@pytest.fixture(scope="module")
def iso():
    return sandbox.isolation()


@pytest.fixture
def fallback(monkeypatch, iso):
    """Force the limits-only mode (as on a machine without namespaces), as root with the uid drop when root."""
    forced = sandbox.Isolation("rlimits-only", False, False, False, iso.uid, iso.python)
    monkeypatch.setattr(sandbox, "isolation", lambda: forced)
    return forced


@pytest.fixture(params=["isolating", "fallback"])
def mode(request, iso):
    """Every test with this fixture runs in the strongest mode of this machine and in the forced fallback."""
    if request.param == "fallback":
        return request.getfixturevalue("fallback")
    if iso.mode == "rlimits-only":
        pytest.skip("no namespaces on this machine")
    return iso


# ------------------------------------------------------------------------------------------------ honest verdict

ADD = {"task_id": "toy/add", "prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
# the same check, written with an explicit `raise AssertionError` (a name looked up in builtins at run time)
ADD_RAISE = dict(ADD, task_id="toy/add-raise",
                 test="def check(candidate):\n    if candidate(2, 3) != 5:\n        raise AssertionError('wrong')\n")

WRONG = "    return a - b\n"
# each trick is a wrong answer that the old exit-status verdict scored "passed" (but patched_exec_skips_the_tests,
# which guards the new wrapper)
TRICKS = {
    "sys_exit_at_module_level": WRONG + "import sys\nsys.exit(0)\n",
    "os_exit_at_module_level": WRONG + "import os\nos._exit(0)\n",
    "system_exit_inside_check": "    raise SystemExit(0)\n",
    "sys_exit_inside_check": "    import sys\n    sys.exit()\n",
    "atexit_os_exit": WRONG + "import atexit, os\natexit.register(os._exit, 0)\n",
    "excepthook_swallows": WRONG + ("import sys, atexit, os\nsys.excepthook = lambda *exc: None\n"
                                    "atexit.register(os._exit, 0)\n"),
    "fake_success_marker": WRONG + ("import os, sys\nprint('passed')\nprint('0 0.000000')\n"
                                    "sys.stdout.flush()\nos.write(2, b'OK\\n')\nos._exit(0)\n"),
    "kill_parent_then_exit": WRONG + ("import os, signal\nfor pid in (os.getppid(), 1):\n    try:\n"
                                      "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                                      "os._exit(0)\n"),
    "write_and_close_inherited_fds": WRONG + (
        "import os\nfor fd in range(3, 256):\n    for fake in (b'0 0.000000\\n', b'passed\\n', b'\\x00' * 64):\n"
        "        try:\n            os.write(fd, fake)\n        except OSError:\n            pass\n"
        "os.closerange(3, 256)\nos._exit(0)\n"),
    "patched_builtins_and_os": WRONG + (
        "import builtins, os, sys\n"
        "for name in ('isinstance', 'BaseException', 'Exception', 'SystemExit', 'print', 'exit', 'quit', 'open',\n"
        "             'compile', 'exec', 'len', 'int'):\n"
        "    setattr(builtins, name, lambda *a, **k: True)\n"
        "real_exit = os._exit\n"
        "os.write = lambda *a: 0\nos.close = lambda *a: None\nos._exit = lambda *a: None\nsys.exit = lambda *a: None\n"
        "real_exit(0)\n"),
    # the harness's own loop over the program's parts must not look `exec` up in the (patched) builtins
    "patched_exec_skips_the_tests": WRONG + "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    # the completion's last line decorates the test's own `def check`: a no-op check "returns normally"
    "decorator_swallows_check": WRONG + "@lambda check: (lambda candidate: None)\n",
}


@pytest.mark.parametrize("trick", sorted(TRICKS))
def test_wrong_answer_cannot_fake_a_pass(trick):
    res = check_correctness(ADD, TRICKS[trick], timeout=3.0)
    assert not res.passed and res.status == "failed", res


def test_redefined_assertion_error_cannot_fake_a_pass():
    # `raise AssertionError(...)` in the test finds the program's replacement in builtins: a SystemExit(0)
    completion = WRONG + "import builtins\nbuiltins.AssertionError = lambda *a: SystemExit(0)\n"
    res = check_correctness(ADD_RAISE, completion, timeout=3.0)
    assert not res.passed and res.status == "failed", res


TRAILING = dict(ADD, task_id="toy/add-trailing", test=ADD["test"] + "    assert True\n")  # as many HumanEval tests
JUMP = """    import sys
    frame = sys._getframe(1)  # check's, which called us from its first assert
    target = frame.f_code.co_firstlineno + 3  # its last line, `assert True`
    def jump(f, event, arg):
        if event == "line" and f is frame and f.f_lineno < target:
            f.f_lineno = target
        return jump
    frame.f_trace = jump
    frame.f_trace_lines = True
    sys.settrace(lambda *a: None)  # tracing on, so frame.f_trace runs
    return 5 if (a, b) == (2, 3) else a - b
"""


def test_a_trace_hook_cannot_jump_over_the_asserts():
    # right for the first assert only; from inside it, a trace function jumps check to its last line
    res = check_correctness(TRAILING, JUMP, timeout=3.0)
    assert not res.passed and res.status == "failed", res


ABS = dict(ADD, task_id="toy/add-abs", test="def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n")
TYPE = {"task_id": "toy/name", "prompt": "def name():\n", "entry_point": "name",
        "test": "def check(candidate):\n    assert isinstance(candidate(), str)\n"}


@pytest.mark.parametrize("problem,completion", [
    (ABS, WRONG + "import builtins\nbuiltins.abs = lambda x: 0\n"),
    (TYPE, "    return 42\nimport builtins\nbuiltins.isinstance = lambda *a: True\n"),
], ids=["abs", "isinstance"])
def test_patched_builtins_do_not_reach_the_tests(problem, completion):
    res = check_correctness(problem, completion, timeout=3.0)
    assert not res.passed and res.status == "failed", res


def test_right_answers_pass_despite_noise():
    assert check_correctness(ADD, "    return a + b\n").passed
    # the tests completed: what the program does afterwards (hooks, prints, a patched exit) cannot fail it
    noisy = "    return a + b\nimport atexit, os, sys\nprint('FAILED')\natexit.register(os._exit, 0)\n"
    res = check_correctness(ADD, noisy)
    assert res.passed, res
    # the module ran as __main__, from main.py, with the usual globals
    main = "    return a + b\nassert __name__ == '__main__' and __file__.endswith('main.py'), (__name__, __file__)\n"
    assert check_correctness(ADD, main).passed


@pytest.mark.parametrize("trick", ["sys_exit_at_module_level", "os_exit_at_module_level", "atexit_os_exit",
                                   "write_and_close_inherited_fds"])
def test_wrong_answer_cannot_fake_a_pass_in_fallback(fallback, trick):
    res = check_correctness(ADD, TRICKS[trick], timeout=3.0)
    assert not res.passed and res.status == "failed", res
    assert check_correctness(ADD, "    return a + b\n").passed


def test_plain_programs_need_to_run_to_completion():
    assert run_python("x = 1\nassert x == 1\nprint('done')", TIGHT).passed
    early = run_python("import sys\nsys.exit(0)\nassert False", TIGHT)
    assert early.status == "failed" and early.returncode == 0 and "complet" in early.message, early


# ---------------------------------------------------------------------------------------------------- isolation

def _host_paths(name: str) -> list[str]:
    return [os.path.join(d, name) for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(d)]


WRITE_EVERYWHERE = """
import os, sys
for path in __PATHS__:
    try:
        with open(path, 'w') as f:
            f.write('sandbox was here')
        print('wrote', path)
    except OSError as exc:
        print('denied', path, type(exc).__name__)
"""


def _write_everywhere(paths: list[str]) -> str:
    return WRITE_EVERYWHERE.replace("__PATHS__", repr(paths))


def test_tmp_like_folders_are_private(iso):
    if iso.mode == "rlimits-only":
        pytest.skip("no namespaces on this machine")
    paths = _host_paths(f"tokenpo-private-{uuid.uuid4().hex}")
    try:
        res = run_python(_write_everywhere(paths), TIGHT)
        assert res.passed, res
        assert [line.split()[0] for line in res.stdout.splitlines()] == ["wrote"] * len(paths), res.stdout
        leaked = [p for p in paths if os.path.exists(p)]
        assert not leaked, f"writes reached the host: {leaked}"
        assert res.weaker_isolation == (), res.weaker_isolation
    finally:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)


def test_concurrent_sandboxes_cannot_see_each_others_files(iso):
    """Two programs sandboxed at once: what one writes to /tmp, /var/tmp or /dev/shm, the other never sees (so it can
    neither read nor replace it)."""
    if iso.mode == "rlimits-only":
        pytest.skip("no namespaces on this machine")
    from concurrent.futures import ThreadPoolExecutor

    tag = f"tokenpo-neighbour-{uuid.uuid4().hex}"
    paths = [f"{folder}/{tag}" for folder in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(folder)]
    writer = ("import time\n" + "".join(f"open({p!r}, 'w').write('x')\n" for p in paths) + "time.sleep(2.0)\n")
    reader = ("import os, time\ntime.sleep(1.0)\n"
              f"print(sorted(p for p in {paths!r} if os.path.exists(p)))\n")
    try:
        with ThreadPoolExecutor(2) as pool:
            wrote, read = pool.map(lambda program: run_python(program, TIGHT), [writer, reader])
        assert wrote.passed and read.passed, (wrote, read)
        assert read.stdout.strip() == "[]", f"a neighbour's files were visible: {read.stdout}"
    finally:
        for p in paths:     # had they reached the host
            if os.path.exists(p):
                os.unlink(p)


@pytest.fixture
def python_under_tmp(iso):
    """A virtual environment of the sandbox's interpreter, living under /tmp (readable by the sandbox uid): what
    `python -m venv --without-pip` makes, less the activation scripts."""
    root = f"/tmp/tokenpo-venv-{uuid.uuid4().hex[:12]}"
    os.mkdir(root, 0o755)
    try:
        os.makedirs(os.path.join(root, "venv", "bin"), mode=0o755)
        python = os.path.join(root, "venv", "bin", "python")
        os.symlink(iso.python, python)
        with open(os.path.join(root, "venv", "pyvenv.cfg"), "w") as f:
            f.write(f"home = {os.path.dirname(os.path.realpath(iso.python))}\ninclude-system-site-packages = false\n")
        os.chmod(os.path.join(root, "venv", "pyvenv.cfg"), 0o644)
        out = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                             timeout=30)
        assert out.stdout.strip() == os.path.join(root, "venv"), out
        yield python
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_private_tmp_even_when_the_interpreter_lives_under_tmp(monkeypatch, iso, python_under_tmp):
    if iso.mode == "rlimits-only":
        pytest.skip("no namespaces on this machine")
    monkeypatch.setattr(sandbox, "_python_candidates", lambda: [python_under_tmp])
    probed = sandbox.isolation.__wrapped__()
    assert probed.python == python_under_tmp, probed
    assert probed.mode == iso.mode and probed.private_tmp, probed
    monkeypatch.setattr(sandbox, "isolation", lambda: probed)
    paths = _host_paths(f"tokenpo-venv-escape-{uuid.uuid4().hex}")
    try:
        res = run_python("import sys\nprint(sys.prefix)\n" + _write_everywhere(paths), TIGHT)
        assert res.passed, res
        assert res.stdout.splitlines()[0] == os.path.dirname(os.path.dirname(python_under_tmp)), res.stdout
        assert not [p for p in paths if os.path.exists(p)], "writes reached the host's folders"
        assert res.weaker_isolation == (), res.weaker_isolation
        # and the interpreter's own folder is read-only to the program
        touch = run_python(f"open({os.path.join(os.path.dirname(python_under_tmp), 'x')!r}, 'w')", TIGHT)
        assert touch.status == "failed" and "Error" in touch.message, touch
    finally:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)


@pytest.fixture
def host_unix_sockets():
    """Listening AF_UNIX sockets, mode 777, in host folders a program could see: /run, /tmp, the abstract
    namespace; a datagram socket too."""
    tag = uuid.uuid4().hex[:12]
    made, stream_paths, dgram_paths = [], [], []
    for folder in ("/run", "/tmp"):
        if not os.access(folder, os.W_OK):
            continue
        for kind, paths in ((socket.SOCK_STREAM, stream_paths), (socket.SOCK_DGRAM, dgram_paths)):
            path = os.path.join(folder, f"tokenpo-{tag}-{kind}.sock")
            s = socket.socket(socket.AF_UNIX, kind)
            s.bind(path)
            os.chmod(path, 0o777)
            if kind == socket.SOCK_STREAM:
                s.listen(4)
            s.setblocking(False)
            made.append((s, path))
            paths.append(path)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0tokenpo-{tag}")
    abstract.listen(4)
    abstract.setblocking(False)
    made.append((abstract, None))
    stream_paths.append(f"\0tokenpo-{tag}")
    assert dgram_paths, "no writable host folder for the test sockets"
    yield made, stream_paths, dgram_paths
    for s, path in made:
        s.close()
        if path:
            os.unlink(path)


UNIX_CLIENT = """
import socket
for path in __STREAM__:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(path)
        s.sendall(b'leak')
        print('connected', repr(path))
    except OSError as exc:
        print('blocked', type(exc).__name__)
for path in __DGRAM__:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b'leak', path)
        print('sent', repr(path))
    except OSError as exc:
        print('blocked', type(exc).__name__)
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.sendto(b'leak', path)
        print('sent via socketpair', repr(path))
    except OSError as exc:
        print('blocked', type(exc).__name__)
# a stream socketpair (asyncio, multiprocessing) still works, and cannot reach a path
a, b = socket.socketpair()
a.sendall(b'ping')
assert b.recv(4) == b'ping'
try:
    a.connect(__STREAM__[0])
    print('reconnected')
except OSError:
    pass
"""


def test_no_host_unix_socket_is_reachable(mode, host_unix_sockets):
    made, stream_paths, dgram_paths = host_unix_sockets
    program = UNIX_CLIENT.replace("__STREAM__", repr(stream_paths)).replace("__DGRAM__", repr(dgram_paths))
    res = run_python(program, TIGHT)
    assert res.passed, res
    assert all(line.startswith("blocked") for line in res.stdout.splitlines()), res.stdout
    for s, path in made:
        with pytest.raises(BlockingIOError):
            s.accept() if s.type == socket.SOCK_STREAM else s.recv(16)


def test_tcp_to_localhost_delivers_nothing(mode):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.setblocking(False)
        port = server.getsockname()[1]
        program = (f"import socket\nc = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "c.sendall(b'exfiltrate')\nprint('sent')\n")
        res = run_python(program, TIGHT)
        if any("network reachable" in w for w in res.weaker_isolation):  # cannot be prevented here: said so
            assert res.isolation == "rlimits-only", res
            return
        assert res.status == "failed" and "sent" not in res.stdout, res
        with pytest.raises(BlockingIOError):
            server.accept()


DISK_FLOOD_ONE_FILE = """
import os
print(os.getcwd(), flush=True)
with open('big.bin', 'wb') as f:
    for _ in range(64):
        f.write(b'x' * (1 << 20))
        f.flush()
print('wrote 64 MiB')
"""

DISK_FLOOD_MANY_FILES = """
import os, time
print(os.getcwd(), flush=True)
for i in range(64):
    with open('part%d.bin' % i, 'wb') as f:
        f.write(b'x' * (1 << 20))
print('wrote 64 MiB', flush=True)
time.sleep(5)
"""


@pytest.mark.parametrize("program", [DISK_FLOOD_ONE_FILE, DISK_FLOOD_MANY_FILES], ids=["one_file", "many_files"])
def test_disk_quota_on_the_working_directory(mode, program):
    limits = SandboxLimits(wall_time=4.0, cpu_time=4.0, memory_bytes=512 << 20, max_file_bytes=128 << 20,
                           max_disk_bytes=QUOTA)
    start = time.monotonic()
    res = run_python(program, limits)
    assert res.status == "disk_limit" and res.message, res
    if mode.private_tmp:  # a size-bounded tmpfs: the writes fail at the quota (the fallback's watchdog samples)
        assert "wrote 64 MiB" not in res.stdout, res
    assert time.monotonic() - start < 4.0
    workdir = res.stdout.splitlines()[0] if res.stdout else ""
    assert workdir and not os.path.exists(workdir), "the working directory was left behind"


def test_private_tmp_is_size_bounded(iso):
    if iso.mode == "rlimits-only":
        pytest.skip("no namespaces on this machine")
    limits = SandboxLimits(wall_time=4.0, memory_bytes=512 << 20, max_file_bytes=128 << 20, tmpfs_bytes=QUOTA)
    res = run_python(DISK_FLOOD_ONE_FILE.replace("'big.bin'", "'/dev/shm/big.bin'"), limits)
    assert res.status == "disk_limit", res


# ------------------------------------------------------------------------------------------------------ fallback

def test_fallback_reports_itself_on_every_result(fallback, iso):
    res = run_python("print('hi')", TIGHT)
    assert res.passed and res.isolation == "rlimits-only"
    assert res.weaker_isolation, "the limits-only fallback must say it is weaker"
    text = " ".join(res.weaker_isolation)
    assert "PID namespace" in text and "/tmp" in text, res.weaker_isolation
    assert res.to_dict()["weaker_isolation"]
    if iso.mode != "rlimits-only":
        strong = sandbox.Isolation(iso.mode, iso.network_namespace, iso.pid_namespace, iso.private_tmp, iso.uid,
                                   iso.python)
        assert not strong.weaknesses()


def test_a_weaker_level_is_never_silent(monkeypatch, iso):
    # no `unshare` on this "machine": the probe falls back to limits only, and says so, or refuses when asked to
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "unshare" else real_which(name))
    weak = sandbox.isolation.__wrapped__()
    assert weak.mode == "rlimits-only" and weak.weaknesses() and "no `unshare` executable" in weak.notes
    monkeypatch.setenv("TOKENPO_SANDBOX_REQUIRE_FULL", "1")
    with pytest.raises(RuntimeError, match="weaker than required"):
        sandbox.isolation.__wrapped__()


DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', MARKER])
    os._exit(0)
os.wait()
time.sleep(0.2)
LOOP
print('parent done')
"""


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_setsid_double_fork_daemon_does_not_outlive_the_run(mode, ending):
    marker = f"{300 + (ending == 'timeout')}.{os.getpid()}"
    loop = "while True:\n    pass" if ending == "timeout" else ""
    program = DAEMON.replace("MARKER", repr(marker)).replace("LOOP", loop)
    res = run_python(program, SandboxLimits(wall_time=1.5, cpu_time=3.0, max_processes=16))
    assert res.status == ("passed" if ending == "exit" else "timeout"), res
    deadline = time.monotonic() + 2.0
    while (left := processes_with_cmdline(b"sleep\x00" + marker.encode())) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"{len(left)} daemon(s) outlived the sandbox"
