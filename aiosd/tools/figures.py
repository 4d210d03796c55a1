"""What the tool manager counts of each tool's calls: by outcome, and how
long they ran. The figures go to the scheduler with the worker's heartbeats
(for the metrics, see aiosd.metrics). Tools run on many threads at once:
one lock keeps the counts whole."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from ..histogram import SECONDS, Histogram

#: How a tool call can end.
OUTCOMES = ("ok", "error", "timeout", "cancelled")


class ToolFigures:
    """Per tool: calls by outcome, and a histogram of their run time. Only
    tools of the registry are counted (a call naming no tool is refused
    before), so the tools are a bounded set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, Counter[str]] = {}
        self._seconds: dict[str, Histogram] = {}

    def record(self, tool: str, outcome: str, seconds: float) -> None:
        """One call of ``tool`` ended (``outcome``, one of OUTCOMES) after
        running ``seconds``."""
        if outcome not in OUTCOMES:
            raise ValueError(f"a tool call's outcome is one of {', '.join(OUTCOMES)}, "
                             f"not {outcome!r}")
        with self._lock:
            self._calls.setdefault(tool, Counter())[outcome] += 1
            self._seconds.setdefault(tool, Histogram(SECONDS)).observe(max(0.0, seconds))

    def to_dict(self) -> dict[str, Any]:
        """{tool: {"calls": {outcome: n}, "seconds": histogram}} as plain data."""
        with self._lock:
            return {tool: {"calls": dict(self._calls[tool]),
                           "seconds": self._seconds[tool].to_dict()}
                    for tool in sorted(self._calls)}
