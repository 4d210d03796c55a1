"""A call as the scheduler tracks it, from arrival to its final reply."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from libaios.protocol import MsgType

_seq = itertools.count(1)


class CallState(enum.Enum):
    PENDING = "pending"        # waiting for a person's approval
    QUEUED = "queued"          # waiting in its resource's queue
    RUNNING = "running"        # held by a worker
    CANCELLING = "cancelling"  # answered, but its worker has not let go yet


@dataclass(eq=False)
class Call:
    """One system call. ``kid`` is the kernel's own id for it: workers see
    only that, never the caller's id, so two callers' ids can never collide."""

    kid: str
    client: bytes | None     # the caller's routing identity; None: the kernel's own
    client_call_id: str      # the id the caller will match replies on
    agent: str               # the agent id the call is accounted to
    type: MsgType
    resource: str
    body: dict[str, Any]
    deadline: float | None
    submitted: float
    seq: int = field(default_factory=lambda: next(_seq))
    state: CallState = CallState.QUEUED
    worker: str | None = None
    attempts: int = 0         # dispatches so far
    lost: int = 0             # times its worker was lost while it ran
    streamed: bool = False    # a partial reply already reached the caller
    queued_at: float = 0.0    # when it last entered the queue
    dispatched: float = 0.0   # when the current attempt started
    wait_s: float = 0.0       # total time spent queued
    service_s: float = 0.0    # total time spent on workers
    cancel_sent: float = 0.0  # when the worker was told to cancel
    priority: int = 0
    namespace: str | None = None  # whose data the call acts on
    caller: dict[str, Any] = field(default_factory=dict)
    approved: bool = False    # destructive effects approved (or pre-approved)
    tool: str | None = None   # for tool.call: the tool's name
    tokens: int = 0           # generated so far, over every turn on a core
    turn_tokens: int = 0      # generated since its latest dispatch
    suspending: bool = False  # asked to suspend, not yet answered
    model: str | None = None     # llm.chat: the model it goes to
    affinity: str | None = None  # the core holding its snapshot
    resume: str | None = None    # the snapshot it resumes from (suspended, queued again)
    preemptions: int = 0
    throttled: bool = False   # held back by its agent's token quota at least once
    held_for: str | None = None  # a worker taken for lost that may still run it (see worker_lost)
    first_token: bool = False  # llm.chat: its time to first token is counted (see tally)

    def task_body(self) -> dict[str, Any]:
        """What the worker is told about this call."""
        task = {"call": self.kid, "type": self.type.value, "body": self.body,
                "caller": self.caller, "namespace": self.namespace, "approved": self.approved}
        if self.resume is not None:
            task["resume"] = self.resume
        return task

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now
