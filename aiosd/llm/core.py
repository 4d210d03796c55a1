"""An LLM core: the worker process that serves one model instance.

It builds the configured backend, then serves ``llm.chat`` (and the no-op
``sys.null``) through the shared worker runtime. The chat request was
checked by the scheduler; it is parsed again here because a worker trusts
nothing it did not parse itself.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from libaios.protocol import MsgType

from .. import chat as request
from ..config import Config, CoreConfig
from ..worker import Task, WorkerRuntime
from .backend import Backend, CallContext

log = logging.getLogger(__name__)

#: Fault injection for the fault tests: "stall" makes every chat hang and
#: ignore cancellation, as a wedged model would; "crash-on-start" makes the
#: core exit before it registers, as a broken install would.
FAULT_ENV = "AIOS_FAULT"


def make_backend(cfg: CoreConfig, local_cores: int = 1) -> Backend:
    """The backend of core ``cfg``; a local one sizes its memory as one of
    ``local_cores`` local cores on the machine."""
    if cfg.backend == "llamacpp":
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(cfg, local_cores)
    from .openai_backend import OpenAIBackend

    return OpenAIBackend(cfg)


class LLMCore:
    """The handlers of one core; they hold the backend, never a socket."""

    def __init__(self, cfg: CoreConfig, backend: Backend, preempting: bool = False):
        self.cfg = cfg
        self.preempting = preempting
        self.backend = backend
        self.fault = os.environ.get(FAULT_ENV, "")

    def chat(self, task: Task) -> dict[str, Any]:
        req = request.parse(task.body)
        if self.fault == "stall":
            while True:
                time.sleep(3600)
        stream = req.stream
        started = time.monotonic()
        first: list[float] = []   # when the answer's first piece came, from the task's start

        def emit(part: str | dict[str, Any]) -> None:
            if part and not first:
                first.append(time.monotonic() - started)
            if stream:
                task.emit({"text": part} if isinstance(part, str) else part)

        # only a preempting kernel suspends calls, or needs to know how far
        # one got
        preempting = self.preempting
        ctx = CallContext(emit, task.check, key=task.caller.get("agent", ""), resume=task.resume,
                          suspend=task.suspend if preempting else None,
                          progress=task.progress if preempting else None)
        out = self.backend.chat(req, ctx)
        body = out.to_body(self.cfg.core)
        if first:
            # for the scheduler's time-to-first-token (it adds the time the
            # call waited before this turn, and keeps it from the caller)
            body[request.FIRST_TOKEN] = first[0]
        return body

    def forget(self, body: dict[str, Any]) -> None:
        """An agent ended, or suspended calls will never resume: let go of
        the agent's cached conversation and of those calls' snapshots."""
        agent = body.get("agent")
        snapshots = body.get("snapshots") or []
        if not isinstance(snapshots, list):
            snapshots = []
        self.backend.forget(agent if isinstance(agent, str) and agent else None,
                            [s for s in snapshots if isinstance(s, str)])

    def null(self, task: Task) -> dict[str, Any]:
        return {"core": self.cfg.core}

    def handlers(self) -> dict[MsgType, Any]:
        return {MsgType.LLM_CHAT: self.chat, MsgType.SYS_NULL: self.null}


def serve(config: Config, name: str, endpoint: str) -> None:
    """Load the model of core ``name`` and serve it until shut down."""
    cfg = next(c for c in config.llm.cores if c.core == name)
    if os.environ.get(FAULT_ENV) == "crash-on-start":
        sys.exit(1)
    backend = make_backend(cfg, sum(1 for c in config.llm.cores if c.backend == "llamacpp"))
    core = LLMCore(cfg, backend, preempting=config.scheduler.policy != "fifo")
    runtime = WorkerRuntime(
        kind="llm",
        name=cfg.core,
        capacity=backend.slots,
        endpoint=endpoint,
        handlers=core.handlers(),
        heartbeat_interval=config.kernel.heartbeat_interval,
        info=backend.describe(),
        stats=getattr(backend, "stats", None),
        forget=core.forget,
    )
    try:
        runtime.run()
    finally:
        backend.close()
