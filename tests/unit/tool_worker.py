"""A fake scheduler for tests of the whole tool worker: a ROUTER socket on
an in-process endpoint, ``serve`` on a thread, tasks in and replies out."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from aiosd.tools import service as service_mod
from libaios import protocol
from libaios.protocol import MsgType


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[zmq.Socket, str]]:
    """The scheduler's worker socket: ``(router, endpoint)``."""
    import signal

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # run() is not on the main thread
    router = zmq.Context.instance().socket(zmq.ROUTER)
    endpoint = f"inproc://sched-{uuid.uuid4().hex}"
    router.bind(endpoint)
    yield router, endpoint
    router.close(0)


#: the worker's routing id, which the router assigned (a worker does not choose its own)
ROUTE: dict[str, bytes] = {}


def recv(router: zmq.Socket, timeout: float = 10.0) -> protocol.Message:
    """The worker's next message other than a heartbeat."""
    while True:
        assert router.poll(int(timeout * 1000)), "nothing arrived"
        frames = router.recv_multipart()
        ROUTE["id"] = frames[0]
        msg = protocol.decode(frames[2:])
        if msg.type is not MsgType.WORKER_HEARTBEAT:
            return msg


def send_task(router: zmq.Socket, mtype: MsgType, body: dict[str, Any]) -> str:
    """Hand the worker a task from agent ``alice``; return its call id."""
    kid = uuid.uuid4().hex
    msg = protocol.call(MsgType.WORKER_TASK, {"call": kid, "type": mtype.value, "body": body,
                                              "namespace": "alice",
                                              "caller": {"agent": "a1", "name": "alice"}})
    router.send_multipart([ROUTE["id"], *protocol.encode(msg)])
    return kid


def serve_in_thread(config: Any, endpoint: str) -> threading.Thread:
    thread = threading.Thread(target=service_mod.serve, args=(config, endpoint), daemon=True)
    thread.start()
    return thread


def stop(router: zmq.Socket, thread: threading.Thread, timeout: float = 15.0) -> None:
    router.send_multipart([ROUTE["id"], *protocol.encode(protocol.call(MsgType.WORKER_SHUTDOWN))])
    thread.join(timeout)
    assert not thread.is_alive()
