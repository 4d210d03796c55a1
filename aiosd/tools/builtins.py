"""The built-in tools: a calculator, the python sandbox, and file tools over
the calling agent's own storage."""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from typing import Any

from libaios.errors import InvalidArgument
from libaios.protocol import MsgType

from ..config import ToolsConfig
from ..kernel_client import KernelClient
from .registry import Context, Tool
from .sandbox import run_python

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "log": math.log, "exp": math.exp, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
    "min": min, "max": max,
}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e300


def evaluate(expression: str) -> float | int:
    """Evaluate arithmetic by walking its syntax tree (never ``eval``)."""
    if len(expression) > 1000:
        raise InvalidArgument("calculator: the expression is longer than 1000 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise InvalidArgument(f"calculator: {expression!r} is not an arithmetic expression "
                              f"({exc.msg})") from None

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > 1e6):
                raise InvalidArgument("calculator: the power is too large to compute")
            result = _BINARY[type(node.op)](left, right)
            if isinstance(result, (int, float)) and abs(result) > MAX_MAGNITUDE:
                raise InvalidArgument("calculator: the result is too large")
            return result
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCS and not node.keywords):
            return _FUNCS[node.func.id](*(walk(a) for a in node.args))
        raise InvalidArgument(f"calculator: {ast.dump(node)[:60]} is not allowed; use numbers, "
                              f"+ - * / // % **, parentheses and {', '.join(sorted(_FUNCS))}")

    try:
        value = walk(tree)
    except ZeroDivisionError:
        raise InvalidArgument("calculator: division by zero") from None
    except (ValueError, OverflowError, TypeError) as exc:
        raise InvalidArgument(f"calculator: {exc}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def calculator() -> Tool:
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression, such as (3 + 4) * 12 / 2 or sqrt(2).",
        parameters={"type": "object",
                    "properties": {"expression": {"type": "string", "maxLength": 200}},
                    "required": ["expression"], "additionalProperties": False},
        run=lambda args, ctx: evaluate(args["expression"]),
        concurrency=16, timeout=5.0, read_only=True,
    )


def python(cfg: ToolsConfig) -> Tool:
    return Tool(
        name="python",
        description="Run Python code in a sandbox (no network, no files outside its scratch "
                    "directory, limited CPU, memory and time); returns stdout and stderr.",
        parameters={"type": "object", "properties": {"code": {"type": "string", "maxLength": 100000}},
                    "required": ["code"], "additionalProperties": False},
        run=lambda args, ctx: run_python(
            args["code"], cfg.sandbox,
            None if ctx.deadline is None else max(0.5, ctx.deadline - time.time())),
        concurrency=2, timeout=cfg.sandbox.wall_seconds + 5.0,
    )


def file_tools(kernel: KernelClient) -> list[Tool]:
    """read_file, write_file and list_files over the calling agent's storage."""

    def read(args: dict[str, Any], ctx: Context) -> Any:
        data = kernel.call(MsgType.STORAGE_READ_FILE, {"path": args["path"]},
                           as_namespace=ctx.namespace)["data"]
        return {"path": args["path"], "content": data.decode("utf-8", errors="replace")}

    def write(args: dict[str, Any], ctx: Context) -> Any:
        return kernel.call(MsgType.STORAGE_WRITE_FILE,
                           {"path": args["path"], "data": args["content"].encode()},
                           as_namespace=ctx.namespace)

    def listing(args: dict[str, Any], ctx: Context) -> Any:
        return kernel.call(MsgType.STORAGE_LIST_DIR, {"dir": args.get("dir", "")},
                           as_namespace=ctx.namespace)["entries"]

    path = {"type": "string", "minLength": 1, "maxLength": 1024}
    return [
        Tool("read_file", "Read a text file from your own storage.",
             {"type": "object", "properties": {"path": path}, "required": ["path"],
              "additionalProperties": False}, read, concurrency=8, timeout=30.0, read_only=True),
        Tool("write_file", "Write a text file to your own storage (an existing file keeps its "
             "earlier versions; overwriting one may need an operator's approval).",
             {"type": "object", "properties": {"path": path,
                                               "content": {"type": "string", "maxLength": 1 << 20}},
              "required": ["path", "content"], "additionalProperties": False},
             write, concurrency=8, timeout=150.0),
        Tool("list_files", "List the files in a directory of your own storage.",
             {"type": "object", "properties": {"dir": {"type": "string", "maxLength": 1024}},
              "additionalProperties": False}, listing, concurrency=8, timeout=30.0, read_only=True),
    ]


def builtin_tools(cfg: ToolsConfig, kernel: KernelClient) -> list[Tool]:
    available = {"calculator": [calculator()], "python": [python(cfg)]}
    files = file_tools(kernel)
    for tool in files:
        available[tool.name] = [tool]
    chosen = []
    for name in cfg.builtin:
        if name not in available:
            raise InvalidArgument(f"tools.builtin: no built-in tool {name!r} "
                                  f"(there are: {', '.join(sorted(available))})")
        chosen += available[name]
    return chosen
