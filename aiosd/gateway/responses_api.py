"""OpenAI's Responses API (``POST /v1/responses``) in the kernel's terms,
and back: pure logic, no I/O.

The subset the OpenAI Agents SDK uses by default: ``input`` (a string, or
a list of message, ``function_call`` and ``function_call_output`` items),
``instructions``, function ``tools`` in the Responses' flat shape,
``tool_choice``, ``text.format`` (json_object, json_schema),
``previous_response_id`` and ``stream``. A request becomes one ``llm.chat``
body; its answer becomes a ``response`` object, or, streamed, the
Responses' server-sent events (:class:`ResponseEvents`).

``previous_response_id`` continues a conversation the gateway remembers
(:class:`ResponseStore`): the messages of every response it made for an
agent, in memory, the oldest forgotten first past a budget. A response
continues only its own agent's conversations.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from libaios import errors

from . import openai_api
from .openai_api import RequestError, text_of

#: input item types taken: messages, the model's function calls and their outputs
#: ("reasoning" items, which no model here makes, are passed over)
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")

#: options refused: they would change what the answer is, which the kernel cannot give
UNSUPPORTED = {
    "background": "background responses are not supported here",
    "conversation": "conversations are not supported here: continue one with "
                    "'previous_response_id'",
    "prompt": "stored prompts are not supported here",
}


def new_id(prefix: str) -> str:
    """An id no one can guess (a response id is a handle on a conversation)."""
    return prefix + secrets.token_hex(24)


@dataclass
class ResponsesRequest:
    """A checked Responses request, before its history is known."""

    model: str
    #: this request's own messages (its input), in the kernel's form
    messages: list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    #: the llm.chat options (tools in the chat form, response_format, ...)
    options: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    store: bool = True
    #: the request's fields as a response echoes them back
    echo: dict[str, Any] = field(default_factory=dict)

    def chat_body(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``llm.chat`` body: the instructions, the conversation so far
        (``history``), this input; checked as the scheduler checks one."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        body = {"messages": system + history + self.messages, **self.options,
                "stream": self.stream}
        if not body["messages"]:
            raise RequestError("'input' is empty and there is no conversation to continue", "input")
        openai_api.checked(body, {"max_tokens": "max_output_tokens",
                                  "response_format": "text.format"})
        return body


def _string(req: dict[str, Any], key: str) -> str | None:
    value = req.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"'{key}' must be a string", key)
    return value


def _arguments(value: Any, where: str) -> str:
    if not isinstance(value, str) or openai_api.chat.json_object(value) is None:
        raise RequestError(f"{where} must be a JSON object in a string", where)
    return value


def input_messages(raw: Any) -> list[dict[str, Any]]:
    """The kernel's messages of a request's ``input``. A function call
    joins the assistant message before it (one turn's text and calls)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise RequestError("'input' must be a string or a list of input items", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{at} must be an object (a message or a function call's item)", at)
        kind = item.get("type", "message")
        if kind not in ITEM_TYPES:
            raise RequestError(f"{at}.type {kind!r} is not supported here; the input items taken "
                               "are messages, function_call and function_call_output", f"{at}.type")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{at}.role must be user, system, developer or assistant; "
                                   f"got {role!r}", f"{at}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": text_of(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"{at}.call_id must be a non-empty string", f"{at}.call_id")
            if not isinstance(name, str) or not name:
                raise RequestError(f"{at}.name must be a non-empty string", f"{at}.name")
            call = {"id": call_id, "type": "function",
                    "function": {"name": name,
                                 "arguments": _arguments(item.get("arguments", "{}"),
                                                         f"{at}.arguments")}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"{at}.call_id must be a non-empty string: the call_id of "
                                   "the function call this is the output of", f"{at}.call_id")
            output = item.get("output")
            if output is None:
                raise RequestError(f"{at}.output is required", f"{at}.output")
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": text_of(output, f"{at}.output")})
    return out


