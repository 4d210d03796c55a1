"""What workers' heartbeats say beyond "alive": a core whose decoding slowed
down (see slowcore) or came back, and what workers evicted (a core's
conversations leaving its KV cache, RAM or disk; the memory manager's items
leaving RAM for storage). Each becomes an event, and a slow core a warning
in the log and in status.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import logs
from .outbox import Outbox
from .peers import Worker
from .slowcore import Change, Counters, SlowCore
from .state import State

log = logging.getLogger("aiosd.scheduler")

#: A worker's eviction counters (running totals in its heartbeat's stats):
#: an LLM core's conversations evicted from its KV cache, moved from RAM to
#: disk, dropped for good; the memory manager's items moved to storage.
EVICTION_COUNTERS = {"llm": ("evicted_seqs", "spilled_seqs", "dropped_seqs"),
                     "memory": ("evictions",)}


class Health:
    """Reads each heartbeat's stats against the one before."""

    def __init__(self, state: State, out: Outbox) -> None:
        self.state = state
        self.out = out

    def on_stats(self, worker: Worker, stats: dict[str, Any], now: float) -> None:
        """``worker``'s heartbeat brought ``stats`` (its last are still in
        worker.stats)."""
        self._evictions(worker, worker.stats, stats)
        counters = Counters.of(stats) if worker.kind == "llm" else None
        if counters is None:
            return
        sched = self.state.config.scheduler
        watch = self.state.slow_cores.setdefault(
            worker.name, SlowCore(sched.slow_core_fraction, sched.slow_core_seconds))
        change = watch.observe(now, counters)
        if change is not None:
            self._announce(worker.name, change)

    def _evictions(self, worker: Worker, old: dict[str, Any], new: dict[str, Any]) -> None:
        grown = {}
        for key in EVICTION_COUNTERS.get(worker.kind, ()):
            before, after = old.get(key), new.get(key)
            # (no count before: the worker's first heartbeat, or a new process)
            if isinstance(before, int) and isinstance(after, int) and after > before:
                grown[key] = after - before
        if grown:
            self.out.publish(f"worker.{worker.name}.evicted",
                             {"worker": worker.name, "kind": worker.kind, "evicted": grown})

    def _announce(self, core: str, change: Change) -> None:
        fraction = self.state.config.scheduler.slow_core_fraction
        body = {"core": core, **change.to_dict(), "fraction": fraction}
        if change.slow:
            log.warning("core %s is slow: it decodes %.1f tokens/s, under %g of its recent "
                        "median of %.1f, for %.0fs now", core, change.rate, fraction,
                        change.median, change.at - change.since,
                        extra=logs.fields(event="core.slow"))
            self.out.publish(f"core.{core}.slow", body)
        else:
            log.info("core %s decodes at its usual rate again (%.1f tokens/s, median %.1f) "
                     "after %.0fs slow", core, change.rate, change.median,
                     change.at - change.since, extra=logs.fields(event="core.recovered"))
            self.out.publish(f"core.{core}.recovered", body)
