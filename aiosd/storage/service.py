"""The storage worker: the Store behind the shared worker runtime.

The namespace of every call comes from the scheduler (``task.namespace``),
which set it after the access manager's decision; a body never chooses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from libaios import paths
from libaios.errors import InvalidArgument
from libaios.protocol import MsgType

from ..config import Config
from ..worker import Handler, Task, WorkerRuntime
from .store import Store


def _ns(task: Task) -> str:
    if not task.namespace:
        raise InvalidArgument(f"{task.type.value}: the call has no namespace")
    return task.namespace


def _version(body: dict[str, Any]) -> int | None:
    version = body.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                or version < 1):
        raise InvalidArgument("'version' must be a positive integer")
    return version


def handlers(store: Store) -> dict[MsgType, Handler]:
    b = lambda task: task.body  # noqa: E731  (short accessor for the table below)
    return {
        MsgType.STORAGE_PUT: lambda t: store.put(_ns(t), b(t).get("key"), b(t).get("value"),
                                                 t.approved),
        MsgType.STORAGE_GET: lambda t: store.get(_ns(t), b(t).get("key"), _version(b(t))),
        MsgType.STORAGE_DELETE: lambda t: store.delete(
            _ns(t), "file" if "path" in b(t) else "key", b(t).get("path", b(t).get("key")),
            t.approved),
        MsgType.STORAGE_LIST: lambda t: store.list(_ns(t), b(t).get("prefix", "")),
        MsgType.STORAGE_WRITE_FILE: lambda t: store.write_file(_ns(t), b(t).get("path"),
                                                               b(t).get("data"), t.approved),
        MsgType.STORAGE_READ_FILE: lambda t: store.read_file(_ns(t), b(t).get("path"),
                                                             _version(b(t))),
        MsgType.STORAGE_LIST_DIR: lambda t: store.list_dir(_ns(t), b(t).get("dir", "")),
        MsgType.STORAGE_VERSIONS: lambda t: store.versions(_ns(t), b(t).get("kind", "key"),
                                                           b(t).get("name")),
        MsgType.STORAGE_ROLLBACK: lambda t: store.rollback(
            _ns(t), b(t).get("kind", "key"), b(t).get("name"), b(t).get("version"), t.approved),
        MsgType.STORAGE_STATS: lambda t: store.stats(t.namespace),
        MsgType.BLOCK_PUT: lambda t: store.block_put(_ns(t), b(t).get("block_id"), b(t).get("data")),
        MsgType.BLOCK_GET: lambda t: store.block_get(_ns(t), b(t).get("block_id")),
        MsgType.BLOCK_DELETE: lambda t: store.block_delete(_ns(t), b(t).get("block_id")),
        MsgType.BLOCK_SCAN: lambda t: store.block_scan(b(t).get("after"), b(t).get("limit", 1000)),
        MsgType.AUDIT_APPEND: lambda t: store.audit_append(b(t).get("record")),
        MsgType.AUDIT_LIST: lambda t: store.audit_list(b(t).get("after", 0), b(t).get("limit", 100),
                                                       b(t).get("agent")),
    }


def serve(config: Config, endpoint: str) -> None:
    """Open the store (only now, in this process) and serve it."""
    root = Path(os.environ.get("AIOS_DATA_DIR") or paths.data_dir()) / "storage"
    store = Store(root, config.storage.map_size, config.storage.quota_bytes,
                  config.storage.max_versions)
    runtime = WorkerRuntime(
        kind="storage", name="storage", capacity=4, endpoint=endpoint,
        handlers=handlers(store), heartbeat_interval=config.kernel.heartbeat_interval,
        info={"path": str(root)},
    )
    try:
        runtime.run()
    finally:
        store.close()
