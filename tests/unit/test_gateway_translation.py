"""The gateway's pure translation: OpenAI requests into llm.chat bodies, the
kernel's answers into OpenAI's objects and events (checked with the openai
package's own types and stream accumulators), kernel errors into HTTP
statuses, and the memory of responses for previous_response_id."""

from __future__ import annotations

from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from aiosd.gateway import openai_api, responses_api
from aiosd.gateway.openai_api import RequestError
from libaios import errors

MODELS = ["embedded"]
EVENT = TypeAdapter(ResponseStreamEvent)


def chat(**req: Any) -> dict[str, Any]:
    return openai_api.chat_body({"model": "embedded",
                                 "messages": [{"role": "user", "content": "hi"}], **req}, MODELS)


def refused(fn: Any, *args: Any, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value


TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("exc, status, kind", [
    (errors.InvalidArgument("x"), 400, "invalid_request_error"),
    (errors.Unauthenticated("x"), 401, "authentication_error"),
    (errors.PermissionDenied("x"), 403, "permission_error"),
    (errors.NotFound("x"), 404, "not_found_error"),
    (errors.TooLarge("x"), 413, "invalid_request_error"),
    (errors.Overloaded("x"), 429, "rate_limit_error"),
    (errors.QuotaExceeded("x"), 429, "rate_limit_error"),
    (errors.Unavailable("x"), 503, "service_unavailable"),
    (errors.Timeout("x"), 504, "timeout_error"),
    (errors.InternalError("x"), 500, "server_error"),
])
def test_kernel_errors_become_openai_error_bodies(exc: errors.AIOSError, status: int,
                                                  kind: str) -> None:
    got, body = openai_api.error_body(exc)
    assert got == status
    assert body == {"error": {"message": "x", "type": kind, "param": None,
                              "code": exc.code.name.lower()}}


def test_a_request_error_names_its_field() -> None:
    _, body = openai_api.error_body(RequestError("'n' must be 1", "n"))
    assert body["error"]["param"] == "n" and body["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize("message, field", [
    ("'max_tokens' must be an integer from 1 to 32768, got 0", "max_tokens"),
    ("messages[2].content must be a string", "messages[2].content"),
    ("tools[0].function.parameters is not a valid JSON schema: ...", "tools[0].function.parameters"),
    ("give 'tools' or 'response_format', not both", "tools"),
    ("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format.type"),
    ("at most 1024 messages, got 2000", None),
])
def test_the_field_of_a_kernel_message(message: str, field: str | None) -> None:
    assert openai_api.kernel_field(message) == field


# -- chat completions: requests ------------------------------------------------------------


def test_a_plain_request_becomes_an_llm_chat_body() -> None:
    body = chat(max_tokens=8, temperature=0.5, top_p=0.9, stop=["\n"], seed=3, user="u-1",
                frequency_penalty=0.5, metadata={"a": "b"}, some_future_option=True)
    assert body == {"messages": [{"role": "user", "content": "hi"}], "model": "embedded",
                    "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 3, "stream": False}


def test_messages_of_every_role_and_shape() -> None:
    body = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "},
                                     {"type": "text", "text": "in Paris?"}], "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ], tools=[TOOL], tool_choice="auto", parallel_tool_calls=False)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert body["tools"] == [TOOL] and body["parallel_tool_calls"] is False


def test_max_completion_tokens_is_max_tokens_and_errors_say_so() -> None:
    assert chat(max_completion_tokens=5)["max_tokens"] == 5
    exc = refused(chat, max_completion_tokens=0)
    assert exc.param == "max_completion_tokens" and "max_completion_tokens" in exc.message
    assert refused(chat, max_completion_tokens=5, max_tokens=6).param == "max_completion_tokens"


@pytest.mark.parametrize("req, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": "high"}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"user": 7}, "user"),
    ({"presence_penalty": 9}, "presence_penalty"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"model": None}, "model"),
])
def test_bad_requests_are_refused_naming_the_field(req: dict[str, Any], param: str) -> None:
    exc = refused(chat, **req)
    assert exc.param == param, exc.message


