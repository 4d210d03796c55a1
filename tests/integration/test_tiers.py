"""Every live conversation is held: in the KV cache, in RAM, then on disk,
and restored exactly; a damaged file is refused and the call still
completes. On real cores of the embedded model, greedy decoding."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ..conftest import Daemon

pytestmark = pytest.mark.integration

#: two streams of 512 cells (and the spare): fewer than the agents
SMALL = {"slots": 1, "n_ctx": 512, "kv_mb": 36}


def take_turns(d: Daemon, agents: str, rounds: int, between=None) -> dict[str, list[str]]:
    """Each agent's answers, the agents taking turns, one call at a time."""
    convs = {k: [{"role": "system", "content": f"You are agent {k}."},
                 {"role": "user", "content": f"Tell me about the letter {k}."}] for k in agents}
    answers: dict[str, list[str]] = {k: [] for k in agents}
    clients = {k: d.client(name=f"tiers-{k}") for k in agents}
    try:
        for turn in range(rounds):
            if between is not None and turn:
                between(turn)
            for k in agents:
                reply = clients[k].chat(convs[k], max_tokens=10)
                assert reply.finish_reason in ("stop", "length")
                answers[k].append(reply.text)
                convs[k] += [{"role": "assistant", "content": reply.text},
                             {"role": "user", "content": "Go on."}]
    finally:
        for c in clients.values():
            c.close()
    return answers


def core_stats(d: Daemon, predicate, what: str) -> dict:
    return d.wait_for(lambda s: predicate(s["cores"][0].get("stats", {})),
                      what=what)["cores"][0]["stats"]


def test_conversations_evicted_to_disk_resume_token_identical(make_daemon) -> None:
    # no RAM for evicted conversations: each goes to disk, and comes back
    d: Daemon = make_daemon(config={"llm": {"models": [{**SMALL, "evicted_mb": 0}]}})
    spilled = take_turns(d, "abc", rounds=3)
    stats = core_stats(d, lambda s: s.get("disk_hits", 0) >= 6, "second and third turns from disk")
    assert stats["spilled_seqs"] >= 6 and stats["corrupt_seqs"] == 0
    assert stats["misses"] == 0 and stats["ram_hits"] == 0
    assert "found in KV/RAM/disk/none" in d.ctl("top", "--once").stdout
    # the same turns on a core that keeps every conversation in its KV cache
    roomy: Daemon = make_daemon(config={"llm": {"models": [{**SMALL, "kv_mb": 128}]}})
    assert take_turns(roomy, "abc", rounds=3) == spilled
    kept = core_stats(roomy, lambda s: s.get("kv_hits", 0) >= 6, "every later turn from KV")
    assert kept["disk_hits"] == 0 and kept["spilled_seqs"] == 0


def test_a_damaged_file_is_refused_and_the_conversation_prefilled_again(make_daemon) -> None:
    d: Daemon = make_daemon(config={"llm": {"models": [{**SMALL, "evicted_mb": 0}]}})
    folder = Path(d.env["AIOS_DATA_DIR"]) / "kv" / "smollm2-135m"
    flipped: list[Path] = []

    def damage(turn: int) -> None:
        # a bit of every conversation on disk flips before the third turns
        if turn != 2:
            return
        for path in folder.glob("*.kv"):
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x10
            path.write_bytes(bytes(data))
            flipped.append(path)

    answers = take_turns(d, "abc", rounds=3, between=damage)
    assert flipped, "no conversation was on disk before the third turns"
    assert all(len(a) == 3 for a in answers.values())   # every call completed
    stats = core_stats(d, lambda s: s.get("corrupt_seqs", 0) >= len(flipped),
                       "the damaged files to be refused")
    assert stats["corrupt_seqs"] == len(flipped) and stats["misses"] == len(flipped)


def test_forty_agents_on_tiny_tiers_answer_as_they_do_one_at_a_time(make_daemon) -> None:
    """40 agents on a core whose KV cache holds two conversations and
    whose RAM holds about one: the rest go to disk. Every agent's answers
    equal its answers when it runs alone."""
    d: Daemon = make_daemon(config={"llm": {"models": [{**SMALL, "slots": 1, "evicted_mb": 1}]}})
    names = [f"agent{i:02d}" for i in range(40)]

    def turns(name: str, out: dict[str, list[str]]) -> None:
        messages = [{"role": "system", "content": "You answer in one short sentence."},
                    {"role": "user", "content": f"Describe {name}'s day."}]
        with d.client(name=name, timeout=900) as c:
            for _ in range(2):
                reply = c.chat(messages, max_tokens=8)
                out.setdefault(name, []).append(reply.text)
                messages += [{"role": "assistant", "content": reply.text},
                             {"role": "user", "content": "And then?"}]

    alone: dict[str, list[str]] = {}
    for name in names:
        turns(name, alone)
    together: dict[str, list[str]] = {}
    threads = [threading.Thread(target=turns, args=(name, together)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert together == alone
    stats = d.status()["cores"][0]["stats"]
    assert stats["disk_hits"] >= 1 and stats["misses"] == 0
