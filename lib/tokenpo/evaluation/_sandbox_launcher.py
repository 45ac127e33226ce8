"""The sandbox launcher: a self-contained script run as `python -I -S -c <this source> <json config>`.

It is never imported. It runs in the new process, as the harness's user, before any untrusted code.
Stage "setup" execs `unshare` (new namespaces), which runs this script again as stage "supervise"; without
namespaces (the limits-only fallback) the same process goes on to supervise directly.

The supervisor (root or the harness's user; never reachable by the program's uid):
* in the isolating modes, inside its new mount namespace: remounts every existing mount read-only (but /proc and
  /dev), covers /tmp, /var/tmp, /dev/shm, /run/lock (and /dev/mqueue) with private size-bounded tmpfs mounts,
  binds the interpreter's own folders that lay under them back in read-only, and mounts a tmpfs of
  `max_disk_bytes` as the working directory, with the harness's files copied in (the disk quota; it all vanishes
  with the namespace);
* installs a seccomp filter (inherited by the program): no AF_UNIX socket (so no Unix-socket file or abstract
  socket of the host is reachable), no datagram socketpair, no io_uring; without a network namespace no socket of
  any family at all;
* without a PID namespace becomes a child subreaper, so whatever the program forks (setsid, double fork) stays its
  descendant, and kills every descendant when the program ends or on SIGTERM from the harness;
* forks the program (dropping to the sandbox uid when root; all capabilities dropped), with the rlimits set just
  before exec, reaps every child, and writes the program's wait status, CPU time and what isolation actually took
  effect to a pipe that only the harness and the supervisor hold.
Keeping a supervisor as the namespace's PID 1 means the program is an ordinary process (a PID 1 ignores
default-action signals) and its fate is reported exactly.
"""
import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_STRICTATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 24
ST_RDONLY, ST_NOSUID, ST_NODEV, ST_NOEXEC, ST_NOATIME, ST_NODIRATIME, ST_RELATIME = 1, 2, 4, 8, 1024, 2048, 4096
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, PR_CAPBSET_DROP = 22, 38, 36, 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER = 47, 4, 2

cfg = json.loads(sys.argv[1])
work = cfg["workdir"]
failed = cfg["launch_error_code"]
libc = ctypes.CDLL(None, use_errno=True)


def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), "mount %s on %s" % (fstype or source, target))


# ------------------------------------------------------------------------------------------------ private mounts

