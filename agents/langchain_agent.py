"""A LangChain tool-calling agent (langchain-openai's ChatOpenAI with
bind_tools): no libaios. ChatOpenAI finds the kernel as the openai package
does, from OPENAI_BASE_URL and OPENAI_API_KEY, which `aiosctl run` sets to
the gateway and to this agent's own key; its calls are accounted to it.

The model calls the tools (a word counter and a text reverser, LangChain
tools run here, in the agent), their results go back as ToolMessages, and
again, until it calls final_answer. The first step must use a tool and
the last (--steps) must give the answer.

    aiosctl run agents/langchain_agent.py --task "How many words are in 'the quick brown fox'?"
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import openai
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

SYSTEM = ("You answer questions about text with the tools you have. When you know the "
          "answer, call final_answer.")


@tool
def count_words(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


@tool
def reverse_text(text: str) -> str:
    """Write a text backwards."""
    return text[::-1]


@tool
def final_answer(answer: str) -> str:
    """Give the final answer to the question and stop."""
    return answer


TOOLS = {t.name: t for t in (count_words, reverse_text, final_answer)}


def offered(step: int, steps: int) -> tuple[list[Any], str]:
    """A step's tools and tool choice: the last must answer, the first must
    use a tool other than final_answer, the others any tool."""
    if step == steps:
        return list(TOOLS.values()), "final_answer"
    if step == 1:
        return [t for name, t in TOOLS.items() if name != "final_answer"], "any"
    return list(TOOLS.values()), "any"


def solve(llm: ChatOpenAI, task: str, steps: int) -> str | None:
    messages: list[BaseMessage] = [SystemMessage(SYSTEM), HumanMessage(task)]
    for step in range(1, steps + 1):
        tools, tool_choice = offered(step, steps)
        model: Any = llm.bind_tools(tools, tool_choice=tool_choice, parallel_tool_calls=False)
        reply = model.invoke(messages)
        if not reply.tool_calls:
            print(f"step {step}: no tool call")
            return None
        messages.append(reply)
        call = reply.tool_calls[0]
        print(f"step {step}: {call['name']}({call['args']})")
        if call["name"] == "final_answer":
            return str(call["args"].get("answer", ""))
        chosen = TOOLS.get(call["name"])
        if chosen is None:
            result: Any = f"error: no tool {call['name']!r}"
        else:
            try:
                result = chosen.invoke(call["args"])
            except Exception as exc:   # a bad call is an observation too
                result = f"error: {exc}"
        print(f"  result: {result}")
        messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
        for extra in reply.tool_calls[1:]:   # (one call a step; the others are answered)
            messages.append(ToolMessage("not run: one call a step", tool_call_id=extra["id"]))
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="How many words are in 'the quick brown fox'?")
    parser.add_argument("--steps", type=int, default=3, help="the most steps to take")
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL"),
                        help="the model (default: the first the server lists)")
    args = parser.parse_args()
    if args.steps < 1:
        print("langchain_agent: --steps must be at least 1", file=sys.stderr)
        return 1
    try:
        model = args.model or openai.OpenAI().models.list().data[0].id
        llm = ChatOpenAI(model=model, temperature=0, max_tokens=96, timeout=600)
        answer = solve(llm, args.task, args.steps)
    except openai.OpenAIError as exc:
        print(f"langchain_agent: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if answer is None:
        print(f"no final answer within {args.steps} steps")
    else:
        print(f"final answer: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
