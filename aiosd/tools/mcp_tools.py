"""Tools from MCP servers over stdio, through the official ``mcp`` SDK.

The SDK is asynchronous and the worker's handlers run on threads, so one
event loop runs in a thread of its own and holds a session per configured
server; a call crosses over with ``run_coroutine_threadsafe``. A server
that fails to start is logged and its tools are absent. Tool names are
``SERVER__TOOL`` (letters, digits, '_' and '-' only, as function-calling
models expect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from typing import Any

from libaios.errors import BackendError, Timeout

from ..config import McpServerConfig
from .registry import Context, Tool

log = logging.getLogger(__name__)


def _name(server: str, tool: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}__{tool}")[:64]


class McpBridge:
    """Sessions with the configured MCP servers, on one event loop thread."""

    def __init__(self, servers: list[McpServerConfig]):
        self.servers = servers
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mcp", daemon=True)
        self.thread.start()
        self.sessions: dict[str, Any] = {}
        self._stack: contextlib.AsyncExitStack | None = None

    def _run(self, coro: Any, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _connect(self, server: McpServerConfig) -> list[Any]:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        assert self._stack is not None
        params = StdioServerParameters(command=server.command[0], args=list(server.command[1:]),
                                       env=dict(server.env) or None)
        read, write = await self._stack.enter_async_context(stdio_client(params))
        session = await self._stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        self.sessions[server.name] = session
        return list((await session.list_tools()).tools)

    async def _start(self) -> dict[str, list[Any]]:
        self._stack = contextlib.AsyncExitStack()
        found = {}
        for server in self.servers:
            try:
                found[server.name] = await asyncio.wait_for(self._connect(server), 30)
            except Exception as exc:  # a broken server costs only its own tools
                log.error("MCP server %s (%s) did not start: %s", server.name,
                          " ".join(server.command), exc)
        return found

    def tools(self) -> list[Tool]:
        """Connect to every server and return their tools."""
        found = self._run(self._start(), 120)
        out = []
        for server in self.servers:
            for spec in found.get(server.name, []):
                out.append(Tool(
                    name=_name(server.name, spec.name),
                    description=spec.description or f"{spec.name} from MCP server {server.name}",
                    parameters=spec.input_schema or {"type": "object", "properties": {}},
                    run=self._caller(server, spec.name),
                    concurrency=server.concurrency, timeout=server.timeout,
                    read_only=server.read_only, destructive=server.destructive,
                    source=f"mcp {server.name}",
                ))
        return out

    def _caller(self, server: McpServerConfig, tool: str) -> Any:
        def call(args: dict[str, Any], ctx: Context) -> Any:
            session = self.sessions[server.name]
            try:
                result = self._run(session.call_tool(tool, args), server.timeout)
            except TimeoutError:
                raise Timeout(f"{server.name}__{tool}: the MCP server did not answer within "
                              f"{server.timeout:g}s") from None
            texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
            if result.is_error:
                raise BackendError(f"{server.name}__{tool} failed: {' '.join(texts)}", retriable=False)
            out: dict[str, Any] = {"text": "\n".join(texts)}
            if result.structured_content is not None:
                out["structured"] = result.structured_content
            return out

        return call

    def close(self) -> None:
        if self._stack is not None:
            with contextlib.suppress(Exception):
                self._run(self._stack.aclose(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
