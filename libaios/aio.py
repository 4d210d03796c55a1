"""The asyncio client, for agents that make many system calls at once.

One DEALER socket carries every call of the client; a reader task hands each
reply to the call it answers (matched on the call id), so hundreds of calls
can be in flight on one connection::

    async with libaios.aio.connect() as aios:
        replies = await asyncio.gather(*(aios.chat(q, max_tokens=32) for q in questions))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from . import errors, protocol
from .core import (DEFAULT_TIMEOUT, RESTARTED, ChatResult, ClientCore, chat_body, decode_reply,
                   encode_call, no_reply, stream_pieces)
from .protocol import ErrorCode, MsgType
from .services import awaited_field_of
from .wire import say_bye, send_frames

#: Seconds for which one look at the kernel socket file holds: a client
#: making thousands of calls a second looks once per interval, not once per
#: call (a replaced kernel is still found before the next call: restarting
#: one takes longer than this).
RECHECK_S = 0.05


class AsyncClient(ClientCore):
    """An asyncio connection to ``aiosd``; see :class:`libaios.Client` for
    the arguments. Its memory, storage and tool calls are awaited:
    ``await aios.memory.add(...)``."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        token: str | None = None,
        name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        operator: bool = False,
        key: str | None = None,
    ):
        super().__init__(endpoint, token=token, name=name, timeout=timeout, operator=operator,
                         take=awaited_field_of, key=key)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        #: the same socket without asyncio's bookkeeping, for sends that
        #: need not wait
        self._raw: zmq.Socket | None = None
        self._reader: asyncio.Task | None = None
        # call id -> where its replies go: a queue for a stream, a future
        # for a call that only wants its final reply
        self._waiting: dict[str, asyncio.Queue[protocol.Message] | asyncio.Future[protocol.Message]] = {}
        self._recheck_at = 0.0
        self._watch: asyncio.Task | None = None
        #: connections made so far: a call that finds its connection unknown
        #: to the kernel reconnects only if no other call has done so since
        self._generation = 0
        self._reconnecting = asyncio.Lock()
        #: calls out, by id: (the connection, the order they were sent in)
        self._sent: dict[str, tuple[int, int]] = {}
        self._sends = 0
        #: the first call (in send order) on this connection that the kernel
        #: answered it does not know the connection: every call sent after
        #: it reached that same kernel (see _restarted)
        self._unknown_from: int | None = None
        #: sends waiting on asyncio (the socket's queue was full)
        self._sending = 0

    async def connect(self) -> AsyncClient:
        if self._sock is not None:
            return self
        self._attach()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self._sock = sock
        self._generation += 1
        self._unknown_from = None
        self._raw = zmq.Socket.shadow(sock.underlying)
        self._recheck_at = time.monotonic() + RECHECK_S
        self._reader = asyncio.create_task(self._read())
        if self._inode is not None:
            self._watch = asyncio.create_task(self._watch_kernel())
        try:
            self.identity = await self.call(MsgType.HELLO, *self._hello())
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        for task in (self._reader, self._watch):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._reader = self._watch = None
        if self._sock is not None and self._raw is not None:
            say_bye(self._raw, bool(self.identity))
            self._sock.close(linger=100)
            self._sock = self._raw = None
        # calls still out on this connection will never be answered on it
        self._fail_waiting(ErrorCode.CANCELLED, "the client was closed while this call was out")

    def _fail_waiting(self, code: ErrorCode, message: str) -> None:
        for call_id, waiter in list(self._waiting.items()):
            _answer(waiter, protocol.error(call_id, code, message, retriable=True))

    def _kernel_replaced(self) -> bool:
        """As a synchronous client's, but a kernel that is gone counts as
        replaced: the calls out fail, and the next call says it is not running."""
        try:
            return super()._kernel_replaced()
        except errors.NotRunning:
            return True

    async def _watch_kernel(self) -> None:
        """Calls out when the kernel goes or is replaced can never be
        answered: they fail at once (retriable) rather than at their deadline."""
        while True:
            await asyncio.sleep(1.0)
            if self._waiting and self._kernel_replaced():
                self._fail_waiting(ErrorCode.WORKER_LOST, RESTARTED)
                return   # the next call connects afresh

    async def _reconnect(self, generation: int) -> None:
        """Connect afresh, unless another call has done so since the
        connection ``generation`` (the one the caller's call went out on):
        after a restart every call in flight learns it at once."""
        async with self._reconnecting:
            if generation != self._generation:
                return
            self._restarted()
            await self.close()
            await self.connect()

    def _restarted(self) -> None:
        """Answer the calls still out on a connection that the restarted
        kernel does not know. One sent after a call that kernel answered
        reached it too (a connection delivers in order), and it will be
        answered the same, without being run: it fails as unauthenticated,
        and is sent again on the new connection. One sent earlier may have
        reached the kernel that stopped, and may have run: WorkerLost."""
        first = self._unknown_from
        for call_id, waiter in list(self._waiting.items()):
            generation, n = self._sent.get(call_id, (0, -1))
            if first is not None and generation == self._generation and n > first:
                rep = protocol.error(call_id, ErrorCode.UNAUTHENTICATED,
                                     "the kernel restarted and does not know this connection",
                                     retriable=True)
            else:
                rep = protocol.error(call_id, ErrorCode.WORKER_LOST, RESTARTED, retriable=True)
            _answer(waiter, rep)

    def _note_sent(self, call_id: str) -> None:
        """Note that call ``call_id`` goes out now (see _restarted)."""
        self._sent[call_id] = (self._generation, self._sends)
        self._sends += 1

    def _answered(self, call_id: str, rep: protocol.Message) -> None:
        """Note ``rep``, the answer to ``call_id``, if it says the kernel
        does not know this connection (see _restarted)."""
        generation, n = self._sent.get(call_id, (0, -1))
        if (rep.type is MsgType.ERROR and rep.body.get("code") == ErrorCode.UNAUTHENTICATED
                and generation == self._generation and n >= 0):
            self._unknown_from = n if self._unknown_from is None else min(self._unknown_from, n)

    async def _current(self) -> None:
        """Connect, or connect afresh if the kernel was replaced since."""
        if self._reconnecting.locked():   # wait for the new connection
            async with self._reconnecting:
                pass
        if self._sock is not None and time.monotonic() >= self._recheck_at:
            self._recheck_at = time.monotonic() + RECHECK_S
            if self._kernel_replaced():
                await self._reconnect(self._generation)
        if self._sock is None:
            await self.connect()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        assert self._sock is not None and self._raw is not None
        # The only reader of the socket, so replies are delivered in the
        # order they arrive (a stream's pieces before its final reply).
        # Replies arrive in bursts when many calls are out: after waiting
        # for one, take the rest that have arrived without a Future each
        # (no recv of the asyncio socket is pending meanwhile, and its next
        # one looks for waiting messages first).
        raw = self._raw
        while True:
            frames = await self._sock.recv_multipart()
            while True:
                self._deliver(frames)
                try:
                    frames = raw.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break

    def _deliver(self, frames: list[bytes]) -> None:
        try:
            rep = decode_reply(frames)
        except errors.BadFrame as exc:
            # the call it answers, if that can be read, fails with the reason
            # (as the sync client's would) rather than waiting for its deadline
            call_id = exc.details.get("re")
            if call_id is None or call_id not in self._waiting:
                return
            rep = protocol.error(call_id, ErrorCode.BAD_FRAME, exc.message)
        waiter = self._waiting.get(rep.re or "")
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(rep)
        elif waiter is not None and rep.type is not MsgType.PARTIAL and not waiter.done():
            waiter.set_result(rep)

    async def _send(self, frames: list[bytes], deadline: float) -> None:
        """Send a call's frames: at once where the socket can take them
        (asyncio's send makes a future and schedules events for every
        message, which is most of what a call costs this process), through
        asyncio where it must wait (no kernel yet, or a full queue), until
        ``deadline`` (loop time; TimeoutError after it)."""
        assert self._sock is not None and self._raw is not None
        if not self._sending:   # (none waits, so this one does not overtake)
            try:
                send_frames(self._raw, frames, nonblocking=True)
            except zmq.Again:
                pass
            else:
                # A send may take the socket's wake-up for what arrived
                # meanwhile (ZeroMQ signals readiness on an edge): asking the
                # asyncio socket for its events has it look again, and wake
                # the reader if replies wait.
                self._sock.get(zmq.EVENTS)
                return
        self._sending += 1
        try:
            async with asyncio.timeout_at(deadline):
                await self._sock.send_multipart(frames)
        finally:
            self._sending -= 1

    async def _stream(self, mtype: MsgType, body: dict[str, Any],
                      timeout: float) -> AsyncIterator[protocol.Message]:
        """Make a streamed call: yield its partial replies, then its final
        one. A kernel that restarted and does not know this connection
        answers at once that it does not: connect afresh and call again."""
        await self._current()
        generation = self._generation
        replies = self._replies(protocol.call(mtype, body, timeout), timeout)
        try:
            first = await anext(replies)
        except errors.Unauthenticated:
            await self._reconnect(generation)
            replies = self._replies(protocol.call(mtype, body, timeout), timeout)
            first = await anext(replies)
        try:
            yield first
            async for rep in replies:
                yield rep
        finally:
            await replies.aclose()   # (given up on early: the call is cancelled now)

    def call_stream(self, mtype: MsgType, body: dict[str, Any],
                    timeout: float | None = None) -> AsyncIterator[protocol.Message]:
        """Make a call and yield its replies as they come: its partial
        replies, then its final one (an error is raised). Closing the
        iterator early gives the call up: the kernel stops it."""
        return self._stream(mtype, body, self._timeout(timeout))

    async def _replies(self, msg: protocol.Message, timeout: float) -> AsyncIterator[protocol.Message]:
        """Send ``msg``; yield its partial replies, then its final reply."""
        await self._current()
        assert self._sock is not None
        frames = encode_call(msg)
        queue: asyncio.Queue[protocol.Message] = asyncio.Queue()
        self._waiting[msg.id] = queue
        deadline = asyncio.get_running_loop().time() + timeout
        ended = False
        try:
            try:
                self._note_sent(msg.id)
                await self._send(frames, deadline)
            except TimeoutError:
                raise no_reply(msg, self.endpoint, timeout) from None
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        rep = await queue.get()
                except TimeoutError:
                    raise no_reply(msg, self.endpoint, timeout) from None
                if rep.type is MsgType.ERROR:
                    ended = True
                    self._answered(msg.id, rep)
                    raise errors.from_envelope(rep.body)
                ended = rep.type is MsgType.REPLY
                yield rep
                if ended:
                    return
        finally:
            self._waiting.pop(msg.id, None)
            self._sent.pop(msg.id, None)
            if not ended:
                # given up on (the stream left unread, the task cancelled,
                # its deadline passed): the kernel stops the call
                self._cancel(msg.id)

    def _cancel(self, call_id: str) -> None:
        """Tell the kernel this client gives up on call ``call_id`` (sent if
        the socket takes it at once; its answer is passed over)."""
        if self._raw is None:
            return
        try:
            self._raw.send_multipart(protocol.encode(
                protocol.call(MsgType.CALL_CANCEL, {"call": call_id}, 10.0)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    async def call(self, mtype: MsgType, body: dict[str, Any] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """Make one system call and return its final reply's body (partial
        replies, should the call stream, are passed over)."""
        timeout = self._timeout(timeout)
        if mtype is not MsgType.HELLO:
            await self._current()
            generation = self._generation
            try:
                return await self._call(mtype, body, timeout)
            except errors.Unauthenticated:
                # the kernel restarted and does not know this connection
                await self._reconnect(generation)
                await self._current()   # (if that reconnection failed, try once more)
        return await self._call(mtype, body, timeout)

    async def _call(self, mtype: MsgType, body: dict[str, Any] | None,
                    timeout: float) -> dict[str, Any]:
        msg = protocol.call(mtype, body or {}, timeout)
        frames = encode_call(msg)
        assert self._sock is not None
        # One future per call, resolved by the reader (or failed by a timer
        # at the deadline): the cheapest wait asyncio has, which matters to
        # agents with hundreds of calls out.
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[protocol.Message] = loop.create_future()
        self._waiting[msg.id] = reply
        deadline = loop.time() + timeout
        timer = loop.call_at(deadline, _expire, reply)
        try:
            try:
                self._note_sent(msg.id)
                await self._send(frames, deadline)
                rep = await reply
            except TimeoutError:
                raise no_reply(msg, self.endpoint, timeout) from None
            if rep.type is MsgType.ERROR:
                self._answered(msg.id, rep)
        finally:
            timer.cancel()
            self._waiting.pop(msg.id, None)
            self._sent.pop(msg.id, None)
            if reply.done() and not reply.cancelled():
                reply.exception()   # (seen: a call whose send gave up never waited for it)
            else:
                self._cancel(msg.id)   # its task was cancelled: the kernel stops the call
        if rep.type is MsgType.ERROR:
            raise errors.from_envelope(rep.body)
        return rep.body

    async def chat(self, messages: list[dict[str, Any]] | str, *, timeout: float | None = None,
                   **options: Any) -> ChatResult:
        """Chat with one of the kernel's models (``model=``; options as for
        :meth:`libaios.Client.chat`)."""
        options.pop("stream", None)
        body = chat_body(messages, **options)
        return ChatResult.from_body(await self.call(MsgType.LLM_CHAT, body, timeout))

    async def chat_stream(self, messages: list[dict[str, Any]] | str, *,
                          timeout: float | None = None, **options: Any
                          ) -> AsyncIterator[str | dict[str, Any] | ChatResult]:
        """Stream a chat: yields text pieces (and, with tools, tool-call
        deltas as maps), then the final :class:`ChatResult`."""
        timeout = self._timeout(timeout)
        body = chat_body(messages, stream=True, **options)
        async for rep in self._stream(MsgType.LLM_CHAT, body, timeout):
            if rep.type is MsgType.REPLY:
                yield ChatResult.from_body(rep.body)
            else:
                for piece in stream_pieces(rep.body):
                    yield piece

    async def whoami(self) -> dict[str, Any]:
        """This agent's identity as the kernel knows it."""
        return await self.call(MsgType.AGENT_WHOAMI)

    async def null(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.call(MsgType.SYS_NULL, {}, timeout)


def _answer(waiter: asyncio.Queue[protocol.Message] | asyncio.Future[protocol.Message],
            rep: protocol.Message) -> None:
    """Give a waiting call ``rep`` as its answer (a call already answered
    keeps its answer)."""
    if isinstance(waiter, asyncio.Queue):
        waiter.put_nowait(rep)
    elif not waiter.done():
        waiter.set_result(rep)


def _expire(reply: asyncio.Future[protocol.Message]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())


def connect(endpoint: str | None = None, **kwargs: Any) -> AsyncClient:
    """An :class:`AsyncClient`; use it as ``async with connect() as aios``."""
    return AsyncClient(endpoint, **kwargs)
