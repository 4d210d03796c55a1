"""The scheduler without its sockets: its state, its outbox, the call
lifecycle and the handlers of clients, operators and workers, put together,
and what happens as time passes (the tick).

Feed it a client's or a worker's frames and read what it would send from
its outbox; server puts it between real sockets.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import zmq

from libaios import errors, protocol
from libaios.protocol import MsgType

from .. import procs
from ..config import Config
from .admin import AdminCalls
from .calls import CallState
from .clients import ClientCalls
from .lifecycle import Lifecycle
from .outbox import Outbox
from .state import State
from .workers import WorkerMessages


class Kernel:
    def __init__(self, config: Config, runtime_dir: Path) -> None:
        self.state = State.create(config, runtime_dir)
        self.out = Outbox()
        self.life = Lifecycle(self.state, self.out)
        self.clients = ClientCalls(self.state, self.out, self.life)
        self.admin = AdminCalls(self.state, self.out, self.life)
        self.workers = WorkerMessages(self.state, self.out, self.life)
        self.clients.handlers.update(self.admin.handlers)
        self._next_pid_check = 0.0
        self._next_prune = 0.0

    def on_client_frames(self, raw: list[zmq.Frame]) -> None:
        self.clients.on_client_frames(raw)

    def on_worker_frames(self, frames: list[bytes], peer: zmq.Frame | None = None) -> None:
        self.workers.on_worker_frames(frames, peer)

    def tick(self, now: float) -> None:
        """What time brings: workers whose heartbeats stopped, calls and
        approvals past their deadline, agents that ended, records to let go
        of, kills to enforce, calls to preempt, quotas that refilled."""
        state, life = self.state, self.life
        kernel = state.config.kernel
        liveness = kernel.heartbeat_interval * kernel.heartbeat_liveness
        for worker in list(state.workers.values()):
            if now - worker.last_seen > liveness:
                life.worker_lost(worker, f"no heartbeat for {now - worker.last_seen:.1f}s")
        life.expire(now)
        check_pids = now >= self._next_pid_check
        if check_pids:
            self._next_pid_check = now + 1.0
        for agent in state.agents.reap(now, check_pids):
            life.agent_ended(agent)
        if check_pids:
            procs.reap_adopted(state.agents.own_children())
        if now >= self._next_prune:
            # the records of agents that ended long ago (aiosctl ps keeps
            # showing them for an hour)
            self._next_prune = now + 60.0
            state.agents.prune(now)
            self._prune_operator_sessions()
        state.agents.enforce_kills(now)
        life.preempt()
        if state.buckets:
            life.dispatch()  # quotas refill with time

    def _prune_operator_sessions(self) -> None:
        """An operator's connection (one per aiosctl run) leaves no trace
        when it closes: its session goes once its process is gone."""
        for identity, session in list(self.state.sessions.items()):
            if (session.agent is None and not session.internal and session.pid is not None
                    and not psutil.pid_exists(session.pid)):
                self.life.client_gone(identity)

    def shut_down(self) -> None:
        """The first rung of the shutdown ladder: every call ends, workers
        are told to stop, launched agents are killed (after a grace)."""
        state, now = self.state, time.time()
        for call in list(state.calls.values()):
            if call.state is not CallState.CANCELLING:
                self.life.release_held(call)   # a result that still comes is not a second reply
                self.life.fail(call, errors.ShuttingDown("aiosd is shutting down"), now)
        for worker in list(state.workers.values()):
            self.out.send_worker(worker, protocol.call(MsgType.WORKER_SHUTDOWN))
        for agent in state.agents.agents.values():
            if agent.alive and agent.launched:
                state.agents.kill(agent, now, grace=2.0)
