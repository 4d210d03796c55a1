"""The synchronous client: how an agent (and aiosctl) makes system calls.

A :class:`Client` owns one DEALER socket to the kernel. Every call carries a
fresh id and a deadline; replies are matched on that id, so a late reply to
a call that already timed out is discarded, never mistaken for another's.
A client is meant for one thread; open one per thread (they are cheap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

import zmq

from . import errors, protocol
from .core import (DEFAULT_TIMEOUT, RESTARTED, ChatResult, ClientCore, chat_body, decode_reply,
                   encode_call, no_reply, stream_pieces)
from .protocol import ErrorCode, MsgType
from .wire import say_bye, send_frames

class Stream:
    """Iterates the partial replies of a streamed call; after the loop,
    :attr:`result` holds the final reply's body."""

    def __init__(self, parts: Iterator[dict[str, Any]]):
        self._parts = parts
        self.result: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.result = yield from self._parts


class Client(ClientCore):
    """A connection to ``aiosd``.

    ``endpoint`` defaults to the kernel socket in the runtime directory
    (see :mod:`libaios.paths`); ``token`` defaults to the credential the kernel
    put in ``AIOS_AGENT_TOKEN`` when it launched this agent.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        token: str | None = None,
        name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        operator: bool = False,
        context: zmq.Context | None = None,
    ):
        super().__init__(endpoint, token=token, name=name, timeout=timeout, operator=operator)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._streaming = False   # a stream is being read (see _open_stream)

    # -- connection ------------------------------------------------------

    def _check_kernel(self) -> None:
        """Raise if the kernel this client talked to is gone or was replaced:
        a call in flight then can never be answered."""
        if self._kernel_replaced():
            raise errors.WorkerLost(RESTARTED)

    def connect(self) -> Client:
        """Open the socket and introduce this process to the kernel."""
        if self._sock is not None:
            return self
        self._attach()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self._sock = sock
        try:
            self.identity = self._roundtrip(MsgType.HELLO, *self._hello())
        except BaseException:
            self.close()
            raise
        return self

    def _current(self) -> None:
        """Connect, or connect again if the kernel was replaced since (a
        restarted scheduler binds a new socket file): a new connection
        says hello to the new kernel, and the calls that follow are not
        taken for calls of the old one."""
        if self._sock is not None and self._kernel_replaced():
            self.close()
        self.connect()

    def close(self) -> None:
        if self._sock is not None:
            say_bye(self._sock, bool(self.identity))
            self._sock.close(linger=100)
            self._sock = None

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -----------------------------------------------------------

    def _send(self, msg: protocol.Message, deadline: float, timeout: float,
              cancelled: threading.Event | None = None) -> None:
        """Send ``msg``, waiting until ``deadline`` (monotonic) at most for
        room in the socket's queue (a kernel that stopped reading fills it)."""
        assert self._sock is not None
        frames = encode_call(msg)
        while True:
            try:
                send_frames(self._sock, frames, nonblocking=True)
                return
            except zmq.Again:
                _check_cancelled(msg, cancelled)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise no_reply(msg, self.endpoint, timeout) from None
                self._sock.poll(_wait_ms(left, cancelled), zmq.POLLOUT)

    def _replies(self, msg: protocol.Message, timeout: float,
                 cancelled: threading.Event | None = None
                 ) -> Generator[dict[str, Any], None, dict[str, Any]]:
        """Send ``msg``; yield partial bodies; return the final body."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        _check_cancelled(msg, cancelled)   # (not sent: nobody would wait for it)
        deadline = time.monotonic() + timeout
        self._send(msg, deadline, timeout, cancelled)
        while True:
            # (checked before each wait, so a steady flow of partial replies
            # cannot hide it)
            _check_cancelled(msg, cancelled)
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(_wait_ms(left, cancelled), zmq.POLLIN):
                _check_cancelled(msg, cancelled)
                if time.monotonic() < deadline:
                    self._check_kernel()
                    continue
                raise no_reply(msg, self.endpoint, timeout)
            rep = decode_reply(self._sock.recv_multipart())
            if rep.re != msg.id:
                continue  # a late reply to an earlier call that timed out
            if rep.type is MsgType.PARTIAL:
                yield rep.body
            elif rep.type is MsgType.REPLY:
                return rep.body
            else:
                raise errors.from_envelope(rep.body)

    def _roundtrip(self, mtype: MsgType, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return _final(self._replies(protocol.call(mtype, body, timeout), timeout))

    def _call_replies(self, mtype: MsgType, body: dict[str, Any], timeout: float,
                      cancelled: threading.Event | None = None
                      ) -> Generator[dict[str, Any], None, dict[str, Any]]:
        """Make a call: yield its partial bodies, return its final body. A
        kernel that restarted and forgot this connection answers at once
        that it does not know it: connect to it afresh, introduce ourselves
        again and call once more."""
        self._current()
        replies = self._replies(protocol.call(mtype, body, timeout), timeout, cancelled)
        try:
            first = next(replies)
        except StopIteration as stop:
            return stop.value
        except errors.Unauthenticated:
            self.close()
            self.connect()
            return (yield from self._replies(protocol.call(mtype, body, timeout), timeout,
                                             cancelled))
        yield first
        return (yield from replies)

    def call(
        self, mtype: MsgType, body: dict[str, Any] | None = None, timeout: float | None = None,
        cancelled: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Make one system call and return its final reply's body. Setting
        ``cancelled`` (from another thread) gives up waiting for it: the
        call then fails with :class:`~libaios.errors.Cancelled`."""
        timeout = self._timeout(timeout)
        self._check_no_stream(mtype)
        return _final(self._call_replies(mtype, body or {}, timeout, cancelled))

    def stream(
        self, mtype: MsgType, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Stream:
        """Make a call whose answer streams; iterate the returned :class:`Stream`."""
        timeout = self._timeout(timeout)
        self._check_no_stream(mtype)
        return Stream(self._open_stream(mtype, self._call_replies(mtype, body or {}, timeout)))

    def _open_stream(self, mtype: MsgType,
                     replies: Generator[dict[str, Any], None, dict[str, Any]]
                     ) -> Generator[dict[str, Any], None, dict[str, Any]]:
        """A stream's replies. While it is being read, another call on this
        client would take its replies (one socket, one reader): that call is
        refused instead."""
        self._check_no_stream(mtype)   # (another stream may have begun since)
        self._streaming = True
        try:
            return (yield from replies)
        finally:
            self._streaming = False

    def _check_no_stream(self, mtype: MsgType) -> None:
        if self._streaming:
            raise errors.Conflict(
                f"{mtype.value}: a streamed call is being read on this client; read it to its "
                "end first, or make this call on another client")

    # -- system calls ------------------------------------------------------

    def chat(
        self,
        messages: list[dict[str, Any]] | str,
        *,
        model: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        min_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | str | None = None,
        seed: int | None = None,
        stream: bool = False,
        timeout: float | None = None,
    ) -> ChatResult | Iterator[str | dict[str, Any]]:
        """Chat with one of the kernel's models: ``model`` (``aiosctl models``
        lists them), else the kernel's default model.

        ``messages`` is an OpenAI-style list (a bare string becomes one user
        message). With ``stream=True`` this returns an iterator of text
        pieces (and, with ``tools``, of tool-call deltas as maps in the
        OpenAI API's shape); its ``result`` attribute (a :class:`ChatResult`)
        is set once it is exhausted. A reply cut short by ``max_tokens`` has
        ``finish_reason="length"``; a call whose ``tool_choice`` asks for a
        tool call gets one, or raises :class:`~libaios.errors.ToolCallIncomplete`.
        ``parallel_tool_calls=False`` allows one call an answer. ``min_tokens``
        holds back the end of generation until that many tokens are generated
        (as vLLM's server does).
        """
        body = chat_body(
            messages, model=model, tools=tools, tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls, response_format=response_format,
            max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p,
            stop=stop, seed=seed, stream=stream,
        )
        if not stream:
            return ChatResult.from_body(self.call(MsgType.LLM_CHAT, body, timeout))
        return _TokenStream(self.stream(MsgType.LLM_CHAT, body, timeout))

    def whoami(self) -> dict[str, Any]:
        """This agent's identity as the kernel knows it."""
        return self.call(MsgType.AGENT_WHOAMI)

    def null(self, timeout: float | None = None) -> dict[str, Any]:
        """A system call that does nothing, through the scheduler and a worker."""
        return self.call(MsgType.SYS_NULL, {}, timeout)


def _wait_ms(left: float, cancelled: threading.Event | None) -> int:
    """How long to wait for the socket at most, in milliseconds, with
    ``left`` seconds before the deadline: in slices, so that a kernel that
    vanished (or a caller that gave up) is noticed quickly."""
    return int(min(left, 1.0 if cancelled is None else 0.1) * 1000) + 1


def _check_cancelled(msg: protocol.Message, cancelled: threading.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise errors.Cancelled(f"{msg.type.value}: given up before its reply came")


def _final(replies: Generator[dict[str, Any], None, dict[str, Any]]) -> dict[str, Any]:
    """Run a call's replies to their end: its final reply's body."""
    try:
        while True:
            next(replies)
    except StopIteration as stop:
        return stop.value


class _TokenStream:
    """Text pieces and tool-call deltas of a streamed chat; ``result`` is
    set at the end."""

    def __init__(self, stream: Stream):
        self._stream = stream
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str | dict[str, Any]]:
        for part in self._stream:
            yield from stream_pieces(part)
        assert self._stream.result is not None
        self.result = ChatResult.from_body(self._stream.result)


def connect(endpoint: str | None = None, **kwargs: Any) -> Client:
    """Connect to the kernel and return a ready :class:`Client`."""
    return Client(endpoint, **kwargs).connect()


__all__ = ["ChatResult", "Client", "ErrorCode", "Stream", "connect"]
