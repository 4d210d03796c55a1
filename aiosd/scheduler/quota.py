"""Per-agent token-rate quotas: token buckets. Pure; the caller passes time.

An agent may use ``burst`` tokens at once; its bucket refills at
``rate`` tokens a second. A call is admitted while the bucket is above
zero and charged with what it used when it ends (the bucket may go below
zero: the agent then waits until the refill covers its debt), so one agent
flooding the kernel is throttled to its rate and the others keep theirs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float
    burst: float
    level: float = 0.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        self.level = self.burst

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def allows(self, now: float) -> bool:
        self._refill(now)
        return self.level > 0

    def charge(self, tokens: int, now: float) -> None:
        self._refill(now)
        self.level -= tokens

    def ready_in(self, now: float) -> float:
        """Seconds until a call would be admitted."""
        self._refill(now)
        return 0.0 if self.level > 0 else (-self.level + 1e-9) / self.rate
