"""Structured output for local models: tool calls and JSON answers.

A local model is told what shape to answer in (a system instruction) and held
to it by a grammar built from a JSON schema, so even a tiny model emits a
parseable tool call. This module builds that schema and instruction, shows
earlier tool calls and their results to the model, and parses the model's
text back. Pure logic, no I/O.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from libaios.errors import InvalidArgument, ToolCallIncomplete

from ..chat import ChatRequest
from . import budget as budgets

#: The most calls one answer may make at once (``parallel_tool_calls``).
PARALLEL_MAX = 4


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


REPLY_SCHEMA = {
    "type": "object",
    "properties": {"reply": {"type": "string"}},
    "required": ["reply"],
    "additionalProperties": False,
}


def uses_tools(req: ChatRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def must_call(req: ChatRequest) -> bool:
    """Whether the answer must be a tool call (``required`` or a named tool)."""
    return uses_tools(req) and req.tool_choice != "auto"


def callable_tools(req: ChatRequest) -> list[dict[str, Any]]:
    """The tools the answer may call: the named one, else all of them."""
    choice = req.tool_choice
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return [t for t in req.tools if t["function"]["name"] == name]
    return list(req.tools)


def _parallel(req: ChatRequest) -> bool:
    return req.parallel_tool_calls and not isinstance(req.tool_choice, dict)


def output_schema(req: ChatRequest) -> dict[str, Any] | None:
    """The schema the model's whole answer must satisfy, or None for free text.

    With tools: one call ``{"name", "arguments"}``; with parallel calls also
    a list of two or more calls; with ``tool_choice="auto"`` also
    ``{"reply": text}``.
    """
    if not uses_tools(req):
        return req.json_schema
    calls = [_call_schema(t) for t in callable_tools(req)]
    options = list(calls)
    if _parallel(req):
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        options.append({"type": "array", "items": one, "minItems": 2, "maxItems": PARALLEL_MAX})
    if req.tool_choice == "auto":
        options.append(REPLY_SCHEMA)
    return options[0] if len(options) == 1 else {"anyOf": options}


def fitted_schema(req: ChatRequest, tokens: int,
                  count: budgets.Tokens = budgets.estimate_tokens) -> dict[str, Any] | None:
    """:func:`output_schema`, fitted so that every answer it admits ends
    within ``tokens`` (counted with ``count``); see :mod:`.budget`."""
    schema = output_schema(req)
    if schema is None:
        return None
    try:
        return budgets.fit(schema, tokens, count)
    except budgets.BudgetTooSmall as exc:
        if must_call(req):
            raise incomplete(req, tokens, why=f"a call to {_names(req)} {exc}") from None
        raise InvalidArgument(f"llm.chat: a structured answer {exc}: give the call more "
                              "max_tokens") from None


def instruction(req: ChatRequest) -> str | None:
    """The system instruction that tells the model the shape of its answer."""
    if uses_tools(req):
        lines = ["You can call these tools:"]
        for tool in callable_tools(req):
            fn = tool["function"]
            desc = fn.get("description", "")
            lines.append(f"- {fn['name']}: {desc} Arguments: {json.dumps(fn['parameters'])}")
        lines.append(
            'To call a tool, answer only with a JSON object {"name": <tool name>, '
            '"arguments": {...}}.'
        )
        if _parallel(req):
            lines.append("To call several tools at once, answer with a JSON list of such objects.")
        if req.tool_choice == "auto":
            lines.append('To answer without a tool, answer {"reply": <your answer>}.')
        return "\n".join(lines)
    schema = req.json_schema
    if schema is not None:
        return f"Answer only with a JSON object that matches this JSON schema: {json.dumps(schema)}"
    return None


def _shown_calls(calls: list[dict[str, Any]]) -> str:
    """Tool calls as the model itself would have written them."""
    shown = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
             for c in calls]
    return json.dumps(shown[0] if len(shown) == 1 else shown)


def prompt_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The messages to render with the chat template, instruction included.

    An assistant turn that made tool calls is shown to the model as the JSON
    it would have produced (every call of the turn), and each tool result
    names the tool (and, where a turn made several calls, the call) it
    answers, so a conversation with tool results reads naturally to it.
    """
    msgs = []
    names: dict[str, str] = {}   # tool_call_id -> tool name
    pending = 0                  # calls of the last assistant turn
    for msg in req.messages:
        content = msg["content"]
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            calls = msg["tool_calls"]
            names.update({c["id"]: c["function"]["name"] for c in calls if c.get("id")})
            pending = len(calls)
            content = f"{content}\n{_shown_calls(calls)}" if content else _shown_calls(calls)
        elif msg["role"] == "tool":
            call_id = msg.get("tool_call_id") or ""
            name = msg.get("name") or names.get(call_id, "the tool")
            which = f" (call {call_id})" if pending > 1 and call_id else ""
            content = f"{name}{which} returned: {content}"
        msgs.append({"role": msg["role"], "content": content})
    extra = instruction(req)
    if extra:
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + extra}
        else:
            msgs.insert(0, {"role": "system", "content": extra})
    return msgs


