"""The kernel's figures (what ``admin.metrics`` answers, see
aiosd.scheduler.metrics) as Prometheus metrics: the families, and their
exposition text. The gateway's ``/metrics`` and ``aiosctl metrics`` both
render through here, so the two show the same names and labels.

Pure: figures in, families out. Each rendering builds its own registry
(never prometheus_client's global one, which would mix in this process's
own figures and keep state between scrapes). The names are listed in
docs/metrics.md; docs/grafana-dashboard.json uses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .histogram import Histogram
from .procstate import ProcState

#: The exposition format ``exposition`` writes (Prometheus' text format
#: 0.0.4, which every Prometheus version reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: where a core found a call's conversation: its figure -> the tier label
HIT_TIERS = {"kv_hits": "kv", "ram_hits": "ram", "disk_hits": "disk"}
#: a call that found no conversation: its figure -> the reason label
#: (lost: evicted from every tier; cold: the agent's first call there)
MISS_REASONS = {"misses": "lost", "cold": "cold"}
#: retained conversations by tier: the figure a core reports for each
RETAINED = {"retained_seqs": "kv", "evicted_kept": "ram", "disk_kept": "disk"}
TOOL_OUTCOMES = ("ok", "error", "timeout", "cancelled")
DECISIONS = ("approved", "denied", "expired")


def _histograms(name: str, doc: str, labels: list[str],
                rows: Iterable[tuple[list[str], Any]]) -> HistogramMetricFamily:
    """A histogram family of the ``rows``: each the label values and a
    histogram (Histogram.to_dict); one that does not read as a histogram is
    left out rather than shown wrong."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, data in rows:
        try:
            hist = Histogram.from_dict(data)
        except ValueError:
            continue
        buckets = [(floatToGoString(le), n) for le, n in hist.cumulative()]   # "1.0", "+Inf"
        family.add_metric(values, buckets=buckets, sum_value=hist.total)
    return family


def _kernel(f: dict[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily("aios_start_time_seconds",
                            "When the scheduler started, seconds since the epoch.",
                            value=f.get("started", 0.0))
    yield GaugeMetricFamily("aios_agents_live", "Agents running or connected.",
                            value=f.get("agents_live", 0))
    yield CounterMetricFamily("aios_preemptions", "Calls suspended to let others run.",
                              value=f.get("preemptions", 0))


def _resources(f: dict[str, Any]) -> Iterator[Metric]:
    depth = GaugeMetricFamily("aios_queue_depth", "Calls waiting in a resource's queue.",
                              labels=["resource"])
    for resource, n in f.get("queues", {}).items():
        depth.add_metric([resource], n)
    yield depth
    running = GaugeMetricFamily("aios_calls_running", "Calls a resource's workers hold.",
                                labels=["resource"])
    for resource, n in f.get("running", {}).items():
        running.add_metric([resource], n)
    yield running
    yield _histograms("aios_queue_wait_seconds",
                      "Time a finished call waited in its resource's queue.", ["resource"],
                      (([resource], data) for resource, data in f.get("wait", {}).items()))


def _calls(f: dict[str, Any]) -> Iterator[Metric]:
    calls = CounterMetricFamily(
        "aios_calls", "System calls answered, by type and outcome (ok, an error code, or "
        "dropped: its caller was gone).", labels=["type", "outcome"])
    for row in f.get("calls", []):
        calls.add_metric([row["type"], row["outcome"]], row["count"])
    yield calls
    yield _histograms("aios_call_duration_seconds",
                      "Time from a call's arrival to its final answer.", ["type"],
                      (([kind], data) for kind, data in f.get("latency", {}).items()))
    yield _histograms("aios_llm_time_to_first_token_seconds",
                      "Time from a chat's arrival to its first generated piece.", ["model"],
                      (([model], data) for model, data in f.get("first_token", {}).items()))
    yield _histograms("aios_llm_call_tokens",
                      "Tokens of one chat that ended well, prompt or completion.",
                      ["model", "kind"],
                      (([row["model"], row["kind"]], row) for row in f.get("tokens", [])))


def _cores(f: dict[str, Any]) -> Iterator[Metric]:
    labels = ["core", "model"]

    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=labels)

    def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=labels + (extra or []))

    ready = gauge("aios_core_ready", "1 while the core is registered and serves, else 0.")
    slots = gauge("aios_core_slots", "Calls the core runs at once.")
    used = gauge("aios_core_slots_used", "Calls the core holds now.")
    prefill = counter("aios_core_prefill_tokens", "Prompt tokens the core prefilled.")
    decode = counter("aios_core_decode_tokens", "Tokens the core generated.")
    busy = counter("aios_core_busy_seconds", "Time the core's engine spent in steps.")
    cells = gauge("aios_core_kv_cells", "Cells of the core's KV cache.")
    cells_used = gauge("aios_core_kv_cells_used", "Cells of the core's KV cache holding a token.")
    retained = GaugeMetricFamily("aios_core_retained_conversations",
                                 "Conversations the core keeps between calls, by tier.",
                                 labels=labels + ["tier"])
    hits = counter("aios_core_cache_hits", "Calls that found their conversation, by tier.",
                   ["tier"])
    misses = counter("aios_core_cache_misses",
                     "Calls that found no conversation (lost: evicted from every tier; cold: "
                     "the agent's first call here).", ["reason"])
    suspended = counter("aios_core_suspensions", "Calls suspended at a token boundary.")
    resumed = counter("aios_core_resumes", "Suspended calls resumed from their snapshot.")
    for core in f.get("cores", []):
        key = [core["core"], core["model"]]
        ready.add_metric(key, 1 if core.get("ready") else 0)
        slots.add_metric(key, core.get("slots", 0))
        used.add_metric(key, core.get("slots_used", 0))
        stats = core.get("stats") or {}
        if not stats:
            continue   # not registered, or a backend that counts nothing (openai)
        for family, figure in ((prefill, "prefill_tokens"), (decode, "decode_tokens"),
                               (busy, "busy_s"), (cells, "kv_cells"),
                               (cells_used, "kv_cells_used"), (suspended, "suspended"),
                               (resumed, "resumed")):
            if figure in stats:
                family.add_metric(key, stats[figure])
        for figure, tier in RETAINED.items():
            if figure in stats:
                retained.add_metric(key + [tier], stats[figure])
        for figure, tier in HIT_TIERS.items():
            if figure in stats:
                hits.add_metric(key + [tier], stats[figure])
        for figure, reason in MISS_REASONS.items():
            if figure in stats:
                misses.add_metric(key + [reason], stats[figure])
    yield from (ready, slots, used, prefill, decode, busy, cells, cells_used, retained, hits,
                misses, suspended, resumed)


