"""The scheduler's worker messages: a worker's frames, READY (and a worker
that registers again adopting the calls it still runs), heartbeats, and
partial and final results. ``WorkerMessages`` works over the scheduler's
state and outbox; a call's end goes through the call lifecycle."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from libaios import errors, protocol
from libaios.protocol import ErrorCode, Message, MsgType

from .. import chat as chat_request
from .. import credentials
from . import access
from .calls import Call, CallState
from .health import Health
from .lifecycle import Lifecycle, not_run_again
from .outbox import Outbox
from .peers import Worker, parent_of, peer_credentials
from .state import State

# the scheduler logs under one name, whichever of its modules a method is in
log = logging.getLogger(__name__)


class WorkerMessages:
    """The handlers of what workers send."""

    def __init__(self, state: State, out: Outbox, life: Lifecycle) -> None:
        self.state = state
        self.out = out
        self.life = life
        self.health = Health(state, out)
        self.handlers: dict[MsgType, Callable[[str, Message], None]] = {
            MsgType.WORKER_HEARTBEAT: self.on_worker_heartbeat,
            MsgType.PARTIAL: self.on_worker_result,
            MsgType.WORKER_PROGRESS: self.on_worker_result,
            MsgType.REPLY: self.on_worker_result,
            MsgType.ERROR: self.on_worker_result,
        }

    def on_worker_frames(self, frames: list[bytes], peer: zmq.Frame | None = None) -> None:
        """A worker's message; ``peer`` (its last frame) tells what the OS
        says of the process that sent it."""
        try:
            routing, payload = protocol.split_envelope(frames)
            msg = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            log.warning("undecodable message from worker %r: %s", frames[0][:32], exc.message)
            return
        if msg.type is MsgType.WORKER_READY:
            self.on_worker_ready(routing[0], msg, peer)
            return
        handler = self.handlers.get(msg.type)
        if handler is None:
            log.warning("worker %r sent %s, which workers do not send", routing[0], msg.type.value)
            return
        name = self.state.worker_names.get(routing[0])
        if msg.type is MsgType.WORKER_HEARTBEAT and name not in self.state.workers:
            # Not registered, refused, or taken for lost (we restarted, or
            # its heartbeats came late): it is asked to register again.
            self.out.send_connection(routing[0], protocol.error(
                None, ErrorCode.UNAUTHENTICATED, "register"))
            return
        if name is None:
            return   # a connection that did not register: nothing it says counts
        try:
            handler(name, msg)
        except Exception:  # a worker's bad message must cost its call, not the kernel
            log.exception("handling %s from worker %s failed", msg.type.value, name)
            self._bad_worker_message(name, msg)

    def _bad_worker_message(self, name: str, msg: Message) -> None:
        """A worker's result could not be handled: its call, if it is still
        waiting for one, ends with an error rather than waiting forever."""
        if msg.type in (MsgType.PARTIAL, MsgType.WORKER_PROGRESS) or msg.re is None:
            return
        call = self.state.calls.get(msg.re)
        if call is None or call.state is not CallState.RUNNING:
            return
        self.life.release_held(call)
        self.life.fail(call, errors.InternalError("the kernel could not read the result of this "
                                             f"call from worker {name}"),
                  time.time())

    def on_worker_ready(self, identity: bytes, msg: Message, frame: zmq.Frame | None = None) -> None:
        body = msg.body
        name = body.get("name")
        if not isinstance(name, str) or not name:
            log.warning("a worker's READY has no name")
            return
        pid = self._worker_pid(name, body.get("credential"), body.get("pid"), frame)
        if pid is None:
            return
        for other in [i for i, n in self.state.worker_names.items() if n == name]:
            del self.state.worker_names[other]   # a connection of its earlier process
        self.state.worker_names[identity] = name
        old = self.state.workers.get(name)
        if old is not None:
            if old.pid == pid:
                old.last_seen = time.time()
                old.identity = identity
                return
            self.life.worker_lost(old, "it was restarted")
        now = time.time()
        try:
            worker = Worker(
                name=name, kind=str(body["kind"]), capacity=max(1, int(body["capacity"])),
                pid=pid, types=frozenset(map(str, body.get("types", []))),
                info=dict(body.get("info") or {}), last_seen=now, registered=now,
                identity=identity,
            )
            tools = dict(worker.info.get("tools") or {}) if worker.kind == "tool" else None
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("worker %s sent a bad READY: %s", name, exc)
            return
        self.state.workers[name] = worker
        if tools is not None:
            self.state.tool_info = tools
        self.adopt(worker, body.get("running"), now)
        log.info("worker %s ready (pid %d, capacity %d)", name, worker.pid, worker.capacity)
        self.out.publish(f"worker.{name}.ready", worker.to_dict())
        self.life.dispatch()

    def _worker_pid(self, name: str, credential: object, body_pid: object,
                    frame: zmq.Frame | None) -> int | None:
        """The pid of the process that registers as worker ``name``, as the OS
        reports it, if it proves to be the process the supervisor started
        under that name: it holds that name's credential and its parent is
        the supervisor. None (and the registration is ignored) otherwise. A
        pid the worker writes is never believed: it is the one the kernel
        signals when the worker must be killed."""
        peer_uid, peer_pid = peer_credentials(frame) if frame is not None else (None, None)
        if self.state.supervisor_token is None:   # a scheduler run on its own (tests)
            pid = body_pid if peer_pid is None else peer_pid
            return pid if isinstance(pid, int) and pid > 0 else None
        why = None
        if not credentials.verify(self.state.supervisor_token, name, credential):
            why = "it does not hold that worker's credential"
        elif peer_pid is None or parent_of(peer_pid) != self.state.supervisor_pid:
            why = f"its process (pid {peer_pid}) is not one the supervisor started"
        if why is None:
            return peer_pid
        log.warning("refused a worker registering as %r (pid %s, uid %s): %s",
                    name, peer_pid, peer_uid, why)
        self.life.audit("worker.denied", {"name": name, "pid": peer_pid, "uid": peer_uid, "why": why})
        return None

    def adopt(self, worker: Worker, running: object, now: float) -> None:
        """A worker registering again (it was taken for lost: its heartbeats
        were late) may still be running calls. One still waiting to run
        again is its call again rather than run twice (a storage write or a
        tool would act twice); the others are cancelled there. A tool call
        held for it (see worker_lost) that it does not run any more fails."""
        for kid in running if isinstance(running, list) else []:
            if not isinstance(kid, str):
                continue
            call = self.state.calls.get(kid)
            # (a held call has its slot whatever the worker's count says:
            # it never left the worker)
            if (call is not None and call.state is CallState.QUEUED and call.attempts
                    and call.resume is None and call.resource == worker.kind
                    and (call.held_for == worker.name
                         or (worker.free > 0 and self.state.queues[call.resource].remove(call)))):
                call.held_for = None
                self.life.occupy(call, worker, now)
                log.info("call %s still runs on %s: it stays there", kid, worker.name)
            else:
                self.out.send_worker(worker, protocol.call(MsgType.WORKER_CANCEL, {"call": kid}))
        for call in [c for c in self.state.calls.values() if c.held_for == worker.name]:
            call.held_for = None
            self.life.fail(call, not_run_again(call, worker.name, "it was restarted"), now)

    def on_worker_heartbeat(self, name: str, msg: Message) -> None:
        worker = self.state.workers[name]
        worker.last_seen = now = time.time()
        stats = msg.body.get("stats")
        if isinstance(stats, dict):
            self.health.on_stats(worker, stats, now)
            worker.stats = stats

    def on_worker_result(self, name: str, msg: Message) -> None:
        worker = self.state.workers.get(name)
        if msg.re is None:
            return
        # the core's own timing, for the metrics: never the caller's
        first = msg.body.pop(chat_request.FIRST_TOKEN, None) if msg.type is MsgType.REPLY else None
        if worker is None:
            self._held_result(name, msg)
            return
        worker.last_seen = time.time()
        call = worker.inflight.get(msg.re)
        if call is None:
            return  # the answer to a call already settled
        if msg.type is MsgType.WORKER_PROGRESS:   # how far it got: for the policy
            call.turn_tokens = int(msg.body["tokens"])
            self.life.preempt()
            return
        if msg.type is MsgType.PARTIAL:
            if call.state is CallState.RUNNING:
                call.streamed = True
                self.out.send_client(call.client, protocol.partial(call.client_call_id, msg.body))
            return
        self.life.release(worker, call)
        worker.served += 1
        now = time.time()
        if first is not None and call.type is MsgType.LLM_CHAT:
            self.first_token(call, first)
        suspended = msg.type is MsgType.REPLY and msg.body.get("finish_reason") == "suspended"
        if call.state is not CallState.RUNNING:
            # cancelled (timed out, or its caller gone): its caller has had
            # its answer, and its agent is charged what it generated
            self.life.charge_generated(call, now)
            self.state.calls.pop(call.kid, None)
            if suspended and isinstance(msg.body.get("snapshot"), str):
                # suspended as it was cancelled: the snapshot will never resume
                self.life.drop_snapshot(worker, msg.body["snapshot"])
        elif suspended:
            # Preempted at a token boundary: back in the queue, to resume
            # from its snapshot on this core.
            call.service_s += now - call.dispatched
            call.tokens += call.turn_tokens
            call.preemptions += 1
            self.state.preemptions += 1
            call.resume = msg.body["snapshot"]
            call.affinity = worker.name
            call.state = CallState.QUEUED
            call.worker = None
            call.queued_at = now
            self.state.queues[call.resource].requeue_suspended(call)
        elif msg.type is MsgType.REPLY:
            self.life.finish(call, for_caller(call, msg), now)
        elif msg.body.get("code") == ErrorCode.APPROVAL_REQUIRED and not call.approved:
            # The worker checked the call against the data and found it
            # would destroy something (an overwrite, a delete, a rollback):
            # ask, showing what it named in its details.
            call.service_s += now - call.dispatched
            details = msg.body.get("details")
            details = details if isinstance(details, dict) else {}
            op = str(details.get("op", call.type.value))
            who = access.Principal(call.agent, call.caller.get("name", ""))
            if self.state.rules.preapproved(who, op):
                self.life.audit("access.preapproved",
                            {"agent": call.agent, "name": who.name, "call": call.type.value,
                             "namespace": call.namespace, "why": f"{op} pre-approved"})
                call.approved = True
                call.state = CallState.QUEUED
                call.queued_at = now
                self.state.queues[call.resource].requeue(call)
            else:
                call.queued_at = now
                self.life.hold(call, op, str(msg.body.get("message", "")), now, details)
        else:
            self.life.finish(call, for_caller(call, msg), now)
        self.life.dispatch()

    def first_token(self, call: Call, seconds: object) -> None:
        """A chat's turn came back saying its first token came ``seconds``
        after the turn reached its core: the first such turn of the call
        gives its time to first token (from its arrival in the kernel)."""
        if call.first_token or not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            return
        call.first_token = True
        self.state.tally.first_token_after(call.model or "",
                                           call.dispatched - call.submitted + seconds)

    def _held_result(self, name: str, msg: Message) -> None:
        """The answer to a call held for worker ``name``, taken for lost (see
        worker_lost): it ran to its end there, and its caller gets it."""
        call = self.state.calls.get(msg.re or "")
        if call is None or call.held_for != name or msg.type is MsgType.PARTIAL:
            return
        call.held_for = None
        self.life.finish(call, for_caller(call, msg), time.time())


def for_caller(call: Call, msg: Message) -> Message:
    """A worker's final answer (a reply or an error) to ``call``, as its
    caller gets it."""
    if msg.type is MsgType.REPLY:
        return protocol.reply(call.client_call_id, msg.body)
    return Message(MsgType.ERROR, protocol.new_id(), msg.body, re=call.client_call_id)
