"""Snapshots of suspended generations, kept in RAM up to a bound and
spilled to disk (files 0600) past it; each is taken once, on resume, or
dropped when its call will never resume. Calls' threads put and take them,
the core's loop drops them: one lock guards the store's indexes, and no
file is read or written while it is held, so a drop never waits for a
spill. A snapshot being written stays takeable from RAM until its file is
complete; a file is written under a temporary name and renamed, so no
half-written snapshot is ever read; a spill that fails (a full disk)
leaves the snapshot in RAM, over the bound, rather than losing it."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from libaios import paths

from .generation import Snapshot

log = logging.getLogger(__name__)


def snapshot_dir(core: str) -> Path:
    return paths.data_dir() / "snapshots" / core


class SnapshotStore:
    def __init__(self, ram_bytes: int, spill_dir: Path):
        self.ram_bytes = ram_bytes
        self.spill_dir = spill_dir
        self._ram: OrderedDict[str, Snapshot] = OrderedDict()
        self._writing: dict[str, Snapshot] = {}   # leaving RAM: their files are being written
        self._disk: dict[str, Path] = {}
        self._used = 0
        self.spilled = 0
        self.spill_failures = 0
        self._lock = threading.Lock()
        # snapshots of an earlier run of this core cannot be resumed
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    def put(self, snap: Snapshot) -> str:
        with self._lock:
            sid = secrets.token_hex(8)
            self._ram[sid] = snap
            self._used += snap.nbytes
            leaving = []
            while self._used > self.ram_bytes and len(self._ram) > 1:
                old_id, old = self._ram.popitem(last=False)  # the oldest spills first
                self._used -= old.nbytes
                self._writing[old_id] = old
                leaving.append((old_id, old))
        for old_id, old in leaving:
            self._spill(old_id, old)
        return sid

    def _spill(self, sid: str, snap: Snapshot) -> None:
        path = self.spill_dir / f"{sid}.snap"
        part = self.spill_dir / f"{sid}.part"
        try:
            self.spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(snap, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.rename(part, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
            log.warning("cannot spill a suspended call's snapshot (%d bytes) to %s: %s; "
                        "it stays in RAM", snap.nbytes, self.spill_dir, exc)
            with self._lock:
                self.spill_failures += 1
                if self._writing.pop(sid, None) is not None:
                    self._ram[sid] = snap
                    self._ram.move_to_end(sid, last=False)   # still the first to spill
                    self._used += snap.nbytes
            return
        with self._lock:
            kept = self._writing.pop(sid, None) is not None
            if kept:
                self._disk[sid] = path
                self.spilled += 1
        if not kept:   # taken or dropped while its file was written
            path.unlink(missing_ok=True)

    def take(self, sid: str) -> Snapshot | None:
        with self._lock:
            snap = self._pop_ram(sid) or self._writing.pop(sid, None)
            if snap is not None:
                return snap
            path = self._disk.pop(sid, None)
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh)  # our own file, written above, mode 0600
        finally:
            path.unlink(missing_ok=True)

    def _pop_ram(self, sid: str) -> Snapshot | None:
        snap = self._ram.pop(sid, None)
        if snap is not None:
            self._used -= snap.nbytes
        return snap

    def drop(self, sid: str) -> None:
        """Discard a snapshot that will not be resumed, unread."""
        with self._lock:
            self._pop_ram(sid)
            self._writing.pop(sid, None)
            path = self._disk.pop(sid, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"in_ram": len(self._ram) + len(self._writing), "ram_bytes": self._used,
                    "on_disk": len(self._disk), "spilled": self.spilled,
                    "spill_failures": self.spill_failures}

    def clear(self) -> None:
        with self._lock:
            self._ram.clear()
            self._writing.clear()
            self._used = 0
            self._disk.clear()
        shutil.rmtree(self.spill_dir, ignore_errors=True)
