"""The tool registry: every tool's schema, limits and flags, the tools of
the ``aios.tools`` entry point group, ``tools.limits`` applied over them, and
argument validation (jsonschema, Draft 2020-12) before a tool runs.

Where tools come from, and the contract a third-party tool follows (a
:class:`Tool`, or a function marked with :func:`aios_tool`):
docs/tools.md.
"""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import logging
import re
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from libaios.errors import InvalidArgument, NotFound

from ..config import ToolsConfig

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "aios.tools"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class Context:
    """What a running tool knows of its call."""

    agent: str = ""
    #: the calling agent's name, which is its storage namespace
    namespace: str = ""
    #: epoch seconds by which the tool must be done (its timeout, or the
    #: call's deadline if that is sooner)
    deadline: float | None = None
    #: set when the call is cancelled or abandoned: a tool should stop
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: a person approved this call's destructive effects
    approved: bool = False
    #: the tool's name
    tool: str = ""
    #: epoch seconds when the tool started
    started: float | None = None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None."""
        return None if self.deadline is None else max(0.0, self.deadline - time.time())


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
    #: where it came from ("builtin", "entry point pkg:fn", "mcp SERVER")
    source: str = "builtin"
    #: the tool enforces its own deadline and cancellation (see Context), so
    #: the service runs it on the calling thread; others run on a thread of
    #: their own that is abandoned past the timeout
    inline: bool = False
    _validator: Any = field(default=None, repr=False, compare=False)

    def validator(self) -> jsonschema.Draft202012Validator:
        if self._validator is None:
            self._validator = jsonschema.Draft202012Validator(self.parameters)
        return self._validator

    def check(self, arguments: Any) -> dict[str, Any]:
        """Validate ``arguments`` against the tool's schema; an error names
        the field (as a path under ``arguments``) and the rule it broke."""
        if not isinstance(arguments, dict):
            raise InvalidArgument(f"{self.name}: arguments must be a map, "
                                  f"not {type(arguments).__name__}")
        error = best_match(self.validator().iter_errors(arguments))
        if error is not None:
            where = "arguments" + error.json_path[1:]
            raise InvalidArgument(f"{self.name}: {where}: {error.message} "
                                  f"(rule: {error.validator})",
                                  details={"tool": self.name, "path": where,
                                           "rule": str(error.validator)})
        return arguments

    def flags(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "timeout": self.timeout,
                "read_only": self.read_only, "destructive": self.destructive}

    def openai_schema(self) -> dict[str, Any]:
        """The tool as OpenAI-style function calling describes it, plus
        AIOS's limits under "aios" (outside "function", so the whole entry
        can go straight into ``chat(tools=...)``)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description,
                         "parameters": copy.deepcopy(self.parameters)},
            "aios": self.flags(),
        }


# -- entry points ---------------------------------------------------------------

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               list: "array", dict: "object",
                               "str": "string", "int": "integer", "float": "number",
                               "bool": "boolean", "list": "array", "dict": "object"}


def _json_type(annotation: Any) -> str | None:
    """The JSON type of a simple annotation (``X``, ``X | None``,
    ``Optional[X]``, as objects or as strings), else None."""
    if isinstance(annotation, str):
        parts = [a.strip() for a in annotation.replace("Optional[", "").rstrip("]").split("|")]
        parts = [a for a in parts if a != "None"]
        return _JSON_TYPES.get(parts[0]) if len(parts) == 1 else None
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _json_type(args[0]) if len(args) == 1 else None
    return _JSON_TYPES.get(annotation)


