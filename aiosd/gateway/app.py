"""The gateway's HTTP API: OpenAI's ``/v1`` endpoints (FastAPI), each
request a system call of the agent its API key belongs to.

A request is read (at most ``gateway.max_body_bytes``), its key taken from
``Authorization: Bearer``, its body translated and checked (openai_api), and
the call made through the key's connection (kernel). A streamed answer goes
out as server-sent events; a caller that goes away cancels its call.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.middleware.base import BaseHTTPMiddleware

from libaios import errors, protocol
from libaios.protocol import MsgType

from ..config import Config
from . import mcp_server, openai_api
from .kernel import Kernel

log = logging.getLogger(__name__)


def models_of(config: Config) -> list[str]:
    """The model names /v1/models lists: the configured cores' models."""
    return sorted({core.model for core in config.llm.cores})


def error_response(exc: errors.AIOSError) -> JSONResponse:
    status, body = openai_api.error_body(exc)
    headers = {"Retry-After": str(openai_api.RETRY_AFTER)} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit(BaseHTTPMiddleware):
    """Refuse a body larger than the limit before any of it is decoded."""

    def __init__(self, app: Any, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        too_large = errors.TooLarge(f"the request body is larger than the gateway takes "
                                    f"({self.limit} bytes: gateway.max_body_bytes)")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return error_response(too_large)
        if request.method == "POST" and length is None:
            # chunked: read it up to the limit
            body = bytearray()
            async for piece in request.stream():
                body += piece
                if len(body) > self.limit:
                    return error_response(too_large)
            request._body = bytes(body)
        return await call_next(request)


def api_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise errors.Unauthenticated(
            "no API key: send 'Authorization: Bearer KEY' (aiosctl keys create NAME makes one)")
    return key.strip()


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise openai_api.RequestError(f"the body is not valid JSON: {exc}") from None


def create_app(config: Config, kernel: Kernel) -> FastAPI:
    app = FastAPI(title="AIOS gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=config.gateway.max_body_bytes)
    if config.gateway.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.gateway.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    models = models_of(config)
    timeout = config.kernel.call_timeout
    mcp_server.mount(app, config, kernel)

    @app.exception_handler(errors.AIOSError)
    async def on_kernel_error(request: Request, exc: errors.AIOSError) -> JSONResponse:
        return error_response(exc)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        await kernel.client(api_key(request))   # (a bad key is refused here too)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                            "owned_by": "aios"} for m in models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        key = api_key(request)
        req = await json_body(request)
        body = openai_api.chat_body(req, models)
        if isinstance(req.get("user"), str):
            log.info("chat for user %r (as the caller says)", req["user"][:64])
        client = await kernel.client(key)
        call_id = "chatcmpl-" + protocol.new_id()
        model = req["model"]
        if not body["stream"]:
            reply = await kernel.call(key, MsgType.LLM_CHAT, body, timeout)
            return openai_api.completion(call_id, model, reply)
        options = req.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        replies = client.call_stream(MsgType.LLM_CHAT, body, timeout)
        # the first answer (or the error) before the response starts, so a
        # refused call gets its status
        first = await anext(replies)
        return EventSourceResponse(
            _chunks(first, replies, call_id, model, include_usage),
            ping=15, sep="\n", headers={"Cache-Control": "no-cache"})

    return app


async def _chunks(first: protocol.Message, replies: AsyncIterator[protocol.Message],
                  call_id: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    """The SSE data of a streamed chat (the replies' generator is closed if
    the caller goes away: that cancels the call in the kernel)."""
    created = int(time.time())
    try:
        yield json.dumps(openai_api.chunk(call_id, model, created,
                                          {"role": "assistant", "content": ""}))
        rep = first
        while True:
            if rep.type is MsgType.REPLY:
                yield json.dumps(openai_api.chunk(
                    call_id, model, created, {},
                    rep.body.get("finish_reason") or "stop"))
                if include_usage:
                    yield json.dumps(openai_api.chunk(
                        call_id, model, created, None,
                        usage_=openai_api.usage(rep.body.get("usage") or {})))
                break
            for delta in openai_api.deltas(rep.body):
                yield json.dumps(openai_api.chunk(call_id, model, created, delta))
            rep = await anext(replies)
    except errors.AIOSError as exc:
        # the stream has begun: the error goes as its last event
        yield json.dumps(openai_api.error_body(exc)[1])
    finally:
        await replies.aclose()
    yield "[DONE]"
