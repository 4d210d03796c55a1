"""The worker runtime over inproc sockets in one process: READY, tasks,
streaming, cancellation, errors, heartbeats, what is gone, shutdown."""

import signal
import threading
import uuid
from typing import Any

import pytest
import zmq

from aiosd.worker import Task, WorkerRuntime
from libaios import errors, protocol
from libaios.protocol import ErrorCode, MsgType


PARTS = 2000


def null(task: Task) -> dict[str, Any]:
    return {"echo": task.body.get("x")}


def chat(task: Task) -> dict[str, Any]:
    mode = task.body.get("mode")
    if mode == "stream":
        for i in range(3):
            task.emit({"part": i})
        return {"done": True}
    if mode == "stream-from-thread":
        # as an LLM core streams: the parts come from another thread
        # (its engine's), the result from the task's own
        emitter = threading.Thread(target=lambda: [task.emit({"part": i}) for i in range(PARTS)])
        emitter.start()
        emitter.join()
        return {"done": True}
    if mode == "huge":
        return {"data": b"x" * (protocol.MAX_BODY_BYTES + 1)}
    if mode == "loop":
        while True:
            task.check()
            task.cancelled.wait(0.01)
    if mode == "invalid":
        raise errors.InvalidArgument("bad x")
    raise RuntimeError("boom")


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # run() is not on the main thread
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"inproc://sched-{uuid.uuid4().hex}"
    router.bind(endpoint)
    forgets: list[dict[str, Any]] = []

    def forget(body: dict[str, Any]) -> None:
        forgets.append(body)
        if body.get("agent") == "buggy":
            raise RuntimeError("a bug in forgetting")

    rt = WorkerRuntime("test", "w1", 2, endpoint, {MsgType.SYS_NULL: null, MsgType.LLM_CHAT: chat},
                       heartbeat_interval=0.05, forget=forget)
    thread = threading.Thread(target=rt.run, daemon=True)
    thread.start()
    yield router, thread, forgets
    rt.stop()
    thread.join(5)
    router.close(0)


#: the worker's routing id, which the router assigned (a worker does not choose its own)
ROUTE: dict[str, bytes] = {}


def recv(router: zmq.Socket, skip_beats: bool = True) -> protocol.Message:
    while True:
        assert router.poll(5000), "nothing arrived"
        frames = router.recv_multipart()
        ROUTE["id"] = frames[0]
        msg = protocol.decode(frames[2:])
        if not (skip_beats and msg.type is MsgType.WORKER_HEARTBEAT):
            return msg


def task(router: zmq.Socket, kind: MsgType, body: dict[str, Any]) -> str:
    kid = uuid.uuid4().hex
    msg = protocol.call(MsgType.WORKER_TASK, {"call": kid, "type": kind.value, "body": body})
    router.send_multipart([ROUTE["id"], *protocol.encode(msg)])
    return kid


def test_ready_tasks_streams_errors_cancel_and_shutdown(runtime) -> None:
    router, thread, _ = runtime
    ready = recv(router)
    assert ready.type is MsgType.WORKER_READY
    assert (ready.body["kind"], ready.body["name"], ready.body["capacity"]) == ("test", "w1", 2)
    kid = task(router, MsgType.SYS_NULL, {"x": 7})
    rep = recv(router)
    assert rep.type is MsgType.REPLY and rep.re == kid and rep.body == {"echo": 7}
    kid = task(router, MsgType.LLM_CHAT, {"mode": "stream"})
    got = [recv(router) for _ in range(4)]
    assert [m.type for m in got] == [MsgType.PARTIAL] * 3 + [MsgType.REPLY]
    assert [m.body.get("part") for m in got[:3]] == [0, 1, 2]
    kid = task(router, MsgType.LLM_CHAT, {"mode": "loop"})
    cancel = protocol.call(MsgType.WORKER_CANCEL, {"call": kid})
    router.send_multipart([ROUTE["id"], *protocol.encode(cancel)])
    rep = recv(router)
    assert rep.re == kid and rep.body["code"] == ErrorCode.CANCELLED
    task(router, MsgType.LLM_CHAT, {"mode": "invalid"})
    assert recv(router).body["code"] == ErrorCode.INVALID_ARGUMENT
    task(router, MsgType.LLM_CHAT, {"mode": "crash"})
    assert recv(router).body["code"] == ErrorCode.INTERNAL
    task(router, MsgType.SYS_NULL, {"x": 1})  # still serving after a handler crash
    assert recv(router).body == {"echo": 1}
    assert recv(router, skip_beats=False).type is MsgType.WORKER_HEARTBEAT
    shutdown = protocol.call(MsgType.WORKER_SHUTDOWN)
    router.send_multipart([ROUTE["id"], *protocol.encode(shutdown)])
    thread.join(5)
    assert not thread.is_alive()


def test_what_the_scheduler_says_is_gone_reaches_the_handler(runtime) -> None:
    router, _, forgets = runtime
    assert recv(router).type is MsgType.WORKER_READY
    for body in ({"agent": "buggy"}, {"agent": "a1", "snapshots": ["s1"]}):
        router.send_multipart([ROUTE["id"], *protocol.encode(protocol.call(MsgType.WORKER_FORGET, body))])
    task(router, MsgType.SYS_NULL, {"x": 2})    # after a failed forget, still serving
    assert recv(router).body == {"echo": 2}
    assert forgets == [{"agent": "buggy"}, {"agent": "a1", "snapshots": ["s1"]}]


def test_parts_streamed_from_another_thread_arrive_before_the_result(runtime) -> None:
    router, _, _ = runtime
    assert recv(router).type is MsgType.WORKER_READY
    for _ in range(3):
        kid = task(router, MsgType.LLM_CHAT, {"mode": "stream-from-thread"})
        got = [recv(router) for _ in range(PARTS + 1)]
        assert all(m.re == kid for m in got)
        assert [m.type for m in got] == [MsgType.PARTIAL] * PARTS + [MsgType.REPLY]
        assert [m.body["part"] for m in got[:-1]] == list(range(PARTS))


def test_a_result_too_large_for_the_scheduler_is_an_error_that_says_so(runtime) -> None:
    router, _, _ = runtime
    assert recv(router).type is MsgType.WORKER_READY
    kid = task(router, MsgType.LLM_CHAT, {"mode": "huge"})
    rep = recv(router)
    assert rep.re == kid and rep.type is MsgType.ERROR
    assert rep.body["code"] == ErrorCode.TOO_LARGE and "ask for less" in rep.body["message"]