def test_an_unknown_model_is_not_found_and_the_body_must_be_an_object() -> None:
    with pytest.raises(errors.NotFound) as info:
        chat(model="gpt-4")
    assert "embedded" in info.value.message and info.value.param == "model"
    assert refused(openai_api.chat_body, [1, 2], MODELS).param is None


def test_stream_options_include_usage() -> None:
    req = {"stream": True, "stream_options": {"include_usage": True}}
    assert chat(**req)["stream"] is True
    assert openai_api.stream_options(req, True) is True
    assert openai_api.stream_options({"stream": True}, True) is False


def test_json_schema_and_min_tokens_pass_through() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
        "additionalProperties": False}}}
    assert chat(response_format=rf)["response_format"] == rf
    assert chat(max_tokens=10, min_tokens=10)["min_tokens"] == 10


# -- chat completions: answers -------------------------------------------------------------


REPLY = {"text": "", "finish_reason": "tool_calls", "tool_calls": [CALL],
         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 2}}


def test_a_reply_becomes_a_chat_completion_the_client_parses() -> None:
    out = ChatCompletion.model_validate(openai_api.completion("chatcmpl-1", "embedded", REPLY))
    message = out.choices[0].message
    assert message.content is None and message.tool_calls[0].function.name == "get_weather"
    assert out.choices[0].finish_reason == "tool_calls"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (10, 5, 15)
    assert out.usage.prompt_tokens_details.cached_tokens == 2
    text = openai_api.completion("c", "embedded", {"text": "hi", "finish_reason": "length"})
    assert text["choices"][0]["message"]["content"] == "hi"
    assert text["choices"][0]["finish_reason"] == "length"


def accumulate(chunks: list[dict[str, Any]]) -> Any:
    state = ChatCompletionStreamState()
    for piece in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(piece))
    return state.get_final_completion()


def test_streamed_text_and_usage_chunks() -> None:
    stream = openai_api.ChunkStream("chatcmpl-1", "embedded", include_usage=True, created=1)
    chunks = stream.start() + stream.partial({"text": "Hel"}) + stream.partial({"text": "lo"})
    chunks += stream.end({"text": "Hello", "finish_reason": "stop",
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5
    final = accumulate(chunks[:-1])
    assert final.choices[0].message.content == "Hello"
    assert final.choices[0].finish_reason == "stop"


def test_streamed_tool_call_deltas_accumulate_in_the_client() -> None:
    stream = openai_api.ChunkStream("chatcmpl-1", "embedded", include_usage=False)
    chunks = stream.start()
    chunks += stream.partial({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                              "function": {"name": "get_weather",
                                                           "arguments": ""}}]})
    for fragment in ('{"ci', 'ty": "Pa', 'ris"}'):
        chunks += stream.partial({"tool_calls": [{"index": 0,
                                                  "function": {"arguments": fragment}}]})
    chunks += stream.end(REPLY)
    assert "usage" not in chunks[0]
    call = accumulate(chunks).choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_1", "get_weather", '{"city": "Paris"}')


def test_tool_calls_no_delta_carried_go_out_at_the_end() -> None:
    stream = openai_api.ChunkStream("chatcmpl-1", "embedded", include_usage=False)
    final = accumulate(stream.start() + stream.end(REPLY))
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert final.choices[0].finish_reason == "tool_calls"


# -- responses: requests --------------------------------------------------------------------


def responses(**req: Any) -> responses_api.ResponsesRequest:
    return responses_api.parse_request({"model": "embedded", **req}, MODELS)


def test_a_string_input_with_instructions() -> None:
    req = responses(input="Say hi", instructions="Be brief.", max_output_tokens=8,
                    temperature=0.2, include=[], store=True, truncation="auto",
                    reasoning={"effort": None})
    body = req.chat_body([])
    assert body == {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Say hi"}],
                    "model": "embedded", "max_tokens": 8, "temperature": 0.2, "stream": False}


