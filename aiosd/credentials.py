"""The kernel's credentials, and how they reach its processes.

The supervisor makes one secret when it starts. No process is given it in
its environment, which a process of the same user can read in /proc: each
child reads what it is given from an inherited pipe, and only the pipe's
number is in its environment (``AIOS_CREDENTIAL_FD``). The scheduler is
given the secret itself; every other child only its own credential, derived
from the secret and its name. That proves to the scheduler that a process is
the one the supervisor started under that name, and nothing more: a worker's
credential cannot be turned into another's, nor into the supervisor's.

Every kernel process is made non-dumpable as well: its memory, environment
and open files in /proc are then out of reach of other processes of its
user (the agents aiosd launches among them), and it cannot be traced.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import secrets
import sys

FD_ENV = "AIOS_CREDENTIAL_FD"
_PR_SET_DUMPABLE = 4

_mine = ""


def new_secret() -> str:
    return secrets.token_hex(32)


def derive(secret: str, name: str) -> str:
    """The credential of the kernel process named ``name``."""
    return hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()


def verify(secret: str | None, name: str, credential: object) -> bool:
    """Whether ``credential`` is that of the kernel process ``name``."""
    if not secret or not isinstance(credential, str) or not credential:
        return False
    return hmac.compare_digest(derive(secret, name), credential)


def pipe_with(value: str) -> int:
    """A pipe holding ``value``: the read end, for a child to inherit (the
    caller closes it once the child has started)."""
    read, write = os.pipe()
    try:
        os.write(write, value.encode())
    finally:
        os.close(write)
    return read


def receive() -> str:
    """Read this process's credential from the pipe it inherited, once, and
    close it; "" if it was given none."""
    global _mine
    fd = os.environ.pop(FD_ENV, "")
    if fd.isdigit():
        chunks = []
        try:
            while chunk := os.read(int(fd), 4096):
                chunks.append(chunk)
            os.close(int(fd))
        except OSError:
            pass
        _mine = b"".join(chunks).decode(errors="replace").strip()
    return _mine


def mine() -> str:
    """What :func:`receive` read: this process's credential ("" if none)."""
    return _mine


def not_dumpable() -> bool:
    """Make this process non-dumpable (Linux); False where that failed."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


def dumpable() -> bool | None:
    """Whether this process is dumpable (None where that cannot be told)."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl(3, 0, 0, 0, 0) == 1  # PR_GET_DUMPABLE
