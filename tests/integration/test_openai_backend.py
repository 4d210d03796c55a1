"""The openai backend against a real OpenAI-compatible server on loopback:
llama-cpp-python's own server on the embedded model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aiosd.llm.llamacpp import embedded_model_path
from libaios import errors

from ..conftest import Daemon

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        # its log goes to a file: a pipe nobody reads would fill and stall it
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()),
                 "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                 "--model_alias", "smollm2"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the OpenAI-compatible server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield s
    finally:
        s.stop()


def remote_config(url: str) -> dict[str, Any]:
    return {"llm": {"models": [{"name": "remote", "backend": "openai", "remote_name": "smollm2",
                               "base_url": url, "slots": 2}]}}


def test_chat_stream_and_schema_through_a_remote_core(server: Server, make_daemon) -> None:
    d: Daemon = make_daemon(config=remote_config(server.url))
    with d.client() as c:
        reply = c.chat("Say hello.", max_tokens=16)
        assert reply.core == "remote"
        assert reply.text
        assert reply.usage["prompt_tokens"] > 0 and reply.usage["completion_tokens"] > 0
        stream = c.chat("Tell me about rivers.", max_tokens=24, stream=True)
        pieces = list(stream)
        assert len(pieces) > 1
        assert "".join(pieces) == stream.result.text
        schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}},
                  "required": ["colour"]}
        reply = c.chat("Name a colour as JSON.", max_tokens=40,
                       response_format={"type": "json_object", "schema": schema})
        jsonschema.validate(reply.parsed, schema)
        assert json.loads(reply.text) == reply.parsed
        # min_tokens goes to the server, which holds back the end of the answer
        held = c.chat("Say hello.", max_tokens=60, min_tokens=60)
        assert held.usage["completion_tokens"] == 60


def test_a_dead_server_gives_a_retriable_error(make_daemon) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    d: Daemon = make_daemon(config=remote_config(dead))
    with d.client() as c:
        # said at once (not a Timeout at the call's deadline), and retriable
        with pytest.raises(errors.Unavailable, match="cannot reach the model server") as info:
            c.chat("hi", max_tokens=4, timeout=60)
        assert info.value.retriable


def test_remote_calls_are_preempted_text_based_and_resumed(server: Server, make_daemon) -> None:
    import threading

    config = remote_config(server.url)
    config["llm"]["models"][0]["slots"] = 1
    config["scheduler"] = {"policy": "rr", "quantum_tokens": 8}
    d: Daemon = make_daemon(config=config)
    out: dict[str, Any] = {}

    def streamed() -> None:
        with d.client(name="streamer", timeout=300) as c:
            stream = c.chat("Write a long story about a fox.", max_tokens=64, stream=True,
                            temperature=1.5, seed=1)
            out["pieces"] = list(stream)
            out["streamed"] = stream.result

    def plain(key: str) -> None:
        with d.client(name=key, timeout=300) as c:
            out[key] = c.chat("Write a long story about an owl.", max_tokens=48, temperature=1.5,
                              seed=2)

    first = threading.Thread(target=streamed)
    first.start()
    d.wait_for(lambda s: s["running"] == 1, what="the first call to run")
    others = [threading.Thread(target=plain, args=(k,)) for k in ("p1", "p2")]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(300)
    assert d.status()["preemptions"] > 0
    # what streamed before and after each suspension adds up to the answer
    assert "".join(out["pieces"]) == out["streamed"].text
    assert 0 < out["streamed"].usage["completion_tokens"] <= 64
    for key in ("p1", "p2"):
        assert out[key].text and out[key].finish_reason in ("stop", "length")


CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_through_a_remote_core_arrives_or_fails_named(
        server: Server, make_daemon, stream: bool) -> None:
    d: Daemon = make_daemon(config=remote_config(server.url))
    with d.client() as c:
        for max_tokens in (40, 120):
            try:
                if stream:
                    s = c.chat("What is 12 * 12 * 12? Use the calculator.", tools=[CALC],
                               tool_choice="required", max_tokens=max_tokens, stream=True)
                    pieces = list(s)
                    reply = s.result
                    # the calls come as deltas once whole, never as text
                    assert not any(isinstance(p, str) for p in pieces)
                    names = "".join(p.get("function", {}).get("name", "") for p in pieces)
                    assert names == "".join(t["function"]["name"] for t in reply.tool_calls)
                else:
                    reply = c.chat("What is 12 * 12 * 12? Use the calculator.", tools=[CALC],
                                   tool_choice="required", max_tokens=max_tokens)
            except errors.ToolCallIncomplete as exc:
                assert "'calculator'" in exc.message
                continue
            assert reply.finish_reason == "tool_calls" and reply.tool_calls
            for call in reply.tool_calls:
                jsonschema.validate(json.loads(call["function"]["arguments"]),
                                    CALC["function"]["parameters"])


def test_a_local_and_a_remote_model_each_answer_by_name(server: Server, make_daemon) -> None:
    """A mixed config: the embedded model on a llamacpp core, and a model of
    the OpenAI-compatible server on an openai core. Each name reaches its
    own backend, and the gateway lists both."""
    import httpx

    d: Daemon = make_daemon(config={"llm": {"models": [
        {"name": "local", "n_ctx": 512, "kv_mb": 48, "slots": 2},
        {"name": "remote", "backend": "openai", "remote_name": "smollm2",
         "base_url": server.url, "slots": 2}]}})
    with d.client() as c:
        local = c.chat("Say hello.", model="local", max_tokens=8)
        remote = c.chat("Say hello.", model="remote", max_tokens=8)
        default = c.chat("Say hello.", max_tokens=4)
    assert (local.core, remote.core, default.core) == ("local", "remote", "local")
    assert local.usage["completion_tokens"] > 0 and remote.usage["completion_tokens"] > 0
    models = {m["name"]: m for m in d.status()["models"]}
    assert models["remote"]["backend"] == "openai" and models["remote"]["source"] == server.url
    assert models["remote"]["remote_name"] == "smollm2" and models["local"]["backend"] == "llamacpp"
    key = json.loads(d.ctl("keys", "create", "mixed", "--json").stdout)["key"]
    url = d.status()["gateway"]["url"]
    listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert [m["id"] for m in listed.json()["data"]] == ["local", "remote"]
