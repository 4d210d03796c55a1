"""A tool-using agent written against the `openai` package alone: no libaios.
It finds the kernel the way any OpenAI client finds its server, from
OPENAI_BASE_URL and OPENAI_API_KEY, which `aiosctl run` sets to the gateway
and to this agent's own key; its calls are accounted to it as if it used
libaios.

The loop: the model calls a tool (a calculator run here, in the agent), the
result goes back, and again, until the model calls final_answer. The first
step must use the calculator and the last (--steps) must give the answer.
Over the chat completions API (the default) or, with --api responses, the
Responses API, continuing its conversation by previous_response_id.

    aiosctl run agents/openai_sdk_agent.py --task "A box holds 12 eggs. How many eggs are in 7 boxes?"
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import sys
from collections.abc import Callable
from typing import Any

import openai

SYSTEM = ("You solve a task step by step. Use the calculator for arithmetic. When you know "
          "the answer, call final_answer.")

TOOLS = [
    {"name": "calculator", "description": "Evaluate an arithmetic expression, e.g. 12 * 7.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                    "required": ["expression"], "additionalProperties": False}},
    {"name": "final_answer", "description": "Give the final answer to the task and stop.",
     "parameters": {"type": "object", "properties": {"answer": {"type": "string"}},
                    "required": ["answer"], "additionalProperties": False}},
]

OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def calculate(expression: str) -> str:
    """Arithmetic on numbers, by walking the syntax tree (never eval)."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.operand))
        raise ValueError("only numbers and + - * / // % are allowed")

    expression = expression.split("=")[0]   # (a small model writes "12 * 7 = 72")
    try:
        return str(value(ast.parse(expression.strip(), mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as exc:
        return f"error: {exc}"


def run_tool(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments)
    except ValueError:
        return "error: the arguments are not JSON"
    if name == "calculator":
        return calculate(str(args.get("expression", "")))
    return f"error: no tool {name!r}"


def forced_tool(step: int, steps: int) -> str | None:
    """The tool a step must call: the last gives the answer, the first calculates."""
    return "final_answer" if step == steps else "calculator" if step == 1 else None


def chat_loop(client: openai.OpenAI, model: str, task: str, steps: int) -> str | None:
    """The loop over chat completions: the conversation is sent each step."""
    tools = [{"type": "function", "function": tool} for tool in TOOLS]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": task}]
    for step in range(1, steps + 1):
        forced = forced_tool(step, steps)
        choice: Any = {"type": "function", "function": {"name": forced}} if forced else "required"
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice=choice,
            parallel_tool_calls=False, max_tokens=96)
        message = reply.choices[0].message
        if not message.tool_calls:   # (tool_choice="required": the kernel sees to one)
            print(f"step {step}: no tool call ({reply.choices[0].finish_reason})")
            return None
        call = message.tool_calls[0]
        print(f"step {step}: {call.function.name}({call.function.arguments})")
        if call.function.name == "final_answer":
            return str(json.loads(call.function.arguments).get("answer", ""))
        result = run_tool(call.function.name, call.function.arguments)
        print(f"  result: {result}")
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]})
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return None


def responses_loop(client: openai.OpenAI, model: str, task: str, steps: int) -> str | None:
    """The loop over the Responses API: each step sends only what is new
    and names the response it continues."""
    tools = [{"type": "function", **tool} for tool in TOOLS]
    pending: Any = task
    previous: str | None = None
    for step in range(1, steps + 1):
        forced = forced_tool(step, steps)
        choice: Any = {"type": "function", "name": forced} if forced else "required"
        response = client.responses.create(
            model=model, instructions=SYSTEM, input=pending, tools=tools,
            tool_choice=choice, parallel_tool_calls=False, max_output_tokens=96,
            **({"previous_response_id": previous} if previous else {}))
        previous = response.id
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            print(f"step {step}: no tool call ({response.status})")
            return None
        call = calls[0]
        print(f"step {step}: {call.name}({call.arguments})")
        if call.name == "final_answer":
            return str(json.loads(call.arguments).get("answer", ""))
        result = run_tool(call.name, call.arguments)
        print(f"  result: {result}")
        pending = [{"type": "function_call_output", "call_id": call.call_id, "output": result}]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="A box holds 12 eggs. How many eggs are in 7 boxes?")
    parser.add_argument("--steps", type=int, default=3, help="the most steps to take")
    parser.add_argument("--api", choices=("chat", "responses"), default="chat")
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL"),
                        help="the model (default: the first the server lists)")
    args = parser.parse_args()
    if args.steps < 1:
        print("openai_sdk_agent: --steps must be at least 1", file=sys.stderr)
        return 1
    try:
        client = openai.OpenAI(timeout=600.0)   # OPENAI_BASE_URL, OPENAI_API_KEY
        model = args.model or client.models.list().data[0].id
        loop = responses_loop if args.api == "responses" else chat_loop
        answer = loop(client, model, args.task, args.steps)
    except openai.OpenAIError as exc:
        print(f"openai_sdk_agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if answer is None:
        print(f"no final answer within {args.steps} steps")
    else:
        print(f"final answer: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
