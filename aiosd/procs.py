"""Spawning children that die with their parent, and reading their exits."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _pdeathsig(sig: int) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child between fork and exec: if the parent dies, the
        # kernel sends us ``sig``, so no child outlives the daemon.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        # The parent may have died before prctl took effect.
        if os.getppid() == 1:
            os.kill(os.getpid(), sig)

    return setup


def spawn(
    argv: list[str],
    env: dict[str, str],
    *,
    death_signal: int = signal.SIGKILL,
    preexec: Callable[[], None] | None = None,
    **popen: Any,
) -> subprocess.Popen:
    """Start ``argv`` in its own session, dying with this process (or, with
    ``preexec``, as that sets it up between fork and exec)."""
    if preexec is None and sys.platform.startswith("linux"):
        preexec = _pdeathsig(death_signal)
    return subprocess.Popen(
        argv, env=env, start_new_session=True, preexec_fn=preexec, close_fds=True, **popen
    )


def become_subreaper() -> bool:
    """Make this process, not init, the parent of its orphaned descendants
    (Linux): a process that an agent started and abandoned (a double fork, a
    new session) stays in this process's tree, where it can be recognised."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def reap_adopted(own: set[int]) -> None:
    """Collect the exit of every child that ended, except those in ``own``
    (children a ``Popen`` waits for: taking their status would lose it)."""
    import psutil

    for child in psutil.Process().children():
        if child.pid not in own:
            try:
                os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def exit_code(status: int) -> int:
    """A waitpid status as an exit code; a signal death is negative."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"
