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
from libaios.wire import send_frames

from .. import procs
from ..config import Config
from ..llm import request as chat_request
from . import access
from . import policy as policies
from .agents import Agent, AgentState, AgentTable
from .approvals import Approval, ApprovalTable
from .calls import Call, CallState
from .quota import TokenBucket

log = logging.getLogger(__name__)

def _resources() -> dict[MsgType, str]:
    table = {MsgType.LLM_CHAT: "llm", MsgType.SYS_NULL: "llm",
             MsgType.TOOL_LIST: "tool", MsgType.TOOL_CALL: "tool"}
    for mtype in MsgType:
        family = mtype.value.split(".")[0]
        if family == "memory":
            table[mtype] = "memory"
        elif family in ("storage", "block", "audit"):
            table[mtype] = "storage"
    return table


#: The resource (queue, worker kind) each schedulable call type runs on.
RESOURCES: dict[MsgType, str] = _resources()
#: Calls only operators (aiosctl) and the kernel's own processes may make.
OPERATOR_ONLY = frozenset({
    MsgType.ADMIN_STATUS, MsgType.ADMIN_PS, MsgType.ADMIN_KILL, MsgType.ADMIN_SHUTDOWN,
    MsgType.ADMIN_PROCS, MsgType.ADMIN_APPROVALS, MsgType.ADMIN_APPROVE, MsgType.ADMIN_DENY,
    MsgType.ADMIN_AUDIT,
})
#: The kernel services besides the LLM cores: worker name -> kind.
SERVICES = {"memory": "memory", "storage": "storage", "tools": "tool"}

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
    #: the worker's own figures, as of its last heartbeat (an LLM core's KV cache)
    stats: dict[str, Any] = field(default_factory=dict)

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
            "stats": self.stats,
        }


@dataclass(eq=False)
class Session:
    """One client connection that said hello."""

    identity: bytes
    name: str
    operator: bool
    agent: Agent | None = None
    internal: bool = False    # one of the kernel's own processes

    @property
    def account(self) -> str:
        return self.agent.id if self.agent else f"operator:{self.name}"

    @property
    def principal(self) -> access.Principal:
        return access.Principal(self.account, self.name, self.operator, self.internal)


