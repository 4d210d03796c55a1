"""The memory worker: the MemoryManager behind the shared worker runtime,
with its items kept durable by the storage manager (through the scheduler,
as kernel-internal block calls)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from libaios.errors import InvalidArgument
from libaios.protocol import MsgType

from ..config import Config
from ..kernel_client import KernelClient
from ..worker import Handler, Task, WorkerRuntime
from .manager import MemoryManager


class KernelBlockStore:
    """The memory manager's block store: the storage manager's blocks."""

    def __init__(self, client: KernelClient):
        self.client = client

    def put(self, ns: str, block_id: str, data: bytes) -> None:
        self.client.call(MsgType.BLOCK_PUT, {"block_id": block_id, "data": data}, as_namespace=ns)

    def get(self, ns: str, block_id: str) -> bytes:
        return self.client.call(MsgType.BLOCK_GET, {"block_id": block_id}, as_namespace=ns)["data"]

    def delete(self, ns: str, block_id: str) -> None:
        self.client.call(MsgType.BLOCK_DELETE, {"block_id": block_id}, as_namespace=ns)

    def scan(self) -> Iterator[tuple[str, str, bytes]]:
        after = None
        while True:
            page = self.client.call(MsgType.BLOCK_SCAN, {"after": after, "limit": 1000})
            for block in page["blocks"]:
                yield block["ns"], block["id"], block["data"]
            after = page.get("next")
            if after is None:
                return


class MemoryService:
    """The handlers; one lock serialises the manager, which is not
    thread-safe, and the first call loads what earlier runs stored."""

    def __init__(self, manager: MemoryManager):
        self.manager = manager
        self._lock = threading.Lock()
        self._loaded = False

    def _ns(self, task: Task) -> str:
        if not task.namespace:
            raise InvalidArgument(f"{task.type.value}: the call has no namespace")
        return task.namespace

    def _run(self, task: Task) -> dict[str, Any]:
        m = self.manager
        b = task.body
        with self._lock:
            if not self._loaded:
                # Only now: the scheduler and the storage worker answer.
                m.load()
                self._loaded = True
            if task.type is MsgType.MEMORY_STATS:
                return m.stats(task.namespace)
            ns = self._ns(task)
            if task.type is MsgType.MEMORY_ADD:
                return {"item": m.add(ns, b.get("text"), b.get("metadata"))}
            if task.type is MsgType.MEMORY_GET:
                return {"item": m.get(ns, b.get("id"))}
            if task.type is MsgType.MEMORY_UPDATE:
                return {"item": m.update(ns, b.get("id"), b.get("text"), b.get("metadata"),
                                         task.approved)}
            if task.type is MsgType.MEMORY_DELETE:
                return m.delete(ns, b.get("id"), task.approved)
            if task.type is MsgType.MEMORY_LIST:
                return {"items": m.list(ns, b.get("filters"), b.get("limit"), b.get("offset"))}
            return {"items": m.search(ns, b.get("query"), b.get("filters"), b.get("limit"))}

    def handlers(self) -> dict[MsgType, Handler]:
        types = (MsgType.MEMORY_ADD, MsgType.MEMORY_GET, MsgType.MEMORY_UPDATE,
                 MsgType.MEMORY_DELETE, MsgType.MEMORY_LIST, MsgType.MEMORY_SEARCH,
                 MsgType.MEMORY_STATS)
        return {t: self._run for t in types}


def serve(config: Config, endpoint: str) -> None:
    mc = config.memory
    manager = MemoryManager(KernelBlockStore(KernelClient("memory")), mc.budget_bytes, mc.k,
                            mc.high_water, mc.low_water)
    service = MemoryService(manager)
    WorkerRuntime(
        kind="memory", name="memory", capacity=4, endpoint=endpoint,
        handlers=service.handlers(), heartbeat_interval=config.kernel.heartbeat_interval,
        # running totals the scheduler turns into eviction events (the
        # manager's full stats walk every item: not at every heartbeat)
        stats=lambda: {"evictions": manager.evictions, "faults": manager.faults},
    ).run()
