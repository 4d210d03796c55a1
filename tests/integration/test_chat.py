"""LLM system calls on the real daemon and the embedded model."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from libaios import errors
from libaios.protocol import MsgType

from ..conftest import TEST_AGENTS, Daemon

pytestmark = pytest.mark.integration


def run_agent(d: Daemon, script: str, *args: str) -> tuple[dict, str, str]:
    """Launch an agent through the kernel and wait; (final reply, stdout, stderr)."""
    body = {"path": str(TEST_AGENTS / script), "args": list(args), "wait": True}
    out, err = [], []
    with d.client(operator=True, timeout=600) as c:
        stream = c.stream(MsgType.AGENT_RUN, body)
        for part in stream:
            if "data" in part:
                (err if part["stream"] == "stderr" else out).append(part["data"])
    assert stream.result is not None
    return stream.result, "".join(out), "".join(err)


def test_sixteen_agents_at_once_all_complete_and_usage_adds_up(daemon: Daemon) -> None:
    results: dict[int, tuple[dict, str, str]] = {}

    def one(i: int) -> None:
        results[i] = run_agent(daemon, "calls.py", "--calls", "3", "--task", f"Count to {i + 2}.")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert len(results) == 16
    by_id = {row["id"]: row for row in daemon.ps()}
    for final, out, err in results.values():
        assert final["exit_code"] == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        totals = report["totals"]
        assert totals["calls"] == 3
        assert totals["completion_tokens"] > 0
        # the kernel accounted the calls to the agent that made them
        agent = report["whoami"]["agent"]
        assert agent == final["agent"]
        assert report["whoami"]["launched"] is True
        row = by_id[agent]
        assert row["calls"] == 3 + 0  # whoami is not a scheduled call
        assert row["failed"] == 0
        assert row["prompt_tokens"] == totals["prompt_tokens"]
        assert row["completion_tokens"] == totals["completion_tokens"]
        assert row["state"] == "exited" and row["exit_code"] == 0


def test_streamed_tokens_arrive_before_the_end_and_add_up(daemon: Daemon) -> None:
    with daemon.client() as c:
        stream = c.chat("Tell me about the sea.", max_tokens=40, stream=True)
        pieces = []
        for piece in stream:
            assert stream.result is None  # the call has not ended yet
            pieces.append(piece)
        assert stream.result is not None
        assert len(pieces) > 1
        assert "".join(pieces) == stream.result.text
        assert stream.result.usage["completion_tokens"] > 0


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
        },
    },
}


def test_tool_call_parses_and_validates(daemon: Daemon) -> None:
    with daemon.client() as c:
        reply = c.chat("What is the weather in Paris?", tools=[WEATHER, CLOCK],
                       tool_choice="required", max_tokens=64)
    assert reply.finish_reason == "tool_calls"
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call["type"] == "function" and call["id"]
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_named_tool_choice_calls_that_tool(daemon: Daemon) -> None:
    with daemon.client() as c:
        reply = c.chat("What time is it in Tokyo?", tools=[WEATHER, CLOCK],
                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                       max_tokens=48)
    assert reply.tool_calls[0]["function"]["name"] == "get_time"
    jsonschema.validate(json.loads(reply.tool_calls[0]["function"]["arguments"]),
                        CLOCK["function"]["parameters"])


def test_json_schema_output_validates(daemon: Daemon) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
    }
    with daemon.client() as c:
        reply = c.chat("Describe a person.", max_tokens=120,
                       response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert reply.finish_reason == "stop", reply.text
    jsonschema.validate(reply.parsed, schema)
    assert json.loads(reply.text) == reply.parsed


def test_stop_strings_and_max_tokens(daemon: Daemon) -> None:
    with daemon.client() as c:
        short = c.chat("Count from one to twenty in words.", max_tokens=5)
        assert short.finish_reason == "length"
        assert short.usage["completion_tokens"] == 5
        stopped = c.chat("Count from 1 to 20, separated by commas.", max_tokens=80, stop=[","])
    assert "," not in stopped.text


def test_min_tokens_holds_back_the_end_of_an_answer(daemon: Daemon) -> None:
    with daemon.client() as c:
        # without it, the model ends this answer on its own before the limit
        free = c.chat("Say hello.", max_tokens=120)
        assert free.finish_reason == "stop" and free.usage["completion_tokens"] < 120
        held = c.chat("Say hello.", max_tokens=120, min_tokens=120)
        with pytest.raises(errors.InvalidArgument, match="min_tokens"):
            c.chat("Say hello.", max_tokens=8, min_tokens=9)
    assert held.finish_reason == "length" and held.usage["completion_tokens"] == 120


def test_bad_arguments_are_rejected_naming_the_field(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(errors.InvalidArgument, match="max_tokens"):
            c.chat("hi", max_tokens=0)
        with pytest.raises(errors.InvalidArgument, match=r"messages\[0\].role"):
            c.chat([{"role": "wizard", "content": "hi"}])
        with pytest.raises(errors.InvalidArgument, match="temperature"):
            c.chat("hi", temperature=9.0)
        with pytest.raises(errors.InvalidArgument, match="parameters"):
            c.chat("hi", tools=[{"type": "function",
                                 "function": {"name": "f", "parameters": {"type": 7}}}])
        # the connection still serves
        assert c.chat("hi", max_tokens=4).usage["completion_tokens"] > 0


def test_conversation_reuses_the_kv_cache(daemon: Daemon) -> None:
    messages = [{"role": "system", "content": "You are terse. " * 20},
                {"role": "user", "content": "Say yes."}]
    with daemon.client() as c:
        first = c.chat(messages, max_tokens=8)
        messages += [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "Say no."}]
        second = c.chat(messages, max_tokens=8)
    # the whole first prompt was already in the core's cache
    assert second.usage["cached_tokens"] >= first.usage["prompt_tokens"] - 1


def test_whoami_of_a_hand_started_client(daemon: Daemon) -> None:
    with daemon.client(name="by-hand") as c:
        me = c.whoami()
    assert me["name"] == "by-hand"
    assert me["launched"] is False
    assert me["agent"].startswith("by-hand-")


def test_forged_credential_is_refused(daemon: Daemon) -> None:
    with pytest.raises(errors.Unauthenticated):
        daemon.client(token="not-a-real-token")


def test_a_launched_agent_cannot_shed_its_identity(daemon: Daemon) -> None:
    final, out, err = run_agent(daemon, "impostor.py")
    assert final["exit_code"] == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    # without its credential, under another name, it is still itself
    assert seen["whoami"]["name"] == "impostor"
    assert seen["whoami"]["agent"] == final["agent"]
    assert seen["whoami"]["launched"] is True
    assert seen["ps"] == "PermissionDenied"
    assert seen["operator"] == "PermissionDenied"
    assert seen["orphan_operator"] == "PermissionDenied"


def test_a_launched_agents_name_cannot_be_taken_by_hand(daemon: Daemon) -> None:
    with daemon.client(operator=True) as ctl:
        info = ctl.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "idle.py"), "name": "victim"})
        try:
            with pytest.raises(errors.PermissionDenied, match="belongs to agent"):
                daemon.client(name="victim")
        finally:
            ctl.call(MsgType.ADMIN_KILL, {"agent": info["agent"]})
    daemon.wait_for(lambda s: not any(r["id"] == info["agent"] and r["state"] == "running"
                                      for r in daemon.ps()), what="the agent to end")
    with daemon.client(name="victim") as c:  # a name nobody holds is free again
        assert c.whoami()["launched"] is False
    with pytest.raises(errors.InvalidArgument, match="sub-agent"):
        daemon.client(name="victim.sub")


def test_admin_calls_are_for_operators(daemon: Daemon) -> None:
    with daemon.client(name="curious") as c:
        for mtype in (MsgType.ADMIN_STATUS, MsgType.ADMIN_PS, MsgType.ADMIN_APPROVALS,
                      MsgType.ADMIN_KILL, MsgType.ADMIN_SHUTDOWN, MsgType.ADMIN_AUDIT):
            with pytest.raises(errors.PermissionDenied, match="for operators"):
                c.call(mtype, {})
        with pytest.raises(errors.PermissionDenied, match="named curious.NAME"):
            c.call(MsgType.AGENT_RUN, {"path": str(TEST_AGENTS / "idle.py"), "name": "other"})
    assert daemon.status()["ready"]


def test_async_client_runs_many_calls_on_one_connection(daemon: Daemon) -> None:
    import asyncio

    from libaios import aio

    async def main() -> tuple[list, list]:
        async with aio.connect(daemon.endpoint, name="async") as aios:
            replies = await asyncio.gather(*(aios.chat(f"Say {i}.", max_tokens=6) for i in range(8)))
            pieces = [p async for p in aios.chat_stream("Tell me a joke.", max_tokens=16)]
            return replies, pieces

    replies, pieces = asyncio.run(main())
    assert len(replies) == 8
    assert all(r.usage["completion_tokens"] > 0 for r in replies)
    final = pieces[-1]
    assert "".join(pieces[:-1]) == final.text
