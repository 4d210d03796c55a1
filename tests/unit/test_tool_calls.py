"""Tool calls held to their budget and their tool_choice, parallel calls,
how a conversation with several tool results is shown to the model, and
streamed tool-call deltas. Pure logic."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from aiosd import chat as request
from aiosd.llm import budget, structured
from aiosd.llm.toolstream import ToolCallStream
from libaios.errors import InvalidArgument, ToolCallIncomplete

MSG = [{"role": "user", "content": "What is 12 cubed?"}]
CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string", "maxLength": 1000}},
    "required": ["expression"]}}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object",
    "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                   "score": {"type": "integer"}},
    "required": ["title", "tags"]}}}


def chars(text: str) -> int:
    """A tokenizer at its worst: a token for every character."""
    return len(text)


def words(text: str) -> int:
    """A tokenizer closer to a real one: a token a word or a sign."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def req(**body: Any) -> request.ChatRequest:
    return request.parse({"messages": MSG, **body})


def longest(schema: dict[str, Any]) -> str:
    """The longest answer ``schema`` admits, as text (strings at maxLength,
    arrays at maxItems, numbers at their most digits)."""
    def fill(s: dict[str, Any]) -> Any:
        if "anyOf" in s:
            return max((fill(b) for b in s["anyOf"]), key=lambda v: len(json.dumps(v)))
        if "const" in s:
            return s["const"]
        kind = s.get("type")
        if kind == "string":
            return "x" * s["maxLength"]
        if kind == "integer":
            return 10 ** 15
        if kind == "array":
            return [fill(s["items"])] * s["maxItems"]
        return {k: fill(v) for k, v in s.get("properties", {}).items()}
    return json.dumps(fill(schema))


@pytest.mark.parametrize("tokens", [30, 40, 120, 400])
@pytest.mark.parametrize("tools, choice", [([CALC], "required"), ([CALC, NOTE], "required"),
                                           ([CALC, NOTE], "auto"), ([NOTE], {"type": "function",
                                                                             "function": {"name": "note"}})])
def test_every_answer_of_a_fitted_schema_fits_its_budget(tokens: int, tools: list, choice: Any) -> None:
    r = req(tools=tools, tool_choice=choice, max_tokens=tokens)
    try:
        schema = structured.fitted_schema(r, tokens, chars)
    except ToolCallIncomplete as exc:
        # only when even the answer's frame does not fit; the error says so
        assert "needs at least" in exc.message and str(tokens) in exc.message
        return
    branches = schema["anyOf"] if "anyOf" in schema else [schema]
    for branch in branches:
        text = longest(branch)
        jsonschema.validate(json.loads(text), branch)
        assert chars(text) <= tokens


def test_a_looping_string_is_bounded_by_the_budget_not_its_schema() -> None:
    schema = structured.fitted_schema(req(tools=[CALC], tool_choice="required"), 40, words)
    bound = schema["properties"]["arguments"]["properties"]["expression"]["maxLength"]
    assert 0 < bound < 40
    roomy = structured.fitted_schema(req(tools=[CALC], tool_choice="required"), 4000, words)
    assert len(roomy["anyOf"]) == 2   # one call, or a list of calls, each fitted
    assert roomy["anyOf"][0]["properties"]["arguments"]["properties"]["expression"]["maxLength"] == 1000


def test_a_budget_too_small_for_the_frame_is_a_named_error() -> None:
    with pytest.raises(ToolCallIncomplete, match="calculator.*needs at least"):
        structured.fitted_schema(req(tools=[CALC], tool_choice="required"), 5, chars)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        structured.fitted_schema(req(response_format={"type": "json_object", "schema": NOTE[
            "function"]["parameters"]}), 5, chars)


def test_water_level_shares_what_is_left() -> None:
    assert budget._water_level([(5, 1), (float("inf"), 2)], 25) == 10
    assert budget._water_level([(5, 1), (float("inf"), 2)], 4) == 1
    assert budget._water_level([(5, 1), (6, 1)], 100) == 6
    assert budget._water_level([], 10) == 0


def test_a_required_call_cut_short_raises_naming_the_tool_and_budget() -> None:
    r = req(tools=[CALC], tool_choice="required", max_tokens=40)
    cut = '{"name": "calculator", "arguments": {"expression": "12 * 12 * 12 *'
    with pytest.raises(ToolCallIncomplete, match="'calculator'.*40 tokens") as exc:
        structured.parse_answer(r, cut, "length", budget=40)
    assert exc.value.details == {"tools": ["calculator"], "budget": 40}
    assert not exc.value.retriable


def test_an_auto_answer_cut_short_says_length() -> None:
    r = req(tools=[CALC])
    out = structured.parse_answer(r, '{"reply": "The answer is \\"17', "length")
    assert out == {"text": 'The answer is "17', "tool_calls": [], "parsed": None,
                   "finish_reason": "length"}
    out = structured.parse_answer(r, '{"name": "calculator", "argu', "length")
    assert out["tool_calls"] == [] and out["finish_reason"] == "length"


