"""aiosd speaks systemd's notification protocol when NOTIFY_SOCKET is set."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ..conftest import Daemon

pytestmark = pytest.mark.integration


def recv_until(sock: socket.socket, needle: str, timeout: float = 120.0) -> list[str]:
    sock.settimeout(timeout)
    seen = []
    while True:
        data = sock.recv(4096).decode()
        seen.append(data)
        if needle in data.splitlines():
            return seen


def test_ready_watchdog_and_stopping(make_daemon, short_tmp: Path) -> None:
    path = short_tmp / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        d: Daemon = make_daemon(extra_env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"},
                                wait_ready=False)
        messages = recv_until(sock, "READY=1")
        assert any("STATUS=" in m for m in messages)
        recv_until(sock, "WATCHDOG=1", timeout=10)
        assert d.status()["ready"]
        # children are not told to talk to systemd: only the main process does
        d.stop()
        recv_until(sock, "STOPPING=1", timeout=30)
    finally:
        sock.close()
