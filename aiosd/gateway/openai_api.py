"""OpenAI's chat completions API in the kernel's terms, and back: pure
functions, no I/O.

A request becomes the body of an ``llm.chat`` system call, checked as the
scheduler checks one (aiosd.chat) so that a malformed request never reaches
it; an answer, or the pieces of a streamed one, become OpenAI's response
objects; a kernel error becomes OpenAI's error body and HTTP status.
"""

from __future__ import annotations

import time
from typing import Any

from libaios import errors
from libaios.protocol import ErrorCode

from .. import chat

#: HTTP status and OpenAI error type of each kernel error code
STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorCode.BAD_FRAME: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_TYPE: (400, "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorCode.PERMISSION_DENIED: (403, "permission_error"),
    ErrorCode.APPROVAL_REQUIRED: (403, "permission_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.TOO_LARGE: (413, "invalid_request_error"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error"),
    ErrorCode.QUOTA_EXCEEDED: (429, "rate_limit_error"),
    ErrorCode.UNAVAILABLE: (503, "service_unavailable"),
    ErrorCode.WORKER_LOST: (503, "service_unavailable"),
    ErrorCode.SHUTTING_DOWN: (503, "service_unavailable"),
    ErrorCode.NOT_RUNNING: (503, "service_unavailable"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
}

#: what a 429 asks the caller to wait, seconds
RETRY_AFTER = 1


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


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text",
                                                                         "output_text"):
                raise RequestError(f"{where}[{i}]: only text parts are supported "
                                   "(this model reads no images or audio)", where)
            pieces.append(str(part.get("text", "")))
        return "".join(pieces)
    raise RequestError(f"{where}: must be a string or a list of text parts", where)


def chat_body(req: Any, models: list[str]) -> dict[str, Any]:
    """The ``llm.chat`` body of a chat completions request (RequestError,
    naming the field, if it cannot be one)."""
    if not isinstance(req, dict):
        raise RequestError("the body must be a JSON object")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: one of GET /v1/models", "model")
    if model not in models:
        raise errors.NotFound(f"the model {model!r} does not exist here; the models are: "
                              f"{', '.join(models)} (GET /v1/models)")
    n = req.get("n", 1)
    if n not in (1, None):
        raise RequestError(f"'n' must be 1 (one choice per call), got {n!r}", "n")
    raw = req.get("messages")
    if not isinstance(raw, list):
        raise RequestError("'messages' must be a list of messages", "messages")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise RequestError(f"messages[{i}] must be an object", f"messages[{i}]")
        clean = dict(msg)
        if clean.get("role") == "developer":
            clean["role"] = "system"
        if clean.get("role") == "assistant" and clean.get("tool_calls") and not clean.get("content"):
            clean["content"] = ""
        else:
            clean["content"] = _text(clean.get("content"), f"messages[{i}].content")
        messages.append(clean)
    body: dict[str, Any] = {"messages": messages}
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    # (min_tokens: an extension, as llama.cpp's and vLLM's servers take it)
    for key in ("temperature", "top_p", "stop", "seed", "tools", "tool_choice",
                "parallel_tool_calls", "response_format", "min_tokens"):
        if req.get(key) is not None:
            body[key] = req[key]
    body["stream"] = bool(req.get("stream", False))
    try:
        chat.parse(body)
    except errors.InvalidArgument as exc:
        # the kernel's message names the field: 'llm.chat: 'max_tokens' must ...'
        message = exc.message.removeprefix("llm.chat: ")
        field = message.split("'")[1] if message.count("'") >= 2 else None
        raise RequestError(message, field) from None
    return body


def usage(raw: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(raw.get("cached_tokens", 0))}}


def completion(call_id: str, model: str, reply: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion object of an ``llm.chat`` reply."""
    tool_calls = reply.get("tool_calls") or []
    message: dict[str, Any] = {"role": "assistant",
                               "content": reply.get("text", "") if not tool_calls else
                               (reply.get("text") or None),
                               "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": call_id, "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": reply.get("finish_reason") or "stop"}],
        "usage": usage(reply.get("usage") or {}),
    }


def chunk(call_id: str, model: str, created: int, delta: dict[str, Any] | None,
          finish_reason: str | None = None, usage_: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """One chat.completion.chunk of a stream (with ``usage_`` and no delta:
    the usage chunk ``stream_options.include_usage`` asks for)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    out: dict[str, Any] = {"id": call_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
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
