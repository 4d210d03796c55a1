"""What the README says a user can do, each tried once against a real daemon:
agents are refused operators' calls, an agent launches sub-agents under its
own name, memory pages, and aiosctl's mem stats and audit answer."""

from __future__ import annotations

import json

import pytest

from libaios import errors
from libaios.protocol import MsgType

from ..conftest import TEST_AGENTS, Daemon

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
