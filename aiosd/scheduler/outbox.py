"""What the scheduler's handlers have to send: replies to clients, tasks
to workers, events to subscribers, and agents' output pipes to watch.

Handlers never touch a socket. They put what they have to say here, and
the socket loop (server) drains it after each message and each tick. A
client or worker that turns out to be unreachable then is taken for gone
by the loop, as if it had said so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libaios import errors, protocol
from libaios.protocol import Message

from .peers import Worker


@dataclass
class Outbox:
    #: (a client's routing id, or None for the kernel's own calls; message)
    clients: list[tuple[bytes | None, Message]] = field(default_factory=list)
    #: (a worker connection's routing id; message; the worker to take for
    #: lost if it cannot take the message, or None)
    workers: list[tuple[bytes, Message, Worker | None]] = field(default_factory=list)
    #: (topic, body) for the events socket
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: file descriptors (a launched agent's output pipes) to poll from now on
    watch: list[int] = field(default_factory=list)

    def send_client(self, identity: bytes | None, msg: Message) -> None:
        self.clients.append((identity, msg))

    def reply_error(self, identity: bytes | None, call_id: str | None,
                    exc: errors.AIOSError) -> None:
        self.send_client(identity, protocol.error(call_id, exc.code, exc.message, exc.retriable))

    def send_worker(self, worker: Worker, msg: Message, gone_if_unreachable: bool = True) -> None:
        """Send ``msg`` to ``worker`` (with ``gone_if_unreachable``, the
        worker is taken for lost if it cannot take it)."""
        self.workers.append((worker.identity, msg, worker if gone_if_unreachable else None))

    def send_connection(self, identity: bytes, msg: Message) -> None:
        """Send ``msg`` to a worker connection that is not a registered worker."""
        self.workers.append((identity, msg, None))

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.events.append((topic, body))

    def __bool__(self) -> bool:
        return bool(self.clients or self.workers or self.events or self.watch)
