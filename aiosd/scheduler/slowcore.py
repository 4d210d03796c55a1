"""Slow cores: a core whose decode rate stays under a fraction of its own
recent median for a while is flagged slow, and cleared when it is back.

A local core counts, in what its heartbeats report, the decode steps it
ran, the tokens they generated and the seconds they took (its engine's
``gen_steps``, ``decode_tokens``, ``gen_s``). A *window* is what those
counters gained since the last judged one, once it holds at least
:data:`MIN_STEPS` steps; its rate is tokens over seconds.

A rate is compared only with rates at the same batch size (a step that
decodes eight calls makes more tokens a second than one decoding one, and
a busy core is not a slow one): windows are classed by their mean batch,
in powers of two, and each class keeps the median of its last
:data:`HISTORY` healthy windows. A window under ``fraction`` of its
class's median is slow; slow windows all along for ``seconds`` flag the
core; the first healthy window after clears it. Slow windows are kept out
of the median, so a core slowed for good stays flagged.

Pure: no clock, no sockets; the scheduler passes the time and the counters.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

#: Fewest decode steps a window holds (fewer are too noisy to judge).
MIN_STEPS = 8
#: Healthy windows a batch class must have seen before it judges one.
MIN_HISTORY = 5
#: Healthy windows a batch class keeps (its "recent" median).
HISTORY = 120
#: seconds a core may go without decoding before its slow windows count
#: afresh (it was idle, not slow, in between)
IDLE_S = 60.0


@dataclass(frozen=True)
class Counters:
    """A core's running totals, as its heartbeat reports them."""

    steps: int
    tokens: int
    seconds: float

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Counters | None:
        """The counters in a heartbeat's stats; None for a core that does
        not count them (a remote backend)."""
        try:
            steps, tokens, secs = stats["gen_steps"], stats["decode_tokens"], stats["gen_s"]
        except (KeyError, TypeError):
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in (steps, tokens, secs)):
            return None
        return cls(int(steps), int(tokens), float(secs))


@dataclass(frozen=True)
class Change:
    """The core became slow (``slow``) or recovered."""

    slow: bool
    #: the window's rate and its class's median, tokens a second
    rate: float
    median: float
    #: when its windows first fell under the threshold
    since: float
    #: when this was decided
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"slow": self.slow, "rate": round(self.rate, 2), "median": round(self.median, 2),
                "since": self.since, "at": self.at}


class SlowCore:
    """One core's decode rate against its own recent median."""

    def __init__(self, fraction: float, seconds: float) -> None:
        self.fraction = fraction
        self.seconds = seconds
        self._base: Counters | None = None
        self._history: dict[int, deque[float]] = {}
        self._under_since: float | None = None
        self._judged: float | None = None   # when the last window was judged
        #: the change that flagged it, while it is flagged
        self.flagged: Change | None = None
        #: the last window judged: (rate, its class's median or None)
        self.last: tuple[float, float | None] | None = None

    def observe(self, now: float, counters: Counters) -> Change | None:
        """Take the core's counters at ``now``: the change this makes (it
        became slow, or recovered), or None."""
        base = self._base
        if (base is None or counters.steps < base.steps or counters.tokens < base.tokens
                or counters.seconds < base.seconds):
            self._base = counters   # the first report, or a new process's counters
            return None
        steps = counters.steps - base.steps
        if steps < MIN_STEPS:
            return None   # the window goes on
        tokens, seconds = counters.tokens - base.tokens, counters.seconds - base.seconds
        self._base = counters
        if tokens <= 0 or seconds <= 0:
            return None
        return self._judge(now, tokens / seconds, batch_class(tokens / steps), seconds)

    def _judge(self, now: float, rate: float, batch: int, busy: float) -> Change | None:
        """Judge a window of ``rate`` tokens a second at ``batch``, whose
        decoding took ``busy`` seconds."""
        history = self._history.setdefault(batch, deque(maxlen=HISTORY))
        if len(history) < MIN_HISTORY:
            history.append(rate)
            self.last = (rate, None)
            return None
        median = statistics.median(history)
        self.last = (rate, median)
        if self._judged is not None and now - self._judged - busy > max(self.seconds, IDLE_S):
            # the core did not decode for a while (idle): slow windows on
            # either side of the gap are not slow all along. (A slow window
            # itself lasts long: only the time it was not decoding counts.)
            self._under_since = None
        self._judged = now
        if rate < self.fraction * median:
            if self._under_since is None:
                self._under_since = now
            if self.flagged is None and now - self._under_since >= self.seconds:
                self.flagged = Change(True, rate, median, self._under_since, now)
                return self.flagged
            return None
        history.append(rate)
        self._under_since = None
        if self.flagged is None:
            return None
        since, self.flagged = self.flagged.since, None
        return Change(False, rate, median, since, now)

    def view(self) -> dict[str, Any]:
        """For status: the last window's rate and median, and since when
        the core is flagged slow (None: it is not)."""
        rate, median = self.last if self.last is not None else (None, None)
        return {"rate": None if rate is None else round(rate, 2),
                "median": None if median is None else round(median, 2),
                "slow_since": self.flagged.since if self.flagged is not None else None}


def batch_class(mean_batch: float) -> int:
    """The class of a window's mean batch: 0 for 1, 1 for 2-3, 2 for 4-7..."""
    return max(0, int(mean_batch)).bit_length() - 1 if mean_batch >= 1 else 0
