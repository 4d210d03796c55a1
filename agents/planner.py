"""A planning agent with structured output: the model answers in JSON that
a schema constrains (the kernel enforces it with a grammar), then it calls a
tool to pick the step to start with, and the agent carries that call out:
the plan, with the step to start marked, is saved in its storage.

    aiosctl run agents/planner.py --task "Organise a small birthday party."
"""

import argparse
import time
from typing import Any

import libaios
from libaios.agent import AGENT_TIMEOUT, AgentFailed, call_of, run

PLAN_SCHEMA = {
    "type": "object",
    "properties": {
        "goal": {"type": "string", "maxLength": 80},
        "steps": {
            "type": "array",
            "items": {"type": "string", "maxLength": 60},
            "minItems": 2,
            "maxItems": 4,
        },
    },
    "required": ["goal", "steps"],
}

START_TOOL = {
    "type": "function",
    "function": {
        "name": "start_step",
        "description": "Mark one step of the plan as the one to start with.",
        "parameters": {
            "type": "object",
            "properties": {"step": {"type": "integer", "minimum": 1, "maximum": 4}},
            "required": ["step"],
        },
    },
}


def start_step(aios: Any, task: str, plan: dict[str, Any], step: int) -> str:
    """The ``start_step`` tool, run by the agent: save the plan in its
    storage with the step to start marked. Returns the file's path."""
    lines = [f"# {plan['goal']}", ""]
    for i, text in enumerate(plan["steps"], 1):
        lines.append(f"{i}. {'[started] ' if i == step else ''}{text}")
    slug = "".join(c if c.isalnum() else "-" for c in task.lower())[:40]
    # a new file each run: overwriting one would wait for an operator's approval
    path = f"plans/{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{aios.whoami()['agent']}.md"
    aios.storage.write_file(path, ("\n".join(lines) + "\n").encode())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="Organise a small birthday party.")
    args = parser.parse_args()

    with libaios.connect(timeout=AGENT_TIMEOUT) as aios:
        reply = aios.chat(
            f"Make a short plan: {args.task}",
            response_format={"type": "json_object", "schema": PLAN_SCHEMA},
            max_tokens=200,
        )
        plan = reply.parsed
        if plan is None:
            raise AgentFailed(f"the plan is not the JSON asked for ({reply.finish_reason}): "
                              f"{reply.text[:120]!r}")
        for i, step in enumerate(plan["steps"], 1):
            print(f"{i}. {step}")
        listing = "\n".join(f"{i}. {s}" for i, s in enumerate(plan["steps"], 1))
        reply = aios.chat(
            f"Plan:\n{listing}\nWhich step should I start with?",
            tools=[START_TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=40,
        )
        name, arguments = call_of(reply, "the step to start with")
        step = arguments.get("step")
        if not isinstance(step, int) or not 1 <= step <= len(plan["steps"]):
            raise AgentFailed(f"the model chose step {step!r} of a plan of {len(plan['steps'])}")
        path = start_step(aios, args.task, plan, step)
        print(f"tool call: {name}(step={step}) -> plan saved to {path}")


if __name__ == "__main__":
    run(main)
