"""The kernel's figures as ``admin.metrics`` answers them: what the
scheduler counted (its tally), what it sees now (queues, slots, approvals,
the supervisor's process table) and what its workers last said in their
heartbeats (each LLM core's engine, the tool manager, the memory manager).

Plain data, read from the state and never changing it; aiosd.metrics
renders it in Prometheus' exposition format. Every list here is bounded by
the config or by an enum: cores, processes and models are configured, tools
are the tool manager's registry (never a name a caller wrote), and agents
appear only as the top ``metrics.per_agent_top_k``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from .agents import Agent
from .state import State

#: An LLM core's heartbeat figures that the metrics show (see Engine.describe).
CORE_FIGURES = (
    "prefill_tokens", "decode_tokens", "busy_s", "decode_s", "kv_cells", "kv_cells_used",
    "retained_seqs", "evicted_kept", "disk_kept", "kv_hits", "ram_hits", "disk_hits",
    "misses", "cold", "suspended", "resumed",
)
#: The memory manager's heartbeat figures that the metrics show.
MEMORY_FIGURES = ("evictions", "faults", "usage_bytes", "budget_bytes")


def _numbers(stats: dict[str, Any], keys: Iterable[str]) -> dict[str, float]:
    """The figures among ``keys`` that ``stats`` holds as numbers."""
    return {k: stats[k] for k in keys
            if isinstance(stats.get(k), (int, float)) and not isinstance(stats.get(k), bool)}


def top_agents(agents: Iterable[Agent], k: int, by: str = "tokens") -> list[dict[str, Any]]:
    """The ``k`` agents that used the most tokens (or made the most calls:
    ``by`` "calls"), most first, with their figures; none when ``k`` is 0.
    Ties go to the other measure, then to the agent id, so that the choice
    is the same from one scrape to the next."""
    if k <= 0:
        return []

    def tokens(a: Agent) -> int:
        return a.usage.prompt_tokens + a.usage.completion_tokens

    def rank(a: Agent) -> tuple[int, int, str]:
        first, second = (tokens(a), a.usage.calls) if by == "tokens" else (a.usage.calls, tokens(a))
        return first, second, a.id

    return [{"agent": a.id, "name": a.name, "calls": a.usage.calls, "failed": a.usage.failed,
             "prompt_tokens": a.usage.prompt_tokens,
             "completion_tokens": a.usage.completion_tokens}
            for a in heapq.nlargest(k, agents, key=rank)]


def figures(state: State) -> dict[str, Any]:
    """Everything the metrics show, as plain data (see aiosd.metrics)."""
    running: dict[str, int] = {resource: 0 for resource in state.queues}
    for worker in state.workers.values():
        running[worker.kind] = running.get(worker.kind, 0) + len(worker.inflight)
    cores = []
    for core in state.config.llm.cores:
        worker = state.workers.get(core.core)
        cores.append({
            "core": core.core, "model": core.name, "backend": core.backend,
            "ready": worker is not None,
            "slots": worker.capacity if worker else 0,
            "slots_used": len(worker.inflight) if worker else 0,
            "stats": _numbers(worker.stats, CORE_FIGURES) if worker else {},
        })
    tools_worker = next((w for w in state.workers.values() if w.kind == "tool"), None)
    counted = (tools_worker.stats.get("tools") if tools_worker else None) or {}
    tools = {}
    for name in sorted(state.tool_info):   # the registry's tools only
        mine = counted.get(name) if isinstance(counted, dict) else None
        tools[name] = {"running": state.tool_running.get(name, 0),
                       **(mine if isinstance(mine, dict) else {})}
    memory = state.workers.get("memory")
    rules = state.config.metrics
    return {
        "started": state.started,
        "queues": {name: len(queue) for name, queue in sorted(state.queues.items())},
        "running": dict(sorted(running.items())),
        "preemptions": state.preemptions,
        "agents_live": sum(1 for a in state.agents.agents.values() if a.alive),
        "approvals_pending": len(state.approvals.pending),
        **state.tally.to_dict(),
        "cores": cores,
        "procs": [{"name": p.get("name"), "kind": p.get("kind"), "state": p.get("state"),
                   "restarts": p.get("restarts", 0)} for p in state.procs],
        "tools": tools,
        "memory": _numbers(memory.stats, MEMORY_FIGURES) if memory else {},
        "agents": top_agents(state.agents.agents.values(), rules.per_agent_top_k,
                             rules.per_agent_by),
    }
