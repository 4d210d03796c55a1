"""The ``openai`` backend: any OpenAI-compatible server (vLLM, llama-server,
Ollama, llama-cpp-python's server, a cloud API) by base URL.

The API key comes from the environment variable named in the config, never
from the config file. Generation is always streamed from the server so that
a cancelled call stops at the next token and closes the connection.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from typing import Any

from libaios.errors import BackendError, InvalidArgument, ToolCallIncomplete, Unavailable

from ..chat import ChatRequest, json_object
from ..config import CoreConfig
from . import structured
from .sizing import DEFAULT_SLOTS
from .backend import CallContext, ChatOutput, Emit, StopScanner
from .toolstream import arguments_delta, header_delta


def _valid_calls(calls: list[dict[str, Any]]) -> bool:
    """Whether there are calls, each with a name and arguments that parse as
    a JSON object."""
    return bool(calls) and all(
        c["function"]["name"] and json_object(c["function"]["arguments"] or "{}") is not None
        for c in calls)


def _delta(tc: Any) -> dict[str, Any]:
    """A streamed tool-call delta from the server, as the caller gets it."""
    delta: dict[str, Any] = {"index": tc.index}
    if tc.id:
        delta.update(id=tc.id, type="function")
    fn = {}
    if tc.function and tc.function.name:
        fn["name"] = tc.function.name
    if tc.function and tc.function.arguments:
        fn["arguments"] = tc.function.arguments
    if fn:
        delta["function"] = fn
    return delta


class OpenAIBackend:
    """A model served over the OpenAI chat completions API."""

    def __init__(self, cfg: CoreConfig):
        import openai

        self.cfg = cfg
        self._openai = openai
        self.client = openai.OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env) or "unused",
            timeout=cfg.request_timeout,
            max_retries=0,
        )
        #: text-based snapshots of suspended calls: id -> (text so far, tokens)
        self.snapshots: dict[str, tuple[str, int]] = {}

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.cfg.name, "remote_name": self.remote_name,
                "base_url": self.cfg.base_url}

    @property
    def slots(self) -> int:
        """Calls sent to the server at once ("auto": DEFAULT_SLOTS)."""
        return self.cfg.slots if isinstance(self.cfg.slots, int) else DEFAULT_SLOTS

    @property
    def remote_name(self) -> str:
        return self.cfg.remote_name or self.cfg.name

    def _params(self, req: ChatRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.remote_name,
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if req.stop:
            params["stop"] = req.stop
        if req.seed is not None:
            params["seed"] = req.seed
        if req.min_tokens:
            # not in OpenAI's API; vLLM's and llama-cpp-python's servers take it
            params["extra_body"] = {"min_tokens": req.min_tokens}
        if req.tools:
            params["tools"] = req.tools
            params["tool_choice"] = req.tool_choice
            if not req.parallel_tool_calls:
                params["parallel_tool_calls"] = False
        if req.response_format is not None:
            params["response_format"] = req.response_format
        return params

    def chat(self, req: ChatRequest, ctx: CallContext) -> ChatOutput:
        """Generate the answer to ``req``. Suspension is text-based: the text
        generated so far is kept, and a resumed call asks the server to go on
        from it (``continue_final_message`` where the server supports it)."""
        emit, check, resume = ctx.emit, ctx.check, ctx.resume
        suspend, progress = ctx.suspend, ctx.progress
        prior, prior_tokens = "", 0
        if resume is not None:
            if resume not in self.snapshots:
                raise BackendError(f"snapshot {resume} is not on core {self.cfg.core}",
                                   retriable=False)
            prior, prior_tokens = self.snapshots.pop(resume)
        # A caller that does not stream, on a kernel that does not preempt,
        # gets one request and the server's exact usage (not every server
        # reports usage in a stream).
        if not req.stream and suspend is None and not prior:
            out = self._errors(lambda: self._whole(req))
        else:
            out = self._errors(lambda: self._streamed(req, emit, check, prior, prior_tokens,
                                                      suspend, progress))
        return self._held_to_choice(req, out, emit)

    def _held_to_choice(self, req: ChatRequest, out: ChatOutput, emit: Emit) -> ChatOutput:
        """Hold an answer to its ``tool_choice``. A server may answer a call
        that must call a tool with text, or cut the call short: then the
        call is asked again with the tool calls as a JSON schema the answer
        must match (fitted to the budget), and if that fails too it ends in
        ToolCallIncomplete. An ``auto`` call cut short inside a tool call
        says so in its finish reason."""
        if out.finish_reason == "suspended" or not structured.uses_tools(req):
            return out
        if _valid_calls(out.tool_calls):
            out.finish_reason = "tool_calls"
        elif not structured.must_call(req):
            if out.tool_calls:   # cut short inside a call
                out.tool_calls, out.finish_reason = [], "length"
            return out
        else:
            try:   # the model may have written the call as text
                fields = structured.parse_answer(req, out.text, out.finish_reason,
                                                 budget=req.max_tokens)
            except ToolCallIncomplete:
                again = self._errors(lambda: self._enforced(req))
                out.prompt_tokens += again.prompt_tokens
                out.completion_tokens += again.completion_tokens
                fields = structured.parse_answer(req, again.text, again.finish_reason,
                                                 budget=req.max_tokens)
            out.text, out.tool_calls, out.finish_reason = "", fields["tool_calls"], "tool_calls"
        if req.stream and structured.must_call(req):
            self._sent(out, emit)   # held back while it streamed (see _streamed)
        return out

    def _enforced(self, req: ChatRequest) -> ChatOutput:
        """Ask for the answer as a JSON document that must be a tool call:
        the tools described in the instruction, the calls as the schema.
        The schema goes as OpenAI's ``json_schema`` response format, or, to
        a server that refuses that form (llama-cpp-python's), as a
        ``json_object`` with a ``schema``."""
        schema = structured.fitted_schema(req, req.max_tokens)
        params = self._params(req)
        for key in ("tools", "tool_choice", "parallel_tool_calls", "stream_options"):
            params.pop(key, None)
        params["stream"] = False
        params["messages"] = structured.prompt_messages(req)
        forms = [{"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": schema}},
                 {"type": "json_object", "schema": schema}]
        for form in forms:
            params["response_format"] = form
            try:
                resp = self.client.chat.completions.create(**params)
                break
            except self._openai.APIStatusError as exc:
                if form is forms[-1] or "response_format" not in str(exc.message):
                    raise
        choice = resp.choices[0]
        return ChatOutput(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=resp.usage.prompt_tokens if resp.usage else 0,
            completion_tokens=resp.usage.completion_tokens if resp.usage else 0,
        )

    @staticmethod
    def _sent(out: ChatOutput, emit: Emit) -> None:
        """Stream the calls of an answer that was held back."""
        for index, call in enumerate(out.tool_calls):
            emit(header_delta(index, call["id"], call["function"]["name"]))
            emit(arguments_delta(index, call["function"]["arguments"]))

    def _whole(self, req: ChatRequest) -> ChatOutput:
        params = self._params(req)
        params["stream"] = False
        params.pop("stream_options")
        resp = self.client.chat.completions.create(**params)
        choice = resp.choices[0]
        text = choice.message.content or ""
        calls = [{"id": tc.id, "type": "function",
                  "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                 for tc in (choice.message.tool_calls or [])]
        return ChatOutput(
            text=text,
            finish_reason="tool_calls" if calls else (choice.finish_reason or "stop"),
            prompt_tokens=resp.usage.prompt_tokens if resp.usage else 0,
            completion_tokens=resp.usage.completion_tokens if resp.usage else 0,
            tool_calls=calls,
            parsed=self._parsed(req, text),
        )

    @staticmethod
    def _parsed(req: ChatRequest, text: str) -> Any:
        if req.json_schema is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def _errors(self, fn: Callable[[], ChatOutput]) -> ChatOutput:
        """Run ``fn``, turning the SDK's exceptions into the kernel's."""
        oa = self._openai
        try:
            return fn()
        except oa.APIConnectionError as exc:
            raise Unavailable(f"cannot reach the model server at {self.cfg.base_url}: {exc}") from None
        except oa.BadRequestError as exc:
            raise InvalidArgument(f"the model server refused the request: {exc.message}") from None
        except oa.APIStatusError as exc:
            raise BackendError(
                f"the model server at {self.cfg.base_url} answered {exc.status_code}: {exc.message}",
                retriable=exc.status_code >= 500 or exc.status_code == 429,
            ) from None
        except oa.APITimeoutError:
            raise Unavailable(f"the model server at {self.cfg.base_url} did not answer in time") from None

    def _streamed(self, req: ChatRequest, emit: Emit, check: Callable[[], None],
                  prior: str = "", prior_tokens: int = 0, suspend: Any = None,
                  progress: Callable[[int], None] | None = None) -> ChatOutput:
        scanner = StopScanner([])
        scanner.text = prior
        params = self._params(req)
        if prior:
            params["messages"] = [*req.messages, {"role": "assistant", "content": prior}]
            params["max_tokens"] = max(1, req.max_tokens - prior_tokens)
            params["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
            if req.min_tokens > prior_tokens:
                params["extra_body"]["min_tokens"] = req.min_tokens - prior_tokens
        finish = "length"
        usage: Any = None
        calls: dict[int, dict[str, Any]] = {}
        pieces = 0
        # an answer that must be a tool call is held back, and its calls sent
        # once they are known to be whole: text means the server did not
        # honour the choice, and a call it cut short is asked for again (see
        # _held_to_choice), so what streamed would not be the answer
        held = structured.must_call(req)
        stream = self.client.chat.completions.create(**params)
        suspended = False
        with stream:
            for chunk in stream:
                check()
                if suspend is not None and suspend.is_set():
                    suspended = True  # leaving the loop closes the connection
                    break
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        pieces += 1
                        out = scanner.feed(delta.content.encode())
                        if out and not held:
                            emit(out)
                        if progress is not None and pieces % 8 == 0:
                            progress(pieces)
                    for tc in delta.tool_calls or []:
                        slot = calls.setdefault(
                            tc.index,
                            {"id": tc.id or "", "type": "function",
                             "function": {"name": "", "arguments": ""}},
                        )
                        if tc.id:
                            slot["id"] = tc.id
                        if tc.function and tc.function.name:
                            slot["function"]["name"] += tc.function.name
                        if tc.function and tc.function.arguments:
                            slot["function"]["arguments"] += tc.function.arguments
                        if not held:
                            emit({"tool_calls": [_delta(tc)]})
                    if choice.finish_reason:
                        finish = choice.finish_reason
        scanner.finish()
        done = usage.completion_tokens if usage else pieces
        if suspended:
            sid = secrets.token_hex(8)
            self.snapshots[sid] = (scanner.text, prior_tokens + done)
            return ChatOutput(text=scanner.text, finish_reason="suspended", prompt_tokens=0,
                              completion_tokens=prior_tokens + done, snapshot=sid)
        parsed = self._parsed(req, scanner.text)
        tool_calls = [calls[i] for i in sorted(calls)]
        return ChatOutput(
            text=scanner.text,
            finish_reason="tool_calls" if tool_calls else finish,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=prior_tokens + done,
            tool_calls=tool_calls,
            parsed=parsed,
        )

    def forget(self, agent: str | None, snapshots: list[str]) -> None:
        for sid in snapshots:   # nothing else is kept per agent
            self.snapshots.pop(sid, None)

    def close(self) -> None:
        self.client.close()
