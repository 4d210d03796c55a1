"""The scheduler: the only process agents talk to.

One loop polls three things: the clients' ROUTER (agents and aiosctl), the
workers' ROUTER, and the output pipes of the agents the kernel launched. A
call is decoded and checked, queued on its resource under the configured
policy, dispatched to a worker with a free slot, and tracked until its final
reply, with a deadline and a known owner. When a worker is lost its calls
run again elsewhere (once) or fail with a retriable error; when an agent is
gone its queued calls are dropped and its running ones cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

import libaios
from libaios import errors, paths, protocol
from libaios.protocol import ErrorCode, Message, MsgType

from ..config import Config
from ..llm import request as chat_request
from . import policy as policies
from .agents import Agent, AgentState, AgentTable
from .calls import Call, CallState

log = logging.getLogger(__name__)

#: The resource (queue, worker kind) each schedulable call type runs on.
RESOURCES: dict[MsgType, str] = {MsgType.LLM_CHAT: "llm", MsgType.SYS_NULL: "llm"}

#: How long a worker may take to let go of a cancelled call before it is
#: considered wedged and killed (the supervisor restarts it).
CANCEL_GRACE = 5.0
#: Longest deadline accepted for a call, seconds from now.
MAX_DEADLINE = 24 * 3600.0
TICK = 0.05


@dataclass(eq=False)
class Worker:
    name: str
    kind: str
    capacity: int
    pid: int
    types: frozenset[str]
    info: dict[str, Any]
    last_seen: float
    registered: float
    inflight: dict[str, Call] = field(default_factory=dict)
    served: int = 0
    last_dispatch: float = 0.0

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": self.pid,
            "capacity": self.capacity,
            "running": len(self.inflight),
            "served": self.served,
            "info": self.info,
        }


@dataclass(eq=False)
class Session:
    """One client connection that said hello."""

    identity: bytes
    name: str
    operator: bool
    agent: Agent | None = None

    @property
    def account(self) -> str:
        return self.agent.id if self.agent else f"operator:{self.name}"


class Scheduler:
    def __init__(self, config: Config, runtime_dir: Path):
        self.config = config
        self.runtime_dir = runtime_dir
        self.started = time.time()
        self.supervisor_pid = int(os.environ.get("AIOS_SUPERVISOR_PID", "0")) or None
        self.supervisor_token = os.environ.get("AIOS_SUPERVISOR_TOKEN") or None
        self.endpoint = paths.ipc(runtime_dir, paths.KERNEL_SOCKET)
        self.agents = AgentTable(self.endpoint, runtime_dir)
        self.queues: dict[str, policies.Policy] = {
            "llm": policies.make(config.scheduler.policy)
        }
        self.calls: dict[str, Call] = {}
        self.workers: dict[str, Worker] = {}
        self.sessions: dict[bytes, Session] = {}
        self.procs: list[dict[str, Any]] = []
        self.stopping = False
        self._next_pid_check = 0.0
        self.client_handlers: dict[MsgType, Callable[[Session | None, bytes, Message], None]] = {
            MsgType.HELLO: self.on_hello,
            MsgType.LLM_CHAT: self.on_schedulable,
            MsgType.SYS_NULL: self.on_schedulable,
            MsgType.AGENT_WHOAMI: self.on_whoami,
            MsgType.AGENT_RUN: self.on_agent_run,
            MsgType.ADMIN_STATUS: self.on_status,
            MsgType.ADMIN_PS: self.on_ps,
            MsgType.ADMIN_KILL: self.on_kill,
            MsgType.ADMIN_SHUTDOWN: self.on_shutdown,
            MsgType.ADMIN_PROCS: self.on_procs,
        }
        self.worker_handlers: dict[MsgType, Callable[[bytes, Message], None]] = {
            MsgType.WORKER_READY: self.on_worker_ready,
            MsgType.WORKER_HEARTBEAT: self.on_worker_heartbeat,
            MsgType.PARTIAL: self.on_worker_result,
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
        # A restarted worker reconnects under the same name: let it take over.
        self.workers_sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
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
        self.poller.register(self.clients, zmq.POLLIN)
        self.poller.register(self.workers_sock, zmq.POLLIN)

    def send_client(self, identity: bytes, msg: Message) -> None:
        try:
            self.clients.send_multipart([identity, *protocol.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self.client_gone(identity)
            else:
                raise

    def send_worker(self, worker: Worker, msg: Message) -> bool:
        try:
            self.workers_sock.send_multipart(
                [worker.name.encode(), *protocol.encode(msg)], flags=zmq.NOBLOCK
            )
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self.worker_lost(worker, "its connection is gone")
                return False
            raise

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.events.send_multipart([topic.encode(), msgpack.packb(body, use_bin_type=True)])

    def reply_error(self, identity: bytes, call_id: str | None, exc: errors.AIOSError) -> None:
        self.send_client(identity, protocol.error(call_id, exc.code, exc.message, exc.retriable))

    # -- client messages -----------------------------------------------------

    def on_client_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            _, payload = protocol.split_envelope(frames)
        except protocol.ProtocolError as exc:
            self.send_client(identity, protocol.error(None, exc.code, exc.message))
            return
        try:
            msg = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            self.send_client(identity, protocol.error(protocol.peek_id(payload), exc.code, exc.message))
            return
        handler = self.client_handlers.get(msg.type)
        if handler is None:
            self.send_client(
                identity,
                protocol.error(msg.id, ErrorCode.UNKNOWN_TYPE, f"{msg.type.value!r} is not a system call"),
            )
            return
        session = self.sessions.get(identity)
        if session is None and msg.type is not MsgType.HELLO:
            self.send_client(
                identity,
                protocol.error(msg.id, ErrorCode.UNAUTHENTICATED, "this connection has not said hello"),
            )
            return
        if self.stopping and msg.type is not MsgType.ADMIN_STATUS:
            self.reply_error(identity, msg.id, errors.ShuttingDown("aiosd is shutting down"))
            return
        try:
            handler(session, identity, msg)
        except errors.AIOSError as exc:
            self.reply_error(identity, msg.id, exc)
        except Exception as exc:  # a bug must cost one call, not the kernel
            log.exception("handling %s failed", msg.type.value)
            self.reply_error(identity, msg.id, errors.InternalError(f"{type(exc).__name__}: {exc}"))

    def on_hello(self, session: Session | None, identity: bytes, msg: Message) -> None:
        body = msg.body
        name = body.get("name") or "agent"
        if not isinstance(name, str) or len(name) > 64:
            raise errors.InvalidArgument("hello: 'name' must be a string of at most 64 characters")
        token = body.get("token")
        pid = body.get("pid") if isinstance(body.get("pid"), int) else None
        if session is not None:  # a second hello on one connection changes nothing
            self.send_client(identity, protocol.reply(msg.id, self._whoami(session)))
            return
        if token:
            if token == self.supervisor_token:
                session = Session(identity, "supervisor", operator=True)
            else:
                agent = self.agents.by_token(token) if isinstance(token, str) else None
                if agent is None or not agent.alive:
                    raise errors.Unauthenticated("hello: the agent credential is not valid")
                session = Session(identity, agent.name, operator=False, agent=agent)
        elif body.get("operator"):
            session = Session(identity, name, operator=True)
        else:
            agent = self.agents.register(name, pid)
            session = Session(identity, name, operator=False, agent=agent)
            self.publish(f"agent.{agent.id}.connected", {"agent": agent.id, "pid": pid})
        self.sessions[identity] = session
        self.send_client(identity, protocol.reply(msg.id, self._whoami(session)))

    def _whoami(self, session: Session) -> dict[str, Any]:
        agent = session.agent
        return {
            "agent": session.account,
            "name": session.name,
            "operator": session.operator,
            "launched": bool(agent and agent.launched),
            "pid": agent.pid if agent else None,
            "kernel_version": libaios.__version__,
        }

    def on_whoami(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        self.send_client(identity, protocol.reply(msg.id, self._whoami(session)))

    def on_schedulable(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        if msg.type is MsgType.LLM_CHAT:
            chat_request.parse(msg.body)  # reject bad input before it queues
        resource = RESOURCES[msg.type]
        queue = self.queues[resource]
        if len(queue) >= self.config.kernel.max_queue:
            raise errors.Overloaded(
                f"{len(queue)} calls already wait for {resource}; try again later"
            )
        if not self._can_ever_serve(resource):
            raise errors.Unavailable(f"no {resource} worker can run: see `aiosctl status`")
        now = time.time()
        deadline = msg.deadline if msg.deadline is not None else now + self.config.kernel.call_timeout
        deadline = min(deadline, now + MAX_DEADLINE)
        call = Call(
            kid=protocol.new_id(), client=identity, client_call_id=msg.id,
            agent=session.account, type=msg.type, resource=resource, body=msg.body,
            deadline=deadline, submitted=now, queued_at=now,
        )
        self.calls[call.kid] = call
        if session.agent is not None and session.agent.usage.first_call is None:
            session.agent.usage.first_call = now
        queue.push(call)
        self.dispatch()

    def _can_ever_serve(self, resource: str) -> bool:
        if any(w.kind == resource for w in self.workers.values()):
            return True
        # No worker yet: fine while one is starting; not when all have failed.
        kinds = [p for p in self.procs if p.get("kind") == resource]
        return not kinds or any(p.get("state") != "fatal" for p in kinds)

    def on_agent_run(self, session: Session | None, identity: bytes, msg: Message) -> None:
        body = msg.body
        path = body.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise errors.InvalidArgument("agent.run: 'path' must be an absolute path to a Python file")
        if not os.path.isfile(path):
            raise errors.NotFound(f"agent.run: no agent file at {path}")
        args = body.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise errors.InvalidArgument("agent.run: 'args' must be a list of strings")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise errors.InvalidArgument("agent.run: 'env' must map strings to strings")
        name = body.get("name") or Path(path).stem
        if not isinstance(name, str) or not name or len(name) > 64:
            raise errors.InvalidArgument("agent.run: 'name' must be a string of 1-64 characters")
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not os.path.isdir(cwd)):
            raise errors.InvalidArgument(f"agent.run: 'cwd' {cwd!r} is not a directory")
        try:
            agent = self.agents.launch(path, args, name, cwd, env)
        except OSError as exc:
            raise errors.InvalidArgument(f"agent.run: cannot start {path}: {exc.strerror}") from None
        for fd in agent.pipes:
            self.poller.register(fd, zmq.POLLIN)
        self.publish(f"agent.{agent.id}.started", {"agent": agent.id, "pid": agent.pid, "path": path})
        info = {"agent": agent.id, "pid": agent.pid, "name": agent.name}
        if body.get("wait"):
            agent.watchers.append((identity, msg.id))
            self.send_client(identity, protocol.partial(msg.id, {"event": "started", **info}))
        else:
            self.send_client(identity, protocol.reply(msg.id, info))

    def on_status(self, session: Session | None, identity: bytes, msg: Message) -> None:
        self.send_client(identity, protocol.reply(msg.id, self.status()))

    def status(self) -> dict[str, Any]:
        now = time.time()
        cores = []
        for core in self.config.llm.cores:
            worker = self.workers.get(core.name)
            proc = next((p for p in self.procs if p.get("name") == core.name), {})
            state = "ready" if worker else ("failed" if proc.get("state") == "fatal" else "starting")
            entry = {"name": core.name, "backend": core.backend, "state": state,
                     "proc": proc or None}
            if worker:
                entry.update(worker.to_dict())
            cores.append(entry)
        return {
            "version": libaios.__version__,
            "pid": os.getpid(),
            "supervisor_pid": self.supervisor_pid,
            "runtime_dir": str(self.runtime_dir),
            "started": self.started,
            "uptime_s": round(now - self.started, 3),
            # ready: every core serves, and (under a supervisor) the process
            # table has arrived, so what status shows is complete
            "ready": all(c["state"] == "ready" for c in cores)
            and (bool(self.procs) or not self.supervisor_token),
            "stopping": self.stopping,
            "policy": self.config.scheduler.policy,
            "cores": cores,
            "procs": self.procs,
            "queues": {name: len(q) for name, q in self.queues.items()},
            "running": sum(len(w.inflight) for w in self.workers.values()),
            "agents": sum(1 for a in self.agents.agents.values() if a.alive),
        }

    def on_ps(self, session: Session | None, identity: bytes, msg: Message) -> None:
        now = time.time()
        rows = []
        for agent in self.agents.agents.values():
            row = agent.to_dict(now)
            row["queued"] = sum(
                1 for c in self.calls.values() if c.agent == agent.id and c.state is CallState.QUEUED
            )
            row["running"] = sum(
                1 for c in self.calls.values() if c.agent == agent.id and c.state is CallState.RUNNING
            )
            rows.append(row)
        self.send_client(identity, protocol.reply(msg.id, {"agents": rows}))

    def _find_agent(self, ref: Any) -> Agent:
        if isinstance(ref, str):
            agent = self.agents.get(ref)
            if agent is not None:
                return agent
        matches = [
            a for a in self.agents.agents.values()
            if a.alive and (a.name == ref or (isinstance(ref, int) and a.pid == ref)
                            or (isinstance(ref, str) and ref.isdigit() and a.pid == int(ref)))
        ]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise errors.InvalidArgument(
                f"{ref!r} names {len(matches)} agents: give one id ({', '.join(a.id for a in matches)})"
            )
        raise errors.NotFound(f"no agent {ref!r}: see `aiosctl ps`")

    def on_kill(self, session: Session | None, identity: bytes, msg: Message) -> None:
        agent = self._find_agent(msg.body.get("agent"))
        if not agent.launched:
            raise errors.InvalidArgument(
                f"agent {agent.id} was started by hand (pid {agent.pid}); the kernel only kills "
                "agents it launched"
            )
        if not agent.alive:
            raise errors.NotFound(f"agent {agent.id} has already ended ({agent.state.value})")
        self.agents.kill(agent, time.time())
        self.drop_calls_of(agent.id)
        self.send_client(identity, protocol.reply(msg.id, {"agent": agent.id, "pid": agent.pid}))

    def on_shutdown(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        self.send_client(identity, protocol.reply(msg.id, {"stopping": True}))
        if session.name == "supervisor" and session.operator and self.supervisor_token:
            self.stopping = True  # the supervisor's ladder, first rung
        elif self.supervisor_pid:
            os.kill(self.supervisor_pid, signal.SIGTERM)
        else:
            self.stopping = True

    def on_procs(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        if session.name != "supervisor" or not session.operator:
            raise errors.PermissionDenied("admin.procs comes from the supervisor only")
        procs = msg.body.get("procs")
        if isinstance(procs, list):
            old = {p.get("name"): p.get("state") for p in self.procs}
            self.procs = procs
            for proc in procs:
                if old.get(proc.get("name")) != proc.get("state"):
                    self.publish(f"proc.{proc.get('name')}.{proc.get('state')}", proc)
        self.send_client(identity, protocol.reply(msg.id, {}))

    # -- dispatch ------------------------------------------------------------

    def _free_worker(self, resource: str, call_type: MsgType) -> Worker | None:
        best = None
        for worker in self.workers.values():
            if worker.kind != resource or worker.free <= 0 or call_type.value not in worker.types:
                continue
            # the most free slots first; among equals the one idle longest
            if best is None or (worker.free, -worker.last_dispatch) > (best.free, -best.last_dispatch):
                best = worker
        return best

    def dispatch(self) -> None:
        for resource, queue in self.queues.items():
            while len(queue):
                head = next(iter(queue))
                worker = self._free_worker(resource, head.type)
                if worker is None:
                    break
                call = queue.pop()
                assert call is not None
                self._start(call, worker)

    def _start(self, call: Call, worker: Worker) -> None:
        now = time.time()
        call.wait_s += now - call.queued_at
        call.state = CallState.RUNNING
        call.worker = worker.name
        call.attempts += 1
        call.dispatched = now
        worker.inflight[call.kid] = call
        worker.last_dispatch = now
        task = Message(
            MsgType.WORKER_TASK, protocol.new_id(),
            {"call": call.kid, "type": call.type.value, "body": call.body},
            deadline=call.deadline,
        )
        self.send_worker(worker, task)

    def finish(self, call: Call, result: Message | None, now: float) -> None:
        """Account a call that left the kernel and answer its caller
        (``result`` None: the caller already has its answer, or is gone)."""
        self.calls.pop(call.kid, None)
        if call.state is CallState.RUNNING:
            call.service_s += now - call.dispatched
        elif call.state is CallState.QUEUED:
            call.wait_s += now - call.queued_at
        if result is not None:
            self.send_client(call.client, result)
        agent = self.agents.get(call.agent)
        if agent is None:
            return
        usage = agent.usage
        usage.calls += 1
        usage.wait_s += call.wait_s
        usage.service_s += call.service_s
        usage.last_done = now
        if result is None or result.type is MsgType.ERROR:
            usage.failed += 1
        elif call.type is MsgType.LLM_CHAT:
            tokens = result.body.get("usage", {})
            usage.prompt_tokens += int(tokens.get("prompt_tokens", 0))
            usage.completion_tokens += int(tokens.get("completion_tokens", 0))

    def fail(self, call: Call, exc: errors.AIOSError, now: float) -> None:
        err = protocol.error(call.client_call_id, exc.code, exc.message, exc.retriable)
        self.finish(call, err, now)

    def cancel(self, call: Call, now: float) -> None:
        """Tell the call's worker to stop it; its slot stays taken until the
        worker lets go (or is killed as wedged)."""
        worker = self.workers.get(call.worker or "")
        call.state = CallState.CANCELLING
        call.cancel_sent = now
        if worker is not None:
            self.send_worker(worker, protocol.call(MsgType.WORKER_CANCEL, {"call": call.kid}))

    def drop_calls_of(self, agent_id: str) -> None:
        now = time.time()
        for call in list(self.calls.values()):
            if call.agent != agent_id:
                continue
            if call.state is CallState.QUEUED:
                self.queues[call.resource].remove(call)
                self.finish(call, None, now)
            elif call.state is CallState.RUNNING:
                self.cancel(call, now)

    # -- worker messages -----------------------------------------------------

    def on_worker_frames(self, frames: list[bytes]) -> None:
        try:
            routing, payload = protocol.split_envelope(frames)
            msg = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            log.warning("undecodable message from worker %r: %s", frames[0][:32], exc.message)
            return
        handler = self.worker_handlers.get(msg.type)
        if handler is None:
            log.warning("worker %r sent %s, which workers do not send", routing[0], msg.type.value)
            return
        handler(routing[0], msg)

    def on_worker_ready(self, wid: bytes, msg: Message) -> None:
        body = msg.body
        name = wid.decode(errors="replace")
        old = self.workers.get(name)
        if old is not None:
            if old.pid == body.get("pid"):
                old.last_seen = time.time()
                return
            self.worker_lost(old, "it was restarted")
        now = time.time()
        try:
            worker = Worker(
                name=name, kind=str(body["kind"]), capacity=max(1, int(body["capacity"])),
                pid=int(body["pid"]), types=frozenset(map(str, body.get("types", []))),
                info=dict(body.get("info") or {}), last_seen=now, registered=now,
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("worker %s sent a bad READY: %s", name, exc)
            return
        self.workers[name] = worker
        log.info("worker %s ready (pid %d, capacity %d)", name, worker.pid, worker.capacity)
        self.publish(f"worker.{name}.ready", worker.to_dict())
        self.dispatch()

    def on_worker_heartbeat(self, wid: bytes, msg: Message) -> None:
        worker = self.workers.get(wid.decode(errors="replace"))
        if worker is None:
            # We do not know it (we restarted, or dropped it): ask it to
            # register again.
            self.workers_sock.send_multipart(
                [wid, *protocol.encode(protocol.error(None, ErrorCode.UNAUTHENTICATED, "register"))]
            )
            return
        worker.last_seen = time.time()

    def on_worker_result(self, wid: bytes, msg: Message) -> None:
        worker = self.workers.get(wid.decode(errors="replace"))
        if worker is None or msg.re is None:
            return
        worker.last_seen = time.time()
        call = worker.inflight.get(msg.re)
        if call is None:
            return  # the answer to a call already settled
        if msg.type is MsgType.PARTIAL:
            if call.state is CallState.RUNNING:
                call.streamed = True
                self.send_client(call.client, protocol.partial(call.client_call_id, msg.body))
            return
        del worker.inflight[call.kid]
        worker.served += 1
        now = time.time()
        if call.state is CallState.RUNNING:
            if msg.type is MsgType.REPLY:
                self.finish(call, protocol.reply(call.client_call_id, msg.body), now)
            else:
                envelope = Message(MsgType.ERROR, protocol.new_id(), msg.body, re=call.client_call_id)
                self.finish(call, envelope, now)
        else:
            self.calls.pop(call.kid, None)
        self.dispatch()

    def worker_lost(self, worker: Worker, why: str) -> None:
        """Forget ``worker``; run its calls again elsewhere, or fail them."""
        if self.workers.get(worker.name) is worker:
            del self.workers[worker.name]
        log.warning("worker %s lost: %s", worker.name, why)
        self.publish(f"worker.{worker.name}.lost", {"name": worker.name, "why": why})
        now = time.time()
        for call in list(worker.inflight.values()):
            if call.state is not CallState.RUNNING:
                self.calls.pop(call.kid, None)
                continue
            call.service_s += now - call.dispatched
            if call.streamed or call.attempts > self.config.kernel.max_redispatch:
                # Streamed text cannot be taken back; past the redispatch
                # budget the caller decides whether to try again.
                self.fail(call, errors.WorkerLost(
                    f"{worker.name} stopped while running this call ({why}); it may be retried"
                ), now)
                continue
            call.state = CallState.QUEUED
            call.worker = None
            call.queued_at = now
            self.queues[call.resource].requeue(call)
        worker.inflight.clear()
        self.dispatch()

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

    def client_gone(self, identity: bytes) -> None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        for agent in self.agents.agents.values():
            agent.watchers = [w for w in agent.watchers if w[0] != identity]
        if session.agent is not None and not session.agent.launched:
            self.agents.disconnect(session.agent, time.time())
            self.drop_calls_of(session.agent.id)

    def agent_ended(self, agent: Agent) -> None:
        self.drop_calls_of(agent.id)
        for identity, session in list(self.sessions.items()):
            if session.agent is agent:
                del self.sessions[identity]
        body = {"event": "exited", "agent": agent.id, "exit_code": agent.exit_code,
                "state": agent.state.value}
        for identity, call_id in agent.watchers:
            self.send_client(identity, protocol.reply(call_id, body))
        agent.watchers.clear()
        self.publish(f"agent.{agent.id}.{agent.state.value}", body)

    # -- time ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        liveness = self.config.kernel.heartbeat_interval * self.config.kernel.heartbeat_liveness
        for worker in list(self.workers.values()):
            if now - worker.last_seen > liveness:
                self.worker_lost(worker, f"no heartbeat for {now - worker.last_seen:.1f}s")
        for call in list(self.calls.values()):
            if call.state is CallState.CANCELLING:
                if now - call.cancel_sent > CANCEL_GRACE:
                    self._kill_wedged(call)
                continue
            if call.deadline is None or now <= call.deadline:
                continue
            timeout = errors.Timeout(
                f"{call.type.value} did not finish before its deadline "
                f"({'queued' if call.state is CallState.QUEUED else 'running on ' + str(call.worker)})"
            )
            if call.state is CallState.QUEUED:
                self.queues[call.resource].remove(call)
                self.fail(call, timeout, now)
            else:
                err = protocol.error(call.client_call_id, timeout.code, timeout.message)
                self.send_client(call.client, err)
                self.cancel(call, now)
                agent = self.agents.get(call.agent)
                if agent is not None:
                    agent.usage.failed += 1
        check_pids = now >= self._next_pid_check
        if check_pids:
            self._next_pid_check = now + 1.0
        for agent in self.agents.reap(now, check_pids):
            self.agent_ended(agent)
        self.agents.enforce_kills(now)

    def _kill_wedged(self, call: Call) -> None:
        worker = self.workers.get(call.worker or "")
        if worker is None:
            self.calls.pop(call.kid, None)
            return
        log.warning("worker %s ignored a cancel for %ss: killing it", worker.name, CANCEL_GRACE)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.worker_lost(worker, "it did not let go of a cancelled call")

    # -- main loop --------------------------------------------------------------

    def shutdown_workers(self) -> None:
        now = time.time()
        for call in list(self.calls.values()):
            if call.state is not CallState.CANCELLING:
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
                for _ in range(1000):
                    try:
                        self.on_worker_frames(self.workers_sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.clients in ready:
                for _ in range(1000):
                    try:
                        self.on_client_frames(self.clients.recv_multipart(zmq.NOBLOCK))
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
        remove_sockets(self.runtime_dir)


def remove_sockets(runtime_dir: Path) -> None:
    """Remove the kernel's socket files, so no client mistakes a stale one
    for a running kernel."""
    for name in (paths.KERNEL_SOCKET, paths.WORKERS_SOCKET, paths.EVENTS_SOCKET):
        try:
            (runtime_dir / name).unlink()
        except FileNotFoundError:
            pass


def serve(config: Config, runtime_dir: Path) -> None:
    Scheduler(config, runtime_dir).run()
