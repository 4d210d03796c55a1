"""The memory, storage and tool managers and the access manager, on a real
daemon."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from libaios import errors
from libaios.protocol import MsgType

from ..conftest import Daemon, daemon_with, in_thread, pending_approval

pytestmark = pytest.mark.integration

MCP_SERVER = Path(__file__).resolve().parent.parent / "tools" / "mcp_server.py"


def proc_pid(d: Daemon, name: str) -> int:
    return next(p["pid"] for p in d.status()["procs"] if p["name"] == name)


def restarted(d: Daemon, name: str, old_pid: int) -> None:
    d.wait_for(lambda s: s["ready"] and proc_pid(d, name) not in (old_pid, None),
               what=f"{name} to be restarted")


# -- memory ------------------------------------------------------------------------


def test_250_agents_write_past_the_budget_and_read_everything_back(make_daemon) -> None:
    budget = 64 * 1024
    d: Daemon = make_daemon(config={"memory": {"budget_bytes": budget}})
    written: dict[str, list[tuple[str, str]]] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def agent(i: int) -> None:
        try:
            with d.client(name=f"agent{i:03d}", timeout=300) as c:
                mine = []
                for j in range(4):
                    text = (f"Conversation of agent {i}, turn {j}: the user asked about topic "
                            f"{(i * 7 + j) % 13} and the assistant answered at length. " * 4)
                    item = c.memory.add(text, {"turn": j})
                    mine.append((item["id"], text))
                with lock:
                    written[f"agent{i:03d}"] = mine
        except BaseException as exc:  # collected and reported below
            failures.append(exc)

    # 250 agents, each its own connection and identity, 25 at a time
    for start in range(0, 250, 25):
        threads = [threading.Thread(target=agent, args=(i,)) for i in range(start, start + 25)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not failures, failures[:3]
    assert len(written) == 250
    with d.client(operator=True) as op:
        stats = op.call(MsgType.MEMORY_STATS, {"agent": "*"})
    raw = sum(len(t.encode()) for items in written.values() for _, t in items)
    assert raw > budget  # the agents wrote well past the budget ...
    assert stats["usage_bytes"] <= budget  # ... and usage stayed under it
    assert stats["evictions"] > 0
    # every item reads back exactly, faulted in from storage where evicted
    for name, items in written.items():
        with d.client(name=name) as c:
            for item_id, text in items:
                assert c.memory.get(item_id)["text"] == text
    with d.client(operator=True) as op:
        after = op.call(MsgType.MEMORY_STATS, {"agent": "*"})
    assert after["faults"] > 0
    assert after["usage_bytes"] <= budget


def test_memory_search_and_filters(daemon: Daemon) -> None:
    with daemon.client(name="searcher") as c:
        c.memory.add("The cat sat on the mat.", {"kind": "note"})
        c.memory.add("Dogs chase cats in the garden.", {"kind": "note"})
        c.memory.add("Quarterly revenue grew by ten percent.", {"kind": "report"})
        hits = c.memory.search("cat mat")
        assert hits[0]["text"] == "The cat sat on the mat."
        reports = c.memory.search("revenue", filters={"kind": "report"})
        assert [h["text"] for h in reports] == ["Quarterly revenue grew by ten percent."]
        assert c.memory.search("revenue", filters={"kind": "note"}) == []


def test_memory_survives_kill_9_of_its_worker(make_daemon) -> None:
    d: Daemon = make_daemon()
    with d.client(name="keeper") as c:
        item = c.memory.add("remember the milk", {"prio": 1})
        pid = proc_pid(d, "memory")
        os.kill(pid, signal.SIGKILL)
        restarted(d, "memory", pid)
        again = c.memory.get(item["id"])
    assert again["text"] == "remember the milk"
    assert again["metadata"] == {"prio": 1}


# -- storage ---------------------------------------------------------------------


def test_storage_survives_kill_9_of_its_worker(make_daemon) -> None:
    d: Daemon = make_daemon()
    with d.client(name="saver") as c:
        c.storage.put("k", {"v": 1})
        c.storage.write_file("notes/today.txt", b"hello")
        pid = proc_pid(d, "storage")
        os.kill(pid, signal.SIGKILL)
        restarted(d, "storage", pid)
        assert c.storage.get("k") == {"v": 1}
        assert c.storage.read_file("notes/today.txt") == b"hello"
    data = Path(d.env["AIOS_DATA_DIR"]) / "storage"
    for path in data.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, path


def test_storage_quota(make_daemon) -> None:
    d: Daemon = make_daemon(config={"storage": {"quota_bytes": 4096}})
    with d.client(name="hoarder") as c:
        c.storage.put("a", "x" * 1000)
        with pytest.raises(errors.QuotaExceeded):
            c.storage.put("b", "x" * 5000)
        assert [k["key"] for k in c.storage.list()] == ["a"]


# -- access ----------------------------------------------------------------------

GROUPS = {"access": {"groups": [
    {"name": "team", "members": ["alice", "bob"], "access": "write"},
    {"name": "readers", "members": ["alice", "rita"], "access": "read"},
    {"name": "trusted", "members": ["tess"], "preapprove": ["storage.overwrite", "storage.delete"]},
], "approval_timeout": 3.0}}


@pytest.fixture(scope="module")
def grouped() -> Any:
    with daemon_with(GROUPS) as d:
        yield d


def test_cross_agent_access_follows_the_groups(grouped: Daemon) -> None:
    with grouped.client(name="alice") as alice:
        alice.storage.put("plan", "alice's plan")
        memo = alice.memory.add("alice's memo")
    with grouped.client(name="bob") as bob:  # same write group
        assert bob.storage.get("plan", agent="alice") == "alice's plan"
        assert bob.memory.get(memo["id"], agent="alice")["text"] == "alice's memo"
        bob.storage.put("from-bob", "hi", agent="alice")
    with grouped.client(name="rita") as rita:  # read group: reads only
        assert rita.storage.get("plan", agent="alice") == "alice's plan"
        with pytest.raises(errors.PermissionDenied, match="may not write"):
            rita.storage.put("x", 1, agent="alice")
    with grouped.client(name="carol") as carol:  # no group
        with pytest.raises(errors.PermissionDenied, match="may not read"):
            carol.storage.get("plan", agent="alice")
        with pytest.raises(errors.PermissionDenied):
            carol.memory.search("memo", agent="alice")
        # an agent cannot make kernel-internal calls to get around it
        with pytest.raises(errors.PermissionDenied):
            carol.call(MsgType.BLOCK_GET, {"block_id": memo["id"], "as_namespace": "alice"})
    records = grouped.ctl("audit", "--json", "--limit", "500")
    assert records.returncode == 0, records.stderr
    assert '"access.denied"' in records.stdout


def test_overwrite_waits_for_approval_and_runs_when_granted(grouped: Daemon) -> None:
    with grouped.client(name="dave") as dave:
        dave.storage.put("doc", "v1")
        t, out = in_thread(lambda: dave.storage.put("doc", "v2", timeout=60))
        pending = pending_approval(grouped, timeout=30)
        assert pending["op"] == "storage.overwrite" and pending["name"] == "dave"
        assert grouped.ctl("approve", pending["id"]).returncode == 0
        t.join(60)
        assert "value" in out, out
        assert dave.storage.get("doc") == "v2"
        assert [v["version"] for v in dave.storage.versions("doc")][:2] == [2, 1]


def test_delete_denied_by_the_operator(grouped: Daemon) -> None:
    with grouped.client(name="erin") as erin:
        erin.storage.put("keep", "me")
        t, out = in_thread(lambda: erin.storage.delete("keep", timeout=60))
        pending = pending_approval(grouped, timeout=30)
        assert pending["op"] == "storage.delete"
        listing = grouped.ctl("approvals")
        assert pending["id"] in listing.stdout
        decided = grouped.ctl("deny", pending["id"], "--json")
        assert decided.returncode == 0
        assert json.loads(decided.stdout) == {"id": pending["id"], "approved": False}
        t.join(60)
        assert isinstance(out.get("error"), errors.PermissionDenied)
        assert erin.storage.get("keep") == "me"


def test_memory_update_waits_for_approval_and_a_denied_one_changes_nothing(grouped: Daemon) -> None:
    with grouped.client(name="erin") as erin:
        item = erin.memory.add("the meeting is on Monday")
        for decision in ("deny", "approve"):
            t, out = in_thread(lambda: erin.memory.update(item["id"], text="on Friday",
                                                           timeout=60))
            pending = pending_approval(grouped, timeout=30)
            assert pending["op"] == "memory.update" and pending["name"] == "erin"
            assert grouped.ctl(decision, pending["id"]).returncode == 0
            t.join(60)
            if decision == "deny":
                assert isinstance(out.get("error"), errors.PermissionDenied), out
                assert erin.memory.get(item["id"])["text"] == "the meeting is on Monday"
        assert "value" in out, out
        assert erin.memory.get(item["id"])["text"] == "on Friday"


def test_approval_times_out_as_denied(grouped: Daemon) -> None:
    with grouped.client(name="fred") as fred:
        fred.storage.put("x", 1)
        with pytest.raises(errors.PermissionDenied, match="timeout"):
            fred.storage.delete("x", timeout=60)  # access.approval_timeout is 3 s
        assert fred.storage.get("x") == 1


def test_preapproved_group_needs_no_decision(grouped: Daemon) -> None:
    with grouped.client(name="tess") as tess:
        tess.storage.put("y", 1)
        tess.storage.put("y", 2)
        tess.storage.delete("y")
        with pytest.raises(errors.NotFound):
            tess.storage.get("y")
    # the decision was not asked of a person, but it is in the audit log
    records = json.loads(grouped.ctl("audit", "--json", "--limit", "500").stdout)
    assert any(r["event"] == "access.preapproved" and r["name"] == "tess"
               and r["call"] == "storage.delete" for r in records), records


# -- tools -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tooled() -> Any:
    config = {"tools": {
        "limits": [{"name": "python", "concurrency": 1, "timeout": 20.0}],
        "mcp": [{"name": "demo", "command": [sys.executable, str(MCP_SERVER)]}],
        "sandbox": {"wall_seconds": 15.0},
    }}
    with daemon_with(config) as d:
        yield d


def test_tool_list_is_openai_style_and_usable_in_chat(tooled: Daemon) -> None:
    with tooled.client(name="user") as c:
        tools = c.tools.list()
        names = {t["function"]["name"] for t in tools}
        assert {"calculator", "python", "read_file", "write_file"} <= names
        calc = next(t for t in tools if t["function"]["name"] == "calculator")
        reply = c.chat("What is 6 times 7?", tools=[calc], tool_choice="required", max_tokens=40)
        assert reply.tool_calls[0]["function"]["name"] == "calculator"


def test_tool_argument_errors_name_the_field_and_rule(tooled: Daemon) -> None:
    with tooled.client(name="user") as c:
        assert c.tools.call("calculator", {"expression": "6*7"}) in (42, 42.0, {"value": 42})
        with pytest.raises(errors.InvalidArgument, match="expression") as info:
            c.tools.call("calculator", {"expression": 5})
        assert "type" in info.value.message
        with pytest.raises(errors.InvalidArgument, match="required"):
            c.tools.call("calculator", {})
        with pytest.raises(errors.NotFound):
            c.tools.call("no_such_tool", {})


def test_tool_timeout(tooled: Daemon) -> None:
    with tooled.client(name="user") as c:
        result = c.tools.call("python", {"code": "import time\ntime.sleep(60)"}, timeout=60)
    assert result["timed_out"] is True


#: Python that runs until the test lets it go: until a file ``go`` appears
#: in its scratch directory (its working directory).
HELD_PYTHON = "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.01)\nprint('let go')"


def let_python_go(d: Daemon, *threads: threading.Thread, timeout: float = 60) -> None:
    """Let every python sandbox of ``d``'s tool worker go, and those that
    start after them, until ``threads`` (their callers) have ended."""
    end = time.monotonic() + timeout
    while any(t.is_alive() for t in threads):
        assert time.monotonic() < end, "the python calls did not end"
        try:
            boxes = psutil.Process(proc_pid(d, "tools")).children()
        except psutil.Error:
            boxes = []
        for box in boxes:
            try:
                scratch = Path(box.cwd())
                if scratch.name.startswith("aios-sandbox-"):
                    (scratch / "go").touch()
            except (psutil.Error, OSError):
                pass   # (gone meanwhile)
        for t in threads:
            t.join(0.05)


def test_saturated_slow_tool_does_not_block_other_calls(tooled: Daemon) -> None:
    # python's concurrency is 1: a second python call must wait, but the
    # calculator calls queued behind it run meanwhile (the python calls run
    # until the test lets them go)
    slow = HELD_PYTHON
    t1, out1 = in_thread(lambda: tooled.client(name="slow1").tools.call("python", {"code": slow}))
    tooled.wait_for(lambda s: s["tools_running"].get("python") == 1, what="python to run")
    t2, out2 = in_thread(lambda: tooled.client(name="slow2").tools.call("python", {"code": slow}))
    tooled.wait_for(lambda s: s["queues"]["tool"] == 1, what="the second python call to queue")
    with tooled.client(name="quick") as c:
        for i in range(5):
            assert c.tools.call("calculator", {"expression": f"{i}+1"}) is not None
            # the calculator ran while the first python call still runs (one at a
            # time) and the second still waits for it
            status = tooled.status()
            assert status["tools_running"].get("python") == 1 and status["queues"]["tool"] == 1
            assert "value" not in out1 and "value" not in out2
    let_python_go(tooled, t1, t2)
    assert "value" in out1 and "value" in out2, (out1, out2)
    assert out1["value"]["stdout"] == "let go\n" and out2["value"]["stdout"] == "let go\n"


def test_mcp_tool_listed_and_called(tooled: Daemon) -> None:
    with tooled.client(name="user") as c:
        names = {t["function"]["name"] for t in c.tools.list()}
        mcp_names = [n for n in names if n.startswith("demo")]
        assert mcp_names, names
        add = next(n for n in mcp_names if n.endswith("add"))
        result = c.tools.call(add, {"a": 2, "b": 3})
    assert "5" in str(result)


def test_mcp_server_dies_with_a_killed_tool_worker(make_daemon) -> None:
    # The server is hung in a call when its worker is killed, so it reads no
    # end of file on its stdin: only the parent-death signal ends it.
    d: Daemon = make_daemon(config={"tools": {"mcp": [
        {"name": "demo", "command": [sys.executable, str(MCP_SERVER)], "timeout": 120.0}]}})
    worker = proc_pid(d, "tools")
    (server,) = [p for p in psutil.Process(worker).children()
                 if any("mcp_server.py" in part for part in p.cmdline())]
    mark = d.root / "frozen"
    t, out = in_thread(lambda: d.client(name="freezer").tools.call(
        "demo__freeze", {"seconds": 90, "mark": str(mark)}, timeout=120))
    end = time.monotonic() + 60
    while not mark.exists():
        assert time.monotonic() < end, "the server never began the call"
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    gone, alive = psutil.wait_procs([server], timeout=10)
    assert gone, "the MCP server outlived its killed worker"
    t.join(60)
    assert isinstance(out.get("error"), errors.AIOSError), out
    restarted(d, "tools", worker)
    with d.client(name="user") as c:
        assert "5" in str(c.tools.call("demo__add", {"a": 2, "b": 3}))


def test_file_tools_use_the_callers_own_storage(tooled: Daemon) -> None:
    with tooled.client(name="writer") as c:
        names = {t["function"]["name"] for t in c.tools.list()}
        assert "write_file" in names
        c.tools.call("write_file", {"path": "out/a.txt", "content": "tool wrote this"})
        assert c.storage.read_file("out/a.txt") == b"tool wrote this"
    with tooled.client(name="other") as other:
        with pytest.raises(errors.NotFound):
            other.storage.read_file("out/a.txt")
