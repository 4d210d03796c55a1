"""What an operator sees of a running aiosd: its JSON log (read back with
aiosctl logs), its events (aiosctl events), and a core flagged slow when
its decoding is slowed down (fault injection: AIOS_FAULT_SLOW_DECODE)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from libaios import events
from libaios.protocol import MsgType

from ..conftest import REPO, TEST_AGENTS, Daemon

pytestmark = pytest.mark.integration


def lines_of(stream: Any) -> queue.Queue[str]:
    """The lines of a child's pipe, as they come (read on a thread)."""
    got: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [got.put(line) for line in stream], daemon=True).start()
    return got


def readline(got: queue.Queue[str], timeout: float) -> str:
    """The next line from ``lines_of``, or AssertionError after ``timeout`` s."""
    try:
        return got.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"nothing on the pipe within {timeout}s") from None


def test_json_log_and_events_follow_an_agent_and_its_calls(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"kernel": {"log_format": "json"}})
    watcher = subprocess.Popen([sys.executable, "-m", "aiosd.ctl", "events", "--follow", "--json"],
                               env=d.env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out, err = lines_of(watcher.stdout), lines_of(watcher.stderr)
    try:
        # it says so once the kernel has its subscription
        assert "following events" in readline(err, 60)
        run = d.ctl("run", "--name", "logged", str(TEST_AGENTS / "calls.py"), "--calls", "2")
        assert run.returncode == 0, run.stderr
        seen: list[dict[str, Any]] = []
        agent = None
        while agent is None or f"agent.{agent}.exited" not in [e["topic"] for e in seen]:
            seen.append(json.loads(readline(out, 60)))
            if seen[-1]["topic"].endswith(".started") and seen[-1]["body"].get("name") == "logged":
                agent = seen[-1]["body"]["agent"]
        started = next(e for e in seen if e["topic"] == f"agent.{agent}.started")
        exited = next(e for e in seen if e["topic"] == f"agent.{agent}.exited")
        assert started["body"]["path"].endswith("calls.py") and started["ts"] <= exited["ts"]
        assert exited["body"]["exit_code"] == 0 and exited["body"]["name"] == "logged"
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 0   # interrupted as asked: not a failure
    finally:
        watcher.kill()
        watcher.wait()

    # every record of every process is a JSON line; the calls name agent and call
    records = [json.loads(line) for line in d.log_text().splitlines() if line.startswith("{")]
    assert {r["process"] for r in records} >= {"aiosd", "scheduler", "llm:smollm2-135m"}
    assert all({"ts", "level", "process", "message"} <= set(r) for r in records)
    chats = [r for r in records if r.get("event") == "call.finished" and r.get("agent") == agent]
    assert len(chats) == 2 and all("llm.chat done" in r["message"] for r in chats)
    assert all(len(r["call_id"]) == 32 for r in chats) and chats[0]["call_id"] != chats[1]["call_id"]

    # aiosctl logs finds the log itself (status says where it goes) and filters it
    mine = d.ctl("logs", "--agent", "logged", "--json")
    assert mine.returncode == 0, mine.stderr
    rows = [json.loads(x) for x in mine.stdout.splitlines()]
    assert rows and all(r["agent"] == agent for r in rows)
    assert {r.get("event") for r in rows} >= {"agent.started", "call.finished", "agent.exited"}
    core = d.ctl("logs", "--process", "llm", "--json")
    assert core.returncode == 0 and {json.loads(x)["process"] for x in core.stdout.splitlines()
                                     if not json.loads(x).get("continues")} == {"llm:smollm2-135m"}
    assert d.ctl("logs", "--lines", "-1").returncode == 2   # usage


def test_a_core_slowed_down_is_flagged_and_cleared_when_it_is_back(make_daemon: Any,
                                                                    short_tmp: Path) -> None:
    throttle = short_tmp / "slow"
    d: Daemon = make_daemon(
        # a fraction far under the noise of a shared machine: only the hook's slowdown counts
        {"scheduler": {"slow_core_fraction": 0.2, "slow_core_seconds": 1.0}},
        extra_env={"AIOS_FAULT_SLOW_DECODE": str(throttle)})
    stop = threading.Event()
    failures: list[BaseException] = []

    def chat_on() -> None:
        try:
            with d.client(name="busy", timeout=300) as c:
                while not stop.is_set():
                    c.call(MsgType.LLM_CHAT, {"messages": [{"role": "user", "content": "Count."}],
                                              "max_tokens": 24})
        except Exception as exc:  # noqa: BLE001 (the test says what went wrong, not a thread's trace)
            failures.append(exc)

    with events.subscribe(["core."], runtime_dir=d.runtime) as sub:
        busy = threading.Thread(target=chat_on)
        busy.start()
        try:
            learnt = d.wait_for(
                lambda s: (s["cores"][0].get("decode") or {}).get("median") is not None,
                timeout=180, what="the core's decode rate to be learnt")
            # each decode step now takes ten times as long as a token took
            # (a step's time depends on the machine and its load: a fixed
            # delay could be lost in it)
            median = learnt["cores"][0]["decode"]["median"]
            throttle.write_text(str(10 / median))
            slow = next_event(sub, "core.smollm2-135m.slow")
            assert slow.body["rate"] < 0.2 * slow.body["median"] and slow.body["fraction"] == 0.2
            status = d.status()
            assert status["slow_cores"] == ["smollm2-135m"]
            assert status["cores"][0]["decode"]["slow_since"] == slow.body["since"]
            shown = d.ctl("status")
            assert "core smollm2-135m is slow since" in shown.stdout, shown.stdout
            assert "event=core.slow" in d.log_text() and "core smollm2-135m is slow" in d.log_text()
            throttle.unlink()
            back = next_event(sub, "core.smollm2-135m.recovered")
            assert back.body["since"] == slow.body["since"] and not back.body["slow"]
            assert d.status()["slow_cores"] == []
        finally:
            stop.set()
            throttle.unlink(missing_ok=True)
            busy.join(timeout=120)
    assert not failures, failures


def next_event(sub: events.Subscription, topic: str, timeout: float = 180.0) -> events.Event:
    """The next event on ``topic`` (others are passed over)."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        event = sub.next(timeout=left)
        if event is not None and event.topic == topic:
            return event
    raise AssertionError(f"no {topic} event within {timeout}s")
