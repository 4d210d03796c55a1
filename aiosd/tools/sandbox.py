"""The python sandbox: untrusted code in a subprocess that cannot exceed its
CPU, memory, output and time limits, starts with an empty environment in a
scratch directory, and cannot write anywhere else.

Confinement is Landlock (Linux 5.13+), applied by a small bootstrap that the
child runs before the untrusted code: it sets the resource limits, forbids
gaining privileges, and restricts itself so that every write-type access is
allowed only beneath the scratch directory (and, with Landlock ABI 4+, TCP
bind and connect are denied; with ABI 6+, signals and abstract sockets
outside the sandbox too). It restricts itself in the child rather than in a
``preexec_fn`` because the tool worker is multi-threaded, where running
Python between fork and exec is unsafe. Where Landlock is missing the tool
refuses to run, and says why: it never runs code unconfined.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from libaios.errors import Unavailable

from ..config import SandboxConfig

SYS_LANDLOCK_CREATE_RULESET = 444
LANDLOCK_CREATE_RULESET_VERSION = 1

# The child's first act. argv: scratch dir, cpu seconds, memory bytes,
# output bytes. It cannot be undone by the code that runs after it.
BOOTSTRAP = r'''
import ctypes, os, resource, struct, sys
scratch, cpu, mem, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (out, out))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    raise SystemExit("sandbox: cannot set no_new_privs")
abi = libc.syscall(444, None, 0, 1)
if abi < 1:
    raise SystemExit("sandbox: Landlock is not available")
# write-type filesystem rights, by ABI: WRITE_FILE, REMOVE_*, MAKE_*, then
# REFER (2), TRUNCATE (3), IOCTL_DEV (5)
fs = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))
if abi >= 2: fs |= 1 << 13
if abi >= 3: fs |= 1 << 14
if abi >= 5: fs |= 1 << 15
net = 0b11 if abi >= 4 else 0          # BIND_TCP, CONNECT_TCP
scoped = 0b11 if abi >= 6 else 0       # abstract unix sockets, signals
if abi >= 6:
    attr = struct.pack("=QQQ", fs, net, scoped)
elif abi >= 4:
    attr = struct.pack("=QQ", fs, net)
else:
    attr = struct.pack("=Q", fs)
buf = ctypes.create_string_buffer(attr, len(attr))
ruleset = libc.syscall(444, buf, len(attr), 0)
if ruleset < 0:
    raise SystemExit(f"sandbox: landlock_create_ruleset failed (errno {ctypes.get_errno()})")
# allow the write rights beneath the scratch directory only
allowed = fs & ~(1 << 15)
fd = os.open(scratch, os.O_PATH | os.O_DIRECTORY)
rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12)
if libc.syscall(445, ruleset, 1, rule, 0) != 0:
    raise SystemExit(f"sandbox: landlock_add_rule failed (errno {ctypes.get_errno()})")
os.close(fd)
if libc.syscall(446, ruleset, 0) != 0:
    raise SystemExit(f"sandbox: landlock_restrict_self failed (errno {ctypes.get_errno()})")
os.close(ruleset)
del ctypes, libc, buf, rule, attr, struct, resource
code = sys.stdin.read()
sys.stdin.close()
sys.argv = ["<sandbox>"]
exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__"})
'''


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where there is none."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, int(abi))


def run_python(code: str, limits: SandboxConfig, timeout: float | None = None) -> dict[str, Any]:
    """Run ``code`` confined; return its stdout, stderr, exit code, and
    whether it was stopped for running too long."""
    abi = landlock_abi()
    if abi < 1:
        raise Unavailable("python sandbox: Landlock is not available on this kernel; "
                          "refusing to run code unconfined")
    wall = min(limits.wall_seconds, timeout) if timeout else limits.wall_seconds
    scratch = tempfile.mkdtemp(prefix="aios-sandbox-")
    out_path = os.path.join(scratch, ".stdout")
    err_path = os.path.join(scratch, ".stderr")
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", BOOTSTRAP, scratch, str(limits.cpu_seconds),
                 str(limits.memory_mb * 1024 * 1024), str(limits.output_bytes)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=scratch, env={},
                start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                proc.communicate(code.encode(), timeout=wall)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        cap = limits.output_bytes
        with open(out_path, "rb") as fh:
            stdout = fh.read(cap).decode("utf-8", errors="replace")
        with open(err_path, "rb") as fh:
            stderr = fh.read(cap).decode("utf-8", errors="replace")
        return {"stdout": stdout, "stderr": stderr, "exit_code": proc.returncode,
                "timed_out": timed_out, "landlock_abi": abi}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

