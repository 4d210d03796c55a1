"""Sizing a core's memory to the machine (pure: fake memory and cgroup
figures)."""

from __future__ import annotations

from pathlib import Path

from aiosd.llm import sizing
from aiosd.llm.batching import MAX_SEQS

GiB, MiB = 1 << 30, 1 << 20
TOKEN = 23040          # the embedded model's KV bytes a token
STREAM = 2048 * TOKEN  # one stream of n_ctx = 2048


def test_the_memory_a_process_may_use_is_the_least_of_the_system_and_its_cgroup() -> None:
    assert sizing.usable(20 * GiB, None, None) == 20 * GiB
    assert sizing.usable(20 * GiB, 8 * GiB, 3 * GiB) == 5 * GiB
    assert sizing.usable(2 * GiB, 8 * GiB, 3 * GiB) == 2 * GiB
    assert sizing.usable(2 * GiB, 8 * GiB, 9 * GiB) == 0


def test_a_core_takes_its_share_less_the_headroom_a_third_for_the_kv_cache() -> None:
    s = sizing.auto_sizes(usable_bytes=22 * GiB, cores=1, token_bytes=TOKEN, n_ctx=2048)
    share = 22 * GiB - int(22 * GiB * sizing.HEADROOM_FRACTION)
    assert s.share_mb == share // MiB and s.usable_mb == 22 * 1024
    streams = int(share * sizing.KV_FRACTION) // STREAM
    assert s.kv_mb == -(-streams * STREAM // MiB)
    assert s.evicted_mb == (share - streams * STREAM) // MiB
    assert s.slots == sizing.DEFAULT_SLOTS
    # the whole is under what the process may use, with the headroom left
    assert (s.kv_mb + s.evicted_mb) * MiB <= 22 * GiB - int(22 * GiB * sizing.HEADROOM_FRACTION) + MiB


def test_two_cores_share_and_a_small_machine_gets_fewer_slots() -> None:
    one = sizing.auto_sizes(usable_bytes=22 * GiB, cores=1, token_bytes=TOKEN, n_ctx=2048)
    two = sizing.auto_sizes(usable_bytes=22 * GiB, cores=2, token_bytes=TOKEN, n_ctx=2048)
    assert abs(two.share_mb * 2 - one.share_mb) <= 1
    small = sizing.auto_sizes(usable_bytes=3 * GiB, cores=1, token_bytes=TOKEN, n_ctx=2048)
    assert small.share_mb == (3 * GiB - int(3 * GiB * sizing.HEADROOM_FRACTION)) // MiB
    assert 1 <= small.slots < sizing.DEFAULT_SLOTS
    assert small.kv_mb * MiB >= (small.slots + 1) * STREAM


def test_a_machine_with_nothing_to_spare_still_runs_one_call() -> None:
    s = sizing.auto_sizes(usable_bytes=512 * MiB, cores=1, token_bytes=TOKEN, n_ctx=2048)
    assert s.slots == 1 and s.kv_mb * MiB >= 2 * STREAM and s.evicted_mb == 0


def test_figures_the_config_gives_are_kept() -> None:
    s = sizing.auto_sizes(usable_bytes=22 * GiB, cores=1, token_bytes=TOKEN, n_ctx=2048,
                          kv_mb=1536, slots=8)
    assert (s.kv_mb, s.slots) == (1536, 8) and s.evicted_mb > 0
    s = sizing.auto_sizes(usable_bytes=22 * GiB, cores=1, token_bytes=TOKEN, n_ctx=2048,
                          evicted_mb=0)
    assert s.evicted_mb == 0
    # a machine of any size: never more streams than llama.cpp allows
    s = sizing.auto_sizes(usable_bytes=4096 * GiB, cores=1, token_bytes=TOKEN, n_ctx=2048)
    assert s.kv_mb * MiB <= MAX_SEQS * STREAM + MiB


def test_cgroup_limits_are_read_where_they_are_set(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("100\n")
    assert sizing.cgroup_memory(tmp_path) == (None, None)
    (tmp_path / "memory.max").write_text("8589934592\n")
    assert sizing.cgroup_memory(tmp_path) == (8 * GiB, 100)
    assert sizing.cgroup_memory(tmp_path / "none") == (None, None)
