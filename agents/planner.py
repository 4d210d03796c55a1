"""A planning agent with structured output: the model answers in JSON that
a schema constrains (the kernel enforces it with a grammar), then it calls a
tool to pick the step to start with.

    aiosctl run agents/planner.py --task "Organise a small birthday party."
"""

import argparse
import json

import libaios

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="Organise a small birthday party.")
    args = parser.parse_args()

    with libaios.connect() as aios:
        reply = aios.chat(
            f"Make a short plan: {args.task}",
            response_format={"type": "json_object", "schema": PLAN_SCHEMA},
            max_tokens=160,
        )
        plan = reply.parsed
        if plan is None:
            print(f"the plan was cut short ({reply.finish_reason}): {reply.text}")
            return
        for i, step in enumerate(plan["steps"], 1):
            print(f"{i}. {step}")
        listing = "\n".join(f"{i}. {s}" for i, s in enumerate(plan["steps"], 1))
        reply = aios.chat(
            f"Plan:\n{listing}\nWhich step should I start with?",
            tools=[START_TOOL],
            tool_choice="required",
            max_tokens=40,
        )
        for call in reply.tool_calls:
            print(f"tool call: {call['function']['name']}({json.loads(call['function']['arguments'])})")


if __name__ == "__main__":
    main()
