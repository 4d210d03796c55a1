"""Scheduling policies: which queued call runs next. No I/O, no clock reads.

A policy holds the waiting calls of one resource. The scheduler asks it for
the next call whenever a worker of that resource has a free slot, tells it
when a call leaves the queue for another reason (deadline, caller gone), and
hands back a call that must run again (its worker died) with ``requeue``.
Later policies (round-robin with a quantum, fair share) add preemption
through :meth:`Policy.preempt`; the scheduler already asks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

from .calls import Call


class Policy:
    """Base class of the scheduling policies."""

    name = "base"

    def push(self, call: Call) -> None:
        """A call arrived."""
        raise NotImplementedError

    def requeue(self, call: Call) -> None:
        """A call that had started must run again (its worker was lost)."""
        raise NotImplementedError

    def choose(self, runnable: Callable[[Call], bool] | None = None,
               now: float = 0.0) -> Call | None:
        """The call to dispatch next, left in the queue; None if none.
        With ``runnable``, only a call it accepts (others keep their place):
        a call for a saturated tool must not block the calls behind it."""
        raise NotImplementedError

    def pop(self, runnable: Callable[[Call], bool] | None = None,
            now: float = 0.0) -> Call | None:
        """:meth:`choose`, and the call chosen leaves the queue."""
        call = self.choose(runnable, now)
        if call is not None:
            self.remove(call)
        return call

    def remove(self, call: Call) -> bool:
        """Take ``call`` out of the queue; False if it was not queued."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Call]:
        raise NotImplementedError

    def preempt(self, running: Sequence[Call], now: float,
                eligible: Callable[[Call], bool] | None = None) -> list[Call]:
        """Running calls that should be suspended now to let others run
        (the scheduler asks only while calls wait). With ``eligible``, only
        the waiting calls it accepts count (a call that could not take the
        freed slot is no reason to suspend one)."""
        return []

    def requeue_suspended(self, call: Call) -> None:
        """A call suspended by preemption goes back to the queue."""
        self.push(call)


class FifoPolicy(Policy):
    """First come, first served; a requeued call goes to the front, since it
    has waited longest."""

    name = "fifo"

    def __init__(self) -> None:
        self.waiting: deque[Call] = deque()

    def push(self, call: Call) -> None:
        self.waiting.append(call)

    def requeue(self, call: Call) -> None:
        self.waiting.appendleft(call)

    def choose(self, runnable: Callable[[Call], bool] | None = None,
               now: float = 0.0) -> Call | None:
        return next((c for c in self.waiting if runnable is None or runnable(c)), None)

    def remove(self, call: Call) -> bool:
        try:
            self.waiting.remove(call)
        except ValueError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.waiting)

    def __iter__(self) -> Iterator[Call]:
        return iter(list(self.waiting))

    def _eligible(self, eligible: Callable[[Call], bool] | None) -> list[Call]:
        return [c for c in self.waiting if eligible is None or eligible(c)]


class RoundRobinPolicy(FifoPolicy):
    """FIFO order, but a call that has generated ``quantum`` tokens while
    others wait is suspended and goes to the back of the queue."""

    name = "rr"

    def __init__(self, quantum: int = 64) -> None:
        super().__init__()
        self.quantum = quantum

    def preempt(self, running: Sequence[Call], now: float,
                eligible: Callable[[Call], bool] | None = None) -> list[Call]:
        if not self._eligible(eligible):
            return []
        return [c for c in running if c.turn_tokens >= self.quantum]


class FairPolicy(FifoPolicy):
    """Program-level least attained service: the next call is the one whose
    agent has received the least service so far (tokens), less its
    priority; a call that has waited ``starvation_s`` goes first whatever
    its agent's service, so no agent starves. A running call past its
    quantum is suspended when a call of a less-served agent waits."""

    name = "fair"

    def __init__(self, service: Callable[[str], float], quantum: int = 64,
                 starvation_s: float = 10.0,
                 priority: Callable[[str], int] = lambda a: 0) -> None:
        super().__init__()
        self.service = service
        self.quantum = quantum
        self.starvation_s = starvation_s
        self.priority = priority

    def _keys(self) -> Callable[[Call], tuple[float, int]]:
        """The order of calls for one decision. An agent's standing is
        worked out once per decision: it depends on the agent alone, and
        working it out looks at every call in the kernel."""
        standing: dict[str, float] = {}

        def key(call: Call) -> tuple[float, int]:
            value = standing.get(call.agent)
            if value is None:
                # each priority step is worth 1,000 tokens of service
                value = standing[call.agent] = (self.service(call.agent)
                                                - 1000.0 * self.priority(call.agent))
            return (value, call.seq)

        return key

    def choose(self, runnable: Callable[[Call], bool] | None = None,
               now: float = 0.0) -> Call | None:
        candidates = [c for c in self.waiting if runnable is None or runnable(c)]
        if not candidates:
            return None
        starved = [c for c in candidates if now - c.queued_at >= self.starvation_s]
        return min(starved, key=lambda c: c.queued_at) if starved else min(candidates, key=self._keys())

    def preempt(self, running: Sequence[Call], now: float,
                eligible: Callable[[Call], bool] | None = None) -> list[Call]:
        waiting = self._eligible(eligible)
        if not waiting:
            return []
        key = self._keys()
        best_waiting = min(key(c)[0] for c in waiting)
        return [c for c in running
                if c.turn_tokens >= self.quantum and key(c)[0] > best_waiting]


POLICIES = ("fifo", "rr", "fair")


def make(name: str, quantum: int = 64, starvation_s: float = 10.0,
         service: Callable[[str], float] = lambda a: 0.0,
         priority: Callable[[str], int] = lambda a: 0) -> Policy:
    """The policy called ``name`` (validated by the config already)."""
    if name == "rr":
        return RoundRobinPolicy(quantum)
    if name == "fair":
        return FairPolicy(service, quantum, starvation_s, priority)
    return FifoPolicy()
