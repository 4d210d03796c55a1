"""The memory manager: each agent's runtime memory in RAM, within a budget.

Items (text, metadata, timestamps) are written through to a durable block
store before a call returns, so nothing acknowledged is lost, by eviction or
by a restart. In RAM the texts live prefix-compressed in one trie per agent;
a BM25 index per agent (statistics only) finds items whether their text is
resident or not. When usage passes the high-water mark, the K-LRU replacer
picks the coldest items and their texts leave RAM until usage is down to the
low-water mark; reading an evicted item faults its text back in.

Not thread-safe: the worker serialises calls. The clock and the store are
injected, so tests run on a fake clock and an in-memory store.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import psutil

from libaios.errors import ApprovalRequired, InvalidArgument, NotFound

from .bm25 import BM25Index
from .klru import KLRUReplacer
from .trie import Node, Trie

#: Bytes accounted for each resident item besides its text: its trie node
#: and bookkeeping (a flat estimate; texts dominate). An evicted item keeps
#: only its metadata and index statistics in RAM, reported apart.
ITEM_OVERHEAD = 128
MAX_TEXT = 1024 * 1024
#: Characters of an item's text shown to the person asked to approve a change to it.
PREVIEW = 80


def preview(text: str, limit: int = PREVIEW) -> str:
    """The start of ``text``, on one line, for a person to recognise it by."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def _same(a: Any, b: Any) -> bool:
    """Metadata equality for filters: a boolean matches only a boolean
    (Python's True == 1 would match the number 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


class BlockStore(Protocol):
    def put(self, ns: str, block_id: str, data: bytes) -> None: ...
    def get(self, ns: str, block_id: str) -> bytes: ...
    def delete(self, ns: str, block_id: str) -> None: ...
    def scan(self) -> Iterator[tuple[str, str, bytes]]: ...


@dataclass(eq=False)
class Item:
    id: str
    metadata: dict[str, Any]
    created: float
    updated: float
    size: int                   # bytes of the text
    handle: Node | None = None  # where the text is in the trie; None: evicted


@dataclass
class Space:
    """One agent's memory."""

    trie: Trie = field(default_factory=Trie)
    index: BM25Index = field(default_factory=BM25Index)
    items: dict[str, Item] = field(default_factory=dict)


