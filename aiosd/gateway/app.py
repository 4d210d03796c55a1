"""The gateway's HTTP API: OpenAI's ``/v1`` endpoints (FastAPI), each
request a system call of the agent its API key belongs to.

A request is read whole (at most ``gateway.max_body_bytes``: BodyLimit), its
key taken from ``Authorization: Bearer``, its body parsed and translated
(openai_api, responses_api) and so checked before anything reaches the
kernel, then the call made through the key's connection (kernel). A
streamed answer goes out as server-sent events. A caller that goes away
gives its call up: the kernel cancels it and frees its slot.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/chat/completions``, ``POST /v1/responses`` (see docs/gateway.md),
and ``GET /metrics``, the kernel's Prometheus metrics (see docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libaios import errors, protocol
from libaios.aio import AsyncClient
from libaios.protocol import MsgType

from ..config import Config
from ..metrics import CONTENT_TYPE, exposition
from . import mcp_server, openai_api, responses_api
from .kernel import Kernel, bearer_key

log = logging.getLogger(__name__)

T = TypeVar("T")

#: a body declared larger than the limit is read and dropped up to this
#: much, so that its sender, still sending, hears the 413 (not a reset)
DRAIN_BYTES = 64 * 2**20

#: seconds between SSE keep-alive comments while a streamed answer waits
PING_S = 15


def models_of(config: Config) -> list[str]:
    """The model names /v1/models lists: the configured models, the default
    first (an agent that takes the first gets the default)."""
    default = config.llm.default
    return [default, *(name for name in config.llm.names() if name != default)]


def error_response(exc: errors.AIOSError) -> JSONResponse:
    status, body = openai_api.error_body(exc)
    headers = ({"Retry-After": str(openai_api.RETRY_AFTER)} if status == 429 else
               {"WWW-Authenticate": "Bearer"} if status == 401 else None)
    return JSONResponse(body, status_code=status, headers=headers)


class ClientGone(Exception):
    """The HTTP caller went away before its answer."""


class BodyLimit:
    """Read a POST's whole body, refusing one larger than ``limit`` bytes
    (413) before any of it is decoded; the app gets it in one piece, then
    the connection's own messages (a disconnect)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.limit
        body = bytearray()
        seen = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
            piece = message.get("body", b"")
            seen += len(piece)
            if too_large:   # drained, not kept
                if seen > DRAIN_BYTES:
                    break
                continue
            body += piece
            if len(body) > self.limit:
                too_large, body = True, bytearray()
        if too_large:
            exc = errors.TooLarge(f"the request body is larger than the gateway takes "
                                  f"({self.limit} bytes: gateway.max_body_bytes)")
            await error_response(exc)(scope, receive, send)
            return
        given = False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def api_key(request: Request) -> str:
    return bearer_key(request.headers.get("authorization"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body(), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise openai_api.RequestError(f"the body is not valid JSON: {exc}") from None


async def _disconnected(request: Request) -> None:
    """Return when the HTTP caller has gone away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the caller goes away first: then it is
    cancelled (which gives its kernel call up) and ClientGone raised."""
    task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    watch = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, errors.AIOSError):
        pass
    raise ClientGone()


def note_user(agent: str, req: dict[str, Any]) -> None:
    """Log the end user a request says it is for (recorded, never trusted)."""
    for key in ("user", "safety_identifier"):
        if isinstance(req.get(key), str):
            log.info("%s: a request for end user %r (as the caller says)", agent, req[key][:64])


def create_app(config: Config, kernel: Kernel, control: AsyncClient) -> FastAPI:
    """The gateway's app: calls as the agents of API keys go through
    ``kernel``, the gateway's own calls (the metrics) through ``control``."""
    app = FastAPI(title="AIOS gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=config.gateway.max_body_bytes)
    if config.gateway.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.gateway.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    models = models_of(config)
    timeout = config.kernel.call_timeout
    store = responses_api.ResponseStore()
    mcp_server.mount(app, config, kernel)

    @app.exception_handler(errors.AIOSError)
    async def on_kernel_error(request: Request, exc: errors.AIOSError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)   # (no one reads it)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        what = {404: f"{request.url.path} is not an endpoint here (see docs/gateway.md)",
                405: f"{request.url.path} does not take {request.method}"
                }.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": {"message": what, "type": kind, "param": None,
                                       "code": None}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}",
                                       "type": "server_error", "param": None,
                                       "code": "internal"}}, status_code=500)

    def model_entry(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 0, "owned_by": "aios"}

    async def check_key(request: Request) -> None:
        """Refuse a bad key where no system call would: the kernel is asked
        who the key's caller is (a connection it dropped says hello again)."""
        await kernel.call(api_key(request), MsgType.AGENT_WHOAMI, {}, 10.0)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        await check_key(request)
        return {"object": "list", "data": [model_entry(m) for m in models]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        await check_key(request)
        if model not in models:
            raise errors.NotFound(f"the model {model!r} does not exist here; the models are: "
                                  f"{', '.join(models)}")
        return model_entry(model)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # A key, as for /v1/models: the gateway may listen beyond this
        # machine, and the metrics tell of the kernel's load, models, tools
        # (and agents, if per_agent_top_k shows them). Any key the kernel
        # takes will do: Prometheus sends one (authorization.credentials).
        await check_key(request)
        figures = await control.call(MsgType.ADMIN_METRICS, {}, 10.0)
        return Response(exposition(figures), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        key = api_key(request)
        req = await json_body(request)
        body = openai_api.chat_body(req, models)   # (nothing reaches the kernel unchecked)
        include_usage = openai_api.stream_options(req, body["stream"])
        client = await kernel.client(key)
        note_user(client.identity.get("name", "?"), req)
        call_id = "chatcmpl-" + protocol.new_id()
        model = req["model"]
        if not body["stream"]:
            reply = await unless_gone(request, kernel.call(key, MsgType.LLM_CHAT, body, timeout))
            return openai_api.completion(call_id, model, reply)
        # the first answer (or the error) before the response starts, so
        # that a refused call gets its status
        first, replies = await unless_gone(
            request, kernel.stream(key, MsgType.LLM_CHAT, body, timeout))
        chunks = openai_api.ChunkStream(call_id, model, include_usage)
        return EventSourceResponse(_chat_events(first, replies, chunks), ping=PING_S, sep="\n",
                                   headers={"Cache-Control": "no-cache"})

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        key = api_key(request)
        req = await json_body(request)
        parsed = responses_api.parse_request(req, models)
        client = await kernel.client(key)
        agent = client.identity.get("name") or "?"
        note_user(agent, req)
        history = (store.history(parsed.previous_response_id, agent)
                   if parsed.previous_response_id else [])
        body = parsed.chat_body(history)
        resp_id = responses_api.new_id("resp_")

        def remember(output: list[dict[str, Any]]) -> None:
            if parsed.store:
                store.put(resp_id, agent, history + parsed.messages
                          + [responses_api.assistant_message(output)])

        if not parsed.stream:
            created = time.time()
            reply = await unless_gone(request, kernel.call(key, MsgType.LLM_CHAT, body, timeout))
            out = responses_api.response_of(resp_id, created, parsed, reply)
            remember(out["output"])
            return out
        first, replies = await unless_gone(
            request, kernel.stream(key, MsgType.LLM_CHAT, body, timeout))
        events = responses_api.ResponseEvents(resp_id, parsed)
        return EventSourceResponse(_response_events(first, replies, events, remember),
                                   ping=PING_S, sep="\n", headers={"Cache-Control": "no-cache"})

    return app


async def _chat_events(first: protocol.Message, replies: AsyncIterator[protocol.Message],
                       chunks: openai_api.ChunkStream) -> AsyncIterator[str]:
    """The SSE data of a streamed chat completion, ending ``[DONE]`` (the
    replies' iterator is closed if the caller goes away: that cancels the
    call in the kernel)."""
    try:
        for piece in chunks.start():
            yield json.dumps(piece)
        rep = first
        while True:
            if rep.type is MsgType.REPLY:
                for piece in chunks.end(rep.body):
                    yield json.dumps(piece)
                break
            for piece in chunks.partial(rep.body):
                yield json.dumps(piece)
            rep = await anext(replies)
    except errors.AIOSError as exc:
        # the stream has begun: the error goes as its last event
        yield json.dumps(openai_api.error_body(exc)[1])
    finally:
        await replies.aclose()
    yield "[DONE]"


async def _response_events(first: protocol.Message, replies: AsyncIterator[protocol.Message],
                           events: responses_api.ResponseEvents,
                           remember: Callable[[list[dict[str, Any]]], None]
                           ) -> AsyncIterator[dict[str, str]]:
    """The SSE events of a streamed response, each named by its type."""

    def sse(items: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"event": e["type"], "data": json.dumps(e)} for e in items]

    try:
        for out in sse(events.start()):
            yield out
        rep = first
        while True:
            if rep.type is MsgType.REPLY:
                last = events.end(rep.body)
                remember(events.output)
                for out in sse(last):
                    yield out
                break
            for out in sse(events.partial(rep.body)):
                yield out
            rep = await anext(replies)
    except errors.AIOSError as exc:
        for out in sse(events.fail(exc)):
            yield out
    finally:
        await replies.aclose()
