"""The metrics without a daemon: the histogram the kernel keeps, what the
scheduler counts as calls end (over a scheduler without sockets), the tool
manager's counts, the figures admin.metrics answers, their rendering in
Prometheus' text format (read back with prometheus_client's parser), the
top-K bound on per-agent series, the config keys, and the shipped Grafana
dashboard against the names actually exported."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from aiosd import metrics
from aiosd.config import ConfigError, from_dict
from aiosd.histogram import SECONDS, Histogram
from aiosd.scheduler import metrics as kernel_metrics
from aiosd.scheduler.calls import Call, CallState
from aiosd.scheduler.kernel import Kernel
from aiosd.scheduler.peers import Session, Worker
from aiosd.scheduler.tally import outcome_of
from aiosd.tools.registry import Context, Registry, Tool
from aiosd.tools.service import ToolService
from aiosd.worker import Task
from libaios import errors, protocol
from libaios.protocol import ErrorCode, MsgType

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def samples(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /,
          **labels: str) -> float | None:
    return found.get((metric, frozenset(labels.items())))


# -- the histogram ---------------------------------------------------------------


def test_a_histogram_counts_each_value_in_the_bucket_of_the_first_bound_it_does_not_pass() -> None:
    hist = Histogram((1.0, 2.0, 5.0))
    for v in (0.0, 1.0, 1.5, 2.0, 4.0, 7.0, 100.0):
        hist.observe(v)
    # le semantics: a value equal to a bound is in that bound's bucket
    assert hist.counts == [2, 2, 1, 2]
    assert hist.cumulative() == [(1.0, 2), (2.0, 4), (5.0, 5), (math.inf, 7)]
    assert hist.count == 7 and hist.total == pytest.approx(115.5)
    again = Histogram.from_dict(msgpack.unpackb(msgpack.packb(hist.to_dict())))
    assert again == hist


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_a_histogram_refuses_a_value_it_cannot_count(bad: float) -> None:
    with pytest.raises(ValueError, match="finite values of 0 or more"):
        Histogram(SECONDS).observe(bad)


def test_a_histogram_that_is_not_one_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="bounds must rise"):
        Histogram((2.0, 1.0))
    with pytest.raises(ValueError, match="not a histogram: 2 counts for 3 bounds"):
        Histogram.from_dict({"bounds": [1, 2, 3], "counts": [1, 2], "sum": 3})
    with pytest.raises(ValueError, match="not a histogram"):
        Histogram.from_dict({"bounds": [1]})


# -- what the scheduler counts -------------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    config = from_dict({"llm": {"models": [{"name": "core0"}]},
                        "metrics": {"per_agent_top_k": 2}})
    k = Kernel(config, tmp_path)
    now = time.time()
    core = Worker(name="core0", kind="llm", capacity=2, pid=1, types=frozenset({"llm.chat"}),
                  info={}, last_seen=now, registered=now, identity=b"core0")
    k.state.workers["core0"] = core
    k.state.worker_names[b"core0"] = "core0"
    return k


def chat(k: Kernel, n: int, agent: str = "a1") -> Call:
    """An llm.chat of ``agent`` that arrived a second ago, queued."""
    now = time.time()
    c = Call(f"k{n}", b"client", f"c{n}", agent, MsgType.LLM_CHAT, "llm", {}, None, now - 1.0,
             queued_at=now - 1.0, model="core0")
    k.life.submit(c)
    return c


def answer(k: Kernel, c: Call, mtype: MsgType, body: dict[str, Any]) -> protocol.Message:
    """``c``'s core answers it; what its caller got."""
    msg = protocol.Message(mtype, protocol.new_id(), body, re=c.kid)
    k.on_worker_frames([b"core0", *protocol.encode(msg)])
    (reply,) = [m for who, m in k.out.clients if m.re == c.client_call_id]
    return reply


def test_a_chat_that_ends_well_is_counted_with_its_latency_wait_tokens_and_first_token(
        kernel: Kernel) -> None:
    c = chat(kernel, 1)
    assert c.state is CallState.RUNNING
    reply = answer(kernel, c, MsgType.REPLY, {
        "text": "hi", "finish_reason": "stop", "first_token_s": 0.25,
        "usage": {"prompt_tokens": 30, "completion_tokens": 3}})
    assert "first_token_s" not in reply.body   # the core's timing is the kernel's own
    tally = kernel.state.tally
    assert tally.calls == {("llm.chat", "ok"): 1}
    assert tally.latency["llm.chat"].count == 1 and tally.latency["llm.chat"].total >= 1.0
    assert tally.wait["llm"].count == 1 and tally.wait["llm"].total >= 1.0
    # the second it waited before its core, and the quarter second there
    assert tally.first_token["core0"].count == 1 and tally.first_token["core0"].total >= 1.25
    assert tally.tokens["core0", "prompt"].total == 30
    assert tally.tokens["core0", "completion"].total == 3


