"""Faults: dying and wedged cores, dying agents, malformed frames."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import msgpack
import pytest
import zmq

from libaios import errors, protocol
from libaios.protocol import ErrorCode, MsgType

from ..conftest import TEST_AGENTS, Daemon

pytestmark = pytest.mark.integration

LONG = {"max_tokens": 3000, "temperature": 2.0, "seed": 1}


def running_calls(status: dict[str, Any]) -> int:
    return int(status["running"])


def test_core_killed_during_a_call_is_restarted_and_the_caller_answered(make_daemon) -> None:
    d: Daemon = make_daemon()
    old_pid = d.core_pid()
    outcome: dict[str, Any] = {}

    def call() -> None:
        with d.client(timeout=120) as c:
            try:
                # long enough to be running when the core dies; short
                # enough that the re-dispatched run ends well within 120 s
                outcome["reply"] = c.chat("Tell a long story.", **{**LONG, "max_tokens": 800})
            except errors.AIOSError as exc:
                outcome["error"] = exc

    t = threading.Thread(target=call)
    t.start()
    d.wait_for(lambda s: running_calls(s) == 1, what="the call to run")
    os.kill(old_pid, signal.SIGKILL)
    t.join(timeout=150)
    assert not t.is_alive(), "the caller hung"
    # nothing had streamed, and kernel.max_redispatch is 1: the call runs
    # again on the restarted core, and its caller gets the answer
    assert "error" not in outcome, outcome
    assert outcome["reply"].usage["completion_tokens"] > 0
    status = d.wait_for(lambda s: s["ready"] and d.core_pid() not in (old_pid, None),
                        what="the core to come back")
    core = next(p for p in status["procs"] if p["name"] == "smollm2-135m")
    assert core["restarts"] >= 1
    assert core["last_exit"] == -signal.SIGKILL
    with d.client() as c:
        assert c.chat("Say hi.", max_tokens=4).usage["completion_tokens"] > 0


def test_streamed_call_gets_a_retriable_error_when_its_core_dies(make_daemon) -> None:
    d: Daemon = make_daemon()
    pid = d.core_pid()
    with d.client(timeout=120) as c:
        stream = c.chat("Tell a long story.", stream=True, **LONG)
        with pytest.raises(errors.WorkerLost) as info:
            for i, _ in enumerate(stream):
                if i == 0:
                    os.kill(pid, signal.SIGKILL)
        assert info.value.retriable
    d.wait_for(lambda s: s["ready"] and d.core_pid() not in (pid, None),
               what="the core to come back")


def test_wedged_core_times_out_the_call_and_is_restarted(make_daemon) -> None:
    d: Daemon = make_daemon(extra_env={"AIOS_FAULT": "stall"})
    pid = d.core_pid()
    with d.client() as c:
        with pytest.raises(errors.Timeout) as info:
            c.chat("hi", max_tokens=4, timeout=2.0)
        assert info.value.retriable
    # it ignored the cancel: the scheduler kills it and the supervisor restarts it
    d.wait_for(lambda s: s["ready"] and d.core_pid() not in (pid, None), timeout=60,
               what="a restarted core")
    # and the call is settled: nothing of it runs or waits
    d.wait_for(lambda s: s["running"] == 0 and not any(s["queues"].values()),
               what="the timed-out call to be settled")


def test_crashing_core_spends_its_restart_budget_and_is_reported_failed(make_daemon) -> None:
    config = {"supervisor": {"restart_budget": 2, "backoff_initial": 0.05, "backoff_max": 0.1}}
    d: Daemon = make_daemon(config=config, extra_env={"AIOS_FAULT": "crash-on-start"},
                            wait_ready=False)
    status = d.wait_for(
        lambda s: any(c["state"] == "failed" for c in s["cores"]), what="the core to be failed"
    )
    core = next(p for p in status["procs"] if p["name"] == "smollm2-135m")
    assert core["state"] == "fatal" and core["restarts"] == 2
    result = d.ctl("status")
    assert result.returncode == 1
    assert "failed" in result.stderr
    with d.client() as c:
        with pytest.raises(errors.Unavailable):
            c.chat("hi", max_tokens=4)


def test_agent_killed_mid_call_frees_its_slot(daemon: Daemon) -> None:
    with daemon.client(operator=True) as ctl:
        info = ctl.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "long_call.py")})
    daemon.wait_for(lambda s: s["running"] == 1, what="the agent's call to run")
    os.kill(info["pid"], signal.SIGKILL)
    daemon.wait_for(lambda s: s["running"] == 0 and s["queues"]["llm"] == 0,
                    what="the kernel to free the slot")
    row = next(r for r in daemon.ps() if r["id"] == info["agent"])
    assert row["state"] == "exited" and row["exit_code"] == -signal.SIGKILL
    with daemon.client() as c:
        assert c.chat("Say hi.", max_tokens=4).usage["completion_tokens"] > 0


def test_hand_started_client_that_vanishes_has_its_call_cancelled(daemon: Daemon) -> None:
    import subprocess
    import sys

    code = ("import libaios; c = libaios.connect(); "
            "c.chat('Write a long story.', max_tokens=3000, temperature=2.0, timeout=600)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=daemon.env)
    try:
        daemon.wait_for(lambda s: s["running"] == 1, what="the call to run")
    finally:
        proc.kill()
        proc.wait()
    daemon.wait_for(lambda s: s["running"] == 0, what="the call to be cancelled")


# -- malformed input ------------------------------------------------------------


@pytest.fixture
def raw(daemon: Daemon):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    yield sock
    sock.close()


def exchange(sock: zmq.Socket, frames: list[bytes]) -> protocol.Message:
    sock.send_multipart(frames)
    assert sock.poll(10_000), "no reply"
    _, payload = protocol.split_envelope(sock.recv_multipart())
    return protocol.decode(payload)


def header(**over: Any) -> bytes:
    head = {"v": protocol.VERSION, "id": "abc123", "type": "sys.null"}
    head.update(over)
    return msgpack.packb(head)


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"", b"\xc1garbage", b"\x80"], ErrorCode.BAD_FRAME),
        ([b"no delimiter"], ErrorCode.BAD_FRAME),
        ([b"", header(), b"\x80", b"extra"], ErrorCode.BAD_FRAME),
        ([b"", header(v=99), b"\x80"], ErrorCode.BAD_VERSION),
        ([b"", header(type="no.such.call"), b"\x80"], ErrorCode.UNKNOWN_TYPE),
        ([b"", header(type="worker.ready"), b"\x80"], ErrorCode.UNKNOWN_TYPE),
        ([b"", header(), msgpack.packb({"x": msgpack.ExtType(3, b"boom")})], ErrorCode.BAD_FRAME),
        ([b"", header(), msgpack.packb({"x": "y" * (protocol.MAX_BODY_BYTES + 1)})],
         ErrorCode.TOO_LARGE),
        ([b"", header(), b"\x81\xa1a" + b"\x91" * 200 + b"\xc0"], ErrorCode.TOO_LARGE),
        ([b"", header(), msgpack.packb([1, 2])], ErrorCode.BAD_FRAME),
    ],
    ids=["garbage", "no-delimiter", "extra-frame", "version", "unknown-type", "worker-type",
         "ext-type", "oversized", "too-deep", "body-not-map"],
)
def test_malformed_frames_get_an_error_and_the_daemon_keeps_serving(
    daemon: Daemon, raw: zmq.Socket, frames: list[bytes], code: ErrorCode
) -> None:
    reply = exchange(raw, frames)
    assert reply.type is MsgType.ERROR
    assert reply.body["code"] == code, reply.body
    assert reply.body["message"]
    with daemon.client() as c:
        assert c.null()["core"] == "smollm2-135m"


def test_error_reply_carries_the_call_id_when_it_can(daemon: Daemon, raw: zmq.Socket) -> None:
    reply = exchange(raw, [b"", header(id="wanted-id", v=99), b"\x80"])
    assert reply.re == "wanted-id"


def test_calls_before_hello_are_refused(daemon: Daemon, raw: zmq.Socket) -> None:
    msg = protocol.call(MsgType.SYS_NULL, {})
    reply = exchange(raw, protocol.encode(msg))
    assert reply.re == msg.id
    assert reply.body["code"] == ErrorCode.UNAUTHENTICATED


def test_scheduler_killed_is_restarted_and_clients_carry_on(make_daemon) -> None:
    d: Daemon = make_daemon()
    sched = next(p for p in d.status()["procs"] if p["name"] == "scheduler")
    with d.client() as c:
        assert c.null()["core"] == "smollm2-135m"
        os.kill(sched["pid"], signal.SIGKILL)
        d.wait_for(lambda s: s["ready"] and s["pid"] != sched["pid"], what="a new scheduler")
        # the same client introduces itself again transparently, for calls
        # long enough to watch the kernel while they wait, and for streams
        assert c.chat("Say hi.", max_tokens=4).usage["completion_tokens"] > 0
        long = c.chat("Tell a long story.", max_tokens=800, min_tokens=800)   # seconds
        assert long.usage["completion_tokens"] == 800
        assert "".join(c.chat("Say hi.", max_tokens=8, stream=True))
    procs = {p["name"]: p for p in d.status()["procs"]}
    assert procs["scheduler"]["restarts"] == 1
    assert procs["smollm2-135m"]["restarts"] == 0  # the core re-registered; it was not restarted


def test_async_clients_carry_on_after_the_scheduler_restarts(make_daemon) -> None:
    """A call out when the scheduler dies fails at once as retriable (not
    at its deadline), and the same client's next calls reach the new one."""
    import asyncio

    from libaios import aio

    d: Daemon = make_daemon()
    sched = next(p for p in d.status()["procs"] if p["name"] == "scheduler")

    async def main() -> None:
        async with aio.connect(d.endpoint, name="async", timeout=300) as aios:
            assert (await aios.null())["core"] == "smollm2-135m"
            out = asyncio.ensure_future(aios.chat("Tell a long story.", **LONG))
            await asyncio.to_thread(d.wait_for, lambda s: s["running"] >= 1,
                                    what="the chat to run")
            os.kill(sched["pid"], signal.SIGKILL)
            with pytest.raises(errors.WorkerLost) as info:
                await asyncio.wait_for(out, 120)   # its own deadline is 300 s
            assert info.value.retriable
            await asyncio.to_thread(d.wait_for, lambda s: s["ready"] and s["pid"] != sched["pid"],
                                    what="a new scheduler")
            reply = await aios.chat("Say hi.", max_tokens=4)
            assert reply.usage["completion_tokens"] > 0
            assert (await aios.null())["core"] == "smollm2-135m"

    asyncio.run(main())
