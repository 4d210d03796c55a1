"""The ``llm.chat`` request: checked by the scheduler before it queues, and
read by the LLM cores (and so in neither's package).

Pure logic, no I/O. Every rejection names the field and what was wrong, and
is raised as :class:`libaios.errors.InvalidArgument`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from libaios.errors import InvalidArgument

ROLES = ("system", "user", "assistant", "tool")
#: The field of a core's reply in which it tells the scheduler how long
#: after the call reached it the first piece of its answer came, seconds
#: (for the time-to-first-token metric; the scheduler takes it out before
#: the reply goes on to the caller).
FIRST_TOKEN = "first_token_s"
MAX_MESSAGES = 1024
MAX_TOKENS_LIMIT = 32768


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int = 256
    #: end of generation is held back until this many tokens are generated
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    #: whether one answer may make several tool calls (as in OpenAI's API)
    parallel_tool_calls: bool = True
    #: ``{"type": "json_object"}``, optionally with a "schema", or
    #: ``{"type": "json_schema", "json_schema": {"schema": {...}}}``.
    response_format: dict[str, Any] | None = None
    #: the model named (None: the kernel's default model)
    model: str | None = None

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must satisfy, if any ({} = any JSON object)."""
        rf = self.response_format
        if rf is None:
            return None
        if rf.get("type") == "json_schema":
            return rf["json_schema"]["schema"]
        return rf.get("schema") or {"type": "object"}

    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidArgument(f"llm.chat: '{key}' must be a number from {lo} to {hi}, got {value!r}")
    return float(value)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def json_object(text: Any) -> dict[str, Any] | None:
    """``text`` parsed, if it is a string holding a JSON object; else None
    (a tool call's ``arguments``). NaN and Infinity, which Python's parser
    takes but JSON has not, are not JSON here either."""
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):   # (RecursionError: nested too deep to parse)
        return None
    return value if isinstance(value, dict) else None


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"llm.chat: '{key}' must be true or false, got {value!r}")
    return value


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument("llm.chat: 'messages' must be a non-empty list of messages")
    if len(raw) > MAX_MESSAGES:
        raise InvalidArgument(f"llm.chat: at most {MAX_MESSAGES} messages, got {len(raw)}")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise InvalidArgument(f"llm.chat: messages[{i}] must be a map with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidArgument(
                f"llm.chat: messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}"
            )
        content = msg.get("content")
        if content is None and role == "assistant" and msg.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise InvalidArgument(f"llm.chat: messages[{i}].content must be a string")
        clean: dict[str, Any] = {"role": role, "content": content}
        for extra in ("name", "tool_call_id"):
            if extra in msg:
                if not isinstance(msg[extra], str):
                    raise InvalidArgument(f"llm.chat: messages[{i}].{extra} must be a string")
                clean[extra] = msg[extra]
        if msg.get("tool_calls") not in (None, []):
            if role != "assistant":
                raise InvalidArgument(f"llm.chat: messages[{i}].tool_calls is for assistant messages")
            clean["tool_calls"] = _tool_calls(msg["tool_calls"], f"messages[{i}].tool_calls")
        out.append(clean)
    return out


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's tool calls, as the OpenAI API writes them."""
    if not isinstance(raw, list):
        raise InvalidArgument(f"llm.chat: {where} must be a list of tool calls")
    calls = []
    for j, call in enumerate(raw):
        if not isinstance(call, dict):
            raise InvalidArgument(f"llm.chat: {where}[{j}] must be a map with 'id', 'type' and "
                                  f"'function', got {type(call).__name__}")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidArgument(f"llm.chat: {where}[{j}].function.name must be a string")
        args = fn.get("arguments", "{}")
        if json_object(args) is None:
            raise InvalidArgument(
                f"llm.chat: {where}[{j}].function.arguments must be a JSON object in a string")
        call_id = call.get("id", "")
        if not isinstance(call_id, str):
            raise InvalidArgument(f"llm.chat: {where}[{j}].id must be a string")
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return calls


def _tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidArgument("llm.chat: 'tools' must be a list of function tools")
    names = set()
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidArgument(
                f"llm.chat: tools[{i}] must be {{'type': 'function', 'function': {{...}}}}"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"llm.chat: tools[{i}].function.name must be a non-empty string")
        if name in names:
            raise InvalidArgument(f"llm.chat: tools[{i}].function.name {name!r} is used twice")
        names.add(name)
        params = fn.setdefault("parameters", {"type": "object", "properties": {}})
        _check_schema(params, f"tools[{i}].function.parameters")
    return raw


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise InvalidArgument(f"llm.chat: {where} must be a JSON schema object")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidArgument(f"llm.chat: {where} is not a valid JSON schema: {exc.message}") from None


def _response_format(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidArgument(
            "llm.chat: 'response_format.type' must be 'text', 'json_object' or 'json_schema'"
        )
    if raw["type"] == "text":
        return None
    if raw["type"] == "json_schema":
        inner = raw.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise InvalidArgument("llm.chat: 'response_format.json_schema.schema' is missing")
        _check_schema(inner["schema"], "response_format.json_schema.schema")
    elif "schema" in raw:
        _check_schema(raw["schema"], "response_format.schema")
    return raw


def parse(body: dict[str, Any]) -> ChatRequest:
    """Check an ``llm.chat`` body and return the request it describes."""
    max_tokens = body.get("max_tokens", 256)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not (
        0 < max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise InvalidArgument(
            f"llm.chat: 'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {max_tokens!r}"
        )
    min_tokens = body.get("min_tokens", 0)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or not (
        0 <= min_tokens <= max_tokens
    ):
        raise InvalidArgument(
            f"llm.chat: 'min_tokens' must be an integer from 0 to max_tokens ({max_tokens}), "
            f"got {min_tokens!r}"
        )
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise InvalidArgument("llm.chat: 'stop' must be a string or a list of up to 16 non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidArgument(f"llm.chat: 'seed' must be a non-negative integer, got {seed!r}")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidArgument(f"llm.chat: 'model' must be the name of a model, got {model!r}")
    tools = _tools(body.get("tools"))
    tool_choice = body.get("tool_choice", "auto")
    names = {t["function"]["name"] for t in tools}
    if isinstance(tool_choice, dict):
        chosen = (tool_choice.get("function") or {}).get("name")
        if chosen not in names:
            raise InvalidArgument(f"llm.chat: 'tool_choice' names {chosen!r}, which is not in 'tools'")
    elif tool_choice not in ("auto", "none", "required"):
        raise InvalidArgument("llm.chat: 'tool_choice' must be 'auto', 'none', 'required' or a function")
    response_format = _response_format(body.get("response_format"))
    if tools and tool_choice != "none" and response_format is not None:
        raise InvalidArgument("llm.chat: give 'tools' or 'response_format', not both")
    if min_tokens and (response_format is not None or tools and tool_choice != "none"):
        # a finished structured answer must be able to end
        raise InvalidArgument("llm.chat: 'min_tokens' cannot be combined with 'response_format' "
                              "or 'tools'")
    return ChatRequest(
        messages=_messages(body.get("messages")),
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stop,
        seed=seed,
        stream=bool(body.get("stream", False)),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=_flag(body, "parallel_tool_calls", True),
        response_format=response_format,
        model=model,
    )