def test_a_failed_a_timed_out_and_a_refused_call_are_counted_by_their_error_code(
        kernel: Kernel) -> None:
    failed = chat(kernel, 1)
    answer(kernel, failed, MsgType.ERROR, {"code": int(ErrorCode.BACKEND), "message": "no"})
    late = chat(kernel, 2)
    late.deadline = time.time() - 1
    kernel.tick(time.time())   # answered Timeout now; its worker lets go later
    assert late.state is CallState.CANCELLING
    answer(kernel, chat(kernel, 3), MsgType.ERROR, {"code": 12345, "message": "odd"})
    agent = kernel.state.agents.register("alice", None)
    kernel.state.add_session(Session(b"alice", "alice", operator=False, agent=agent))
    bad = protocol.call(MsgType.LLM_CHAT, {"messages": "not a list"})
    kernel.on_client_frames([zmq.Frame(f) for f in [b"alice", *protocol.encode(bad)]])
    assert kernel.state.tally.calls == {
        ("llm.chat", "backend"): 1, ("llm.chat", "timeout"): 1, ("llm.chat", "unknown"): 1,
        ("llm.chat", "invalid_argument"): 1}
    # a refused call never ran: no latency
    assert kernel.state.tally.latency["llm.chat"].count == 3


def test_a_running_call_whose_agent_ends_is_counted_once_as_dropped(kernel: Kernel) -> None:
    agent = kernel.state.agents.register("alice", None)
    running = chat(kernel, 1, agent=agent.id)
    agent.usage.first_call = time.time()   # it made a call: the kernel forgets it on end
    assert running.state is CallState.RUNNING
    kernel.state.agents.disconnect(agent, time.time())
    kernel.life.agent_ended(agent)
    assert running.state is CallState.CANCELLING
    assert kernel.state.tally.calls == {("llm.chat", "dropped"): 1}
    assert (agent.usage.calls, agent.usage.failed) == (1, 1)
    # the core lets go of it later: that is no second end
    msg = protocol.Message(MsgType.ERROR, protocol.new_id(),
                           {"code": int(ErrorCode.CANCELLED), "message": "cancelled"}, re=running.kid)
    kernel.on_worker_frames([b"core0", *protocol.encode(msg)])
    assert kernel.state.tally.calls == {("llm.chat", "dropped"): 1}
    assert kernel.state.tally.latency["llm.chat"].count == 1


def test_error_codes_make_a_bounded_set_of_outcomes() -> None:
    assert outcome_of(int(ErrorCode.OVERLOADED)) == "overloaded"
    assert {outcome_of(x) for x in (999, "x", None, 3.5)} == {"unknown"}


def test_approvals_are_counted_by_decision(kernel: Kernel) -> None:
    now = time.time()
    held = [Call(f"h{n}", b"client", f"h{n}", "a1", MsgType.STORAGE_DELETE, "storage", {},
                 None, now) for n in range(3)]
    for c in held:
        kernel.state.calls[c.kid] = c
        kernel.life.hold(c, "storage.delete", "a key", now)
    first, second, _ = list(kernel.state.approvals.pending.values())
    kernel.life.settle(kernel.state.approvals.take(first.id), True, "by op", now)
    kernel.life.settle(kernel.state.approvals.take(second.id), False, "by op", now)
    kernel.life.expire(now + 10 * kernel.state.config.access.approval_timeout)
    assert dict(kernel.state.tally.approvals) == {"approved": 1, "denied": 1, "expired": 1}


# -- the tool manager's counts ---------------------------------------------------------------


def test_the_tool_manager_counts_each_tool_s_calls_by_outcome_and_their_run_time() -> None:
    def slow(args: dict[str, Any], ctx: Context) -> str:
        ctx.cancelled.wait(10)
        return "woke"

    registry = Registry()
    registry.add(Tool("echo", "Echoes.", {"type": "object"}, lambda a, c: a))
    registry.add(Tool("crash", "Crashes.", {"type": "object"}, lambda a, c: 1 / 0))
    registry.add(Tool("slow", "Sleeps past its timeout.", {"type": "object"}, slow, timeout=0.05))
    svc = ToolService(registry)

    def call(name: str) -> None:
        svc.call(Task(uuid.uuid4().hex, MsgType.TOOL_CALL, {"name": name, "arguments": {}},
                      None, caller={"agent": "a1", "name": "alice"}, namespace="alice"))

    call("echo")
    call("echo")
    with pytest.raises(errors.BackendError):
        call("crash")
    with pytest.raises(errors.Timeout):
        call("slow")
    with pytest.raises(errors.NotFound):
        call("no such tool")   # never counted: a tool name is a registry's, not a caller's
    counted = svc.stats()["tools"]
    assert {t: f["calls"] for t, f in counted.items()} == {
        "crash": {"error": 1}, "echo": {"ok": 2}, "slow": {"timeout": 1}}
    assert Histogram.from_dict(counted["echo"]["seconds"]).count == 2
    assert Histogram.from_dict(counted["slow"]["seconds"]).total >= 0.05


