"""The tool worker: the registry behind the shared worker runtime.

``tool.list``  body ``{}`` -> ``{"tools": [openai_schema, ...]}`` (sorted by
name; each ``{"type": "function", "function": {"name", "description",
"parameters"}, "aios": {"concurrency", "timeout", "read_only",
"destructive"}}``).

``tool.call``  body ``{"name": str, "arguments": {...}}`` -> ``{"name",
"result"}``. The arguments are validated against the tool's schema before it
runs (InvalidArgument names the field and the rule; an unknown tool is
NotFound listing the tools). Each tool runs with its timeout enforced: past
it (or past the call's deadline, if sooner) the call fails with Timeout
naming the tool. Tools that enforce their deadline themselves (the
built-ins -- the python sandbox kills its process -- and MCP tools, whose
request is cancelled) run on the handler's thread; entry-point tools run on
a thread of their own, which is abandoned (its result discarded) when they
overrun. An error a tool raises that is not an AIOS error becomes
BackendError.

Per-tool concurrency is enforced by the scheduler, which reads the tools'
limits from this worker's READY ``info["tools"]`` and does not dispatch to a
saturated tool; it also asks a person before a tool flagged destructive runs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import msgpack

from libaios.errors import AIOSError, BackendError, Cancelled, Timeout, TooLarge
from libaios.protocol import MAX_BODY_BYTES, MsgType

from ..config import Config, ToolsConfig
from ..kernel_client import KernelClient
from ..worker import Handler, Task, WorkerRuntime
from .builtins import builtin_tools
from .figures import ToolFigures
from .mcp_tools import McpBridge
from .registry import Context, Registry, Tool
from .sandbox import landlock_status

log = logging.getLogger(__name__)

#: results nest at most this deep (the wire refuses deeper bodies)
MAX_RESULT_DEPTH = 24
#: a result may take this much of a reply body
MAX_RESULT_BYTES = MAX_BODY_BYTES - 64 * 1024
MIN_CAPACITY = 8


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as data the wire carries: maps with string keys, lists,
    strings, bytes, 64-bit integers, floats, booleans and None. Tuples and
    sets become lists, dataclasses and pydantic models maps, integers beyond
    64 bits and anything else strings."""
    if depth > MAX_RESULT_DEPTH:
        raise BackendError(f"the result nests deeper than {MAX_RESULT_DEPTH} levels",
                           retriable=False)
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [plain(v, depth + 1) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value), depth)
    if hasattr(value, "model_dump"):
        return plain(value.model_dump(mode="json"), depth)
    return str(value)


