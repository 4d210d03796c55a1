"""The gateway's MCP server at ``/mcp``: the kernel's services as MCP tools
(streamable HTTP, the ``mcp`` SDK's low-level server), each tool call a
system call of the agent the caller's API key belongs to.

Tools:

* ``memory_add``, ``memory_search``, ``memory_get``, ``memory_delete``, and
  ``storage_put``, ``storage_get``, ``storage_list``, ``storage_read_file``,
  ``storage_write_file``: the memory and storage system calls. Each takes an
  optional ``agent``, the name of another agent whose data to reach (the
  kernel allows that only within a group both are in, ``access.groups``).
* every tool of the kernel's registry (``tool.list``), under its own name
  (one that would be taken by the tools above becomes ``kernel_NAME``),
  with its JSON schema as input schema and its ``read_only`` and
  ``destructive`` flags as annotations, called through ``tool.call``: the
  kernel validates the arguments, asks for approvals and keeps the limits.

Who calls: every HTTP request must carry ``Authorization: Bearer KEY``.
Before the SDK sees a request, the key is checked with the kernel (an
``agent.whoami`` as the key's agent, so a revoked key is refused at once);
a request without a key, or with one the kernel refuses, is answered 401
with a JSON-RPC error saying why. The key then rides on the request as the
SDK's authenticated user, whose identity (the key's agent and the key's
hash) owns the session it opens: the SDK answers a request for that session
with another key 404, as if the session did not exist. A handler takes the
key from the HTTP request that carried its message, never from the session.

Nothing is decided here: the scheduler enforces who may reach what. A
kernel error becomes a tool error (``isError``) carrying the kernel's
message; bad arguments are refused before any call, naming the field.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import libaios
from libaios import errors
from libaios.protocol import MsgType

from ..config import Config
from .kernel import Kernel, bearer_key

log = logging.getLogger(__name__)

#: where the server is mounted (with and without a trailing slash)
PATH = "/mcp"
#: how long the key check may take, seconds
AUTH_TIMEOUT = 10.0
#: the JSON-RPC error code of a refused key (implementation-defined range)
UNAUTHORIZED = -32001
#: what a kernel tool is renamed to when its name is one of the services'
KERNEL_PREFIX = "kernel_"

INSTRUCTIONS = (
    "The services of an AIOS kernel, as the agent of your API key: runtime memory "
    "(memory_*: add, search by relevance, get, delete), durable storage (storage_*: "
    "versioned keys and files), and the kernel's tools. Pass 'agent' to reach another "
    "agent's memory or storage; the kernel allows that only within a group you share "
    "(access.groups). Destructive operations (deletes, overwrites, tools flagged "
    "destructive) may wait for an operator's approval."
)


# -- errors ------------------------------------------------------------------------


class ArgumentError(ValueError):
    """Arguments a tool cannot take; the message names the field."""


def tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


def kernel_error(exc: errors.AIOSError) -> types.CallToolResult:
    """The tool error of a failed system call: the kernel's message, its code."""
    code = exc.code.name.lower()
    result = tool_error(f"{code}: {exc.message}")
    result.structured_content = {"error": {"code": code, "message": exc.message,
                                           "retriable": exc.retriable}}
    return result


# -- values ------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A reply's value as JSON: bytes become ``{"base64": ...}``, map keys
    strings, tuples lists."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def success(structured: Any) -> types.CallToolResult:
    """A tool's result: its JSON as text, and as structured content (an
    object: anything else is wrapped as ``{"result": ...}``)."""
    structured = jsonable(structured)
    text = as_text(structured.get("result") if isinstance(structured, dict)
                   and set(structured) == {"result"} else structured)
    if not isinstance(structured, dict):
        structured = {"result": structured}
    return types.CallToolResult(content=[types.TextContent(text=text)],
                                structured_content=structured)


# -- the service tools -------------------------------------------------------------

AGENT = {"type": "string", "minLength": 1,
         "description": "another agent's name, to reach its data instead of your own "
                        "(allowed only within a group you share: access.groups)"}
VERSION = {"type": "integer", "minimum": 1,
           "description": "an earlier version to read (default: the latest)"}
ENCODINGS = ("utf-8", "base64")


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _file_data(args: dict[str, Any]) -> bytes:
    data, encoding = args["data"], args.get("encoding", "utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ArgumentError("storage_write_file: arguments.data is not valid base64 "
                                "(encoding is 'base64')") from None
    return data.encode("utf-8")


