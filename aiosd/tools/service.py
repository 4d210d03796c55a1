"""The tool worker: the registry behind the shared worker runtime.

Each tool runs with its timeout enforced: the call fails with a Timeout
naming the tool when it runs past it (the sandbox kills its process; an
in-process tool is left to finish on its thread, its result discarded).
Per-tool concurrency is enforced by the scheduler, which reads the limits
from this worker's READY and does not dispatch to a saturated tool.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

from libaios.errors import Timeout
from libaios.protocol import MsgType

from ..config import Config
from ..kernel_client import KernelClient
from ..worker import Handler, Task, WorkerRuntime
from .builtins import builtin_tools
from .mcp_tools import McpBridge
from .registry import Context, Registry

log = logging.getLogger(__name__)


class ToolService:
    def __init__(self, registry: Registry, threads: int):
        self.registry = registry
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                          thread_name_prefix="tool")

    def list(self, task: Task) -> dict[str, Any]:
        return {"tools": self.registry.schemas()}

    def call(self, task: Task) -> dict[str, Any]:
        tool = self.registry.get(task.body.get("name"))
        args = tool.check(task.body.get("arguments", {}))
        deadline = time.time() + tool.timeout
        if task.deadline is not None:
            deadline = min(deadline, task.deadline)
        ctx = Context(agent=task.caller.get("agent", ""), namespace=task.namespace or "",
                      deadline=deadline, cancelled=task.cancelled.is_set)
        future = self.pool.submit(tool.run, args, ctx)
        try:
            result = future.result(timeout=max(0.0, deadline - time.time()))
        except concurrent.futures.TimeoutError:
            raise Timeout(f"tool {tool.name} ran past its timeout of {tool.timeout:g}s") from None
        return {"name": tool.name, "result": result}

    def handlers(self) -> dict[MsgType, Handler]:
        return {MsgType.TOOL_LIST: self.list, MsgType.TOOL_CALL: self.call}


def build_registry(config: Config, kernel: KernelClient) -> tuple[Registry, McpBridge | None]:
    registry = Registry()
    for tool in builtin_tools(config.tools, kernel):
        registry.add(tool)
    if config.tools.entry_points:
        registry.load_entry_points()
    bridge = None
    if config.tools.mcp:
        bridge = McpBridge(config.tools.mcp)
        for tool in bridge.tools():
            registry.add(tool)
    registry.apply_limits(config.tools)
    return registry, bridge


def serve(config: Config, endpoint: str) -> None:
    registry, bridge = build_registry(config, KernelClient("tools"))
    capacity = max(8, sum(t.concurrency for t in registry.tools.values()))
    service = ToolService(registry, capacity)
    try:
        WorkerRuntime(
            kind="tool", name="tools", capacity=capacity, endpoint=endpoint,
            handlers=service.handlers(), heartbeat_interval=config.kernel.heartbeat_interval,
            info={"tools": registry.info()},
        ).run()
    finally:
        service.pool.shutdown(wait=False, cancel_futures=True)
        if bridge is not None:
            bridge.close()
