"""Durable storage over LMDB: per-agent namespaces of versioned keys and
files, a byte quota per namespace, the memory manager's blocks, and the
audit log. No sockets: the storage worker wraps this.

Layout (named databases, keys are bytes):

``objects``   ns \\0 kind \\0 name \\0 version(8 bytes, big endian) -> record
``heads``     ns \\0 kind \\0 name -> latest version (8 bytes)
``usage``     ns -> bytes used (8 bytes)
``blocks``    ns \\0 block id -> data
``audit``     sequence (8 bytes) -> record

A record is msgpack ``{"v": value or data, "t": time, "n": size}``. Every
operation is one transaction, synced before it returns: an acknowledged
write survives a crash, and nothing is ever half written.
"""

from __future__ import annotations

import os
import posixpath
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgpack

from libaios.errors import ApprovalRequired, InvalidArgument, NotFound, QuotaExceeded

T = TypeVar("T")
SEP = b"\x00"
KINDS = ("key", "file")
MAX_NAME = 1024
MAX_GROWTHS = 16
#: a page of block.scan stops past this many bytes (well under a message's limit)
SCAN_PAGE_BYTES = 8 * 2**20


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _from_u64(b: bytes) -> int:
    return struct.unpack(">Q", b)[0]


def _prefixed(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The keys and values of ``db`` that begin with ``prefix``, in key order."""
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        for k, v in cur:
            if not k.startswith(prefix):
                return
            yield k, v


def _block_key(ns: str, block_id: str) -> bytes:
    """A memory block's key: its namespace, then its id."""
    return ns.encode() + SEP + block_id.encode()


def _text(value: Any, what: str, limit: int = MAX_NAME, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty) or len(value) > limit or "\x00" in value:
        raise InvalidArgument(f"{what} must be a string of {'0' if empty else '1'}-{limit} "
                              "characters without NUL")
    return value


def clean_path(path: Any, what: str = "path", empty: bool = False) -> str:
    """A relative file path, normalised; no '..' component, no NUL. Names
    that merely begin with dots (``...``, ``..foo``) are ordinary names."""
    path = _text(path, what, empty=empty)
    if path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} must be relative to the agent's storage")
    norm = posixpath.normpath(path) if path else ""
    if norm == ".":
        norm = ""
    # normpath resolves every '..' it can, so one that is left leads the path
    if norm == ".." or norm.startswith("../"):
        raise InvalidArgument(f"{what} {path!r} leaves the agent's storage")
    return norm


