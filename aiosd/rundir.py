"""The runtime directory: made (or tightened) for one daemon, locked by it,
and cleared of its sockets when it stops."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from libaios import paths


class AlreadyRunning(Exception):
    pass


def prepare_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or tighten it to 0700 if it is ours
    and others may read or write it (a running daemon's runtime directory
    may be 0711, passable to other users' agents: a second aiosd that finds
    it taken must not close it on them)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user")
    if stat.S_IMODE(st.st_mode) & ~0o711:
        os.chmod(path, 0o700)


def lock(runtime_dir: Path) -> int:
    """Take ``runtime_dir`` for this process (one aiosd per directory): the
    pid file, locked and holding our pid; its descriptor, to keep open."""
    pidfile = runtime_dir / paths.PID_FILE
    fd = os.open(pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            other = pidfile.read_text().strip() or "?"
            raise AlreadyRunning(f"aiosd is already running on {runtime_dir} (pid {other})") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def unlock(runtime_dir: Path, fd: int) -> None:
    try:
        (runtime_dir / paths.PID_FILE).unlink()
    except FileNotFoundError:
        pass
    os.close(fd)


def remove_sockets(runtime_dir: Path) -> None:
    """Remove the kernel's socket files, so no client mistakes a stale one
    for a running kernel."""
    for name in (paths.KERNEL_SOCKET, paths.WORKERS_SOCKET, paths.EVENTS_SOCKET):
        try:
            (runtime_dir / name).unlink()
        except FileNotFoundError:
            pass
