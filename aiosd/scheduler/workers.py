"""The scheduler's worker messages: a worker's frames, READY, heartbeats,
partial and final results, a worker's slot let go, a worker lost, and
whether any worker of a kind can serve at all. ``WorkerMessages`` is a mixin
of ``Scheduler``: its methods run on the scheduler's single thread and use
its state."""

from __future__ import annotations

import logging
import time

import psutil
import zmq

from libaios import errors, protocol
from libaios.protocol import ErrorCode, Message, MsgType

from .. import credentials
from . import access
from .calls import Call, CallState
from .peers import Worker, parent_of, peer_credentials

# the scheduler logs under one name, whichever of its modules a method is in
log = logging.getLogger(__name__)


class WorkerMessages:
    """The worker-message handlers of ``Scheduler``."""

    # -- worker messages -----------------------------------------------------

    def on_worker_frames(self, frames: list[bytes], peer: zmq.Frame | None = None) -> None:
        """A worker's message; ``peer`` (its last frame) tells what the OS
        says of the process that sent it."""
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
        if msg.type is MsgType.WORKER_READY:
            self.on_worker_ready(routing[0], msg, peer)
            return
        name = self.worker_names.get(routing[0])
        if msg.type is MsgType.WORKER_HEARTBEAT and name not in self.workers:
            # Not registered, refused, or taken for lost (we restarted, or
            # its heartbeats came late): it is asked to register again.
            self.workers_sock.send_multipart([routing[0], *protocol.encode(
                protocol.error(None, ErrorCode.UNAUTHENTICATED, "register"))])
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
        call = self.calls.get(msg.re)
        if call is None or call.state is not CallState.RUNNING:
            return
        self._release_held(call)
        self.fail(call, errors.InternalError("the kernel could not read the result of this "
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
        for other in [i for i, n in self.worker_names.items() if n == name]:
            del self.worker_names[other]   # a connection of its earlier process
        self.worker_names[identity] = name
        old = self.workers.get(name)
        if old is not None:
            if old.pid == pid:
                old.last_seen = time.time()
                old.identity = identity
                return
            self.worker_lost(old, "it was restarted")
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
        self.workers[name] = worker
        if tools is not None:
            self.tool_info = tools
        self._adopt(worker, body.get("running"), now)
        log.info("worker %s ready (pid %d, capacity %d)", name, worker.pid, worker.capacity)
        self.publish(f"worker.{name}.ready", worker.to_dict())
        self.dispatch()

    def _worker_pid(self, name: str, credential: object, body_pid: object,
                    frame: zmq.Frame | None) -> int | None:
        """The pid of the process that registers as worker ``name``, as the OS
        reports it, if it proves to be the process the supervisor started
        under that name: it holds that name's credential and its parent is
        the supervisor. None (and the registration is ignored) otherwise. A
        pid the worker writes is never believed: it is the one the kernel
        signals when the worker must be killed."""
        peer_uid, peer_pid = peer_credentials(frame) if frame is not None else (None, None)
        if self.supervisor_token is None:   # a scheduler run on its own (tests)
            pid = body_pid if peer_pid is None else peer_pid
            return pid if isinstance(pid, int) and pid > 0 else None
        why = None
        if not credentials.verify(self.supervisor_token, name, credential):
            why = "it does not hold that worker's credential"
        elif peer_pid is None or parent_of(peer_pid) != self.supervisor_pid:
            why = f"its process (pid {peer_pid}) is not one the supervisor started"
        if why is None:
            return peer_pid
        log.warning("refused a worker registering as %r (pid %s, uid %s): %s",
                    name, peer_pid, peer_uid, why)
        self._audit("worker.denied", {"name": name, "pid": peer_pid, "uid": peer_uid, "why": why})
        return None

    def _adopt(self, worker: Worker, running: object, now: float) -> None:
        """A worker registering again (it was taken for lost: its heartbeats
        were late) may still be running calls. One still waiting to run
        again is its call again rather than run twice (a storage write or a
        tool would act twice); the others are cancelled there. A tool call
        held for it (see worker_lost) that it does not run any more fails."""
        for kid in running if isinstance(running, list) else []:
            if not isinstance(kid, str):
                continue
            call = self.calls.get(kid)
            # (a held call has its slot whatever the worker's count says:
            # it never left the worker)
            if (call is not None and call.state is CallState.QUEUED and call.attempts
                    and call.resume is None and call.resource == worker.kind
                    and (call.held_for == worker.name
                         or (worker.free > 0 and self.queues[call.resource].remove(call)))):
                call.held_for = None
                self._occupy(call, worker, now)
                log.info("call %s still runs on %s: it stays there", kid, worker.name)
            else:
                self.send_worker(worker, protocol.call(MsgType.WORKER_CANCEL, {"call": kid}))
        for call in [c for c in self.calls.values() if c.held_for == worker.name]:
            call.held_for = None
            self.fail(call, not_run_again(call, worker.name, "it was restarted"), now)

    def fail_unservable(self, now: float) -> None:
        """Queued calls of a kind no worker can ever run again (all of its
        processes failed for good) end now, not at their deadline."""
        for resource, queue in self.queues.items():
            if self._can_ever_serve(resource):
                continue
            for call in list(queue):
                queue.remove(call)
                self.fail(call, self._unservable(resource), now)
            for call in [c for c in self.calls.values() if c.held_for and c.resource == resource]:
                call.held_for = None
                self.fail(call, self._unservable(resource), now)

    @staticmethod
    def _unservable(resource: str) -> errors.Unavailable:
        return errors.Unavailable(f"no {resource} worker can run: see `aiosctl status`")

    def on_worker_heartbeat(self, name: str, msg: Message) -> None:
        worker = self.workers[name]
        worker.last_seen = time.time()
        stats = msg.body.get("stats")
        if isinstance(stats, dict):
            worker.stats = stats

    def on_worker_result(self, name: str, msg: Message) -> None:
        worker = self.workers.get(name)
        if msg.re is None:
            return
        if worker is None:
            self._held_result(name, msg)
            return
        worker.last_seen = time.time()
        call = worker.inflight.get(msg.re)
        if call is None:
            return  # the answer to a call already settled
        if msg.type is MsgType.WORKER_PROGRESS:   # how far it got: for the policy
            call.turn_tokens = int(msg.body["tokens"])
            self._preempt()
            return
        if msg.type is MsgType.PARTIAL:
            if call.state is CallState.RUNNING:
                call.streamed = True
                self.send_client(call.client, protocol.partial(call.client_call_id, msg.body))
            return
        self._release(worker, call)
        worker.served += 1
        now = time.time()
        suspended = msg.type is MsgType.REPLY and msg.body.get("finish_reason") == "suspended"
        if call.state is not CallState.RUNNING:
            # cancelled (timed out, or its caller gone): its caller has had
            # its answer, and its agent is charged what it generated
            self.charge_generated(call, now)
            self.calls.pop(call.kid, None)
            if suspended and isinstance(msg.body.get("snapshot"), str):
                # suspended as it was cancelled: the snapshot will never resume
                self.drop_snapshot(worker, msg.body["snapshot"])
        elif suspended:
            # Preempted at a token boundary: back in the queue, to resume
            # from its snapshot on this core.
            call.service_s += now - call.dispatched
            call.tokens += call.turn_tokens
            call.preemptions += 1
            self.preemptions += 1
            call.resume = msg.body["snapshot"]
            call.affinity = worker.name
            call.state = CallState.QUEUED
            call.worker = None
            call.queued_at = now
            self.queues[call.resource].requeue_suspended(call)
        elif msg.type is MsgType.REPLY:
            self.finish(call, for_caller(call, msg), now)
        elif msg.body.get("code") == ErrorCode.APPROVAL_REQUIRED and not call.approved:
            # The worker checked the call against the data and found it
            # would destroy something (an overwrite, a delete, a rollback):
            # ask, showing what it named in its details.
            call.service_s += now - call.dispatched
            details = msg.body.get("details")
            details = details if isinstance(details, dict) else {}
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
                self._hold(call, op, str(msg.body.get("message", "")), now, details)
        else:
            self.finish(call, for_caller(call, msg), now)
        self.dispatch()

    def _held_result(self, name: str, msg: Message) -> None:
        """The answer to a call held for worker ``name``, taken for lost (see
        worker_lost): it ran to its end there, and its caller gets it."""
        call = self.calls.get(msg.re or "")
        if call is None or call.held_for != name or msg.type is MsgType.PARTIAL:
            return
        call.held_for = None
        self.finish(call, for_caller(call, msg), time.time())

    def _release(self, worker: Worker, call: Call) -> None:
        """``call`` no longer holds a slot of ``worker`` (nor of its tool)."""
        worker.inflight.pop(call.kid, None)
        if call.tool is not None and self.tool_running.get(call.tool):
            self.tool_running[call.tool] -= 1

    def _release_held(self, call: Call) -> None:
        """Release ``call``'s slot if its worker still counts it as running
        (a result that still comes for it is then passed over)."""
        worker = self.workers.get(call.worker or "")
        if worker is not None and worker.inflight.get(call.kid) is call:
            self._release(worker, call)

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
                self.charge_generated(call, now)
                self.calls.pop(call.kid, None)
                continue
            call.service_s += now - call.dispatched
            if call.tool is not None and not self.tool_info.get(call.tool, {}).get("read_only"):
                # A tool that changes things may have done so: it is never
                # run a second time. If the worker's process is gone, its
                # caller hears so now; if it lives (its heartbeats came
                # late), the call waits for it to register again and say
                # whether it still runs it (see _adopt).
                if process_gone(worker.pid):
                    self.fail(call, not_run_again(call, worker.name, f"it stopped ({why})"), now)
                else:
                    call.state, call.worker, call.held_for = CallState.QUEUED, None, worker.name
                    call.queued_at = now
                continue
            if call.streamed or call.lost >= self.config.kernel.max_redispatch:
                # Streamed text cannot be taken back; past the redispatch
                # budget the caller decides whether to try again. (Resumes
                # after a preemption are dispatches too, but not losses.)
                self.fail(call, errors.WorkerLost(
                    f"{worker.name} stopped while running this call ({why}); it may be retried"
                ), now)
                continue
            call.lost += 1
            call.state = CallState.QUEUED
            call.worker = None
            call.queued_at = now
            self.queues[call.resource].requeue(call)
        # Snapshots of suspended calls died with the core: those calls start
        # over (nothing of theirs reached the caller unless they streamed).
        orphaned = []
        for call in list(self.calls.values()):
            if call.affinity == worker.name and call.state is CallState.QUEUED:
                orphaned.append(call.resume)
                if call.streamed:
                    self.queues[call.resource].remove(call)
                    self.fail(call, errors.WorkerLost(
                        f"{worker.name} stopped while this call was suspended ({why}); retry"), now)
                else:
                    call.affinity = call.resume = None
        if orphaned:
            # A core taken for lost may be alive still (its heartbeat came
            # late), and would keep those snapshots for good (if it is gone
            # indeed, they went with it).
            self.send_worker(worker, protocol.call(MsgType.WORKER_FORGET, {"snapshots": orphaned}),
                             gone_if_unreachable=False)
        self.dispatch()

    def _can_ever_serve(self, resource: str) -> bool:
        if any(w.kind == resource for w in self.workers.values()):
            return True
        # No worker yet: fine while one is starting; not when all have failed.
        kinds = [p for p in self.procs if p.get("kind") == resource]
        if not self.procs:
            return True  # the process table has not arrived yet
        return any(p.get("state") != "fatal" for p in kinds)


def for_caller(call: Call, msg: Message) -> Message:
    """A worker's final answer (a reply or an error) to ``call``, as its
    caller gets it."""
    if msg.type is MsgType.REPLY:
        return protocol.reply(call.client_call_id, msg.body)
    return Message(MsgType.ERROR, protocol.new_id(), msg.body, re=call.client_call_id)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def not_run_again(call: Call, worker: str, what: str) -> errors.WorkerLost:
    """The error of a tool call that ``worker`` no longer runs: it is not
    run again (see worker_lost)."""
    return errors.WorkerLost(
        f"{worker} no longer runs tool {call.tool}: {what}; the call was not run again, "
        "since it may have had effects: check them before retrying")
