"""OpenAI's chat completions API in the kernel's terms, and back: pure
functions, no I/O.

A request becomes the body of an ``llm.chat`` system call, checked as the
scheduler checks one (aiosd.chat) so that a malformed request never reaches
it; an answer, or the pieces of a streamed one, become OpenAI's response
objects; a kernel error becomes OpenAI's error body and HTTP status.

Every refusal is a :class:`RequestError` (HTTP 400) whose ``param`` names the
field at fault, as OpenAI's own errors do.
"""

from __future__ import annotations

import re
import time
from typing import Any

from libaios import errors
from libaios.protocol import ErrorCode

from .. import chat

#: HTTP status and OpenAI error type of each kernel error code
STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorCode.BAD_FRAME: (400, "invalid_request_error"),
    ErrorCode.BAD_VERSION: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_TYPE: (400, "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorCode.PERMISSION_DENIED: (403, "permission_error"),
    ErrorCode.APPROVAL_REQUIRED: (403, "permission_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.CONFLICT: (409, "conflict_error"),
    ErrorCode.TOO_LARGE: (413, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.QUOTA_EXCEEDED: (429, "rate_limit_error"),
    ErrorCode.CANCELLED: (499, "cancelled"),
    ErrorCode.BACKEND: (502, "api_error"),
    ErrorCode.TOOL_CALL_INCOMPLETE: (500, "server_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.WORKER_LOST: (503, "service_unavailable"),
    ErrorCode.SHUTTING_DOWN: (503, "service_unavailable"),
    ErrorCode.NOT_RUNNING: (503, "service_unavailable"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
}

#: what a 429 asks the caller to wait, seconds
RETRY_AFTER = 1

#: message roles a request may use ("developer" is OpenAI's newer "system")
ROLES = ("system", "developer", "user", "assistant", "tool")

class RequestError(errors.InvalidArgument):
    """A bad request, naming the field (``param``) at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(exc: errors.AIOSError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body of a kernel error."""
    status, kind = STATUS.get(exc.code, (500, "server_error"))
    return status, {"error": {"message": exc.message, "type": kind,
                              "param": getattr(exc, "param", None),
                              "code": exc.code.name.lower()}}


#: the fields of an ``llm.chat`` body, which the kernel's messages name
CHAT_FIELDS = ("messages", "max_tokens", "min_tokens", "temperature", "top_p", "stop", "seed",
               "stream", "tools", "tool_choice", "parallel_tool_calls", "response_format")

#: a field path at the start of a message: 'max_tokens' must ..., messages[2].content must ...
_LEADING = re.compile(r"^'?(?P<path>[a-z_]+(?:\[\d+\])?(?:\.[\w\[\]]+)*)'?\s")
_QUOTED = re.compile(r"'(?P<path>[a-z_]+(?:\[\d+\])?(?:\.[\w\[\]]+)*)'")


def kernel_field(message: str) -> str | None:
    """The field a kernel's InvalidArgument message about ``llm.chat`` is
    about: the path it begins with, else the first field it quotes, else None."""
    for found in [_LEADING.match(message), *_QUOTED.finditer(message)]:
        if found is not None and re.split(r"[.\[]", found.group("path"))[0] in CHAT_FIELDS:
            return found.group("path")
    return None


def checked(body: dict[str, Any], rename: dict[str, str] | None = None) -> None:
    """Check an ``llm.chat`` body as the scheduler will; RequestError naming
    the field (under the request's own name for it, ``rename``)."""
    try:
        chat.parse(body)
    except errors.InvalidArgument as exc:
        message = exc.message.removeprefix("llm.chat: ")
        field = kernel_field(message)
        for kernel_name, name in (rename or {}).items():
            if field is not None and (field == kernel_name or field.startswith(kernel_name + ".")
                                      or field.startswith(kernel_name + "[")):
                message = message.replace(kernel_name, name, 1)
                field = name + field[len(kernel_name):]
        raise RequestError(message, field) from None


def text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts
    (``text``, ``input_text``, ``output_text``; a ``refusal`` part is its text)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                pieces.append(part["refusal"])
            elif kind in ("text", "input_text", "output_text"):
                raise RequestError(f"{where}[{i}].text must be a string", f"{where}[{i}].text")
            else:
                raise RequestError(f"{where}[{i}]: only text parts are supported, got "
                                   f"{kind!r} (the model here reads no images, audio or files)",
                                   f"{where}[{i}]")
        return "".join(pieces)
    raise RequestError(f"{where} must be a string or a list of text parts", where)


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise RequestError(f"{where} must be a list of tool calls", where)
    calls = []
    for j, call in enumerate(raw):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise RequestError(f"{at} must be an object with 'id', 'type' and 'function'", at)
        if call.get("type", "function") != "function":
            raise RequestError(f"{at}.type must be 'function', got {call.get('type')!r}", f"{at}.type")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"{at}.function.name must be a non-empty string", f"{at}.function.name")
        args = fn.get("arguments", "{}")
        if chat.json_object(args) is None:
            raise RequestError(f"{at}.function.arguments must be a JSON object in a string",
                               f"{at}.function.arguments")
        call_id = call.get("id", "")
        if not isinstance(call_id, str):
            raise RequestError(f"{at}.id must be a string", f"{at}.id")
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return calls


def messages_of(raw: Any) -> list[dict[str, Any]]:
    """The kernel's messages of a request's ``messages``."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, msg in enumerate(raw):
        at = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{at} must be an object with 'role' and 'content'", at)
        role = msg.get("role")
        if role == "function":
            raise RequestError(f"{at}.role 'function' is the deprecated form of 'tool': send "
                               "the result as a 'tool' message with 'tool_call_id'", f"{at}.role")
        if role not in ROLES:
            raise RequestError(f"{at}.role must be one of {', '.join(ROLES)}; got {role!r}",
                               f"{at}.role")
        clean: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                 "content": text_of(msg.get("content"), f"{at}.content")}
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"{at}.tool_call_id is required: the id of the tool call "
                                   "this message answers", f"{at}.tool_call_id")
            clean["tool_call_id"] = call_id
        if isinstance(msg.get("name"), str):
            clean["name"] = msg["name"]
        elif msg.get("name") is not None:
            raise RequestError(f"{at}.name must be a string", f"{at}.name")
        if msg.get("tool_calls") not in (None, []):
            if role != "assistant":
                raise RequestError(f"{at}.tool_calls is for assistant messages", f"{at}.tool_calls")
            clean["tool_calls"] = _tool_calls(msg["tool_calls"], f"{at}.tool_calls")
        if msg.get("function_call") is not None:
            raise RequestError(f"{at}.function_call is the deprecated form of 'tool_calls'",
                               f"{at}.function_call")
        out.append(clean)
    return out


def _check_tools(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise RequestError("'tools' must be a list of function tools", "tools")
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise RequestError(f"tools[{i}].type must be 'function' (the only kind of tool "
                               f"here), got {kind!r}", f"tools[{i}].type")
    return raw


def _bool(req: dict[str, Any], key: str) -> bool | None:
    value = req.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {value!r}", key)
    return value


def _refuse_unsupported(req: dict[str, Any]) -> None:
    """Options that would change the form of the answer, which the
    kernel cannot give: refused rather than silently dropped."""
    n = req.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(f"'n' must be 1 (one choice per request here), got {n!r}", "n")
    if _bool(req, "logprobs"):
        raise RequestError("'logprobs' is not supported here", "logprobs")
    if req.get("top_logprobs") not in (None, 0):
        raise RequestError("'top_logprobs' is not supported here", "top_logprobs")
    modalities = req.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError(f"'modalities' may only be [\"text\"], got {modalities!r}", "modalities")
    for key, instead in (("audio", None), ("prediction", None), ("web_search_options", None),
                         ("functions", "tools"), ("function_call", "tool_choice")):
        if req.get(key) is not None:
            hint = f" (deprecated: use '{instead}')" if instead else ""
            raise RequestError(f"'{key}' is not supported here{hint}", key)
    for key in ("frequency_penalty", "presence_penalty"):
        value = req.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not -2 <= value <= 2):
            raise RequestError(f"'{key}' must be a number from -2 to 2, got {value!r}", key)
    if req.get("logit_bias") is not None and not isinstance(req["logit_bias"], dict):
        raise RequestError("'logit_bias' must be a map of token ids to numbers", "logit_bias")


def check_model(req: dict[str, Any], models: list[str]) -> str:
    """The request's ``model``: one /v1/models lists (NotFound if not)."""
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: one of GET /v1/models", "model")
    if model not in models:
        exc = errors.NotFound(f"the model {model!r} does not exist here; the models are: "
                              f"{', '.join(models)} (GET /v1/models)")
        exc.param = "model"   # type: ignore[attr-defined]
        raise exc
    return model


def stream_options(req: dict[str, Any], stream: bool) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options``)."""
    options = req.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("'stream_options' is only allowed with \"stream\": true", "stream_options")
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("'stream_options.include_usage' must be true or false",
                           "stream_options.include_usage")
    return include


def chat_body(req: Any, models: list[str]) -> dict[str, Any]:
    """The ``llm.chat`` body of a chat completions request (RequestError,
    naming the field, if it cannot be one; NotFound for an unknown model)."""
    if not isinstance(req, dict):
        raise RequestError("the body must be a JSON object")
    model = check_model(req, models)
    _refuse_unsupported(req)
    body: dict[str, Any] = {"messages": messages_of(req.get("messages")), "model": model}
    max_tokens = req.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = req.get("max_tokens")
    elif req.get("max_tokens") is not None and req["max_tokens"] != max_tokens:
        raise RequestError("give 'max_completion_tokens' or 'max_tokens', not both",
                           "max_completion_tokens")
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if req.get("tools") is not None:
        body["tools"] = _check_tools(req["tools"])
    for key in ("temperature", "top_p", "stop", "seed", "tool_choice", "parallel_tool_calls",
                "response_format", "min_tokens"):
        if req.get(key) is not None:
            body[key] = req[key]
    stream = _bool(req, "stream") or False
    body["stream"] = stream
    stream_options(req, stream)
    user = req.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("'user' must be a string", "user")
    rename = ({"max_tokens": "max_completion_tokens"} if req.get("max_completion_tokens") is not None
              else None)
    checked(body, rename)
    return body


def usage(raw: dict[str, Any]) -> dict[str, Any]:
    prompt, completion_ = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion_,
            "total_tokens": prompt + completion_,
            "prompt_tokens_details": {"cached_tokens": int(raw.get("cached_tokens", 0))},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def completion(call_id: str, model: str, reply: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion object of an ``llm.chat`` reply."""
    tool_calls = reply.get("tool_calls") or []
    message: dict[str, Any] = {"role": "assistant",
                               "content": reply.get("text", "") if not tool_calls else
                               (reply.get("text") or None),
                               "refusal": None}
    if tool_calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["function"]["name"],
                                               "arguments": c["function"]["arguments"]}}
                                 for c in tool_calls]
    return {
        "id": call_id, "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": reply.get("finish_reason") or "stop"}],
        "usage": usage(reply.get("usage") or {}),
    }