class ToolService:
    def __init__(self, registry: Registry):
        self.registry = registry
        #: entry-point tool threads still running after their call gave up
        self.abandoned = 0
        #: each tool's calls by outcome and their run time (for the metrics)
        self.figures = ToolFigures()

    def list(self, task: Task) -> dict[str, Any]:
        return {"tools": self.registry.schemas()}

    def call(self, task: Task) -> dict[str, Any]:
        tool = self.registry.get(task.body.get("name"))
        started = time.monotonic()
        outcome = "error"
        try:
            result = self._call(tool, task)
            outcome = "ok"
            return result
        except Timeout:
            outcome = "timeout"
            raise
        except Cancelled:
            outcome = "cancelled"
            raise
        finally:
            self.figures.record(tool.name, outcome, time.monotonic() - started)

    def _call(self, tool: Tool, task: Task) -> dict[str, Any]:
        body = task.body
        arguments = body.get("arguments")
        args = tool.check({} if arguments is None else arguments)
        now = time.time()
        deadline = now + tool.timeout
        if task.deadline is not None and task.deadline < deadline:
            deadline = task.deadline
        ctx = Context(agent=str(task.caller.get("agent", "")),
                      namespace=task.namespace or "", deadline=deadline,
                      cancelled=task.cancelled, approved=task.approved, tool=tool.name,
                      started=now)
        try:
            if tool.inline:
                result = tool.run(args, ctx)
            else:
                result = self._on_thread(tool, args, ctx)
        except AIOSError:
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as exc:   # sys.exit() in a tool too
            log.warning("tool %s failed: %s: %s", tool.name, type(exc).__name__, exc,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            raise BackendError(f"{tool.name} failed: {type(exc).__name__}: {exc}",
                               retriable=False) from None
        result = plain(result)
        size = len(msgpack.packb(result, use_bin_type=True))
        if size > MAX_RESULT_BYTES:
            raise TooLarge(f"{tool.name}: the result is {size} bytes; at most "
                           f"{MAX_RESULT_BYTES} fit in a reply")
        return {"name": tool.name, "result": result}

    def _on_thread(self, tool: Tool, args: dict[str, Any], ctx: Context) -> Any:
        box: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                box["value"] = tool.run(args, ctx)
            except BaseException as exc:  # handed to the waiting handler
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True).start()
        assert ctx.deadline is not None
        while not done.wait(max(0.0, min(0.1, ctx.deadline - time.time()))):
            if ctx.cancelled.is_set():
                self._abandon(tool, "cancelled")
                raise Cancelled(f"{tool.name}: the call was cancelled")
            if time.time() >= ctx.deadline:
                ctx.cancelled.set()  # ask it to stop, should it look
                self._abandon(tool, "timed out")
                raise Timeout(self._timeout_message(tool, ctx))
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _abandon(self, tool: Tool, why: str) -> None:
        self.abandoned += 1
        log.warning("tool %s %s; its thread is abandoned (%d so far)", tool.name, why,
                    self.abandoned)

    @staticmethod
    def _timeout_message(tool: Tool, ctx: Context) -> str:
        if ctx.started is not None and ctx.deadline is not None \
                and ctx.deadline < ctx.started + tool.timeout - 1e-3:
            return f"{tool.name}: the call's deadline passed while the tool ran"
        return f"{tool.name}: the tool ran past its timeout of {tool.timeout:g}s"

    def handlers(self) -> dict[MsgType, Handler]:
        return {MsgType.TOOL_LIST: self.list, MsgType.TOOL_CALL: self.call}

    def stats(self) -> dict[str, Any]:
        """What the worker's heartbeats carry to the scheduler."""
        return {"tools": self.figures.to_dict()}


def capacity_of(registry: Registry) -> int:
    """Slots for the worker: every tool at its concurrency limit at once."""
    return max(MIN_CAPACITY, sum(t.concurrency for t in registry.tools.values()))


def registry_of(cfg: ToolsConfig, kernel: KernelClient | None = None,
                mcp_tools: Iterable[Tool] = ()) -> Registry:
    """The registry ``cfg`` describes: built-ins, entry points, then the
    given MCP tools (connecting to servers is the bridge's business), with
    the limits applied."""
    registry = Registry()
    registry.add_all(builtin_tools(cfg, kernel))
    if cfg.entry_points:
        registry.load_entry_points()
    registry.add_all(mcp_tools)
    registry.apply_limits(cfg)
    return registry


def build(config: Config, kernel: KernelClient | None) -> tuple[Registry, McpBridge | None]:
    """The registry, and the bridge holding the MCP servers (if any)."""
    bridge = McpBridge(config.tools.mcp) if config.tools.mcp else None
    try:
        mcp_tools = bridge.start() if bridge is not None else []
        registry = registry_of(config.tools, kernel, mcp_tools)
    except BaseException:
        if bridge is not None:
            bridge.close()
        raise
    return registry, bridge


def serve(config: Config, endpoint: str) -> None:
    """Build the registry (starting the MCP servers) and serve it."""
    registry, bridge = build(config, KernelClient("tools"))
    if "python" in registry.tools:
        abi, why = landlock_status()
        if abi < 1:
            log.warning("the python tool will refuse to run: Landlock is not available (%s)", why)
    log.info("tools: %s", ", ".join(sorted(registry.tools)) or "none")
    service = ToolService(registry)
    try:
        WorkerRuntime(
            kind="tool", name="tools", capacity=capacity_of(registry), endpoint=endpoint,
            handlers=service.handlers(), heartbeat_interval=config.kernel.heartbeat_interval,
            info={"tools": registry.info()}, stats=service.stats,
            inline=frozenset({MsgType.SYS_NULL, MsgType.TOOL_LIST}),
        ).run()
    finally:
        if bridge is not None:
            bridge.close()
