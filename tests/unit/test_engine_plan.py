"""The engine's pure planning: how many sequences a KV budget holds, how
many passes llama.cpp makes over a batch of streams, and how prompt chunks
are cut and batched so that no prompt token is fed alone."""

from __future__ import annotations

import pytest

from types import SimpleNamespace

from aiosd.llm.batching import MAX_SEQS, chunk_groups, passes, prompt_chunk, sequences_for

MIB = 2**20
TOKEN = 23040   # KV bytes a token costs in the embedded model


def test_sequences_for_keeps_one_stream_spare() -> None:
    # 1536 MiB hold 34 streams of 2048 tokens: 33 sequences and the spare
    assert sequences_for(1536 * MIB, 2048, TOKEN, 8) == 33
    assert sequences_for(10**6 * MIB, 16, TOKEN, 8) == MAX_SEQS


def test_sequences_for_names_the_memory_the_slots_need() -> None:
    with pytest.raises(ValueError, match=r"8 slots of 2048 tokens need (\d+) MiB") as info:
        sequences_for(100 * MIB, 2048, TOKEN, 8)
    need = int(str(info.value).split(" need ")[1].split(" MiB")[0])
    assert sequences_for(need * MIB, 2048, TOKEN, 8) == 8          # enough, as it says
    with pytest.raises(ValueError):
        sequences_for((need - 1) * MIB, 2048, TOKEN, 8)


def test_passes_take_runs_of_consecutive_streams() -> None:
    # one token from each decoding stream in one pass, the rest of a prompt after
    assert passes([(0, 1), (1, 1), (2, 65)], 512) == 2
    assert passes([(0, 1), (1, 1), (2, 1)], 512) == 1
    # a gap between streams splits the pass
    assert passes([(0, 1), (2, 1)], 512) == 2
    # a prompt longer than a pass
    assert passes([(5, 600)], 512) == 2
    assert passes([], 512) == 0


def test_a_prompt_chunk_never_feeds_or_leaves_a_lone_token() -> None:
    assert prompt_chunk(300, 512) == 300
    assert prompt_chunk(300, 100) == 100
    assert prompt_chunk(101, 100) == 99        # not 100, which would leave one token
    assert prompt_chunk(3, 2) == 0             # 2 would leave one: wait a step
    assert prompt_chunk(5, 1) == 0
    assert prompt_chunk(2, 2) == 2
    assert prompt_chunk(1, 4) == 1             # a one-token prompt can only be fed alone
    assert prompt_chunk(1, 0) == 0
    for todo in range(1, 40):
        for budget in range(0, 40):
            count = prompt_chunk(todo, budget)
            assert count <= min(todo, budget)
            if todo >= 2:
                assert count != 1 and todo - count != 1
                if budget >= 3:
                    assert count >= 2      # and the prompt goes on


def chunk(stream: int, n: int) -> tuple[object, list[int]]:
    return SimpleNamespace(_seq=SimpleNamespace(id=stream)), [7] * n


def test_prompt_chunks_share_a_batch_only_when_one_pass_takes_them_whole() -> None:
    def shape(groups: list) -> list[list[tuple[int, int]]]:
        return [[(r._seq.id, len(t)) for r, t in g] for g in groups]

    # consecutive streams with chunks of one length: one batch, one pass
    groups = chunk_groups([chunk(1, 16), chunk(2, 16), chunk(3, 16)], 512)
    assert shape(groups) == [[(1, 16), (2, 16), (3, 16)]]
    # another length, or a gap between streams, starts another batch
    groups = chunk_groups([chunk(1, 16), chunk(2, 17), chunk(4, 17), chunk(5, 17)], 512)
    assert shape(groups) == [[(1, 16)], [(2, 17)], [(4, 17), (5, 17)]]
    # no batch holds more than a pass takes
    groups = chunk_groups([chunk(i, 200) for i in range(3)], 512)
    assert shape(groups) == [[(0, 200), (1, 200)], [(2, 200)]]
    for g in groups:
        assert passes([(r._seq.id, len(t)) for r, t in g], 512) == 1


