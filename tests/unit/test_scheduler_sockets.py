"""The scheduler's loop over real sockets, in this process: what the kernel
puts in its outbox reaches clients and workers, and a peer that cannot be
reached is taken for gone. A stand-in worker (a DEALER socket the test
drives) answers the tasks; the decisions themselves are tested without
sockets in test_scheduler_kernel.py and test_scheduling.py."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq

from libaios import paths, protocol
from libaios.protocol import Message, MsgType

from .contexts import destroy


@dataclass
class Loop:
    sched: object
    thread: threading.Thread
    ctx: zmq.Context

    def dealer(self, name: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(paths.ipc(self.sched.runtime_dir, name))
        return sock


def receive(sock: zmq.Socket, timeout: float = 10.0) -> Message:
    assert sock.poll(int(timeout * 1000)), "no message came"
    frames = sock.recv_multipart()
    _, payload = protocol.split_envelope([b"", *frames] if frames[0] else frames)
    return protocol.decode(payload)


def call(sock: zmq.Socket, mtype: MsgType, body: dict) -> Message:
    msg = protocol.call(mtype, body, 10.0)
    sock.send_multipart(protocol.encode(msg))
    return msg


@pytest.fixture
def make_loop(short_tmp) -> Iterator:
    """Start a scheduler's loop in a thread, after ``prepare(state)`` (what
    the test sets up before the loop runs); stopped at the test's end."""
    from aiosd.config import load
    from aiosd.scheduler.server import Scheduler

    made: list[Loop] = []

    def make(prepare=None) -> Loop:
        run = short_tmp / f"run{len(made)}"
        run.mkdir(mode=0o700)
        sched = Scheduler(load(None), run)
        if prepare is not None:
            prepare(sched.state)
        thread = threading.Thread(target=sched.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not (run / paths.KERNEL_SOCKET).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        made.append(Loop(sched, thread, zmq.Context()))
        return made[-1]

    yield make
    for loop in made:
        loop.sched.state.stopping = True
        loop.thread.join(timeout=10)
        destroy(loop.ctx)
        assert not loop.thread.is_alive(), "the scheduler's loop did not stop"


@pytest.fixture
def loop(make_loop) -> Loop:
    return make_loop()


def hello(loop: Loop, name: str) -> zmq.Socket:
    sock = loop.dealer(paths.KERNEL_SOCKET)
    msg = call(sock, MsgType.HELLO, {"name": name, "pid": os.getpid()})
    reply = receive(sock)
    assert reply.type is MsgType.REPLY and reply.re == msg.id and reply.body["name"] == name
    return sock


def register(loop: Loop, name: str = "core0") -> zmq.Socket:
    worker = loop.dealer(paths.WORKERS_SOCKET)
    worker.send_multipart(protocol.encode(protocol.call(MsgType.WORKER_READY, {
        "name": name, "kind": "llm", "capacity": 1, "pid": os.getpid(),
        "types": ["llm.chat", "sys.null"], "info": {}})))
    return worker


def test_a_call_goes_to_a_worker_and_its_answer_to_the_caller(loop) -> None:
    worker = register(loop)
    agent = hello(loop, "alpha")
    sent = call(agent, MsgType.SYS_NULL, {})
    task = receive(worker)
    assert task.type is MsgType.WORKER_TASK and task.body["type"] == "sys.null"
    worker.send_multipart(protocol.encode(protocol.reply(task.body["call"], {"core": "core0"})))
    answer = receive(agent)
    assert answer.type is MsgType.REPLY and answer.re == sent.id and answer.body == {"core": "core0"}


def _queued_null(state, client: bytes | None, agent: str) -> None:
    from aiosd.scheduler.calls import Call

    now = time.time()
    c = Call(protocol.new_id(), client, "c1", agent, MsgType.SYS_NULL, "llm", {}, now + 30, now,
             queued_at=now)
    state.calls[c.kid] = c
    state.queues["llm"].push(c)


def test_a_worker_that_cannot_be_reached_is_lost_and_its_call_runs_elsewhere(make_loop) -> None:
    from aiosd.scheduler.peers import Worker

    def prepare(state) -> None:
        # a worker registered on a connection that is gone, and a call
        # waiting for it: sending the task fails at once
        now = time.time()
        state.workers["gone"] = Worker("gone", "llm", 1, os.getpid(), frozenset({"sys.null"}), {},
                                       now + 3600, now, identity=b"no such connection")
        _queued_null(state, None, "kernel")

    loop = make_loop(prepare)
    state = loop.sched.state
    worker = register(loop, "core1")
    task = receive(worker)       # lost with "gone", the call came here
    assert task.type is MsgType.WORKER_TASK and task.body["type"] == "sys.null"
    assert "gone" not in state.workers
    (kid,) = state.calls
    assert task.body["call"] == kid and state.calls[kid].lost == 1


def test_a_client_that_cannot_be_reached_is_forgotten(make_loop) -> None:
    from aiosd.scheduler.peers import Session

    def prepare(state) -> None:
        agent = state.agents.register("ghost", os.getpid())
        agent.usage.first_call = time.time()
        state.add_session(Session(b"no such client", "ghost", operator=False, agent=agent))
        _queued_null(state, b"no such client", agent.id)

    loop = make_loop(prepare)
    state = loop.sched.state
    worker = register(loop)
    task = receive(worker)
    worker.send_multipart(protocol.encode(protocol.reply(task.body["call"], {"core": "core0"})))
    deadline = time.monotonic() + 10
    while state.sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not state.sessions and state.agents.get("ghost-1").state.value == "disconnected"