class _Gate:
    """Transactions enter freely; growing the map waits until none is open
    and keeps new ones out meanwhile. LMDB remaps the file when the map
    grows, and a transaction open in another thread would be left reading
    the old mapping (LMDB itself only checks for a write transaction)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = 0
        self._growing = False

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._cond:
            while self._growing:
                self._cond.wait()
            self._open += 1
        try:
            yield
        finally:
            with self._cond:
                self._open -= 1
                if not self._open:
                    self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            while self._growing:
                self._cond.wait()
            self._growing = True
            while self._open:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._growing = False
                self._cond.notify_all()


class Store:
    def __init__(self, path: Path, map_size: int, quota_bytes: int, max_versions: int):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        self.path = path
        self.quota_bytes = quota_bytes
        self.max_versions = max_versions
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=8, mode=0o600,
                             subdir=True, sync=True, metasync=True, lock=True, max_readers=64)
        self.objects = self.env.open_db(b"objects")
        self.heads = self.env.open_db(b"heads")
        self.usage = self.env.open_db(b"usage")
        self.blocks = self.env.open_db(b"blocks")
        self.audit = self.env.open_db(b"audit")
        self._gate = _Gate()

    def close(self) -> None:
        self.env.close()

    # -- transactions ------------------------------------------------------------

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in a write transaction; grow the map when it is full."""
        for _ in range(MAX_GROWTHS):
            size = self.env.info()["map_size"]
            try:
                with self._gate.transaction(), self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                # the transaction was aborted whole: double the map (unless
                # another thread already did), retry
                with self._gate.alone():
                    if self.env.info()["map_size"] == size:
                        self.env.set_mapsize(size * 2)
        raise QuotaExceeded("storage: the database cannot grow any further")

    def _read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        with self._gate.transaction(), self.env.begin() as txn:
            return fn(txn)

    # -- keys and files ----------------------------------------------------------------

    def _name_key(self, ns: str, kind: str, name: str) -> bytes:
        key = SEP.join((ns.encode(), kind.encode(), name.encode()))
        # a version's key adds a separator and 8 bytes; LMDB's keys are short
        room = self.env.max_key_size() - len(key) - 9
        if room < 0:
            what = "key" if kind == "key" else "path"
            raise InvalidArgument(
                f"the {what} {name[:40]!r}{'...' if len(name) > 40 else ''} is "
                f"{len(name.encode())} bytes in UTF-8; in namespace {ns} a {what} may have at "
                f"most {len(name.encode()) + room}")
        return key

    def _head(self, txn: lmdb.Transaction, nk: bytes) -> int:
        raw = txn.get(nk, db=self.heads)
        return _from_u64(raw) if raw else 0

    def _used(self, txn: lmdb.Transaction, ns: str) -> int:
        raw = txn.get(ns.encode(), db=self.usage)
        return _from_u64(raw) if raw else 0

    def _check_quota(self, txn: lmdb.Transaction, ns: str, delta: int, what: str = "") -> None:
        """Raise if ``ns`` would hold more than its quota with ``delta`` bytes more."""
        used = self._used(txn, ns)
        if used + delta > self.quota_bytes:
            raise QuotaExceeded(f"storage: {ns} would hold {used + delta} bytes{what}; its quota "
                                f"is {self.quota_bytes} (storage.quota_bytes)")

    def _add_usage(self, txn: lmdb.Transaction, ns: str, delta: int) -> None:
        txn.put(ns.encode(), _u64(max(0, self._used(txn, ns) + delta)), db=self.usage)

    def _versions(self, txn: lmdb.Transaction, nk: bytes) -> list[tuple[int, dict[str, Any]]]:
        prefix = nk + SEP
        return [(_from_u64(k[len(prefix):]), msgpack.unpackb(v, raw=False))
                for k, v in _prefixed(txn, self.objects, prefix)]

    def _store(self, ns: str, kind: str, name: str, value: Any, size: int, approved: bool,
               op: str = "storage.overwrite") -> dict[str, Any]:
        nk = self._name_key(ns, kind, name)

        def txn_fn(txn: lmdb.Transaction) -> dict[str, Any]:
            head = self._head(txn, nk)
            if head and not approved:
                raise ApprovalRequired(
                    f"{op}: {kind} {name!r} of {ns} exists (version {head}); "
                    "overwriting it needs approval",
                    details={"op": op, kind: name, "current_version": head},
                )
            versions = self._versions(txn, nk)
            dropped = versions[: max(0, len(versions) + 1 - self.max_versions)]
            freed = sum(rec["n"] for _, rec in dropped)
            self._check_quota(txn, ns, size - freed)
            for version, _ in dropped:
                txn.delete(nk + SEP + _u64(version), db=self.objects)
            version = head + 1
            record = {"v": value, "t": time.time(), "n": size}
            txn.put(nk + SEP + _u64(version), msgpack.packb(record, use_bin_type=True),
                    db=self.objects)
            txn.put(nk, _u64(version), db=self.heads)
            self._add_usage(txn, ns, size - freed)
            return {kind if kind == "key" else "path": name, "version": version}

        return self._write(txn_fn)

    def _load(self, ns: str, kind: str, name: str, version: int | None) -> tuple[int, dict[str, Any]]:
        nk = self._name_key(ns, kind, name)

        def txn_fn(txn: lmdb.Transaction) -> tuple[int, dict[str, Any]]:
            v = version if version is not None else self._head(txn, nk)
            raw = txn.get(nk + SEP + _u64(v), db=self.objects) if v else None
            if raw is None:
                what = f"version {version} of " if version is not None else ""
                raise NotFound(f"storage: no {what}{kind} {name!r} in {ns}")
            return v, msgpack.unpackb(raw, raw=False)

        return self._read(txn_fn)

    def put(self, ns: str, key: Any, value: Any, approved: bool = False) -> dict[str, Any]:
        key = _text(key, "key")
        try:
            size = len(msgpack.packb(value, use_bin_type=True)) + len(key.encode())
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"storage.put: the value cannot be stored: {exc}") from None
        return self._store(ns, "key", key, value, size, approved)

    def get(self, ns: str, key: Any, version: int | None = None) -> dict[str, Any]:
        key = _text(key, "key")
        v, rec = self._load(ns, "key", key, version)
        return {"key": key, "value": rec["v"], "version": v, "updated": rec["t"]}

    def write_file(self, ns: str, path: Any, data: Any, approved: bool = False) -> dict[str, Any]:
        path = clean_path(path)
        if not path:
            raise InvalidArgument("storage.write_file: 'path' names no file")
        if not isinstance(data, bytes):
            raise InvalidArgument("storage.write_file: 'data' must be bytes")
        return self._store(ns, "file", path, data, len(data) + len(path.encode()), approved)

    def read_file(self, ns: str, path: Any, version: int | None = None) -> dict[str, Any]:
        path = clean_path(path)
        v, rec = self._load(ns, "file", path, version)
        return {"path": path, "data": rec["v"], "version": v, "updated": rec["t"]}

    def delete(self, ns: str, kind: str, name: str, approved: bool = False) -> dict[str, Any]:
        """Delete a key or file with all its versions (destructive)."""
        name = clean_path(name) if kind == "file" else _text(name, "key")
        nk = self._name_key(ns, kind, name)

        def txn_fn(txn: lmdb.Transaction) -> dict[str, Any]:
            versions = self._versions(txn, nk)
            if not versions:
                raise NotFound(f"storage: no {kind} {name!r} in {ns}")
            if not approved:
                raise ApprovalRequired(
                    f"storage.delete: deleting {kind} {name!r} of {ns} ({len(versions)} "
                    "versions) needs approval",
                    details={"op": "storage.delete", kind: name, "versions": len(versions)})
            for version, _ in versions:
                txn.delete(nk + SEP + _u64(version), db=self.objects)
            txn.delete(nk, db=self.heads)
            self._add_usage(txn, ns, -sum(rec["n"] for _, rec in versions))
            return {"deleted": name, "versions": len(versions)}

        return self._write(txn_fn)

    def _names(self, ns: str, kind: str, prefix: str) -> list[tuple[str, int]]:
        return self._read(lambda txn: self._names_in(txn, ns, kind, prefix))

    def _names_in(self, txn: lmdb.Transaction, ns: str, kind: str,
                  prefix: str) -> list[tuple[str, int]]:
        """The names of ``kind`` under ``prefix`` in ``ns``, read in ``txn``
        (a second transaction inside one would wait on a growing map that
        waits on the first: a deadlock)."""
        start = self._name_key(ns, kind, prefix)
        base = self._name_key(ns, kind, "")
        return [(k[len(base):].decode(), _from_u64(v)) for k, v in _prefixed(txn, self.heads, start)]

    def list(self, ns: str, prefix: Any = "") -> dict[str, Any]:
        prefix = _text(prefix, "prefix", empty=True)
        return {"keys": [{"key": k, "version": v} for k, v in self._names(ns, "key", prefix)]}

    def list_dir(self, ns: str, dir: Any = "") -> dict[str, Any]:
        base = clean_path(dir, "dir", empty=True)
        prefix = f"{base}/" if base else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, version in self._names(ns, "file", prefix):
            rest = path[len(prefix):]
            head, sep, _ = rest.partition("/")
            if sep:
                entries.setdefault(head, {"name": head, "type": "dir"})
            else:
                entries[head] = {"name": head, "type": "file", "version": version}
        return {"dir": base, "entries": sorted(entries.values(), key=lambda e: e["name"])}

    def versions(self, ns: str, kind: Any, name: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise InvalidArgument("storage.versions: 'kind' must be 'key' or 'file'")
        name = clean_path(name, "name") if kind == "file" else _text(name, "name")
        found = self._read(lambda txn: self._versions(txn, self._name_key(ns, kind, name)))
        if not found:
            raise NotFound(f"storage: no {kind} {name!r} in {ns}")
        return {"versions": [{"version": v, "size": rec["n"], "updated": rec["t"]}
                             for v, rec in reversed(found)]}

    def rollback(self, ns: str, kind: Any, name: Any, version: Any,
                 approved: bool = False) -> dict[str, Any]:
        """Make ``version`` current again, as a new version (destructive)."""
        if kind not in KINDS:
            raise InvalidArgument("storage.rollback: 'kind' must be 'key' or 'file'")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidArgument("storage.rollback: 'version' must be a positive integer")
        name = clean_path(name, "name") if kind == "file" else _text(name, "name")
        _, rec = self._load(ns, kind, name, version)
        if not approved:
            current = self._read(lambda txn: self._head(txn, self._name_key(ns, kind, name)))
            raise ApprovalRequired(f"storage.rollback: rolling {kind} {name!r} of {ns} back from "
                                   f"version {current} to version {version} needs approval",
                                   details={"op": "storage.rollback", kind: name,
                                            "to_version": version, "current_version": current})
        out = self._store(ns, kind, name, rec["v"], rec["n"], approved=True)
        return {**out, "restored": version}

    def stats(self, ns: str | None) -> dict[str, Any]:
        def txn_fn(txn: lmdb.Transaction) -> dict[str, Any]:
            if ns is not None:
                return {"namespace": ns, "bytes": self._used(txn, ns),
                        "quota_bytes": self.quota_bytes,
                        "keys": len(self._names_in(txn, ns, "key", "")),
                        "files": len(self._names_in(txn, ns, "file", ""))}
            per = {k.decode(): _from_u64(v) for k, v in txn.cursor(db=self.usage)}
            return {"namespaces": per, "bytes": sum(per.values()),
                    "quota_bytes": self.quota_bytes, "map_size": self.env.info()["map_size"],
                    "blocks": txn.stat(self.blocks)["entries"]}

        return self._read(txn_fn)

    # -- memory blocks ------------------------------------------------------------------

    def block_put(self, ns: str, block_id: Any, data: Any) -> dict[str, Any]:
        block_id = _text(block_id, "block_id", 128)
        if not isinstance(data, bytes):
            raise InvalidArgument("block.put: 'data' must be bytes")
        key = _block_key(ns, block_id)

        def txn_fn(txn: lmdb.Transaction) -> None:
            # a memory item counts against its agent's quota, as its keys and files do
            old = txn.get(key, db=self.blocks)
            delta = len(data) - (len(old) if old is not None else 0)
            if delta > 0:
                self._check_quota(txn, ns, delta, " with this memory item")
            txn.put(key, data, db=self.blocks)
            self._add_usage(txn, ns, delta)

        self._write(txn_fn)
        return {}

    def block_get(self, ns: str, block_id: Any) -> dict[str, Any]:
        block_id = _text(block_id, "block_id", 128)
        data = self._read(lambda txn: txn.get(_block_key(ns, block_id), db=self.blocks))
        if data is None:
            raise NotFound(f"block.get: no block {block_id!r} of {ns}")
        return {"data": bytes(data)}

    def block_delete(self, ns: str, block_id: Any) -> dict[str, Any]:
        block_id = _text(block_id, "block_id", 128)
        key = _block_key(ns, block_id)

        def txn_fn(txn: lmdb.Transaction) -> None:
            old = txn.get(key, db=self.blocks)
            if old is not None:
                txn.delete(key, db=self.blocks)
                self._add_usage(txn, ns, -len(old))

        self._write(txn_fn)
        return {}

    def block_scan(self, after: Any = None, limit: Any = 1000) -> dict[str, Any]:
        if after is not None and not isinstance(after, bytes):
            raise InvalidArgument("block.scan: 'after' must be the cursor of the previous page")
        if not isinstance(limit, int) or not 0 < limit <= 10000:
            raise InvalidArgument("block.scan: 'limit' must be 1-10000")

        def txn_fn(txn: lmdb.Transaction) -> dict[str, Any]:
            out = []
            size = 0
            cur = txn.cursor(db=self.blocks)
            found = cur.set_range(after + b"\x00") if after else cur.first()
            last = None
            # a page stops at SCAN_PAGE_BYTES too (at least one block): a
            # reply over the message limit would never reach the caller
            while found and len(out) < limit and (not out or size + len(cur.value()) <= SCAN_PAGE_BYTES):
                k, v = cur.item()
                ns, _, bid = k.partition(SEP)
                out.append({"ns": ns.decode(), "id": bid.decode(), "data": bytes(v)})
                size += len(v) + len(k)
                last = k
                found = cur.next()
            return {"blocks": out, "next": last if found else None}

        return self._read(txn_fn)

    # -- audit log ----------------------------------------------------------------------

    def audit_append(self, record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise InvalidArgument("audit.append: 'record' must be a map")

        def txn_fn(txn: lmdb.Transaction) -> dict[str, Any]:
            cur = txn.cursor(db=self.audit)
            seq = _from_u64(cur.key()) + 1 if cur.last() else 1
            rec = {**record, "seq": seq}
            rec.setdefault("time", time.time())
            txn.put(_u64(seq), msgpack.packb(rec, use_bin_type=True), db=self.audit)
            return {"seq": seq}

        return self._write(txn_fn)

    def audit_list(self, after: Any = 0, limit: Any = 100, agent: Any = None) -> dict[str, Any]:
        if not isinstance(after, int) or after < 0:
            raise InvalidArgument("audit.list: 'after' must be a sequence number")
        if not isinstance(limit, int) or not 0 < limit <= 10000:
            raise InvalidArgument("audit.list: 'limit' must be 1-10000")

        def txn_fn(txn: lmdb.Transaction) -> dict[str, Any]:
            out = []
            cur = txn.cursor(db=self.audit)
            found = cur.set_range(_u64(after + 1))
            while found and len(out) < limit:
                rec = msgpack.unpackb(cur.value(), raw=False)
                if agent is None or rec.get("agent") == agent:
                    out.append(rec)
                found = cur.next()
            return {"records": out}

        return self._read(txn_fn)
