"""Snapshots of suspended generations, kept in RAM up to a bound and
spilled to disk (files 0600) past it; each is taken once, on resume, or
dropped when its call will never resume. Calls' threads put and take them,
the core's loop drops them: one lock guards the store."""

from __future__ import annotations

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


def snapshot_dir(core: str) -> Path:
    return paths.data_dir() / "snapshots" / core


class SnapshotStore:
    def __init__(self, ram_bytes: int, spill_dir: Path):
        self.ram_bytes = ram_bytes
        self.spill_dir = spill_dir
        self._ram: OrderedDict[str, Snapshot] = OrderedDict()
        self._disk: dict[str, Path] = {}
        self._used = 0
        self.spilled = 0
        self._lock = threading.Lock()
        # snapshots of an earlier run of this core cannot be resumed
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    def put(self, snap: Snapshot) -> str:
        with self._lock:
            return self._put(snap)

    def _put(self, snap: Snapshot) -> str:
        sid = secrets.token_hex(8)
        self._ram[sid] = snap
        self._used += snap.nbytes
        while self._used > self.ram_bytes and len(self._ram) > 1:
            old_id, old = self._ram.popitem(last=False)  # the oldest spills first
            self._used -= old.nbytes
            self._spill(old_id, old)
        return sid

    def _spill(self, sid: str, snap: Snapshot) -> None:
        self.spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.spill_dir / f"{sid}.snap"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(snap, fh, protocol=pickle.HIGHEST_PROTOCOL)
        self._disk[sid] = path
        self.spilled += 1

    def take(self, sid: str) -> Snapshot | None:
        with self._lock:
            return self._take(sid)

    def _take(self, sid: str) -> Snapshot | None:
        snap = self._pop_ram(sid)
        if snap is not None:
            return snap
        path = self._disk.pop(sid, None)
        if path is None:
            return None
        with open(path, "rb") as fh:
            snap = pickle.load(fh)  # our own file, written above, mode 0600
        path.unlink()
        return snap

    def _pop_ram(self, sid: str) -> Snapshot | None:
        snap = self._ram.pop(sid, None)
        if snap is not None:
            self._used -= snap.nbytes
        return snap

    def drop(self, sid: str) -> None:
        """Discard a snapshot that will not be resumed, unread."""
        with self._lock:
            self._pop_ram(sid)
            path = self._disk.pop(sid, None)
            if path is not None:
                path.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"in_ram": len(self._ram), "ram_bytes": self._used, "on_disk": len(self._disk),
                    "spilled": self.spilled}

    def clear(self) -> None:
        with self._lock:
            self._ram.clear()
            self._used = 0
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self._disk.clear()
