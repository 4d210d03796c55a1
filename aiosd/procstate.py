"""The state machine of one supervised child process. Pure: the caller
passes the time in, so tests run it on a fake clock.

::

    STOPPED --start--> STARTING --stable_after--> RUNNING
    STARTING/RUNNING --exit--> BACKOFF --delay--> STARTING
    STARTING/RUNNING --exit, budget spent--> FATAL
    any --stop--> STOPPING --exit--> STOPPED
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ProcState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FATAL = "fatal"


@dataclass
class RestartRules:
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    budget: int = 5          # crashes allowed within ``window`` seconds
    window: float = 60.0
    stable_after: float = 1.0


@dataclass
class ProcMachine:
    """Where one child is in its life, and when it may start again."""

    rules: RestartRules
    state: ProcState = ProcState.STOPPED
    started_at: float = 0.0
    retry_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    crashes: deque[float] = field(default_factory=deque)

    def start(self, now: float) -> None:
        # A (re)spawn: the child counts as running only once it stays up.
        self.state = ProcState.STARTING
        self.started_at = now

    def tick(self, now: float) -> None:
        # STARTING -> RUNNING once the child has stayed up stable_after:
        # a child that dies at once never looks healthy.
        if self.state is ProcState.STARTING and now - self.started_at >= self.rules.stable_after:
            self.state = ProcState.RUNNING

    def exited(self, now: float, code: int, permanent: bool = False) -> None:
        """The child exited with ``code`` (negative: killed by that signal);
        ``permanent``: it said a restart cannot help (a configuration error)."""
        self.last_exit = code
        if self.state is ProcState.STOPPING:
            # We asked it to stop: not a crash.
            self.state = ProcState.STOPPED
            return
        if permanent:
            self.state = ProcState.FATAL
            return
        # Any other exit is a crash, even with code 0: a kernel service
        # is not supposed to end on its own.
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.rules.window:
            self.crashes.popleft()
        if len(self.crashes) > self.rules.budget:
            # Too many crashes in the window: stop trying, say so.
            self.state = ProcState.FATAL
            return
        self.restarts += 1
        delay = self.rules.backoff_initial * 2 ** (len(self.crashes) - 1)
        self.state = ProcState.BACKOFF
        self.retry_at = now + min(delay, self.rules.backoff_max)

    def due(self, now: float) -> bool:
        """Whether a BACKOFF child should be spawned again now."""
        return self.state is ProcState.BACKOFF and now >= self.retry_at

    def stop(self) -> None:
        # BACKOFF and FATAL children have no process to wait for.
        if self.state in (ProcState.BACKOFF, ProcState.FATAL, ProcState.STOPPED):
            self.state = ProcState.STOPPED
        else:
            self.state = ProcState.STOPPING

    @property
    def alive(self) -> bool:
        return self.state in (ProcState.STARTING, ProcState.RUNNING, ProcState.STOPPING)
