"""Where calls run in the engine's KV cache: pure decisions over the
engine's sequences, with no llama.cpp call. ``streams`` carries them out.

llama.cpp decodes in one pass only a run of consecutive streams, and each
pass reads all of the model's weights: calls scattered over the cache make
every step several passes. So a call that would start a run of its own
moves next to the running ones, and the running calls' streams are closed
up when gaps between them last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

#: steps in a row the running calls may lie in several runs of streams
#: before they are moved together (see compaction)
COMPACT_AFTER = 8


@dataclass(eq=False)
class Seq:
    """One stream of the KV cache: its number, whose conversation it holds
    (``key``), the tokens whose cells it holds, whether a call runs in it."""

    id: int
    key: str | None = None
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


def common(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """The length of the common prefix of ``a`` and ``b`` (known to be at
    least ``start``)."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def retained(seqs: Sequence[Seq], key: str) -> Seq | None:
    """The idle stream holding ``key``'s conversation, if any."""
    return next((s for s in seqs if s.key == key and not s.busy), None)


def reusable(seqs: Sequence[Seq]) -> Seq | None:
    """The idle stream a call may take (None if all run): an empty one;
    else one whose conversation is evicted for it. That is one of an agent
    that ended if any, else the least recently used of those beside a
    running call, else the least recently used of all.

    Taking a stream beside the running ones spares the move that would
    bring the call there (a whole stream copied, and before a restore into
    it, a decode to land the copy). What it costs is the evicted
    conversation coming back from RAM rather than from the cache, and with
    more agents than streams every conversation comes back from RAM
    anyway: least-recently-used retention gets no hits when agents take
    turns in a cycle longer than the cache."""
    idle = [s for s in seqs if not s.busy]
    if not idle:
        return None
    empty = next((s for s in idle if not s.tokens), None)
    if empty is not None:
        return empty
    ownerless = [s for s in idle if s.key is None]
    busy = {s.id for s in seqs if s.busy}
    beside = [s for s in idle if s.id - 1 in busy or s.id + 1 in busy]
    return min(ownerless or beside or idle, key=lambda s: s.last_used)


def place(seqs: Sequence[Seq], seq: Seq) -> Seq:
    """The stream a call on ``seq`` should run in: ``seq`` itself if it
    joins a running call's stream (or none runs), else an idle stream that
    does (into a hole between them, or at a run's end), to swap cells with."""
    busy = {s.id for s in seqs if s.busy and s is not seq}

    def joins(i: int) -> bool:
        return i - 1 in busy or i + 1 in busy

    if not busy or joins(seq.id):
        return seq
    return next((s for s in seqs if not s.busy and joins(s.id)), seq)


def apart(decoding: Sequence[int]) -> bool:
    """Whether the streams ``decoding`` (their numbers) make several runs."""
    ids = sorted(decoding)
    return any(b - a > 1 for a, b in pairwise(ids))


def compaction(seqs: Sequence[Seq], decoding: Sequence[int]) -> list[tuple[int, int]]:
    """The moves (from stream, to stream) that close the gaps between the
    ``decoding`` streams: the call in the last stream moves into the first
    hole, until no idle stream lies between them. A move costs about as
    much as two passes, so the engine asks only once the gaps have lasted
    ``COMPACT_AFTER`` steps (gaps that calls arriving together fill by
    themselves are not worth moving for)."""
    idle = {s.id for s in seqs if not s.busy}
    running = sorted(decoding)
    moves = []
    while running:
        hole = next((i for i in sorted(idle) if running[0] < i < running[-1]), None)
        if hole is None:
            break
        last = running.pop()
        moves.append((last, hole))
        idle.discard(hole)
        idle.add(last)
        running = sorted([*running, hole])
    return moves


Source = Literal["restore", "share", "own"]


def prompt_source(held: int, kept: int | None, shared: int, block: int) -> Source:
    """Where a call's prompt cells come from: ``held`` tokens of it are in
    its own stream, ``kept`` (None: nothing) in its agent's conversation
    evicted to RAM, ``shared`` in another stream (a shared system prompt).
    Cells are copied in only when they hold more than a block beyond what
    is there already: copying megabytes to keep a few tokens is not worth
    it."""
    if kept is not None and kept > max(held, shared) + block:
        return "restore"
    if shared > held + block:
        return "share"
    return "own"
