"""The sync client against a stand-in kernel (a ROUTER in this process) that
answers hello and then stops reading: once the queues between them are
full, a call fails at its deadline instead of waiting to be sent for good."""

from __future__ import annotations

import threading
from pathlib import Path

import zmq

from libaios import errors, protocol
from libaios.client import Client
from libaios.protocol import MsgType


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
        client_ctx.term()
        kernel_ctx.term()
