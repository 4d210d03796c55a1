"""The disk tier of kept conversations: files written whole, checked on
load, bounded, and refused (not loaded) when a byte changed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from aiosd.llm import tiers


def tier(tmp_path: Path, limit: int = 10_000) -> tiers.DiskTier:
    return tiers.DiskTier(tmp_path / "kv", limit, Counter())


def test_a_conversation_comes_back_as_it_went(tmp_path: Path) -> None:
    t = tier(tmp_path)
    assert t.put("agent-1", [1, 2, 300000], b"cells" * 10)
    assert "agent-1" in t and len(t) == 1
    t.flush()   # written on the tier's thread
    [path] = (tmp_path / "kv").iterdir()
    assert path.suffix == ".kv" and path.stat().st_mode & 0o777 == 0o600
    assert t.take("agent-1") == ([1, 2, 300000], b"cells" * 10)
    t.flush()   # deleted on the tier's thread too
    assert t.take("agent-1") is None and not list((tmp_path / "kv").iterdir())
    assert t.stats["spilled_seqs"] == 1


def test_a_flipped_byte_is_refused_and_counted(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put("a", list(range(50)), bytes(range(256)))
    t.flush()
    [path] = (tmp_path / "kv").iterdir()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    assert t.take("a") is None
    t.flush()
    assert t.stats["corrupt_seqs"] == 1 and not path.exists() and t.bytes == 0


@pytest.mark.parametrize("damage, why", [
    (lambda d: b"XXXXXXXX" + d[8:], "bad magic"),
    (lambda d: d[:20], "truncated header"),
    (lambda d: d[:-1], "bytes where the header says"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "checksum mismatch"),
])
def test_decode_names_what_is_wrong(damage, why: str) -> None:
    data = tiers.encode([5, 6, 7], b"state")
    assert tiers.decode(data) == ([5, 6, 7], b"state")
    with pytest.raises(ValueError, match=why):
        tiers.decode(damage(data))


def test_the_least_recently_written_go_past_the_bound(tmp_path: Path) -> None:
    size = len(tiers.encode([1] * 10, b"x" * 100))
    t = tier(tmp_path, limit=2 * size)
    for key in ("a", "b", "c"):
        t.put(key, [1] * 10, b"x" * 100)
    assert list(t.files) == ["b", "c"] and t.bytes == 2 * size
    assert t.stats["dropped_seqs"] == 1
    assert not t.put("huge", [1], b"x" * (3 * size))   # larger than the tier
    assert t.forget("b") and not t.forget("b") and list(t.files) == ["c"]
    t.flush()
    assert len(list((tmp_path / "kv").iterdir())) == 1   # the dropped files are deleted


def test_a_file_read_ahead_is_ready_when_taken(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put("a", [1, 2, 3], b"state")
    assert t.ready("nobody")             # nothing on disk: nothing to wait for
    assert not t.ready("a")              # on disk, not read
    t.read_ahead("a")
    t.read_ahead("a")                    # once is enough
    t.flush()
    assert t.ready("a") and "a" in t     # read, still the tier's until taken
    assert t.take("a") == ([1, 2, 3], b"state") and t.stats["read_ahead"] == 1
    t.flush()
    assert t.bytes == 0 and not list((tmp_path / "kv").iterdir())


def test_a_file_read_ahead_then_forgotten_or_written_again_is_not_served(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put("a", [1], b"old")
    t.read_ahead("a")
    t.put("a", [2], b"new")              # the agent's conversation spilled again
    assert t.take("a") == ([2], b"new")
    t.put("b", [1], b"x")
    t.read_ahead("b")
    assert t.forget("b") and t.take("b") is None
    t.flush()
    assert not list((tmp_path / "kv").iterdir()) and t.bytes == 0


def test_a_file_read_ahead_for_a_call_gone_from_the_queue_stays_on_disk(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put("a", [1, 2], b"cells")
    t.put("b", [3], b"more")
    t.read_ahead("a")
    t.read_ahead("b")
    t.flush()
    t.release_reads({"b"})              # a's call left the queue; b's waits still
    assert set(t.reads) == {"b"} and "a" in t and t.ready("b") and not t.ready("a")
    assert t.take("a") == ([1, 2], b"cells") and t.stats["read_ahead"] == 0   # read again


def test_spills_queued_for_the_disk_are_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tiers, "MAX_WRITING", 3 * len(tiers.encode([1], b"x" * 100)))
    t = tier(tmp_path, limit=10**6)
    for i in range(10):
        t.put(f"k{i}", [1], b"x" * 100)
        assert t.writing_bytes <= tiers.MAX_WRITING
    t.flush()
    assert len(list((tmp_path / "kv").iterdir())) == 10


def test_a_file_that_cannot_be_written_is_a_miss_not_an_error(tmp_path: Path) -> None:
    t = tier(tmp_path)
    (tmp_path / "kv").write_text("a file where the directory should be")
    assert t.put("a", [1], b"x")         # queued: the write fails on the tier's thread
    assert t.take("a") is None and t.stats["corrupt_seqs"] == 0


def test_a_new_core_starts_with_an_empty_tier(tmp_path: Path) -> None:
    old = tier(tmp_path)
    old.put("a", [1], b"x")
    old.flush()
    assert len(tier(tmp_path)) == 0 and not (tmp_path / "kv").exists()
