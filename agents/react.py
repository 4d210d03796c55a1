"""A ReAct agent: thought, tool call, observation, and again, until it gives a
final answer or reaches its step limit. Its tools are the kernel's: the
calculator, the Python sandbox and the file tools over its own storage.

    aiosctl run agents/react.py --task "A box holds 12 eggs. How many eggs are in 7 boxes?"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import libaios
from libaios.agent import AGENT_TIMEOUT, AgentFailed, call_of, observed, run, text_of

KERNEL_TOOLS = ("calculator", "python", "read_file", "write_file", "list_files")

FINAL = {
    "type": "function",
    "function": {
        "name": "final_answer",
        "description": "Give the final answer to the task and stop.",
        "parameters": {"type": "object", "properties": {"answer": {"type": "string"}},
                       "required": ["answer"], "additionalProperties": False},
    },
}

SYSTEM = ("You solve a task step by step. At each step you think in one short sentence, then "
          "call one tool. Use the calculator for arithmetic. When you know the answer, call "
          "final_answer.")


def solve(aios: Any, task: str, steps: int = 4, log: Any = print,
          tool_names: Sequence[str] = KERNEL_TOOLS) -> dict[str, Any]:
    """Run the loop on ``task`` with the kernel's tools ``tool_names``:
    returns the answer (None if the step limit came first) and the steps
    taken, each with its thought, call and observation."""
    offered = {t["function"]["name"]: t for t in aios.tools.list()}
    tools = [offered[name] for name in tool_names if name in offered] + [FINAL]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": task}]
    taken: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        ask = {"role": "user", "content": f"Task: {task}\nWhat should you do next to solve it? "
                                          "Answer in one sentence."}
        thought = text_of(aios.chat(messages + [ask], max_tokens=40), "a thought")
        messages.append({"role": "assistant", "content": f"Thought: {thought}"})
        reply = aios.chat(messages, tools=tools, tool_choice="required",
                          parallel_tool_calls=False, max_tokens=96)
        name, arguments = call_of(reply, f"step {step}")
        log(f"step {step}: {thought}\n  action: {name}({json.dumps(arguments)})")
        if name == "final_answer":
            taken.append({"thought": thought, "call": name, "arguments": arguments})
            return {"answer": str(arguments.get("answer", "")), "steps": taken}
        try:
            result = observed(aios.tools.call(name, arguments))
        except libaios.AIOSError as exc:   # a bad call is an observation too
            result = f"error: {exc.message}"
        log(f"  observation: {result}")
        taken.append({"thought": thought, "call": name, "arguments": arguments, "observation": result})
        messages.append({"role": "assistant", "content": "", "tool_calls": reply.tool_calls[:1]})
        messages.append({"role": "tool", "tool_call_id": reply.tool_calls[0]["id"], "content": result})
    return {"answer": None, "steps": taken}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="A box holds 12 eggs. How many eggs are in 7 boxes?")
    parser.add_argument("--steps", type=int, default=4, help="the most steps to take")
    args = parser.parse_args()
    if args.steps < 1:
        raise AgentFailed("--steps must be at least 1")
    with libaios.connect(timeout=AGENT_TIMEOUT) as aios:
        out = solve(aios, args.task, args.steps)
    if out["answer"] is None:
        print(f"no final answer within {args.steps} steps")
    else:
        print(f"final answer: {out['answer']} ({len(out['steps'])} steps)")


if __name__ == "__main__":
    run(main)
