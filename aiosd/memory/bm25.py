"""A BM25 index over one agent's memory items. Pure.

It keeps only term statistics (postings and lengths), not the texts, so an
item whose text was evicted to storage is still found by search.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class BM25Index:
    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1 = k1
        self.b = b
        self._postings: dict[str, dict[Hashable, int]] = {}
        self._lengths: dict[Hashable, int] = {}
        self._total = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, doc: Hashable, text: str) -> None:
        if doc in self._lengths:
            self.remove(doc)
        terms = Counter(tokenize(text))
        length = sum(terms.values())
        self._lengths[doc] = length
        self._total += length
        for term, tf in terms.items():
            self._postings.setdefault(term, {})[doc] = tf

    def remove(self, doc: Hashable) -> None:
        length = self._lengths.pop(doc, None)
        if length is None:
            return
        self._total -= length
        for term in list(self._postings):
            post = self._postings[term]
            if post.pop(doc, None) is not None and not post:
                del self._postings[term]

    def search(self, query: str, candidates: Iterable[Hashable] | None = None,
               limit: int = 10) -> list[tuple[Hashable, float]]:
        """The best ``limit`` documents for ``query``, best first, with
        their scores; only ``candidates`` if given (metadata filters)."""
        n = len(self._lengths)
        if n == 0:
            return []
        allowed = None if candidates is None else set(candidates)
        avg = self._total / n or 1.0
        scores: dict[Hashable, float] = {}
        for term in set(tokenize(query)):
            post = self._postings.get(term)
            if not post:
                continue
            idf = math.log(1 + (n - len(post) + 0.5) / (len(post) + 0.5))
            for doc, tf in post.items():
                if allowed is not None and doc not in allowed:
                    continue
                norm = tf * (self.k1 + 1) / (
                    tf + self.k1 * (1 - self.b + self.b * self._lengths[doc] / avg)
                )
                scores[doc] = scores.get(doc, 0.0) + idf * norm
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], str(kv[0])))
        return ranked[:limit]
