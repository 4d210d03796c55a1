"""The memory manager's pure parts: trie, K-LRU, BM25, and the manager on a
fake store."""

from collections.abc import Iterator

import pytest

from aiosd.memory.bm25 import BM25Index
from aiosd.memory.klru import KLRUReplacer
from aiosd.memory.manager import ITEM_OVERHEAD, PREVIEW, MemoryManager, preview
from aiosd.memory.trie import Trie
from libaios.errors import ApprovalRequired, InvalidArgument, NotFound


def test_trie_shares_prefixes_and_handles_survive_splits_and_merges() -> None:
    t = Trie()
    a = t.insert("hello world")
    b = t.insert("hello there")
    c = t.insert("hello")
    assert [t.get(h) for h in (a, b, c)] == ["hello world", "hello there", "hello"]
    assert t.raw_bytes == 27 and t.stored_bytes == len("hello ") + len("world") + len("there")
    t.remove(c)
    t.remove(b)
    assert t.get(a) == "hello world" and t.stored_bytes == 11 and t.raw_bytes == 11
    d = t.insert("hello world")  # a duplicate shares the node
    assert d is a and t.stored_bytes == 11
    t.remove(a)
    t.remove(d)
    assert t.stored_bytes == 0 and t.raw_bytes == 0
    with pytest.raises(KeyError):
        t.remove(d)


def test_klru_prefers_blocks_seen_fewer_than_k_times() -> None:
    r = KLRUReplacer(k=2)
    r.access("hot", 1)
    r.access("hot", 2)
    r.access("scan1", 3)
    r.access("scan2", 4)
    assert r.evict() == "scan1" and r.evict() == "scan2" and r.evict() == "hot"
    lru = KLRUReplacer(k=1)
    for t, b in enumerate("abca"):
        lru.access(b, t)
    assert lru.victim() == "b"
    lru.pin("b")
    assert lru.victim() == "c"


def test_bm25_ranks_and_filters() -> None:
    idx = BM25Index()
    idx.add(1, "the cat sat on the mat")
    idx.add(2, "dogs chase cats")
    idx.add(3, "revenue grew")
    assert [d for d, _ in idx.search("cat mat")][0] == 1
    assert idx.search("revenue", candidates=[1, 2]) == []
    idx.remove(3)
    assert idx.search("revenue") == []


class FakeStore:
    def __init__(self) -> None:
        self.blocks: dict[tuple[str, str], bytes] = {}
        self.reads = 0

    def put(self, ns: str, block_id: str, data: bytes) -> None:
        self.blocks[(ns, block_id)] = data

    def get(self, ns: str, block_id: str) -> bytes:
        self.reads += 1
        return self.blocks[(ns, block_id)]

    def delete(self, ns: str, block_id: str) -> None:
        self.blocks.pop((ns, block_id), None)

    def scan(self) -> Iterator[tuple[str, str, bytes]]:
        for (ns, bid), data in list(self.blocks.items()):
            yield ns, bid, data


def clock() -> Iterator[float]:
    t = 0.0
    while True:
        t += 1.0
        yield t


def manager(store: FakeStore, budget: int = 4096) -> MemoryManager:
    ticks = clock()
    return MemoryManager(store, budget, k=2, clock=lambda: next(ticks))


def test_usage_stays_under_the_budget_and_everything_reads_back() -> None:
    store = FakeStore()
    m = manager(store)
    written = []
    for i in range(200):
        text = f"agent note {i}: " + "lorem ipsum dolor sit amet " * 3
        written.append((f"ns{i % 7}", m.add(f"ns{i % 7}", text, {"i": i})["id"], text))
        assert m.usage <= m.budget
    assert m.evictions > 0
    for ns, item_id, text in written:
        assert m.get(ns, item_id)["text"] == text
        assert m.usage <= m.budget
    assert m.faults > 0
    stats = m.stats()
    assert stats["items"] == 200 and stats["usage_bytes"] <= 4096


def test_search_list_update_delete_and_errors() -> None:
    m = manager(FakeStore(), budget=1 << 20)
    a = m.add("x", "the cat sat on the mat", {"kind": "note"})
    m.add("x", "quarterly revenue grew", {"kind": "report"})
    assert m.search("x", "cat")[0]["id"] == a["id"]
    assert [i["text"] for i in m.search("x", "revenue", {"kind": "note"})] == []
    assert [i["metadata"]["kind"] for i in m.list("x")] == ["report", "note"]
    assert m.update("x", a["id"], text="the dog sat", approved=True)["text"] == "the dog sat"
    assert m.search("x", "dog")[0]["id"] == a["id"]
    m.delete("x", a["id"], approved=True)
    with pytest.raises(NotFound, match=a["id"]):
        m.get("x", a["id"])
    with pytest.raises(InvalidArgument, match="text"):
        m.add("x", "")
    with pytest.raises(InvalidArgument, match="metadata.bad"):
        m.add("x", "t", {"bad": [1]})
    assert m.list("nobody") == [] and m.search("nobody", "x") == []


