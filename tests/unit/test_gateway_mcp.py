"""The gateway's MCP layer without a kernel: the tools it lists, how it
checks arguments and turns them into system calls, how replies and kernel
errors become MCP results, and how a request without a good key is
answered (a stand-in for the kernel connections)."""

from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace
from typing import Any

import mcp_types as types
import pytest
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.shared.exceptions import MCPError

from aiosd.config import Config
from aiosd.gateway import mcp_server as m
from libaios import errors
from libaios.protocol import MsgType


class FakeKernel:
    """Answers system calls from a table; remembers them."""

    def __init__(self, answers: dict[MsgType, Any] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, MsgType, dict[str, Any]]] = []

    async def call(self, key: str, mtype: MsgType, body: dict[str, Any],
                   timeout: float | None = None) -> dict[str, Any]:
        self.calls.append((key, mtype, body))
        answer = self.answers.get(mtype, {})
        if isinstance(answer, BaseException):
            raise answer
        return answer


def ctx_of(key: str | None) -> Any:
    """What a handler reads of its context: the HTTP request's user."""
    scope: dict[str, Any] = {}
    if key is not None:
        scope["user"] = AuthenticatedUser(AccessToken(token=key, client_id="a", scopes=[]))
    return SimpleNamespace(request=SimpleNamespace(scope=scope))


def server_with(kernel: FakeKernel) -> m.McpServer:
    return m.McpServer(Config(), kernel)   # type: ignore[arg-type]


def call(server: m.McpServer, name: str, arguments: Any, key: str = "k") -> types.CallToolResult:
    params = types.CallToolRequestParams(name=name, arguments=arguments)
    return asyncio.run(server.call_tool(ctx_of(key), params))


def text(result: types.CallToolResult) -> str:
    return result.content[0].text


# -- keys --------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc", "aios-sk-x"])
def test_bearer_key_missing(header: str | None) -> None:
    with pytest.raises(errors.Unauthenticated, match="Authorization: Bearer KEY"):
        m.bearer_key(header)


def test_bearer_key() -> None:
    assert m.bearer_key("Bearer aios-sk-abc") == "aios-sk-abc"
    assert m.bearer_key("bearer  aios-sk-abc ") == "aios-sk-abc"


def test_a_handler_without_a_key_refuses() -> None:
    with pytest.raises(MCPError, match="no API key"):
        m.caller_key(ctx_of(None))
    assert m.caller_key(ctx_of("aios-sk-1")) == "aios-sk-1"


def asgi(server: m.McpServer, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str],
                                                                          dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": headers,
             "query_string": b""}
    asyncio.run(server(scope, receive, send))
    start = sent[0]
    body = b"".join(s.get("body", b"") for s in sent[1:])
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            json.loads(body))


def test_no_key_is_401_with_a_json_rpc_error() -> None:
    kernel = FakeKernel()
    status, headers, body = asgi(server_with(kernel), [])
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert body["error"]["code"] == m.UNAUTHORIZED
    assert "Authorization: Bearer KEY" in body["error"]["message"]
    assert kernel.calls == []


@pytest.mark.parametrize("exc,status", [
    (errors.Unauthenticated("the API key is not valid"), 401),
    (errors.Overloaded("too many connections"), 429),
    (errors.NotRunning("aiosd is not running"), 503),
])
def test_a_refused_key(exc: errors.AIOSError, status: int) -> None:
    kernel = FakeKernel({MsgType.AGENT_WHOAMI: exc})
    got, _, body = asgi(server_with(kernel), [(b"authorization", b"Bearer aios-sk-x")])
    assert got == status and body["error"]["message"] == exc.message
    assert kernel.calls == [("aios-sk-x", MsgType.AGENT_WHOAMI, {})]


# -- the tools ---------------------------------------------------------------------

