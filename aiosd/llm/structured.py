"""Structured output for local models: tool calls and JSON answers.

A local model is told what shape to answer in (a system instruction) and held
to it by a grammar built from a JSON schema, so even a tiny model emits a
parseable tool call. This module builds that schema and instruction and
parses the model's text back. Pure logic, no I/O.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .request import ChatRequest


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


def output_schema(req: ChatRequest) -> dict[str, Any] | None:
    """The schema the model's whole answer must satisfy, or None for free text."""
    if uses_tools(req):
        choice = req.tool_choice
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            return _call_schema(next(t for t in req.tools if t["function"]["name"] == name))
        options = [_call_schema(t) for t in req.tools]
        if choice == "auto":
            options.append(REPLY_SCHEMA)
        return options[0] if len(options) == 1 else {"anyOf": options}
    return req.json_schema


def instruction(req: ChatRequest) -> str | None:
    """The system instruction that tells the model the shape of its answer."""
    if uses_tools(req):
        lines = ["You can call these tools:"]
        for tool in req.tools:
            fn = tool["function"]
            desc = fn.get("description", "")
            lines.append(f"- {fn['name']}: {desc} Arguments: {json.dumps(fn['parameters'])}")
        lines.append(
            'To call a tool, answer only with a JSON object {"name": <tool name>, '
            '"arguments": {...}}.'
        )
        if req.tool_choice == "auto":
            lines.append('To answer without a tool, answer {"reply": <your answer>}.')
        return "\n".join(lines)
    schema = req.json_schema
    if schema is not None:
        return f"Answer only with a JSON object that matches this JSON schema: {json.dumps(schema)}"
    return None


def prompt_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The messages to render with the chat template, instruction included.

    An assistant turn that made tool calls is shown to the model as the JSON
    it would have produced, so a conversation with tool results reads
    naturally to it.
    """
    msgs = []
    for msg in req.messages:
        content = msg["content"]
        if msg["role"] == "assistant" and msg.get("tool_calls") and not content:
            fn = msg["tool_calls"][0].get("function", {})
            args = fn.get("arguments", "{}")
            content = json.dumps({"name": fn.get("name"), "arguments": json.loads(args)})
        msgs.append({"role": msg["role"], "content": content})
    extra = instruction(req)
    if extra:
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + extra}
        else:
            msgs.insert(0, {"role": "system", "content": extra})
    return msgs


def parse_answer(req: ChatRequest, text: str) -> dict[str, Any]:
    """Turn the model's text into reply fields: ``text``, ``tool_calls``,
    ``parsed``. An answer cut short (by max_tokens) parses to nothing."""
    schema = output_schema(req)
    if schema is None:
        return {"text": text, "tool_calls": [], "parsed": None}
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text, "tool_calls": [], "parsed": None}
    if not uses_tools(req):
        return {"text": text, "tool_calls": [], "parsed": value}
    if isinstance(value, dict) and "reply" in value and "name" not in value:
        return {"text": str(value["reply"]), "tool_calls": [], "parsed": None}
    call = {
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(value["arguments"])},
    }
    return {"text": "", "tool_calls": [call], "parsed": None}