def parameters_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    """A JSON Schema for ``fn``'s keyword arguments, from its annotations
    (str, int, float, bool, list, dict, or one of those or None; anything
    else accepts any value). Parameters without a default are required."""
    props: dict[str, Any] = {}
    required = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        kind = _json_type(p.annotation)
        props[p.name] = {"type": kind} if kind else {}
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def aios_tool(description: str | None = None, parameters: dict[str, Any] | None = None,
              **flags: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as an AIOS tool (sets ``__aios_tool__``)."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        spec: dict[str, Any] = dict(flags)
        if description is not None:
            spec["description"] = description
        if parameters is not None:
            spec["parameters"] = parameters
        fn.__aios_tool__ = spec  # type: ignore[attr-defined]
        return fn

    return mark


def tool_from_object(name: str, obj: Any, source: str) -> Tool:
    """A :class:`Tool` from what an entry point loaded (see docs/tools.md)."""
    if isinstance(obj, Tool):
        return replace(obj, source=source, _validator=None)
    spec = getattr(obj, "__aios_tool__", None)
    if not callable(obj) or not isinstance(spec, dict):
        raise TypeError("it is neither a Tool nor a function with an __aios_tool__ dict")
    description = spec.get("description") or inspect.getdoc(obj) or name
    parameters = spec.get("parameters") or parameters_from_signature(obj)
    return Tool(
        name=name, description=str(description), parameters=parameters,
        run=lambda args, ctx, fn=obj: fn(**args),
        concurrency=int(spec.get("concurrency", 4)), timeout=float(spec.get("timeout", 30.0)),
        read_only=bool(spec.get("read_only", False)),
        destructive=bool(spec.get("destructive", False)), source=source,
    )


# -- the registry -----------------------------------------------------------------


class Registry:
    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}

    def add(self, tool: Tool) -> bool:
        """Register ``tool``; refuse (log, return False) a bad or taken name,
        a schema that is not valid JSON Schema, or bad limits."""
        if not isinstance(tool.name, str) or not NAME_RE.match(tool.name):
            log.error("tool %r from %s refused: a tool name is 1-64 letters, digits, '_' or '-'",
                      tool.name, tool.source)
            return False
        if tool.name in self.tools:
            log.error("tool %s from %s refused: the name is taken by the tool from %s",
                      tool.name, tool.source, self.tools[tool.name].source)
            return False
        try:
            if not isinstance(tool.parameters, dict):
                raise jsonschema.SchemaError("the parameters schema is not an object")
            jsonschema.Draft202012Validator.check_schema(tool.parameters)
        except jsonschema.SchemaError as exc:
            log.error("tool %s from %s refused: its parameters are not a valid JSON schema: %s",
                      tool.name, tool.source, exc.message)
            return False
        if tool.concurrency < 1 or tool.timeout <= 0:
            log.error("tool %s from %s refused: concurrency must be >= 1 and timeout > 0",
                      tool.name, tool.source)
            return False
        self.tools[tool.name] = tool
        return True

    def add_all(self, tools: Iterable[Tool]) -> None:
        for tool in tools:
            self.add(tool)

    def load_entry_points(self) -> None:
        """Add the tools of the ``aios.tools`` entry point group; a broken
        plug-in is logged and costs only its own tool."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                tool = tool_from_object(ep.name, ep.load(), f"entry point {ep.value}")
            except Exception as exc:
                log.error("tool entry point %s (%s) is unusable: %s: %s", ep.name, ep.value,
                          type(exc).__name__, exc)
                continue
            self.add(tool)

    def apply_limits(self, cfg: ToolsConfig) -> None:
        """Apply ``tools.limits``: what an entry gives replaces the tool's
        own; what it leaves out stays."""
        for limit in cfg.limits:
            tool = self.tools.get(limit.name)
            if tool is None:
                log.warning("tools.limits names %r, which is not a tool here (the tools: %s)",
                            limit.name, ", ".join(sorted(self.tools)))
                continue
            given = {"concurrency": limit.concurrency, "timeout": limit.timeout,
                     "destructive": limit.destructive, "read_only": limit.read_only}
            self.tools[limit.name] = replace(
                tool, **{k: v for k, v in given.items() if v is not None})

    def get(self, name: Any) -> Tool:
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            available = ", ".join(sorted(self.tools)) or "none"
            raise NotFound(f"tool.call: no tool {name!r}; the tools are: {available}")
        return tool

    def schemas(self) -> list[dict[str, Any]]:
        return [self.tools[n].openai_schema() for n in sorted(self.tools)]

    def info(self) -> dict[str, dict[str, Any]]:
        """For the worker's READY: the scheduler enforces each tool's
        concurrency and asks approval for destructive ones."""
        return {name: tool.flags() for name, tool in sorted(self.tools.items())}