def mount_points():
    """Mount points of this namespace, parents first (octal escapes of mountinfo decoded)."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split()[4]
            points.append(raw.decode("unicode_escape").encode("latin-1").decode("utf-8", "replace"))
    return sorted(set(points), key=lambda p: (p.count("/"), p))


def remount_readonly(skip):
    """Every mount point but `skip` (and those below) read-only in this namespace, keeping its locked flags."""
    left = []
    for point in mount_points():
        if any(point == s or point.startswith(s.rstrip("/") + "/") for s in skip):
            continue
        try:
            st = os.statvfs(point)
            if st.f_flag & ST_RDONLY:
                continue
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for st_flag, ms_flag in ((ST_NOSUID, MS_NOSUID), (ST_NODEV, MS_NODEV), (ST_NOEXEC, MS_NOEXEC),
                                     (ST_NOATIME, MS_NOATIME), (ST_NODIRATIME, MS_NODIRATIME)):
                if st.f_flag & st_flag:
                    flags |= ms_flag
            if not st.f_flag & (ST_NOATIME | ST_RELATIME):
                flags |= MS_STRICTATIME
            mount(None, point, None, flags)
        except OSError:
            left.append(point)
    return left


def tmpfs(target, size, mode, uid=None):
    opts = "size=%d,nr_inodes=%d,mode=%s" % (size, max(1024, min(size // 4096, 65536)), mode)
    if uid is not None:
        opts += ",uid=%d,gid=%d" % (uid, uid)
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, opts)


def private_mounts():
    """Returns the mount points that could not be made read-only."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    covered = [d for d in cfg["covered"] if os.path.isdir(d) and not os.path.islink(d)]
    host_work = os.open(work, os.O_RDONLY | os.O_DIRECTORY)  # all before anything is covered
    keep = [(p, os.open(p, os.O_PATH), os.path.isdir(p)) for p in cfg["keep"] if os.path.exists(p)]
    left = remount_readonly(skip=["/proc", "/dev"] + covered)
    for d in covered:
        tmpfs(d, cfg["tmpfs_bytes"], "1777")
    for path, fd, is_dir in keep:  # the interpreter's folders under /tmp & co, read-only
        if is_dir:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    os.makedirs(work, exist_ok=True)
    uid = cfg["uid"] if cfg["uid"] is not None else os.getuid()
    tmpfs(work, cfg["disk_bytes"], "0700", uid)
    for name in os.listdir(host_work):  # the harness's files (main.py, ...) into the quota'd working directory
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=host_work)
        dst = os.open(os.path.join(work, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        while True:
            chunk = os.read(src, 1 << 16)
            if not chunk:
                break
            os.write(dst, chunk)
        os.fchown(dst, uid, uid)
        os.close(src)
        os.close(dst)
    os.close(host_work)
    return left


# ------------------------------------------------------------------------------------------------------- seccomp

class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


# audit arch, socket, socketpair (io_uring_setup/enter/register are 425-427 everywhere)
ARCHES = {"x86_64": (0xC000003E, 41, 53), "aarch64": (0xC00000B7, 198, 199), "arm64": (0xC00000B7, 198, 199),
          "riscv64": (0xC00000F3, 198, 199)}
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, SOCK_STREAM, SOCK_SEQPACKET = 1, 2, 10, 16, 1, 5
EAFNOSUPPORT, EOPNOTSUPP, ENOSYS = 97, 95, 38
LD_ABS, JEQ, JGE, AND, RET = 0x20, 0x15, 0x35, 0x54, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000


def seccomp_program(machine, allow_inet):
    """A BPF program (a list of (code, jt, jf, k) with jumps to labels resolved) for this architecture."""
    arch, nr_socket, nr_socketpair = ARCHES[machine]
    prog = [(LD_ABS, 0, 0, 4), (JEQ, 0, "enosys", arch), (LD_ABS, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((JGE, "enosys", 0, 0x40000000))  # the x32 ABI's numbers
    prog += [(JEQ, "socket", 0, nr_socket), (JEQ, "socketpair", 0, nr_socketpair)]
    prog += [(JEQ, "enosys", 0, nr) for nr in (425, 426, 427)]
    prog += [(RET, 0, 0, ALLOW), "socket", (LD_ABS, 0, 0, 16)]
    if allow_inet:  # a network namespace without interfaces keeps these from reaching anything
        prog += [(JEQ, "allow", 0, family) for family in (AF_INET, AF_INET6, AF_NETLINK)]
    prog += [(RET, 0, 0, ERRNO | EAFNOSUPPORT), "socketpair", (LD_ABS, 0, 0, 16), (JEQ, 0, "afno", AF_UNIX),
             (LD_ABS, 0, 0, 24), (AND, 0, 0, 0xF), (JEQ, "allow", 0, SOCK_STREAM), (JEQ, "allow", 0, SOCK_SEQPACKET),
             (RET, 0, 0, ERRNO | EOPNOTSUPP), "afno", (RET, 0, 0, ERRNO | EAFNOSUPPORT),
             "allow", (RET, 0, 0, ALLOW), "enosys", (RET, 0, 0, ERRNO | ENOSYS)]
    labels, code = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    resolved = []
    for i, (op, jt, jf, k) in enumerate(code):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        resolved.append((op, jt, jf, k))
    return resolved


def install_seccomp(allow_inet):
    """True, or why the filter could not be installed."""
    machine = os.uname().machine
    if machine not in ARCHES or sys.byteorder != "little":
        return "no seccomp filter for %s" % machine
    prog = seccomp_program(machine, allow_inet)
    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    try:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")
    except OSError as exc:
        return str(exc)
    return True


# ---------------------------------------------------------------------------------------------------- processes

def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    data = f.read()
                ppid = int(data[data.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return


def kill_descendants():
    """SIGKILL every descendant until none is left (orphans come back to us: PID 1 or a subreaper)."""
    killed, deadline = 0, time.monotonic() + 1.5  # bounded: a process stuck in the kernel (D state) may linger
    while time.monotonic() < deadline:
        pids = descendants()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        reap()
        time.sleep(0.002)
    reap()
    return killed


def drop_capabilities():
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # EINVAL: past the last
            break
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def clear_capability_sets():
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    libc.capset(header, data)


# ----------------------------------------------------------------------------------------------------- stages

if cfg["stage"] == "setup" and cfg["prefix"]:
    argv = cfg["prefix"] + [sys.executable, "-I", "-S", "-c", cfg["code"], json.dumps(dict(cfg, stage="supervise"))]
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        sys.stderr.write("sandbox launcher: %r\n" % (exc,))
        os._exit(failed)

facts = {"private": False, "readonly_failed": [], "seccomp": False}
try:
    if cfg["private"]:
        facts["readonly_failed"] = private_mounts()
        facts["private"] = True
    os.chdir(work)
    facts["seccomp"] = install_seccomp(cfg["allow_inet"])
    if not cfg["pid_namespace"]:
        check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "child subreaper")
except Exception as exc:
    sys.stderr.write("sandbox launcher: %r\n" % (exc,))
    os._exit(failed)


def on_term(signum, frame):
    kill_descendants()
    os._exit(failed)


signal.signal(signal.SIGTERM, on_term)
status_fd, token_fd, verdict_fd = cfg["status_fd"], cfg["token_fd"], cfg["verdict_fd"]
pid = os.fork()
if pid == 0:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(status_fd)
        drop_capabilities()
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        else:
            clear_capability_sets()
        for name, value in cfg["rlimits"].items():  # a value, or [soft, hard]
            resource.setrlimit(getattr(resource, name), tuple(value) if isinstance(value, list) else (value, value))
        os.execv(cfg["argv"][0], cfg["argv"])
    except BaseException as exc:
        sys.stderr.write("sandbox launcher: %r\n" % (exc,))
    os._exit(failed)
os.close(token_fd)
os.close(verdict_fd)
while True:
    try:
        done, status, usage = os.wait4(-1, 0)
    except ChildProcessError:
        os._exit(failed)
    if done == pid:
        break
facts["stray_killed"] = kill_descendants()
facts.update(wait=status, cpu=usage.ru_utime + usage.ru_stime)
os.write(status_fd, (json.dumps(facts) + "\n").encode())
os._exit(0)
