"""Tool calls on the real embedded model: a required call arrives or a named
error does, whatever the budget; streamed calls come as deltas; a
conversation with several tool results; the asyncio client's memory,
storage and tool calls."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

import libaios
import libaios.aio
from libaios import errors

from ..conftest import Daemon

pytestmark = pytest.mark.integration

#: a tool whose one free string invites a greedy model to loop
ECHO = {"type": "function", "function": {
    "name": "repeat", "description": "Repeat a text many times.",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                   "required": ["text"]}}}
LOOPING = "Call repeat with the text '12 * 12 * 12 * 12 * 12 * 12 * 12 * 12 * 12 * 12 * 12 * 12'."


@pytest.mark.parametrize("max_tokens", [8, 16, 24, 40, 120])
def test_a_required_call_arrives_or_a_named_error_does(daemon: Daemon, max_tokens: int) -> None:
    with daemon.client() as c:
        try:
            reply = c.chat(LOOPING, tools=[ECHO], tool_choice="required", max_tokens=max_tokens)
        except errors.ToolCallIncomplete as exc:
            assert "'repeat'" in exc.message and str(max_tokens) in exc.message
            assert exc.details["budget"] == max_tokens
            return
    assert reply.finish_reason == "tool_calls" and reply.tool_calls, reply
    assert reply.usage["completion_tokens"] <= max_tokens
    for call in reply.tool_calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), ECHO["function"]["parameters"])


def test_a_roomy_required_call_always_arrives(daemon: Daemon) -> None:
    with daemon.client() as c:
        for max_tokens in (40, 400):
            reply = c.chat(LOOPING, tools=[ECHO], tool_choice="required", max_tokens=max_tokens)
            assert reply.tool_calls and reply.finish_reason == "tool_calls"


def test_an_auto_answer_cut_short_says_length(daemon: Daemon) -> None:
    with daemon.client() as c:
        reply = c.chat("Tell me a long story about a dragon.", tools=[ECHO], max_tokens=12)
    assert reply.finish_reason in ("length", "tool_calls", "stop")
    if not reply.tool_calls:
        assert reply.finish_reason == "length" or reply.text


def test_streamed_tool_calls_come_as_deltas(daemon: Daemon) -> None:
    with daemon.client() as c:
        stream = c.chat("What is 6 times 7? Use the calculator.", tools=c.tools.list(),
                        tool_choice="required", max_tokens=64, stream=True)
        pieces = list(stream)
    result = stream.result
    assert result is not None and result.tool_calls
    assert not any(isinstance(p, str) for p in pieces), "a call's JSON leaked as text"
    calls: dict[int, dict[str, str]] = {}
    for delta in pieces:
        slot = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
        slot["id"] = delta.get("id", slot["id"])
        slot["name"] += delta.get("function", {}).get("name", "")
        slot["arguments"] += delta.get("function", {}).get("arguments", "")
    assert [c["id"] for c in calls.values()] == [t["id"] for t in result.tool_calls]
    for got, final in zip(calls.values(), result.tool_calls):
        assert got["name"] == final["function"]["name"]
        assert json.loads(got["arguments"]) == json.loads(final["function"]["arguments"])


def test_a_conversation_with_several_tool_results(daemon: Daemon) -> None:
    turn = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator",
                                                      "arguments": '{"expression": "6 * 7"}'}},
        {"id": "c2", "type": "function", "function": {"name": "calculator",
                                                      "arguments": '{"expression": "2 + 2"}'}}]}
    messages = [{"role": "user", "content": "What are 6 * 7 and 2 + 2?"}, turn,
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "tool", "tool_call_id": "c2", "content": "4"}]
    with daemon.client() as c:
        reply = c.chat(messages, max_tokens=24)
        assert reply.text and reply.finish_reason in ("stop", "length")
        with pytest.raises(errors.InvalidArgument, match=r"messages\[1\].tool_calls\[0\]"):
            c.chat([messages[0], {"role": "assistant", "content": "", "tool_calls": [
                {"id": "x", "function": {"name": "calculator", "arguments": "{oops"}}]}])


def test_the_asyncio_client_has_memory_storage_and_tools(daemon: Daemon) -> None:
    async def main() -> None:
        async with libaios.aio.connect(daemon.endpoint, name="async-services") as aios:
            me = await aios.whoami()
            assert me["name"] == "async-services"
            item = await aios.memory.add("the kettle is in the cupboard", {"kind": "note"})
            found = await aios.memory.search("kettle")
            assert item["id"] in [i["id"] for i in found]
            await aios.storage.put("async-key", {"n": 1})
            assert await aios.storage.get("async-key") == {"n": 1}
            names = [t["function"]["name"] for t in await aios.tools.list()]
            assert "calculator" in names
            results = await asyncio.gather(*(aios.tools.call("calculator", {"expression": f"{i} * 2"})
                                             for i in range(5)))
            assert results == [0, 2, 4, 6, 8]
            pieces = [p async for p in aios.chat_stream("What is 6 times 7? Use the calculator.",
                                                        tools=await aios.tools.list(),
                                                        tool_choice="required", max_tokens=64)]
            assert isinstance(pieces[-1], libaios.ChatResult) and pieces[-1].tool_calls
            assert all(isinstance(p, dict) for p in pieces[:-1])

    asyncio.run(main())
