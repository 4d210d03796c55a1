"""The sync client against a stand-in kernel (a ROUTER in this process) that
answers hello and then stops reading: once the queues between them are
full, a call fails at its deadline instead of waiting to be sent for good."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from libaios import errors, protocol
from libaios.client import Client
from libaios.protocol import MsgType

from .contexts import destroy


def test_a_call_that_cannot_be_sent_times_out_at_its_deadline(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/kernel.sock"
    kernel_ctx, client_ctx = zmq.Context(), zmq.Context()
    # small queues, so that a few large calls fill them
    client_ctx.setsockopt(zmq.SNDHWM, 1)
    router = kernel_ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 1)
    router.bind(endpoint)

    def hello() -> None:
        frames = router.recv_multipart()
        msg = protocol.decode(frames[2:])
        reply = protocol.reply(msg.id, {"agent": "a1", "name": "test"})
        router.send_multipart([frames[0], *protocol.encode(reply)])

    answering = threading.Thread(target=hello)
    answering.start()
    client = Client(endpoint, name="test", context=client_ctx).connect()
    answering.join()
    timed_out: list[errors.Timeout] = []

    def calls() -> None:
        for _ in range(40):
            try:
                client.call(MsgType.SYS_NULL, {"pad": "x" * 200_000}, timeout=0.05)
            except errors.Timeout as exc:
                timed_out.append(exc)

    caller = threading.Thread(target=calls, daemon=True)
    try:
        caller.start()
        caller.join(60)
        assert not caller.is_alive(), "a call waited to be sent past its deadline"
        assert len(timed_out) == 40
        assert str(timed_out[-1]).startswith("no reply to sys.null from aiosd at ipc://")
    finally:
        client.close()
        router.close(0)
        destroy(client_ctx)
        destroy(kernel_ctx)


# A stand-in kernel listens below the ephemeral port range (32768 and up on
# Linux): a client reconnecting to a port of that range while nothing
# listens there can be given that very port as its own and connect to
# itself, and the port is then taken when the stand-in binds it again.


def bind_again(sock: zmq.Socket, endpoint: str) -> None:
    """Bind where a socket just closed (libzmq lets go of the port a moment
    after the close returns)."""
    for _ in range(250):
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE:
                raise
            time.sleep(0.02)
    sock.bind(endpoint)


def serve(router: zmq.Socket, stop: threading.Event,
          answer: Callable[[bytes, protocol.Message], list[protocol.Message]]) -> None:
    """A stand-in kernel: each message gets the replies ``answer`` gives it."""
    while not stop.is_set():
        if not router.poll(50):
            continue
        frames = router.recv_multipart()
        for reply in answer(frames[0], protocol.decode(frames[2:])):
            router.send_multipart([frames[0], *protocol.encode(reply)])


def picky_answer(known: set[bytes], identity: bytes, msg: protocol.Message,
                 body: dict[str, Any]) -> protocol.Message:
    """How a kernel that knows only the connections that said hello to it
    (``known``) answers ``msg``: a call with ``body``."""
    if msg.type is MsgType.HELLO:
        known.add(identity)
        return protocol.reply(msg.id, {"agent": "a1", "name": "test"})
    if identity not in known:
        return protocol.error(msg.id, protocol.ErrorCode.UNAUTHENTICATED,
                              "this connection has not said hello")
    return protocol.reply(msg.id, body)


def test_calls_and_streams_reconnect_to_a_restarted_kernel() -> None:
    """Over TCP (no socket file to watch), a kernel that restarted answers a
    call on the old connection that it does not know it: the client says
    hello again and makes the call once more, a streamed one too."""
    ctx = zmq.Context()
    kernel: dict[str, object] = {}

    def start(port: int | None) -> int:
        router = ctx.socket(zmq.ROUTER)
        if port is None:
            port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
        else:
            bind_again(router, f"tcp://127.0.0.1:{port}")
        stop = threading.Event()
        known: set[bytes] = set()
        ok = {"text": "ok", "finish_reason": "stop"}
        thread = threading.Thread(target=serve, daemon=True, args=(
            router, stop, lambda identity, msg: [picky_answer(known, identity, msg, ok)]))
        thread.start()
        kernel.update(router=router, stop=stop, thread=thread)
        return port

    def halt() -> None:
        kernel["stop"].set()
        kernel["thread"].join(10)
        kernel["router"].close(0)

    port = start(None)
    client = Client(f"tcp://127.0.0.1:{port}", name="test", timeout=10.0).connect()
    try:
        assert client.call(MsgType.SYS_NULL)["text"] == "ok"
        halt()
        start(port)
        assert client.call(MsgType.SYS_NULL)["text"] == "ok"
        halt()
        start(port)
        stream = client.chat("hi", stream=True)
        assert list(stream) == [] and stream.result.text == "ok"
    finally:
        client.close()
        halt()
        destroy(ctx)


def test_a_call_made_while_a_stream_is_read_is_refused_and_the_stream_goes_on() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
    stop = threading.Event()

    def answer(identity: bytes, msg: protocol.Message) -> list[protocol.Message]:
        if msg.type is MsgType.HELLO:
            return [protocol.reply(msg.id, {"agent": "a1", "name": "test"})]
        # three pieces, then the end
        return [*(protocol.partial(msg.id, {"text": t}) for t in ("a", "b", "c")),
                protocol.reply(msg.id, {"text": "abc", "finish_reason": "stop"})]

    thread = threading.Thread(target=serve, args=(router, stop, answer), daemon=True)
    thread.start()
    client = Client(f"tcp://127.0.0.1:{port}", name="test", timeout=10.0).connect()
    try:
        stream = client.chat("hi", stream=True)
        pieces, refused = [], []
        for piece in stream:
            pieces.append(piece)
            try:
                client.null()
            except errors.Conflict as exc:
                refused.append(str(exc))
        assert pieces == ["a", "b", "c"] and stream.result.text == "abc"
        assert len(refused) == 3 and "a streamed call is being read" in refused[0]
        assert client.null()["text"] == "abc"   # once it has ended, calls go again
    finally:
        stop.set()
        thread.join(10)
        client.close()
        destroy(ctx)


def answer_hello(router: zmq.Socket) -> None:
    frames = router.recv_multipart()
    msg = protocol.decode(frames[2:])
    router.send_multipart(
        [frames[0], *protocol.encode(protocol.reply(msg.id, {"agent": "a1", "name": "test"}))])


def assert_given_up(kernel: Callable[[zmq.Socket], None], stop: threading.Event) -> None:
    """A call to the stand-in ``kernel`` (a thread serving a ROUTER until
    ``stop``) whose ``cancelled`` is set 0.2 s in fails as cancelled."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
    thread = threading.Thread(target=kernel, args=(router,), daemon=True)
    thread.start()
    client = Client(f"tcp://127.0.0.1:{port}", name="test").connect()
    cancelled = threading.Event()
    threading.Timer(0.2, cancelled.set).start()
    try:
        with pytest.raises(errors.Cancelled, match="sys.null: given up before its reply came"):
            client.call(MsgType.SYS_NULL, {}, timeout=10.0, cancelled=cancelled)
    finally:
        stop.set()
        thread.join(10)
        client.close()
        destroy(ctx)


def test_a_call_given_up_from_another_thread_fails_as_cancelled() -> None:
    assert_given_up(answer_hello, threading.Event())   # the call is never answered


def test_a_cancel_is_seen_while_partial_replies_keep_coming() -> None:
    stop = threading.Event()

    def chatty(router: zmq.Socket) -> None:   # partial replies to the call, at last a final one
        answer_hello(router)
        frames = router.recv_multipart()
        msg = protocol.decode(frames[2:])
        for _ in range(300):
            if stop.is_set():
                return
            router.send_multipart([frames[0], *protocol.encode(protocol.partial(msg.id, {"n": 1}))])
            time.sleep(0.01)
        router.send_multipart([frames[0], *protocol.encode(protocol.reply(msg.id, {"done": True}))])

    # unseen, the cancel would let the call take the final reply
    assert_given_up(chatty, stop)
