"""Arguments a call cannot carry are refused by both clients before they are
sent, as named errors (never a raw Python exception), against a stand-in
kernel (a ROUTER in this process) that notes every call it receives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from libaios import aio, errors, protocol
from libaios.client import Client
from libaios.protocol import MAX_CALL_BODY_BYTES, MsgType

from .contexts import destroy
from .test_aio_client import serving
from .test_client import serve

OK = {"text": "ok", "finish_reason": "stop"}
BIG = b"x" * (MAX_CALL_BODY_BYTES + 1)

#: (what the caller does, the error class, what its message must say)
BAD: list[tuple[str, Callable[[Any], Any], type[errors.AIOSError], list[str]]] = [
    ("huge max_tokens", lambda c: c.chat("hi", max_tokens=2**70),
     errors.InvalidArgument, ["llm.chat: ", "'max_tokens'", "64 bits"]),
    ("a set to store", lambda c: c.storage.put("k", {1, 2}),
     errors.InvalidArgument, ["storage.put: a set cannot be sent (field 'value')"]),
    ("a set in a message", lambda c: c.chat([{"role": "user", "content": {"hi"}}]),
     errors.InvalidArgument, ["llm.chat: ", "'messages[0].content'"]),
    ("an object in metadata", lambda c: c.memory.add("t", {"at": object()}),
     errors.InvalidArgument, ["memory.add: ", "'metadata.at'"]),
    ("a lone surrogate", lambda c: c.tools.call("calculator", {"expression": "\udc80"}),
     errors.InvalidArgument, ["tool.call: ", "'arguments.expression'"]),
    ("a body too large", lambda c: c.storage.write_file("big.bin", BIG),
     errors.TooLarge, ["storage.write_file: ", "too large",
                       f"{len(msgpack.packb({'path': 'big.bin', 'data': BIG}))} bytes",
                       f"at most {MAX_CALL_BODY_BYTES} bytes"]),
    ("a timeout that is no number", lambda c: c.call(MsgType.SYS_NULL, {}, "soon"),
     errors.InvalidArgument, ["'timeout'", "'soon'"]),
]


def check(exc: errors.AIOSError, cls: type[errors.AIOSError], says: list[str]) -> None:
    assert type(exc) is cls, repr(exc)
    for part in says:
        assert part in exc.message


def calls(seen: list[MsgType]) -> list[MsgType]:
    """The calls a stand-in kernel received, but for the bye of a closing client."""
    return [t for t in seen if t is not MsgType.BYE]


def answer(seen: list[MsgType]) -> Callable[[bytes, protocol.Message], list[protocol.Message]]:
    def reply(identity: bytes, msg: protocol.Message) -> list[protocol.Message]:
        seen.append(msg.type)
        body = {"agent": "a1", "name": "test"} if msg.type is MsgType.HELLO else OK
        return [protocol.reply(msg.id, body)]
    return reply


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[str, list[MsgType]]]:
    """A kernel's endpoint, and the calls it has received."""
    endpoint = f"ipc://{tmp_path}/kernel.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    stop, seen = threading.Event(), []
    thread = threading.Thread(target=serve, args=(router, stop, answer(seen)), daemon=True)
    thread.start()
    try:
        yield endpoint, seen
    finally:
        stop.set()
        thread.join(10)
        router.close(0)
        destroy(ctx)


@pytest.mark.parametrize("why, bad, cls, says", BAD, ids=[b[0] for b in BAD])
def test_the_sync_client_refuses_before_sending(stand_in: tuple[str, list[MsgType]], why: str,
                                                bad: Callable[[Any], Any],
                                                cls: type[errors.AIOSError],
                                                says: list[str]) -> None:
    endpoint, seen = stand_in
    with Client(endpoint, name="test", timeout=10.0) as c:
        with pytest.raises(errors.AIOSError) as info:
            bad(c)
        check(info.value, cls, says)
        assert c.null()["text"] == "ok"   # the connection is as good as before
    assert calls(seen) == [MsgType.HELLO, MsgType.SYS_NULL]


@pytest.mark.parametrize("why, bad, cls, says", BAD, ids=[b[0] for b in BAD])
def test_the_asyncio_client_refuses_before_sending(tmp_path: Path, why: str,
                                                   bad: Callable[[Any], Any],
                                                   cls: type[errors.AIOSError],
                                                   says: list[str]) -> None:
    seen: list[MsgType] = []

    async def kernel(router: zmq.asyncio.Socket) -> None:
        reply = answer(seen)
        while True:
            frames = await router.recv_multipart()
            for rep in reply(frames[0], protocol.decode(frames[2:])):
                await router.send_multipart([frames[0], *protocol.encode(rep)])

    async def make(c: aio.AsyncClient) -> list[object]:
        with pytest.raises(errors.AIOSError) as info:
            await bad(c)
        return [info.value, await c.null(), c._waiting]

    exc, null, waiting = asyncio.run(serving(tmp_path, kernel, make))
    check(exc, cls, says)
    assert null["text"] == "ok" and not waiting
    assert calls(seen) == [MsgType.HELLO, MsgType.SYS_NULL]


def test_a_client_s_own_timeout_is_checked() -> None:
    with pytest.raises(errors.InvalidArgument, match="'timeout'"):
        Client("ipc:///nonexistent", timeout=float("nan"))
    with pytest.raises(errors.InvalidArgument, match="'timeout'"):
        aio.AsyncClient("ipc:///nonexistent", timeout="10")
