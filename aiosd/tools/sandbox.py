"""The python sandbox: untrusted code in a subprocess that cannot exceed its
CPU, memory, output and time limits, starts with an empty environment in a
scratch directory of its own, cannot write anywhere else, cannot read the
daemon's data, and has no network.

Layers, all set up by a small bootstrap (``BOOTSTRAP`` below) that the child
interpreter runs *before* the untrusted code, and that nothing after it can
undo:

* ``resource`` limits: CPU seconds, address space, file size, no core
  dumps, a few open files. (``RLIMIT_NPROC`` is not used: it counts every
  process of the daemon's user, so a "small" value also stops threads, and
  root ignores it. Process creation is denied by the system call filter.)
* ``PR_SET_NO_NEW_PRIVS`` and, when the daemon runs as root, every
  capability dropped (bounding, ambient, effective, permitted, inheritable).
* **Landlock** (Linux 5.13+): every write-type access right the kernel's ABI
  knows (WRITE_FILE, REMOVE_DIR/FILE, MAKE_*, REFER from ABI 2, TRUNCATE from
  3, IOCTL_DEV from 5) is allowed only beneath the scratch directory. Reads
  and execution are allowed only beneath the interpreter's own installation
  and the system directories (``/usr``, ``/lib*``, ``/bin``) plus a few
  files, so the code cannot read the daemon's storage, its configuration or
  anyone's home directory. With ABI 4+ TCP bind and connect are denied; with
  ABI 6+ signals and abstract unix sockets cannot reach outside the sandbox.
* a **seccomp** filter (x86-64 and arm64): no ``socket()`` at all (Landlock
  does not cover UDP, nor connecting to a pathname unix socket such as the
  kernel's own ``kernel.sock``, where a same-uid process may connect), no
  new processes (``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD``,
  ``clone3``; threads still work), no chmod/chown/xattr changes (Landlock
  does not cover metadata), no ``io_uring`` (it would bypass the filter), no
  ptrace, namespaces, mounts, keyrings, bpf or perf.
* a wall-clock limit: the process (and its group) is killed.
* stdout and stderr go to anonymous temporary files outside the scratch
  directory (the code cannot swap them for a symlink to something secret);
  at most ``output_bytes`` of each is read back.

Why a bootstrap and not ``preexec_fn``: the tool worker is multi-threaded
(the worker runtime's pool, the MCP event loop), and running Python between
fork and exec in a multi-threaded process can deadlock (CPython documents
``preexec_fn`` as unsafe with threads). The bootstrap runs in a fresh,
single-threaded interpreter started with ``-I -S`` (isolated: no
environment variables honoured, no user site, no site-packages, no current
directory on the path), confines itself, reports success on a private pipe
that it then closes, and only then compiles and runs the untrusted code.

Where Landlock is missing, or the system call filter cannot be installed,
the tool refuses to run and says why: it never runs code unconfined.

Known limit: the scratch directory is on the daemon's temporary file
system and only each file's size is bounded (``SCRATCH_FILE_BYTES``), not
the total; the wall-clock limit bounds how much the code can write.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from typing import Any

from libaios.errors import Cancelled, Timeout, Unavailable

from ..config import SandboxConfig

SYS_LANDLOCK_CREATE_RULESET = 444
LANDLOCK_CREATE_RULESET_VERSION = 1

#: Largest file the code may write in its scratch directory (RLIMIT_FSIZE;
#: stdout and stderr too, of which at most ``output_bytes`` are returned).
SCRATCH_FILE_BYTES = 64 * 1024 * 1024
#: Open files the code may hold.
MAX_OPEN_FILES = 64
#: System directories the code may read and execute from, besides the
#: interpreter's own installation (where they exist).
READ_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin")
#: Single files it may read (the dynamic loader's cache, time zone, users).
READ_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group",
              "/etc/nsswitch.conf", "/dev/urandom", "/dev/random", "/dev/zero")
#: Files it may read and write.
RW_FILES = ("/dev/null",)
#: Exit status of a bootstrap that could not confine the process.
SETUP_FAILED = 125

# The child's first act; argv[1] is its settings as JSON. It confines the
# process and then runs the code. Keep it dependency-free (stdlib only).
BOOTSTRAP = r'''
import ctypes, json, os, resource, struct, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]

def fail(what):
    err = ctypes.get_errno()
    sys.stderr.write("aios sandbox: %s (errno %d: %s)\n" % (what, err, os.strerror(err)))
    sys.stderr.flush()
    os._exit(125)

# -- resource limits --------------------------------------------------------
cpu = cfg["cpu"]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))   # SIGXCPU, then SIGKILL
resource.setrlimit(resource.RLIMIT_AS, (cfg["mem"], cfg["mem"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["fsize"], cfg["fsize"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["nofile"], cfg["nofile"]))

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]

# -- dies with the tool worker -------------------------------------------------
# It runs in a session of its own, out of reach of a kill of the worker's
# group: if the worker dies, nothing else would end it.
if libc.prctl(1, 9, 0, 0, 0) != 0:                           # PR_SET_PDEATHSIG, SIGKILL
    fail("cannot set the parent-death signal")
if os.getppid() != cfg["parent"]:                            # the worker died already
    os._exit(125)

# -- no new privileges, no capabilities ---------------------------------------
if libc.prctl(38, 1, 0, 0, 0) != 0:                          # PR_SET_NO_NEW_PRIVS
    fail("cannot set no_new_privs")
libc.prctl(47, 4, 0, 0, 0)                                   # PR_CAP_AMBIENT_CLEAR_ALL
for cap in range(64):
    if libc.prctl(24, cap, 0, 0, 0) != 0:                    # PR_CAPBSET_DROP
        if ctypes.get_errno() == 22:                         # EINVAL: no such capability
            break
header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)
data = ctypes.create_string_buffer(24)                       # two zeroed cap_user_data_t
if libc.capset(header, data) != 0:
    fail("cannot drop capabilities")

# -- Landlock -----------------------------------------------------------------
abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
if abi < 1:
    fail("Landlock is not available")
READ = (1 << 0) | (1 << 2) | (1 << 3)                        # EXECUTE, READ_FILE, READ_DIR
FILE_ONLY = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)
fs = (1 << 13) - 1                                           # ABI 1: bits 0-12
if abi >= 2: fs |= 1 << 13                                   # REFER
if abi >= 3: fs |= 1 << 14                                   # TRUNCATE
if abi >= 5: fs |= 1 << 15                                   # IOCTL_DEV
net = 0b11 if abi >= 4 else 0                                # BIND_TCP, CONNECT_TCP
scoped = 0b11 if abi >= 6 else 0                             # ABSTRACT_UNIX_SOCKET, SIGNAL
if abi >= 6:
    attr = struct.pack("=QQQ", fs, net, scoped)
elif abi >= 4:
    attr = struct.pack("=QQ", fs, net)
else:
    attr = struct.pack("=Q", fs)
attr_buf = ctypes.create_string_buffer(attr, len(attr))
ruleset = libc.syscall(444, attr_buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
if ruleset < 0:
    fail("landlock_create_ruleset failed")

def allow(path, access, required):
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        if required:
            fail("cannot open %s" % path)
        return
    if not os.path.isdir(path):
        access &= FILE_ONLY
    rule = ctypes.create_string_buffer(struct.pack("=Qi", access & fs, fd), 12)
    ok = libc.syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0))
    os.close(fd)
    if ok != 0:
        fail("landlock_add_rule failed for %s" % path)

allow(cfg["scratch"], fs, True)
for path in cfg["read"]:
    allow(path, READ, False)
for path in cfg["rw"]:
    allow(path, READ | (1 << 1) | (1 << 14), False)          # + WRITE_FILE, TRUNCATE
if libc.syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
    fail("landlock_restrict_self failed")
os.close(ruleset)

# -- system call filter ---------------------------------------------------------
if cfg["seccomp"]:
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1                 # SECCOMP_RET_ALLOW, ERRNO(EPERM)
    prog = [(0x20, 0, 0, 4),                                 # A = arch
            (0x15, 1, 0, cfg["arch"]),                       # if A == arch skip 1
            (0x06, 0, 0, DENY),                              # other ABIs (i386, x32 binaries)
            (0x20, 0, 0, 0)]                                 # A = syscall number
    if cfg["x32_bit"]:
        prog += [(0x35, 0, 1, cfg["x32_bit"]),               # if A >= x32 bit
                 (0x06, 0, 0, DENY)]
    for nr in cfg["deny"]:
        prog += [(0x15, 0, 1, nr), (0x06, 0, 0, DENY)]
    for nr in cfg["enosys"]:                                 # clone3: libc falls back to clone
        prog += [(0x15, 0, 1, nr), (0x06, 0, 0, 0x00050000 | 38)]
    me = os.getpid()                                         # no fork: it stays the same
    for nr in cfg["self_only"]:                              # kill(pid, ..), prlimit64(pid, ..):
        prog += [(0x15, 0, 5, nr),                           #   if A == nr:
                 (0x20, 0, 0, 16),                           #     A = low word of arg 0
                 (0x15, 2, 0, 0),                            #     0: itself (its group): allow
                 (0x15, 1, 0, me),                           #     its own pid: allow
                 (0x06, 0, 0, DENY),                         #     anyone else: deny
                 (0x06, 0, 0, ALLOW)]
    prog += [(0x15, 0, 3, cfg["prctl"]),                     # prctl(PR_SET_PDEATHSIG, ..):
             (0x20, 0, 0, 16),                               #   the death signal set above
             (0x15, 0, 1, 1),                                #   stays
             (0x06, 0, 0, DENY),
             (0x20, 0, 0, 0)]                                # A = syscall number again
    prog += [(0x15, 0, 3, cfg["clone"]),                     # clone(flags, ...):
             (0x20, 0, 0, 16),                               #   A = low word of flags
             (0x45, 1, 0, 0x00010000),                       #   CLONE_THREAD: a thread, allow
             (0x06, 0, 0, DENY),                             #   else a new process: deny
             (0x06, 0, 0, ALLOW)]
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    filt = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(filt))
    fprog_buf = ctypes.create_string_buffer(fprog, len(fprog))
    if libc.prctl(22, 2, ctypes.addressof(fprog_buf), 0, 0) != 0:   # PR_SET_SECCOMP, FILTER
        fail("cannot install the system call filter")

# -- confined: say so on the private pipe, then run the code ------------------
os.write(status, b"ok")
os.close(status)
main = os.path.join(cfg["scratch"], cfg["main"])
with open(main, encoding="utf-8") as fh:
    source = fh.read()
del ctypes, libc, json, struct, resource, cfg, fh, attr, attr_buf, header, data, allow, fail
sys.argv = [main]
code = compile(source, main, "exec")
del source
try:
    exec(code, {"__name__": "__main__", "__file__": main, "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as exc:
    import traceback
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    sys.stderr.flush()
    os._exit(1)
'''

# System calls the filter denies, by architecture. Numbers from the kernel's
# tables (arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/asm-generic/
# unistd.h for arm64, which has no fork, vfork, chmod or chown calls).
_X86_64_DENY = {
    "socket": 41, "fork": 57, "vfork": 58, "ptrace": 101, "chmod": 90, "fchmod": 91,
    "chown": 92, "fchown": 93, "lchown": 94, "pivot_root": 155, "chroot": 161,
    "mount": 165, "umount2": 166, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
    "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "add_key": 248,
    "request_key": 249, "keyctl": 250, "fchownat": 260, "fchmodat": 268, "unshare": 272,
    "perf_event_open": 298, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "fchmodat2": 452,
    # another process's priority, I/O priority or memory; truncate by path
    # (Landlock governs it only from ABI 3); signals through a pidfd
    "setpriority": 141, "ioprio_set": 251, "migrate_pages": 256, "move_pages": 279,
    "truncate": 76, "pidfd_send_signal": 424, "process_madvise": 440,
}
#: calls that name a process by their first argument: allowed on the
#: sandbox itself only (Landlock scopes signals only from ABI 6, and never
#: resource limits: prlimit64 could cut the daemon's own limits)
_X86_64_SELF_ONLY = {
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "prlimit64": 302, "pidfd_open": 434, "sched_setaffinity": 203, "sched_setparam": 142,
    "sched_setscheduler": 144, "sched_setattr": 314,
}
_AARCH64_SELF_ONLY = {
    "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
    "prlimit64": 261, "pidfd_open": 434, "sched_setaffinity": 122, "sched_setparam": 118,
    "sched_setscheduler": 119, "sched_setattr": 274,
}
_AARCH64_DENY = {
    "socket": 198, "ptrace": 117, "fchmod": 52, "fchmodat": 53, "fchownat": 54,
    "fchown": 55, "pivot_root": 41, "chroot": 51, "mount": 40, "umount2": 39,
    "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15,
    "fremovexattr": 16, "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97,
    "perf_event_open": 241, "setns": 268, "process_vm_readv": 270,
    "process_vm_writev": 271, "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "fchmodat2": 452,
    "setpriority": 140, "ioprio_set": 30, "migrate_pages": 238, "move_pages": 239,
    "truncate": 45, "pidfd_send_signal": 424, "process_madvise": 440,
}
#: per architecture: AUDIT_ARCH, the x32 syscall bit (0: none), the denied
#: calls, the calls answered ENOSYS (clone3), clone's and prctl's numbers,
#: and the calls allowed on the sandbox's own process only
_SECCOMP = {
    "x86_64": {"arch": 0xC000003E, "x32_bit": 0x40000000, "deny": _X86_64_DENY,
               "enosys": [435], "clone": 56, "prctl": 157, "self_only": _X86_64_SELF_ONLY},
    "aarch64": {"arch": 0xC00000B7, "x32_bit": 0, "deny": _AARCH64_DENY,
                "enosys": [435], "clone": 220, "prctl": 167, "self_only": _AARCH64_SELF_ONLY},
}


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def landlock_status() -> tuple[int, str]:
    """The kernel's Landlock ABI version (0 where there is none) and, when
    there is none, why."""
    if not sys.platform.startswith("linux"):
        return 0, f"Landlock is Linux-only and this is {sys.platform}"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi >= 1:
        return int(abi), ""
    err = ctypes.get_errno()
    why = {errno.ENOSYS: "the kernel was built without it",
           errno.EOPNOTSUPP: "it is disabled (add landlock to the lsm= boot parameter)"}
    return 0, f"{errno.errorcode.get(err, err)}: {why.get(err, os.strerror(err))}"


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where there is none."""
    return landlock_status()[0]