class MemoryManager:
    def __init__(self, store: BlockStore, budget_bytes: int, k: int = 2,
                 high_water: float = 0.8, low_water: float = 0.6,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.budget = budget_bytes
        self.high = high_water * budget_bytes
        self.low = low_water * budget_bytes
        self.clock = clock
        self.replacer = KLRUReplacer(k)
        self.spaces: dict[str, Space] = {}
        self.evictions = 0
        self.faults = 0
        self._tick = 0
        self._resident = 0

    # -- accounting ---------------------------------------------------------------

    @property
    def usage(self) -> int:
        """Bytes held for item texts (as stored in the tries) and their overhead."""
        return sum(s.trie.stored_bytes for s in self.spaces.values()) + \
            ITEM_OVERHEAD * self._resident

    def _now(self) -> float:
        # The replacer needs a strictly increasing clock to order accesses.
        self._tick += 1
        return self._tick

    def _touch(self, ns: str, item: Item) -> None:
        self.replacer.access((ns, item.id), self._now())

    def _make_room(self, keep: tuple[str, str] | None = None) -> None:
        if self.usage <= self.high:
            return
        if keep is not None:
            self.replacer.pin(keep)
        try:
            while self.usage > self.low:
                victim = self.replacer.evict()
                if victim is None:
                    break
                ns, item_id = victim
                space = self.spaces[ns]
                item = space.items[item_id]
                if item.handle is not None:
                    # The text is durable in the store already: drop it from RAM.
                    space.trie.remove(item.handle)
                    item.handle = None
                    self._resident -= 1
                    self.evictions += 1
        finally:
            if keep is not None:
                self.replacer.unpin(keep)

    # -- validation ---------------------------------------------------------------

    @staticmethod
    def _text(text: Any) -> str:
        if not isinstance(text, str) or not text:
            raise InvalidArgument("memory: 'text' must be a non-empty string")
        if len(text.encode()) > MAX_TEXT:
            raise InvalidArgument(f"memory: 'text' is larger than {MAX_TEXT} bytes")
        return text

    @staticmethod
    def _metadata(metadata: Any) -> dict[str, Any]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or len(metadata) > 64:
            raise InvalidArgument("memory: 'metadata' must be a map of at most 64 entries")
        for key, value in metadata.items():
            if not isinstance(key, str) or not key:
                raise InvalidArgument("memory: metadata keys must be non-empty strings")
            if not isinstance(value, (str, int, float, bool)) or (
                    isinstance(value, str) and len(value) > 1024):
                raise InvalidArgument(f"memory: metadata.{key} must be a string (up to 1024 "
                                      "characters), a number or a boolean")
        return dict(metadata)

    @staticmethod
    def _limit(value: Any, name: str, default: int, hi: int = 1000) -> int:
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
            raise InvalidArgument(f"memory: '{name}' must be an integer from 0 to {hi}")
        return value

    # -- items ---------------------------------------------------------------------

    def _space(self, ns: str) -> Space:
        return self.spaces.setdefault(ns, Space())

    def _item(self, ns: str, item_id: Any) -> tuple[Space, Item]:
        space = self.spaces.get(ns)
        item = space.items.get(item_id) if space and isinstance(item_id, str) else None
        if item is None or space is None:
            raise NotFound(f"memory: no item {item_id!r} in {ns}'s memory")
        return space, item

    def _persist(self, ns: str, item: Item, text: str) -> None:
        record = {"text": text, "metadata": item.metadata, "created": item.created,
                  "updated": item.updated}
        self.store.put(ns, item.id, msgpack.packb(record, use_bin_type=True))

    def _text_of(self, ns: str, space: Space, item: Item) -> str:
        if item.handle is not None:
            return space.trie.get(item.handle)
        # evicted: fault the text back in from the store
        record = msgpack.unpackb(self.store.get(ns, item.id), raw=False)
        item.handle = space.trie.insert(record["text"])
        self._resident += 1
        self.faults += 1
        self._touch(ns, item)   # resident again: the replacer must know it, whatever comes next
        return record["text"]

    def _view(self, ns: str, space: Space, item: Item, **extra: Any) -> dict[str, Any]:
        self._touch(ns, item)
        text = self._text_of(ns, space, item)
        self._make_room(keep=(ns, item.id))
        return {"id": item.id, "text": text, "metadata": item.metadata,
                "created": item.created, "updated": item.updated, **extra}

    def add(self, ns: str, text: Any, metadata: Any = None) -> dict[str, Any]:
        text = self._text(text)
        now = self.clock()
        item = Item(uuid.uuid4().hex, self._metadata(metadata), now, now, len(text.encode()))
        self._persist(ns, item, text)  # durable before anything else
        space = self._space(ns)
        item.handle = space.trie.insert(text)
        self._resident += 1
        space.items[item.id] = item
        space.index.add(item.id, text)
        return self._view(ns, space, item)

    def get(self, ns: str, item_id: Any) -> dict[str, Any]:
        space, item = self._item(ns, item_id)
        return self._view(ns, space, item)

    def _approval(self, op: str, ns: str, space: Space, item: Item, what: str,
                  **values: Any) -> ApprovalRequired:
        """The refusal of a destructive ``op`` on ``item`` not yet approved,
        naming the item and the start of its text for the person asked."""
        self._touch(ns, item)
        text = self._text_of(ns, space, item)
        self._make_room(keep=(ns, item.id))
        return ApprovalRequired(f"{op}: {what} item {item.id} of {ns} ({preview(text, 40)!r}) "
                                "needs approval",
                                details={"op": op, "id": item.id, "text": preview(text), **values})

    def update(self, ns: str, item_id: Any, text: Any = None, metadata: Any = None,
               approved: bool = False) -> dict[str, Any]:
        """Replace an item's text or metadata (destructive: what it replaces
        is gone, so unless ``approved`` it is refused with ApprovalRequired
        once the arguments and the item are known good)."""
        space, item = self._item(ns, item_id)
        new_meta = self._metadata(metadata) if metadata is not None else item.metadata
        new_text = self._text(text) if text is not None else None
        if not approved:
            new: dict[str, Any] = {"new_text": preview(new_text)} if new_text is not None else {}
            if metadata is not None:
                new["new_metadata"] = new_meta
            raise self._approval("memory.update", ns, space, item, "changing", **new)
        if new_text is None:
            new_text = self._text_of(ns, space, item)
        updated = Item(item.id, new_meta, item.created, self.clock(), len(new_text.encode()),
                       item.handle)
        self._persist(ns, updated, new_text)
        if text is not None:
            if item.handle is not None:
                space.trie.remove(item.handle)
            else:
                self._resident += 1
            updated.handle = space.trie.insert(new_text)
            space.index.add(item.id, new_text)
        space.items[item.id] = updated
        return self._view(ns, space, updated)

    def delete(self, ns: str, item_id: Any, approved: bool = False) -> dict[str, Any]:
        """Delete an item (destructive: unless ``approved``, an item that
        exists is refused with ApprovalRequired)."""
        space, item = self._item(ns, item_id)
        if not approved:
            raise self._approval("memory.delete", ns, space, item, "deleting")
        self.store.delete(ns, item.id)
        if item.handle is not None:
            space.trie.remove(item.handle)
            self._resident -= 1
        del space.items[item.id]
        space.index.remove(item.id)
        self.replacer.remove((ns, item.id))
        return {"deleted": item.id}

    @staticmethod
    def _matches(item: Item, filters: dict[str, Any] | None) -> bool:
        return not filters or all(k in item.metadata and _same(item.metadata[k], v)
                                  for k, v in filters.items())

    def _filters(self, filters: Any) -> dict[str, Any] | None:
        if filters is None:
            return None
        if not isinstance(filters, dict):
            raise InvalidArgument("memory: 'filters' must be a map of metadata values")
        for key, value in filters.items():
            if not isinstance(value, (str, int, float, bool)):
                raise InvalidArgument(f"memory: filters.{key} must be a string, a number or a "
                                      "boolean, as metadata values are")
        return filters

    def list(self, ns: str, filters: Any = None, limit: Any = None, offset: Any = None) -> list[dict[str, Any]]:
        filters = self._filters(filters)
        limit = self._limit(limit, "limit", 100)
        offset = self._limit(offset, "offset", 0, 10**9)
        space = self.spaces.get(ns)
        if space is None:
            return []
        chosen = sorted((i for i in space.items.values() if self._matches(i, filters)),
                        key=lambda i: (-i.created, i.id))[offset:offset + limit]
        return [self._view(ns, space, i) for i in chosen]

    def search(self, ns: str, query: Any, filters: Any = None, limit: Any = None) -> list[dict[str, Any]]:
        if not isinstance(query, str) or not query.strip():
            raise InvalidArgument("memory.search: 'query' must be a non-empty string")
        filters = self._filters(filters)
        limit = self._limit(limit, "limit", 10)
        space = self.spaces.get(ns)
        if space is None:
            return []
        candidates = None
        if filters:
            candidates = [i.id for i in space.items.values() if self._matches(i, filters)]
        hits = space.index.search(query, candidates, limit)
        return [self._view(ns, space, space.items[doc], score=round(score, 4))
                for doc, score in hits]

    def stats(self, ns: str | None = None) -> dict[str, Any]:
        spaces = {ns: self.spaces[ns]} if ns is not None and ns in self.spaces else (
            {} if ns is not None else self.spaces)
        items = [i for s in spaces.values() for i in s.items.values()]
        return {
            "namespaces": len(spaces),
            "items": len(items),
            "resident": sum(1 for i in items if i.handle is not None),
            "evicted": sum(1 for i in items if i.handle is None),
            "raw_bytes": sum(i.size for i in items),
            "stored_bytes": sum(s.trie.stored_bytes for s in spaces.values()),
            "resident_raw_bytes": sum(s.trie.raw_bytes for s in spaces.values()),
            "usage_bytes": self.usage,
            "budget_bytes": self.budget,
            "high_water_bytes": int(self.high),
            "evictions": self.evictions,
            "faults": self.faults,
            "rss_bytes": psutil.Process().memory_info().rss,
        }

    def load(self) -> int:
        """Rebuild every agent's memory from the store (texts stay evicted
        until used). Returns the number of items found."""
        count = 0
        for ns, item_id, data in self.store.scan():
            record = msgpack.unpackb(data, raw=False)
            space = self._space(ns)
            if item_id in space.items:
                continue
            item = Item(item_id, record["metadata"], record["created"], record["updated"],
                        len(record["text"].encode()))
            space.items[item_id] = item
            space.index.add(item_id, record["text"])
            self.replacer.access((ns, item_id), self._now())
            count += 1
        return count