def test_delete_and_update_check_first_then_ask_naming_the_item() -> None:
    m = manager(FakeStore(), budget=1 << 20)
    text = "the meeting is on Monday at ten, in the small room by the stairs, with everyone " * 2
    item = m.add("x", text)
    for missing in ("5", 5, None):
        with pytest.raises(NotFound, match="no item"):
            m.delete("x", missing)
        with pytest.raises(NotFound, match="no item"):
            m.update("x", missing, text="new")
    with pytest.raises(InvalidArgument, match="'text'"):
        m.update("x", item["id"], text=7)
    with pytest.raises(InvalidArgument, match="metadata"):
        m.update("x", item["id"], metadata=[1])
    with pytest.raises(ApprovalRequired) as info:
        m.delete("x", item["id"])
    assert info.value.details == {"op": "memory.delete", "id": item["id"], "text": preview(text)}
    assert preview(text).startswith("the meeting is on Monday") and len(preview(text)) == PREVIEW
    with pytest.raises(ApprovalRequired) as info:
        m.update("x", item["id"], text="on Friday")
    assert info.value.details == {"op": "memory.update", "id": item["id"], "text": preview(text),
                                  "new_text": "on Friday"}
    with pytest.raises(ApprovalRequired) as info:
        m.update("x", item["id"], metadata={"day": "Friday"})
    assert info.value.details["new_metadata"] == {"day": "Friday"}
    assert "new_text" not in info.value.details
    assert m.get("x", item["id"])["text"] == text   # nothing changed
    assert m.delete("x", item["id"], approved=True) == {"deleted": item["id"]}


def test_preview_is_one_short_line() -> None:
    assert preview("a\n  b\tc") == "a b c"
    assert preview("word " * 10, limit=12) == "word word w…"


def test_filters_match_like_types_and_only_present_keys() -> None:
    m = manager(FakeStore(), budget=1 << 20)
    flag = m.add("x", "a flag", {"f": True})["id"]
    one = m.add("x", "a one", {"f": 1})["id"]
    m.add("x", "no f at all")
    assert [i["id"] for i in m.list("x", {"f": True})] == [flag]
    assert [i["id"] for i in m.list("x", {"f": 1.0})] == [one]
    with pytest.raises(InvalidArgument, match="filters.f"):
        m.list("x", {"f": [1]})


def test_an_update_that_fails_leaves_nothing_in_ram_untracked() -> None:
    store = FakeStore()
    m = manager(store, budget=2048)
    ids = [m.add("x", f"note {i} " + "word " * 60)["id"] for i in range(40)]
    assert m.evictions > 0
    evicted = next(i for i in ids if m._space("x").items[i].handle is None)
    with pytest.raises(InvalidArgument):   # bad metadata: refused before the text is read
        m.update("x", evicted, metadata={"bad": [1]}, approved=True)
    assert m._space("x").items[evicted].handle is None

    def failing_put(ns: str, block_id: str, data: bytes) -> None:
        raise OSError("storage is gone")

    store.put = failing_put
    with pytest.raises(OSError):
        m.update("x", evicted, metadata={"ok": 1}, approved=True)   # the text is read in, the write fails
    del store.put
    for i in ids:   # the budget holds: what was read in can be evicted again
        m.get("x", i)
        assert m.usage <= m.budget


def test_prefix_compression_and_a_restart_from_the_store() -> None:
    store = FakeStore()
    m = manager(store, budget=1 << 20)
    system = "You are a helpful assistant. " * 10
    ids = [m.add("a", system + f"Question {i}?")["id"] for i in range(5)]
    stats = m.stats("a")
    assert stats["stored_bytes"] < stats["raw_bytes"] / 3
    assert stats["usage_bytes"] == stats["stored_bytes"] + 5 * ITEM_OVERHEAD
    again = manager(store, budget=1 << 20)
    assert again.load() == 5
    assert [again.get("a", i)["text"] for i in ids] == [system + f"Question {i}?" for i in range(5)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_klru_victim_follows_its_rule_through_accesses_pins_and_removals(k: int) -> None:
    """Against the rule itself, worked out over every block: fewer than K
    accesses first, then the earliest K-th most recent access."""
    import random

    rng = random.Random(k)
    r = KLRUReplacer(k=k)
    history: dict[int, list[float]] = {}
    pinned: set[int] = set()
    for now in range(1, 3000):
        block = rng.randrange(60)
        op = rng.random()
        if op < 0.7:
            r.access(block, float(now))
            history.setdefault(block, []).append(float(now))
        elif op < 0.8:
            r.pin(block)
            pinned.add(block)
        elif op < 0.9:
            r.unpin(block)
            pinned.discard(block)
        else:
            r.remove(block)
            history.pop(block, None)
            pinned.discard(block)
        places = sorted((0 if len(h) < k else 1, h[-k] if len(h) >= k else h[0], b)
                        for b, h in history.items() if b not in pinned)
        assert r.victim() == (places[0][2] if places else None)
        if now % 50 == 0 and places:
            assert r.evict() == places[0][2]
            history.pop(places[0][2])
