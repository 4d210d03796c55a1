"""Preemptive scheduling on the real model: suspended calls resume exactly
where they stopped, and quotas throttle a flooding agent."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ..conftest import Daemon

pytestmark = pytest.mark.integration

PROMPT = "Write a long story about a lighthouse keeper."


def long_call(d: Daemon, out: dict[str, Any], key: str, name: str) -> None:
    with d.client(name=name, timeout=300) as c:
        out[key] = c.chat(PROMPT, max_tokens=96)


def test_preempted_call_resumes_to_the_same_tokens(make_daemon) -> None:
    # the same call, alone and uninterrupted, on a fresh core ...
    plain = make_daemon(config={"llm": {"models": [{"slots": 1}]}})
    with plain.client() as c:
        baseline = c.chat(PROMPT, max_tokens=96)
    plain.stop()
    # ... and on a fresh core under round-robin, where two other agents
    # wait: it is suspended every 8 tokens and resumed from its snapshot
    d: Daemon = make_daemon(config={"llm": {"models": [{"slots": 1}]},
                                    "scheduler": {"policy": "rr", "quantum_tokens": 8}})
    out: dict[str, Any] = {}
    first = threading.Thread(target=long_call, args=(d, out, "a", "first"))
    first.start()
    d.wait_for(lambda s: s["running"] == 1, what="the first call to run")
    others = [threading.Thread(target=long_call, args=(d, out, k, k)) for k in ("b", "c")]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(300)
    assert out["a"].text == baseline.text
    assert out["a"].usage["completion_tokens"] == baseline.usage["completion_tokens"]
    # this very call was suspended, and more than once
    row = next(r for r in d.ps() if r["name"] == "first")
    assert row["preemptions"] >= 2, row
    assert d.status()["preemptions"] >= row["preemptions"]


def test_fair_policy_and_quota_keep_a_flooding_agent_in_check(make_daemon) -> None:
    # one slot, so that calls wait and the policy's order and the quota decide
    config = {"llm": {"models": [{"slots": 1}]},
              "scheduler": {"policy": "fair", "quantum_tokens": 16,
                            "agents": [{"agent": "flood", "tokens_per_s": 50.0, "burst": 200}]}}
    d: Daemon = make_daemon(config=config)
    done: dict[str, int] = {"flood": 0, "polite": 0}

    def flood() -> None:
        with d.client(name="flood", timeout=300) as c:
            for _ in range(6):
                c.chat("Count to ten.", max_tokens=32)
                done["flood"] += 1

    def polite() -> None:
        with d.client(name="polite", timeout=300) as c:
            for _ in range(3):
                c.chat("Say hi.", max_tokens=8)
                done["polite"] += 1

    threads = [threading.Thread(target=flood) for _ in range(3)] + [threading.Thread(target=polite)]
    for t in threads:
        t.start()
    threads[-1].join(300)
    # the polite agent finished while the flooding one is still throttled
    assert done["polite"] == 3
    assert done["flood"] < 18
    for t in threads:
        t.join(300)
    assert done["flood"] == 18
    # The flooding agent's calls (about 60 tokens each, made faster than
    # its 50 tokens a second) waited for its quota once its burst was
    # spent; the other agent has no quota and was never held back.
    rows = d.ps()
    assert sum(r["throttled"] for r in rows if r["name"] == "flood") > 0
    assert [r["throttled"] for r in rows if r["name"] == "polite"] == [0]