def test_parallel_calls_all_come_back() -> None:
    r = req(tools=[CALC, NOTE], tool_choice="required")
    schema = structured.output_schema(r)
    assert any(b.get("type") == "array" for b in schema["anyOf"])
    text = json.dumps([{"name": "calculator", "arguments": {"expression": "2+2"}},
                       {"name": "note", "arguments": {"title": "t", "tags": []}}])
    out = structured.parse_answer(r, text, "stop", ids=["a", "b"])
    assert [c["id"] for c in out["tool_calls"]] == ["a", "b"]
    assert [c["function"]["name"] for c in out["tool_calls"]] == ["calculator", "note"]
    assert out["finish_reason"] == "tool_calls"
    single = req(tools=[CALC, NOTE], tool_choice="required", parallel_tool_calls=False)
    assert not any(b.get("type") == "array" for b in structured.output_schema(single)["anyOf"])
    with pytest.raises(InvalidArgument, match="parallel_tool_calls"):
        req(tools=[CALC], parallel_tool_calls="yes")


def test_several_tool_results_render_with_their_calls() -> None:
    turn = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator",
                                                      "arguments": '{"expression": "2+2"}'}},
        {"id": "c2", "type": "function", "function": {"name": "note",
                                                      "arguments": '{"title": "t", "tags": []}'}}]}
    results = [{"role": "tool", "tool_call_id": "c2", "content": "saved"},
               {"role": "tool", "tool_call_id": "c1", "content": "4"}]
    shown = structured.prompt_messages(req(messages=MSG + [turn] + results))
    assert [c["name"] for c in json.loads(shown[1]["content"])] == ["calculator", "note"]
    assert shown[2]["content"] == "note (call c2) returned: saved"
    assert shown[3]["content"] == "calculator (call c1) returned: 4"


@pytest.mark.parametrize("turn, field", [
    ({"role": "assistant", "content": "", "tool_calls": {}}, "tool_calls"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f",
                                                                       "arguments": "{"}}]},
     r"tool_calls\[0\].function.arguments"),
    ({"role": "user", "content": "", "tool_calls": [{"function": {"name": "f"}}]}, "assistant"),
    ({"role": "tool", "content": "x", "tool_call_id": 3}, "tool_call_id"),
    ({"role": "assistant", "content": None, "tool_calls": "x"}, r"messages\[1\].tool_calls must"),
    ({"role": "assistant", "content": None, "tool_calls": [1]}, r"messages\[1\].tool_calls\[0\] must"),
    *(({"role": "assistant", "content": None,
        "tool_calls": [{"function": {"name": "f", "arguments": args}}]},
       r"messages\[1\].tool_calls\[0\].function.arguments")
      for args in ("not json", "[1]", '{"a": NaN}', '{"a": -Infinity}', {"a": 1},
                   '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")),
])
def test_bad_tool_turns_are_refused_naming_the_field(turn: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        req(messages=MSG + [turn])


def streamed(text: str, piece: int) -> tuple[list[dict[str, Any]], ToolCallStream]:
    deltas: list[dict[str, Any]] = []
    stream = ToolCallStream(deltas.append, id_prefix="call_x")
    for i in range(0, len(text), piece):
        stream.feed(text[i:i + piece])
    return deltas, stream


def joined(deltas: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """Tool-call deltas put together as an OpenAI client does."""
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] = tc.get("id", slot["id"])
            slot["name"] += tc.get("function", {}).get("name", "")
            slot["arguments"] += tc.get("function", {}).get("arguments", "")
    return calls


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_calls_come_as_deltas_not_text(piece: int) -> None:
    text = ('[{"name": "calculator", "arguments": {"expression": "2 * (3 + \\"4\\")"}}, '
            '{"name": "note", "arguments": {"title": "a}b", "tags": ["x", "y"]}}]')
    deltas, stream = streamed(text, piece)
    assert not any("text" in d for d in deltas)
    first = next(d["tool_calls"][0] for d in deltas)
    assert first["function"] == {"name": "calculator", "arguments": ""} and first["id"] == "call_x_0"
    calls = joined(deltas)
    assert [c["name"] for c in calls.values()] == ["calculator", "note"]
    assert json.loads(calls[0]["arguments"]) == {"expression": '2 * (3 + "4")'}
    assert json.loads(calls[1]["arguments"]) == {"title": "a}b", "tags": ["x", "y"]}
    assert stream.ids == ["call_x_0", "call_x_1"]


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_a_streamed_reply_comes_as_text(piece: int) -> None:
    deltas, _ = streamed('{"reply": "It is \\"1728\\".\\nDone"}', piece)
    assert "".join(d["text"] for d in deltas) == 'It is "1728".\nDone'
    assert not any("tool_calls" in d for d in deltas)


def test_a_replayed_stream_sends_only_what_is_new() -> None:
    deltas: list[dict[str, Any]] = []
    stream = ToolCallStream(deltas.append, id_prefix="call_y")
    stream.replay('{"name": "calculator", "arguments": {"expr')
    stream.feed('ession": "1+1"}}')
    assert joined(deltas)[0]["arguments"] == 'ession": "1+1"}'
    assert "id" not in deltas[0]["tool_calls"][0]   # the caller has the header already
