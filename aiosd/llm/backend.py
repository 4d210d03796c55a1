"""What every LLM backend offers a core, and the incremental text decoder.

A backend turns a checked :class:`ChatRequest` into a :class:`ChatOutput`,
given the call's :class:`CallContext`: it calls ``emit`` with each new piece
of text as it is generated (or, for an answer with tools, each tool-call
delta: ``{"tool_calls": [...]}`` in the OpenAI API's shape), stops at the
next token boundary once ``check()`` raises, continues from the snapshot
``resume`` names, and, asked through ``suspend``, stops and snapshots.
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..chat import ChatRequest

#: takes a piece of text, or a delta as a map (``{"text": ...}`` or ``{"tool_calls": [...]}``)
Emit = Callable[[str | dict[str, Any]], None]


@dataclass
class CallContext:
    """What a backend is given with one call besides its request."""

    #: takes each new piece of text, or a delta (see Emit)
    emit: Emit
    #: raises once the call must stop (cancelled, or past its deadline)
    check: Callable[[], None]
    #: the agent whose call it is: the key of its cached conversation
    key: str = ""
    #: a snapshot of this core to continue from (a suspended call resumed)
    resume: str | None = None
    #: set when the kernel asks the call to stop at the next token and be
    #: snapshotted; None where the kernel never preempts
    suspend: threading.Event | None = None
    #: told the tokens generated so far, now and then (for the scheduling
    #: policy); None where the kernel does not need it
    progress: Callable[[int], None] | None = None


@dataclass
class ChatOutput:
    text: str
    finish_reason: str  # "stop", "length", "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    parsed: Any = None
    #: Prompt tokens served from the retained KV cache rather than prefilled.
    cached_tokens: int = 0
    #: When suspended: the id of the snapshot to resume from.
    snapshot: str | None = None

    def to_body(self, core: str) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "tool_calls": self.tool_calls,
            "parsed": self.parsed,
            "core": core,
            "snapshot": self.snapshot,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "cached_tokens": self.cached_tokens,
            },
        }


class Backend(Protocol):
    """A model behind an LLM core."""

    #: calls it runs at once
    slots: int

    def describe(self) -> dict[str, Any]:
        """What ``aiosctl status`` shows of this backend."""

    def chat(self, req: ChatRequest, ctx: CallContext) -> ChatOutput:
        """Generate the answer to ``req`` (see CallContext)."""

    def forget(self, agent: str | None, snapshots: list[str]) -> None:
        """Drop what is kept for ``agent``, which has ended, and the named
        snapshots, whose calls will never resume."""

    def close(self) -> None:
        """Release the model."""


class StopScanner:
    """Decodes token bytes to text incrementally and finds stop strings.

    Text is released only once no stop string can still begin in it, so a
    stop string never leaks into the streamed output.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.text = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add bytes; return the text that can now be released."""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        for stop in self.stops:
            at = self._pending.find(stop)
            if at >= 0:
                self._pending = self._pending[:at]
                self.stopped = True
                final = True
        if final:
            out, self._pending = self._pending, ""
        else:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            # hold back a tail that could be the start of a stop string
            keep = 0
            for n in range(min(hold, len(self._pending)), 0, -1):
                tail = self._pending[-n:]
                if any(s.startswith(tail) for s in self.stops):
                    keep = n
                    break
            cut = len(self._pending) - keep
            out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out