def _file_read(reply: dict[str, Any]) -> dict[str, Any]:
    """A file read back: its text if it is UTF-8, else base64."""
    data = reply.get("data", b"")
    out = {k: v for k, v in reply.items() if k != "data"}
    try:
        out.update(encoding="utf-8", data=bytes(data).decode("utf-8"))
    except UnicodeDecodeError:
        out.update(encoding="base64", data=base64.b64encode(bytes(data)).decode("ascii"))
    return out


@dataclass(frozen=True)
class ServiceTool:
    """An MCP tool that is one memory or storage system call."""

    name: str
    mtype: MsgType
    description: str
    properties: dict[str, Any]
    required: tuple[str, ...]
    body: Callable[[dict[str, Any]], dict[str, Any]]
    result: Callable[[dict[str, Any]], Any] = lambda reply: reply
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False

    @property
    def schema(self) -> dict[str, Any]:
        return {"type": "object", "properties": {**self.properties, "agent": AGENT},
                "required": list(self.required), "additionalProperties": False}

    def check(self, arguments: Any) -> dict[str, Any]:
        """``arguments`` if the schema takes them, else ArgumentError
        naming the field and the rule."""
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ArgumentError(f"{self.name}: the arguments must be an object")
        error = best_match(Draft202012Validator(self.schema).iter_errors(arguments))
        if error is not None:
            where = "arguments" + error.json_path[1:]
            raise ArgumentError(f"{self.name}: {where}: {error.message} "
                                f"(rule: {error.validator})")
        return arguments

    def mcp_tool(self) -> types.Tool:
        return types.Tool(
            name=self.name, description=self.description, input_schema=self.schema,
            annotations=types.ToolAnnotations(
                read_only_hint=self.read_only,
                destructive_hint=None if self.read_only else self.destructive,
                idempotent_hint=None if self.read_only else self.idempotent,
                open_world_hint=False))


SERVICE_TOOLS: dict[str, ServiceTool] = {t.name: t for t in (
    ServiceTool(
        "memory_add", MsgType.MEMORY_ADD,
        "Store an item of text (with optional metadata) in runtime memory; returns it "
        "with its id.",
        {"text": {"type": "string", "description": "the text to remember"},
         "metadata": {"type": "object", "description": "fields to filter searches on"}},
        ("text",),
        lambda a: _drop_none(text=a["text"], metadata=a.get("metadata") or {},
                             agent=a.get("agent"))),
    ServiceTool(
        "memory_search", MsgType.MEMORY_SEARCH,
        "Search runtime memory: the items ranked by relevance to the query (BM25), best "
        "first, each with a score; metadata filters match by equality.",
        {"query": {"type": "string", "description": "what to look for"},
         "filters": {"type": "object", "description": "metadata fields the items must have"},
         "limit": {"type": "integer", "minimum": 1, "description": "most items (default 10)"}},
        ("query",),
        lambda a: _drop_none(query=a["query"], filters=a.get("filters"), limit=a.get("limit"),
                             agent=a.get("agent")),
        read_only=True),
    ServiceTool(
        "memory_get", MsgType.MEMORY_GET,
        "Read one item of runtime memory by its id.",
        {"id": {"type": "string", "minLength": 1, "description": "the item's id"}},
        ("id",),
        lambda a: _drop_none(id=a["id"], agent=a.get("agent")),
        read_only=True),
    ServiceTool(
        "memory_delete", MsgType.MEMORY_DELETE,
        "Delete an item of runtime memory by its id (destructive: may wait for an "
        "operator's approval).",
        {"id": {"type": "string", "minLength": 1, "description": "the item's id"}},
        ("id",),
        lambda a: _drop_none(id=a["id"], agent=a.get("agent")),
        destructive=True, idempotent=True),
    ServiceTool(
        "storage_put", MsgType.STORAGE_PUT,
        "Store a JSON value under a key in durable storage; overwriting keeps the old "
        "version, and may wait for an operator's approval.",
        {"key": {"type": "string", "minLength": 1, "description": "the key"},
         "value": {"description": "any JSON value"}},
        ("key", "value"),
        lambda a: _drop_none(key=a["key"], value=a["value"], agent=a.get("agent")),
        destructive=True, idempotent=True),
    ServiceTool(
        "storage_get", MsgType.STORAGE_GET,
        "Read the value of a key in durable storage (bytes come back as "
        "{\"base64\": ...}).",
        {"key": {"type": "string", "minLength": 1, "description": "the key"},
         "version": VERSION},
        ("key",),
        lambda a: _drop_none(key=a["key"], version=a.get("version"), agent=a.get("agent")),
        read_only=True),
    ServiceTool(
        "storage_list", MsgType.STORAGE_LIST,
        "List the keys in durable storage (those that start with a prefix), with their "
        "latest versions.",
        {"prefix": {"type": "string", "description": "only keys that start with this"}},
        (),
        lambda a: _drop_none(prefix=a.get("prefix", ""), agent=a.get("agent")),
        read_only=True),
    ServiceTool(
        "storage_read_file", MsgType.STORAGE_READ_FILE,
        "Read a file from durable storage: its text if it is UTF-8 (encoding 'utf-8'), "
        "else its bytes in base64 (encoding 'base64').",
        {"path": {"type": "string", "minLength": 1, "description": "the file's path"},
         "version": VERSION},
        ("path",),
        lambda a: _drop_none(path=a["path"], version=a.get("version"), agent=a.get("agent")),
        result=_file_read, read_only=True),
    ServiceTool(
        "storage_write_file", MsgType.STORAGE_WRITE_FILE,
        "Write a file to durable storage; overwriting keeps the old version, and may "
        "wait for an operator's approval.",
        {"path": {"type": "string", "minLength": 1, "description": "the file's path"},
         "data": {"type": "string", "description": "the contents: text, or base64 with "
                                                   "encoding 'base64'"},
         "encoding": {"enum": list(ENCODINGS), "default": "utf-8",
                      "description": "how 'data' is given"}},
        ("path", "data"),
        lambda a: _drop_none(path=a["path"], data=_file_data(a), agent=a.get("agent")),
        destructive=True, idempotent=True),
)}


