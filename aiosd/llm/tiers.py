"""The disk tier of retained conversations: the cells of conversations
evicted from the KV cache and then from RAM, one file per conversation.

A conversation's KV cache stream is its first tier; when the stream is
needed its cells go to RAM (the engine's ``evicted``), and when RAM is full
the least recently evicted go here instead of being dropped, so that an
agent's next call restores its conversation instead of prefilling it again.
Only when this tier is full too are the oldest files deleted.

A file is written under a temporary name and renamed, so no half-written
file is ever read; it carries a BLAKE2b digest of its contents, checked on
load: a file that fails the check (a flipped bit, a truncated write) is
deleted and counted, and the conversation is prefilled afresh. Files are
0600 in a directory of the core's own (emptied when the core starts: a
conversation of an earlier run has no agent to come back).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import struct
from array import array
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"AIOSKV1\n"
#: after the magic: token count, state bytes, the digest of what follows
HEADER = struct.Struct("<QQ32s")


def digest(tokens: bytes, state: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(tokens)
    h.update(state)
    return h.digest()


def encode(tokens: list[int], state: bytes) -> bytes:
    """A file's bytes: the magic, the header, the tokens (int32), the state."""
    packed = array("i", tokens).tobytes()
    return MAGIC + HEADER.pack(len(tokens), len(state), digest(packed, state)) + packed + state


def decode(data: bytes) -> tuple[list[int], bytes]:
    """The tokens and state a file holds; ValueError naming what is wrong
    if it is not one this tier wrote, or its digest does not match."""
    if not data.startswith(MAGIC):
        raise ValueError("not a conversation file (bad magic)")
    try:
        n_tokens, n_state, want = HEADER.unpack_from(data, len(MAGIC))
    except struct.error:
        raise ValueError("truncated header") from None
    start = len(MAGIC) + HEADER.size
    end = start + 4 * n_tokens
    if len(data) != end + n_state:
        raise ValueError(f"{len(data)} bytes where the header says {end + n_state}")
    packed, state = data[start:end], data[end:]
    if digest(packed, state) != want:
        raise ValueError("checksum mismatch")
    return array("i", packed).tolist(), state


class DiskTier:
    """Conversations' cells on disk, by agent key, up to ``limit`` bytes;
    past it the least recently written go. ``stats`` are the engine's
    counters (spilled, dropped, corrupt)."""

    def __init__(self, directory: Path, limit: int, stats: dict[str, int]) -> None:
        self.dir = directory
        self.limit = limit
        self.stats = stats
        #: key -> (file, its size), least recently written first
        self.files: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self.bytes = 0
        shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".kv")

    def put(self, key: str, tokens: list[int], state: bytes) -> bool:
        """Keep ``key``'s conversation on disk; False if it cannot be (the
        tier holds nothing, it is larger than the tier, or the write
        failed: then it is lost, as it would be without this tier)."""
        self.forget(key)
        data = encode(tokens, state)
        if len(data) > self.limit:
            return False
        path = self._path(key)
        part = path.with_suffix(".part")
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.rename(part, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
            log.warning("cannot keep a conversation's cells (%d bytes) in %s: %s; it will be "
                        "prefilled again", len(data), self.dir, exc)
            return False
        self.files[key] = (path, len(data))
        self.bytes += len(data)
        self.stats["spilled_seqs"] += 1
        while self.bytes > self.limit:
            _, (old_path, size) = self.files.popitem(last=False)
            self.bytes -= size
            old_path.unlink(missing_ok=True)
            self.stats["dropped_seqs"] += 1
        return True

    def take(self, key: str) -> tuple[list[int], bytes] | None:
        """``key``'s conversation, read, checked and removed from the tier;
        None if the tier has none, or its file fails the check."""
        entry = self.files.pop(key, None)
        if entry is None:
            return None
        path, size = entry
        self.bytes -= size
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read a kept conversation's cells from %s: %s", path, exc)
            return None
        finally:
            path.unlink(missing_ok=True)
        try:
            return decode(data)
        except ValueError as exc:
            self.stats["corrupt_seqs"] += 1
            log.warning("a kept conversation's file %s is refused (%s); the conversation is "
                        "prefilled again", path.name, exc)
            return None

    def forget(self, key: str) -> bool:
        """Drop ``key``'s file unread; whether there was one."""
        entry = self.files.pop(key, None)
        if entry is None:
            return False
        self.bytes -= entry[1]
        entry[0].unlink(missing_ok=True)
        return True

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __len__(self) -> int:
        return len(self.files)
