"""The K-LRU replacer: which block to evict next. Pure; the caller passes
the time (a counter or a clock), so tests run it on a fake one.

A block's backward K-distance is how long ago its K-th most recent access
was. The victim is the evictable block with the largest distance; a block
with fewer than K accesses has an infinite distance, and among those the one
whose oldest recorded access is earliest goes first (plain LRU). With K = 1
this is LRU; larger K keeps a block that is used again and again over one
that was touched once by a scan.

The blocks wait in a heap ordered by that rule, so choosing a victim costs
O(log n) rather than a look at every block: an access that changes a
block's place pushes a new entry, and entries left behind by later
accesses (or by removed blocks) are passed over when they come up, and
cleared out when they outnumber the blocks.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable


class KLRUReplacer:
    def __init__(self, k: int = 2):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self._history: dict[Hashable, deque[float]] = {}
        self._pinned: set[Hashable] = set()
        #: (place, order, block) entries; an entry whose place is no longer
        #: its block's is left behind (see _current)
        self._heap: list[tuple[int, float, int, Hashable]] = []
        self._order = itertools.count()   # ties: the block placed first goes first

    def access(self, block: Hashable, now: float) -> None:
        """Record an access to ``block`` (tracking it if it is new)."""
        hist = self._history.setdefault(block, deque(maxlen=self.k))
        before = self._place(hist) if hist else None
        hist.append(now)
        place = self._place(hist)
        if place != before:
            heapq.heappush(self._heap, (*place, next(self._order), block))
            if len(self._heap) > 2 * len(self._history) + 64:
                self._heap = [e for e in self._heap if self._current(e)]
                heapq.heapify(self._heap)

    def _place(self, hist: deque[float]) -> tuple[int, float]:
        """A block's place in the eviction order, the least first: 0 if it
        has fewer than K accesses, else 1; then its oldest recorded access."""
        return (0 if len(hist) < self.k else 1, hist[0])

    def _current(self, entry: tuple[int, float, int, Hashable]) -> bool:
        """Whether a heap entry is still its block's place."""
        hist = self._history.get(entry[3])
        return hist is not None and self._place(hist) == entry[:2]

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
        pinned = []
        found = None
        while self._heap:
            entry = self._heap[0]
            if not self._current(entry):
                heapq.heappop(self._heap)   # left behind by a later access
            elif entry[3] in self._pinned:
                pinned.append(heapq.heappop(self._heap))
            else:
                found = entry[3]
                break
        for entry in pinned:
            heapq.heappush(self._heap, entry)
        return found

    def evict(self) -> Hashable | None:
        """Pick the victim and stop tracking it."""
        block = self.victim()
        if block is not None:
            self.remove(block)
        return block
