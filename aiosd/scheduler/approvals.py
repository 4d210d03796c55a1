"""Calls waiting for a person's approval. Pure: the scheduler passes the
time in and does what the table says."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from .calls import Call


@dataclass(eq=False)
class Approval:
    id: str
    call: Call
    op: str            # "storage.delete", "storage.overwrite", "tool:NAME", ...
    detail: str
    created: float
    expires: float

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
            "detail": self.detail,
            "waiting_s": round(now - self.created, 3),
            "expires_in_s": round(self.expires - now, 3),
        }


def summarize(body: dict[str, Any], limit: int = 200) -> dict[str, Any]:
    """The call's arguments as a person should see them: short, no raw bytes."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "as_namespace":
            continue
        if isinstance(value, bytes):
            out[key] = f"<{len(value)} bytes>"
        else:
            text = repr(value) if not isinstance(value, str) else value
            out[key] = text if len(text) <= limit else text[:limit] + "…"
    return out


class ApprovalTable:
    def __init__(self) -> None:
        self.pending: dict[str, Approval] = {}

    def request(self, call: Call, op: str, detail: str, now: float, timeout: float) -> Approval:
        expires = now + timeout
        if call.deadline is not None:
            expires = min(expires, call.deadline)
        approval = Approval(secrets.token_hex(4), call, op, detail, now, expires)
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
