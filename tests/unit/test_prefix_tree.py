"""The prefix tree of cached token runs (pure logic)."""

from __future__ import annotations

import random

import pytest

from aiosd.llm.prefix import PrefixTree


def test_longest_finds_the_sequence_holding_most_whole_blocks() -> None:
    t = PrefixTree(block=4)
    t.grow(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    t.grow(1, [1, 2, 3, 4, 9, 9, 9, 9])
    assert t.longest([1, 2, 3, 4, 5, 6, 7, 8, 0, 0]) == (0, 8)
    assert t.longest([1, 2, 3, 4, 9, 9, 9, 9]) == (1, 8)
    assert t.longest([1, 2, 3, 4, 0]) == (0, 4)       # both hold it: the lowest id
    assert t.longest([1, 2, 3]) == (None, 0)          # no whole block
    assert t.longest([7, 7, 7, 7]) == (None, 0)


def test_exclude_skips_the_asking_sequence() -> None:
    t = PrefixTree(block=2)
    t.grow(0, [1, 2, 3, 4, 5, 6])
    t.grow(1, [1, 2, 3, 4])
    assert t.longest([1, 2, 3, 4, 5, 6], exclude=0) == (1, 4)
    assert t.longest([1, 2, 3, 4, 5, 6], exclude=1) == (0, 6)


def test_grow_is_incremental_and_truncate_and_drop_prune() -> None:
    t = PrefixTree(block=2)
    run = [1, 2]
    t.grow(0, run)
    for tok in (3, 4, 5, 6):
        run.append(tok)
        t.grow(0, run)
    assert len(t) == 3 and t.longest(run) == (0, 6)
    t.truncate(0, 3)                                   # keeps [1, 2] and the partial 3
    assert len(t) == 1 and t.longest(run) == (0, 2)
    t.grow(0, [1, 2, 8, 9])
    assert t.longest([1, 2, 8, 9]) == (0, 4) and t.longest(run) == (0, 2)
    t.drop(0)
    assert len(t) == 0 and t.longest(run) == (None, 0)
    t.drop(5)                                          # unknown: nothing to do


def test_matches_a_brute_force_scan() -> None:
    rng = random.Random(7)
    t = PrefixTree(block=3)
    held: dict[int, list[int]] = {}
    for _ in range(2000):
        seq = rng.randrange(6)
        op = rng.random()
        run = held.get(seq, [])
        if op < 0.5:
            run = run + [rng.randrange(3) for _ in range(rng.randrange(1, 7))]
            t.grow(seq, run)
        elif op < 0.8:
            run = run[:rng.randrange(len(run) + 1)]
            t.truncate(seq, len(run))
        else:
            run = []
            t.drop(seq)
        held[seq] = run
        probe = [rng.randrange(3) for _ in range(rng.randrange(20))]
        exclude = rng.choice([None, *range(6)])
        best, depth = None, 0
        for s, r in sorted(held.items()):
            if s == exclude:
                continue
            n = next((k for k, (x, y) in enumerate(zip(r, probe)) if x != y), min(len(r), len(probe)))
            n -= n % 3
            if n > depth:
                best, depth = s, n
        got = t.longest(probe, exclude=exclude)
        assert got[1] == depth
        if depth:
            assert got[0] is not None and got[0] != exclude
            assert held[got[0]][:depth] == probe[:depth]


def test_block_must_hold_a_token() -> None:
    with pytest.raises(ValueError, match="block"):
        PrefixTree(block=0)
