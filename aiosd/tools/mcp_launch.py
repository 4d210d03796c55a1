"""Starts an MCP server so that it dies with the tool worker:
``python mcp_launch.py PARENT_PID COMMAND [ARG...]``.

The MCP SDK starts a server in a session of its own and offers no hook
between fork and exec, so the bridge starts this script instead: it asks
the kernel for SIGKILL when its parent (the worker's thread that started
it) dies, and then becomes the server with ``exec``, which keeps that
request. A server that never reads its closed stdin, or is stuck when the
worker is killed, would otherwise live on. Processes the server starts in
turn are its own to end (they see its pipes close).

It is run by path (``python -I``), not as a module, and imports nothing of
AIOS: it must be quick, and it must not depend on where the package is
installed nor on the server's ``PYTHON*`` variables, which the server still
gets. Linux only (the parent-death signal is Linux's).
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.stderr.write("usage: mcp_launch.py PARENT_PID COMMAND [ARG...]\n")
        return 2
    parent, command = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            sys.stderr.write(f"MCP server {command[0]}: cannot set the parent-death signal: "
                             f"{os.strerror(err)}\n")
            return 125
        if os.getppid() != parent:  # the worker died before the request took effect
            return 125
    # Python ignores these; an ignored signal stays ignored across exec
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"MCP server {command[0]}: cannot start it: {exc.strerror}\n")
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
