"""Where the kernel's sockets and data live.

The same rules serve ``aiosd``, ``aiosctl`` and agents, so that all three
agree without configuration: ``AIOS_RUNTIME_DIR``, else the directory systemd
made for the service (``RUNTIME_DIRECTORY``), else ``$XDG_RUNTIME_DIR/aios``,
else ``/tmp/aios-<uid>``; data likewise from ``AIOS_DATA_DIR``,
``STATE_DIRECTORY``, ``$XDG_DATA_HOME/aios`` or ``~/.local/share/aios``.
"""

from __future__ import annotations

import os
from pathlib import Path

KERNEL_SOCKET = "kernel.sock"
WORKERS_SOCKET = "workers.sock"
EVENTS_SOCKET = "events.sock"
PID_FILE = "aiosd.pid"
LOG_FILE = "aiosd.log"


def _first(var: str) -> str | None:
    # systemd may pass several colon-separated directories; the first is ours.
    value = os.environ.get(var)
    return value.split(":")[0] if value else None


def runtime_dir() -> Path:
    """The runtime directory (sockets, pid file)."""
    explicit = os.environ.get("AIOS_RUNTIME_DIR") or _first("RUNTIME_DIRECTORY")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "aios"
    return Path(f"/tmp/aios-{os.getuid()}")


def data_dir() -> Path:
    """The data directory (durable state)."""
    explicit = os.environ.get("AIOS_DATA_DIR") or _first("STATE_DIRECTORY")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "aios"


def ipc(directory: Path, name: str) -> str:
    """The ZeroMQ ipc endpoint of socket ``name`` in ``directory``."""
    return f"ipc://{directory / name}"


def kernel_endpoint() -> str:
    """The endpoint agents and aiosctl connect to (``AIOS_ENDPOINT`` wins)."""
    return os.environ.get("AIOS_ENDPOINT") or ipc(runtime_dir(), KERNEL_SOCKET)
