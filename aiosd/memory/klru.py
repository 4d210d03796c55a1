"""The K-LRU replacer: which block to evict next. Pure; the caller passes
the time (a counter or a clock), so tests run it on a fake one.

A block's backward K-distance is how long ago its K-th most recent access
was. The victim is the evictable block with the largest distance; a block
with fewer than K accesses has an infinite distance, and among those the one
whose oldest recorded access is earliest goes first (plain LRU). With K = 1
this is LRU; larger K keeps a block that is used again and again over one
that was touched once by a scan.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class KLRUReplacer:
    def __init__(self, k: int = 2):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self._history: dict[Hashable, deque[float]] = {}
        self._pinned: set[Hashable] = set()

    def access(self, block: Hashable, now: float) -> None:
        """Record an access to ``block`` (tracking it if it is new)."""
        hist = self._history.setdefault(block, deque(maxlen=self.k))
        hist.append(now)

    def pin(self, block: Hashable) -> None:
        """Keep ``block`` from being evicted (in use)."""
        self._pinned.add(block)

    def unpin(self, block: Hashable) -> None:
        self._pinned.discard(block)

    def remove(self, block: Hashable) -> None:
        """Stop tracking ``block`` (deleted or evicted)."""
        self._history.pop(block, None)
        self._pinned.discard(block)

    def __contains__(self, block: Hashable) -> bool:
        return block in self._history

    def __len__(self) -> int:
        return len(self._history)

    def victim(self) -> Hashable | None:
        """The block to evict next, or None if every block is pinned."""
        best = None
        best_key: tuple[int, float] | None = None
        for block, hist in self._history.items():
            if block in self._pinned:
                continue
            if len(hist) < self.k:
                key = (1, -hist[0])   # infinite distance; earliest first
            else:
                key = (0, -hist[0])   # hist[0] is the K-th most recent access
            if best_key is None or key > best_key:
                best, best_key = block, key
        return best

    def evict(self) -> Hashable | None:
        """Pick the victim and stop tracking it."""
        block = self.victim()
        if block is not None:
            self.remove(block)
        return block
