"""The gateway process: binds its HTTP socket, tells the kernel where it
listens, and serves the API (app) and the MCP server (mcp_server) with
uvicorn until it is told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import uvicorn

from libaios import paths
from libaios.protocol import MsgType

from ..config import Config, ConfigError
from . import mcp_server
from .app import create_app
from .kernel import Control, Kernel

log = logging.getLogger(__name__)


def bind(listen: str) -> tuple[socket.socket, str | None]:
    """The listening socket for ``gateway.listen``, and the URL clients use
    (None for a unix socket, which OpenAI clients cannot reach)."""
    if listen.startswith("/"):
        path = Path(listen)
        if path.exists():
            path.unlink()   # a stale socket of an earlier gateway
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(listen)
        os.chmod(listen, 0o600)
        return sock, None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"gateway.listen: cannot listen on {listen}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"http://{shown}:{bound}"


async def _run(config: Config, runtime_dir: Path) -> None:
    endpoint = paths.ipc(runtime_dir, paths.KERNEL_SOCKET)
    sock, url = bind(config.gateway.listen)
    kernel = Kernel(endpoint, config.kernel.call_timeout)
    control = Control(endpoint, url)
    app = create_app(config, kernel, control)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=3))

    async def keep_in_touch() -> None:
        # the kernel hears where the gateway listens at hello; a restarted
        # scheduler hears it again when the next call finds it new
        while True:
            try:
                await control.call(MsgType.AGENT_WHOAMI)
            except Exception as exc:   # the kernel is restarting: try again
                log.debug("the kernel did not answer: %s", exc)
            await kernel.close_idle()
            await asyncio.sleep(2.0)

    def stop(*_: object) -> None:
        server.should_exit = True

    # uvicorn handles SIGTERM while it serves and raises it again once it
    # has stopped: with this handler in place then, the gateway closes its
    # connections and exits 0 rather than dying of the signal
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    await control.connect()
    log.info("gateway listening on %s", url or config.gateway.listen)
    touch = asyncio.create_task(keep_in_touch())
    try:
        # (uvicorn's lifespan is off: the MCP session manager runs here)
        async with mcp_server.running(app):
            await server.serve(sockets=[sock])
    finally:
        touch.cancel()
        await kernel.close()
        await control.close()


def serve(config: Config, runtime_dir: Path) -> None:
    asyncio.run(_run(config, runtime_dir))
