"""Several LLM cores, CPU pinning, conversations evicted from a core's KV
cache and kept in RAM, what a core keeps for an agent let go of when the
agent ends, and the event bus."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from libaios import events
from libaios.protocol import MsgType

from ..conftest import TEST_AGENTS, Daemon
from .test_chat import run_agent

pytestmark = pytest.mark.integration


def test_agents_are_spread_over_a_models_two_pinned_cores(make_daemon) -> None:
    """Two replicas of a model on cpus = [0, 1]: one CPU each; agents with
    no conversation yet go to the core with the most free slots."""
    config = {"llm": {"models": [{"replicas": 2, "cpus": [0, 1], "threads": 1}]}}
    d: Daemon = make_daemon(config=config)
    status = d.status()
    info = {c["name"]: c["info"] for c in status["cores"]}
    assert info["smollm2-135m-0"]["cpus"] == [0] and info["smollm2-135m-1"]["cpus"] == [1]
    assert info["smollm2-135m-0"]["threads"] == 1
    cores: list[str] = []
    go = threading.Barrier(6)

    def call(i: int) -> None:
        with d.client(name=f"spread-{i}") as c:
            go.wait(timeout=60)
            cores.append(c.chat(f"Say {i}.", max_tokens=24).core)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(cores) == 6
    assert set(cores) == {"smollm2-135m-0", "smollm2-135m-1"}


def test_agents_taking_turns_on_a_small_kv_cache_continue_from_kept_cells(make_daemon) -> None:
    # 36 MiB hold three streams of 512 cells: one is the spare, so two
    # sequences for three agents, and each conversation is evicted before
    # its agent's next call
    d: Daemon = make_daemon(config={"llm": {"models": [{"slots": 1, "n_ctx": 512, "kv_mb": 36,
                                                       "evicted_mb": 64}]}})
    convs = {k: [{"role": "system", "content": f"You are agent {k}."},
                 {"role": "user", "content": f"Tell me about the number {i}."}]
             for i, k in enumerate("abc")}
    clients = {k: d.client(name=f"turns-{k}") for k in "abc"}
    try:
        for _ in range(2):
            for k in "abc":
                reply = clients[k].chat(convs[k], max_tokens=12)
                assert reply.usage["completion_tokens"] > 0
                convs[k] += [{"role": "assistant", "content": reply.text},
                             {"role": "user", "content": "Go on."}]
        # (while the agents are connected: a closing client's agent ends,
        # and what the core kept for it goes)
        stats = d.wait_for(lambda s: s["cores"][0].get("stats", {}).get("restored_seqs", 0) >= 3,
                           what="the second turns to restore kept cells")["cores"][0]["stats"]
        assert stats["seqs"] == 2 and stats["evicted_seqs"] >= 4
        assert stats["evicted_kept"] >= 1 and 0 < stats["evicted_kept_mb"] <= 64
        assert "evicted kept" in d.ctl("top", "--once").stdout
    finally:
        for c in clients.values():
            c.close()


def test_agents_that_ended_leave_nothing_kept_on_the_core(make_daemon) -> None:
    # three agents at once on two sequences: conversations are evicted and
    # kept in RAM while the agents run, and let go of when they exit
    d: Daemon = make_daemon(config={"llm": {"models": [{"slots": 1, "n_ctx": 512, "kv_mb": 36,
                                                       "evicted_mb": 64}]}})
    results: list[dict[str, Any]] = []

    def one(i: int) -> None:
        results.append(run_agent(d, "calls.py", "--calls", "2", "--task", f"Count to {i + 3}.")[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r["exit_code"] for r in results] == [0, 0, 0]
    stats = d.wait_for(lambda s: s["cores"][0].get("stats", {}).get("forgotten", 0) >= 3,
                       what="the core to let go of the three agents")["cores"][0]["stats"]
    assert stats["evicted_seqs"] >= 1
    assert stats["evicted_kept"] == 0 and stats["evicted_kept_mb"] == 0


def test_a_suspended_call_s_snapshot_is_dropped_when_its_agent_is_killed(make_daemon) -> None:
    d: Daemon = make_daemon(config={"llm": {"models": [{"slots": 1}]},
                                    "scheduler": {"policy": "rr", "quantum_tokens": 64}})
    with d.client(operator=True, timeout=30) as ctl:
        for name in ("first", "second"):
            ctl.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "long_call.py"), "name": name})

        def suspended() -> list[dict[str, Any]]:
            """The suspended calls, once the core's figures show a snapshot."""
            status = ctl.call(MsgType.ADMIN_STATUS, {"calls": True})
            if status["cores"][0].get("stats", {}).get("snapshots", {}).get("in_ram") != 1:
                return []
            return [c for c in status["calls"] if c["state"] == "suspended"]

        deadline = time.monotonic() + 120
        while not (waiting := suspended()):
            assert time.monotonic() < deadline, "no call was suspended"
            time.sleep(0.02)
        ctl.call(MsgType.ADMIN_KILL, {"agent": waiting[0]["agent"]})
    # the other call runs on alone, never suspended: no snapshot is left
    snaps = lambda s: s["cores"][0].get("stats", {}).get("snapshots", {})  # noqa: E731
    d.wait_for(lambda s: s["running"] == 1 and snaps(s).get("in_ram") == 0
               and snaps(s).get("on_disk") == 0,
               what="the killed agent's snapshot to be dropped")


def test_event_bus_reports_agent_lifecycle(daemon: Daemon) -> None:
    # subscribe() returns once the kernel has the subscription: the first
    # launch is seen whole
    with events.subscribe(["agent."], runtime_dir=daemon.runtime) as sub:
        with daemon.client(operator=True) as c:
            info = c.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "exit_code.py"),
                                              "args": ["--task", "0"]})
        agent_id = info["agent"]
        seen: dict[str, dict] = {}
        while f"agent.{agent_id}.exited" not in seen:
            event = sub.next(timeout=60)
            assert event is not None, f"no agent.{agent_id}.exited event; saw {list(seen)}"
            seen[event.topic] = event.body
    assert seen[f"agent.{agent_id}.started"]["pid"] == info["pid"]
    assert seen[f"agent.{agent_id}.exited"]["exit_code"] == 0