def tools_of(raw: Any) -> list[dict[str, Any]]:
    """Function tools in the Responses' flat shape, as chat tools."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RequestError("'tools' must be a list of function tools", "tools")
    out = []
    for i, tool in enumerate(raw):
        at = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise RequestError(f"{at}.type must be 'function' (the only kind of tool here: no "
                               f"hosted tools), got {kind!r}", f"{at}.type")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{at}.name must be a non-empty string", f"{at}.name")
        fn: dict[str, Any] = {"name": name}
        if tool.get("description") is not None:
            if not isinstance(tool["description"], str):
                raise RequestError(f"{at}.description must be a string", f"{at}.description")
            fn["description"] = tool["description"]
        params = tool.get("parameters")
        fn["parameters"] = params if params is not None else {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_of(raw: Any) -> str | dict[str, Any] | None:
    if raw is None or raw in ("auto", "none", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function":
        if not isinstance(raw.get("name"), str):
            raise RequestError("'tool_choice.name' must name a function tool", "tool_choice.name")
        return {"type": "function", "function": {"name": raw["name"]}}
    raise RequestError("'tool_choice' must be 'auto', 'none', 'required' or "
                       "{\"type\": \"function\", \"name\": ...}", "tool_choice")


def response_format_of(text: Any) -> dict[str, Any] | None:
    """The chat ``response_format`` of a request's ``text`` option."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise RequestError("'text' must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise RequestError("'text.format' must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise RequestError("'text.format.schema' must be a JSON schema object",
                               "text.format.schema")
        inner = {"name": fmt.get("name") or "answer", "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            inner["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": inner}
    raise RequestError("'text.format.type' must be 'text', 'json_object' or 'json_schema'",
                       "text.format.type")


def parse_request(req: Any, models: list[str]) -> ResponsesRequest:
    """A checked Responses request (RequestError naming the field; NotFound
    for an unknown model)."""
    if not isinstance(req, dict):
        raise RequestError("the body must be a JSON object")
    model = openai_api.check_model(req, models)
    for key, why in UNSUPPORTED.items():
        if req.get(key) not in (None, False):
            raise RequestError(f"'{key}': {why}", key)
    if req.get("top_logprobs") not in (None, 0):
        raise RequestError("'top_logprobs' is not supported here", "top_logprobs")
    if "input" not in req and not req.get("previous_response_id"):
        raise RequestError("'input' is required", "input")
    messages = input_messages(req["input"]) if req.get("input") is not None else []
    instructions = _string(req, "instructions")
    previous = _string(req, "previous_response_id")
    options: dict[str, Any] = {"model": model}
    tools = tools_of(req.get("tools"))
    if tools:
        options["tools"] = tools
    choice = tool_choice_of(req.get("tool_choice"))
    if choice is not None:
        options["tool_choice"] = choice
    response_format = response_format_of(req.get("text"))
    if response_format is not None:
        options["response_format"] = response_format
    if req.get("max_output_tokens") is not None:
        options["max_tokens"] = req["max_output_tokens"]
    for key in ("temperature", "top_p", "parallel_tool_calls", "min_tokens"):
        if req.get(key) is not None:
            options[key] = req[key]
    flags = {}
    for key, default in (("stream", False), ("store", True)):
        value = req.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise RequestError(f"'{key}' must be true or false, got {value!r}", key)
        flags[key] = value
    metadata = req.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise RequestError("'metadata' must be a map of strings", "metadata")
    user = _string(req, "user")
    fmt = (req.get("text") or {}).get("format") if isinstance(req.get("text"), dict) else None
    echo = {
        "instructions": instructions,
        "max_output_tokens": req.get("max_output_tokens"),
        "metadata": metadata or {},
        "parallel_tool_calls": req.get("parallel_tool_calls") is not False,
        "previous_response_id": previous,
        "store": flags["store"],
        "temperature": req.get("temperature", 0.0),
        "text": {"format": fmt or {"type": "text"}},
        "tool_choice": req.get("tool_choice") or "auto",
        "tools": list(req.get("tools") or []),
        "top_p": req.get("top_p", 1.0),
        "truncation": "disabled",
        "user": user,
    }
    return ResponsesRequest(model=model, messages=messages, instructions=instructions,
                            previous_response_id=previous, options=options,
                            stream=flags["stream"], store=flags["store"], echo=echo)


# -- the response -------------------------------------------------------------------------


def usage(raw: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": int(raw.get("cached_tokens", 0)),
                                     "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def output_items(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """The output items of an ``llm.chat`` reply: its text as a message
    (also an empty one, when there is nothing else), then its tool calls."""
    calls = reply.get("tool_calls") or []
    items = []
    text = reply.get("text") or ""
    if text or not calls:
        cut = reply.get("finish_reason") == "length"
        items.append(message_item(new_id("msg_"), text, "incomplete" if cut else "completed"))
    for call in calls:
        items.append(call_item(new_id("fc_"), call["id"], call["function"]["name"],
                               call["function"]["arguments"]))
    return items


def response_object(resp_id: str, created: float, request: ResponsesRequest, status: str,
                    output: list[dict[str, Any]], usage_: dict[str, Any] | None = None,
                    error: dict[str, Any] | None = None,
                    incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": resp_id, "object": "response", "created_at": created, "status": status,
            "background": False, "error": error, "incomplete_details": incomplete,
            "model": request.model, "output": output, "usage": usage_,
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            **request.echo}


def ending(reply: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """A finished reply's status, and why it is incomplete if it is."""
    if reply.get("finish_reason") == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def response_of(resp_id: str, created: float, request: ResponsesRequest,
                reply: dict[str, Any]) -> dict[str, Any]:
    """The ``response`` object of an ``llm.chat`` reply."""
    status, incomplete = ending(reply)
    return response_object(resp_id, created, request, status, output_items(reply),
                           usage(reply.get("usage") or {}), incomplete=incomplete)


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The kernel message of a response's output: its text and tool calls."""
    text = "".join(part["text"] for item in output if item["type"] == "message"
                   for part in item["content"])
    message: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    if calls:
        message["tool_calls"] = calls
    return message


def failure(exc: errors.AIOSError) -> dict[str, Any]:
    """The ``error`` of a failed response: its ``code`` one of those OpenAI
    defines for one (rate_limit_exceeded or server_error), its ``type`` the
    kind of error, as an HTTP error body would say it."""
    status, body = openai_api.error_body(exc)
    return {"code": "rate_limit_exceeded" if status == 429 else "server_error",
            "message": body["error"]["message"], "type": body["error"]["type"],
            "param": body["error"]["param"]}


class ResponseEvents:
    """The server-sent events of one streamed response, from the kernel's
    replies: response.created and .in_progress; for the text, an output
    item (a message) with its content part and output_text deltas; for
    each tool call, an output item (a function_call) with its arguments'
    deltas; each item's .done events; then response.completed (or
    .incomplete, or .failed). Each event is a map with its ``type`` and
    ``sequence_number``; ``output`` holds the items as they stand."""

    def __init__(self, resp_id: str, request: ResponsesRequest, created: float | None = None):
        self.resp_id, self.request = resp_id, request
        self.created = time.time() if created is None else created
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self._open: int | None = None          # the output index of the item being written
        self._calls: dict[int, int] = {}       # a streamed call's index -> its output index

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return json.loads(json.dumps(response_object(self.resp_id, self.created, self.request,
                                                     status, self.output, **extra)))

    def start(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self._snapshot("in_progress")),
                self._event("response.in_progress", response=self._snapshot("in_progress"))]

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.output.append(item)
        self._open = len(self.output) - 1
        events.append(self._event("response.output_item.added", output_index=self._open,
                                  item=json.loads(json.dumps(item))))
        return events

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        """The .done events of the item being written, if any."""
        if self._open is None:
            return []
        index, item = self._open, self.output[self._open]
        self._open = None
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self._event("response.output_text.done", item_id=item["id"],
                                      output_index=index, content_index=0, text=part["text"],
                                      logprobs=[]))
            events.append(self._event("response.content_part.done", item_id=item["id"],
                                      output_index=index, content_index=0, part=dict(part)))
        else:
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      name=item["name"], arguments=item["arguments"]))
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=index,
                                  item=json.loads(json.dumps(item))))
        return events

    def _text(self, piece: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self.output[self._open]["type"] != "message":
            item = {"id": new_id("msg_"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []}
            events += self._add(item)
            item["content"].append(output_text(""))
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=self._open, content_index=0,
                                      part=output_text("")))
        item = self.output[self._open]   # type: ignore[index]
        if not piece:
            return events
        item["content"][0]["text"] += piece
        events.append(self._event("response.output_text.delta", item_id=item["id"],
                                  output_index=self._open, content_index=0, delta=piece,
                                  logprobs=[]))
        return events

    def _call(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = delta.get("index", 0)
        fn = delta.get("function") or {}
        if index not in self._calls:
            item = call_item(new_id("fc_"), delta.get("id") or new_id("call_"),
                             fn.get("name") or "", "", status="in_progress")
            events += self._add(item)
            self._calls[index] = self._open   # type: ignore[assignment]
        at = self._calls[index]
        item = self.output[at]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item["id"], output_index=at,
                                      delta=fn["arguments"]))
        return events

    def partial(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of a partial reply: a piece of text, tool-call deltas."""
        events = self._text(part["text"]) if part.get("text") else []
        for delta in part.get("tool_calls") or []:
            events += self._call(delta)
        return events

    def end(self, reply: dict[str, Any]) -> list[dict[str, Any]]:
        """The last events, from the final reply: what it has that no
        partial carried, the .done events, and response.completed (or
        response.incomplete, cut short by max_output_tokens)."""
        events: list[dict[str, Any]] = []
        streamed_text = any(item["type"] == "message" for item in self.output)
        calls = reply.get("tool_calls") or []
        if reply.get("text") and not streamed_text:
            events += self._text(reply["text"])
        for index, call in enumerate(calls):
            if index not in self._calls:
                events += self._call({"index": index, "id": call["id"],
                                      "function": call["function"]})
        if not self.output:   # an empty answer is an empty message
            events += self._text("")
        status, incomplete = ending(reply)
        events += self._close("incomplete" if status == "incomplete" else "completed")
        final = self._snapshot(status, usage_=usage(reply.get("usage") or {}),
                               incomplete=incomplete)
        events.append(self._event(f"response.{status}", response=final))
        return events

    def fail(self, exc: errors.AIOSError) -> list[dict[str, Any]]:
        """The last events of a response whose call failed: response.failed."""
        events = self._close("incomplete")
        events.append(self._event("response.failed",
                                  response=self._snapshot("failed", error=failure(exc))))
        return events


# -- what the gateway remembers -----------------------------------------------------------


@dataclass
class Stored:
    owner: str
    #: the conversation up to and with this response (no instructions:
    #: a request's instructions are its own, not carried on)
    messages: list[dict[str, Any]]
    size: int


class ResponseStore:
    """The conversations of the responses made, for ``previous_response_id``:
    in memory, at most ``per_agent`` responses an agent and ``budget``
    bytes in all; past either, the oldest are forgotten."""

    def __init__(self, per_agent: int = 256, budget: int = 64 * 2**20) -> None:
        self.per_agent, self.budget = per_agent, budget
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._by_owner: dict[str, OrderedDict[str, None]] = {}
        self.size = 0

    def __len__(self) -> int:
        return len(self._items)

    def history(self, resp_id: str, agent: str) -> list[dict[str, Any]]:
        """The conversation response ``resp_id`` ended (NotFound if it is
        not known, or forgotten; PermissionDenied if another agent's)."""
        stored = self._items.get(resp_id)
        if stored is None:
            exc = errors.NotFound(f"no response {resp_id!r} is known here: it was never made, "
                                  "made with \"store\": false, or forgotten (the gateway keeps "
                                  "the latest in memory, and none across a restart)")
            exc.param = "previous_response_id"   # type: ignore[attr-defined]
            raise exc
        if stored.owner != agent:
            exc2 = errors.PermissionDenied(
                f"response {resp_id!r} is another agent's: a response continues only the "
                "conversations of the agent whose key made it")
            exc2.param = "previous_response_id"   # type: ignore[attr-defined]
            raise exc2
        self._items.move_to_end(resp_id)
        return [dict(m) for m in stored.messages]

    def put(self, resp_id: str, agent: str, messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(messages))
        if size > self.budget:
            return   # too large to keep: a later previous_response_id says it is not known
        self._items[resp_id] = Stored(agent, messages, size)
        self._by_owner.setdefault(agent, OrderedDict())[resp_id] = None
        self.size += size
        mine = self._by_owner[agent]
        while len(mine) > self.per_agent:
            self._drop(next(iter(mine)))
        while self.size > self.budget:
            self._drop(next(iter(self._items)))

    def _drop(self, resp_id: str) -> None:
        stored = self._items.pop(resp_id)
        self.size -= stored.size
        mine = self._by_owner[stored.owner]
        mine.pop(resp_id, None)
        if not mine:
            del self._by_owner[stored.owner]
