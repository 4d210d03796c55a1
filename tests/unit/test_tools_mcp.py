"""MCP tools through the bridge, against a real stdio MCP server the tests
ship (tests/tools/mcp_server.py): listing, calls, error results, timeouts,
cancellation, a server that does not start, one that dies and is started
again, and the whole tool worker with an MCP server configured."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from aiosd import chat as chat_request
from aiosd.config import McpServerConfig, from_dict
from aiosd.tools.mcp_tools import McpBridge, tool_name
from aiosd.tools.registry import Context, Registry
from libaios import errors
from libaios.protocol import ErrorCode, MsgType

from .tool_worker import recv, send_task, serve_in_thread, stop

TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"
SERVER = str(TOOLS_DIR / "mcp_server.py")
BROKEN = str(TOOLS_DIR / "broken_mcp_server.py")
DEMO = {"demo__add", "demo__echo", "demo__fail", "demo__nap", "demo__freeze"}


def ctx(timeout: float = 20.0) -> Context:
    return Context(agent="a1", namespace="alice", deadline=time.time() + timeout, tool="t")


def server_pids() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True)
            if any("mcp_server.py" in part for part in p.cmdline())]


@pytest.fixture(scope="module")
def bridge() -> Iterator[tuple[McpBridge, Registry]]:
    with open(os.devnull, "w") as devnull:
        b = McpBridge([
            McpServerConfig(name="demo", command=[sys.executable, SERVER], timeout=10.0,
                            concurrency=3),
            McpServerConfig(name="broken", command=[sys.executable, BROKEN]),
            McpServerConfig(name="missing", command=["/nonexistent/mcp-server"]),
        ], start_timeout=30.0, errlog=devnull)
        try:
            reg = Registry()
            reg.add_all(b.start())
            yield b, reg
        finally:
            b.close()


def run(reg: Registry, name: str, arguments: dict[str, Any], c: Context | None = None) -> Any:
    tool = reg.get(name)
    return tool.run(tool.check(arguments), c or ctx())


def test_tools_are_listed_and_broken_servers_are_absent(bridge: Any) -> None:
    b, reg = bridge
    assert set(reg.tools) == DEMO
    add = reg.get("demo__add")
    assert add.description == "Add two integers."
    assert add.parameters["properties"]["a"]["type"] == "integer"
    assert add.parameters["required"] == ["a", "b"]
    assert (add.concurrency, add.timeout, add.source) == (3, 10.0, "mcp demo")
    assert b.servers["broken"].session is None and b.servers["missing"].session is None
    # the names and schemas go straight into a chat request
    req = chat_request.parse({"messages": [{"role": "user", "content": "add"}],
                              "tools": reg.schemas()})
    assert set(req.tool_names()) == DEMO


def test_a_missing_program_is_named_when_its_server_does_not_start(caplog: Any) -> None:
    with open(os.devnull, "w") as devnull, caplog.at_level("ERROR"):
        b = McpBridge([McpServerConfig(name="missing", command=["no-such-mcp-server"])],
                      start_timeout=60.0, errlog=devnull)
        try:
            assert b.start() == []
        finally:
            b.close()
    # said at once, not taken for a server that did not answer in time
    assert "no-such-mcp-server: no such program on the PATH" in caplog.text
    assert "did not answer" not in caplog.text


def test_names_are_function_call_safe() -> None:
    assert tool_name("demo", "add") == "demo__add"
    assert tool_name("my.server", "get weather/now") == "my_server__get_weather_now"
    assert len(tool_name("s" * 40, "t" * 40)) == 64


def test_calls(bridge: Any) -> None:
    _, reg = bridge
    assert run(reg, "demo__add", {"a": 2, "b": 3}) == {"text": "5",
                                                       "structuredContent": {"result": 5}}
    assert run(reg, "demo__echo", {"text": "héllo"})["text"] == "héllo"


def test_error_result_raises_backend_error_with_the_servers_text(bridge: Any) -> None:
    _, reg = bridge
    with pytest.raises(errors.BackendError) as info:
        run(reg, "demo__fail", {"reason": "the disk is on fire"})
    assert info.value.message.startswith("demo__fail failed: ")
    assert info.value.message.endswith("the disk is on fire")  # the server's own text
    assert info.value.retriable is False


def test_arguments_are_validated_before_the_server_sees_them(bridge: Any) -> None:
    _, reg = bridge
    with pytest.raises(errors.InvalidArgument,
                       match=r"^demo__add: arguments.a: 'x' is not of type 'integer'"):
        run(reg, "demo__add", {"a": "x", "b": 1})
    with pytest.raises(errors.InvalidArgument, match="'b' is a required property"):
        run(reg, "demo__add", {"a": 1})


def wait_for_file(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.02)


def test_timeout_then_the_server_still_answers(bridge: Any, tmp_path: Path) -> None:
    _, reg = bridge
    woke = tmp_path / "woke"
    with pytest.raises(errors.Timeout, match="^demo__nap: MCP server demo did not answer"):
        run(reg, "demo__nap", {"seconds": 30, "done": str(woke)}, ctx(timeout=0.5))
    assert not woke.exists()   # it did not wait for the nap to end
    assert run(reg, "demo__add", {"a": 1, "b": 1})["text"] == "2"


def test_cancellation(bridge: Any, tmp_path: Path) -> None:
    _, reg = bridge
    c = ctx()
    napping, woke = tmp_path / "napping", tmp_path / "woke"
    canceller = threading.Thread(target=lambda: (wait_for_file(napping), c.cancelled.set()))
    canceller.start()
    try:
        with pytest.raises(errors.Cancelled, match="^demo__nap: the call was cancelled"):
            run(reg, "demo__nap", {"seconds": 30, "mark": str(napping), "done": str(woke)}, c)
    finally:
        c.cancelled.set()
        canceller.join(60)
    assert napping.exists() and not woke.exists()   # cancelled mid-nap, not waited for


def test_concurrent_calls(bridge: Any) -> None:
    _, reg = bridge
    results: list[Any] = [None] * 6

    def one(i: int) -> None:
        results[i] = run(reg, "demo__add", {"a": i, "b": 100})["structuredContent"]["result"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [100 + i for i in range(6)]


def test_a_server_that_dies_is_started_again(bridge: Any) -> None:
    _, reg = bridge
    (pid,) = server_pids()
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(5) if psutil.pid_exists(pid) else None
    failures = 0
    for _ in range(3):
        try:
            assert run(reg, "demo__add", {"a": 20, "b": 22})["text"] == "42"
            break
        except errors.Unavailable as exc:  # the call that finds it dead says so
            assert "demo" in exc.message
            failures += 1
    else:
        pytest.fail("the server was not started again")
    assert failures <= 1
    assert server_pids() and server_pids() != [pid]


def test_a_server_that_hangs_is_started_again(bridge: Any) -> None:
    _, reg = bridge
    (pid,) = server_pids()
    with pytest.raises(errors.Timeout):
        run(reg, "demo__freeze", {"seconds": 120}, ctx(timeout=0.5))
    # its ping goes unanswered too: the next calls start it again (the
    # first may still find it hung, or find it gone)
    for _ in range(10):
        try:
            assert run(reg, "demo__add", {"a": 20, "b": 22}, ctx(timeout=10))["text"] == "42"
            break
        except (errors.Timeout, errors.Unavailable):
            time.sleep(1)
    else:
        pytest.fail("the hung server was not started again")
    assert server_pids() and server_pids() != [pid]


def test_close_stops_the_servers() -> None:
    with open(os.devnull, "w") as devnull:
        b = McpBridge([McpServerConfig(name="solo", command=[sys.executable, SERVER])],
                      errlog=devnull)
        before = set(server_pids())
        tools = b.start()
        assert {t.name for t in tools} == {"solo__add", "solo__echo", "solo__fail", "solo__nap",
                                           "solo__freeze"}
        started = set(server_pids()) - before
        assert len(started) == 1
        b.close()
        (pid,) = started
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the server outlived close()"
            time.sleep(0.05)
        with pytest.raises(errors.Unavailable, match="closed"):
            tools[0].run({"a": 1, "b": 2}, ctx())


# -- the whole worker --------------------------------------------------------------------


def test_worker_with_an_mcp_server(scheduler: Any) -> None:
    router, endpoint = scheduler
    config = from_dict({"kernel": {"heartbeat_interval": 0.1}, "tools": {
        "builtin": ["calculator"], "entry_points": False,
        "mcp": [{"name": "demo", "command": [sys.executable, SERVER], "concurrency": 2,
                 "destructive": True},
                {"name": "broken", "command": [sys.executable, BROKEN]}],
        "limits": [{"name": "demo__nap", "concurrency": 1, "timeout": 3.0}]}})
    thread = serve_in_thread(config, endpoint)
    try:
        ready = recv(router, timeout=60)
        assert ready.type is MsgType.WORKER_READY
        info = ready.body["info"]["tools"]
        assert set(info) == {"calculator"} | DEMO
        assert info["demo__add"] == {"concurrency": 2, "timeout": 30.0, "read_only": False,
                                     "destructive": True}
        assert info["demo__nap"] == {"concurrency": 1, "timeout": 3.0, "read_only": False,
                                     "destructive": True}
        send_task(router, MsgType.TOOL_CALL, {"name": "demo__add", "arguments": {"a": 2, "b": 3}})
        reply = recv(router, timeout=60)
        assert reply.type is MsgType.REPLY
        assert reply.body == {"name": "demo__add",
                              "result": {"text": "5", "structuredContent": {"result": 5}}}
        send_task(router, MsgType.TOOL_CALL, {"name": "demo__fail", "arguments": {"reason": "nope"}})
        reply = recv(router, timeout=60)
        assert reply.body["code"] == ErrorCode.BACKEND
        assert reply.body["message"].startswith("demo__fail failed: ")
        assert reply.body["message"].endswith(": nope")
    finally:
        stop(router, thread, timeout=20)
