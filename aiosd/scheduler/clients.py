"""The scheduler's client messages: routing a client's frames to a handler,
hello (binding a connection to an agent or an operator), whoami, and taking
in a system call (its checks, its namespace, its queue). ``ClientCalls``
works over the scheduler's state and outbox; a call it takes in goes on
through the call lifecycle."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import zmq

import libaios
from libaios import errors, protocol
from libaios.protocol import ErrorCode, Message, MsgType

from .. import chat as chat_request
from .. import credentials, roles
from . import access, keys
from .agents import Agent, agent_name_ok
from .calls import Call
from .lifecycle import Lifecycle, unservable
from .outbox import Outbox
from .peers import Handler, Session, parent_of, peer_credentials
from .state import State

# the scheduler logs under one name, whichever of its modules a method is in
log = logging.getLogger(__name__)

#: The largest body of a call (libaios refuses a larger one before sending).
MAX_CALL_BODY = protocol.MAX_CALL_BODY_BYTES


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
    MsgType.ADMIN_AUDIT, MsgType.ADMIN_KEYS, MsgType.ADMIN_METRICS,
})
#: The largest body read from a connection that has not said hello (a
#: hello is a name, a credential and a few flags).
MAX_HELLO_BODY = 4096
#: Longest deadline accepted for a call, seconds from now.
MAX_DEADLINE = 24 * 3600.0


class ClientCalls:
    """Routes client messages to their handlers, and handles hello, whoami
    and the system calls that are scheduled."""

    def __init__(self, state: State, out: Outbox, life: Lifecycle) -> None:
        self.state = state
        self.out = out
        self.life = life
        #: the handler of each message type clients may send (the kernel
        #: adds the operators' calls, see AdminCalls)
        self.handlers: dict[MsgType, Handler] = {
            MsgType.HELLO: self.on_hello,
            **{mtype: self.on_schedulable for mtype in RESOURCES},
            MsgType.AGENT_WHOAMI: self.on_whoami,
            MsgType.CALL_CANCEL: self.on_cancel,
        }
        # the last client message's frame: what the OS says of its sender is
        # read for hello only (every later message has a session)
        self.peer_frame: zmq.Frame | None = None

    def on_client_frames(self, raw: list[zmq.Frame]) -> None:
        frames = [f.bytes for f in raw]
        identity = frames[0]
        self.peer_frame = raw[-1]
        try:
            _, payload = protocol.split_envelope(frames)
        except protocol.ProtocolError as exc:
            self.out.send_client(identity, protocol.error(None, exc.code, exc.message))
            return
        session = self.state.sessions.get(identity)
        size = len(payload[1]) if len(payload) == 2 else 0
        # Nothing is decoded before the size is known to be fit, nor, before
        # a connection has said who it is, anything but a small hello.
        refusal = None
        if session is None and size > MAX_HELLO_BODY:
            refusal = errors.TooLarge(
                f"the body is {size} bytes, too large: this connection has not said hello, and "
                f"until it does only a hello of at most {MAX_HELLO_BODY} bytes is read")
        elif size > MAX_CALL_BODY:
            refusal = errors.TooLarge(
                f"the body is {size} bytes, too large: a call's body may be at most "
                f"{MAX_CALL_BODY} bytes (what the kernel adds for its worker must fit too)")
        if refusal is not None:
            self.out.reply_error(identity, protocol.peek_id(payload), refusal)
            return
        try:
            msg = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            self.out.send_client(identity, protocol.error(protocol.peek_id(payload), exc.code, exc.message))
            return
        if msg.type is MsgType.BYE:   # the connection closes: nothing to answer
            self.life.client_gone(identity)
            return
        handler = self.handlers.get(msg.type)
        if handler is None:
            self.out.send_client(
                identity,
                protocol.error(msg.id, ErrorCode.UNKNOWN_TYPE, f"{msg.type.value!r} is not a system call"),
            )
            return
        if msg.deadline is not None and msg.deadline < time.time():
            self.out.reply_error(identity, msg.id, errors.Timeout(
                f"{msg.type.value}: its deadline had passed when it arrived "
                f"({time.time() - msg.deadline:.3f}s before); it was not run"))
            return
        if session is None and msg.type is not MsgType.HELLO:
            self.out.send_client(
                identity,
                protocol.error(msg.id, ErrorCode.UNAUTHENTICATED, "this connection has not said hello"),
            )
            return
        if msg.type in OPERATOR_ONLY and not (session is not None and session.operator):
            self.out.reply_error(identity, msg.id, errors.PermissionDenied(
                f"{msg.type.value} is for operators (aiosctl), not for agents"))
            return
        if self.state.stopping and msg.type is not MsgType.ADMIN_STATUS:
            self.out.reply_error(identity, msg.id, errors.ShuttingDown("aiosd is shutting down"))
            return
        try:
            handler(session, identity, msg)
        except errors.AIOSError as exc:
            if msg.type in RESOURCES:   # a system call refused before it was queued
                self.state.tally.refused(msg.type, exc.code)
            self.out.reply_error(identity, msg.id, exc)
        except Exception as exc:  # a bug must cost one call, not the kernel
            log.exception("handling %s failed", msg.type.value)
            self.out.reply_error(identity, msg.id, errors.InternalError(f"{type(exc).__name__}: {exc}"))

    def on_hello(self, session: Session | None, identity: bytes, msg: Message) -> None:
        body = msg.body
        name = body.get("name") or "agent"
        if not agent_name_ok(name):
            raise errors.InvalidArgument("hello: 'name' must be a string of at most 64 characters, "
                                         "none of them a control character")
        token = body.get("token")
        pid = body.get("pid") if isinstance(body.get("pid"), int) else None
        if session is not None:  # a second hello on one connection changes nothing
            self.out.send_client(identity, protocol.reply(msg.id, self._whoami(session)))
            return
        peer_uid, peer_pid = (peer_credentials(self.peer_frame) if self.peer_frame is not None
                              else (None, None))
        if peer_pid is not None:
            pid = peer_pid  # what the OS says, not what the client wrote
        kernel = bool(token and isinstance(token, str) and self.state.supervisor_token and (
            token == self.state.supervisor_token or credentials.verify(self.state.supervisor_token, name, token)))
        if not kernel:
            self._check_room(peer_uid, peer_pid)
        supervisor = kernel and token == self.state.supervisor_token
        if kernel:
            # The supervisor (its secret) or one of the kernel's processes
            # (the credential of its name); the OS must confirm it is one.
            self._check_kernel_process(name, peer_pid, supervisor=supervisor)
        if "key" in body and not (kernel and name == roles.GATEWAY and not supervisor):
            self.life.audit("hello.denied", {"name": name, "pid": pid,
                                             "why": "an API key from a process not the gateway"})
            raise errors.PermissionDenied(
                "hello: only aiosd's gateway presents API keys; an agent connects as itself "
                "(send the key to the gateway's HTTP API instead)")
        if kernel and name == roles.GATEWAY and not supervisor and "key" in body:
            # the gateway, for an HTTP caller: the key it bears says who
            session = self._key_session(identity, body["key"], pid)
        elif kernel:
            session = Session(identity, "supervisor" if supervisor else name,
                              operator=True, internal=True)
            if name == roles.GATEWAY and isinstance(body.get("url"), str):
                self.state.gateway_url = body["url"]
        elif token:
            agent = self.state.agents.by_token(token) if isinstance(token, str) else None
            if agent is None or not agent.alive:
                self.life.audit("hello.denied", {"name": name, "pid": pid, "why": "bad credential"})
                raise errors.Unauthenticated("hello: the agent credential is not valid")
            if peer_pid is not None and not self.state.agents.is_process_of(agent, peer_pid):
                self.life.audit("hello.denied", {"name": agent.name, "pid": pid,
                                             "why": "credential used by another process"})
                raise errors.Unauthenticated(
                    f"hello: the credential of {agent.id} was presented by pid {peer_pid}, "
                    "which is not that agent's process"
                )
            session = Session(identity, agent.name, operator=False, agent=agent)
        else:
            session = self._hello_without_credential(identity, name, pid, bool(body.get("operator")),
                                                     peer_uid, peer_pid)
        session.pid, session.uid = peer_pid, peer_uid
        self.state.add_session(session)
        self.out.send_client(identity, protocol.reply(msg.id, self._whoami(session)))

    def _key_session(self, identity: bytes, key: object, pid: int | None) -> Session:
        """The connection the gateway opens for the caller of an API key: it
        is the key's agent (a launched agent's own key: that agent)."""
        state = self.state
        if not isinstance(key, str) or not key:
            raise errors.InvalidArgument("hello: 'key' must be an API key")
        record = None
        if key.startswith(keys.AGENT_PREFIX):
            agent = state.agents.by_token(key[len(keys.AGENT_PREFIX):])
            if agent is None or not agent.alive:
                agent = None
        else:
            record = state.keys.lookup(key)
            agent = None
            if record is not None:
                agent = (state.agents.live_launched(record.name)
                         or state.agents.connected(record.name))
                if agent is None:
                    agent = state.agents.register(record.name, None)
                    self.out.publish(f"agent.{agent.id}.connected",
                                     {"agent": agent.id, "name": agent.name, "pid": pid})
                state.rules.joined[record.name] = set(record.groups)
        if agent is None:
            self.life.audit("key.denied", {"key": key[:len(keys.PREFIX) + 4], "pid": pid,
                                           "why": "not a key of this kernel, or revoked"})
            raise errors.Unauthenticated(
                "the API key is not valid: revoked, never made (aiosctl keys create NAME), or "
                "the key of an agent that has ended")
        return Session(identity, agent.name, operator=False, agent=agent,
                       key=keys.digest(key))

    def _check_room(self, uid: int | None, pid: int | None) -> None:
        """Refuse a connection past the per-process or per-uid limit."""
        kernel = self.state.config.kernel
        for key, most, setting, who in (
                (("pid", pid), kernel.max_sessions_per_process, "max_sessions_per_process",
                 f"process {pid}"),
                (("uid", uid), kernel.max_sessions_per_uid, "max_sessions_per_uid",
                 f"the processes of uid {uid}")):
            if key[1] is not None and self.state.session_counts[key] >= most:
                raise errors.Overloaded(
                    f"hello: {who} already {'holds' if key[0] == 'pid' else 'hold'} "
                    f"{self.state.session_counts[key]} connections, the most "
                    f"allowed (kernel.{setting}); close some, or raise the limit")

    def _check_kernel_process(self, name: str, peer_pid: int | None, supervisor: bool) -> None:
        """A kernel credential is honoured only from the process it belongs
        to, as the OS reports it: the supervisor's own, or a child of it."""
        if self.state.supervisor_pid is None:
            return   # a scheduler run on its own (tests): no supervisor to ask
        if supervisor:
            ok = peer_pid == self.state.supervisor_pid
        else:
            ok = peer_pid is not None and parent_of(peer_pid) == self.state.supervisor_pid
        if not ok:
            self.life.audit("hello.denied", {"name": name, "pid": peer_pid,
                                         "why": "a kernel credential from another process"})
            raise errors.Unauthenticated(
                f"hello: a kernel credential presented by pid {peer_pid}, which is not "
                f"{'the supervisor' if supervisor else 'a process the supervisor started'}")

    def _hello_without_credential(self, identity: bytes, name: str, pid: int | None,
                                  operator: bool, peer_uid: int | None,
                                  peer_pid: int | None) -> Session:
        """Bind a connection that brought no credential. Who it is comes from
        what the OS says of the peer, never from what it wrote: a process of
        an agent the kernel launched is that agent; an operator must be of
        the daemon's user (or root); a hand-started agent names itself, but
        never with the name of a live agent the kernel launched."""
        of_agent, owner = (self.state.agents.agent_tree(peer_pid) if peer_pid is not None
                           else (False, None))
        if of_agent:
            if operator or owner is None:
                self.life.audit("hello.denied", {"name": name, "pid": pid,
                                             "agent": owner.id if owner else None,
                                             "why": "a process of an agent the kernel launched"})
                raise errors.PermissionDenied(
                    f"hello: pid {peer_pid} belongs to agent {owner.id}, which the kernel "
                    "launched; an agent cannot be an operator" if owner else
                    f"hello: pid {peer_pid} descends from an agent the kernel launched, but no "
                    "longer from a running one's process; it may not connect")
            # it cannot shed its identity by leaving out its credential
            return Session(identity, owner.name, operator=False, agent=owner)
        if not self.state.rules.may_connect(peer_uid):
            self.life.audit("hello.denied", {"name": name, "uid": peer_uid, "why": "uid"})
            raise errors.PermissionDenied(
                f"hello: processes of uid {peer_uid} may not connect (access.allow_uids)"
            )
        if operator:
            if not self.state.rules.may_operate(peer_uid):
                self.life.audit("hello.denied", {"name": name, "uid": peer_uid,
                                             "why": "operator from another user"})
                raise errors.PermissionDenied(
                    f"hello: only processes of the daemon's user (uid {self.state.rules.daemon_uid}) "
                    f"or root may be operators; this one is uid {peer_uid}")
            return Session(identity, name, operator=True)
        if "@" in name:
            raise errors.InvalidArgument(
                f"hello: {name!r}: '@' is the kernel's: it names the agents of other users "
                "NAME@UID; choose a name without one")
        if peer_uid is not None and peer_uid != self.state.rules.daemon_uid:
            # Another user's agent: its name, and with it its data, is its
            # user's own, apart from every other user's.
            name = f"{name}@{peer_uid}"
        if "." in name:
            raise errors.InvalidArgument(
                f"hello: {name!r}: a name with '.' is a sub-agent's, which only the kernel "
                "launches; choose a name without one (libaios.connect(name=...) or "
                "AIOS_AGENT_NAME)")
        holder = self.state.agents.live_launched(name)
        if holder is not None:
            self._name_taken(name, pid, holder, "a launched agent", "which the kernel launched")
        holder = self.state.agents.connected(name)
        if holder is not None:
            if peer_pid is not None and holder.pid == peer_pid:
                # the same process, another connection (a thread's)
                return Session(identity, name, operator=False, agent=holder)
            self._name_taken(name, pid, holder, "a connected agent",
                             "which is connected; a name is its holder's while it is connected")
        agent = self.state.agents.register(name, pid)
        self.out.publish(f"agent.{agent.id}.connected",
                         {"agent": agent.id, "name": agent.name, "pid": pid})
        return Session(identity, name, operator=False, agent=agent)

    def _name_taken(self, name: str, pid: int | None, holder: Agent, what: str,
                    which: str) -> NoReturn:
        """Refuse a hello under the name ``holder`` holds (and audit it)."""
        self.life.audit("hello.denied", {"name": name, "pid": pid, "holder": holder.id,
                                     "why": f"the name of {what}"})
        raise errors.PermissionDenied(
            f"hello: the name {name!r} belongs to agent {holder.id} (pid {holder.pid}), {which}: "
            "choose another (libaios.connect(name=...) or AIOS_AGENT_NAME)")

    def _whoami(self, session: Session) -> dict[str, Any]:
        agent = session.agent
        return {
            "agent": session.account,
            "name": session.name,
            "operator": session.operator,
            "launched": bool(agent and agent.launched),
            "pid": agent.pid if agent else None,
            "groups": self.state.rules.groups_of(session.name),
            "kernel_version": libaios.__version__,
        }

    def on_whoami(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        self.out.send_client(identity, protocol.reply(msg.id, self._whoami(session)))

    def on_cancel(self, session: Session | None, identity: bytes, msg: Message) -> None:
        """The caller gives up on one of its calls (by the id it sent it
        with): it ends now, answered Cancelled, and its worker stops it."""
        call_id = msg.body.get("call")
        if not isinstance(call_id, str):
            raise errors.InvalidArgument("call.cancel: 'call' must be the id of a call of yours")
        call = next((c for c in self.state.calls.values()
                     if c.client == identity and c.client_call_id == call_id), None)
        cancelled = call is not None and self.life.give_up(call, time.time())
        self.out.send_client(identity, protocol.reply(msg.id, {"cancelled": cancelled}))

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
        model = None
        if msg.type is MsgType.LLM_CHAT:
            model = self._model_of(chat_request.parse(body))  # reject bad input before it queues
        elif msg.type is MsgType.TOOL_CALL:
            tool = body.get("name")
            if not isinstance(tool, str) or not tool:
                raise errors.InvalidArgument("tool.call: 'name' must be the name of a tool")
            if not isinstance(body.get("arguments", {}), dict):
                raise errors.InvalidArgument("tool.call: 'arguments' must be a map")
            namespace = who.name  # file tools work in the caller's own storage
            if self.state.tool_info.get(tool, {}).get("destructive"):
                destructive_tool = tool
        decision = self.state.rules.check(who, msg.type, namespace, destructive_tool)
        if (namespace is not None and namespace != who.name or not decision.allowed
                or decision.preapproved):
            event = ("denied" if not decision.allowed
                     else "preapproved" if decision.preapproved else "allowed")
            self.life.audit(f"access.{event}",
                        {"agent": who.agent, "name": who.name, "call": msg.type.value,
                         "namespace": namespace, "why": decision.reason})
        if not decision.allowed:
            raise errors.PermissionDenied(f"{msg.type.value}: {decision.reason}")
        resource = RESOURCES[msg.type]
        queue = self.state.queues[resource]
        if len(queue) >= self.state.config.kernel.max_queue:
            raise errors.Overloaded(
                f"{len(queue)} calls already wait for {resource}; try again later"
            )
        if not self.state.can_ever_serve(resource, model):
            raise unservable(resource, model)
        now = time.time()
        deadline = msg.deadline if msg.deadline is not None else now + self.state.config.kernel.call_timeout
        deadline = min(deadline, now + MAX_DEADLINE)
        call = Call(
            kid=protocol.new_id(), client=identity, client_call_id=msg.id,
            agent=session.account, type=msg.type, resource=resource, body=body,
            deadline=deadline, submitted=now, queued_at=now, namespace=namespace,
            caller={"agent": who.agent, "name": who.name,
                    "groups": self.state.rules.groups_of(who.name)},
            tool=tool, model=model,
            # the kernel's own calls and operators need no approval; callers
            # whose group pre-approves overwrites are spared that question
            approved=who.internal or who.operator
            or self.state.rules.preapproved(who, "storage.overwrite"),
        )
        self.state.calls[call.kid] = call
        if session.agent is not None and session.agent.usage.first_call is None:
            session.agent.usage.first_call = now
        if decision.approval and msg.type in access.DESTRUCTIVE:
            # A memory or storage call goes to its worker unapproved: the
            # worker checks its arguments against the data (a bad or missing
            # one is refused at once, no one asked) and answers
            # APPROVAL_REQUIRED, naming what it would act on, only for a
            # call that would run (see on_worker_result).
            call.approved = False
        elif decision.approval:
            self.life.hold(call, decision.approval, f"{msg.type.value} in {namespace or who.name}", now)
            return
        if destructive_tool is not None:
            call.approved = True
        self.life.submit(call)

    def _model_of(self, req: chat_request.ChatRequest) -> str:
        """The model a chat goes to: the one it names, else the default
        (InvalidArgument naming it and the models there are if there is no
        such model)."""
        llm = self.state.config.llm
        if req.model is None:
            return llm.default
        if llm.model(req.model) is None:
            raise errors.InvalidArgument(f"llm.chat: no model {req.model!r}; the models are: "
                                         f"{', '.join(llm.names())} (aiosctl models)")
        return req.model

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
        if not agent_name_ok(target):
            raise errors.InvalidArgument("'agent' must be the name of an agent")
        return target
