"""The worker runtime: the one piece of socket code every worker shares.

A worker (an LLM core, the memory, storage and tool managers) is a
dispatch table from :class:`MsgType` to a handler that takes a :class:`Task`
and returns the reply body. The runtime owns the DEALER socket to the
scheduler: it registers with READY (kind, name, capacity), heartbeats, runs
up to ``capacity`` tasks at once on threads, forwards their streamed parts
and results, delivers cancellations and suspensions, passes on what the
scheduler says is gone (an agent, a suspended call), and registers again if the scheduler
forgets it (after a scheduler restart). Handlers never touch a socket.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq

from libaios import errors, protocol
from libaios.protocol import ErrorCode, Message, MsgType
from libaios.wire import send_frames

from . import credentials, logs

log = logging.getLogger(__name__)

#: Messages taken from a socket per wake-up: a burst costs one poll, and the
#: heartbeat is never held back long.
DRAIN = 256


@dataclass
class Task:
    """One call handed to a worker."""

    call_id: str
    type: MsgType
    body: dict[str, Any]
    deadline: float | None
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Who made the call, as the scheduler established it (never from the
    #: request): {"agent": id, "name": ..., "namespace": ..., "groups": [...]}.
    caller: dict[str, Any] = field(default_factory=dict)
    #: Whose data the call acts on (the caller's own namespace unless the
    #: access manager allowed another); None where it does not apply.
    namespace: str | None = None
    #: Destructive effects a person approved for this call (see access).
    approved: bool = False
    #: Set when the scheduler asks for the call to be suspended (preemption).
    suspend: threading.Event = field(default_factory=threading.Event)
    #: The snapshot a suspended call resumes from (an LLM core's own).
    resume: str | None = None
    _emit: Callable[[dict[str, Any]], None] | None = None
    _report: Callable[[int], None] | None = None

    def emit(self, part: dict[str, Any]) -> None:
        """Stream one partial reply to the caller."""
        if self._emit is not None:
            self._emit(part)

    def progress(self, tokens: int) -> None:
        """Tell the scheduler how far the call got (for its policy)."""
        if self._report is not None:
            self._report(tokens)

    def check(self) -> None:
        """Raise if the call was cancelled or its deadline passed."""
        if self.cancelled.is_set():
            raise errors.Cancelled("the call was cancelled")
        if self.deadline is not None and time.time() > self.deadline:
            raise errors.Timeout("the call's deadline passed while it ran")


Handler = Callable[[Task], dict[str, Any]]


class WorkerRuntime:
    """Runs a dispatch table of handlers as a worker of the scheduler."""

    def __init__(
        self,
        kind: str,
        name: str,
        capacity: int,
        endpoint: str,
        handlers: dict[MsgType, Handler],
        heartbeat_interval: float = 0.5,
        info: dict[str, Any] | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
        inline: frozenset[MsgType] = frozenset({MsgType.SYS_NULL}),
        forget: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.kind = kind
        self.name = name
        self.capacity = capacity
        self.endpoint = endpoint
        self.handlers = dict(handlers)
        self.heartbeat_interval = heartbeat_interval
        self.info = info or {}
        self.stats = stats
        #: call types cheap enough to run on the main loop, without a slot
        self.inline = inline
        #: told that an agent or a suspended call is gone (WORKER_FORGET)
        self.forget = forget
        self._tasks: dict[str, Task] = {}
        self._stop = threading.Event()
        self._ctx = zmq.Context.instance()
        self._outbox = f"inproc://worker-outbox-{id(self)}"
        self._push_sock: zmq.Socket | None = None
        self._push_lock = threading.Lock()

    # -- threads' side -----------------------------------------------------

    def _push(self, frames: list[bytes]) -> None:
        # One PUSH into the main loop, which alone owns the DEALER, for every
        # thread: a call's parts are streamed from whichever thread makes
        # them (an LLM core's engine thread) and its result from the task's
        # thread, and a PULL fair-queues between several PUSH sockets, so
        # with one each a result could overtake the parts sent before it.
        # The lock serializes the socket's use (a socket is not thread-safe;
        # one used under a lock is).
        with self._push_lock:
            if self._push_sock is None:
                self._push_sock = self._ctx.socket(zmq.PUSH)
                self._push_sock.setsockopt(zmq.LINGER, 1000)
                self._push_sock.connect(self._outbox)
            send_frames(self._push_sock, frames)

    def _execute(self, task: Task) -> Message:
        # what the handler logs names the call and its agent (the kernel's
        # id of the call: the one the scheduler's records give it too)
        agent = task.caller.get("agent")
        with logs.context(agent=agent if isinstance(agent, str) else None, call_id=task.call_id):
            started = time.monotonic()
            result = self._handle(task)
            log.debug("%s %s in %.3fs", task.type.value,
                      "failed" if result.type is MsgType.ERROR else "done",
                      time.monotonic() - started, extra=logs.fields(event="task.finished"))
            return result

    def _handle(self, task: Task) -> Message:
        handler = self.handlers[task.type]
        try:
            return protocol.reply(task.call_id, handler(task))
        except errors.AIOSError as exc:
            return protocol.error(task.call_id, exc.code, exc.message, exc.retriable,
                                  details=exc.details)
        except BaseException as exc:  # a handler bug (even a SystemExit) must not take the worker down
            log.exception("%s %s failed", self.name, task.type.value)
            return protocol.error(
                task.call_id, ErrorCode.INTERNAL, f"{self.name}: {type(exc).__name__}: {exc}"
            )

    def _result(self, task: Task) -> list[bytes]:
        """The frames of ``task``'s result; a result too large for the
        scheduler to take becomes an error that says so (the scheduler
        would drop it, and its caller would wait for its deadline)."""
        frames = protocol.encode(self._execute(task))
        if len(frames[-1]) > protocol.MAX_BODY_BYTES:
            log.warning("%s: the result of %s is %d bytes, over the limit", self.name,
                        task.type.value, len(frames[-1]),
                        extra=logs.fields(agent=task.caller.get("agent"), call_id=task.call_id))
            frames = protocol.encode(protocol.error(
                task.call_id, ErrorCode.TOO_LARGE,
                f"{task.type.value}: the result is {len(frames[-1])} bytes, over the limit of "
                f"{protocol.MAX_BODY_BYTES}; ask for less at a time (a smaller limit, a page)"))
        return frames

    def _run_task(self, task: Task) -> None:
        result = self._result(task)
        # Let go of the task before its result can reach the scheduler: a
        # call suspended or sent back for approval comes again under the
        # same id, and its new task must not be the one let go of.
        if self._tasks.get(task.call_id) is task:
            del self._tasks[task.call_id]
        self._push(result)

    # -- main loop ---------------------------------------------------------

    def _ready(self, sock: zmq.Socket) -> None:
        body = {
            "kind": self.kind,
            "name": self.name,
            "capacity": self.capacity,
            "pid": os.getpid(),
            # proves to the scheduler that this is the process the
            # supervisor started under this name (see aiosd.credentials)
            "credential": credentials.mine(),
            "types": [t.value for t in self.handlers],
            "info": self.info,
            "running": list(self._tasks),
        }
        sock.send_multipart(protocol.encode(protocol.call(MsgType.WORKER_READY, body)))

    def _on_message(self, sock: zmq.Socket, pool: ThreadPoolExecutor, msg: Message) -> None:
        if msg.type is MsgType.WORKER_TASK:
            call_type = MsgType(msg.body["type"])
            call_id = msg.body["call"]
            if call_type not in self.handlers:
                err = protocol.error(
                    call_id, ErrorCode.UNKNOWN_TYPE, f"{self.name} does not serve {call_type.value}"
                )
                sock.send_multipart(protocol.encode(err))
                return
            task = Task(
                call_id, call_type, msg.body.get("body", {}), msg.deadline,
                caller=msg.body.get("caller") or {},
                namespace=msg.body.get("namespace"),
                approved=bool(msg.body.get("approved")),
                resume=msg.body.get("resume") if isinstance(msg.body.get("resume"), str) else None,
                _emit=lambda part, cid=call_id: self._push(
                    protocol.encode(protocol.partial(cid, part))
                ),
                _report=lambda n, cid=call_id: self._push(protocol.encode(protocol.Message(
                    MsgType.WORKER_PROGRESS, protocol.new_id(), {"tokens": n}, re=cid))),
            )
            if call_type in self.inline:
                send_frames(sock, self._result(task))
                return
            self._tasks[call_id] = task
            pool.submit(self._run_task, task)
        elif msg.type is MsgType.WORKER_CANCEL:
            task = self._tasks.get(msg.body.get("call", ""))
            if task is not None:
                task.cancelled.set()
        elif msg.type is MsgType.WORKER_SUSPEND:
            task = self._tasks.get(msg.body.get("call", ""))
            if task is not None:
                task.suspend.set()
        elif msg.type is MsgType.WORKER_FORGET:
            if self.forget is not None:
                try:
                    self.forget(msg.body)
                except Exception:  # a bug here must not take the worker down
                    log.exception("%s: forgetting %s failed", self.name, msg.body)
        elif msg.type is MsgType.WORKER_SHUTDOWN:
            self._stop.set()
        elif msg.type is MsgType.ERROR and msg.body.get("code") == ErrorCode.UNAUTHENTICATED:
            self._ready(sock)  # the scheduler restarted and does not know us

    def _on_frames(self, sock: zmq.Socket, pool: ThreadPoolExecutor, frames: list[bytes]) -> None:
        try:
            _, payload = protocol.split_envelope(frames)
            msg = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            log.warning("%s: undecodable message from the scheduler: %s", self.name, exc)
            return
        self._on_message(sock, pool, msg)

    def stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> None:
        """Serve until told to shut down (message or SIGTERM)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.endpoint)
        outbox = self._ctx.socket(zmq.PULL)
        outbox.bind(self._outbox)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        pool = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix=self.name)
        self._ready(sock)
        next_beat = time.monotonic() + self.heartbeat_interval
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_beat - time.monotonic())
                for s, _ in poller.poll(int(timeout * 1000) + 1):
                    # take what has arrived, not one message per poll
                    for _ in range(DRAIN):
                        try:
                            frames = s.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if s is outbox:
                            send_frames(sock, frames)
                        else:
                            self._on_frames(sock, pool, frames)
                if time.monotonic() >= next_beat:
                    body: dict[str, Any] = {"running": len(self._tasks)}
                    if self.stats is not None:
                        body["stats"] = self.stats()
                    beat = protocol.call(MsgType.WORKER_HEARTBEAT, body)
                    sock.send_multipart(protocol.encode(beat))
                    next_beat = time.monotonic() + self.heartbeat_interval
        finally:
            for task in list(self._tasks.values()):
                task.cancelled.set()
            pool.shutdown(wait=True, cancel_futures=True)
            while outbox.poll(0):
                sock.send_multipart(outbox.recv_multipart())
            outbox.close(0)
            with self._push_lock:
                if self._push_sock is not None:
                    self._push_sock.close(0)
                    self._push_sock = None
            sock.close()
