"""The gateway's OpenAI API (/v1) on real daemons and the embedded model,
through the clients people use: the openai package (sync and async: chat,
streams, tool calls and their streamed deltas, JSON schemas, models, the
Responses API plain and streamed) and LangChain's ChatOpenAI. Each key's
calls are the calls of its agent, accounted in `aiosctl ps`. Bad input gets
OpenAI's error body and status over real HTTP; a caller that goes away has
its call cancelled; a launched agent's key dies with it; the example
agents run unchanged through `aiosctl run`.

The model is small: the tests hold it to the structure of its answers
(a reply came, a tool call parsed, JSON met its schema), never to their
sense."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from ..conftest import AGENTS, TEST_AGENTS, Daemon

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
#: a long answer: it is still being generated when a test acts on it
LONG = {"max_tokens": 1500, "min_tokens": 1500}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
#: the same tool in the Responses API's flat shape
FLAT_WEATHER = {"type": "function", **WEATHER["function"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


def gateway_url(d: Daemon) -> str:
    status = d.wait_for(lambda s: bool((s.get("gateway") or {}).get("url")),
                        what="the gateway's URL")
    return status["gateway"]["url"] + "/v1"


@pytest.fixture(scope="module")
def url(daemon: Daemon) -> str:
    return gateway_url(daemon)


def make_key(d: Daemon, name: str) -> str:
    result = d.ctl("keys", "create", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["key"]


def sync_client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)


def async_client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)


def ps_row(d: Daemon, name: str) -> dict[str, Any]:
    """The newest agent named ``name``, as `aiosctl ps --all --json` shows it."""
    result = d.ctl("ps", "--all", "--json")
    assert result.returncode == 0, result.stderr
    rows = [r for r in json.loads(result.stdout) if r["name"] == name]
    assert rows, f"no agent {name!r} in aiosctl ps"
    return rows[0]


def has_agent(d: Daemon, name: str) -> bool:
    return any(r["name"] == name for r in d.ps())


def assert_error(response: httpx2.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- the openai package ---------------------------------------------------------------------


def test_models_and_chat_with_the_sync_client_are_accounted_to_the_keys_agent(
        daemon: Daemon, url: str) -> None:
    client = sync_client(url, make_key(daemon, "gw-sync"))
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    first = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0.7, top_p=0.9, seed=1, stop=["\n\n"],
        user="end-user-1", messages=[{"role": "developer", "content": "Be brief."},
                                     {"role": "user", "content": "Name a colour."}])
    assert first.object == "chat.completion" and first.model == MODEL
    assert isinstance(first.choices[0].message.content, str)
    assert first.choices[0].finish_reason in ("stop", "length")
    assert 1 <= first.usage.completion_tokens <= 8
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    second = client.chat.completions.create(model=MODEL, max_completion_tokens=4,
                                            messages=[{"role": "user", "content": "Hi."}])
    assert 1 <= second.usage.completion_tokens <= 4
    row = ps_row(daemon, "gw-sync")
    assert (row["calls"], row["failed"]) == (2, 0)
    assert row["prompt_tokens"] == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert row["completion_tokens"] == (first.usage.completion_tokens
                                        + second.usage.completion_tokens)
    # the end user a request names is recorded (and trusted for nothing)
    assert "gw-sync: a request for end user 'end-user-1'" in daemon.log_text()


def test_a_streamed_chat_ends_with_its_usage(daemon: Daemon, url: str) -> None:
    client = sync_client(url, make_key(daemon, "gw-stream"))
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens >= 1
    assert body[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text.strip()
    row = ps_row(daemon, "gw-stream")
    assert row["calls"] == 1 and row["completion_tokens"] == usage_chunk.usage.completion_tokens


def test_tool_calls_and_the_turn_after_them(daemon: Daemon, url: str) -> None:
    client = sync_client(url, make_key(daemon, "gw-tools"))
    asked = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=96)
    message = asked.choices[0].message
    assert asked.choices[0].finish_reason == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        assert call.function.name in ("get_weather", "get_time") and call.id
        assert isinstance(json.loads(call.function.arguments), dict)
    named = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=96)
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    # the conversation goes on with the calls and their results
    after = client.chat.completions.create(
        model=MODEL, tools=[WEATHER, TIME], max_tokens=16,
        messages=ASK + [message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"}
            for c in message.tool_calls])
    answer = after.choices[0].message
    assert answer.content is not None or answer.tool_calls


def test_the_async_client_streams_tool_call_deltas_it_accumulates(daemon: Daemon,
                                                                  url: str) -> None:
    client = async_client(url, make_key(daemon, "gw-async"))

    async def scenario() -> None:
        plain = await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6)
        assert plain.usage.completion_tokens >= 1
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], stream=True, max_tokens=64,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        deltas = [c.choices[0].delta.tool_calls[0] async for c in stream
                  if c.choices and c.choices[0].delta.tool_calls]
        assert deltas[0].id and deltas[0].function.name == "get_weather"
        assert len(deltas) > 1   # the arguments came in pieces
        arguments = "".join(d.function.arguments or "" for d in deltas)
        assert isinstance(json.loads(arguments), dict)
        async with client.chat.completions.stream(
                model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                max_tokens=96) as accumulated:
            async for _ in accumulated:
                pass
            final = await accumulated.get_final_completion()
        calls = final.choices[0].message.tool_calls
        assert calls and all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
        assert final.choices[0].finish_reason == "tool_calls"

    asyncio.run(scenario())
    assert ps_row(daemon, "gw-async")["calls"] == 3


class City(BaseModel):
    name: str
    population: int


def test_json_schema_and_json_object_answers(daemon: Daemon, url: str) -> None:
    client = sync_client(url, make_key(daemon, "gw-json"))
    parsed = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}],
        response_format=City, max_tokens=64)
    assert isinstance(parsed.choices[0].message.parsed, City)
    schema = {"type": "object", "properties": {"steps": {"type": "array", "maxItems": 3,
                                                         "items": {"type": "string"}}},
              "required": ["steps"], "additionalProperties": False}
    raw = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Plan a picnic."}], max_tokens=96,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "plan", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(raw.choices[0].message.content), schema)
    loose = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A JSON object, please."}],
        response_format={"type": "json_object"}, max_tokens=48)
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


# -- the Responses API -----------------------------------------------------------------------


def test_responses_plain_continued_and_with_a_function_call(daemon: Daemon, url: str) -> None:
    client = sync_client(url, make_key(daemon, "gw-resp"))
    first = client.responses.create(model=MODEL, input="Say hi.", instructions="Be brief.",
                                    max_output_tokens=8)
    assert first.object == "response" and first.id.startswith("resp_")
    assert first.status in ("completed", "incomplete") and isinstance(first.output_text, str)
    assert first.usage.output_tokens >= 1
    # the next turn names the first: its prompt holds the first turn too
    second = client.responses.create(model=MODEL, input="Say it again.",
                                     instructions="Be brief.", previous_response_id=first.id,
                                     max_output_tokens=8)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens
    called = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                     tools=[FLAT_WEATHER], tool_choice="required",
                                     max_output_tokens=64)
    call = called.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments), dict)
    answered = client.responses.create(
        model=MODEL, previous_response_id=called.id, tools=[FLAT_WEATHER], max_output_tokens=16,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answered.output and answered.previous_response_id == called.id

    async def with_async() -> str:
        return (await async_client(url, make_key(daemon, "gw-resp-async")).responses.create(
            model=MODEL, input=[{"role": "user", "content": "Hi."}], max_output_tokens=4)).status

    assert asyncio.run(with_async()) in ("completed", "incomplete")
    assert ps_row(daemon, "gw-resp")["calls"] == 4


def test_streamed_responses_events(daemon: Daemon, url: str) -> None:
    client = sync_client(url, make_key(daemon, "gw-resp-stream"))
    events = list(client.responses.create(model=MODEL, input="Say hello.", stream=True,
                                          max_output_tokens=12))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text and text
    calls = list(client.responses.create(model=MODEL, input="What is the weather in Rome?",
                                         tools=[FLAT_WEATHER], tool_choice="required",
                                         stream=True, max_output_tokens=64))
    kinds = [e.type for e in calls]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    done = next(e for e in calls if e.type == "response.function_call_arguments.done")
    assert isinstance(json.loads(done.arguments), dict)
    # the SDK's stream helper accumulates the events into the final response
    with client.responses.stream(model=MODEL, input="What is the weather in Oslo?",
                                 tools=[FLAT_WEATHER], tool_choice="required",
                                 max_output_tokens=64) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output[0].type == "function_call" and final.output[0].name == "get_weather"


# -- LangChain -------------------------------------------------------------------------------


def test_langchain_bind_tools_through_the_gateway(daemon: Daemon, url: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = ChatOpenAI(model=MODEL, base_url=url, api_key=make_key(daemon, "gw-langchain"),
                     max_tokens=64, temperature=0, max_retries=0, timeout=300)
    question = HumanMessage("What is 6 times 7?")
    asked = llm.bind_tools([multiply], tool_choice="multiply").invoke([question])
    call = asked.tool_calls[0]
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    assert asked.usage_metadata["output_tokens"] >= 1
    answer = llm.bind_tools([multiply]).invoke(
        [question, asked, ToolMessage(str(multiply.invoke(call["args"])), tool_call_id=call["id"])])
    assert answer.content is not None
    assert ps_row(daemon, "gw-langchain")["calls"] == 2


# -- errors over HTTP -------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_never_reach_the_kernel(daemon: Daemon,
                                                                  url: str) -> None:
    key = make_key(daemon, "gw-bad")
    auth = {"Authorization": f"Bearer {key}"}
    good = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}
    with httpx2.Client(base_url=url, timeout=300) as http:
        chat = "/chat/completions"
        # malformed JSON: 400, and the key's agent never even reached the kernel
        assert_error(http.post(chat, headers=auth, content=b'{"model": "smollm2-135m", '), 400)
        assert not has_agent(daemon, "gw-bad")
        for body, status, param in [
            ({**good, "n": 2}, 400, "n"),
            ({**good, "max_tokens": -1}, 400, "max_tokens"),
            ({**good, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
            ({**good, "temperature": 9}, 400, "temperature"),
            ({**good, "messages": [{"role": "tool", "content": "x"}]}, 400,
             "messages[0].tool_call_id"),
            ({**good, "tools": [{"type": "function", "function": {"name": "f",
                                                                 "parameters": {"type": 3}}}]},
             400, "tools[0].function.parameters"),
            ({**good, "response_format": {"type": "xml"}}, 400, "response_format.type"),
            ({**good, "stream_options": {"include_usage": True}}, 400, "stream_options"),
            ({**good, "model": "gpt-4o"}, 404, "model"),
            ([good], 400, None),
        ]:
            assert_error(http.post(chat, headers=auth, json=body), status, param)
        responses = "/responses"
        for body, status, param in [
            ({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, 400,
             "input[0].type"),
            ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, 400,
             "tools[0].type"),
            ({"model": MODEL, "input": "x", "previous_response_id": "resp_none"}, 404,
             "previous_response_id"),
        ]:
            assert_error(http.post(responses, headers=auth, json=body), status, param)
        # none of that became a system call
        assert not has_agent(daemon, "gw-bad") or ps_row(daemon, "gw-bad")["calls"] == 0
        # too large a body: 413 (a 10 MB body, gateway.max_body_bytes being 4 MiB)
        big = {**good, "messages": [{"role": "user", "content": "x" * (10 * 2**20)}]}
        assert_error(http.post(chat, headers=auth, json=big), 413)
        # no key, an unknown key, a revoked key: 401
        assert_error(http.post(chat, json=good), 401)
        assert_error(http.get("/models", headers={"Authorization": "Bearer aios-sk-made-up"}), 401)
        revoked = make_key(daemon, "gw-revoked")
        other = {"Authorization": f"Bearer {revoked}"}
        made = http.post(responses, headers=other, json={"model": MODEL, "input": "Hi.",
                                                         "max_output_tokens": 2})
        assert made.status_code == 200, made.text
        # another agent's response continues none of this agent's conversations: 403
        assert_error(http.post(responses, headers=auth, json={
            "model": MODEL, "input": "x", "previous_response_id": made.json()["id"]}),
            403, "previous_response_id")
        assert daemon.ctl("keys", "revoke", "gw-revoked").returncode == 0
        response = http.post(chat, headers=other, json=good)
        assert_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        # and the gateway serves on
        assert http.post(chat, headers=auth, json=good).status_code == 200
        assert_error(http.get("/nowhere", headers=auth), 404)


def test_a_caller_that_goes_away_has_its_call_cancelled(daemon: Daemon, url: str) -> None:
    auth = {"Authorization": f"Bearer {make_key(daemon, 'gw-gone')}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
            **LONG}
    with httpx2.Client(base_url=url, timeout=300) as http:
        with http.stream("POST", "/chat/completions", headers=auth,
                         json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3):   # the first chunks of the answer
                while not next(lines).startswith("data:"):
                    pass
            daemon.wait_for(lambda s: s["running"] == 1, what="the call to run")
        # the connection closed mid-stream: the call is given up, its slot freed
        daemon.wait_for(lambda s: s["running"] == 0, what="the call to be cancelled")
    row = ps_row(daemon, "gw-gone")
    assert row["failed"] == 1 and row["completion_tokens"] < LONG["max_tokens"]

    async def gone_before_the_answer() -> None:
        # a caller of a plain (unstreamed) completion that goes away
        async with httpx2.AsyncClient(base_url=url, timeout=300) as client:
            waiting = asyncio.create_task(client.post("/chat/completions", headers=auth,
                                                      json=body))
            await asyncio.to_thread(daemon.wait_for, lambda s: s["running"] == 1, 60,
                                    "the call to run")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

    asyncio.run(gone_before_the_answer())
    daemon.wait_for(lambda s: s["running"] == 0, what="the call to be cancelled")
    assert ps_row(daemon, "gw-gone")["failed"] == 2
    status = daemon.status()
    assert status["ready"] and status["gateway"]["state"] == "ready"
    with httpx2.Client(base_url=url, timeout=300) as http:
        again = http.post("/chat/completions", headers=auth,
                          json={"model": MODEL, "max_tokens": 2,
                                "messages": [{"role": "user", "content": "Hi."}]})
        assert again.status_code == 200


def test_a_wedged_single_slot_core_overloads_then_times_out(make_daemon: Callable[..., Daemon]
                                                           ) -> None:
    # one slot, one place in the queue, and a core that never answers
    d = make_daemon({"kernel": {"max_queue": 1, "call_timeout": 20},
                     "llm": {"models": [{"slots": 1}]}}, extra_env={"AIOS_FAULT": "stall"})
    url = gateway_url(d)
    auth = {"Authorization": f"Bearer {make_key(d, 'gw-busy')}"}
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}]}

    async def scenario() -> None:
        async with httpx2.AsyncClient(base_url=url, timeout=300) as client:
            running = asyncio.create_task(client.post("/chat/completions", headers=auth,
                                                      json=body))
            await asyncio.to_thread(d.wait_for, lambda s: s["running"] == 1, 60, "a call to run")
            queued = asyncio.create_task(client.post("/chat/completions", headers=auth,
                                                     json=body))
            await asyncio.to_thread(d.wait_for, lambda s: s["queues"]["llm"] == 1, 60,
                                    "a call to wait")
            refused = await client.post("/chat/completions", headers=auth, json=body)
            error = assert_error(refused, 429)
            assert error["type"] == "rate_limit_error" and error["code"] == "overloaded"
            assert refused.headers["retry-after"] == "1"
            # the waiting caller goes away: its call leaves the queue
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            await asyncio.to_thread(d.wait_for, lambda s: s["queues"]["llm"] == 0, 60,
                                    "the queue to empty")
            # the running call meets its deadline (kernel.call_timeout)
            error = assert_error(await running, 504)
            assert error["type"] == "timeout_error"

    asyncio.run(scenario())


def test_a_stream_whose_core_dies_ends_with_the_error(make_daemon: Callable[..., Daemon]
                                                     ) -> None:
    d = make_daemon()
    client = sync_client(gateway_url(d), make_key(d, "gw-lost"))
    story = [{"role": "user", "content": "Tell a long story."}]

    def kill_core_on_the_first_piece(events: Any, is_piece: Callable[[Any], bool]) -> list:
        pid, seen = d.core_pid(), []
        for event in events:
            seen.append(event)
            if is_piece(event) and pid is not None:
                os.kill(pid, signal.SIGKILL)
                pid = None
        d.wait_for(lambda s: s["ready"] and d.core_pid() is not None, what="the core back")
        return seen

    with pytest.raises(openai.APIError) as info:
        kill_core_on_the_first_piece(
            client.chat.completions.create(model=MODEL, messages=story, stream=True,
                                           extra_body=LONG),
            lambda chunk: bool(chunk.choices and chunk.choices[0].delta.content))
    assert info.value.body["code"] == "worker_lost"
    events = kill_core_on_the_first_piece(
        client.responses.create(model=MODEL, input=story, stream=True, max_output_tokens=1500,
                                extra_body={"min_tokens": 1500}),
        lambda event: event.type == "response.output_text.delta")
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.message
    assert ps_row(d, "gw-lost")["failed"] == 2


def test_no_core_that_can_serve_is_a_503(make_daemon: Callable[..., Daemon]) -> None:
    config = {"supervisor": {"restart_budget": 1, "backoff_initial": 0.05, "backoff_max": 0.1}}
    d = make_daemon(config, extra_env={"AIOS_FAULT": "crash-on-start"}, wait_ready=False)
    d.wait_for(lambda s: any(c["state"] == "failed" for c in s["cores"]),
               what="the core to be failed")
    url = gateway_url(d)
    auth = {"Authorization": f"Bearer {make_key(d, 'gw-nocore')}"}
    chat = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}]}
    with httpx2.Client(base_url=url, timeout=300) as http:
        for path, body in [("/chat/completions", chat),
                           ("/chat/completions", {**chat, "stream": True}),
                           ("/responses", {"model": MODEL, "input": "Hi.", "stream": True})]:
            error = assert_error(http.post(path, headers=auth, json=body), 503)
            assert error["type"] == "service_unavailable"


# -- launched agents ----------------------------------------------------------------------------


def run_agent(d: Daemon, path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """`aiosctl run` an agent; its stdout and its row in `aiosctl ps`."""
    result = d.ctl("run", str(path), *args, timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout, ps_row(d, path.stem)


def test_a_launched_agents_key_works_until_the_agent_ends(daemon: Daemon, url: str) -> None:
    out, row = run_agent(daemon, TEST_AGENTS / "openai_key.py")
    used = json.loads(out.strip().splitlines()[-1])
    assert used["base_url"] == url and used["key"].startswith("aios-agent-")
    assert row["state"] == "exited" and row["exit_code"] == 0
    assert row["calls"] == 1 and row["completion_tokens"] == used["usage"]["completion_tokens"]
    with httpx2.Client(base_url=url, timeout=300) as http:
        response = http.get("/models", headers={"Authorization": f"Bearer {used['key']}"})
    assert "ended" in assert_error(response, 401)["message"]


@pytest.mark.parametrize("example", [("openai_sdk_agent.py",),
                                     ("openai_sdk_agent.py", "--api", "responses"),
                                     ("langchain_agent.py",)],
                         ids=["openai-chat", "openai-responses", "langchain"])
def test_the_example_agents_run_unchanged_through_aiosctl_run(daemon: Daemon,
                                                              example: tuple[str, ...]) -> None:
    script, *args = example
    out, row = run_agent(daemon, AGENTS / script, "--steps", "2", *args)
    assert "final answer" in out
    assert row["exit_code"] == 0 and row["failed"] == 0
    assert row["calls"] == 2 and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
