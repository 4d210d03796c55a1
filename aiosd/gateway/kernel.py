"""The gateway's connections to the kernel: one for itself, and one per
API key in use, over which the scheduler takes the gateway's calls as the
calls of the key's agent (it checks that the connection is the gateway's
own process, and the key, at hello: the gateway never names an agent).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from libaios import errors, protocol
from libaios.aio import AsyncClient
from libaios.protocol import MsgType

from .. import credentials, roles

T = TypeVar("T")

#: connections kept open for keys at most, and how long one may sit unused
MOST_KEYS = 512
IDLE_S = 600.0


class Control(AsyncClient):
    """The gateway's own connection: its hello tells the kernel the URL the
    gateway serves (and again after a scheduler restart)."""

    def __init__(self, endpoint: str, url: str | None) -> None:
        super().__init__(endpoint, name=roles.GATEWAY, token=credentials.mine() or None,
                         timeout=10.0)
        self.url = url

    def _hello(self) -> tuple[dict[str, Any], float]:
        body, timeout = super()._hello()
        if self.url is not None:
            body["url"] = self.url
        return body, timeout


def bearer_key(header: str | None, where: str = "") -> str:
    """The API key of an Authorization header (Unauthenticated if none);
    ``where`` says where a key is expected, in the refusal."""
    scheme, _, key = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise errors.Unauthenticated(
            f"no API key: send 'Authorization: Bearer KEY'{where} "
            "(aiosctl keys create NAME makes one)")
    return key.strip()


class Kernel:
    """Connections to the kernel by API key."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._clients: OrderedDict[str, tuple[AsyncClient, float]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def client(self, key: str) -> AsyncClient:
        """The connection for ``key``'s agent (Unauthenticated if the
        kernel does not take the key)."""
        held = self._clients.get(key)
        if held is not None:
            self._clients[key] = (held[0], time.monotonic())
            self._clients.move_to_end(key)
            return held[0]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            held = self._clients.get(key)
            if held is not None:
                return held[0]
            client = AsyncClient(self.endpoint, name=roles.GATEWAY,
                                 token=credentials.mine() or None, key=key,
                                 timeout=self.timeout)
            try:
                await client.connect()
            finally:
                self._locks.pop(key, None)
            self._clients[key] = (client, time.monotonic())
            while len(self._clients) > MOST_KEYS:
                _, (oldest, _) = self._clients.popitem(last=False)
                await oldest.close()
            return client

    async def forget(self, key: str) -> None:
        """Close the connection of a key the kernel no longer takes."""
        held = self._clients.pop(key, None)
        if held is not None:
            await held[0].close()

    async def close_idle(self) -> None:
        now = time.monotonic()
        for key, (client, used) in list(self._clients.items()):
            if now - used > IDLE_S:
                self._clients.pop(key, None)
                await client.close()

    async def close(self) -> None:
        for client, _ in self._clients.values():
            await client.close()
        self._clients.clear()

    async def _as(self, key: str, act: Callable[[AsyncClient], Awaitable[T]]) -> T:
        """``act`` on ``key``'s connection. A connection the kernel has
        dropped (the key was revoked) is made again once, so the caller
        hears why."""
        try:
            return await act(await self.client(key))
        except errors.Unauthenticated:
            await self.forget(key)
            return await act(await self.client(key))

    async def call(self, key: str, mtype: MsgType, body: dict[str, Any],
                   timeout: float | None = None) -> dict[str, Any]:
        """One system call as ``key``'s agent."""
        return await self._as(key, lambda client: client.call(mtype, body, timeout))

    async def stream(self, key: str, mtype: MsgType, body: dict[str, Any],
                     timeout: float | None = None
                     ) -> tuple[protocol.Message, AsyncIterator[protocol.Message]]:
        """A streamed system call as ``key``'s agent: its first reply (or its
        error, raised: the caller's HTTP status) and the iterator of the rest.
        Closing the iterator gives the call up (the kernel cancels it)."""
        async def first(client: AsyncClient
                        ) -> tuple[protocol.Message, AsyncIterator[protocol.Message]]:
            replies = client.call_stream(mtype, body, timeout)
            return await anext(replies), replies

        return await self._as(key, first)
