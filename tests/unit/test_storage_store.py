"""The LMDB store: versions, approvals, quotas, growth, durability."""

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aiosd.storage.store import Store
from libaios.errors import ApprovalRequired, InvalidArgument, NotFound, QuotaExceeded


def store(tmp_path: Path, **kw: int) -> Store:
    return Store(tmp_path / "db", kw.get("map_size", 1 << 20), kw.get("quota", 1 << 20),
                 kw.get("versions", 3))


def test_versions_overwrite_approval_and_rollback(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.put("a", "k", {"v": 1}) == {"key": "k", "version": 1}
    with pytest.raises(ApprovalRequired) as info:
        s.put("a", "k", 2)
    assert info.value.details["op"] == "storage.overwrite"
    for v in range(2, 6):
        s.put("a", "k", v, approved=True)
    assert [v["version"] for v in s.versions("a", "key", "k")["versions"]] == [5, 4, 3]
    assert s.get("a", "k", version=3)["value"] == 3
    with pytest.raises(NotFound):
        s.get("a", "k", version=1)  # pruned: at most 3 versions
    with pytest.raises(ApprovalRequired):
        s.rollback("a", "key", "k", 3)
    assert s.rollback("a", "key", "k", 3, approved=True)["version"] == 6
    assert s.get("a", "k")["value"] == 3
    with pytest.raises(ApprovalRequired):
        s.delete("a", "key", "k")
    s.delete("a", "key", "k", approved=True)
    with pytest.raises(NotFound):
        s.get("a", "k")
    assert s.stats("a")["bytes"] == 0


def test_destructive_calls_are_checked_before_approval_and_name_what_they_act_on(
        tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put("a", "k", 1)
    s.put("a", "k", 2, approved=True)
    # wrong arguments and missing things are refused as such, unapproved or not
    for version in ("a", 0, True, None):
        with pytest.raises(InvalidArgument, match="'version'"):
            s.rollback("a", "key", "k", version)
    with pytest.raises(NotFound, match="version 9"):
        s.rollback("a", "key", "k", 9)
    with pytest.raises(NotFound):
        s.rollback("a", "key", "missing", 1)
    with pytest.raises(NotFound, match="missing"):
        s.delete("a", "key", "missing")
    with pytest.raises(NotFound):
        s.delete("a", "file", "no/such/file")
    # a valid one is refused for approval, naming the real values
    with pytest.raises(ApprovalRequired) as info:
        s.rollback("a", "key", "k", 1)
    assert info.value.details == {"op": "storage.rollback", "key": "k", "to_version": 1,
                                  "current_version": 2}
    with pytest.raises(ApprovalRequired) as info:
        s.delete("a", "key", "k")
    assert info.value.details == {"op": "storage.delete", "key": "k", "versions": 2}
    with pytest.raises(ApprovalRequired) as info:
        s.put("a", "k", 3)
    assert info.value.details == {"op": "storage.overwrite", "key": "k", "current_version": 2}
    s.write_file("a", "f.txt", b"x")
    with pytest.raises(ApprovalRequired) as info:
        s.write_file("a", "f.txt", b"y")
    assert info.value.details == {"op": "storage.overwrite", "file": "f.txt",
                                  "current_version": 1}
    assert s.get("a", "k")["value"] == 2 and s.read_file("a", "f.txt")["data"] == b"x"


def test_namespaces_files_and_paths(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.write_file("a", "docs/x.txt", b"x")
    s.write_file("a", "docs/sub/y.txt", b"y")
    assert s.read_file("a", "./docs//x.txt")["data"] == b"x"
    assert [e["name"] for e in s.list_dir("a", "docs")["entries"]] == ["sub", "x.txt"]
    with pytest.raises(NotFound):
        s.read_file("b", "docs/x.txt")
    for bad in ("/etc/passwd", "../x", "a/../../x", "", "a\x00b"):
        with pytest.raises(InvalidArgument):
            s.write_file("a", bad, b"")
    with pytest.raises(InvalidArgument, match="bytes"):
        s.write_file("a", "f", "text")


@pytest.mark.parametrize("name", ["...", "..foo", "foo..", "docs/...", "docs/..x/y", ".../z"])
def test_names_that_begin_with_dots_are_ordinary_names(tmp_path: Path, name: str) -> None:
    s = store(tmp_path)
    assert s.write_file("a", name, b"dots")["path"] == name
    assert s.read_file("a", name)["data"] == b"dots"


@pytest.mark.parametrize("path", ["..", "../x", "./..", "a/../..", "a/./../../b", "docs/../../x",
                                  "/x", "/"])
def test_a_dotdot_component_or_an_absolute_path_is_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(InvalidArgument, match="leaves|relative"):
        store(tmp_path).write_file("a", path, b"")


def test_quota_is_exact_and_a_refused_write_changes_nothing(tmp_path: Path) -> None:
    s = store(tmp_path, quota=2000)
    s.put("a", "k", "x" * 1000)
    used = s.stats("a")["bytes"]
    with pytest.raises(QuotaExceeded, match="quota"):
        s.put("a", "big", "x" * 5000)
    assert s.stats("a")["bytes"] == used and [k["key"] for k in s.list("a")["keys"]] == ["k"]


def test_the_map_grows_when_full_and_files_are_private(tmp_path: Path) -> None:
    s = store(tmp_path, map_size=64 * 1024, quota=1 << 30)
    for i in range(300):
        s.put("a", f"k{i}", "y" * 1000)
    assert s.stats(None)["map_size"] > 64 * 1024
    assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o700
    for f in (tmp_path / "db").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0


def test_the_map_grows_while_another_thread_reads(tmp_path: Path) -> None:
    # LMDB remaps the file when the map grows: a transaction open in another
    # thread (the storage worker serves calls on several) would be left
    # reading the old mapping. Growth waits until no transaction is open.
    s = store(tmp_path, map_size=64 * 1024, quota=1 << 30)
    s.put("a", "k", "x")
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def hold(txn: object) -> None:
        inside.set()
        release.wait(10)
        seen.append(s.env.info()["map_size"])  # the map did not move under this reader

    reader = threading.Thread(target=s._read, args=(hold,))
    reader.start()
    assert inside.wait(10)
    threading.Timer(1.0, release.set).start()
    for i in range(300):  # past the map's size while the reader holds it
        s.put("a", f"k{i}", "y" * 1000)
    reader.join(10)
    assert seen == [64 * 1024]
    assert s.stats(None)["map_size"] > 64 * 1024
    assert s.get("a", "k299")["value"] == "y" * 1000


def test_blocks_and_audit(tmp_path: Path) -> None:
    s = store(tmp_path)
    for i in range(5):
        s.block_put(f"n{i % 2}", f"b{i}", bytes([i]))
    page = s.block_scan(limit=3)
    rest = s.block_scan(after=page["next"], limit=10)
    assert len(page["blocks"]) == 3 and len(rest["blocks"]) == 2 and rest["next"] is None
    assert s.block_get("n1", "b1")["data"] == b"\x01"
    s.block_delete("n1", "b1")
    with pytest.raises(NotFound):
        s.block_get("n1", "b1")
    assert s.audit_append({"event": "e", "agent": "x"})["seq"] == 1
    s.audit_append({"event": "f", "agent": "y"})
    assert [r["event"] for r in s.audit_list(agent="y")["records"]] == ["f"]
    assert [r["seq"] for r in s.audit_list(after=1)["records"]] == [2]


def test_a_page_of_blocks_stays_under_the_message_limit(tmp_path: Path) -> None:
    from aiosd.storage.store import SCAN_PAGE_BYTES

    s = store(tmp_path, map_size=1 << 26, quota=1 << 26)
    big = SCAN_PAGE_BYTES // 2 + 1
    for i in range(3):
        s.block_put("n", f"b{i}", bytes(big))
    s.block_put("n", "b3", b"small")
    pages, after = [], None
    while True:
        page = s.block_scan(after=after, limit=1000)
        pages.append([b["id"] for b in page["blocks"]])
        after = page["next"]
        if after is None:
            break
    assert pages == [["b0"], ["b1"], ["b2", "b3"]]   # every block, none twice


def test_memory_items_count_against_the_quota(tmp_path: Path) -> None:
    s = store(tmp_path, quota=1000)
    s.put("n", "k", b"x" * 400)
    used = s.stats("n")["bytes"]
    s.block_put("n", "b1", b"y" * 300)
    assert s.stats("n")["bytes"] == used + 300
    with pytest.raises(QuotaExceeded, match="memory item"):
        s.block_put("n", "b2", b"z" * 600)
    s.block_put("n", "b1", b"y" * 100)          # smaller in place: charged the difference
    assert s.stats("n")["bytes"] == used + 100
    s.block_delete("n", "b1")
    s.block_delete("n", "b1")                   # gone already: nothing to give back
    assert s.stats("n")["bytes"] == used
    with pytest.raises(NotFound):
        s.block_get("n", "b2")                  # the refused write left nothing


def test_a_name_too_long_for_the_store_is_refused_by_name(tmp_path: Path) -> None:
    s = store(tmp_path)
    with pytest.raises(InvalidArgument, match="in UTF-8"):
        s.put("n", "k" * 600, b"v")
    with pytest.raises(InvalidArgument, match="path"):
        s.write_file("n", "é" * 300, b"v")
    assert s.stats("n")["keys"] == 0 and s.stats("n")["files"] == 0


def test_an_acknowledged_write_survives_kill_9(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from aiosd.storage.store import Store; "
            "s = Store(Path(sys.argv[1]), 1 << 20, 1 << 20, 3); s.put('a', 'k', 'kept'); "
            "print('done', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "db")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert store(tmp_path).get("a", "k")["value"] == "kept"
