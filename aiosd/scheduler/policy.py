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

    def pop(self, runnable: Callable[[Call], bool] | None = None) -> Call | None:
        """The next call to dispatch, removed from the queue; None if none.
        With ``runnable``, only a call it accepts (others keep their place):
        a call for a saturated tool must not block the calls behind it."""
        raise NotImplementedError

    def remove(self, call: Call) -> bool:
        """Take ``call`` out of the queue; False if it was not queued."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Call]:
        raise NotImplementedError

    def preempt(self, running: Sequence[Call], now: float) -> list[Call]:
        """Running calls that should be suspended now to let others run."""
        return []


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

    def pop(self, runnable: Callable[[Call], bool] | None = None) -> Call | None:
        if runnable is None:
            return self.waiting.popleft() if self.waiting else None
        for call in self.waiting:
            if runnable(call):
                self.waiting.remove(call)
                return call
        return None

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


POLICIES: dict[str, type[Policy]] = {FifoPolicy.name: FifoPolicy}


def make(name: str) -> Policy:
    """The policy called ``name`` (validated by the config already)."""
    return POLICIES[name]()