KERNEL_TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "sums",
                                      "parameters": {"type": "object",
                                                     "properties": {"expression": {}}}},
     "aios": {"read_only": True, "destructive": False}},
    {"type": "function", "function": {"name": "wipe", "description": "",
                                      "parameters": {}},
     "aios": {"read_only": False, "destructive": True}},
    {"type": "function", "function": {"name": "memory_add", "parameters": {"type": "object"}},
     "aios": {}},
    {"type": "function", "function": {"description": "no name"}},
    "not a tool",
]


def test_tool_list() -> None:
    tools = {t.name: t for t in m.tool_list(KERNEL_TOOLS)}
    assert set(m.SERVICE_TOOLS) <= set(tools)
    calc = tools["calculator"]
    assert calc.input_schema["properties"] == {"expression": {}}
    assert calc.annotations.read_only_hint is True and calc.annotations.destructive_hint is None
    wipe = tools["wipe"]
    assert wipe.input_schema == {"type": "object"} and wipe.description is None
    assert wipe.annotations.read_only_hint is False and wipe.annotations.destructive_hint is True
    # a kernel tool with a service's name is listed under another
    assert tools["kernel_memory_add"].description is None
    assert tools["memory_add"].description == m.SERVICE_TOOLS["memory_add"].description
    assert len(tools) == len(m.SERVICE_TOOLS) + 3
    for tool in tools.values():
        types.Tool.model_validate(tool.model_dump(by_alias=True))


def test_service_annotations() -> None:
    read_only = {n for n, t in m.SERVICE_TOOLS.items() if t.read_only}
    assert read_only == {"memory_search", "memory_get", "storage_get", "storage_list",
                         "storage_read_file"}
    delete = m.SERVICE_TOOLS["memory_delete"].mcp_tool().annotations
    assert delete.destructive_hint is True and delete.read_only_hint is False
    for tool in m.SERVICE_TOOLS.values():
        assert tool.schema["properties"]["agent"]["type"] == "string"
        assert tool.schema["additionalProperties"] is False


def test_names_both_ways() -> None:
    assert m.mcp_name("calculator") == "calculator"
    assert m.mcp_name("memory_add") == "kernel_memory_add"
    assert m.kernel_name("kernel_memory_add") == "memory_add"
    assert m.kernel_name("kernel_other") == "kernel_other"
    assert m.kernel_name("calculator") == "calculator"


@pytest.mark.parametrize("name,arguments,needle", [
    ("memory_add", {}, "arguments: 'text' is a required property"),
    ("memory_add", {"text": 3}, "arguments.text: 3 is not of type 'string'"),
    ("memory_add", {"text": "x", "colour": "red"}, "'colour' was unexpected"),
    ("memory_search", {"query": "x", "limit": 0}, "arguments.limit"),
    ("storage_get", {"key": "k", "version": "2"}, "arguments.version"),
    ("storage_write_file", {"path": "p", "data": "x", "encoding": "latin-1"},
     "arguments.encoding"),
    ("memory_get", {"id": "x", "agent": ""}, "arguments.agent"),
    ("storage_put", {"key": "k"}, "'value' is a required property"),
])
def test_bad_arguments_name_the_field(name: str, arguments: dict[str, Any], needle: str) -> None:
    with pytest.raises(m.ArgumentError) as caught:
        m.SERVICE_TOOLS[name].check(arguments)
    assert needle in str(caught.value) and str(caught.value).startswith(name)


def test_arguments_must_be_an_object() -> None:
    with pytest.raises(m.ArgumentError, match="must be an object"):
        m.SERVICE_TOOLS["storage_list"].check([1])
    assert m.SERVICE_TOOLS["storage_list"].check(None) == {}


# -- calls -------------------------------------------------------------------------


def test_service_calls_are_system_calls() -> None:
    item = {"id": "i1", "text": "hi", "metadata": {}}
    kernel = FakeKernel({MsgType.MEMORY_ADD: {"item": item},
                         MsgType.MEMORY_SEARCH: {"items": [item]}})
    server = server_with(kernel)
    result = call(server, "memory_add", {"text": "hi"}, key="aios-sk-a")
    assert not result.is_error and result.structured_content == {"item": item}
    assert json.loads(text(result)) == {"item": item}
    call(server, "memory_search", {"query": "hi", "agent": "bob", "limit": 3})
    assert kernel.calls == [
        ("aios-sk-a", MsgType.MEMORY_ADD, {"text": "hi", "metadata": {}}),
        ("k", MsgType.MEMORY_SEARCH, {"query": "hi", "limit": 3, "agent": "bob"}),
    ]


