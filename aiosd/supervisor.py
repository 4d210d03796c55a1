"""The supervisor: aiosd's main process.

It prepares the runtime directory (mode 0700, one daemon per directory),
spawns the scheduler, one process per LLM core, one per kernel service
(storage, memory, tools: see roles) and the HTTP gateway, reaps and restarts them
with back-off and a restart budget, reports their states to the scheduler
(so ``aiosctl status`` shows them), talks to systemd, and on SIGTERM runs
the shutdown ladder: shutdown message, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from libaios import paths, protocol
from libaios.protocol import ErrorCode, MsgType

from . import credentials, gpus, logs, procs, roles, rundir
from .config import Config
from .procstate import ProcMachine, ProcState, RestartRules
from .sdnotify import Notifier

log = logging.getLogger(__name__)

#: How often the supervisor asks the scheduler whether it is healthy.
HEALTH_INTERVAL = 1.0


@dataclass(eq=False)
class Child:
    name: str
    kind: str        # "scheduler" or the worker kind ("llm")
    argv: list[str]
    machine: ProcMachine
    popen: subprocess.Popen | None = None
    #: added to the environment it starts with (an LLM core's GPUs: gpus.core_env)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.machine.alive else None

    def to_dict(self) -> dict[str, Any]:
        m = self.machine
        return {
            "name": self.name,
            "kind": self.kind,
            "state": m.state.value,
            "pid": self.pid,
            "restarts": m.restarts,
            "last_exit": m.last_exit,
            "exit": procs.describe_exit(m.last_exit) if m.last_exit is not None else None,
        }


def rules_of(config: Config) -> RestartRules:
    s = config.supervisor
    return RestartRules(
        backoff_initial=s.backoff_initial, backoff_max=s.backoff_max,
        budget=s.restart_budget, window=s.restart_window, stable_after=s.stable_after,
    )


class Supervisor:
    def __init__(self, config: Config, runtime_dir: Path, data_dir: Path):
        self.config = config
        self.runtime_dir = runtime_dir
        self.data_dir = data_dir
        self.token = credentials.new_secret()
        self.notifier = Notifier()
        rules = rules_of(config)
        child_main = [sys.executable, "-m", "aiosd.child"]
        self.children = [Child(roles.SCHEDULER, roles.SCHEDULER, [*child_main, roles.SCHEDULER],
                               ProcMachine(rules))]
        for core in config.llm.cores:
            self.children.append(
                Child(core.core, roles.LLM, [*child_main, roles.LLM, core.core], ProcMachine(rules),
                      env=gpus.core_env(core))
            )
        for name, (kind, _) in roles.SERVICES.items():
            self.children.append(Child(name, kind, [*child_main, name], ProcMachine(rules)))
        if config.gateway.enabled:
            self.children.append(Child(roles.GATEWAY, roles.GATEWAY, [*child_main, roles.GATEWAY],
                                       ProcMachine(rules)))
        self.stopping = False
        self.ready = False
        self._lock_fd: int | None = None
        self._pending: dict[str, str] = {}
        self._hello_ok = False
        self._last_health = 0.0
        self._last_answer = time.monotonic()
        self._procs_sent: list[dict[str, Any]] | None = None
        #: this machine's GPUs (see find_gpus), for the scheduler's status
        self.gpus: list[dict[str, Any]] = []

    # -- setup -------------------------------------------------------------------

    def lock(self) -> None:
        """Take the runtime directory: one aiosd per directory."""
        rundir.prepare_dir(self.runtime_dir)
        rundir.prepare_dir(self.data_dir)
        self._lock_fd = rundir.lock(self.runtime_dir)

    def unlock(self) -> None:
        rundir.remove_sockets(self.runtime_dir)
        if self._lock_fd is not None:
            rundir.unlock(self.runtime_dir, self._lock_fd)
            self._lock_fd = None

    def find_gpus(self) -> None:
        """Look for GPUs (once: at start), and warn of a core given one
        that is not found; it still starts, given what it asks for."""
        self.gpus = gpus.discover()
        log.info("%s", gpus.describe(self.gpus))
        for warning in gpus.not_found(self.config.llm.cores, self.gpus):
            log.warning("%s", warning)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "AIOS_CONFIG_JSON": self.config.to_json(),
                "AIOS_RUNTIME_DIR": str(self.runtime_dir),
                "AIOS_DATA_DIR": str(self.data_dir),
                "AIOS_SUPERVISOR_PID": str(os.getpid()),
                gpus.ENV: json.dumps(self.gpus),
            }
        )
        # systemd talks to the supervisor only.
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", credentials.FD_ENV):
            env.pop(var, None)
        return env

    # -- children ----------------------------------------------------------------

    def credential_of(self, child: Child) -> str:
        """What ``child`` is given: the secret itself for the scheduler,
        which checks everyone; its own credential for any other."""
        return self.token if child.kind == roles.SCHEDULER else credentials.derive(self.token, child.name)

    def spawn(self, child: Child) -> None:
        now = time.monotonic()
        fd = credentials.pipe_with(self.credential_of(child))
        # a core's GPUs are in its environment before llama.cpp loads: the
        # GPU runtime reads the variables once, at its first use
        env = {**self.child_env(), **child.env, credentials.FD_ENV: str(fd)}
        try:
            child.popen = procs.spawn(child.argv, env, pass_fds=(fd,))
        except OSError as exc:
            log.error("cannot start %s: %s", child.name, exc)
            child.machine.start(now)
            child.machine.exited(now, 127)
            return
        finally:
            os.close(fd)
        child.machine.start(now)
        log.info("started %s (pid %d)", child.name, child.popen.pid,
                 extra=logs.fields(event="proc.started"))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self.children if c.popen and c.popen.pid == pid), None)
            if child is None:
                continue
            code = procs.exit_code(status)
            child.popen.returncode = code  # tell Popen it is reaped
            was = child.machine.state
            child.machine.exited(time.monotonic(), code, permanent=code == roles.EX_CONFIG)
            level = logging.INFO if was is ProcState.STOPPING else logging.WARNING
            log.log(level, "%s (pid %d) ended: %s; now %s", child.name, pid,
                    procs.describe_exit(code), child.machine.state.value,
                    extra=logs.fields(event="proc.ended"))

    def manage(self) -> None:
        now = time.monotonic()
        for child in self.children:
            child.machine.tick(now)
            if not self.stopping and (child.machine.due(now) or child.machine.state is ProcState.STOPPED):
                self.spawn(child)

    # -- talking to the scheduler --------------------------------------------------

    def _send(self, sock: zmq.Socket, mtype: MsgType, body: dict[str, Any], purpose: str) -> None:
        msg = protocol.call(mtype, body, timeout=5.0)
        self._pending[msg.id] = purpose
        if len(self._pending) > 100:  # answers that never came
            self._pending.pop(next(iter(self._pending)))
        sock.send_multipart(protocol.encode(msg), flags=zmq.NOBLOCK)

    def health(self, sock: zmq.Socket) -> None:
        """Introduce ourselves, share the process table, ask for status."""
        if not (self.runtime_dir / paths.KERNEL_SOCKET).exists():
            return
        try:
            if not self._hello_ok:
                self._send(sock, MsgType.HELLO, {"name": "supervisor", "token": self.token,
                                                 "pid": os.getpid()}, "hello")
                return
            table = [c.to_dict() for c in self.children]
            if table != self._procs_sent:
                self._send(sock, MsgType.ADMIN_PROCS, {"procs": table}, "procs")
                self._procs_sent = table
            self._send(sock, MsgType.ADMIN_STATUS, {}, "status")
        except zmq.Again:
            pass

    def on_answer(self, frames: list[bytes]) -> None:
        try:
            _, payload = protocol.split_envelope(frames)
            msg = protocol.decode(payload)
        except protocol.ProtocolError:
            return
        purpose = self._pending.pop(msg.re or "", None)
        if purpose is None:
            return
        self._last_answer = time.monotonic()
        if msg.type is MsgType.ERROR:
            if msg.body.get("code") == ErrorCode.UNAUTHENTICATED:
                self._hello_ok = False  # the scheduler restarted
                self._procs_sent = None
            return
        if purpose == "hello":
            self._hello_ok = True
            self._procs_sent = None
        elif purpose == "status":
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()  # the scheduler loop answers: healthy
            if msg.body.get("ready") and not self.ready:
                self.ready = True
                log.info("aiosd ready on %s", self.runtime_dir)
                self.notifier.ready(f"serving {len(self.config.llm.cores)} LLM core(s)")

    # -- main loop ------------------------------------------------------------------

    def run(self) -> int:
        if not credentials.not_dumpable():
            log.warning("cannot make aiosd's processes non-dumpable: processes of its user "
                        "may read their memory")
        self.lock()
        self.find_gpus()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        flags = {"term": False, "hup": False}

        def on_term(*_: object) -> None:
            flags["term"] = True

        def on_hup(*_: object) -> None:
            flags["hup"] = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(paths.ipc(self.runtime_dir, paths.KERNEL_SOCKET))
        poller = zmq.Poller()
        poller.register(rfd, zmq.POLLIN)
        poller.register(sock, zmq.POLLIN)
        try:
            self.manage()
            while not flags["term"]:
                self.reap()
                self.manage()
                if flags["hup"]:
                    flags["hup"] = False
                    log.warning("SIGHUP: aiosd reads its configuration when it starts; check a "
                                "changed one with `aiosd --check-config` and apply it by "
                                "restarting aiosd (`systemctl restart aiosd`)")
                now = time.monotonic()
                interval = 0.2 if not self.ready else HEALTH_INTERVAL
                if self.notifier.watchdog_interval:
                    interval = min(interval, self.notifier.watchdog_interval)
                if now - self._last_health >= interval:
                    self._last_health = now
                    self.health(sock)
                for fd, _ in poller.poll(100):
                    if fd == rfd:
                        try:
                            os.read(rfd, 512)
                        except BlockingIOError:
                            pass
                    elif fd is sock:
                        while sock.poll(0):
                            self.on_answer(sock.recv_multipart())
            self.shutdown(sock)
        finally:
            sock.close(0)
            signal.set_wakeup_fd(-1)
            os.close(rfd)
            os.close(wfd)
            self.unlock()
        return 0

    def _wait_children(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.reap()
            if not any(c.machine.alive for c in self.children):
                return True
            time.sleep(0.02)
        self.reap()
        return not any(c.machine.alive for c in self.children)

    def shutdown(self, sock: zmq.Socket) -> None:
        """The ladder: ask the scheduler to shut everything down, then
        SIGTERM whatever is left, then SIGKILL."""
        self.stopping = True
        self.notifier.stopping()
        log.info("shutting down")
        for child in self.children:
            child.machine.stop()
        grace = self.config.supervisor.shutdown_grace
        if self._hello_ok:
            try:
                self._send(sock, MsgType.ADMIN_SHUTDOWN, {}, "shutdown")
            except zmq.Again:
                pass
            # the gateway is no worker of the scheduler's: it stops on SIGTERM
            self._signal_all(signal.SIGTERM, kind=roles.GATEWAY)
        else:
            self._signal_all(signal.SIGTERM)
        if self._wait_children(grace):
            return
        log.warning("children still running after %ss: SIGTERM", grace)
        self._signal_all(signal.SIGTERM)
        if self._wait_children(grace):
            return
        log.warning("children still running after SIGTERM: SIGKILL")
        self._signal_all(signal.SIGKILL)
        self._wait_children(5.0)

    def _signal_all(self, sig: int, kind: str | None = None) -> None:
        for child in self.children:
            if kind is not None and child.kind != kind:
                continue
            if child.machine.alive and child.popen is not None:
                try:
                    os.killpg(child.popen.pid, sig)
                except ProcessLookupError:
                    pass
