"""Tools from MCP servers over stdio, through the official ``mcp`` SDK.

The SDK is asynchronous and the worker's handlers are synchronous and run
on threads, so one asyncio event loop runs in a thread of its own. Each
configured server has a long-lived task on that loop that starts the server
(``stdio_client``), holds its ``ClientSession``, and closes both in the same
task when the bridge stops (anyio cancel scopes must be exited by the task
that entered them). A handler's call crosses over with
``asyncio.run_coroutine_threadsafe(...).result(timeout)``.

On Linux each server is started through ``mcp_launch.py``, so that it is
killed when the worker dies, even if it is hung then or never reads its
closed stdin. A server that fails to start is logged and its tools are absent:
nothing else notices. A server that dies later is started again (with back-off) the
next time one of its tools is called; its tool list is the one read at
start-up, which is what the worker announced to the scheduler.

Names: a tool ``T`` of server ``S`` is called ``S__T`` (two underscores):
OpenAI-style function names allow only letters, digits, '_' and '-' (at
most 64), so ``S.T`` would be refused by OpenAI-compatible backends. Other
characters become '_'.

Results: ``{"text": the text parts joined by newlines}``, plus
``"structuredContent"`` when the server gave one, plus ``"content"`` (the
other parts -- images, audio, resources -- as plain maps) when there are
any. A result flagged ``isError`` raises :class:`BackendError` with the
server's text.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from libaios.errors import AIOSError, BackendError, Cancelled, Timeout, Unavailable

from ..config import McpServerConfig
from .registry import Context, Tool

log = logging.getLogger(__name__)

#: the script that starts a server so that it dies with this process
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mcp_launch.py")

SEPARATOR = "__"
#: how long a server may take to start and list its tools
START_TIMEOUT = 30.0
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


def tool_name(server: str, tool: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}{SEPARATOR}{tool}")[:64]


@dataclass
class _Server:
    config: McpServerConfig
    session: Any = None
    tools: list[Any] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event | None = None
    failures: int = 0
    next_start: float = 0.0
    lock: asyncio.Lock | None = None


class McpBridge:
    """Sessions with the configured MCP servers, on one event loop thread."""

    def __init__(self, servers: list[McpServerConfig], start_timeout: float = START_TIMEOUT,
                 errlog: Any = None):
        self.start_timeout = start_timeout
        self.errlog = errlog if errlog is not None else sys.stderr
        self.servers = {s.name: _Server(s) for s in servers}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="mcp", daemon=True)
        self.thread.start()
        self._closed = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _submit(self, coro: Any, timeout: float | None, cancelled: threading.Event | None = None
                ) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                step = 0.1 if end is None else min(0.1, max(0.0, end - time.monotonic()))
                try:
                    return future.result(step)
                except FutureTimeout:
                    if cancelled is not None and cancelled.is_set():
                        raise Cancelled("the call was cancelled") from None
                    if end is not None and time.monotonic() >= end:
                        raise
        except BaseException:
            future.cancel()
            raise

    # -- the event loop's side ----------------------------------------------------

    async def _open(self, server: _Server, ready: asyncio.Future[None]) -> None:
        """Start ``server``, hold its session until told to stop, close it."""
        from mcp import ClientSession
        from mcp.client.stdio import stdio_client

        cfg = server.config
        assert server.stop is not None
        try:
            params = server_parameters(cfg)
            async with stdio_client(params, errlog=self.errlog) as (read, write), \
                    ClientSession(read, write) as session:
                await session.initialize()
                tools = []
                cursor = None
                while True:  # every page of the listing
                    if cursor is None:
                        page = await session.list_tools()
                    else:
                        from mcp.types import PaginatedRequestParams

                        page = await session.list_tools(
                            params=PaginatedRequestParams(cursor=cursor))
                    tools += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                server.session, server.tools = session, tools
                if not ready.done():
                    ready.set_result(None)
                await server.stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception)
                                    else RuntimeError(f"{type(exc).__name__}"))
            elif not isinstance(exc, asyncio.CancelledError):
                log.warning("MCP server %s stopped: %s: %s", cfg.name, type(exc).__name__, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            server.session = None

    async def _start(self, server: _Server) -> None:
        server.stop = asyncio.Event()
        server.lock = server.lock or asyncio.Lock()
        ready: asyncio.Future[None] = self.loop.create_future()
        server.task = self.loop.create_task(self._open(server, ready),
                                            name=f"mcp {server.config.name}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.start_timeout)
        except BaseException:
            server.task.cancel()
            await asyncio.gather(server.task, return_exceptions=True)
            server.task = None
            raise

    async def _start_all(self) -> None:
        async def one(server: _Server) -> None:
            try:
                await self._start(server)
            except BaseException as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    exc = TimeoutError(f"it did not answer within {self.start_timeout:g}s")
                log.error("MCP server %s (%s) did not start; its tools are absent: %s: %s",
                          server.config.name, " ".join(server.config.command),
                          type(exc).__name__, exc)
                if not isinstance(exc, Exception):
                    raise

        await asyncio.gather(*(one(s) for s in self.servers.values()))

    async def _stop(self, server: _Server) -> None:
        if server.stop is not None:
            server.stop.set()
        if server.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(server.task), 5)
            except BaseException:
                server.task.cancel()
                await asyncio.gather(server.task, return_exceptions=True)
            server.task = None

    async def _alive(self, server: _Server) -> bool:
        if server.session is None or server.task is None or server.task.done():
            return False
        try:
            await asyncio.wait_for(server.session.send_ping(), 5)
            return True
        except BaseException:
            return False

    async def _ensure(self, server: _Server) -> Any:
        """The server's session, starting it again if it died."""
        if server.session is not None and server.task is not None and not server.task.done():
            return server.session
        server.lock = server.lock or asyncio.Lock()
        async with server.lock:
            if server.session is not None and server.task is not None and not server.task.done():
                return server.session
            now = time.monotonic()
            if now < server.next_start:
                raise Unavailable(f"MCP server {server.config.name} is not running; it will "
                                  f"be started again in {server.next_start - now:.0f}s")
            await self._stop(server)
            log.info("starting MCP server %s again", server.config.name)
            try:
                await self._start(server)
            except BaseException as exc:
                backoff = RESTART_BACKOFF[min(server.failures, len(RESTART_BACKOFF) - 1)]
                server.failures += 1
                server.next_start = time.monotonic() + backoff
                if not isinstance(exc, Exception):
                    raise
                raise Unavailable(f"MCP server {server.config.name} is not running and did "
                                  f"not start again: {type(exc).__name__}: {exc}") from None
            server.failures = 0
            return server.session

    async def _call(self, server: _Server, tool: str, arguments: dict[str, Any]) -> Any:
        session = await self._ensure(server)
        try:
            return await session.call_tool(tool, arguments)
        except (asyncio.CancelledError, AIOSError):
            raise
        except Exception as exc:
            # An error from a live server is the tool's; from a dead one
            # (the SDK says "Connection closed") it is the server's.
            if not await self._alive(server):
                self._drop_session(server)
                raise Unavailable(f"MCP server {server.config.name} went away during the "
                                  f"call ({exc}); it will be started again on the next "
                                  "call") from None
            raise BackendError(f"MCP server {server.config.name}: {tool}: {exc}",
                               retriable=False) from None

    # -- the worker's side ------------------------------------------------------

    def start(self) -> list[Tool]:
        """Start every server (at once, each within the start timeout) and
        return the tools of those that started."""
        self._submit(self._start_all(), None)
        out = []
        for name, server in self.servers.items():
            for spec in server.tools:
                out.append(self._tool(server, spec))
            if server.session is not None:
                log.info("MCP server %s: %d tools", name, len(server.tools))
        return out

    def _tool(self, server: _Server, spec: Any) -> Tool:
        cfg = server.config
        name = tool_name(cfg.name, spec.name)
        annotations = getattr(spec, "annotations", None)
        # A server may mark a tool destructive (never the reverse: its word
        # that a tool is harmless is not trusted).
        destructive = cfg.destructive or getattr(annotations, "destructive_hint", None) is True
        schema = spec.input_schema if isinstance(spec.input_schema, dict) else {}
        schema = {k: v for k, v in schema.items() if k != "$schema"} or {"type": "object"}
        return Tool(
            name=name,
            description=spec.description or f"{spec.name}, from MCP server {cfg.name}",
            parameters=schema, run=self._caller(server, spec.name, name),
            concurrency=cfg.concurrency, timeout=cfg.timeout, read_only=cfg.read_only,
            destructive=destructive, source=f"mcp {cfg.name}", inline=True,
        )

    def _caller(self, server: _Server, tool: str, public: str) -> Any:
        def call(args: dict[str, Any], ctx: Context) -> Any:
            if self._closed:
                raise Unavailable(f"{public}: the MCP bridge is closed")
            timeout = ctx.remaining()
            try:
                result = self._submit(self._call(server, tool, args), timeout, ctx.cancelled)
            except FutureTimeout:
                self._recheck(server)
                raise Timeout(f"{public}: MCP server {server.config.name} did not answer "
                              f"in time ({timeout:.3g}s)") from None
            except Cancelled:
                raise Cancelled(f"{public}: the call was cancelled") from None
            return plain_result(public, result)

        return call

    @staticmethod
    def _drop_session(server: _Server) -> None:
        """Take ``server`` for gone: its next call starts it again."""
        server.session = None
        if server.stop is not None:
            server.stop.set()

    def _recheck(self, server: _Server) -> None:
        """After a call timed out: a server that does not answer a ping
        either is hung, and is started again on the next call (else every
        call would time out for as long as it hangs)."""
        async def recheck() -> None:
            if server.session is not None and not await self._alive(server):
                log.warning("MCP server %s does not answer: it will be started again on the "
                            "next call", server.config.name)
                self._drop_session(server)

        if not self._closed:
            asyncio.run_coroutine_threadsafe(recheck(), self.loop)

    def close(self) -> None:
        """Stop every server and the event loop."""
        if self._closed:
            return
        self._closed = True

        async def stop_all() -> None:
            await asyncio.gather(*(self._stop(s) for s in self.servers.values()),
                                 return_exceptions=True)

        try:
            self._submit(stop_all(), 15)
        except Exception as exc:
            log.warning("MCP servers did not all stop cleanly: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


def server_parameters(cfg: McpServerConfig) -> Any:
    """How the SDK starts the server of ``cfg``: on Linux, through the
    launcher (see the module doc)."""
    from mcp import StdioServerParameters

    program = shutil.which(cfg.command[0], path=cfg.env.get("PATH"))
    if program is None:
        raise FileNotFoundError(f"{cfg.command[0]}: no such program on the PATH")
    env = dict(cfg.env) or None
    if not sys.platform.startswith("linux"):
        return StdioServerParameters(command=program, args=list(cfg.command[1:]), env=env)
    # -I: the server's PYTHON* variables are its own, not the launcher's
    return StdioServerParameters(
        command=sys.executable, args=["-I", LAUNCHER, str(os.getpid()), program, *cfg.command[1:]],
        env=env)


def plain_result(name: str, result: Any) -> dict[str, Any]:
    """An MCP ``CallToolResult`` as plain data (see the module doc)."""
    texts, others = [], []
    for part in result.content or []:
        if getattr(part, "type", None) == "text":
            texts.append(part.text)
        else:
            others.append(part.model_dump(mode="json", by_alias=True, exclude_none=True))
    text = "\n".join(texts)
    if result.is_error:
        raise BackendError(f"{name} failed: {text or 'the server gave no reason'}",
                           retriable=False)
    out: dict[str, Any] = {"text": text}
    if result.structured_content is not None:
        out["structuredContent"] = result.structured_content
    if others:
        out["content"] = others
    return out
