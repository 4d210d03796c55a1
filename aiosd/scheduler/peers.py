"""The scheduler's peers: a worker that registered, a client connection
that said hello, and what the operating system says of a peer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from libaios.protocol import Message, MsgType

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
    #: its connection's routing id, which the socket assigned (never one the
    #: worker chose: a process that named itself so would take its tasks)
    identity: bytes = b""

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
    uid: int | None = None    # and its user
    #: agents whose output this connection follows (agent.run with wait)
    watching: list[Agent] = field(default_factory=list)
    #: the API key the gateway made this connection for (its hash), if any
    key: bytes | None = None

    @property
    def account(self) -> str:
        return self.agent.id if self.agent else f"operator:{self.name}"

    @property
    def principal(self) -> access.Principal:
        return access.Principal(self.account, self.name, self.operator, self.internal)


#: A client message's handler: (the session, None before hello; the
#: connection's routing id; the message).
Handler = Callable[[Session | None, bytes, Message], None]


def peer_credentials(frame: zmq.Frame) -> tuple[int | None, int | None]:
    """(uid, pid) of the process at the other end of an ipc connection, as
    the operating system reports it (libzmq appends uid:gid:pid to the
    Peer-Address of ipc peers); (None, None) for other transports."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, KeyError, TypeError):
        return None, None
    parts = str(address).rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None, None
    return int(parts[1]), int(parts[3])


def parent_of(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None
