"""Streaming a structured answer with tools as OpenAI-style deltas.

A local model with tools writes JSON: ``{"name": ..., "arguments": {...}}``,
a list of such calls, or ``{"reply": "..."}``. A caller that streams should
not see that JSON as text. :class:`ToolCallStream` reads it as it grows and
hands out what a caller of the OpenAI API expects: for each call, first its
``index``, ``id`` and ``function.name``, then fragments of its arguments;
for a reply, pieces of the reply's text. Pure logic, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .structured import new_call_id, partial_reply

Delta = dict[str, Any]


def header_delta(index: int, call_id: str, name: str) -> Delta:
    """The first delta of a streamed call: its index, id and name."""
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def arguments_delta(index: int, fragment: str) -> Delta:
    """A fragment of a streamed call's arguments."""
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


@dataclass
class _Call:
    id: str
    name: str | None = None
    arguments: str = ""   # the raw JSON text of the arguments so far
    sent: int = 0         # how much of it has gone out


class ToolCallStream:
    """Feed it the answer's text piece by piece; it calls ``emit`` with
    each delta: ``{"text": ...}`` or ``{"tool_calls": [{...}]}``."""

    def __init__(self, emit: Callable[[Delta], None], id_prefix: str = ""):
        self.emit = emit
        #: calls are numbered under this prefix (a resumed call's stream is
        #: rebuilt under the same one, so its calls keep their ids)
        self.id_prefix = id_prefix or new_call_id()
        self.text = ""
        self.calls: list[_Call] = []
        self._stack: list[str] = []
        self._call_depth = 0        # the depth at which a call's object lies
        self._in_string = False
        self._escape = False
        self._string = ""           # raw text of the string being read
        self._expect_key = False
        self._key: str | None = None
        self._capture = False       # inside the current call's arguments
        self._reply_sent = ""

    @property
    def ids(self) -> list[str]:
        """The ids given to the calls, in order (the final reply uses them)."""
        return [c.id for c in self.calls]

    def feed(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        if self._call_depth == 0:
            head = self.text.lstrip()
            if not head:
                return
            self._call_depth = 2 if head[0] == "[" else 1
        if self._key == "reply" or (self._call_depth == 1 and self._looks_like_reply()):
            self._key = "reply"
            self._send_reply()
            return
        for ch in self.text[start:]:
            self._char(ch)
        self._send_arguments()

    def replay(self, text: str) -> None:
        """Read ``text``, which the caller already has, without sending it
        again (a resumed call's answer so far)."""
        emit, self.emit = self.emit, lambda delta: None
        try:
            self.feed(text)
        finally:
            self.emit = emit

    def _looks_like_reply(self) -> bool:
        return partial_reply(self.text) is not None

    def _send_reply(self) -> None:
        text = partial_reply(self.text) or ""
        if len(text) > len(self._reply_sent) and text.startswith(self._reply_sent):
            self.emit({"text": text[len(self._reply_sent):]})
            self._reply_sent = text

    def _char(self, ch: str) -> None:
        depth = len(self._stack)
        if self._capture:
            self.calls[-1].arguments += ch
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                self._string_done()
                return
            self._string += ch
            return
        if ch == '"':
            self._in_string, self._string = True, ""
        elif ch in "{[":
            self._stack.append(ch)
            if ch == "{" and len(self._stack) == self._call_depth:
                self.calls.append(_Call(f"{self.id_prefix}_{len(self.calls)}"))
                self._expect_key = True
        elif ch in "}]":
            if self._stack:
                self._stack.pop()
            if self._capture and len(self._stack) == self._call_depth and depth > self._call_depth:
                self._capture = False    # the arguments' object closed
            elif self._capture and len(self._stack) < self._call_depth:
                self._end_capture(ch)
        elif ch == ":" and depth == self._call_depth:
            self._expect_key = False
            if self._key == "arguments":
                self._capture = True
        elif ch == "," and depth == self._call_depth:
            if self._capture:
                self._end_capture(ch)
            self._expect_key = True

    def _end_capture(self, ch: str) -> None:
        """A scalar argument value ended at ``ch``, which is not part of it."""
        call = self.calls[-1]
        if call.arguments.endswith(ch):
            call.arguments = call.arguments[:-1]
        self._capture = False

    def _string_done(self) -> None:
        if len(self._stack) != self._call_depth or not self.calls or self._capture:
            return
        if self._expect_key:
            self._key = json.loads(f'"{self._string}"')
        elif self._key == "name" and self.calls[-1].name is None:
            call = self.calls[-1]
            call.name = json.loads(f'"{self._string}"')
            self.emit(header_delta(len(self.calls) - 1, call.id, call.name))

    def _send_arguments(self) -> None:
        for index, call in enumerate(self.calls):
            if call.name is None:
                continue
            fragment = call.arguments.lstrip()[call.sent:]
            if fragment:
                self.emit(arguments_delta(index, fragment))
                call.sent += len(fragment)
