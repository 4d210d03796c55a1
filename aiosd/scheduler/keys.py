"""API keys: what an HTTP caller of the gateway presents, and the agent it
makes the caller.

A key is shown once, when it is made (``aiosctl keys create``); the kernel
keeps only its SHA-256, its agent's name, its groups and when it was made,
in an LMDB environment of its own in the data directory. A key is a random
256-bit secret, so a plain hash is as good as a slow one here.

An agent the kernel launches gets a key of its own for its lifetime,
``aios-agent-`` and its credential: nothing is stored for it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

#: what every stored key begins with (and a launched agent's)
PREFIX = "aios-sk-"
AGENT_PREFIX = "aios-agent-"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class KeyRecord:
    name: str                 # the agent the key makes its caller
    groups: list[str] = field(default_factory=list)
    created: float = 0.0
    #: the first characters of the key, to tell keys apart in a listing
    shown: str = ""


class KeyStore:
    def __init__(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=64 * 2**20, max_dbs=2, mode=0o600,
                             subdir=True, lock=True)
        self.db = self.env.open_db(b"keys")
        #: sha256 -> record, every stored key (read once, kept current)
        self.by_digest: dict[bytes, KeyRecord] = {}
        with self.env.begin(db=self.db) as txn:
            for raw_digest, raw in txn.cursor():
                self.by_digest[bytes(raw_digest)] = KeyRecord(**json.loads(raw))

    def create(self, name: str, groups: list[str]) -> str:
        """A new key for agent ``name``; returned this once, kept as a hash."""
        key = PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(name, list(groups), time.time(), key[:len(PREFIX) + 4])
        with self.env.begin(write=True, db=self.db) as txn:
            txn.put(digest(key), json.dumps(asdict(record)).encode())
        self.by_digest[digest(key)] = record
        return key

    def lookup(self, key: str) -> KeyRecord | None:
        return self.by_digest.get(digest(key)) if key.startswith(PREFIX) else None

    def revoke(self, name: str) -> int:
        """Revoke every key of agent ``name``; how many there were."""
        gone = [d for d, r in self.by_digest.items() if r.name == name]
        with self.env.begin(write=True, db=self.db) as txn:
            for d in gone:
                txn.delete(d)
        for d in gone:
            del self.by_digest[d]
        return len(gone)

    def rows(self) -> list[dict[str, Any]]:
        return sorted((asdict(r) for r in self.by_digest.values()),
                      key=lambda r: (r["name"], r["created"]))

    def close(self) -> None:
        self.env.close()
