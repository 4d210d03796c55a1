"""The asyncio client against a stand-in kernel (a ROUTER in this process
that answers hello and then only the calls it is told to): replies reach
their calls when a burst of them arrives at once, and a call with no reply
times out without disturbing the others."""

from __future__ import annotations

import asyncio
from pathlib import Path

import zmq
import zmq.asyncio

from libaios import aio, errors, protocol
from libaios.protocol import MsgType


async def kernel(router: zmq.asyncio.Socket, ignore: set[int], garble: set[int]) -> None:
    """Answer each call with its own number, in bursts: every call that has
    arrived is answered together, in reverse order; the calls numbered in
    ``ignore`` get nothing."""
    while True:
        got = [await router.recv_multipart()]
        await asyncio.sleep(0.05)   # let more arrive
        while True:
            try:
                got.append(await router.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
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


def run(tmp_path: Path, ignore: set[int], calls: int, timeout: float,
        garble: frozenset[int] = frozenset()) -> list[object]:
    async def main() -> list[object]:
        endpoint = f"ipc://{tmp_path}/kernel.sock"
        router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        router.bind(endpoint)
        serving = asyncio.create_task(kernel(router, ignore, set(garble)))
        try:
            async with aio.connect(endpoint, name="test") as c:
                return await asyncio.gather(
                    *(c.call(MsgType.SYS_NULL, {"n": i}, timeout) for i in range(calls)),
                    return_exceptions=True)
        finally:
            serving.cancel()
            router.close(0)

    return asyncio.run(main())


def test_a_burst_of_replies_reaches_each_call(tmp_path: Path) -> None:
    results = run(tmp_path, set(), 200, 10.0)
    assert results == [{"n": i} for i in range(200)]


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
