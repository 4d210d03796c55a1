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

The files are written, read and checked on a thread of the tier's own, in
the order they were asked for, while the engine decodes: a spill costs the
engine no wait, and a file read ahead (``read_ahead``, for a call that is
still waiting) is ready when the call is admitted. What the tier holds (its
keys and bytes) changes on the engine's thread alone. The spills queued for
the disk hold their cells in memory until written, up to ``MAX_WRITING``
bytes: past it the engine waits for the oldest, so a disk slower than the
spills slows the core instead of growing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import struct
from array import array
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"AIOSKV1\n"
#: bytes of spills queued for the disk at once (see above)
MAX_WRITING = 256 << 20
#: seconds a call's admission waits for its file to be read
READ_TIMEOUT = 30.0
#: after the magic: token count, state bytes, the digest of what follows
HEADER = struct.Struct("<QQ32s")


def digest(tokens: bytes, state: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(tokens)
    h.update(state)
    return h.digest()


def file_size(n_tokens: int, n_state: int) -> int:
    """The bytes of a file holding ``n_tokens`` tokens and ``n_state`` bytes of state."""
    return len(MAGIC) + HEADER.size + 4 * n_tokens + n_state


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
    if len(data) != file_size(n_tokens, n_state):
        raise ValueError(f"{len(data)} bytes where the header says {file_size(n_tokens, n_state)}")
    start = len(MAGIC) + HEADER.size
    end = start + 4 * n_tokens
    packed, state = data[start:end], data[end:]
    if digest(packed, state) != want:
        raise ValueError("checksum mismatch")
    return array("i", packed).tolist(), state


def write(path: Path, tokens: list[int], state: bytes) -> None:
    """Write a conversation's file whole: under a temporary name, renamed."""
    data = encode(tokens, state)
    part = path.with_suffix(".part")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.rename(part, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        # its read will find no file, and the conversation is prefilled again
        log.warning("cannot keep a conversation's cells (%d bytes) in %s: %s; it will be "
                    "prefilled again", len(data), path.parent, exc)


def read(path: Path) -> tuple[list[int], bytes]:
    """A conversation's file, read and checked; OSError if it cannot be
    read, ValueError if it fails the check."""
    return decode(path.read_bytes())


def unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot delete a kept conversation's file %s: %s", path, exc)


def _logged(future: Future[Any]) -> None:
    """A done callback: what failed on the tier's thread unforeseen is
    logged, never lost (a write's or a deletion's own errors are logged
    where they happen; a read's are its caller's)."""
    if not future.cancelled() and future.exception() is not None:
        log.error("the disk tier's thread failed", exc_info=future.exception())


class DiskTier:
    """Conversations' cells on disk, by agent key, up to ``limit`` bytes;
    past it the least recently written go. ``stats`` are the engine's
    counters (spilled, dropped, corrupt, read ahead)."""

    def __init__(self, directory: Path, limit: int, stats: dict[str, int]) -> None:
        self.dir = directory
        self.limit = limit
        self.stats = stats
        #: key -> (file, its size), least recently written first
        self.files: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self.bytes = 0
        #: key -> its file being read ahead (or read)
        self.reads: dict[str, Future[tuple[list[int], bytes]]] = {}
        #: the spills queued for the disk, oldest first, and their bytes
        self._writing: deque[tuple[Future[None], int]] = deque()
        self.writing_bytes = 0
        shutil.rmtree(self.dir, ignore_errors=True)
        # one thread: a file's write, read and deletion happen in the order asked
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-disk")

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".kv")

    def put(self, key: str, tokens: list[int], state: bytes) -> bool:
        """Keep ``key``'s conversation on disk (written on the tier's
        thread); False if it cannot be: it is larger than the tier. (A
        write that fails is logged, and the conversation prefilled again.)"""
        self.forget(key)
        size = file_size(len(tokens), len(state))
        if size > self.limit:
            return False
        path = self._path(key)
        self._queue_write(path, list(tokens), state, size)
        self.files[key] = (path, size)
        self.bytes += size
        self.stats["spilled_seqs"] += 1
        while self.bytes > self.limit:
            old, (old_path, old_size) = self.files.popitem(last=False)
            self.bytes -= old_size
            self._drop(old, old_path)
            self.stats["dropped_seqs"] += 1
        return True

    def _queue_write(self, path: Path, tokens: list[int], state: bytes, size: int) -> None:
        """Queue a file's write; past MAX_WRITING queued, wait for the
        oldest writes first."""
        while self._writing and (self._writing[0][0].done()
                                 or self.writing_bytes + size > MAX_WRITING):
            done, n = self._writing.popleft()
            done.exception()   # waits (its own errors are logged)
            self.writing_bytes -= n
        future = self._io.submit(write, path, tokens, state)
        future.add_done_callback(_logged)
        self._writing.append((future, size))
        self.writing_bytes += size

    def read_ahead(self, key: str) -> None:
        """Start reading ``key``'s file, for a call that will restore it."""
        if key in self.files and key not in self.reads:
            self.reads[key] = self._io.submit(read, self.files[key][0])

    def ready(self, key: str) -> bool:
        """Whether ``key``'s conversation can be taken without waiting on
        the disk (it has none here, or its file has been read)."""
        if key not in self.files:
            return True
        future = self.reads.get(key)
        return future is not None and future.done()

    def take(self, key: str) -> tuple[list[int], bytes] | None:
        """``key``'s conversation, read, checked and removed from the tier
        (read ahead, or now); None if the tier has none, or its file cannot
        be read or fails the check."""
        entry = self.files.pop(key, None)
        if entry is None:
            return None
        path, size = entry
        self.bytes -= size
        future = self.reads.pop(key, None)
        if future is not None and future.done():
            self.stats["read_ahead"] += 1
        elif future is None:
            future = self._io.submit(read, path)
        self._delete(path)   # after its read: the conversation is taken either way
        try:
            return future.result(timeout=READ_TIMEOUT)
        except FutureTimeout:
            log.warning("reading a kept conversation's cells from %s took over %.0f s; the "
                        "conversation is prefilled again", path, READ_TIMEOUT)
            return None
        except OSError as exc:
            log.warning("cannot read a kept conversation's cells from %s: %s", path, exc)
            return None
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
        self._drop(key, entry[0])
        return True

    def release_reads(self, keep: set[str]) -> None:
        """Let go of the files read ahead for keys not in ``keep`` (their
        calls left the queue: cancelled, expired): they stay on disk, the
        tier's as before, instead of in memory."""
        for key in [k for k, f in self.reads.items() if k not in keep and f.done()]:
            del self.reads[key]

    def _drop(self, key: str, path: Path) -> None:
        self.reads.pop(key, None)
        self._delete(path)

    def _delete(self, path: Path) -> None:
        # after the writes and reads asked before (the tier's thread keeps order)
        self._io.submit(unlink, path).add_done_callback(_logged)

    def flush(self) -> None:
        """Wait until the writes, reads and deletions asked so far are done."""
        self._io.submit(lambda: None).result()

    def close(self) -> None:
        """Stop the tier's thread; what it has not begun is left undone
        (the directory is emptied when the core starts again)."""
        self._io.shutdown(wait=True, cancel_futures=True)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __len__(self) -> int:
        return len(self.files)