def test_input_items_become_messages_and_calls_join_their_turn() -> None:
    req = responses(input=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ])
    assert req.messages == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]


def test_flat_function_tools_tool_choice_and_text_format() -> None:
    tool = {"type": "function", "name": "get_weather", "description": "the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True}
    req = responses(input="x", tools=[tool], tool_choice={"type": "function", "name": "get_weather"},
                    parallel_tool_calls=False)
    body = req.chat_body([])
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "the weather", "parameters": tool["parameters"]}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert req.echo["tools"] == [tool]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = responses(input="x", text={"format": {"type": "json_schema", "name": "a",
                                                "schema": schema, "strict": True}})
    assert fmt.chat_body([])["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert responses(input="x", text={"format": {"type": "json_object"}}).options[
        "response_format"] == {"type": "json_object"}


def test_history_comes_between_the_instructions_and_the_input() -> None:
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    body = responses(input="c", instructions="sys", previous_response_id="resp_1").chat_body(history)
    assert [m["content"] for m in body["messages"]] == ["sys", "a", "b", "c"]


@pytest.mark.parametrize("req, param", [
    ({"input": 5}, "input"),
    ({}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "no"}]},
     "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "stream": "yes"}, "stream"),
    ({"input": "x", "instructions": 3}, "instructions"),
])
def test_bad_responses_requests_are_refused_naming_the_field(req: dict[str, Any],
                                                             param: str) -> None:
    assert refused(responses, **req).param == param


def test_kernel_checks_are_named_as_the_responses_api_names_them() -> None:
    exc = refused(responses(input="x", max_output_tokens=0).chat_body, [])
    assert exc.param == "max_output_tokens" and "max_output_tokens" in exc.message
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    exc = refused(responses(input="x", tools=tools, tool_choice="required",
                            text={"format": {"type": "json_object"}}).chat_body, [])
    assert exc.param == "tools"


# -- responses: answers ---------------------------------------------------------------------


def test_a_reply_becomes_a_response_the_client_parses() -> None:
    req = responses(input="x", instructions="sys", max_output_tokens=20, metadata={"k": "v"})
    out = Response.model_validate(responses_api.response_of("resp_1", 1.0, req, REPLY))
    assert out.status == "completed" and out.output[0].type == "function_call"
    call = out.output[0]
    assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", '{"city": "Paris"}')
    assert out.usage.input_tokens == 10 and out.usage.output_tokens == 5
    assert out.instructions == "sys" and out.metadata == {"k": "v"}
    cut = responses_api.response_of("resp_2", 1.0, req, {"text": "He", "finish_reason": "length"})
    parsed = Response.model_validate(cut)
    assert parsed.output_text == "He" and parsed.status == "incomplete"
    assert parsed.incomplete_details.reason == "max_output_tokens"


def test_the_kernel_message_of_a_responses_output() -> None:
    items = responses_api.output_items({"text": "ok", "tool_calls": [CALL]})
    assert responses_api.assistant_message(items) == {"role": "assistant", "content": "ok",
                                                      "tool_calls": [CALL]}


def replay(events: list[dict[str, Any]]) -> Any:
    """The events through the openai package's own stream accumulator."""
    state = ResponseStreamState(input_tools=[], text_format=omit)
    seq = [e["sequence_number"] for e in events]
    assert seq == list(range(seq[0], seq[0] + len(seq)))
    for event in events:
        state.handle_event(EVENT.validate_python(event))
    return state


