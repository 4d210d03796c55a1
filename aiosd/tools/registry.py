"""The tool registry: every tool's schema, limits and flags, and argument
validation (jsonschema) before a tool runs.

A tool comes from one of three places: the built-ins, a Python entry point
of group ``aios.tools``, or an MCP server. An entry point loads either to a
:class:`Tool` or to a plain function carrying an ``__aios_tool__`` dict
(``description``, ``parameters`` JSON Schema, and optionally
``concurrency``, ``timeout``, ``read_only``, ``destructive``); the function
is called with the validated arguments as keyword arguments.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema

from libaios.errors import InvalidArgument, NotFound

from ..config import ToolsConfig

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "aios.tools"


@dataclass
class Context:
    """What a running tool knows of its call."""

    agent: str
    namespace: str
    deadline: float | None
    cancelled: Callable[[], bool] = lambda: False


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], Context], Any]
    concurrency: int = 4
    timeout: float = 30.0
    read_only: bool = False
    destructive: bool = False
    source: str = "builtin"
    _validator: Any = field(default=None, repr=False)

    def validator(self) -> jsonschema.Draft202012Validator:
        if self._validator is None:
            self._validator = jsonschema.Draft202012Validator(self.parameters)
        return self._validator

    def check(self, arguments: Any) -> dict[str, Any]:
        """Validate ``arguments``; an error names the field and the rule."""
        if not isinstance(arguments, dict):
            raise InvalidArgument(f"{self.name}: arguments must be a map")
        error = jsonschema.exceptions.best_match(self.validator().iter_errors(arguments))
        if error is not None:
            where = error.json_path.replace("$", "arguments", 1)
            raise InvalidArgument(f"{self.name}: {where}: {error.message} (rule: {error.validator})")
        return arguments

    def flags(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "timeout": self.timeout,
                "read_only": self.read_only, "destructive": self.destructive}

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description,
                         "parameters": self.parameters},
            "aios": {**self.flags(), "source": self.source},
        }


def _from_entry_point(ep: Any) -> Tool:
    obj = ep.load()
    if isinstance(obj, Tool):
        return replace(obj, source=f"entry point {ep.value}")
    spec = getattr(obj, "__aios_tool__", None)
    if not callable(obj) or not isinstance(spec, dict):
        raise TypeError(f"{ep.value} is neither a Tool nor a function with __aios_tool__")
    return Tool(
        name=ep.name, description=spec.get("description", obj.__doc__ or ""),
        parameters=spec.get("parameters", {"type": "object", "properties": {}}),
        run=lambda args, ctx, fn=obj: fn(**args),
        concurrency=int(spec.get("concurrency", 4)), timeout=float(spec.get("timeout", 30.0)),
        read_only=bool(spec.get("read_only", False)), destructive=bool(spec.get("destructive", False)),
        source=f"entry point {ep.value}",
    )


class Registry:
    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}

    def add(self, tool: Tool) -> None:
        jsonschema.Draft202012Validator.check_schema(tool.parameters)
        if tool.name in self.tools:
            log.warning("tool %s from %s replaces the one from %s", tool.name, tool.source,
                        self.tools[tool.name].source)
        self.tools[tool.name] = tool

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                self.add(_from_entry_point(ep))
            except Exception as exc:  # one broken plug-in must not cost the others
                log.error("tool entry point %s (%s) is unusable: %s", ep.name, ep.value, exc)

    def apply_limits(self, cfg: ToolsConfig) -> None:
        for limit in cfg.limits:
            tool = self.tools.get(limit.name)
            if tool is None:
                log.warning("tools.limits names %r, which is not a tool", limit.name)
                continue
            self.tools[limit.name] = replace(
                tool, concurrency=limit.concurrency, timeout=limit.timeout,
                read_only=limit.read_only or tool.read_only,
                destructive=limit.destructive or tool.destructive, _validator=None)

    def get(self, name: Any) -> Tool:
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            raise NotFound(f"no tool {name!r}; the tools are: {', '.join(sorted(self.tools))}")
        return tool

    def schemas(self) -> list[dict[str, Any]]:
        return [self.tools[n].openai_schema() for n in sorted(self.tools)]

    def info(self) -> dict[str, dict[str, Any]]:
        return {name: tool.flags() for name, tool in self.tools.items()}
