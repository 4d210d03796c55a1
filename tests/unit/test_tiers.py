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
    [path] = (tmp_path / "kv").iterdir()
    assert path.suffix == ".kv" and path.stat().st_mode & 0o777 == 0o600
    assert t.take("agent-1") == ([1, 2, 300000], b"cells" * 10)
    assert t.take("agent-1") is None and not list((tmp_path / "kv").iterdir())
    assert t.stats["spilled_seqs"] == 1


def test_a_flipped_byte_is_refused_and_counted(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put("a", list(range(50)), bytes(range(256)))
    [path] = (tmp_path / "kv").iterdir()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    assert t.take("a") is None
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


def test_a_new_core_starts_with_an_empty_tier(tmp_path: Path) -> None:
    tier(tmp_path).put("a", [1], b"x")
    assert len(tier(tmp_path)) == 0 and not (tmp_path / "kv").exists()
