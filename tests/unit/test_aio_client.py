"""The asyncio client against a stand-in kernel (a ROUTER in this process
that answers hello and then only the calls it is told to): replies reach
their calls when a burst of them arrives at once or while other calls are
being sent, and a call with no reply times out without disturbing the
others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio

from libaios import aio, errors, protocol
from libaios.protocol import MsgType

from .test_client import bind_again, picky_answer


async def kernel(router: zmq.asyncio.Socket, ignore: set[int], garble: set[int],
                 burst: int) -> None:
    """Answer each call with its own number, in one burst: once all ``burst``
    calls have arrived (the hello comes alone, before them), every one is
    answered together, in reverse order; the calls numbered in ``ignore``
    get nothing."""
    while True:
        got = [await router.recv_multipart()]
        if protocol.decode(got[0][2:]).type is not MsgType.HELLO:
            while len(got) < burst:
                got.append(await router.recv_multipart())
        for frames in reversed(got):
            msg = protocol.decode(frames[2:])
            if msg.type is MsgType.HELLO:
                body = {"agent": "a1", "name": "test"}
            elif msg.body.get("n") in ignore:
                continue
            elif msg.body.get("n") in garble:   # a reply whose body cannot be decoded
                frames_out = protocol.encode(protocol.reply(msg.id, {}))
                await router.send_multipart([frames[0], frames_out[0], frames_out[1], b"\xc1"])
                continue
            else:
                body = {"n": msg.body.get("n")}
            await router.send_multipart([frames[0], *protocol.encode(protocol.reply(msg.id, body))])


async def echo(router: zmq.asyncio.Socket) -> None:
    """Answer every call the moment it arrives."""
    while True:
        frames = await router.recv_multipart()
        msg = protocol.decode(frames[2:])
        body = {"agent": "a1", "name": "test"} if msg.type is MsgType.HELLO else msg.body
        await router.send_multipart([frames[0], *protocol.encode(protocol.reply(msg.id, body))])


async def serving(tmp_path: Path, stand_in: Callable[[zmq.asyncio.Socket], Awaitable[None]],
                  calls: Callable[[aio.AsyncClient], Awaitable[list[object]]]) -> list[object]:
    endpoint = f"ipc://{tmp_path}/kernel.sock"
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.bind(endpoint)
    task = asyncio.create_task(stand_in(router))
    try:
        async with aio.connect(endpoint, name="test") as c:
            return await calls(c)
    finally:
        task.cancel()
        router.close(0)


async def bind_for_the_client(router: zmq.asyncio.Socket, endpoint: str) -> None:
    """Bind ``router`` where a stand-in kernel just closed, and return once
    the client's socket has connected to it. A call sent before the
    client's socket has seen the old connection close is lost with it and
    waits for its deadline (over TCP nothing else tells): its connection to
    the new kernel is the sign that it has."""
    monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        bind_again(router, endpoint)
        await asyncio.wait_for(monitor.recv_multipart(), 30.0)
    finally:
        router.disable_monitor()
        monitor.close(0)


def run(tmp_path: Path, ignore: set[int], calls: int, timeout: float,
        garble: frozenset[int] = frozenset()) -> list[object]:
    async def make(c: aio.AsyncClient) -> list[object]:
        return await asyncio.gather(
            *(c.call(MsgType.SYS_NULL, {"n": i}, timeout) for i in range(calls)),
            return_exceptions=True)

    return asyncio.run(serving(tmp_path, lambda router: kernel(router, ignore, set(garble), calls),
                               make))


def test_a_burst_of_replies_reaches_each_call(tmp_path: Path) -> None:
    results = run(tmp_path, set(), 200, 10.0)
    assert results == [{"n": i} for i in range(200)]


def test_calls_sent_while_replies_arrive_each_get_theirs(tmp_path: Path) -> None:
    # 64 callers, each sending its next call as soon as its last is
    # answered: sends (which go straight to the socket when it can take them)
    # and replies interleave, and every reply reaches its call.
    async def make(c: aio.AsyncClient) -> list[object]:
        async def caller(k: int) -> list[object]:
            return [await c.call(MsgType.SYS_NULL, {"n": k * 100 + i}, 10.0) for i in range(50)]
        return await asyncio.gather(*(caller(k) for k in range(64)))

    results = asyncio.run(serving(tmp_path, echo, make))
    assert results == [[{"n": k * 100 + i} for i in range(50)] for k in range(64)]


def test_a_call_without_a_reply_times_out_alone(tmp_path: Path) -> None:
    results = run(tmp_path, {3}, 8, 1.0)
    assert isinstance(results[3], errors.Timeout)
    assert str(results[3]).startswith("no reply to sys.null from aiosd at ipc://")
    assert results[:3] + results[4:] == [{"n": i} for i in range(8) if i != 3]


def test_a_reply_that_cannot_be_decoded_fails_its_call_at_once(tmp_path: Path) -> None:
    results = run(tmp_path, set(), 4, 30.0, garble=frozenset({2}))
    assert isinstance(results[2], errors.BadFrame)
    assert "undecodable reply from aiosd" in str(results[2])
    assert results[:2] + results[3:] == [{"n": i} for i in range(4) if i != 2]


def test_a_stream_s_pieces_arrive_in_order_while_other_calls_are_sent(tmp_path: Path) -> None:
    async def streamer(router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            msg = protocol.decode(frames[2:])
            if msg.type is MsgType.LLM_CHAT:
                for k in range(300):
                    await router.send_multipart(
                        [frames[0], *protocol.encode(protocol.partial(msg.id, {"text": f"{k} "}))])
                final = protocol.reply(msg.id, {"text": "", "finish_reason": "stop"})
                await router.send_multipart([frames[0], *protocol.encode(final)])
                continue
            body = {"agent": "a1", "name": "test"} if msg.type is MsgType.HELLO else msg.body
            await router.send_multipart([frames[0], *protocol.encode(protocol.reply(msg.id, body))])

    async def make(c: aio.AsyncClient) -> list[object]:
        async def stream() -> list[object]:
            return [piece async for piece in c.chat_stream("hi", timeout=10.0)]

        async def caller(k: int) -> None:
            for i in range(30):
                await c.call(MsgType.SYS_NULL, {"n": i}, 10.0)

        pieces, *_ = await asyncio.gather(stream(), *(caller(k) for k in range(32)))
        return pieces

    pieces = asyncio.run(serving(tmp_path, streamer, make))
    assert pieces[:-1] == [f"{k} " for k in range(300)]
    assert pieces[-1].finish_reason == "stop"


def test_calls_that_find_a_restarted_kernel_reconnect_once_and_all_go_through() -> None:
    """Over TCP (no socket file to watch), every call in flight to a kernel
    that restarted learns it from an 'unauthenticated' answer at once: the
    first reconnects, the others go out on its new connection rather than
    each tearing down the last one's. A streamed call reconnects too."""
    async def picky(router: zmq.asyncio.Socket) -> None:
        known: set[bytes] = set()
        while True:
            frames = await router.recv_multipart()
            msg = protocol.decode(frames[2:])
            reply = picky_answer(known, frames[0], msg, msg.body)
            await router.send_multipart([frames[0], *protocol.encode(reply)])

    async def main() -> tuple[list[object], list[object]]:
        ctx = zmq.asyncio.Context.instance()
        kernel = {"router": ctx.socket(zmq.ROUTER)}
        port = kernel["router"].bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
        kernel["task"] = asyncio.create_task(picky(kernel["router"]))

        async def restart() -> None:
            kernel["task"].cancel()
            kernel["router"].close(0)
            kernel["router"] = ctx.socket(zmq.ROUTER)
            kernel["task"] = asyncio.create_task(picky(kernel["router"]))
            await bind_for_the_client(kernel["router"], f"tcp://127.0.0.1:{port}")

        try:
            async with aio.connect(f"tcp://127.0.0.1:{port}", name="test") as c:
                assert await c.call(MsgType.SYS_NULL, {"n": -1}, 10.0) == {"n": -1}
                await restart()
                calls = await asyncio.gather(
                    *(c.call(MsgType.SYS_NULL, {"n": i}, 10.0) for i in range(20)),
                    return_exceptions=True)
                await restart()   # and a streamed call is the first to find out
                streamed = [piece async for piece in c.chat_stream("hi", timeout=10.0)]
                return calls, streamed
        finally:
            kernel["task"].cancel()
            kernel["router"].close(0)

    calls, streamed = asyncio.run(main())
    assert calls == [{"n": i} for i in range(20)]
    assert len(streamed) == 1 and streamed[0].text == ""


