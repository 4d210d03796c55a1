"""Fixtures that start a real aiosd on a temporary runtime directory and
always clean it up, even when the test fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

import libaios
from libaios import errors, paths
from libaios.protocol import MsgType

REPO = Path(__file__).resolve().parent.parent
AGENTS = REPO / "agents"
TEST_AGENTS = Path(__file__).resolve().parent / "agents"
READY_TIMEOUT = 180.0


@dataclass
class Daemon:
    """A running aiosd and the means to talk to it."""

    root: Path
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path
    _pids: set[int] = field(default_factory=set)

    @property
    def runtime(self) -> Path:
        return Path(self.env["AIOS_RUNTIME_DIR"])

    @property
    def endpoint(self) -> str:
        return paths.ipc(self.runtime, paths.KERNEL_SOCKET)

    def client(self, **kwargs: Any) -> libaios.Client:
        kwargs.setdefault("name", "test")
        return libaios.Client(self.endpoint, **kwargs).connect()

    def status(self) -> dict[str, Any]:
        with self.client(operator=True, timeout=10) as c:
            return c.call(MsgType.ADMIN_STATUS)

    def ps(self) -> list[dict[str, Any]]:
        with self.client(operator=True, timeout=10) as c:
            return c.call(MsgType.ADMIN_PS, {"limit": 5000})["agents"]

    def core_pid(self, name: str = "smollm2-135m") -> int | None:
        """The pid of core ``name`` while it is registered, else None."""
        core = next(c for c in self.status()["cores"] if c["name"] == name)
        return core.get("pid")

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_ctl(self.env, *args, timeout=timeout)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
                 what: str = "condition") -> dict[str, Any]:
        """Poll the kernel's status until ``predicate`` holds."""
        end = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < end:
            try:
                status = self.status()
                if predicate(status):
                    return status
            except (errors.Timeout, errors.NotRunning, errors.Unauthenticated):
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(status)[:2000]}"
                             f"\nlog:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def remember_pids(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._pids.add(child.pid)
        except psutil.Error:
            pass

    def stop(self) -> int | None:
        """SIGTERM the supervisor, wait, then kill anything left."""
        self.remember_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return self.proc.returncode


def run_ctl(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aiosd.ctl", *args], env=env, capture_output=True, text=True,
        timeout=timeout, cwd=REPO,
    )


def base_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["AIOS_RUNTIME_DIR"] = str(root / "run")
    env["AIOS_DATA_DIR"] = str(root / "data")
    env.pop("AIOS_ENDPOINT", None)
    env.pop("AIOS_AGENT_TOKEN", None)
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_daemon(root: Path, config: dict[str, Any] | None = None,
                 extra_env: dict[str, str] | None = None, wait_ready: bool = True) -> Daemon:
    root.mkdir(parents=True, exist_ok=True)
    env = base_env(root)
    env.update(extra_env or {})
    argv = [sys.executable, "-m", "aiosd"]
    # the gateway on a free port: daemons of tests run side by side
    config = {**(config or {})}
    config["gateway"] = {"listen": "127.0.0.1:0", **config.get("gateway", {})}
    if config is not None:
        cfg_path = root / "aiosd.toml"
        cfg_path.write_text(tomli_w.dumps(config))
        argv += ["--config", str(cfg_path)]
    log = root / "aiosd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=fh, start_new_session=True, cwd=REPO)
    daemon = Daemon(root, env, proc, log)
    if wait_ready:
        try:
            wait_ready_or_fail(daemon)
        except BaseException:
            daemon.stop()
            raise
    return daemon


def wait_ready_or_fail(daemon: Daemon) -> None:
    end = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < end:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"aiosd exited with {daemon.proc.returncode}:\n{daemon.log_text()}")
        try:
            if daemon.status().get("ready"):
                daemon.remember_pids()
                return
        except (errors.NotRunning, errors.Timeout, errors.Unauthenticated):
            pass
        time.sleep(0.1)
    raise AssertionError(f"aiosd did not become ready:\n{daemon.log_text()}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: ipc socket paths are limited
    to about 100 characters."""
    path = Path(tempfile.mkdtemp(prefix="aios-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One aiosd on the embedded model, shared by the tests that only use it."""
    with daemon_with(None) as d:
        yield d


@contextlib.contextmanager
def daemon_with(config: dict[str, Any] | None) -> Iterator[Daemon]:
    """A daemon with ``config`` on a short temporary directory, for a module's tests."""
    root = Path(tempfile.mkdtemp(prefix="aios-"))
    d = start_daemon(root, config)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    """Start a daemon of the test's own (config, fault injection); stopped at the end."""
    started: list[Daemon] = []

    def make(config: dict[str, Any] | None = None, extra_env: dict[str, str] | None = None,
             wait_ready: bool = True) -> Daemon:
        d = start_daemon(short_tmp / f"d{len(started)}", config, extra_env, wait_ready)
        started.append(d)
        return d

    try:
        yield make
    finally:
        for d in started:
            d.stop()


def pending_approval(d: Daemon, name: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """The first pending approval (of agent ``name``, if given), once one appears."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with d.client(operator=True) as op:
            rows = [r for r in op.call(MsgType.ADMIN_APPROVALS)["approvals"]
                    if name is None or r["name"] == name]
        if rows:
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"no approval request{f' of {name}' if name else ''} appeared")


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` on a thread: its value or its AIOSError lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except errors.AIOSError as exc:
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out