def test_streamed_text_events() -> None:
    req = responses(input="x", stream=True)
    stream = responses_api.ResponseEvents("resp_1", req, created=1.0)
    events = stream.start() + stream.partial({"text": "Hel"}) + stream.partial({"text": "lo"})
    events += stream.end({"text": "Hello", "finish_reason": "stop",
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    final = replay(events)._completed_response
    assert final.output_text == "Hello" and final.usage.total_tokens == 5
    assert final.id == "resp_1" and final.status == "completed"


def test_streamed_function_call_events() -> None:
    stream = responses_api.ResponseEvents("resp_1", responses(input="x", stream=True))
    events = stream.start()
    events += stream.partial({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                              "function": {"name": "get_weather",
                                                           "arguments": ""}}]})
    for fragment in ('{"city": ', '"Paris"}'):
        events += stream.partial({"tool_calls": [{"index": 0,
                                                  "function": {"arguments": fragment}}]})
    events += stream.partial({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                              "function": {"name": "get_time",
                                                           "arguments": "{}"}}]})
    events += stream.end({"text": "", "finish_reason": "tool_calls",
                          "tool_calls": [CALL, {"id": "call_2", "type": "function",
                                                "function": {"name": "get_time",
                                                             "arguments": "{}"}}]})
    kinds = [e["type"] for e in events]
    assert kinds.count("response.function_call_arguments.delta") == 3
    assert kinds.count("response.function_call_arguments.done") == 2
    assert kinds[-1] == "response.completed"
    final = replay(events)._completed_response
    assert [(o.call_id, o.name, o.arguments) for o in final.output] == [
        ("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}")]
    assert [o.id for o in final.output] == [item["id"] for item in stream.output]


def test_what_no_partial_carried_is_sent_at_the_end() -> None:
    stream = responses_api.ResponseEvents("resp_1", responses(input="x", stream=True))
    final = replay(stream.start() + stream.end(REPLY))._completed_response
    assert final.output[0].arguments == '{"city": "Paris"}'
    stream = responses_api.ResponseEvents("resp_2", responses(input="x", stream=True))
    final = replay(stream.start() + stream.end({"text": "", "finish_reason": "stop"}))
    assert final._completed_response.output_text == ""


def test_a_cut_short_or_failed_stream_ends_with_its_own_event() -> None:
    stream = responses_api.ResponseEvents("resp_1", responses(input="x", stream=True))
    events = stream.start() + stream.partial({"text": "He"})
    cut = events + stream.end({"text": "He", "finish_reason": "length"})
    assert cut[-1]["type"] == "response.incomplete"
    assert cut[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    replay(cut)
    stream = responses_api.ResponseEvents("resp_2", responses(input="x", stream=True))
    failed = stream.start() + stream.partial({"text": "He"}) + stream.fail(errors.Timeout("late"))
    assert failed[-1]["type"] == "response.failed"
    assert failed[-1]["response"]["error"] == {"code": "server_error", "message": "late",
                                               "type": "timeout_error", "param": None}
    replay(failed)


# -- responses: what the gateway remembers ---------------------------------------------------


def test_the_store_gives_back_an_agents_own_conversations_only() -> None:
    store = responses_api.ResponseStore()
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    store.put("resp_1", "alice", conversation)
    got = store.history("resp_1", "alice")
    assert got == conversation
    got[0]["content"] = "changed"   # a copy
    assert store.history("resp_1", "alice") == conversation
    with pytest.raises(errors.PermissionDenied) as info:
        store.history("resp_1", "bob")
    assert info.value.param == "previous_response_id"
    with pytest.raises(errors.NotFound):
        store.history("resp_nope", "alice")


def test_the_store_is_bounded_per_agent_and_in_bytes() -> None:
    store = responses_api.ResponseStore(per_agent=2, budget=1000)
    for i in range(3):
        store.put(f"a{i}", "alice", [{"role": "user", "content": "x"}])
    store.put("b0", "bob", [{"role": "user", "content": "x"}])
    with pytest.raises(errors.NotFound):
        store.history("a0", "alice")
    assert store.history("a2", "alice") and store.history("b0", "bob") and len(store) == 3
    store.put("big", "carol", [{"role": "user", "content": "y" * 900}])
    assert store.size <= 1000 and store.history("big", "carol")
    with pytest.raises(errors.NotFound):
        store.history("a1", "alice")   # the oldest went first
    store.put("huge", "carol", [{"role": "user", "content": "z" * 2000}])   # too large to keep
    with pytest.raises(errors.NotFound):
        store.history("huge", "carol")
