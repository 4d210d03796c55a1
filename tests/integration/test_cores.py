"""Several LLM cores, CPU pinning, conversations evicted from a core's KV
cache and kept in RAM, and the event bus."""

from __future__ import annotations

import threading

import msgpack
import pytest
import zmq

from libaios import paths
from libaios.protocol import MsgType

from ..conftest import TEST_AGENTS, Daemon

pytestmark = pytest.mark.integration


def test_calls_are_spread_over_two_pinned_cores(make_daemon) -> None:
    config = {"llm": {"cores": [{"name": "left", "cpus": [0], "threads": 1},
                                {"name": "right", "cpus": [1], "threads": 1}]}}
    d: Daemon = make_daemon(config=config)
    status = d.status()
    info = {c["name"]: c["info"] for c in status["cores"]}
    assert info["left"]["cpus"] == [0] and info["right"]["cpus"] == [1]
    assert info["left"]["threads"] == 1
    cores: list[str] = []

    def call(i: int) -> None:
        with d.client() as c:
            cores.append(c.chat(f"Say {i}.", max_tokens=24).core)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(cores) == 6
    assert set(cores) == {"left", "right"}


def test_agents_taking_turns_on_a_small_kv_cache_continue_from_kept_cells(make_daemon) -> None:
    # 36 MiB hold three streams of 512 cells: one is the spare, so two
    # sequences for three agents, and each conversation is evicted before
    # its agent's next call
    d: Daemon = make_daemon(config={"llm": {"cores": [{"slots": 1, "n_ctx": 512, "kv_mb": 36,
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
    finally:
        for c in clients.values():
            c.close()
    stats = d.wait_for(lambda s: s["cores"][0].get("stats", {}).get("restored_seqs", 0) >= 3,
                       what="the second turns to restore kept cells")["cores"][0]["stats"]
    assert stats["seqs"] == 2 and stats["evicted_seqs"] >= 4
    assert stats["evicted_kept"] >= 1 and 0 < stats["evicted_kept_mb"] <= 64
    assert "evicted kept" in d.ctl("top", "--once").stdout


def test_event_bus_reports_agent_lifecycle(daemon: Daemon) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"agent.")
    sub.connect(paths.ipc(daemon.runtime, paths.EVENTS_SOCKET))
    try:
        # A PUB drops messages until the subscription has reached it, so the
        # first launches may go unseen: launch until one agent's whole life is.
        for _ in range(20):
            with daemon.client(operator=True) as c:
                info = c.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "exit_code.py"),
                                                  "args": ["--task", "0"]})
            agent_id = info["agent"]
            seen: dict[str, dict] = {}
            while f"agent.{agent_id}.exited" not in seen and sub.poll(5_000):
                topic, body = sub.recv_multipart()
                seen[topic.decode()] = msgpack.unpackb(body)
            if f"agent.{agent_id}.started" in seen:
                break
        assert seen[f"agent.{agent_id}.started"]["pid"] == info["pid"]
        assert seen[f"agent.{agent_id}.exited"]["exit_code"] == 0
    finally:
        sub.close()
