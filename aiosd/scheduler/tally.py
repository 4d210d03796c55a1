"""What the scheduler counts of calls as they end, and of approvals as they
are decided: the kernel's own figures for the metrics (aiosd.metrics), kept
since the scheduler started. Pure: the call lifecycle tells it what happened.

Every label it keys on is a bounded set: call types and error codes are
enums, resources are four, models come from the config.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from libaios.protocol import ErrorCode, MsgType

from ..histogram import SECONDS, TOKENS, Histogram
from .calls import Call

#: The outcome of a call whose caller was gone before its answer.
DROPPED = "dropped"


def outcome_of(code: object) -> str:
    """A call's outcome label for error ``code``: the code's name in lower
    case (a number no ErrorCode has, from a misbehaving worker, is
    "unknown", so the label set stays bounded)."""
    try:
        return ErrorCode(code).name.lower()  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return "unknown"


def _seconds(value: float) -> float:
    # clocks of two processes (a core's, the scheduler's) may disagree by
    # a hair: a duration is never negative
    return value if math.isfinite(value) and value > 0 else 0.0


@dataclass
class Tally:
    """Calls by type and outcome, their latency, queue wait, time to first
    token and tokens, and approvals by decision."""

    #: (call type, outcome) -> calls
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: call type -> seconds from its arrival to its final answer
    latency: dict[str, Histogram] = field(default_factory=dict)
    #: resource -> seconds a call spent in its queue, over all its turns
    wait: dict[str, Histogram] = field(default_factory=dict)
    #: model -> seconds from a chat's arrival to its first token
    first_token: dict[str, Histogram] = field(default_factory=dict)
    #: (model, "prompt" | "completion") -> tokens of one chat
    tokens: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    #: "approved" | "denied" | "expired" -> approvals decided so
    approvals: Counter[str] = field(default_factory=Counter)

    def ended(self, call: Call, outcome: str, now: float) -> None:
        """``call`` got its final answer (``outcome``: "ok", an error
        code's label, or DROPPED) at ``now``."""
        kind = call.type.value
        self.calls[kind, outcome] += 1
        self.latency.setdefault(kind, Histogram(SECONDS)).observe(_seconds(now - call.submitted))
        self.wait.setdefault(call.resource, Histogram(SECONDS)).observe(_seconds(call.wait_s))

    def refused(self, mtype: MsgType, code: ErrorCode) -> None:
        """A call refused before it was queued (bad arguments, no access, a
        full queue): counted, with no latency (it never ran)."""
        self.calls[mtype.value, outcome_of(code)] += 1

    def first_token_after(self, model: str, seconds: float) -> None:
        self.first_token.setdefault(model, Histogram(SECONDS)).observe(_seconds(seconds))

    def chat_tokens(self, model: str, prompt: int, completion: int) -> None:
        for kind, n in (("prompt", prompt), ("completion", completion)):
            self.tokens.setdefault((model, kind), Histogram(TOKENS)).observe(n)

    def decided(self, verdict: str) -> None:
        self.approvals[verdict] += 1

    def to_dict(self) -> dict[str, Any]:
        """The tally as plain data (the figures of admin.metrics)."""
        return {
            "calls": [{"type": t, "outcome": o, "count": n} for (t, o), n in sorted(self.calls.items())],
            "latency": {t: h.to_dict() for t, h in sorted(self.latency.items())},
            "wait": {r: h.to_dict() for r, h in sorted(self.wait.items())},
            "first_token": {m: h.to_dict() for m, h in sorted(self.first_token.items())},
            "tokens": [{"model": m, "kind": k, **h.to_dict()}
                       for (m, k), h in sorted(self.tokens.items())],
            "approvals": dict(sorted(self.approvals.items())),
        }
