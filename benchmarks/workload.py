"""The benchmark workload: what one agent does, the same on every system.

A multi-turn loop as real agents make them: a shared system prompt of a few
hundred tokens, an agent-specific task, TURNS turns with the conversation
growing each turn, MAX_TOKENS generated tokens a turn (greedy), and a short
tool result appended between turns.
"""

from __future__ import annotations

SYSTEM = (
    "You are a careful planning assistant working inside an agent framework. "
    "You receive a task, think about it step by step, and answer briefly. "
    "Between your turns the framework runs tools and reports their results to you; "
    "use those results in your next answer. Keep every answer short and concrete, "
    "prefer lists of steps, and never repeat the question back. "
) * 4
TURNS = 6
MAX_TOKENS = 40
TOPICS = ["a garden", "a bakery", "a bicycle trip", "a school fair", "a bookshelf", "a small website",
          "a picnic", "a chess club", "a recycling plan", "a home office", "a fishing trip",
          "a concert", "a science project", "a reading list", "a savings plan", "a move"]


def task(i: int) -> str:
    return f"Agent {i}: plan {TOPICS[i % len(TOPICS)]} for week {i // len(TOPICS) + 1}."


def first_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task(i)}]


def tool_result(i: int, turn: int) -> dict[str, str]:
    return {"role": "user", "content": f"Tool result {turn}: value {(i * 31 + turn * 7) % 97}. Continue."}
