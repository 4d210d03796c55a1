"""The scheduler: the only process agents talk to.

One loop polls three things: the clients' ROUTER (agents and aiosctl), the
workers' ROUTER, and the output pipes of the agents the kernel launched. A
call is decoded and checked, queued on its resource under the configured
policy, dispatched to a worker with a free slot, and tracked until its final
reply, with a deadline and a known owner. When a worker is lost its calls
run again elsewhere (once) or fail with a retriable error; when an agent is
gone its queued calls are dropped and its running ones cancelled.

This module holds the loop, the sockets, the time tick and agents' end;
the handlers are mixins in clients (hello, system calls), admin
(operator calls), workers (worker messages) and dispatch (queues to
workers, a call's end).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

from libaios import errors, paths, protocol
from libaios.protocol import Message, MsgType
from libaios.wire import send_frames

from .. import confine, credentials, procs, rundir
from ..config import Config
from . import access
from . import policy as policies
from .admin import AdminCalls
from .agents import Agent, AgentState, AgentTable
from .approvals import ApprovalTable
from .calls import Call, CallState
from .clients import RESOURCES, ClientCalls
from .dispatch import Dispatch
from .peers import Session, Worker, parent_of
from .quota import TokenBucket
from .workers import WorkerMessages, not_run_again

log = logging.getLogger(__name__)

#: How long a worker may take to let go of a cancelled call before it is
#: considered wedged and killed (the supervisor restarts it).
CANCEL_GRACE = 5.0
TICK = 0.05


class Scheduler(ClientCalls, AdminCalls, WorkerMessages, Dispatch):
    def __init__(self, config: Config, runtime_dir: Path):
        self.config = config
        self.runtime_dir = runtime_dir
        self.started = time.time()
        self.supervisor_pid = int(os.environ.get("AIOS_SUPERVISOR_PID", "0")) or None
        #: the supervisor's secret (see credentials): it proves the
        #: supervisor, and every kernel process's credential derives from it
        self.supervisor_token = credentials.mine() or None
        self.endpoint = paths.ipc(runtime_dir, paths.KERNEL_SOCKET)
        self.agents = AgentTable(self.endpoint, runtime_dir)
        self.agents.withheld = {core.api_key_env for core in config.llm.cores
                                if core.backend == "openai" and core.api_key_env}
        self.data_dir = Path(os.environ.get("AIOS_DATA_DIR") or paths.data_dir())
        #: whom launched agents run as (see confine)
        self.users = confine.Users(config.kernel.agent_user)
        self.landlock_abi = confine.landlock_abi()
        sched = config.scheduler
        self.rules_by_agent = {rule.agent: rule for rule in sched.agents}
        #: per agent name: its token-rate quota, if it has one
        self.buckets = {rule.agent: TokenBucket(rule.tokens_per_s, rule.burst)
                        for rule in sched.agents if rule.tokens_per_s > 0}
        self.queues: dict[str, policies.Policy] = {
            resource: policies.make("fifo") for resource in ("memory", "storage", "tool")
        }
        self.queues["llm"] = policies.make(
            sched.policy, sched.quantum_tokens, sched.starvation_s, service=self._service,
            priority=self._priority, clock=time.time,
        )
        self.rules = access.AccessRules(config.access)
        self.approvals = ApprovalTable()
        #: tool name -> {"concurrency", "timeout", "read_only", "destructive"}
        self.tool_info: dict[str, dict[str, Any]] = {}
        self.tool_running: dict[str, int] = {}
        self.calls: dict[str, Call] = {}
        self.workers: dict[str, Worker] = {}
        #: a registered worker's connection (its routing id) -> its name
        self.worker_names: dict[bytes, str] = {}
        self.sessions: dict[bytes, Session] = {}
        #: open connections per ("pid", pid) and per ("uid", uid)
        self.session_counts: Counter[tuple[str, int | None]] = Counter()
        self.procs: list[dict[str, Any]] = []
        self.stopping = False
        self._next_pid_check = 0.0
        self._next_prune = 0.0
        # the last client message's frame: what the OS says of its sender is
        # read for hello only (every later message has a session)
        self._peer_frame: zmq.Frame | None = None
        self.preemptions = 0
        self.client_handlers: dict[MsgType, Callable[[Session | None, bytes, Message], None]] = {
            MsgType.HELLO: self.on_hello,
            MsgType.BYE: lambda session, identity, msg: self.client_gone(identity),
            **{mtype: self.on_schedulable for mtype in RESOURCES},
            MsgType.AGENT_WHOAMI: self.on_whoami,
            MsgType.AGENT_RUN: self.on_agent_run,
            MsgType.ADMIN_STATUS: self.on_status,
            MsgType.ADMIN_PS: self.on_ps,
            MsgType.ADMIN_KILL: self.on_kill,
            MsgType.ADMIN_SHUTDOWN: self.on_shutdown,
            MsgType.ADMIN_PROCS: self.on_procs,
            MsgType.ADMIN_APPROVALS: self.on_approvals,
            MsgType.ADMIN_APPROVE: self.on_decide,
            MsgType.ADMIN_DENY: self.on_decide,
            MsgType.ADMIN_AUDIT: self.on_audit,
        }
        self.worker_handlers: dict[MsgType, Callable[[bytes, Message], None]] = {
            MsgType.WORKER_READY: self.on_worker_ready,
            MsgType.WORKER_HEARTBEAT: self.on_worker_heartbeat,
            MsgType.PARTIAL: self.on_worker_result,
            MsgType.WORKER_PROGRESS: self.on_worker_result,
            MsgType.REPLY: self.on_worker_result,
            MsgType.ERROR: self.on_worker_result,
        }
        ctx = zmq.Context.instance()
        self.clients = ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.clients.setsockopt(zmq.SNDHWM, 100_000)
        self.clients.setsockopt(zmq.RCVHWM, 100_000)
        self.clients.setsockopt(zmq.LINGER, 500)
        # Past this zmq drops the connection outright; below it, an oversized
        # body is answered with a TOO_LARGE error by the decoder.
        self.clients.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_BODY_BYTES)
        self.workers_sock = ctx.socket(zmq.ROUTER)
        self.workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers_sock.setsockopt(zmq.LINGER, 500)
        self.events = ctx.socket(zmq.PUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.poller = zmq.Poller()

    # -- sockets -------------------------------------------------------------

    def bind(self) -> None:
        old_umask = os.umask(0o077)
        try:
            for sock, name in (
                (self.clients, paths.KERNEL_SOCKET),
                (self.workers_sock, paths.WORKERS_SOCKET),
                (self.events, paths.EVENTS_SOCKET),
            ):
                path = self.runtime_dir / name
                if path.exists():
                    path.unlink()  # a stale socket of a dead scheduler
                sock.bind(paths.ipc(self.runtime_dir, name))
        finally:
            os.umask(old_umask)
        # Agents of other users (the dynamic users of launched agents, the
        # uids in access.allow_uids) reach kernel.sock, and nothing else
        # here: the directory can be passed through but not listed, the
        # workers' and events' sockets stay the daemon's own. Who may do
        # what over kernel.sock is decided at hello, from what the OS says.
        others = os.getuid() == 0 or bool(self.config.access.allow_uids)
        os.chmod(self.runtime_dir, 0o711 if others else 0o700)
        if others:
            os.chmod(self.runtime_dir / paths.KERNEL_SOCKET, 0o666)
        self.poller.register(self.clients, zmq.POLLIN)
        self.poller.register(self.workers_sock, zmq.POLLIN)

    def send_client(self, identity: bytes | None, msg: Message) -> None:
        if identity is None:
            if msg.type is MsgType.ERROR:
                log.warning("kernel-internal call failed: %s", msg.body.get("message"))
            return
        try:
            send_frames(self.clients, [identity, *protocol.encode(msg)], nonblocking=True)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self.client_gone(identity)
            else:
                raise

    def send_worker(self, worker: Worker, msg: Message, gone_if_unreachable: bool = True) -> bool:
        """Send ``msg`` to ``worker``; False if it cannot take it (and, with
        ``gone_if_unreachable``, the worker is then taken for lost)."""
        try:
            send_frames(self.workers_sock, [worker.identity, *protocol.encode(msg)],
                        nonblocking=True)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                if gone_if_unreachable:
                    self.worker_lost(worker, "its connection is gone")
                return False
            raise

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.events.send_multipart([topic.encode(), msgpack.packb(body, use_bin_type=True)])

    def reply_error(self, identity: bytes, call_id: str | None, exc: errors.AIOSError) -> None:
        self.send_client(identity, protocol.error(call_id, exc.code, exc.message, exc.retriable))

    # -- agents ---------------------------------------------------------------

    def on_agent_output(self, fd: int) -> None:
        got = self.agents.read_output(fd)
        if got is None:
            return
        agent, stream, data = got
        if not data:
            self.poller.unregister(fd)
            return
        text = data.decode("utf-8", errors="replace")
        for identity, call_id in list(agent.watchers):
            self.send_client(identity, protocol.partial(call_id, {"stream": stream, "data": text}))

    def add_session(self, session: Session) -> None:
        self.sessions[session.identity] = session
        for key in (("pid", session.pid), ("uid", session.uid)):
            self.session_counts[key] += 1
        if session.agent is not None:
            session.agent.sessions.add(session.identity)

    def drop_session(self, identity: bytes) -> Session | None:
        """Forget one connection: its cost is its own, never all sessions'."""
        session = self.sessions.pop(identity, None)
        if session is None:
            return None
        for key in (("pid", session.pid), ("uid", session.uid)):
            self.session_counts[key] -= 1
            if self.session_counts[key] <= 0:
                del self.session_counts[key]
        if session.agent is not None:
            session.agent.sessions.discard(identity)
        for agent in session.watching:
            agent.watchers = [w for w in agent.watchers if w[0] != identity]
        return session

    def client_gone(self, identity: bytes) -> None:
        session = self.drop_session(identity)
        if session is None:
            return
        agent = session.agent
        if agent is not None and not agent.launched and not agent.sessions:
            self.agents.disconnect(agent, time.time())
            self.forget_agent(agent)

    def _prune_operator_sessions(self) -> None:
        """An operator's connection (one per aiosctl run) leaves no trace
        when it closes: its session goes once its process is gone."""
        for identity, session in list(self.sessions.items()):
            if (session.agent is None and not session.internal and session.pid is not None
                    and not psutil.pid_exists(session.pid)):
                self.client_gone(identity)

    def agent_ended(self, agent: Agent) -> None:
        self.forget_agent(agent)
        if agent.launched:
            self.users.release(agent.uid)
        for identity in list(agent.sessions):
            self.drop_session(identity)
        body = {"event": "exited", "agent": agent.id, "exit_code": agent.exit_code,
                "state": agent.state.value}
        for identity, call_id in agent.watchers:
            self.send_client(identity, protocol.reply(call_id, body))
        agent.watchers.clear()
        self.publish(f"agent.{agent.id}.{agent.state.value}", body)

    # -- time ------------------------------------------------------------------

    def drain_workers(self) -> None:
        """Handle what the workers sent (a burst at most)."""
        for _ in range(1000):
            try:
                raw = self.workers_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.on_worker_frames([f.bytes for f in raw], raw[-1])

    def tick(self, now: float) -> None:
        # Heartbeats that came while this loop was busy (a big client
        # message) count before any worker is taken for lost.
        self.drain_workers()
        liveness = self.config.kernel.heartbeat_interval * self.config.kernel.heartbeat_liveness
        for worker in list(self.workers.values()):
            if now - worker.last_seen > liveness:
                self.worker_lost(worker, f"no heartbeat for {now - worker.last_seen:.1f}s")
        for approval in self.approvals.expired(now):
            self._settle(approval, False, "by timeout: no decision before the deadline", now)
        for call in list(self.calls.values()):
            if call.state is CallState.PENDING:
                continue  # its approval's expiry (at most the deadline) settles it
            if call.state is CallState.CANCELLING:
                if now - call.cancel_sent > CANCEL_GRACE:
                    self._kill_wedged(call)
                continue
            if call.deadline is None or now <= call.deadline:
                continue
            where = f"running on {call.worker}"
            if call.state is CallState.QUEUED:
                where = "queued"
                bucket = self.buckets.get(call.caller.get("name", ""))
                if call.throttled and bucket is not None:
                    where += (f", held back by its agent's token quota of {bucket.rate:g} "
                              f"tokens/s (scheduler.agents[].tokens_per_s)")
            timeout: errors.AIOSError = errors.Timeout(
                f"{call.type.value} did not finish before its deadline ({where})")
            if call.held_for is not None:
                # it may have run, or run still: not a call that never started
                timeout = not_run_again(call, call.held_for, "its deadline passed first")
            if call.state is CallState.QUEUED:
                self.queues[call.resource].remove(call)
                self.fail(call, timeout, now)
            else:
                err = protocol.error(call.client_call_id, timeout.code, timeout.message)
                self.send_client(call.client, err)
                self.cancel(call, now)
                agent = self.agents.get(call.agent)
                if agent is not None:   # (its usage is not finished: count it here)
                    agent.usage.failed += 1
                    agent.usage.throttled += call.throttled
        check_pids = now >= self._next_pid_check
        if check_pids:
            self._next_pid_check = now + 1.0
        for agent in self.agents.reap(now, check_pids):
            self.agent_ended(agent)
        if check_pids:
            procs.reap_adopted(self.agents.own_children())
        if now >= self._next_prune:
            # the records of agents that ended long ago (aiosctl ps keeps
            # showing them for an hour)
            self._next_prune = now + 60.0
            self.agents.prune(now)
            self._prune_operator_sessions()
        self.agents.enforce_kills(now)
        self._preempt()
        if self.buckets:
            self.dispatch()  # quotas refill with time

    def _kill_wedged(self, call: Call) -> None:
        worker = self.workers.get(call.worker or "")
        if worker is None:
            self.calls.pop(call.kid, None)
            return
        log.warning("worker %s ignored a cancel for %ss: killing it", worker.name, CANCEL_GRACE)
        try:
            # only a process the supervisor started (the pid is what the OS
            # reported when it registered; it may have ended and been reused)
            if self.supervisor_pid is not None and parent_of(worker.pid) != self.supervisor_pid:
                raise ProcessLookupError(f"pid {worker.pid} is no longer a process of aiosd's")
            os.kill(worker.pid, signal.SIGKILL)
        except OSError as exc:   # gone already, or (a bad READY) not ours
            log.warning("could not kill worker %s (pid %d): %s", worker.name, worker.pid, exc)
        self.worker_lost(worker, "it did not let go of a cancelled call")

    # -- main loop --------------------------------------------------------------

    def shutdown_workers(self) -> None:
        now = time.time()
        for call in list(self.calls.values()):
            if call.state is not CallState.CANCELLING:
                self._release_held(call)   # a result that still comes is not a second reply
                self.fail(call, errors.ShuttingDown("aiosd is shutting down"), now)
        for worker in list(self.workers.values()):
            self.send_worker(worker, protocol.call(MsgType.WORKER_SHUTDOWN))
        for agent in self.agents.agents.values():
            if agent.alive and agent.launched:
                self.agents.kill(agent, now, grace=2.0)

    def run(self) -> None:
        def on_term(*_: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        if not procs.become_subreaper():
            log.warning("cannot become the subreaper of launched agents: a process an agent "
                        "abandons is not recognised as that agent's")
        self.bind()
        log.info("scheduler listening on %s", self.endpoint)
        next_tick = time.monotonic()
        drain_until = None
        while True:
            if self.stopping and drain_until is None:
                self.shutdown_workers()
                drain_until = time.monotonic() + 3.0
            if drain_until is not None:
                launched_alive = any(
                    a.launched and a.state is AgentState.RUNNING for a in self.agents.agents.values()
                )
                if time.monotonic() > drain_until or not launched_alive:
                    break
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                ready = dict(self.poller.poll(int(timeout * 1000) + 1))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            if self.workers_sock in ready:
                self.drain_workers()
            if self.clients in ready:
                for _ in range(1000):
                    try:
                        self.on_client_frames(self.clients.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            for fd in ready:
                if isinstance(fd, int):
                    self.on_agent_output(fd)
            if time.monotonic() >= next_tick:
                self.tick(time.time())
                next_tick = time.monotonic() + TICK
        self.close()

    def close(self) -> None:
        for sock in (self.clients, self.workers_sock, self.events):
            sock.close()
        rundir.remove_sockets(self.runtime_dir)


def serve(config: Config, runtime_dir: Path) -> None:
    Scheduler(config, runtime_dir).run()
