"""The memory, storage and tool system calls, grouped as an agent sees them:
``aios.memory.add(...)``, ``aios.storage.put(...)``, ``aios.tools.call(...)``.

Each method names its arguments; ``agent=`` reaches another agent's data,
which the kernel allows only within a shared privilege group.

The same classes serve the synchronous client and the asyncio one: a family
is given the client's ``call`` and how to take a field from its reply
(:func:`field_of` for the synchronous client, where a call returns the
reply; :func:`awaited_field_of` for the asyncio one, where it returns an
awaitable, so each method returns one too).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .protocol import MsgType

Call = Callable[[MsgType, dict[str, Any], float | None], Any]
#: takes a call's reply (or an awaitable of it) and a field name (None: the
#: whole reply)
Take = Callable[[Any, str | None], Any]


def field_of(reply: dict[str, Any], key: str | None) -> Any:
    return reply if key is None else reply[key]


def awaited_field_of(reply: Awaitable[dict[str, Any]], key: str | None) -> Awaitable[Any]:
    async def take() -> Any:
        return field_of(await reply, key)

    return take()


class _Family:
    def __init__(self, call: Call, take: Take = field_of):
        self._call_raw = call
        self._take = take

    def _call(self, mtype: MsgType, body: dict[str, Any], timeout: float | None,
              key: str | None = None) -> Any:
        return self._take(self._call_raw(mtype, body, timeout), key)


def _body(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class Memory(_Family):
    """An agent's runtime memory: items of text with metadata, searchable."""

    def add(self, text: str, metadata: dict[str, Any] | None = None, *,
            agent: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Store an item; returns it with its ``id``."""
        return self._call(MsgType.MEMORY_ADD, _body(text=text, metadata=metadata or {},
                                                    agent=agent), timeout, "item")

    def get(self, id: str, *, agent: str | None = None,
            timeout: float | None = None) -> dict[str, Any]:
        return self._call(MsgType.MEMORY_GET, _body(id=id, agent=agent), timeout, "item")

    def update(self, id: str, text: str | None = None, metadata: dict[str, Any] | None = None,
               *, agent: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        return self._call(MsgType.MEMORY_UPDATE,
                          _body(id=id, text=text, metadata=metadata, agent=agent), timeout, "item")

    def delete(self, id: str, *, agent: str | None = None, timeout: float | None = None) -> Any:
        """Delete an item (destructive: may wait for an operator's approval)."""
        return self._call(MsgType.MEMORY_DELETE, _body(id=id, agent=agent), timeout)

    def list(self, filters: dict[str, Any] | None = None, limit: int = 100, offset: int = 0, *,
             agent: str | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
        return self._call(MsgType.MEMORY_LIST, _body(filters=filters, limit=limit, offset=offset,
                                                     agent=agent), timeout, "items")

    def search(self, query: str, filters: dict[str, Any] | None = None, limit: int = 10, *,
               agent: str | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
        """Items ranked by relevance (BM25), best first, each with a ``score``."""
        return self._call(MsgType.MEMORY_SEARCH, _body(query=query, filters=filters, limit=limit,
                                                       agent=agent), timeout, "items")

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._call(MsgType.MEMORY_STATS, {}, timeout)


class Storage(_Family):
    """An agent's durable storage: versioned keys and files."""

    def put(self, key: str, value: Any, *, agent: str | None = None,
            timeout: float | None = None) -> dict[str, Any]:
        """Store ``value`` (any msgpack-able value) under ``key``; overwriting
        keeps the old version and may wait for an operator's approval."""
        return self._call(MsgType.STORAGE_PUT, _body(key=key, value=value, agent=agent), timeout)

    def get(self, key: str, version: int | None = None, *, agent: str | None = None,
            timeout: float | None = None) -> Any:
        return self._call(MsgType.STORAGE_GET, _body(key=key, version=version, agent=agent),
                          timeout, "value")

    def delete(self, key: str, *, agent: str | None = None, timeout: float | None = None) -> Any:
        return self._call(MsgType.STORAGE_DELETE, _body(key=key, agent=agent), timeout)

    def list(self, prefix: str = "", *, agent: str | None = None,
             timeout: float | None = None) -> list[dict[str, Any]]:
        return self._call(MsgType.STORAGE_LIST, _body(prefix=prefix, agent=agent), timeout, "keys")

    def write_file(self, path: str, data: bytes, *, agent: str | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        return self._call(MsgType.STORAGE_WRITE_FILE, _body(path=path, data=data, agent=agent),
                          timeout)

    def read_file(self, path: str, version: int | None = None, *, agent: str | None = None,
                  timeout: float | None = None) -> bytes:
        return self._call(MsgType.STORAGE_READ_FILE,
                          _body(path=path, version=version, agent=agent), timeout, "data")

    def list_dir(self, dir: str = "", *, agent: str | None = None,
                 timeout: float | None = None) -> list[dict[str, Any]]:
        return self._call(MsgType.STORAGE_LIST_DIR, _body(dir=dir, agent=agent), timeout, "entries")

    def versions(self, name: str, kind: str = "key", *, agent: str | None = None,
                 timeout: float | None = None) -> list[dict[str, Any]]:
        return self._call(MsgType.STORAGE_VERSIONS, _body(name=name, kind=kind, agent=agent),
                          timeout, "versions")

    def rollback(self, name: str, version: int, kind: str = "key", *, agent: str | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        return self._call(MsgType.STORAGE_ROLLBACK,
                          _body(name=name, version=version, kind=kind, agent=agent), timeout)

    def stats(self, *, agent: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        return self._call(MsgType.STORAGE_STATS, _body(agent=agent), timeout)


class Tools(_Family):
    """The kernel's tools."""

    def list(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every tool, OpenAI-style, ready to hand to ``chat(tools=...)``."""
        return self._call(MsgType.TOOL_LIST, {}, timeout, "tools")

    def call(self, name: str, arguments: dict[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:
        """Run tool ``name``; its arguments are checked against its schema first."""
        return self._call(MsgType.TOOL_CALL, {"name": name, "arguments": arguments or {}},
                          timeout, "result")
