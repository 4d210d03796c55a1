"""Calls waiting for a person's approval. Pure: the scheduler passes the
time in and does what the table says.

A memory or storage call is asked about only once its worker has checked
its arguments against the data: the worker names what the call would act on
(the key and its versions, the memory item and the start of its text), and
that is what the operator sees, in ``values``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from .calls import Call

#: How long before its call's deadline an approval expires at the latest (at
#: most half the time the call has left): the caller's client gives up at
#: that deadline, and the kernel's answer ("no decision came") must reach it
#: first, past the scheduler's next tick.
DEADLINE_MARGIN = 1.0


def expiry(now: float, timeout: float, deadline: float | None) -> float:
    """When an approval requested at ``now`` for a call due at ``deadline``
    expires: after ``timeout`` (access.approval_timeout), or a margin before
    the deadline if that comes first."""
    expires = now + timeout
    if deadline is not None:
        margin = min(DEADLINE_MARGIN, max(0.0, deadline - now) / 2)
        expires = min(expires, deadline - margin)
    return expires


@dataclass(eq=False)
class Approval:
    id: str
    call: Call
    op: str            # "storage.delete", "storage.overwrite", "tool:NAME", ...
    detail: str
    created: float
    expires: float
    #: what the call would act on, as its worker found it (the key, the
    #: version to roll back to, the memory item and a preview of its text)
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, now: float) -> dict[str, Any]:
        call = self.call
        return {
            "id": self.id,
            "agent": call.agent,
            "name": call.caller.get("name"),
            "op": self.op,
            "call": call.type.value,
            "namespace": call.namespace,
            "arguments": summarize(call.body),
            "values": summarize(self.values),
            "detail": self.detail,
            "waiting_s": round(now - self.created, 3),
            "expires_in_s": round(self.expires - now, 3),
        }


def summarize(body: dict[str, Any], limit: int = 200) -> dict[str, Any]:
    """The call's arguments as a person should see them: short, no raw bytes
    (numbers stay numbers)."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "as_namespace":
            continue
        if isinstance(value, bytes):
            out[key] = f"<{len(value)} bytes>"
        elif value is None or isinstance(value, (bool, int, float)):
            out[key] = value
        else:
            text = repr(value) if not isinstance(value, str) else value
            out[key] = text if len(text) <= limit else text[:limit] + "…"
    return out


class ApprovalTable:
    def __init__(self) -> None:
        self.pending: dict[str, Approval] = {}

    def request(self, call: Call, op: str, detail: str, now: float, timeout: float,
                values: dict[str, Any] | None = None) -> Approval:
        """Hold ``call`` for a decision on ``op``; ``values`` are what it
        would act on (shown to the operator)."""
        approval = Approval(secrets.token_hex(4), call, op, detail, now,
                            expiry(now, timeout, call.deadline), dict(values or {}))
        self.pending[approval.id] = approval
        return approval

    def take(self, approval_id: str) -> Approval | None:
        """Remove and return the approval ``approval_id`` (a decision was made)."""
        return self.pending.pop(approval_id, None)

    def expired(self, now: float) -> list[Approval]:
        done = [a for a in self.pending.values() if now >= a.expires]
        for approval in done:
            del self.pending[approval.id]
        return done

    def of_call(self, call: Call) -> Approval | None:
        return next((a for a in self.pending.values() if a.call is call), None)

    def drop_call(self, call: Call) -> None:
        approval = self.of_call(call)
        if approval is not None:
            del self.pending[approval.id]
