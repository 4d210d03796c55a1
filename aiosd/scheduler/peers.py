"""The scheduler's peers: a worker that registered, and a client connection
that said hello."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libaios.protocol import MsgType

from . import access
from .agents import Agent
from .calls import Call


@dataclass(eq=False)
class Worker:
    name: str
    kind: str
    capacity: int
    pid: int
    types: frozenset[str]
    info: dict[str, Any]
    last_seen: float
    registered: float
    inflight: dict[str, Call] = field(default_factory=dict)
    served: int = 0
    last_dispatch: float = 0.0
    #: the worker's own figures, as of its last heartbeat (an LLM core's KV cache)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def free(self) -> int:
        """Slots not taken (a null call runs inline and takes none)."""
        return self.capacity - sum(1 for c in self.inflight.values()
                                   if c.type is not MsgType.SYS_NULL)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": self.pid,
            "capacity": self.capacity,
            "running": len(self.inflight),
            "served": self.served,
            "info": self.info,
            "stats": self.stats,
        }


@dataclass(eq=False)
class Session:
    """One client connection that said hello."""

    identity: bytes
    name: str
    operator: bool
    agent: Agent | None = None
    internal: bool = False    # one of the kernel's own processes
    pid: int | None = None    # the peer's process, as the OS reports it

    @property
    def account(self) -> str:
        return self.agent.id if self.agent else f"operator:{self.name}"

    @property
    def principal(self) -> access.Principal:
        return access.Principal(self.account, self.name, self.operator, self.internal)