# -- the kernel's tools ------------------------------------------------------------


def mcp_name(kernel_name: str) -> str:
    """The MCP name of a kernel tool: its own, unless a service tool has it."""
    return KERNEL_PREFIX + kernel_name if kernel_name in SERVICE_TOOLS else kernel_name


def kernel_name(name: str) -> str:
    """The kernel tool an MCP name that is not a service tool's calls."""
    rest = name[len(KERNEL_PREFIX):]
    return rest if name.startswith(KERNEL_PREFIX) and rest in SERVICE_TOOLS else name


def kernel_tool(entry: dict[str, Any]) -> types.Tool | None:
    """The MCP tool of one ``tool.list`` entry (None if it names no tool)."""
    function = entry.get("function") if isinstance(entry, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    schema = function.get("parameters")
    schema = dict(schema) if isinstance(schema, dict) else {}
    schema.setdefault("type", "object")
    flags = entry.get("aios") if isinstance(entry.get("aios"), dict) else {}
    read_only = bool(flags.get("read_only", False))
    return types.Tool(
        name=mcp_name(function["name"]), description=function.get("description") or None,
        input_schema=schema,
        annotations=types.ToolAnnotations(
            read_only_hint=read_only,
            destructive_hint=None if read_only else bool(flags.get("destructive", False))))


def tool_list(entries: list[dict[str, Any]]) -> list[types.Tool]:
    """The service tools, then the kernel's."""
    tools = [t.mcp_tool() for t in SERVICE_TOOLS.values()]
    for entry in entries:
        tool = kernel_tool(entry)
        if tool is not None:
            tools.append(tool)
    return tools


# -- the server --------------------------------------------------------------------


def header_schema(name: str) -> dict[str, Any] | None:
    """The schema the SDK checks a call's ``Mcp-Param-*`` headers against
    (2026-07-28). None for a kernel tool: nothing here routes on those
    headers, and looking its schema up would cost a ``tool.list`` per call."""
    service = SERVICE_TOOLS.get(name)
    return service.schema if service is not None else None


def caller_key(ctx: ServerRequestContext[Any, Any]) -> str:
    """The API key of the HTTP request that carried the message being handled."""
    request = ctx.request
    user = request.scope.get("user") if request is not None else None
    if not isinstance(user, AuthenticatedUser):
        raise MCPError(code=UNAUTHORIZED, message="no API key came with this request")
    return user.access_token.token


class McpServer:
    """The low-level MCP server, its session manager, and the ASGI endpoint
    that checks keys in front of it."""

    def __init__(self, config: Config, kernel: Kernel) -> None:
        self.kernel = kernel
        self.timeout = config.kernel.call_timeout
        # the SDK logs every session's id as it opens and ends, at INFO
        logging.getLogger("mcp.server").setLevel(logging.WARNING)
        self.server: Server[Any] = Server(
            "aios", version=libaios.__version__, title="AIOS", instructions=INSTRUCTIONS,
            on_list_tools=self.list_tools, on_call_tool=self.call_tool,
            get_tool_input_schema=header_schema)
        # DNS-rebinding checks (Host, Origin) are left off: every request
        # needs an API key, which a page a browser was lured to does not have
        self.manager = StreamableHTTPSessionManager(
            self.server, max_request_body_size=config.gateway.max_body_bytes)

    # MCP requests

    async def list_tools(self, ctx: ServerRequestContext[Any, Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        key = caller_key(ctx)
        try:
            reply = await self.kernel.call(key, MsgType.TOOL_LIST, {}, self.timeout)
        except errors.AIOSError as exc:
            # the services still work without the tool worker
            log.warning("tools/list: the kernel's tools are not listed: %s", exc.message)
            reply = {"tools": []}
        return types.ListToolsResult(tools=tool_list(reply.get("tools") or []))

    async def call_tool(self, ctx: ServerRequestContext[Any, Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        key = caller_key(ctx)
        try:
            service = SERVICE_TOOLS.get(params.name)
            if service is not None:
                body = service.body(service.check(params.arguments))
                reply = await self.kernel.call(key, service.mtype, body, self.timeout)
                return success(service.result(reply))
            reply = await self.kernel.call(
                key, MsgType.TOOL_CALL,
                {"name": kernel_name(params.name), "arguments": params.arguments or {}},
                self.timeout)
            return success(reply.get("result"))
        except ArgumentError as exc:
            return tool_error(str(exc))
        except errors.AIOSError as exc:
            return kernel_error(exc)
        except Exception as exc:   # a bug here must not end the session
            log.exception("MCP tool %s failed in the gateway", params.name)
            return tool_error(f"the gateway failed to make this call: "
                              f"{type(exc).__name__}: {exc}")

    # HTTP

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            key = bearer_key(Headers(scope=scope).get("authorization"),
                             " with every request to /mcp")
            who = await self.kernel.call(key, MsgType.AGENT_WHOAMI, {}, AUTH_TIMEOUT)
        except errors.AIOSError as exc:
            await refusal(exc)(scope, receive, send)
            return
        token = AccessToken(token=key, client_id=str(who.get("name", "")), scopes=[],
                            subject=hashlib.sha256(key.encode()).hexdigest())
        await self.manager.handle_request({**scope, "user": AuthenticatedUser(token)},
                                          receive, send)


#: HTTP status of a refused key check, by kernel error code
_REFUSAL_STATUS = {errors.Unauthenticated.code: 401, errors.PermissionDenied.code: 403,
                   errors.Overloaded.code: 429, errors.InvalidArgument.code: 400}


def refusal(exc: errors.AIOSError) -> JSONResponse:
    """The answer to a request whose key was not taken: a JSON-RPC error
    (which MCP clients show) with the HTTP status."""
    status = _REFUSAL_STATUS.get(exc.code, 503)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="aios", error="invalid_token"'
    return JSONResponse({"jsonrpc": "2.0", "id": None,
                         "error": {"code": UNAUTHORIZED if status == 401 else -32000,
                                   "message": exc.message}},
                        status_code=status, headers=headers)


def mount(app: Any, config: Config, kernel: Kernel) -> McpServer:
    """Serve the MCP server at /mcp and /mcp/ of ``app``; its session
    manager runs while :func:`running` holds."""
    server = McpServer(config, kernel)
    for path in (PATH, PATH + "/"):
        app.router.routes.append(Route(path, endpoint=server, include_in_schema=False))
    app.state.mcp = server
    return server


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[None]:
    """Run the MCP session manager of ``app`` (if it has one) meanwhile."""
    server = getattr(app.state, "mcp", None)
    if server is None:
        yield
        return
    async with server.manager.run():
        yield
