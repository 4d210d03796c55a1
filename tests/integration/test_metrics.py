"""The Prometheus metrics on real daemons and the embedded model: the
gateway's /metrics (a key required) read with prometheus_client's parser
before and after a chat through the gateway, whose counters and histograms
moved; the figures of cores, tools and the memory manager, which come with
their heartbeats; `aiosctl metrics`, parseable, with one agent's series
under metrics.per_agent_top_k = 1 and none by default."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import Daemon
from .test_gateway import gateway_url, make_key

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(found: Samples, metric: str, /, **labels: str) -> float:
    """A sample's value; 0 for a series not there yet (a counter before its
    first count)."""
    return found.get((metric, frozenset(labels.items())), 0.0)


def scrape(url: str, key: str) -> Samples:
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"},
                         timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def scrape_until(url: str, key: str, ok: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``ok`` holds: figures of workers come with their next
    heartbeat (every kernel.heartbeat_interval)."""
    end = time.monotonic() + 30
    while True:
        found = scrape(url, key)
        if ok(found):
            return found
        assert time.monotonic() < end, f"the metrics never showed {what}"
        time.sleep(0.2)


def test_gateway_metrics_move_with_a_chat(daemon: Daemon) -> None:
    base = gateway_url(daemon).removesuffix("/v1")
    key = make_key(daemon, "metrics-reader")
    refused = httpx.get(f"{base}/metrics", timeout=30)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
    wrong = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer aios-sk-nope"},
                      timeout=30)
    assert wrong.status_code == 401

    before = scrape(base, key)
    core = {"core": MODEL, "model": MODEL}
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=make_key(daemon, "metrics-chat"),
                           max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}])
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    # (the core's figures as of a heartbeat sent after the chat ended)
    after = scrape_until(base, key, lambda f: get(f, "aios_core_decode_tokens_total", **core)
                         > get(before, "aios_core_decode_tokens_total", **core),
                         "the core's decoded tokens")

    def moved(metric: str, **labels: str) -> float:
        return get(after, metric, **labels) - get(before, metric, **labels)

    assert moved("aios_calls_total", type="llm.chat", outcome="ok") == 1
    assert moved("aios_call_duration_seconds_count", type="llm.chat") == 1
    assert moved("aios_call_duration_seconds_sum", type="llm.chat") > 0
    assert moved("aios_call_duration_seconds_bucket", type="llm.chat", le="+Inf") == 1
    assert moved("aios_queue_wait_seconds_count", resource="llm") == 1
    assert moved("aios_llm_time_to_first_token_seconds_count", model=MODEL) == 1
    assert moved("aios_llm_call_tokens_count", model=MODEL, kind="completion") == 1
    assert moved("aios_llm_call_tokens_sum", model=MODEL, kind="completion") \
        == reply.usage.completion_tokens
    assert moved("aios_llm_call_tokens_sum", model=MODEL, kind="prompt") \
        == reply.usage.prompt_tokens
    assert moved("aios_core_prefill_tokens_total", **core) > 0
    assert get(after, "aios_core_ready", **core) == 1
    assert get(after, "aios_core_slots", **core) >= 1
    assert get(after, "aios_core_kv_cells_used", **core) > 0
    assert get(after, "aios_process_state", process=MODEL, kind="llm", state="running") == 1
    assert not any(name.startswith("aios_agent_") for name, _ in after)   # top-K is 0


def test_tools_and_the_memory_manager_report_through_their_heartbeats(daemon: Daemon) -> None:
    base = gateway_url(daemon).removesuffix("/v1")
    key = make_key(daemon, "metrics-scraper")
    before = scrape(base, key)
    with daemon.client(name="metrics-tools") as c:
        assert c.tools.call("calculator", {"expression": "6*7"}) in (42, 42.0, "42")
        c.memory.add("a note the memory manager holds")
    calculator = {"tool": "calculator", "outcome": "ok"}
    after = scrape_until(base, key, lambda f: get(f, "aios_tool_calls_total", **calculator)
                         > get(before, "aios_tool_calls_total", **calculator),
                         "the calculator's call")
    assert get(after, "aios_tool_calls_total", **calculator) \
        - get(before, "aios_tool_calls_total", **calculator) == 1
    assert get(after, "aios_tool_duration_seconds_count", tool="calculator") \
        - get(before, "aios_tool_duration_seconds_count", tool="calculator") == 1
    assert get(after, "aios_calls_total", type="tool.call", outcome="ok") \
        - get(before, "aios_calls_total", type="tool.call", outcome="ok") == 1
    after = scrape_until(base, key, lambda f: get(f, "aios_memory_usage_bytes") > 0,
                         "the memory manager's usage")
    assert get(after, "aios_memory_budget_bytes") == 8 * 2**20   # memory.budget_bytes' default
    assert ("aios_memory_evictions_total", frozenset()) in after
    assert ("aios_memory_faults_total", frozenset()) in after


def test_aiosctl_metrics_prints_the_exposition_with_the_top_k_agents(make_daemon) -> None:
    d: Daemon = make_daemon(config={"metrics": {"per_agent_top_k": 1},
                                    "gateway": {"enabled": False}})
    with d.client(name="busy") as busy, d.client(name="idle") as idle:
        busy.chat("Say hello.", max_tokens=8)
        busy.chat("Say bye.", max_tokens=8)
        idle.chat("Hi.", max_tokens=4)
    result = d.ctl("metrics")
    assert result.returncode == 0, result.stderr
    found = parse(result.stdout)
    assert get(found, "aios_calls_total", type="llm.chat", outcome="ok") == 3
    shown = {dict(labels)["name"] for name, labels in found if name == "aios_agent_calls_total"}
    assert shown == {"busy"}   # the one with the most tokens
    raw = d.ctl("metrics", "--json")
    assert raw.returncode == 0, raw.stderr
    figures = json.loads(raw.stdout)
    assert [a["name"] for a in figures["agents"]] == ["busy"]
    assert figures["agents"][0]["calls"] == 2
