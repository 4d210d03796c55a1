"""Models by name, and affinity: an agent's turns go to the core that holds
its conversation, on real cores of the embedded model."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from libaios import errors

from ..conftest import Daemon

pytestmark = pytest.mark.integration


def test_calls_reach_the_model_they_name_and_the_default_the_rest(make_daemon) -> None:
    # the embedded model under two names, with different contexts
    d: Daemon = make_daemon(config={"llm": {"default_model": "long", "models": [
        {"name": "short", "n_ctx": 512, "kv_mb": 48, "slots": 2},
        {"name": "long", "n_ctx": 1024, "kv_mb": 96, "slots": 2}]}})
    with d.client() as c:
        assert c.chat("Say one.", model="short", max_tokens=4).core == "short"
        assert c.chat("Say two.", model="long", max_tokens=4).core == "long"
        assert c.chat("Say three.", max_tokens=4).core == "long"
        with pytest.raises(errors.InvalidArgument) as info:
            c.chat("Say four.", model="gpt-4o", max_tokens=4)
        assert "'gpt-4o'" in info.value.message and "short, long" in info.value.message
        with pytest.raises(errors.InvalidArgument, match="'model'"):
            c.chat("Say five.", model="", max_tokens=4)
    status = d.status()
    contexts = {m["name"]: m["n_ctx"] for m in status["models"]}
    assert contexts == {"short": 512, "long": 1024} and status["default_model"] == "long"
    assert {c["name"]: c["info"]["n_ctx"] for c in status["cores"]} == {"short": 512, "long": 1024}
    listed = json.loads(d.ctl("models", "--json").stdout)
    assert [(m["name"], m["default"], m["cores"]) for m in listed] == [
        ("short", False, ["short"]), ("long", True, ["long"])]
    # the gateway lists the same names, the default first
    key = json.loads(d.ctl("keys", "create", "lister", "--json").stdout)["key"]
    url = status["gateway"]["url"]
    auth = {"Authorization": f"Bearer {key}"}
    models = httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["long", "short"]
    reply = httpx.post(f"{url}/v1/chat/completions", headers=auth, timeout=120, json={
        "model": "short", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]})
    assert reply.status_code == 200 and reply.json()["model"] == "short"
    calls = {c["name"]: c["served"] for c in d.status()["cores"]}
    assert calls["short"] == 2   # the gateway's call reached the model it named


def test_an_agents_turns_stay_on_the_core_holding_its_conversation(make_daemon) -> None:
    d: Daemon = make_daemon(config={"llm": {"models": [
        {"replicas": 2, "threads": 1, "n_ctx": 1024, "kv_mb": 96, "slots": 2}]}})
    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": "Name a colour."}]
    with d.client(name="sticky") as c:
        first = c.chat(messages, max_tokens=8)
        home = first.core
        other = ({"smollm2-135m-0", "smollm2-135m-1"} - {home}).pop()
        def home_stats(status: dict) -> dict:
            return next(k for k in status["cores"] if k["name"] == home).get("stats", {})

        first_prefill = first.usage["prompt_tokens"] - first.usage["cached_tokens"]
        before = home_stats(d.wait_for(
            lambda s: home_stats(s).get("prefill_tokens", 0) >= first_prefill,
            what="the home core's heartbeat after the first turn"))
        messages += [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "And another?"}]
        second = c.chat(messages, max_tokens=8)
        assert second.core == home
        # the core held the first turn: only the new tokens were evaluated
        assert second.usage["cached_tokens"] >= first.usage["prompt_tokens"]
        after = d.wait_for(lambda s: home_stats(s).get("prefill_tokens", 0)
                           > before["prefill_tokens"], what="the home core's next heartbeat")
        core = next(k for k in after["cores"] if k["name"] == home)
        prefilled = core["stats"]["prefill_tokens"] - before["prefill_tokens"]
        assert prefilled == second.usage["prompt_tokens"] - second.usage["cached_tokens"]
        assert core["affinity"]["hits"] >= 1
        # the home core stops (its process frozen): the turn goes to the
        # other core, prefills the conversation there, and completes
        pid = d.core_pid(home)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            d.wait_for(lambda s: next(k for k in s["cores"] if k["name"] == home)["state"] != "ready",
                       what="the frozen core to be dropped")
            messages += [{"role": "assistant", "content": second.text},
                         {"role": "user", "content": "One more?"}]
            third = c.chat(messages, max_tokens=8)
            assert third.core == other and third.finish_reason in ("stop", "length")
        finally:
            os.kill(pid, signal.SIGCONT)
