"""Helpers for writing an agent: how it ends, and how it reads its model's
answers.

An agent's ``main`` runs under :func:`run`, which turns a failure into one
clear line on stderr and exit code 1, never a traceback: a system call that
failed (:class:`~libaios.errors.AIOSError`, with its code) or an answer the
agent cannot use (:class:`AgentFailed`, raised by :func:`text_of` and
:func:`call_of`)::

    from libaios.agent import run, text_of

    def main() -> None:
        with libaios.connect() as aios:
            print(text_of(aios.chat("Hello!", max_tokens=32), "a greeting"))

    if __name__ == "__main__":
        run(main)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .errors import AIOSError


#: Seconds an example agent's call may wait for its answer: eight agents
#: sharing a small machine's one core wait in turn, longer than the client's
#: default on a machine that is busy with other work too.
AGENT_TIMEOUT = 600.0


class AgentFailed(Exception):
    """The agent cannot go on; the message says why."""


def run(main: Callable[[], Any]) -> None:
    """Run an agent's ``main``; exit 1 with one line on stderr if it fails."""
    name = os.path.basename(sys.argv[0])
    try:
        main()
    except AgentFailed as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1)
    except AIOSError as exc:
        print(f"{name}: a system call failed ({exc.code.name}): {exc.message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def text_of(reply: Any, what: str) -> str:
    """The text of ``reply``, which should be ``what``. A reply with no
    text fails the agent; one cut short by ``max_tokens``
    (``finish_reason="length"``) is kept: its text is what there is."""
    text = reply.text.strip()
    if not text:
        raise AgentFailed(f"the model gave no text for {what} (finish_reason "
                          f"{reply.finish_reason!r})")
    return text


def call_of(reply: Any, what: str) -> tuple[str, dict[str, Any]]:
    """The first tool call of ``reply`` as (name, arguments)."""
    if not reply.tool_calls:
        raise AgentFailed(f"the model made no tool call for {what} (finish_reason "
                          f"{reply.finish_reason!r}, text {reply.text[:80]!r})")
    fn = reply.tool_calls[0]["function"]
    try:
        return fn["name"], json.loads(fn["arguments"])
    except ValueError:
        raise AgentFailed(f"the model's call to {fn['name']} for {what} has arguments that "
                          f"are not JSON: {fn['arguments'][:80]!r}") from None


def observed(result: Any, limit: int = 400) -> str:
    """A tool's result as the text an agent shows its model."""
    text = result if isinstance(result, str) else json.dumps(result)
    return text if len(text) <= limit else text[:limit] + " …"


__all__ = ["AGENT_TIMEOUT", "AgentFailed", "call_of", "observed", "run", "text_of"]