def test_calls_a_restarted_kernel_answers_late_go_out_again_rather_than_fail() -> None:
    """The first call a restarted kernel answers 'unauthenticated' makes the
    client reconnect while the others' answers are still on their way.
    Those were sent after it on the same connection, so they reached the
    same kernel, which did not run them: they go out again on the new
    connection instead of failing as lost to the restart."""
    async def slow(router: zmq.asyncio.Socket) -> None:
        known: set[bytes] = set()
        answered_one = False
        later: list[asyncio.Task[None]] = []
        hello_again = asyncio.Event()

        async def answer_later(identity: bytes, reply: protocol.Message) -> None:
            await hello_again.wait()   # the client has connected afresh meanwhile
            await router.send_multipart([identity, *protocol.encode(reply)])

        while True:
            frames = await router.recv_multipart()
            msg = protocol.decode(frames[2:])
            if msg.type is MsgType.HELLO and answered_one:
                hello_again.set()
            reply = picky_answer(known, frames[0], msg, msg.body)
            if reply.type is MsgType.ERROR and answered_one:
                later.append(asyncio.create_task(answer_later(frames[0], reply)))
                continue
            answered_one = answered_one or reply.type is MsgType.ERROR
            await router.send_multipart([frames[0], *protocol.encode(reply)])

    async def main() -> list[object]:
        ctx = zmq.asyncio.Context.instance()
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000)
        task = asyncio.create_task(slow(router))
        try:
            async with aio.connect(f"tcp://127.0.0.1:{port}", name="test") as c:
                await c.call(MsgType.SYS_NULL, {"n": -1}, 10.0)
                task.cancel()
                router.close(0)
                router = ctx.socket(zmq.ROUTER)
                task = asyncio.create_task(slow(router))
                await bind_for_the_client(router, f"tcp://127.0.0.1:{port}")
                return await asyncio.gather(
                    *(c.call(MsgType.SYS_NULL, {"n": i}, 10.0) for i in range(10)),
                    return_exceptions=True)
        finally:
            task.cancel()
            router.close(0)

    assert asyncio.run(main()) == [{"n": i} for i in range(10)]


def test_a_call_that_cannot_be_sent_times_out_at_its_deadline(tmp_path: Path) -> None:
    """A kernel that stops reading: once the queues are full, calls wait to
    be sent, and fail at their deadline rather than wait for good."""
    async def deaf(router: zmq.asyncio.Socket) -> None:
        frames = await router.recv_multipart()   # the hello, and nothing more
        msg = protocol.decode(frames[2:])
        await router.send_multipart(
            [frames[0], *protocol.encode(protocol.reply(msg.id, {"agent": "a1", "name": "test"}))])
        await asyncio.Event().wait()

    async def make(c: aio.AsyncClient) -> list[object]:
        return await asyncio.wait_for(asyncio.gather(
            *(c.call(MsgType.SYS_NULL, {"n": i, "pad": "x" * 200}, 1.0) for i in range(6000)),
            return_exceptions=True), 60.0)

    results = asyncio.run(serving(tmp_path, deaf, make))
    assert all(isinstance(r, errors.Timeout) for r in results)