def _interpreter() -> tuple[str, list[str]]:
    """The base interpreter (never a virtualenv's: the sandbox gets the
    standard library only) and the directories it reads from."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                          sysconfig.get_paths()["stdlib"],
                                          os.path.dirname(exe))}
    return exe, sorted(dirs)


def _settings(scratch: str, status_fd: int, limits: SandboxConfig, seccomp: bool) -> dict[str, Any]:
    _, dirs = _interpreter()
    cfg: dict[str, Any] = {
        "scratch": scratch, "main": "main.py", "status_fd": status_fd,
        "cpu": int(limits.cpu_seconds), "mem": int(limits.memory_mb) * 1024 * 1024,
        "fsize": max(int(limits.output_bytes), SCRATCH_FILE_BYTES), "nofile": MAX_OPEN_FILES,
        "read": [*dirs, *READ_DIRS, *READ_FILES], "rw": list(RW_FILES), "seccomp": seccomp,
        "parent": os.getpid(),
    }
    if seccomp:
        table = _SECCOMP[_machine()]
        cfg.update(arch=table["arch"], x32_bit=table["x32_bit"],
                   deny=sorted(table["deny"].values()), enosys=table["enosys"],
                   clone=table["clone"], prctl=table["prctl"],
                   self_only=sorted(table["self_only"].values()))
    return cfg


def check_available() -> int:
    """Raise :class:`Unavailable` (saying why) where the sandbox cannot
    confine code; return the Landlock ABI otherwise."""
    abi, why = landlock_status()
    if abi < 1:
        raise Unavailable(f"python sandbox: Landlock is not available on this kernel ({why}); "
                          "refusing to run code unconfined")
    if _machine() not in _SECCOMP or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise Unavailable(f"python sandbox: no system call filter for {platform.machine()} "
                          "(only x86_64 and aarch64); refusing to run code without it")
    return abi


def _read_capped(fh: Any, cap: int) -> tuple[str, bool]:
    fh.seek(0)
    data = fh.read(cap + 1)
    truncated = len(data) > cap
    return data[:cap].decode("utf-8", errors="replace"), truncated


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def run_python(code: str, limits: SandboxConfig, *, deadline: float | None = None,
               cancelled: threading.Event | None = None, tool: str = "python",
               _seccomp: bool = True) -> dict[str, Any]:
    """Run ``code`` confined and return ``{"stdout", "stderr", "exit_code",
    "timed_out", "truncated"}``.

    The code is killed at ``limits.wall_seconds`` (``timed_out`` is then
    true, and a note says so at the end of stderr, as it does for the CPU
    limit and truncated output). ``deadline`` (epoch seconds) is the call's
    own limit: past it, or once ``cancelled`` is set, the code is killed and
    :class:`Timeout` (or :class:`Cancelled`) naming ``tool`` is raised
    instead. ``_seccomp`` exists for the tests (to check the Landlock layer
    on its own); production always filters.
    """
    check_available()
    scratch = tempfile.mkdtemp(prefix="aios-sandbox-")
    status_r, status_w = os.pipe()
    try:
        with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        exe, _ = _interpreter()
        settings = _settings(scratch, status_w, limits, _seccomp)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.monotonic()
            proc = subprocess.Popen(
                [exe, "-I", "-S", "-u", "-c", BOOTSTRAP, json.dumps(settings)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=scratch, env={},
                start_new_session=True, close_fds=True, pass_fds=(status_w,),
            )
            os.close(status_w)
            status_w = -1
            timed_out = False
            stopped: str | None = None
            try:
                while proc.poll() is None:
                    now = time.monotonic()
                    if now - started >= limits.wall_seconds:
                        timed_out = True
                        break
                    if deadline is not None and time.time() >= deadline:
                        stopped = "deadline"
                        break
                    if cancelled is not None and cancelled.is_set():
                        stopped = "cancelled"
                        break
                    left = limits.wall_seconds - (now - started)
                    try:
                        proc.wait(timeout=min(0.05, max(0.001, left)))
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                if proc.poll() is None:
                    _kill(proc)
            confined = os.read(status_r, 2) == b"ok"
            stdout, out_cut = _read_capped(out, limits.output_bytes)
            stderr, err_cut = _read_capped(err, limits.output_bytes)
        if stopped == "deadline":
            raise Timeout(f"{tool}: the tool ran past its time limit; the code was stopped")
        if stopped == "cancelled":
            raise Cancelled(f"{tool}: the call was cancelled; the code was stopped")
        if not confined and not timed_out:
            raise Unavailable(f"python sandbox: the code was not run, confining it failed: "
                              f"{stderr.strip()[-500:]}")
        rc = proc.returncode
        notes = []
        if out_cut or err_cut:
            notes.append(f"output truncated to {limits.output_bytes} bytes per stream")
        if timed_out:
            notes.append(f"killed: the wall-clock limit of {limits.wall_seconds:g}s was reached")
        elif rc == -signal.SIGXCPU:
            notes.append(f"killed: the CPU limit of {limits.cpu_seconds}s was reached")
        elif rc == -signal.SIGKILL:
            notes.append(f"killed by SIGKILL (the CPU limit of {limits.cpu_seconds}s, if the "
                         "code ignored SIGXCPU)")
        elif rc is not None and rc < 0:
            notes.append(f"killed by signal {signal.Signals(-rc).name}")
        if notes:
            if stderr and not stderr.endswith("\n"):
                stderr += "\n"
            stderr += "".join(f"[sandbox: {n}]\n" for n in notes)
        return {"stdout": stdout, "stderr": stderr, "exit_code": rc, "timed_out": timed_out,
                "truncated": out_cut or err_cut}
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
        shutil.rmtree(scratch, ignore_errors=True)