def new_call_id() -> str:
    """A fresh id for a tool call."""
    return f"call_{uuid.uuid4().hex[:12]}"


def _as_call(value: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    return {
        "id": call_id or new_call_id(),
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(value["arguments"])},
    }


def partial_reply(text: str) -> str | None:
    """The text of a ``{"reply": ...}`` answer cut short, or None if ``text``
    does not begin one."""
    head = text.lstrip()
    if not head.startswith("{"):
        return None
    head = head[1:].lstrip()
    if not head.startswith('"reply"'):
        return None
    head = head[len('"reply"'):].lstrip()
    if not head.startswith(":"):
        return ""
    head = head[1:].lstrip()
    if not head.startswith('"'):
        return ""
    body = head[1:]
    for cut in range(len(body), -1, -1):   # the longest prefix that decodes
        try:
            return json.loads('"' + body[:cut] + '"')
        except ValueError:
            continue
    return ""


def parse_answer(req: ChatRequest, text: str, finish: str = "stop",
                 budget: int | None = None, ids: list[str] | None = None) -> dict[str, Any]:
    """Turn the model's text into reply fields: ``text``, ``tool_calls``,
    ``parsed`` and ``finish_reason``.

    ``finish`` is how generation ended ("stop" or "length"). An answer that
    must be a tool call and is not one raises :class:`ToolCallIncomplete`,
    naming the tools and the ``budget``; any other answer cut short keeps its
    text with ``finish_reason="length"``. ``ids`` are the ids the calls were
    streamed under, in order.
    """
    fields: dict[str, Any] = {"text": text, "tool_calls": [], "parsed": None,
                              "finish_reason": finish}
    if not uses_tools(req) and req.json_schema is None:   # free text
        return fields
    try:
        value = json.loads(text)
    except ValueError:
        value = None
        if uses_tools(req) and not must_call(req):
            reply = partial_reply(text)
            fields["text"] = text if reply is None else reply
    else:
        if not uses_tools(req):
            fields["parsed"] = value
            return fields
        if isinstance(value, dict) and "reply" in value and "name" not in value:
            fields["text"] = str(value["reply"])
        elif isinstance(value, dict) and "name" in value:
            value = [value]
        if isinstance(value, list):
            ids = ids or []
            fields["tool_calls"] = [_as_call(v, ids[i] if i < len(ids) else None)
                                    for i, v in enumerate(value)
                                    if isinstance(v, dict) and "name" in v]
    if fields["tool_calls"]:
        fields["text"] = ""
        fields["finish_reason"] = "tool_calls"
    elif must_call(req):
        raise incomplete(req, budget, text)
    return fields


def _names(req: ChatRequest) -> str:
    return ", ".join(repr(t["function"]["name"]) for t in callable_tools(req))


def incomplete(req: ChatRequest, budget: int | None, text: str = "",
               why: str = "") -> ToolCallIncomplete:
    """The error of a call that had to call a tool and did not."""
    if not why:
        room = f"the {budget} tokens it had" if budget is not None else "its token budget"
        shown = f" (the model wrote {text[:80]!r})" if text else ""
        why = (f"tool_choice asks for a call to {_names(req)}, and the model's call did not "
               f"complete within {room}{shown}")
    return ToolCallIncomplete(
        f"llm.chat: {why}; give the call more max_tokens",
        details={"tools": [t["function"]["name"] for t in callable_tools(req)],
                 "budget": budget},
    )
