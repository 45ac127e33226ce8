"""The sandbox launcher: a self-contained script run as `python -I -S -c <this source> <json config>`.

It is never imported. It runs in the new process, as the harness's user, before any untrusted code.
Stage "setup": private /tmp mounts (root only), rlimits, then exec of `unshare` (new namespaces), which runs this
script again as stage "supervise"; without namespaces the same process goes on to supervise directly.
The supervisor forks the program (dropping to the sandbox uid in the child when root), reaps every child, and writes
the program's wait status and CPU time to a pipe that only the harness and the supervisor hold. Keeping a supervisor
as the namespace's PID 1 means the program is an ordinary process (a PID 1 ignores default-action signals) and its
fate is reported exactly.
"""
import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

cfg = json.loads(sys.argv[1])
work = cfg["workdir"]
failed = cfg["launch_error_code"]


def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))


if cfg["stage"] == "setup":
    try:
        if cfg["private_tmp"]:
            libc = ctypes.CDLL(None, use_errno=True)
            check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
            keep = os.open(work, os.O_RDONLY | os.O_DIRECTORY)  # the work dir, before /tmp is covered
            opts = ("size=%d,mode=1777" % cfg["tmpfs_bytes"]).encode()
            for d in ("/tmp", "/var/tmp", "/dev/shm"):
                if os.path.isdir(d) and not os.path.islink(d):
                    check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts), "tmpfs on " + d)
            os.makedirs(work, exist_ok=True)
            check(libc.mount(("/proc/self/fd/%d" % keep).encode(), work.encode(), None, MS_BIND, None),
                  "bind " + work)
            os.close(keep)
        os.chdir(work)
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
    except Exception as exc:
        sys.stderr.write("sandbox launcher: %r\n" % (exc,))
        os._exit(failed)
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
    os._exit(failed)
while True:
    try:
        done, status, usage = os.wait4(-1, 0)
    except ChildProcessError:
        os._exit(failed)
    if done == pid:
        break
os.write(status_fd, ("%d %.6f\n" % (status, usage.ru_utime + usage.ru_stime)).encode())
os._exit(0)
