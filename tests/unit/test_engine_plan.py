"""The engine's pure planning: how many sequences a KV budget holds, and how
many passes llama.cpp makes over a batch of streams."""

from __future__ import annotations

import pytest

from aiosd.llm.engine import MAX_SEQS, passes, sequences_for

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