def chunk(call_id: str, model: str, created: int, delta: dict[str, Any] | None,
          finish_reason: str | None = None, usage_: dict[str, Any] | None = None,
          with_usage: bool = False) -> dict[str, Any]:
    """One chat.completion.chunk of a stream (with ``usage_`` and no delta:
    the usage chunk ``stream_options.include_usage`` asks for; with
    ``with_usage``, the other chunks say ``"usage": null``, as OpenAI's do)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    out: dict[str, Any] = {"id": call_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "system_fingerprint": None, "choices": choices}
    if usage_ is not None or with_usage:
        out["usage"] = usage_
    return out


def deltas(part: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunk deltas of a partial reply: its text, its tool-call deltas."""
    out: list[dict[str, Any]] = []
    if part.get("text"):
        out.append({"content": part["text"]})
    for delta in part.get("tool_calls") or []:
        out.append({"tool_calls": [delta]})
    return out


class ChunkStream:
    """The chunks of one streamed chat completion, from the kernel's
    replies: a first chunk with the role, one per piece of text or tool-call
    delta, one with the finish reason, and (``include_usage``) one with the
    usage. Tool calls that the final reply has and no delta carried (a
    backend that does not stream them) go out whole before the end."""

    def __init__(self, call_id: str, model: str, include_usage: bool,
                 created: int | None = None) -> None:
        self.call_id, self.model, self.include_usage = call_id, model, include_usage
        self.created = int(time.time()) if created is None else created
        self._streamed: set[int] = set()

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None,
               usage_: dict[str, Any] | None = None) -> dict[str, Any]:
        return chunk(self.call_id, self.model, self.created, delta, finish, usage_,
                     with_usage=self.include_usage)

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def partial(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        for delta in part.get("tool_calls") or []:
            if isinstance(delta.get("index"), int):
                self._streamed.add(delta["index"])
        return [self._chunk(delta) for delta in deltas(part)]

    def end(self, reply: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for index, call in enumerate(reply.get("tool_calls") or []):
            if index not in self._streamed:
                out.append(self._chunk({"tool_calls": [
                    {"index": index, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"],
                                  "arguments": call["function"]["arguments"]}}]}))
        out.append(self._chunk({}, reply.get("finish_reason") or "stop"))
        if self.include_usage:
            out.append(self._chunk(None, usage_=usage(reply.get("usage") or {})))
        return out
