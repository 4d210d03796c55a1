"""What the README and docs/ say a user can do, each tried once against a
real daemon: agents are refused operators' calls, an agent launches
sub-agents under its own name, memory pages, aiosctl's mem stats and audit
answer; destructive tools (an MCP server's hint, or the config's flag) wait
for an operator, and nothing waits with access.require_approval off; a full
queue refuses with Overloaded; a call whose worker is lost more than
kernel.max_redispatch times fails; an agent that ignores SIGTERM does not
outlive the daemon; the runtime and data directories are found from the XDG
variables and the config from AIOS_CONFIG; file listings, old versions and
file rollback; snapshots of suspended calls spill to disk and are dropped
at their call's deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

import libaios
from libaios import errors
from libaios.protocol import MsgType

from ..conftest import (REPO, TEST_AGENTS, Daemon, in_thread, pending_approval, run_ctl,
                        wait_ready_or_fail)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mtype", [MsgType.ADMIN_APPROVE, MsgType.ADMIN_DENY])
def test_an_agent_cannot_decide_approvals(daemon: Daemon, mtype: MsgType) -> None:
    with daemon.client(name="would-be-operator") as c:
        with pytest.raises(errors.PermissionDenied, match="for operators"):
            c.call(mtype, {"id": "00000000"})


def test_an_agent_launches_sub_agents_under_its_own_name(daemon: Daemon) -> None:
    with daemon.client(name="parent") as c:
        info = c.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "exit_code.py"),
                                          "args": ["--task", "3"]})
        assert info["name"] == "parent.exit_code"
        with pytest.raises(errors.PermissionDenied, match="parent.NAME"):
            c.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "exit_code.py"),
                                       "name": "someone-else"})

    def ended(_: dict) -> bool:
        rows = [r for r in daemon.ps() if r["id"] == info["agent"]]
        return bool(rows) and rows[0]["state"] == "exited"

    daemon.wait_for(ended, what="the sub-agent to exit")
    row = next(r for r in daemon.ps() if r["id"] == info["agent"])
    assert row["exit_code"] == 3


def test_memory_pages_and_counts(daemon: Daemon) -> None:
    with daemon.client(name="pager") as c:
        ids = [c.memory.add(f"note number {n}")["id"] for n in range(5)]
        first = c.memory.list(limit=2, offset=0)
        rest = c.memory.list(limit=10, offset=2)
        seen = [item["id"] for item in first + rest]
        assert len(first) == 2 and sorted(seen) == sorted(ids)
        assert c.memory.stats()["items"] >= 5


def test_aiosctl_mem_stats_and_audit_by_agent(daemon: Daemon) -> None:
    with daemon.client(name="audited") as c:
        agent = c.call(MsgType.AGENT_WHOAMI)["agent"]
        with pytest.raises(errors.PermissionDenied):
            c.storage.get("k", agent="nobody-shares-with-audited")
    stats = daemon.ctl("mem", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert "budget_bytes" in json.loads(stats.stdout)

    def denial_logged(_: dict) -> bool:
        audit = daemon.ctl("audit", "--agent", agent, "--json")
        return audit.returncode == 0 and any(
            r["event"] == "access.denied" for r in json.loads(audit.stdout))

    daemon.wait_for(denial_logged, what="the denial in the audit log")


# -- destructive tools and approvals ---------------------------------------------------

HINTED = Path(__file__).resolve().parent.parent / "tools" / "hinted_mcp_server.py"

#: What a call that must not wait for an operator may take: long enough for a
#: busy machine, far shorter than access.approval_timeout (120 s), so that a
#: call held for approval fails (its deadline ends the wait: PermissionDenied).
QUICK = 20.0


def mcp(name: str, **extra: Any) -> dict[str, Any]:
    """tests/tools/hinted_mcp_server.py as the MCP server ``name``."""
    return {"name": name, "command": [sys.executable, str(HINTED)], **extra}


def tool_call(d: Daemon, name: str, tool: str, arguments: dict[str, Any],
              timeout: float = 120) -> Any:
    """A tool call made by agent ``name`` on a connection of its own."""
    with d.client(name=name) as c:
        return c.tools.call(tool, arguments, timeout=timeout)


def test_destructive_tools_wait_for_an_operator(make_daemon, short_tmp: Path) -> None:
    """An MCP tool the server marks destructive (destructiveHint), and any
    tool of a server the config flags destructive (whatever the server
    says), run only once an operator approves; a tool of an unflagged server
    that is not marked destructive runs at once."""
    d: Daemon = make_daemon(config={"tools": {"mcp": [mcp("hinted"),
                                                      mcp("flagged", destructive=True)]}})
    victim = short_tmp / "victim"
    victim.touch()
    with d.client(name="eraser") as c:
        flags = {t["function"]["name"]: t["aios"]["destructive"] for t in c.tools.list()}
    # peek says destructiveHint: false, which cannot take off the config's flag
    assert (flags["hinted__erase"], flags["hinted__peek"], flags["flagged__peek"]) == (
        True, False, True)
    assert tool_call(d, "eraser", "hinted__peek", {"path": str(victim)},
                     timeout=QUICK)["text"] == "present"
    for decision in ("deny", "approve"):
        t, out = in_thread(lambda: tool_call(d, "eraser", "hinted__erase", {"path": str(victim)}))
        pending = pending_approval(d, "eraser")
        assert pending["op"] == "tool:hinted__erase"
        assert victim.exists()   # nothing ran before the decision
        listing = d.ctl("approvals")
        assert listing.returncode == 0 and "tool:hinted__erase" in listing.stdout, listing
        assert d.ctl(decision, pending["id"]).returncode == 0
        t.join(120)
        if decision == "deny":
            assert isinstance(out.get("error"), errors.PermissionDenied), out
            assert victim.exists()
    assert out.get("value", {}).get("text") == "erased", out
    assert not victim.exists()
    t, out = in_thread(lambda: tool_call(d, "eraser", "flagged__peek", {"path": str(victim)}))
    pending = pending_approval(d, "eraser")
    assert pending["op"] == "tool:flagged__peek"
    assert d.ctl("approve", pending["id"]).returncode == 0
    t.join(120)
    assert out.get("value", {}).get("text") == "absent", out


def test_nothing_waits_for_approval_when_it_is_not_required(make_daemon,
                                                            short_tmp: Path) -> None:
    d: Daemon = make_daemon(config={"access": {"require_approval": False},
                                    "tools": {"mcp": [mcp("hinted")]}})
    victim = short_tmp / "victim"
    victim.touch()
    with d.client(name="unasked") as c:
        agent = c.whoami()["agent"]
        c.storage.put("doc", "v1")
        assert c.storage.put("doc", "v2", timeout=QUICK)["version"] == 2
        assert c.storage.rollback("doc", 1, timeout=QUICK)["restored"] == 1
        assert c.storage.get("doc") == "v1"
        c.storage.delete("doc", timeout=QUICK)
        with pytest.raises(errors.NotFound):
            c.storage.get("doc")
        item = c.memory.add("the meeting is on Monday")
        c.memory.update(item["id"], text="the meeting is on Tuesday", timeout=QUICK)
        c.memory.delete(item["id"], timeout=QUICK)
        assert c.tools.call("hinted__erase", {"path": str(victim)}, timeout=QUICK)["text"] == "erased"
    assert not victim.exists()
    audit = d.ctl("audit", "--json", "--agent", agent, "--limit", "1000")
    assert audit.returncode == 0, audit.stderr
    assert not [r for r in json.loads(audit.stdout) if r["event"] == "approval.requested"]


# -- the kernel's limits ---------------------------------------------------------------


def test_a_full_queue_refuses_calls_with_overloaded(make_daemon, short_tmp: Path) -> None:
    # hold runs until the test lets it go, one at a time: one runs, one
    # waits, and the queue (kernel.max_queue = 1) is full
    d: Daemon = make_daemon(config={"kernel": {"max_queue": 1},
                                    "tools": {"mcp": [mcp("hinted", concurrency=1)]}})
    release = short_tmp / "release"
    hold = {"release": str(release)}
    t1, out1 = in_thread(lambda: tool_call(d, "first", "hinted__hold", hold))
    d.wait_for(lambda s: s["tools_running"].get("hinted__hold") == 1, what="the first hold to run")
    t2, out2 = in_thread(lambda: tool_call(d, "second", "hinted__hold", hold))
    try:
        d.wait_for(lambda s: s["queues"]["tool"] == 1, what="the second hold to wait")
        with pytest.raises(errors.Overloaded, match="1 calls already wait for tool") as info:
            tool_call(d, "third", "hinted__peek", {"path": str(release)}, timeout=QUICK)
        assert info.value.retriable
    finally:
        release.touch()
        t1.join(120)
        t2.join(120)
    assert out1.get("value", {}).get("text") == "let go", out1
    assert out2.get("value", {}).get("text") == "let go", out2
    # the queue has room again
    assert tool_call(d, "third", "hinted__peek", {"path": str(release)})["text"] == "present"


def test_a_call_whose_core_dies_more_than_max_redispatch_times_fails(make_daemon) -> None:
    d: Daemon = make_daemon(config={"kernel": {"max_redispatch": 1}})
    first = d.core_pid()
    assert first is not None

    def chat() -> Any:
        with d.client(name="unlucky", timeout=300) as c:
            # long enough to be running still when its core is killed
            return c.chat("Tell a long story.", max_tokens=1500, min_tokens=1500)

    t, out = in_thread(chat)
    try:
        d.wait_for(lambda s: s["running"] == 1, what="the call to run")
        os.kill(first, signal.SIGKILL)
        # lost once: it runs again on the restarted core ...
        d.wait_for(lambda s: s["running"] == 1 and d.core_pid() not in (first, None),
                   what="the call to run again on the restarted core")
        second = d.core_pid()
        assert second is not None
        os.kill(second, signal.SIGKILL)
    finally:
        t.join(300)
    # ... lost twice: its caller is told, and may try again
    assert isinstance(out.get("error"), errors.WorkerLost), out
    assert out["error"].retriable
    d.wait_for(lambda s: s["ready"] and d.core_pid() not in (first, second, None)
               and s["running"] == 0, what="the core back, and the call not run a third time")


def runs_begun(mark: Path) -> int:
    return len(mark.read_text().splitlines()) if mark.exists() else 0


def tools_pid(status: dict[str, Any]) -> int | None:
    return next((p.get("pid") for p in status["procs"] if p["name"] == "tools"), None)


@pytest.mark.parametrize("tool,read_only", [
    ("hinted__hold", False),
    ("hinted__hold", True),             # the config says read-only: run again
    ("hinted__hold_read_only", False),  # only the server says so (readOnlyHint): not
])
def test_a_tool_call_runs_again_after_its_worker_dies_only_if_the_tool_is_read_only(
        make_daemon, short_tmp: Path, tool: str, read_only: bool) -> None:
    d: Daemon = make_daemon(config={"tools": {"mcp": [mcp("hinted", read_only=read_only)]}})
    mark, release = short_tmp / "runs", short_tmp / "release"
    t, out = in_thread(lambda: tool_call(d, "holder", tool,
                                         {"release": str(release), "mark": str(mark)}))
    try:
        d.wait_for(lambda _: runs_begun(mark) == 1, what="the tool call to begin")
        worker = tools_pid(d.status())
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        d.wait_for(lambda s: s["ready"] and tools_pid(s) not in (worker, None),
                   what="the tool worker to be restarted")
        if read_only:
            d.wait_for(lambda _: runs_begun(mark) == 2, what="the call to run again")
            release.touch()
        t.join(120)
    finally:
        release.touch()
        t.join(120)
    if read_only:
        assert out.get("value", {}).get("text") == "let go", out
    else:
        assert isinstance(out.get("error"), errors.WorkerLost), out
        assert "was not run again" in out["error"].message
        # not run again, even once the worker is back
        assert tool_call(d, "holder", "hinted__peek", {"path": str(mark)})["text"] == "present"
        assert runs_begun(mark) == 1


# -- stopping ------------------------------------------------------------------------


def ignores_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def test_an_agent_that_ignores_sigterm_does_not_outlive_the_daemon(make_daemon) -> None:
    d: Daemon = make_daemon(config={"supervisor": {"shutdown_grace": 2.0}})
    with d.client(operator=True) as op:
        info = op.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "stubborn.py")})
    agent = psutil.Process(info["pid"])
    d.wait_for(lambda _: ignores_sigterm(agent.pid), what="the agent to ignore SIGTERM")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=120) == 0, d.log_text()[-4000:]
    gone, alive = psutil.wait_procs([agent], timeout=30)
    assert not alive, f"the agent outlived the daemon:\n{d.log_text()[-4000:]}"


# -- where things are found ------------------------------------------------------------


@pytest.mark.parametrize("data_home", ["XDG_DATA_HOME", "HOME"])
def test_directories_from_the_xdg_variables_and_the_config_from_aios_config(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch, data_home: str) -> None:
    """Without AIOS_RUNTIME_DIR and AIOS_DATA_DIR: the runtime directory is
    $XDG_RUNTIME_DIR/aios, the data directory $XDG_DATA_HOME/aios, else
    ~/.local/share/aios, and AIOS_CONFIG names the configuration file, for
    aiosd, aiosctl and agents."""
    xdg_run, xdg_data, home = short_tmp / "xr", short_tmp / "xd", short_tmp / "home"
    for path in (xdg_run, xdg_data, home):
        path.mkdir(mode=0o700)
    config = short_tmp / "elsewhere.toml"
    config.write_text(tomli_w.dumps({"llm": {"models": [{"name": "named-by-aios-config",
                                                          "slots": 2}]}}))
    env = {k: v for k, v in os.environ.items()
           if k not in ("AIOS_RUNTIME_DIR", "AIOS_DATA_DIR", "AIOS_ENDPOINT", "AIOS_AGENT_TOKEN",
                        "AIOS_CONFIG", "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET",
                        "XDG_DATA_HOME")}
    env.update(XDG_RUNTIME_DIR=str(xdg_run), HOME=str(home), AIOS_CONFIG=str(config),
               PYTHONUNBUFFERED="1")
    if data_home == "XDG_DATA_HOME":
        env["XDG_DATA_HOME"] = str(xdg_data)
        data, not_data = xdg_data / "aios", home / ".local"
    else:
        data, not_data = home / ".local" / "share" / "aios", xdg_data / "aios"
    log = short_tmp / "aiosd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "aiosd"], env=env, stdout=fh, stderr=fh,
                                start_new_session=True, cwd=REPO)
    # the fixtures' helpers look where the daemon should be
    d = Daemon(short_tmp, {**env, "AIOS_RUNTIME_DIR": str(xdg_run / "aios")}, proc, log)
    try:
        wait_ready_or_fail(d)
        assert (xdg_run / "aios" / "kernel.sock").exists()
        status = run_ctl(env, "status", "--json")   # aiosctl finds it the same way
        assert status.returncode == 0, status.stderr
        assert [c["name"] for c in json.loads(status.stdout)["cores"]] == ["named-by-aios-config"]
        for var in ("AIOS_RUNTIME_DIR", "AIOS_DATA_DIR", "AIOS_ENDPOINT", "AIOS_AGENT_TOKEN",
                    "RUNTIME_DIRECTORY", "STATE_DIRECTORY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg_run))
        with libaios.connect(name="xdg-agent") as c:   # and so does an agent
            c.storage.put("where", "here")
        assert (data / "storage").is_dir()
        assert not not_data.exists()
    finally:
        d.stop()


# -- files -----------------------------------------------------------------------------


def test_files_list_old_versions_and_rollback(daemon: Daemon) -> None:
    with daemon.client(name="filer") as c:
        c.storage.write_file("notes/monday.txt", b"first draft")
        c.storage.write_file("notes/old/sunday.txt", b"old")
        c.storage.write_file("top.txt", b"top")
        with daemon.client(operator=True) as op:   # (an operator's overwrite needs no approval)
            op.storage.write_file("notes/monday.txt", b"second draft", agent="filer")
        assert c.storage.list_dir() == [{"name": "notes", "type": "dir"},
                                        {"name": "top.txt", "type": "file", "version": 1}]
        assert c.storage.list_dir("notes") == [{"name": "monday.txt", "type": "file", "version": 2},
                                               {"name": "old", "type": "dir"}]
        assert c.storage.read_file("notes/monday.txt") == b"second draft"
        assert c.storage.read_file("notes/monday.txt", version=1) == b"first draft"
        assert [v["version"] for v in c.storage.versions("notes/monday.txt", kind="file")] == [2, 1]
        t, out = in_thread(lambda: c.storage.rollback("notes/monday.txt", 1, kind="file",
                                                      timeout=120))
        pending = pending_approval(daemon, "filer")
        assert pending["op"] == "storage.rollback"
        assert pending["values"] == {"file": "notes/monday.txt", "to_version": 1,
                                     "current_version": 2}
        assert daemon.ctl("approve", pending["id"]).returncode == 0
        t.join(120)
        assert out.get("value", {}).get("restored") == 1, out
        assert c.storage.read_file("notes/monday.txt") == b"first draft"
        assert [v["version"] for v in c.storage.versions("notes/monday.txt", kind="file")] == [
            3, 2, 1]


# -- snapshots of suspended calls --------------------------------------------------------


def snapshots(status: dict[str, Any]) -> dict[str, Any]:
    return (status["cores"][0].get("stats") or {}).get("snapshots") or {}


def test_snapshots_spill_to_disk_and_their_calls_resume_exactly(make_daemon) -> None:
    # one slot and three agents under round-robin: two calls are suspended
    # at a time, and past snapshot_ram_bytes (1 byte) all but the newest
    # snapshot spill to disk
    d: Daemon = make_daemon(config={"llm": {"models": [{"slots": 1, "snapshot_ram_bytes": 1}]},
                                    "scheduler": {"policy": "rr", "quantum_tokens": 8}})
    prompts = {"ann": "Write a long story about a lighthouse keeper.",
               "bob": "Describe a busy harbour at dawn.",
               "cid": "Explain how a steam engine works."}
    alone = {}
    for name, prompt in prompts.items():   # one at a time: never suspended
        with d.client(name=name, timeout=300) as c:
            alone[name] = c.chat(prompt, max_tokens=64)
    assert d.status()["preemptions"] == 0

    def chat(name: str) -> Callable[[], Any]:
        def run() -> Any:
            with d.client(name=name, timeout=300) as c:
                return c.chat(prompts[name], max_tokens=64)
        return run

    runs = {name: in_thread(chat(name)) for name in prompts}
    for t, _ in runs.values():
        t.join(300)
    for name, (_, out) in runs.items():
        assert "value" in out, (name, out)
        assert out["value"].text == alone[name].text, name   # greedy: the same tokens
    assert d.status()["preemptions"] >= 2
    # spilled, and every snapshot taken back (or dropped): none is left
    d.wait_for(lambda s: snapshots(s).get("spilled", 0) >= 1 and snapshots(s).get("in_ram") == 0
               and snapshots(s).get("on_disk") == 0, what="spilled snapshots, none left")


def test_a_suspended_call_s_snapshot_is_dropped_at_its_deadline(make_daemon) -> None:
    """Under the fair policy, an agent of high priority takes the only slot
    from a running call, which is suspended and stays so while the other
    runs; its deadline passes: its caller gets Timeout, and its snapshot is
    dropped (its caller still connected, the other call still running)."""
    d: Daemon = make_daemon(config={
        "llm": {"models": [{"slots": 1, "n_ctx": 4096}]},
        "scheduler": {"policy": "fair", "quantum_tokens": 8,
                      "agents": [{"agent": "favoured", "priority": 10}]}})
    answered, may_leave, gave_up = threading.Event(), threading.Event(), threading.Event()
    late: dict[str, Any] = {}

    def late_call() -> None:
        with d.client(name="late") as c:
            try:
                late["value"] = c.chat("Tell a long story.", max_tokens=1500, min_tokens=1500,
                                       timeout=8.0)
            except errors.AIOSError as exc:
                late["error"] = exc
            answered.set()
            may_leave.wait(120)   # connected still: its snapshot is not dropped for leaving

    def favoured_call() -> Any:
        # runs until the test gives up on it and leaves (then it is cancelled)
        with d.client(name="favoured") as c:
            return c.call(MsgType.LLM_CHAT, {
                "messages": [{"role": "user", "content": "Tell a very long story."}],
                "max_tokens": 3500, "min_tokens": 3500}, timeout=300, cancelled=gave_up)

    def suspended(name: str) -> bool:
        with d.client(operator=True) as op:
            status = op.call(MsgType.ADMIN_STATUS, {"calls": True})
        agent = next((a["id"] for a in d.ps() if a["name"] == name), None)
        return snapshots(status).get("in_ram") == 1 and any(
            c["state"] == "suspended" and c["agent"] == agent for c in status["calls"])

    tl = threading.Thread(target=late_call)
    tl.start()
    tf, favoured = None, {}
    try:
        d.wait_for(lambda s: s["running"] == 1, what="the late call to run")
        tf, favoured = in_thread(favoured_call)
        d.wait_for(lambda _: suspended("late"), what="the late call to be suspended")
        assert answered.wait(120)
        assert isinstance(late.get("error"), errors.Timeout), late
        d.wait_for(lambda s: snapshots(s).get("in_ram") == 0 and snapshots(s).get("on_disk") == 0
                   and s["running"] == 1, what="the snapshot dropped, the other call running")
    finally:
        may_leave.set()
        gave_up.set()
        tl.join(120)
        if tf is not None:
            tf.join(120)
    assert isinstance(favoured.get("error"), errors.Cancelled), favoured