class Scheduler:
    def __init__(self, config: Config, runtime_dir: Path):
        self.config = config
        self.runtime_dir = runtime_dir
        self.started = time.time()
        self.supervisor_pid = int(os.environ.get("AIOS_SUPERVISOR_PID", "0")) or None
        self.supervisor_token = os.environ.get("AIOS_SUPERVISOR_TOKEN") or None
        self.endpoint = paths.ipc(runtime_dir, paths.KERNEL_SOCKET)
        self.agents = AgentTable(self.endpoint, runtime_dir)
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
        self.sessions: dict[bytes, Session] = {}
        self.procs: list[dict[str, Any]] = []
        self.stopping = False
        self._next_pid_check = 0.0
        # the last client message's frame: what the OS says of its sender is
        # read for hello only (every later message has a session)
        self._peer_frame: zmq.Frame | None = None
        self.preemptions = 0
        self.client_handlers: dict[MsgType, Callable[[Session | None, bytes, Message], None]] = {
            MsgType.HELLO: self.on_hello,
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

    def send_worker(self, worker: Worker, msg: Message) -> bool:
        try:
            send_frames(self.workers_sock, [worker.name.encode(), *protocol.encode(msg)],
                        nonblocking=True)
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

    def on_client_frames(self, raw: list[zmq.Frame]) -> None:
        frames = [f.bytes for f in raw]
        identity = frames[0]
        self._peer_frame = raw[-1]
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
        if msg.type in OPERATOR_ONLY and not (session is not None and session.operator):
            self.reply_error(identity, msg.id, errors.PermissionDenied(
                f"{msg.type.value} is for operators (aiosctl), not for agents"))
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
        peer_uid, peer_pid = (peer_credentials(self._peer_frame) if self._peer_frame is not None
                              else (None, None))
        if peer_pid is not None:
            pid = peer_pid  # what the OS says, not what the client wrote
        if token and token == self.supervisor_token:
            # The supervisor and the kernel's own workers.
            session = Session(identity, name, operator=True, internal=True)
            if name == "supervisor":
                session.name = "supervisor"
        elif token:
            agent = self.agents.by_token(token) if isinstance(token, str) else None
            if agent is None or not agent.alive:
                self._audit("hello.denied", {"name": name, "pid": pid, "why": "bad credential"})
                raise errors.Unauthenticated("hello: the agent credential is not valid")
            if peer_pid is not None and not self.agents.is_process_of(agent, peer_pid):
                self._audit("hello.denied", {"name": agent.name, "pid": pid,
                                             "why": "credential used by another process"})
                raise errors.Unauthenticated(
                    f"hello: the credential of {agent.id} was presented by pid {peer_pid}, "
                    "which is not that agent's process"
                )
            session = Session(identity, agent.name, operator=False, agent=agent)
        else:
            session = self._hello_without_credential(identity, name, pid, bool(body.get("operator")),
                                                     peer_uid, peer_pid)
        self.sessions[identity] = session
        self.send_client(identity, protocol.reply(msg.id, self._whoami(session)))

    def _hello_without_credential(self, identity: bytes, name: str, pid: int | None,
                                  operator: bool, peer_uid: int | None,
                                  peer_pid: int | None) -> Session:
        """Bind a connection that brought no credential. Who it is comes from
        what the OS says of the peer, never from what it wrote: a process of
        an agent the kernel launched is that agent; an operator must be of
        the daemon's user (or root); a hand-started agent names itself, but
        never with the name of a live agent the kernel launched."""
        of_agent, owner = (self.agents.agent_tree(peer_pid) if peer_pid is not None
                           else (False, None))
        if of_agent:
            if operator or owner is None:
                self._audit("hello.denied", {"name": name, "pid": pid,
                                             "agent": owner.id if owner else None,
                                             "why": "a process of an agent the kernel launched"})
                raise errors.PermissionDenied(
                    f"hello: pid {peer_pid} belongs to agent {owner.id}, which the kernel "
                    "launched; an agent cannot be an operator" if owner else
                    f"hello: pid {peer_pid} descends from an agent the kernel launched, but no "
                    "longer from a running one's process; it may not connect")
            # it cannot shed its identity by leaving out its credential
            return Session(identity, owner.name, operator=False, agent=owner)
        if not self.rules.may_connect(peer_uid):
            self._audit("hello.denied", {"name": name, "uid": peer_uid, "why": "uid"})
            raise errors.PermissionDenied(
                f"hello: processes of uid {peer_uid} may not connect (access.allow_uids)"
            )
        if operator:
            if not self.rules.may_operate(peer_uid):
                self._audit("hello.denied", {"name": name, "uid": peer_uid,
                                             "why": "operator from another user"})
                raise errors.PermissionDenied(
                    f"hello: only processes of the daemon's user (uid {self.rules.daemon_uid}) "
                    f"or root may be operators; this one is uid {peer_uid}")
            return Session(identity, name, operator=True)
        if "." in name:
            raise errors.InvalidArgument(
                f"hello: {name!r}: a name with '.' is a sub-agent's, which only the kernel "
                "launches; choose a name without one (libaios.connect(name=...) or "
                "AIOS_AGENT_NAME)")
        holder = self.agents.live_launched(name)
        if holder is not None:
            self._audit("hello.denied", {"name": name, "pid": pid, "holder": holder.id,
                                         "why": "the name of a launched agent"})
            raise errors.PermissionDenied(
                f"hello: the name {name!r} belongs to agent {holder.id} (pid {holder.pid}), "
                "which the kernel launched; choose another name (libaios.connect(name=...) "
                "or AIOS_AGENT_NAME)")
        agent = self.agents.register(name, pid)
        self.publish(f"agent.{agent.id}.connected", {"agent": agent.id, "pid": pid})
        return Session(identity, name, operator=False, agent=agent)

    def _whoami(self, session: Session) -> dict[str, Any]:
        agent = session.agent
        return {
            "agent": session.account,
            "name": session.name,
            "operator": session.operator,
            "launched": bool(agent and agent.launched),
            "pid": agent.pid if agent else None,
            "groups": self.rules.groups_of(session.name),
            "kernel_version": libaios.__version__,
        }

    def on_whoami(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        self.send_client(identity, protocol.reply(msg.id, self._whoami(session)))

    def on_schedulable(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        body = msg.body
        who = session.principal
        namespace = None
        if msg.type in access.NAMESPACED:
            namespace = self._namespace_of(session, msg.type, body)
        elif msg.type in access.INTERNAL and session.internal:
            namespace = body.get("as_namespace") if isinstance(body.get("as_namespace"), str) else None
        tool = None
        destructive_tool = None
        if msg.type is MsgType.LLM_CHAT:
            chat_request.parse(body)  # reject bad input before it queues
        elif msg.type is MsgType.TOOL_CALL:
            tool = body.get("name")
            if not isinstance(tool, str) or not tool:
                raise errors.InvalidArgument("tool.call: 'name' must be the name of a tool")
            if not isinstance(body.get("arguments", {}), dict):
                raise errors.InvalidArgument("tool.call: 'arguments' must be a map")
            namespace = who.name  # file tools work in the caller's own storage
            if self.tool_info.get(tool, {}).get("destructive"):
                destructive_tool = tool
        decision = self.rules.check(who, msg.type, namespace, destructive_tool)
        if (namespace is not None and namespace != who.name or not decision.allowed
                or decision.preapproved):
            event = ("denied" if not decision.allowed
                     else "preapproved" if decision.preapproved else "allowed")
            self._audit(f"access.{event}",
                        {"agent": who.agent, "name": who.name, "call": msg.type.value,
                         "namespace": namespace, "why": decision.reason})
        if not decision.allowed:
            raise errors.PermissionDenied(f"{msg.type.value}: {decision.reason}")
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
            agent=session.account, type=msg.type, resource=resource, body=body,
            deadline=deadline, submitted=now, queued_at=now, namespace=namespace,
            caller={"agent": who.agent, "name": who.name,
                    "groups": self.rules.groups_of(who.name)},
            tool=tool,
            # the kernel's own calls and operators need no approval; callers
            # whose group pre-approves overwrites are spared that question
            approved=who.internal or who.operator
            or self.rules.preapproved(who, "storage.overwrite"),
        )
        self.calls[call.kid] = call
        if session.agent is not None and session.agent.usage.first_call is None:
            session.agent.usage.first_call = now
        if decision.approval:
            self._hold(call, decision.approval, f"{msg.type.value} in {namespace or who.name}", now)
            return
        if destructive_tool is not None:
            call.approved = True
        queue.push(call)
        self.dispatch()

    def _namespace_of(self, session: Session, mtype: MsgType, body: dict[str, Any]) -> str | None:
        """Whose data a memory or storage call acts on: the caller's own,
        unless it names another agent ('agent'); the kernel's own processes
        act for an agent with 'as_namespace'. An operator's statistics over
        every agent ('agent': '*') have no namespace."""
        if session.internal and isinstance(body.get("as_namespace"), str):
            return body["as_namespace"]
        target = body.get("agent")
        if target == "*" and session.operator and mtype in (MsgType.MEMORY_STATS,
                                                             MsgType.STORAGE_STATS):
            return None
        if target is None:
            if session.operator and not session.internal:
                raise errors.InvalidArgument("an operator must name the agent whose data to use ('agent')")
            return session.name
        if not isinstance(target, str) or not target or len(target) > 64:
            raise errors.InvalidArgument("'agent' must be the name of an agent")
        return target

    # -- approvals -------------------------------------------------------------

    def _hold(self, call: Call, op: str, detail: str, now: float) -> None:
        """Keep ``call`` until a person approves or denies it, or time runs out."""
        call.state = CallState.PENDING
        approval = self.approvals.request(call, op, detail, now, self.config.access.approval_timeout)
        info = approval.to_dict(now)
        self.publish(f"approval.{approval.id}.requested", info)
        self._audit("approval.requested", info)

    def on_approvals(self, session: Session | None, identity: bytes, msg: Message) -> None:
        now = time.time()
        rows = [a.to_dict(now) for a in self.approvals.pending.values()]
        self.send_client(identity, protocol.reply(msg.id, {"approvals": rows}))

    def on_decide(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        if not session.operator or session.internal:
            raise errors.PermissionDenied("only an operator (aiosctl) may decide approvals")
        approval_id = msg.body.get("id")
        approval = self.approvals.take(approval_id) if isinstance(approval_id, str) else None
        if approval is None:
            raise errors.NotFound(f"no pending approval {approval_id!r}: see `aiosctl approvals`")
        now = time.time()
        granted = msg.type is MsgType.ADMIN_APPROVE
        self._settle(approval, granted, f"by {session.name}", now)
        self.send_client(identity, protocol.reply(msg.id, {"id": approval.id, "approved": granted}))

    def _settle(self, approval: Approval, granted: bool, why: str, now: float) -> None:
        call = approval.call
        verdict = "approved" if granted else "denied"
        info = {**approval.to_dict(now), "why": why}
        self.publish(f"approval.{approval.id}.{verdict}", info)
        self._audit(f"approval.{verdict}", info)
        if call.kid not in self.calls:
            return  # its caller is gone
        call.wait_s += now - call.queued_at
        if granted:
            call.approved = True
            call.state = CallState.QUEUED
            call.queued_at = now
            self.queues[call.resource].push(call)
            self.dispatch()
        else:
            call.state = CallState.QUEUED  # so finish() accounts the wait, not service
            call.queued_at = now
            self.fail(call, errors.PermissionDenied(
                f"{call.type.value} needs approval ({approval.op}) and was {verdict} {why}"
            ), now)

    # -- audit ------------------------------------------------------------------

    def _audit(self, event: str, record: dict[str, Any]) -> None:
        """Publish an access decision and append it to the audit log in storage."""
        record = {"event": event, "time": time.time(), **record}
        self.publish(f"audit.{event}", record)
        if not self._can_ever_serve("storage"):
            return
        now = time.time()
        call = Call(
            kid=protocol.new_id(), client=None, client_call_id="", agent="kernel",
            type=MsgType.AUDIT_APPEND, resource="storage", body={"record": record},
            deadline=now + self.config.kernel.call_timeout, submitted=now, queued_at=now,
            approved=True,
        )
        self.calls[call.kid] = call
        self.queues["storage"].push(call)

    def on_audit(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        if not session.operator:
            raise errors.PermissionDenied("the audit log is for operators (aiosctl audit)")
        now = time.time()
        call = Call(
            kid=protocol.new_id(), client=identity, client_call_id=msg.id,
            agent=session.account, type=MsgType.AUDIT_LIST, resource="storage",
            body={k: v for k, v in msg.body.items() if k in ("after", "limit", "agent")},
            deadline=msg.deadline or now + 30, submitted=now, queued_at=now, approved=True,
        )
        self.calls[call.kid] = call
        self.queues["storage"].push(call)
        self.dispatch()

    def _can_ever_serve(self, resource: str) -> bool:
        if any(w.kind == resource for w in self.workers.values()):
            return True
        # No worker yet: fine while one is starting; not when all have failed.
        kinds = [p for p in self.procs if p.get("kind") == resource]
        if not self.procs:
            return True  # the process table has not arrived yet
        return any(p.get("state") != "fatal" for p in kinds)

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
        assert session is not None
        requested = body.get("name")
        name = requested or Path(path).stem
        if not isinstance(name, str) or not name:
            raise errors.InvalidArgument("agent.run: 'name' must be a string of 1-64 characters")
        if not session.operator:
            # An agent's sub-agents are named under it, so that none takes
            # another agent's name, and with it that agent's data.
            prefix = f"{session.name}."
            if not requested:
                name = prefix + name
            elif not name.startswith(prefix):
                raise errors.PermissionDenied(
                    f"agent.run: a sub-agent of {session.name} is named {prefix}NAME, "
                    f"not {name!r}")
        if len(name) > 64:
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
        status = self.status()
        if msg.body.get("calls"):
            status["calls"] = self.call_table()
        self.send_client(identity, protocol.reply(msg.id, status))

    def call_table(self) -> list[dict[str, Any]]:
        """Every call in the kernel now, for `aiosctl top`."""
        now = time.time()
        rows = []
        for call in self.calls.values():
            if call.client is None:
                continue  # the kernel's own bookkeeping
            state = call.state.value
            if call.state is CallState.QUEUED and call.affinity:
                state = "suspended"
            running_for = now - call.dispatched if call.state is CallState.RUNNING else 0.0
            rows.append({
                "call": call.kid[-8:], "agent": call.agent, "type": call.type.value, "state": state,
                "worker": call.worker or call.affinity, "tokens": call.tokens + call.turn_tokens,
                "preemptions": call.preemptions,
                "wait_s": round(call.wait_s + (now - call.queued_at if call.state in (
                    CallState.QUEUED, CallState.PENDING) else 0.0), 3),
                "service_s": round(call.service_s + running_for, 3),
            })
        return rows

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
        services = []
        for name, kind in SERVICES.items():
            worker = self.workers.get(name)
            proc = next((p for p in self.procs if p.get("name") == name), {})
            state = "ready" if worker else ("failed" if proc.get("state") == "fatal" else "starting")
            entry = {"name": name, "kind": kind, "state": state}
            if worker:
                entry.update(worker.to_dict())
            services.append(entry)
        return {
            "version": libaios.__version__,
            "pid": os.getpid(),
            "supervisor_pid": self.supervisor_pid,
            "runtime_dir": str(self.runtime_dir),
            "started": self.started,
            "uptime_s": round(now - self.started, 3),
            # ready: nothing is still starting (every core and service serves
            # or has failed for good), and (under a supervisor) the process
            # table has arrived, so what status shows is complete;
            # healthy: and nothing failed
            "ready": all(c["state"] != "starting" for c in cores + services)
            and (bool(self.procs) or not self.supervisor_token),
            "healthy": all(c["state"] == "ready" for c in cores + services),
            "stopping": self.stopping,
            "policy": self.config.scheduler.policy,
            "cores": cores,
            "services": services,
            "approvals": len(self.approvals.pending),
            "procs": self.procs,
            "queues": {name: len(q) for name, q in self.queues.items()},
            "tools_running": {k: v for k, v in self.tool_running.items() if v},
            "preemptions": self.preemptions,
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
        self.forget_agent(agent.id)
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
        if session.name != "supervisor" or not session.internal:
            raise errors.PermissionDenied("admin.procs comes from the supervisor only")
        procs = msg.body.get("procs")
        if isinstance(procs, list):
            old = {p.get("name"): p.get("state") for p in self.procs}
            self.procs = procs
            for proc in procs:
                if old.get(proc.get("name")) != proc.get("state"):
                    self.publish(f"proc.{proc.get('name')}.{proc.get('state')}", proc)
        self.send_client(identity, protocol.reply(msg.id, {}))

    # -- policy inputs ---------------------------------------------------------

    def _service(self, agent_id: str) -> float:
        """The service an agent has received: tokens processed for it."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return 0.0
        running = sum(c.turn_tokens for c in self.calls.values()
                      if c.agent == agent_id and c.state is CallState.RUNNING)
        return agent.usage.prompt_tokens + agent.usage.completion_tokens + running

    def _name_of(self, agent_id: str) -> str:
        agent = self.agents.get(agent_id)
        return agent.name if agent is not None else agent_id

    def _priority(self, agent_id: str) -> int:
        rule = self.rules_by_agent.get(self._name_of(agent_id))
        return rule.priority if rule else 0

    def _quota_ok(self, call: Call) -> bool:
        bucket = self.buckets.get(call.caller.get("name", ""))
        return bucket is None or call.type is not MsgType.LLM_CHAT or bucket.allows(time.time())

    def _preempt(self) -> None:
        """Ask the policy which running LLM calls should give way."""
        queue = self.queues["llm"]
        if not len(queue):
            return
        running = [c for w in self.workers.values() if w.kind == "llm"
                   for c in w.inflight.values()
                   if c.state is CallState.RUNNING and not c.suspending and c.type is MsgType.LLM_CHAT]
        for call in queue.preempt(running, time.time()):
            worker = self.workers.get(call.worker or "")
            if worker is None:
                continue
            call.suspending = True
            self.send_worker(worker, protocol.call(MsgType.WORKER_SUSPEND, {"call": call.kid}))

    # -- dispatch ------------------------------------------------------------

    def _free_worker(self, resource: str, call_type: MsgType) -> Worker | None:
        best = None
        for worker in self.workers.values():
            # a null call runs inline on the worker's loop: it takes no slot
            busy = worker.free <= 0 and call_type is not MsgType.SYS_NULL
            if worker.kind != resource or busy or call_type.value not in worker.types:
                continue
            # the most free slots first; among equals the one idle longest
            if best is None or (worker.free, -worker.last_dispatch) > (best.free, -best.last_dispatch):
                best = worker
        return best

    def _tool_free(self, call: Call) -> bool:
        if call.tool is None:
            return True
        limit = self.tool_info.get(call.tool, {}).get("concurrency")
        return limit is None or self.tool_running.get(call.tool, 0) < limit

    def _runnable(self, call: Call) -> bool:
        if not self._tool_free(call) or not self._quota_ok(call):
            return False
        if call.affinity is not None:
            worker = self.workers.get(call.affinity)
            return worker is not None and worker.free > 0
        return True

    def dispatch(self) -> None:
        for resource, queue in self.queues.items():
            while len(queue):
                # A call for a saturated tool, an agent over its quota, or a
                # core busy with a suspended call's snapshot waits while the
                # calls behind it run.
                worker = self._free_worker(resource, next(iter(queue)).type)
                if worker is None:
                    break
                if worker.free > 0:
                    call = queue.pop(self._runnable)
                else:  # only null calls may go to a worker with no free slot
                    call = queue.pop(lambda c: c.type is MsgType.SYS_NULL)
                if call is None:
                    break
                if call.affinity is not None:
                    worker = self.workers[call.affinity]
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
        if call.tool is not None:
            self.tool_running[call.tool] = self.tool_running.get(call.tool, 0) + 1
        call.turn_tokens = 0
        call.suspending = False
        task = Message(MsgType.WORKER_TASK, protocol.new_id(), call.task_body(),
                       deadline=call.deadline)
        self.send_worker(worker, task)

    def finish(self, call: Call, result: Message | None, now: float) -> None:
        """Account a call that left the kernel and answer its caller
        (``result`` None: the caller already has its answer, or is gone)."""
        self.calls.pop(call.kid, None)
        self.approvals.drop_call(call)
        if call.state is CallState.QUEUED and "resume" in call.body:
            # suspended, and never to resume: its core drops the snapshot
            worker = self.workers.get(call.affinity or "")
            if worker is not None:
                self.send_worker(worker, protocol.call(
                    MsgType.WORKER_FORGET, {"snapshots": [call.body["resume"]]}))
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
        usage.preemptions += call.preemptions
        usage.last_done = now
        if result is None or result.type is MsgType.ERROR:
            usage.failed += 1
        elif call.type is MsgType.LLM_CHAT:
            tokens = result.body.get("usage", {})
            used = int(tokens.get("prompt_tokens", 0)) + int(tokens.get("completion_tokens", 0))
            usage.prompt_tokens += int(tokens.get("prompt_tokens", 0))
            usage.completion_tokens += int(tokens.get("completion_tokens", 0))
            bucket = self.buckets.get(agent.name)
            if bucket is not None:
                bucket.charge(used, now)

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

    def forget_agent(self, agent_id: str) -> None:
        """The agent is gone (or going): drop its calls, and tell every LLM
        core to let go of what it keeps for the agent (its cached
        conversation, in the KV cache or in RAM)."""
        now = time.time()
        for call in list(self.calls.values()):
            if call.agent != agent_id:
                continue
            if call.state is CallState.QUEUED:
                self.queues[call.resource].remove(call)
                self.finish(call, None, now)
            elif call.state is CallState.PENDING:
                self.finish(call, None, now)
            elif call.state is CallState.RUNNING:
                self.cancel(call, now)
        for worker in list(self.workers.values()):
            if worker.kind == "llm":
                self.send_worker(worker, protocol.call(MsgType.WORKER_FORGET, {"agent": agent_id}))

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
        if worker.kind == "tool":
            self.tool_info = dict(worker.info.get("tools") or {})
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
        stats = msg.body.get("stats")
        if isinstance(stats, dict):
            worker.stats = stats

    def on_worker_result(self, wid: bytes, msg: Message) -> None:
        worker = self.workers.get(wid.decode(errors="replace"))
        if worker is None or msg.re is None:
            return
        worker.last_seen = time.time()
        call = worker.inflight.get(msg.re)
        if call is None:
            return  # the answer to a call already settled
        if msg.type is MsgType.PARTIAL:
            if "_progress" in msg.body:  # how far the call got: for the policy, not the caller
                call.turn_tokens = int(msg.body["_progress"])
                self._preempt()
            elif call.state is CallState.RUNNING:
                call.streamed = True
                self.send_client(call.client, protocol.partial(call.client_call_id, msg.body))
            return
        self._release(worker, call)
        worker.served += 1
        now = time.time()
        if call.state is not CallState.RUNNING:
            self.calls.pop(call.kid, None)
        elif msg.type is MsgType.REPLY and msg.body.get("finish_reason") == "suspended":
            # Preempted at a token boundary: back in the queue, to resume
            # from its snapshot on this core.
            call.service_s += now - call.dispatched
            call.tokens += call.turn_tokens
            call.preemptions += 1
            self.preemptions += 1
            call.body = {**call.body, "resume": msg.body["snapshot"]}
            call.affinity = worker.name
            call.state = CallState.QUEUED
            call.worker = None
            call.queued_at = now
            self.queues[call.resource].requeue_suspended(call)
        elif msg.type is MsgType.REPLY:
            self.finish(call, protocol.reply(call.client_call_id, msg.body), now)
        elif msg.body.get("code") == ErrorCode.APPROVAL_REQUIRED and not call.approved:
            # The worker found the call destructive (an overwrite): ask.
            call.service_s += now - call.dispatched
            details = msg.body.get("details") or {}
            op = str(details.get("op", call.type.value))
            who = access.Principal(call.agent, call.caller.get("name", ""))
            if self.rules.preapproved(who, op):
                self._audit("access.preapproved",
                            {"agent": call.agent, "name": who.name, "call": call.type.value,
                             "namespace": call.namespace, "why": f"{op} pre-approved"})
                call.approved = True
                call.state = CallState.QUEUED
                call.queued_at = now
                self.queues[call.resource].requeue(call)
            else:
                call.queued_at = now
                self._hold(call, op, str(msg.body.get("message", "")), now)
        else:
            envelope = Message(MsgType.ERROR, protocol.new_id(), msg.body, re=call.client_call_id)
            self.finish(call, envelope, now)
        self.dispatch()

    def _release(self, worker: Worker, call: Call) -> None:
        """``call`` no longer holds a slot of ``worker`` (nor of its tool)."""
        worker.inflight.pop(call.kid, None)
        if call.tool is not None and self.tool_running.get(call.tool):
            self.tool_running[call.tool] -= 1

    def worker_lost(self, worker: Worker, why: str) -> None:
        """Forget ``worker``; run its calls again elsewhere, or fail them."""
        if self.workers.get(worker.name) is worker:
            del self.workers[worker.name]
        log.warning("worker %s lost: %s", worker.name, why)
        self.publish(f"worker.{worker.name}.lost", {"name": worker.name, "why": why})
        now = time.time()
        for call in list(worker.inflight.values()):
            self._release(worker, call)
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
        # Snapshots of suspended calls died with the core: those calls start
        # over (nothing of theirs reached the caller unless they streamed).
        for call in list(self.calls.values()):
            if call.affinity == worker.name and call.state is CallState.QUEUED:
                if call.streamed:
                    self.queues[call.resource].remove(call)
                    self.fail(call, errors.WorkerLost(
                        f"{worker.name} stopped while this call was suspended ({why}); retry"), now)
                else:
                    call.affinity = None
                    call.body = {k: v for k, v in call.body.items() if k != "resume"}
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
            self.forget_agent(session.agent.id)

    def agent_ended(self, agent: Agent) -> None:
        self.forget_agent(agent.id)
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
        if check_pids:
            procs.reap_adopted(self.agents.own_children())
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
                for _ in range(1000):
                    try:
                        self.on_worker_frames(self.workers_sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
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
        remove_sockets(self.runtime_dir)


def peer_credentials(frame: zmq.Frame) -> tuple[int | None, int | None]:
    """(uid, pid) of the process at the other end of an ipc connection, as
    the operating system reports it (libzmq appends uid:gid:pid to the
    Peer-Address of ipc peers); (None, None) for other transports."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, KeyError, TypeError):
        return None, None
    parts = str(address).rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None, None
    return int(parts[1]), int(parts[3])


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