# -- admin.metrics and its rendering ---------------------------------------------------------


def test_admin_metrics_answers_plain_figures_that_render_to_what_was_counted(
        kernel: Kernel) -> None:
    c = chat(kernel, 1)
    answer(kernel, c, MsgType.REPLY, {"text": "hi", "finish_reason": "stop", "first_token_s": 0.1,
                                       "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    kernel.state.workers["core0"].stats = {
        "prefill_tokens": 5, "decode_tokens": 2, "kv_hits": 1, "ram_hits": 0, "disk_hits": 0,
        "misses": 0, "cold": 1, "kv_cells": 4096, "kv_cells_used": 7, "retained_seqs": 1,
        "evicted_kept": 0, "disk_kept": 0, "suspended": 0, "resumed": 0, "note": "not a figure"}
    kernel.state.procs = [{"name": "core0", "kind": "llm", "state": "running", "restarts": 2}]
    kernel.state.add_session(Session(b"op", "op", operator=True))
    kernel.admin.on_metrics(kernel.state.sessions[b"op"], b"op",
                            protocol.call(MsgType.ADMIN_METRICS))
    (reply,) = [m for who, m in kernel.out.clients if who == b"op"]
    figures = msgpack.unpackb(msgpack.packb(reply.body))   # as it travels
    found = samples(metrics.exposition(figures))
    assert value(found, "aios_calls_total", type="llm.chat", outcome="ok") == 1
    assert value(found, "aios_call_duration_seconds_count", type="llm.chat") == 1
    assert value(found, "aios_queue_wait_seconds_count", resource="llm") == 1
    assert value(found, "aios_llm_time_to_first_token_seconds_count", model="core0") == 1
    assert value(found, "aios_llm_call_tokens_sum", model="core0", kind="prompt") == 5
    assert value(found, "aios_llm_call_tokens_bucket", model="core0", kind="completion",
                 le="2.0") == 1
    core = {"core": "core0", "model": "core0"}
    assert value(found, "aios_core_prefill_tokens_total", **core) == 5
    assert value(found, "aios_core_cache_hits_total", **core, tier="kv") == 1
    assert value(found, "aios_core_cache_misses_total", **core, reason="cold") == 1
    assert value(found, "aios_core_kv_cells_used", **core) == 7
    assert value(found, "aios_core_slots", **core) == 2
    assert value(found, "aios_core_slots_used", **core) == 0
    assert value(found, "aios_process_restarts_total", process="core0", kind="llm") == 2
    assert value(found, "aios_process_state", process="core0", kind="llm", state="running") == 1
    assert value(found, "aios_process_state", process="core0", kind="llm", state="fatal") == 0
    assert value(found, "aios_queue_depth", resource="llm") == 0
    assert not any(name.startswith("aios_agent_") for name, _ in found)   # no agent registered


def test_histogram_buckets_render_cumulative_and_end_at_inf() -> None:
    hist = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        hist.observe(v)
    found = samples(metrics.exposition({"latency": {"tool.call": hist.to_dict()}}))
    buckets = [value(found, "aios_call_duration_seconds_bucket", type="tool.call", le=le)
               for le in ("0.1", "1.0", "+Inf")]
    assert buckets == [1, 3, 4]
    assert value(found, "aios_call_duration_seconds_count", type="tool.call") == 4
    assert value(found, "aios_call_duration_seconds_sum", type="tool.call") == pytest.approx(4.05)


def _agents(k: Kernel) -> list[Any]:
    """Five agents: e used the most tokens, a made the most calls."""
    made = []
    for name, calls, tokens in (("a", 50, 10), ("b", 3, 300), ("c", 2, 200), ("d", 1, 5),
                                ("e", 4, 900)):
        agent = k.state.agents.register(name, None)
        agent.usage.calls, agent.usage.completion_tokens = calls, tokens
        made.append(agent)
    return made


def test_only_the_top_k_agents_get_series_of_their_own(kernel: Kernel) -> None:
    _agents(kernel)
    figures = kernel_metrics.figures(kernel.state)   # per_agent_top_k = 2, by tokens
    assert [a["name"] for a in figures["agents"]] == ["e", "b"]
    found = samples(metrics.exposition(figures))
    shown = {dict(labels)["name"] for name, labels in found if name.startswith("aios_agent_")}
    assert shown == {"e", "b"}
    assert value(found, "aios_agent_tokens_total", agent=figures["agents"][0]["agent"],
                 name="e", kind="completion") == 900


def test_the_top_k_is_by_tokens_or_calls_and_none_by_default(kernel: Kernel) -> None:
    agents = _agents(kernel)
    assert [a["name"] for a in kernel_metrics.top_agents(agents, 3, "calls")] == ["a", "e", "b"]
    assert [a["name"] for a in kernel_metrics.top_agents(agents, 10)] == ["e", "b", "c", "a", "d"]
    assert kernel_metrics.top_agents(agents, 0) == []
    default = Kernel(from_dict({}), kernel.state.runtime_dir)
    _agents(default)
    figures = kernel_metrics.figures(default.state)
    assert figures["agents"] == []
    assert not any(n.startswith("aios_agent_") for n, _ in samples(metrics.exposition(figures)))


def test_tools_shown_are_the_registry_s_whatever_calls_named(kernel: Kernel) -> None:
    now = time.time()
    tools = Worker(name="tools", kind="tool", capacity=8, pid=2, types=frozenset({"tool.call"}),
                   info={}, last_seen=now, registered=now,
                   stats={"tools": {"calculator": {"calls": {"ok": 3}}}})
    kernel.state.workers["tools"] = tools
    kernel.state.tool_info = {"calculator": {}, "python": {}}
    kernel.state.tool_running = {"calculator": 1, "made up by a caller": 0}
    found = samples(metrics.exposition(kernel_metrics.figures(kernel.state)))
    assert {dict(labels)["tool"] for name, labels in found if name.startswith("aios_tool_")} == {
        "calculator", "python"}
    assert value(found, "aios_tool_calls_total", tool="calculator", outcome="ok") == 3
    assert value(found, "aios_tool_calls_total", tool="python", outcome="timeout") == 0
    assert value(found, "aios_tool_running", tool="calculator") == 1


@pytest.mark.parametrize(("section", "message"), [
    ({"per_agent_top_k": -1}, "metrics.per_agent_top_k: must be 0 or more"),
    ({"per_agent_top_k": 5000}, "metrics.per_agent_top_k: at most 1000"),
    ({"per_agent_top_k": "ten"}, "metrics.per_agent_top_k: expected an integer"),
    ({"per_agent_by": "cost"}, "metrics.per_agent_by: must be one of: tokens, calls"),
    ({"top_k": 3}, "metrics.top_k: unknown key"),
])
def test_a_bad_metrics_setting_is_refused_naming_the_key(section: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict({"metrics": section})


# -- the dashboard ------------------------------------------------------------------------------


def every_figure() -> dict[str, Any]:
    """Figures in which every group of metrics has something to show."""
    hist = Histogram(SECONDS)
    hist.observe(0.3)
    return {
        "started": 1.0, "agents_live": 1, "preemptions": 0, "approvals_pending": 0,
        "queues": {"llm": 0}, "running": {"llm": 0}, "wait": {"llm": hist.to_dict()},
        "calls": [{"type": "llm.chat", "outcome": "ok", "count": 1}],
        "latency": {"llm.chat": hist.to_dict()}, "first_token": {"m": hist.to_dict()},
        "tokens": [{"model": "m", "kind": "prompt", **hist.to_dict()}],
        "approvals": {},
        "cores": [{"core": "m", "model": "m", "ready": True, "slots": 1, "slots_used": 0,
                   "stats": dict.fromkeys(kernel_metrics.CORE_FIGURES, 1)}],
        "procs": [{"name": "m", "kind": "llm", "state": "running", "restarts": 0}],
        "tools": {"calculator": {"calls": {}, "seconds": hist.to_dict(), "running": 0}},
        "memory": dict.fromkeys(kernel_metrics.MEMORY_FIGURES, 1),
        "agents": [{"agent": "a-1", "name": "a", "calls": 1, "failed": 0, "prompt_tokens": 1,
                    "completion_tokens": 1}],
    }


def test_the_dashboard_uses_exactly_the_metrics_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = {family.name: {s.name for s in family.samples} for family in
                text_string_to_metric_families(metrics.exposition(every_figure()).decode())}
    exported = set().union(*families.values())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    named = {n for expr in exprs for n in re.findall(r"\baios_[a-z_]+", expr)}
    assert named - exported == set(), "the dashboard names metrics aiosd does not export"
    # and every family exported has a panel
    assert {f for f, names in families.items() if not names & named} == set()
    # a Prometheus data source chosen by a variable, used by every panel
    (source,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == "${" + source["name"] + "}", panel["title"]
