"""The kernel's events: what happens in aiosd as it happens (agents starting
and ending, processes restarting, access denied, approvals, evictions, slow
cores). docs/operations.md lists every topic and its body.

::

    from libaios import events

    with events.subscribe(["agent."]) as sub:
        for event in sub:
            print(event.topic, event.body)

:func:`subscribe` returns once the kernel has the subscription, so no
event published after it returns is missed. The event socket is the
daemon's own: only its user (an operator) may subscribe.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

import zmq

from . import errors, paths, protocol
from .protocol import Event


class Subscription:
    """A subscription to some of the kernel's events; iterate it, or take
    them one by one with :meth:`next`. Close it when done (or use ``with``)."""

    def __init__(self, sock: zmq.Socket, endpoint: str,
                 early: list[list[bytes]] | None = None) -> None:
        self._sock = sock
        self.endpoint = endpoint
        #: events that came before the kernel confirmed the subscription
        self._early = early or []

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event; None if none came within ``timeout`` seconds
        (None: wait for one). Raises :class:`errors.BadFrame` (or
        BadVersion, TooLarge) for an event that cannot be decoded. The
        kernel's answers to other subscribers' handshakes are skipped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._early:
                frames = self._early.pop(0)
            else:
                left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                if not self._sock.poll(left):
                    return None
                frames = self._sock.recv_multipart()
            try:
                event = protocol.decode_event(frames)
            except protocol.ProtocolError as exc:
                raise errors.error_class(exc.code)(f"an event from {self.endpoint}: {exc.message}")
            if not event.topic.startswith(protocol.SUBSCRIBED):
                return event

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.next()
            if event is not None:
                yield event

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def events_socket(runtime_dir: Path | None = None) -> Path:
    """The path of the kernel's event socket (raises NotRunning if it has none)."""
    path = (runtime_dir or paths.runtime_dir()) / paths.EVENTS_SOCKET
    if not path.exists():
        raise errors.NotRunning(f"aiosd is not running: no event socket at {path} (start it "
                                "with `aiosctl start`, or set AIOS_RUNTIME_DIR)")
    return path


def subscribe(topics: Iterable[str] = ("",), runtime_dir: Path | None = None,
              timeout: float = 10.0, context: zmq.Context | None = None) -> Subscription:
    """Subscribe to the events whose topic starts with one of ``topics``
    ("" for all), from the kernel of ``runtime_dir`` (default: see
    :mod:`libaios.paths`). Returns once the kernel has the subscription;
    raises NotRunning if there is no kernel, Timeout if it does not
    confirm within ``timeout`` seconds."""
    endpoint = paths.ipc(events_socket(runtime_dir).parent, paths.EVENTS_SOCKET)
    sock = (context or zmq.Context.instance()).socket(zmq.SUB)
    try:
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        # Subscriptions reach the kernel in order: once it answers this
        # last one, it has the others.
        ready = protocol.SUBSCRIBED + secrets.token_hex(8)
        sock.setsockopt(zmq.SUBSCRIBE, ready.encode())
        sock.connect(endpoint)
        end = time.monotonic() + timeout
        early: list[list[bytes]] = []
        while (left := end - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            frames = sock.recv_multipart()
            if frames[0] == ready.encode():
                sock.setsockopt(zmq.UNSUBSCRIBE, ready.encode())
                return Subscription(sock, endpoint, early)
            early.append(frames)   # an event published meanwhile, of a topic asked for
        raise errors.Timeout(f"aiosd did not confirm a subscription on {endpoint} within "
                             f"{timeout:g}s: is it running? `aiosctl status`")
    except BaseException:
        sock.close(linger=0)
        raise
