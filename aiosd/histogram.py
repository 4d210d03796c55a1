"""A histogram kept where figures are counted (the scheduler, the tool
manager): fixed bucket bounds and a count per bucket, cumulative since the
process started. Pure: no clock, no I/O.

A scrape reads the counts as they are (``to_dict``), so it is cheap however
many observations there were, and two scrapes see the same buckets:
Prometheus computes quantiles and rates from them (see aiosd.metrics).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

#: Bounds of durations, seconds: from a null call's few milliseconds to a
#: long generation's minutes.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0, 600.0)
#: Bounds of token counts of one call (powers of two up to a long context).
TOKENS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
          8192.0, 16384.0, 32768.0)


@dataclass
class Histogram:
    """Observations counted into buckets of upper bounds ``bounds`` (and
    one past the last, +Inf)."""

    bounds: tuple[float, ...]
    #: per bucket (not cumulative): counts[i] observations in
    #: (bounds[i-1], bounds[i]]; the last one beyond every bound
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)) or not self.bounds:
            raise ValueError(f"histogram bounds must rise strictly, got {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one observation (a value that is not a finite number, or is
        below 0, is a caller's bug: it is refused rather than skewing sums)."""
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a histogram observes finite values of 0 or more, not {value!r}")
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        """The histogram as plain data (it travels in msgpack)."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total}

    @classmethod
    def from_dict(cls, data: Any) -> Histogram:
        """The histogram ``to_dict`` wrote (ValueError if ``data`` is not one)."""
        try:
            bounds = tuple(float(b) for b in data["bounds"])
            counts = [int(c) for c in data["counts"]]
            total = float(data["sum"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a histogram: {exc}") from None
        if len(counts) != len(bounds) + 1 or any(c < 0 for c in counts):
            raise ValueError(f"not a histogram: {len(counts)} counts for {len(bounds)} bounds")
        return cls(bounds, counts, total)

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations at or below it) for each bound and infinity:
        the buckets as Prometheus counts them."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