# -- where calls run in the cache (placement): pure, on streams the test lays out


def _streams(layout: str, used: dict[int, float] | None = None):
    """Streams from a picture: 'B' a call runs there, 'h' it holds a
    conversation, '.' empty; ``used``: when each was last used."""
    from aiosd.llm.placement import Seq

    return [Seq(i, key=f"k{i}" if c != "." else None, tokens=[1, 2] if c != "." else [],
                busy=c == "B", last_used=(used or {}).get(i, 0.0))
            for i, c in enumerate(layout)]


def test_a_call_that_would_run_apart_moves_beside_the_running_ones() -> None:
    from aiosd.llm.placement import place

    seqs = _streams("BB..h.h")
    assert place(seqs, seqs[2]) is seqs[2]     # it joins the run already
    assert place(seqs, seqs[6]) is seqs[2]     # the first idle stream at a run's end
    seqs = _streams("B.B...h")
    assert place(seqs, seqs[6]) is seqs[1]     # into the hole between them
    seqs = _streams("....h..")
    assert place(seqs, seqs[4]) is seqs[4]     # nothing runs: it stays
    seqs = _streams("BBBBBh")
    assert place(seqs, seqs[5]) is seqs[5]     # (it joins the run)


def test_gaps_between_decoding_calls_close_from_the_last_into_the_first_hole() -> None:
    from aiosd.llm.placement import apart, compaction

    seqs = _streams("B.B..B.B")
    decoding = [0, 2, 5, 7]
    assert apart(decoding) and not apart([3, 4, 5])
    assert compaction(seqs, decoding) == [(7, 1), (5, 3)]
    assert compaction(_streams("BBB..B"), [0, 1, 2]) == []
    # a stream busy with a prefilling call is no hole, and stays
    seqs = _streams("BBB.B")
    assert compaction(seqs, [0, 4]) == [(4, 3)]


def test_the_stream_to_reuse_is_an_empty_one_else_one_beside_the_running_calls() -> None:
    from aiosd.llm.placement import place, retained, reusable

    seqs = _streams("Bhh.", used={1: 30.0, 2: 10.0})
    assert reusable(seqs) is seqs[3]                    # an empty one first
    # every idle stream holds a conversation: the one beside the running
    # call goes, though another was used less recently, and needs no move
    seqs = _streams("Bhh", used={1: 30.0, 2: 10.0})
    assert reusable(seqs) is seqs[1] and place(seqs, seqs[1]) is seqs[1]
    # of those beside a run, the least recently used
    seqs = _streams("hBhhhBh", used={0: 50.0, 2: 20.0, 3: 5.0, 4: 30.0, 6: 40.0})
    assert reusable(seqs) is seqs[2]
    # an ended agent's stream (no owner) goes first, wherever it lies
    seqs = _streams("Bhhh", used={1: 30.0, 2: 10.0, 3: 60.0})
    seqs[3].key = None
    assert reusable(seqs) is seqs[3]
    # nothing runs: the least recently used of all
    assert reusable(_streams("hhh", used={0: 9.0, 1: 3.0, 2: 7.0})).id == 1
    assert reusable(_streams("BB")) is None
    seqs = _streams("Bhh", used={1: 30.0, 2: 10.0})
    assert retained(seqs, "k1") is seqs[1] and retained(seqs, "k0") is None   # k0 runs


def test_a_prompt_comes_from_the_cells_that_hold_most_of_it_by_more_than_a_block() -> None:
    from aiosd.llm.placement import common, prompt_source

    assert common([1, 2, 3, 4], [1, 2, 9]) == 2 and common([1, 2], [1, 2, 3], start=1) == 2
    block = 16
    assert prompt_source(held=100, kept=None, shared=0, block=block) == "own"
    assert prompt_source(held=0, kept=300, shared=200, block=block) == "restore"
    assert prompt_source(held=0, kept=210, shared=200, block=block) == "share"   # not worth it
    assert prompt_source(held=100, kept=None, shared=110, block=block) == "own"
    assert prompt_source(held=100, kept=None, shared=117, block=block) == "share"
