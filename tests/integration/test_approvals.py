"""Destructive calls and the operator's approval, on a real daemon: a call
whose arguments are wrong, or name nothing, is refused at once without
asking anyone; a valid one waits for a decision, shows the operator what it
would act on, and obeys; one nobody decides on gets the kernel's answer
before its caller's own timeout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import libaios
from libaios import errors
from libaios.protocol import MsgType

from ..conftest import Daemon, in_thread, pending_approval

pytestmark = pytest.mark.integration

#: What a call that should be refused at once may wait: long enough for a
#: busy machine, far shorter than access.approval_timeout (120 s by default),
#: so that a call held for approval fails the test.
QUICK = 20.0


def _requested(d: Daemon, agent: str) -> list[dict[str, Any]]:
    """The approvals requested for ``agent`` (an agent id), from the audit log."""
    result = d.ctl("audit", "--json", "--agent", agent, "--limit", "1000")
    assert result.returncode == 0, result.stderr
    return [r for r in json.loads(result.stdout) if r["event"] == "approval.requested"]


@pytest.fixture
def agent(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[libaios.Client]:
    """A client named after the test (its data and approvals are its own)."""
    with daemon.client(name=request.node.name.removeprefix("test_")[:40]) as c:
        yield c


# -- refused at once -------------------------------------------------------------


def test_rollback_to_a_malformed_version_is_refused_at_once(daemon: Daemon,
                                                            agent: libaios.Client) -> None:
    agent.storage.put("doc", "v1")
    with pytest.raises(errors.InvalidArgument, match="'version'"):
        agent.storage.rollback("doc", "a", timeout=QUICK)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="'version'"):
        agent.storage.rollback("doc", 0, timeout=QUICK)
    assert _requested(daemon, agent.identity["agent"]) == []


def test_rollback_to_a_missing_version_is_not_found(daemon: Daemon,
                                                    agent: libaios.Client) -> None:
    agent.storage.put("doc", "v1")
    with pytest.raises(errors.NotFound, match="version 9"):
        agent.storage.rollback("doc", 9, timeout=QUICK)
    with pytest.raises(errors.NotFound):
        agent.storage.rollback("no-such-key", 1, timeout=QUICK)
    assert _requested(daemon, agent.identity["agent"]) == []


def test_delete_of_a_missing_key_or_file_is_not_found(daemon: Daemon,
                                                      agent: libaios.Client) -> None:
    with pytest.raises(errors.NotFound, match="no-such-key"):
        agent.storage.delete("no-such-key", timeout=QUICK)
    with pytest.raises(errors.NotFound, match="no/such/file"):
        agent.call(MsgType.STORAGE_DELETE, {"path": "no/such/file"}, timeout=QUICK)
    with pytest.raises(errors.InvalidArgument, match="key"):
        agent.call(MsgType.STORAGE_DELETE, {"key": 5}, timeout=QUICK)
    assert _requested(daemon, agent.identity["agent"]) == []


def test_memory_delete_or_update_of_a_missing_id_is_not_found(daemon: Daemon,
                                                              agent: libaios.Client) -> None:
    agent.memory.add("something to remember")
    for missing in ("5", 5):
        with pytest.raises(errors.NotFound, match="no item"):
            agent.memory.delete(missing, timeout=QUICK)  # type: ignore[arg-type]
    with pytest.raises(errors.NotFound, match="no item"):
        agent.memory.update("5", text="new", timeout=QUICK)
    item = agent.memory.add("the meeting is on Monday")
    with pytest.raises(errors.InvalidArgument, match="'text'"):
        agent.memory.update(item["id"], text=7, timeout=QUICK)  # type: ignore[arg-type]
    assert _requested(daemon, agent.identity["agent"]) == []


# -- a valid call waits, shows what it acts on, and obeys ------------------------


def test_rollback_shows_the_key_and_versions_and_runs_when_approved(
        daemon: Daemon, agent: libaios.Client) -> None:
    name = agent.identity["name"]
    agent.storage.put("doc", "v1")
    with daemon.client(operator=True) as op:  # (an operator's overwrite needs no approval)
        op.storage.put("doc", "v2", agent=name)
    t, out = in_thread(lambda: agent.storage.rollback("doc", 1, timeout=120))
    pending = pending_approval(daemon, name)
    assert pending["op"] == "storage.rollback"
    assert pending["values"] == {"key": "doc", "to_version": 1, "current_version": 2}
    listing = daemon.ctl("approvals")
    assert listing.returncode == 0, listing.stderr
    assert "key=doc" in listing.stdout and "to_version=1" in listing.stdout
    assert daemon.ctl("approve", pending["id"]).returncode == 0
    t.join(120)
    assert out.get("value", {}).get("restored") == 1, out
    assert agent.storage.get("doc") == "v1"
    assert len(_requested(daemon, agent.identity["agent"])) == 1


def test_memory_delete_shows_the_item_and_obeys_the_decision(daemon: Daemon,
                                                              agent: libaios.Client) -> None:
    text = "the meeting is on Monday at ten, in the small room " * 4
    item = agent.memory.add(text)
    name = agent.identity["name"]
    for decision in ("deny", "approve"):
        t, out = in_thread(lambda: agent.memory.delete(item["id"], timeout=120))
        pending = pending_approval(daemon, name)
        assert pending["op"] == "memory.delete"
        assert pending["values"]["id"] == item["id"]
        preview = pending["values"]["text"]
        assert preview.startswith("the meeting is on Monday") and len(preview) < len(text)
        listing = daemon.ctl("approvals")
        assert item["id"] in listing.stdout and "the meeting is on Monday" in listing.stdout
        assert daemon.ctl(decision, pending["id"]).returncode == 0
        t.join(120)
        if decision == "deny":
            assert isinstance(out.get("error"), errors.PermissionDenied), out
            assert agent.memory.get(item["id"])["text"] == text
    assert out.get("value") == {"deleted": item["id"]}, out
    with pytest.raises(errors.NotFound):
        agent.memory.get(item["id"])


def test_delete_and_overwrite_show_the_key(daemon: Daemon, agent: libaios.Client) -> None:
    name = agent.identity["name"]
    agent.storage.put("keep", "me")
    t, out = in_thread(lambda: agent.storage.put("keep", "you", timeout=120))
    pending = pending_approval(daemon, name)
    assert (pending["op"], pending["values"]) == ("storage.overwrite",
                                                  {"key": "keep", "current_version": 1})
    assert daemon.ctl("deny", pending["id"]).returncode == 0
    t.join(120)
    assert isinstance(out.get("error"), errors.PermissionDenied), out
    t, out = in_thread(lambda: agent.storage.delete("keep", timeout=120))
    pending = pending_approval(daemon, name)
    assert (pending["op"], pending["values"]) == ("storage.delete", {"key": "keep", "versions": 1})
    assert daemon.ctl("deny", pending["id"]).returncode == 0
    t.join(120)
    assert isinstance(out.get("error"), errors.PermissionDenied), out
    assert agent.storage.get("keep") == "me"


# -- nobody decides ----------------------------------------------------------------


def test_no_decision_gets_the_kernels_answer_before_the_callers_timeout(
        daemon: Daemon, agent: libaios.Client) -> None:
    # access.approval_timeout is 120 s: the call's own deadline (its
    # timeout) ends the wait, and the kernel must answer before the client
    # gives up on it ("is aiosd running?").
    agent.storage.put("x", 1)
    with pytest.raises(errors.PermissionDenied, match="no decision") as info:
        agent.storage.delete("x", timeout=5)
    assert "is aiosd running" not in info.value.message
    assert agent.storage.get("x") == 1
