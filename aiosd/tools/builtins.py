"""The built-in tools: ``calculator``, ``python`` (the sandbox), and
``read_file`` / ``write_file`` / ``list_files`` over the calling agent's own
storage."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from libaios import errors
from libaios.errors import ApprovalRequired, InvalidArgument, NotFound, Unavailable
from libaios.protocol import MsgType

from ..config import BUILTIN_TOOLS, ToolsConfig
from .registry import Context, Tool
from .sandbox import run_python

if TYPE_CHECKING:
    from ..kernel_client import KernelClient

# -- calculator -------------------------------------------------------------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
#: round()'s digits, either way (beyond, a float is unchanged or 0 anyway)
MAX_ROUND_DIGITS = 4000


def _round(value: Any, ndigits: Any = None) -> Any:
    # round(5, -10**9) would work out 10**(10**9) first: hours, holding the worker
    if isinstance(ndigits, int) and abs(ndigits) > MAX_ROUND_DIGITS:
        raise InvalidArgument(f"calculator: round takes at most {MAX_ROUND_DIGITS} digits, "
                              f"not {ndigits}")
    return round(value, ndigits)


_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2,
    "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "asin": math.asin, "acos": math.acos, "atan": math.atan, "atan2": math.atan2,
    "hypot": math.hypot, "abs": abs, "round": _round, "floor": math.floor, "ceil": math.ceil,
    "min": min, "max": max,
}
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
MAX_EXPRESSION = 1000
#: integers may grow to this many bits (about 3000 decimal digits)
MAX_INT_BITS = 10_000
#: integers beyond 64 bits come back as a decimal string (the wire carries
#: at most 64-bit integers)
WIRE_INT = 2**63


def _bound(value: Any) -> Any:
    if isinstance(value, complex):
        raise InvalidArgument("calculator: the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise InvalidArgument(f"calculator: the result has more than {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument("calculator: the result is not a finite number")
    return value


def _power(base: Any, exponent: Any) -> Any:
    # refuse before computing: 9**9**9 would take minutes and gigabytes
    if (isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
            and exponent * math.log2(abs(base)) > MAX_INT_BITS):
        raise InvalidArgument(f"calculator: the power is too large to compute "
                              f"(more than {MAX_INT_BITS} bits)")
    return base ** exponent


def evaluate(expression: str) -> int | float:
    """Evaluate arithmetic by walking its syntax tree (never ``eval``):
    numbers, + - * / // % **, unary minus and plus, parentheses, the
    constants pi, e and tau, and the functions in ``_FUNCS``."""
    if not isinstance(expression, str):
        raise InvalidArgument("calculator: the expression must be a string")
    if len(expression) > MAX_EXPRESSION:
        raise InvalidArgument(f"calculator: the expression is longer than {MAX_EXPRESSION} "
                              "characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise InvalidArgument(f"calculator: {expression!r} is not an arithmetic expression "
                              f"({exc.msg})") from None

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return _bound(node.value)
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                return _bound(_power(left, right))
            return _bound(_BINARY[type(node.op)](left, right))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCS and not node.keywords):
            return _bound(_FUNCS[node.func.id](*(walk(a) for a in node.args)))
        what = type(node).__name__
        if isinstance(node, ast.Name):
            what = f"the name {node.id!r}"
        elif isinstance(node, ast.Call):
            what = "that function call"
        elif isinstance(node, ast.Constant):
            what = f"the constant {node.value!r}"
        raise InvalidArgument(f"calculator: {what} is not allowed; use numbers, "
                              f"+ - * / // % **, parentheses, {', '.join(_CONSTS)} and "
                              f"{', '.join(sorted(_FUNCS))}")

    try:
        value = walk(tree)
    except ZeroDivisionError:
        raise InvalidArgument("calculator: division by zero") from None
    except (ValueError, OverflowError, TypeError, RecursionError, MemoryError) as exc:
        raise InvalidArgument(f"calculator: {exc}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _calculate(args: dict[str, Any], ctx: Context) -> int | float | str:
    value = evaluate(args["expression"])
    if isinstance(value, int) and not -WIRE_INT <= value < WIRE_INT:
        return str(value)
    return value


def calculator() -> Tool:
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression such as (3 + 4) * 12 / 2 or "
                    "sqrt(2) * pi: numbers, + - * / // % ** and parentheses, the constants "
                    "pi, e, tau and the functions " + ", ".join(sorted(_FUNCS)) + ". "
                    "Integers too large for 64 bits come back as a decimal string.",
        parameters={"type": "object",
                    "properties": {"expression": {"type": "string", "minLength": 1,
                                                  "maxLength": MAX_EXPRESSION,
                                                  "description": "the expression"}},
                    "required": ["expression"], "additionalProperties": False},
        run=_calculate, concurrency=16, timeout=5.0, read_only=True, inline=True,
    )


# -- python -------------------------------------------------------------------------


def python(cfg: ToolsConfig) -> Tool:
    limits = cfg.sandbox

    def run(args: dict[str, Any], ctx: Context) -> Any:
        return run_python(args["code"], limits, deadline=ctx.deadline, cancelled=ctx.cancelled,
                          tool=ctx.tool or "python")

    return Tool(
        name="python",
        description=(
            "Run Python 3 code (standard library only) in a sandbox and return its stdout, "
            "stderr and exit code. Print what you want to see. The sandbox has no network, "
            "no subprocesses, an empty scratch directory as its working directory (the only "
            f"place it may write), at most {limits.cpu_seconds}s of CPU, "
            f"{limits.memory_mb} MB of memory, {limits.wall_seconds:g}s of wall time and "
            f"{limits.output_bytes} bytes of output per stream."),
        parameters={"type": "object",
                    "properties": {"code": {"type": "string", "minLength": 1,
                                            "maxLength": 100_000,
                                            "description": "the program"}},
                    "required": ["code"], "additionalProperties": False},
        run=run, concurrency=2, timeout=limits.wall_seconds + 5.0, inline=True,
    )


# -- files ------------------------------------------------------------------------

#: read_file returns at most this much text
MAX_READ_BYTES = 1 << 20


def file_tools(kernel: KernelClient | None) -> list[Tool]:
    """read_file, write_file and list_files over the calling agent's own
    storage: each makes a storage call through the scheduler in the
    caller's namespace (``as_namespace``), so the storage manager and the
    access manager see whose data it is."""

    def call(ctx: Context, mtype: MsgType, body: dict[str, Any]) -> dict[str, Any]:
        if kernel is None:
            raise Unavailable(f"{ctx.tool}: file tools need the kernel (no kernel client)")
        if not ctx.namespace:
            raise InvalidArgument(f"{ctx.tool}: the call has no namespace")
        remaining = ctx.remaining()
        if remaining is not None and remaining <= 0:
            raise errors.Timeout(f"{ctx.tool}: the call's time ran out")
        try:
            # (a call cancelled meanwhile stops waiting: its worker must let go)
            return kernel.call(mtype, body, as_namespace=ctx.namespace, timeout=remaining,
                               cancelled=ctx.cancelled)
        except errors.Timeout as exc:
            raise errors.Timeout(f"{ctx.tool}: the storage call did not finish in time "
                                 f"({exc.message})") from None

    def read(args: dict[str, Any], ctx: Context) -> Any:
        reply = call(ctx, MsgType.STORAGE_READ_FILE, {"path": args["path"]})
        data = reply.get("data", b"")
        if isinstance(data, str):
            data = data.encode()
        out: dict[str, Any] = {"path": reply.get("path", args["path"]),
                               "version": reply.get("version")}
        if len(data) > MAX_READ_BYTES:
            out["truncated"] = True
            out["size"] = len(data)
            data = data[:MAX_READ_BYTES]
        try:
            out["content"] = data.decode("utf-8")
        except UnicodeDecodeError:
            out["content"] = data.decode("utf-8", errors="replace")
            out["note"] = "the file is not UTF-8 text: undecodable bytes were replaced"
        return out

    def write(args: dict[str, Any], ctx: Context) -> Any:
        # The tool worker's storage calls are the kernel's own, which the
        # scheduler never holds for approval. So an overwrite is refused here
        # unless this tool call was approved: ApprovalRequired makes the
        # scheduler hold the call (or pass it at once, for a caller whose
        # group pre-approves "storage.overwrite") and re-dispatch it
        # approved. (Between this check and the write another writer could
        # create the file; that narrow race overwrites a brand-new file.)
        if not ctx.approved:
            try:
                current = call(ctx, MsgType.STORAGE_READ_FILE, {"path": args["path"]})
            except NotFound:
                pass
            else:
                raise ApprovalRequired(
                    f"write_file: file {args['path']!r} of {ctx.namespace} exists (version "
                    f"{current.get('version')}); overwriting it needs approval",
                    details={"op": "storage.overwrite", "file": args["path"]})
        reply = call(ctx, MsgType.STORAGE_WRITE_FILE,
                     {"path": args["path"], "data": args["content"].encode("utf-8")})
        return {"path": reply.get("path", args["path"]), "version": reply.get("version")}

    def listing(args: dict[str, Any], ctx: Context) -> Any:
        reply = call(ctx, MsgType.STORAGE_LIST_DIR, {"dir": args.get("dir", "")})
        return {"dir": reply.get("dir", args.get("dir", "")), "entries": reply.get("entries", [])}

    path = {"type": "string", "minLength": 1, "maxLength": 1024,
            "description": "a path in your storage, such as notes/todo.txt"}
    return [
        Tool("read_file", "Read a text file from your own storage.",
             {"type": "object", "properties": {"path": path}, "required": ["path"],
              "additionalProperties": False},
             read, concurrency=8, timeout=30.0, read_only=True, inline=True),
        Tool("write_file", "Write a text file to your own storage. Overwriting an existing "
             "file keeps its earlier versions and may wait for a person's approval.",
             {"type": "object",
              "properties": {"path": path,
                             "content": {"type": "string", "maxLength": MAX_READ_BYTES}},
              "required": ["path", "content"], "additionalProperties": False},
             write, concurrency=8, timeout=60.0, inline=True),
        Tool("list_files", "List the files and directories in a directory of your own "
             "storage (the top level if no dir is given).",
             {"type": "object",
              "properties": {"dir": {"type": "string", "maxLength": 1024}},
              "additionalProperties": False},
             listing, concurrency=8, timeout=30.0, read_only=True, inline=True),
    ]


def builtin_tools(cfg: ToolsConfig, kernel: KernelClient | None) -> list[Tool]:
    """The built-ins ``cfg.builtin`` names, in that order."""
    available = {"calculator": calculator(), "python": python(cfg)}
    available.update((t.name, t) for t in file_tools(kernel))
    assert set(available) == set(BUILTIN_TOOLS), "config.BUILTIN_TOOLS is out of date"
    chosen = []
    for name in cfg.builtin:
        if name not in available:
            raise InvalidArgument(f"tools.builtin: no built-in tool {name!r} "
                                  f"(there are: {', '.join(sorted(available))})")
        chosen.append(available[name])
    return chosen
