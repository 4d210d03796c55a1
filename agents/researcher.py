"""A research agent that uses every kernel service: it keeps what it learns
in memory, asks the model which tool to call (the calculator) and runs it
through the kernel's tool manager, recalls its notes by search, and saves a
report in its durable storage.

    aiosctl run agents/researcher.py --task "How many legs do 12 spiders have?"
"""

import argparse
import time

import libaios
from libaios.agent import AGENT_TIMEOUT, call_of, run, text_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="How many legs do 12 spiders have?")
    args = parser.parse_args()

    with libaios.connect(timeout=AGENT_TIMEOUT) as aios:
        # 1. notes in memory
        notes = text_of(aios.chat(
            [{"role": "system", "content": "You write one short factual note."},
             {"role": "user", "content": f"A fact that helps with: {args.task}"}],
            max_tokens=40,
        ), "a note")
        aios.memory.add(notes, {"task": args.task, "kind": "note"})
        print(f"note: {notes}")

        # 2. the model picks a tool call; the tool manager runs it
        tools = [t for t in aios.tools.list() if t["function"]["name"] == "calculator"]
        reply = aios.chat(
            f"{args.task} Use the calculator with an arithmetic expression.",
            tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=40,
        )
        name, arguments = call_of(reply, "the calculation")
        try:
            result = aios.tools.call(name, arguments)
        except libaios.AIOSError as exc:  # the tiny model may write a bad expression
            result = f"error: {exc.message}"
        print(f"tool: {name}({arguments}) -> {result}")
        aios.memory.add(f"{name}({arguments}) = {result}", {"task": args.task, "kind": "tool"})

        # 3. recall by search, then 4. a durable report
        recalled = aios.memory.search(args.task, filters={"task": args.task}, limit=3)
        report = "\n".join(f"- {item['text']}" for item in recalled)
        # a new file each run: overwriting one would wait for an operator's approval
        slug = "".join(c if c.isalnum() else "-" for c in args.task.lower())[:40]
        name = f"reports/{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{aios.whoami()['agent']}.md"
        aios.storage.write_file(name, f"# {args.task}\n{report}\n".encode())
        print(f"report saved to {name} ({len(recalled)} notes)")


if __name__ == "__main__":
    run(main)