def _processes(f: dict[str, Any]) -> Iterator[Metric]:
    restarts = CounterMetricFamily("aios_process_restarts",
                                   "Times the supervisor restarted a kernel process.",
                                   labels=["process", "kind"])
    state = GaugeMetricFamily("aios_process_state",
                              "1 for the state a kernel process is in, 0 for the others.",
                              labels=["process", "kind", "state"])
    for proc in f.get("procs", []):
        key = [str(proc.get("name")), str(proc.get("kind"))]
        restarts.add_metric(key, proc.get("restarts", 0))
        for each in ProcState:
            state.add_metric(key + [each.value], 1 if proc.get("state") == each.value else 0)
    yield restarts
    yield state


def _tools(f: dict[str, Any]) -> Iterator[Metric]:
    calls = CounterMetricFamily("aios_tool_calls",
                                "Tool calls the tool manager ran, by outcome.",
                                labels=["tool", "outcome"])
    tools = f.get("tools", {})
    seconds = _histograms("aios_tool_duration_seconds", "Time a tool call ran.", ["tool"],
                          (([tool], figures["seconds"]) for tool, figures in tools.items()
                           if "seconds" in figures))
    running = GaugeMetricFamily("aios_tool_running", "Calls of a tool running now.",
                                labels=["tool"])
    for tool, figures in tools.items():
        counts = figures.get("calls") or {}
        for outcome in TOOL_OUTCOMES:
            calls.add_metric([tool, outcome], counts.get(outcome, 0))
        running.add_metric([tool], figures.get("running", 0))
    yield from (calls, seconds, running)


def _approvals(f: dict[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily("aios_approvals_pending",
                            "Destructive calls waiting for a person's decision.",
                            value=f.get("approvals_pending", 0))
    decided = CounterMetricFamily("aios_approvals_decided",
                                  "Approvals decided (expired: no decision in time, denied).",
                                  labels=["decision"])
    counts = f.get("approvals", {})
    for decision in DECISIONS:
        decided.add_metric([decision], counts.get(decision, 0))
    yield decided


def _memory(f: dict[str, Any]) -> Iterator[Metric]:
    memory = f.get("memory") or {}
    if not memory:
        return   # the memory manager is not registered
    for name, figure, doc, family in (
            ("aios_memory_evictions", "evictions", "Items evicted from RAM to storage.",
             CounterMetricFamily),
            ("aios_memory_faults", "faults", "Evicted items read back from storage.",
             CounterMetricFamily),
            ("aios_memory_usage_bytes", "usage_bytes", "RAM the memory manager's items use.",
             GaugeMetricFamily),
            ("aios_memory_budget_bytes", "budget_bytes", "The memory manager's RAM budget.",
             GaugeMetricFamily)):
        if figure in memory:
            yield family(name, doc, value=memory[figure])


def _agents(f: dict[str, Any]) -> Iterator[Metric]:
    """The agents the kernel chose to show (its top metrics.per_agent_top_k;
    none by default)."""
    labels = ["agent", "name"]
    calls = CounterMetricFamily("aios_agent_calls", "An agent's calls.", labels=labels)
    failed = CounterMetricFamily("aios_agent_failed_calls", "An agent's calls that failed.",
                                 labels=labels)
    tokens = CounterMetricFamily("aios_agent_tokens", "An agent's tokens, prompt or completion.",
                                 labels=labels + ["kind"])
    for row in f.get("agents", []):
        key = [row["agent"], row["name"]]
        calls.add_metric(key, row["calls"])
        failed.add_metric(key, row["failed"])
        tokens.add_metric(key + ["prompt"], row["prompt_tokens"])
        tokens.add_metric(key + ["completion"], row["completion_tokens"])
    yield from (calls, failed, tokens)


def families(figures: dict[str, Any]) -> list[Metric]:
    """The metric families of the kernel's ``figures``."""
    out: list[Metric] = []
    for group in (_kernel, _resources, _calls, _cores, _processes, _tools, _approvals,
                  _memory, _agents):
        out.extend(group(figures))
    return out


class KernelCollector(Collector):
    """A collector over one set of the kernel's figures."""

    def __init__(self, figures: dict[str, Any]) -> None:
        self.figures = figures

    def collect(self) -> Iterable[Metric]:
        return families(self.figures)


def exposition(figures: dict[str, Any]) -> bytes:
    """The kernel's ``figures`` in Prometheus' text format (CONTENT_TYPE)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KernelCollector(figures))
    return generate_latest(registry)