def test_files_in_and_out() -> None:
    kernel = FakeKernel({MsgType.STORAGE_WRITE_FILE: {"path": "p", "version": 1},
                         MsgType.STORAGE_READ_FILE: {"path": "p", "data": b"\xff\x00",
                                                     "version": 2, "updated": 1.0}})
    server = server_with(kernel)
    call(server, "storage_write_file", {"path": "p", "data": "héllo"})
    call(server, "storage_write_file", {"path": "p", "data": "/wA=", "encoding": "base64"})
    assert [c[2]["data"] for c in kernel.calls] == ["héllo".encode(), b"\xff\x00"]
    result = call(server, "storage_read_file", {"path": "p"})
    assert result.structured_content == {"path": "p", "version": 2, "updated": 1.0,
                                         "encoding": "base64", "data": "/wA="}
    bad = call(server, "storage_write_file", {"path": "p", "data": "!!", "encoding": "base64"})
    assert bad.is_error and "not valid base64" in text(bad)
    assert len(kernel.calls) == 3   # the bad one made no call


def test_file_read_as_text() -> None:
    assert m._file_read({"path": "p", "data": "é".encode()}) == {"path": "p", "encoding": "utf-8",
                                                                  "data": "é"}


def test_kernel_tool_calls() -> None:
    kernel = FakeKernel({MsgType.TOOL_CALL: {"name": "calculator", "result": 42}})
    server = server_with(kernel)
    result = call(server, "calculator", {"expression": "6*7"})
    assert text(result) == "42" and result.structured_content == {"result": 42}
    call(server, "kernel_memory_add", None)
    assert [c[2] for c in kernel.calls] == [
        {"name": "calculator", "arguments": {"expression": "6*7"}},
        {"name": "memory_add", "arguments": {}}]


def test_kernel_errors_are_tool_errors() -> None:
    denied = errors.PermissionDenied("bob may not read alice's data")
    server = server_with(FakeKernel({MsgType.STORAGE_GET: denied}))
    result = call(server, "storage_get", {"key": "k", "agent": "alice"})
    assert result.is_error
    assert text(result) == "permission_denied: bob may not read alice's data"
    assert result.structured_content["error"]["code"] == "permission_denied"


def test_a_bug_is_a_tool_error_not_a_crash() -> None:
    server = server_with(FakeKernel({MsgType.TOOL_CALL: RuntimeError("boom")}))
    result = call(server, "calculator", {})
    assert result.is_error and "RuntimeError: boom" in text(result)


def test_list_tools_without_the_tool_worker() -> None:
    server = server_with(FakeKernel({MsgType.TOOL_LIST: errors.Unavailable("no tool worker")}))
    result = asyncio.run(server.list_tools(ctx_of("k"), None))
    assert [t.name for t in result.tools] == list(m.SERVICE_TOOLS)


# -- values ------------------------------------------------------------------------


def test_jsonable() -> None:
    assert m.jsonable({"a": b"\x00", 1: (1, [b"x"])}) == {
        "a": {"base64": "AA=="}, "1": [1, [{"base64": base64.b64encode(b"x").decode()}]]}


@pytest.mark.parametrize("value,structured,shown", [
    ({"a": 1}, {"a": 1}, '{"a": 1}'),
    ("plain text", {"result": "plain text"}, "plain text"),
    ([1, 2], {"result": [1, 2]}, "[1, 2]"),
    (None, {"result": None}, "null"),
    ({"result": "x"}, {"result": "x"}, "x"),
])
def test_success(value: Any, structured: Any, shown: str) -> None:
    result = m.success(value)
    assert not result.is_error and result.structured_content == structured
    assert text(result) == shown
