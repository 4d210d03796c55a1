"""The batching engine of a local LLM core: several sequences decoded
together, KV caches kept between calls, shared prefixes, suspend and resume.

The context's KV cache is split into one stream per sequence, ``seqs``
streams of ``n_ctx`` cells each: a decoded token attends only to its own
sequence's cells, so the cost of a step does not grow with the other
conversations the cache retains. Each agent's conversation keeps its own
sequence after a call ends, so its next call prefills only what it has not
seen (longest common token prefix). A prefix tree indexes the token runs
the sequences hold; a new sequence whose prompt begins like another's (the
same system prompt) starts from a copy of that one's cells
(``llama_memory_seq_cp``, a buffer copy between streams) cut back to the
common prefix, instead of recomputing them. When every stream is taken, a
retained sequence is evicted (placement.reusable says which): its cells are copied out
(``llama_state_seq_get_data``, the cells it uses, not its stream's size)
into RAM, up to a bound; when its agent's next call comes, and the cache
holds less of the prompt than those cells do, they are set into a stream
again instead of prefilling the conversation afresh.

The engine runs in its own thread: every step it decodes one batch with a
token for each request that is decoding, and batches of prompt chunks for
those prefilling (never a prompt token alone in its pass: see
MIN_PROMPT_ROWS), and samples each request's next token with the request's
own sampler chain. A request can be suspended at a token boundary:
its KV state is copied out (``llama_state_seq_get_data``) into a snapshot
and its sequence freed; resuming sets the state into a sequence again
(``llama_state_seq_set_data``) and decoding continues exactly where it
stopped.

This module holds the model helpers, the callers' side and the loop with
its steps; the requests and snapshots are in ``generation``, the pure
planning of batches in ``batching``, the pure choice of where calls run in
the cache in ``placement``, and the streams that carry it out (retention,
eviction, shared prefixes, admission) in ``streams``.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import admission
from .batching import (CTX_ALIGN, MAX_SEQS, MIN_PROMPT_ROWS, chunk_groups, passes,
                       prompt_chunk, sequences_for)
from .generation import Finish, Request, Snapshot
from .streams import Streams
from .tiers import DiskTier

log = logging.getLogger(__name__)

#: A test hook (fault injection for the slow-core test): while the file this
#: variable names exists, each llama_decode call first sleeps the seconds
#: written in it, as a core slowed by its machine would decode.
SLOW_DECODE_ENV = "AIOS_FAULT_SLOW_DECODE"


def slow_decode_delay(path: str) -> float:
    """The seconds to sleep before a decode under the SLOW_DECODE_ENV hook."""
    try:
        return max(0.0, float(Path(path).read_text().strip() or 0))
    except (OSError, ValueError):
        return 0.0


def _meta(model: Any, key: str) -> str | None:
    """A value of ``model``'s GGUF metadata, as text (None if absent)."""
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model.model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else None


def kv_bytes_per_token(model: Any) -> int:
    """KV cache bytes one token costs in ``model`` (f16 keys and values).

    A head's size is the model's own where its metadata gives one (some
    models' heads are not n_embd / n_head wide)."""
    import llama_cpp

    m = model.model
    n_head = llama_cpp.llama_model_n_head(m)
    head_dim = llama_cpp.llama_model_n_embd(m) // n_head
    arch = _meta(model, "general.architecture") or ""
    sizes = []
    for which in ("key_length", "value_length"):
        value = _meta(model, f"{arch}.attention.{which}")
        sizes.append(int(value) if value and value.isdigit() else head_dim)
    return 2 * llama_cpp.llama_model_n_layer(m) * llama_cpp.llama_model_n_head_kv(m) * sum(sizes)


def grammar_sampler(model: Any, grammar: Any) -> Any:
    """A llama.cpp grammar sampler for ``grammar`` (a LlamaGrammar) over
    ``model``'s vocabulary; ValueError if llama.cpp rejects the grammar
    (it returns no sampler, and a chain given none would crash)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar._grammar.encode(),
                                                   grammar._root.encode())
    if not sampler:
        raise ValueError("llama.cpp cannot use the grammar made for this answer "
                         "(a rule it cannot parse, or left recursion)")
    return sampler


def end_of_generation(vocab: Any) -> list[int]:
    """The tokens of ``vocab`` that end a generation."""
    import llama_cpp

    return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab))
            if llama_cpp.llama_vocab_is_eog(vocab, t)]


class Engine:
    """A llama.cpp context serving many sequences from one thread.

    ``n_ctx`` is the cells of one sequence (the longest conversation);
    ``seqs`` the sequences the cache holds at once, running and retained
    (or, if not given, as many as ``kv_bytes`` holds); ``evicted_bytes``
    the RAM for the cells of evicted conversations (0: none are kept)."""

    def __init__(self, model_path: str, *, n_ctx: int, slots: int, threads: int,
                 seqs: int | None = None, kv_bytes: int | None = None, n_batch: int = 512,
                 flash_attn: bool = False, evicted_bytes: int = 0, n_gpu_layers: int = 0,
                 main_gpu: int = 0, tensor_split: tuple[float, ...] = (),
                 sizer: Callable[[int, int], tuple[int, int, int]] | None = None,
                 disk_dir: Path | None = None, disk_bytes: int = 0):
        import llama_cpp
        import llama_cpp._logger as llama_logger
        from llama_cpp import _internals

        # llama.cpp logs every context it builds; the core's own log says enough.
        llama_logger.logger.setLevel(logging.CRITICAL)
        self._ll = llama_cpp
        self._internals = _internals
        mparams = llama_cpp.llama_model_default_params()
        # -1: every layer (llama.cpp counts past the last one as all)
        mparams.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
        mparams.main_gpu = main_gpu
        if tensor_split:
            # kept on self: llama.cpp reads the array while it loads the model
            self._tensor_split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*tensor_split)
            mparams.tensor_split = self._tensor_split
        self.model = _internals.LlamaModel(path_model=model_path, params=mparams, verbose=False)
        n_ctx = -(-n_ctx // CTX_ALIGN) * CTX_ALIGN
        self.token_bytes = kv_bytes_per_token(self.model)
        if sizer is not None:
            # the sizes the config left "auto", now that a token's cost is known
            kv_bytes, slots, evicted_bytes = sizer(self.token_bytes, n_ctx)
        if seqs is None:
            if kv_bytes is None:
                raise ValueError("give the engine seqs or kv_bytes")
            try:
                seqs = sequences_for(kv_bytes, n_ctx, self.token_bytes, slots)
            except ValueError:
                self.model.close()
                raise
        if not slots <= seqs <= MAX_SEQS:
            self.model.close()
            raise ValueError(f"seqs must be from slots ({slots}) to {MAX_SEQS}, not {seqs}")
        if slots > n_batch - MIN_PROMPT_ROWS - 1:
            # a step's decoded tokens must leave room for a prompt chunk
            self.model.close()
            raise ValueError(f"{slots} slots need a batch of more than {slots + MIN_PROMPT_ROWS} "
                             f"tokens, not {n_batch}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * (seqs + 1)
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = seqs + 1   # the last stream is the spare of _swap
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # One stream per sequence: a token attends to its own sequence's cells
        # only, not to a mask over every retained conversation.
        cparams.kv_unified = False
        # Set either way: llama.cpp's "auto" would turn it on, and flash
        # attention's sums depend on how a prompt is split into batches
        # (see CoreConfig.flash_attn).
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.slots = slots
        self._eog = np.array(end_of_generation(self.model.vocab))
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._lock = threading.Condition()
        self._stop = False
        self._slow_decode = os.environ.get(SLOW_DECODE_ENV) or None
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "cached_tokens": 0,
                      "shared_tokens": 0, "evicted_seqs": 0, "moved_seqs": 0, "passes": 0,
                      "kept_seqs": 0, "restored_seqs": 0, "restored_tokens": 0, "forgotten": 0,
                      "suspended": 0, "resumed": 0, "decode_s": 0.0, "busy_s": 0.0,
                      # decode steps (a token for each decoding call) and
                      # their time: the core's decode rate, which the
                      # scheduler watches for a slowdown (see slowcore)
                      "gen_steps": 0, "gen_s": 0.0,
                      # where admitted calls found their conversation: the
                      # KV cache, RAM, disk, nowhere (a conversation lost),
                      # or nowhere yet (an agent's first call)
                      "kv_hits": 0, "ram_hits": 0, "disk_hits": 0, "misses": 0, "cold": 0,
                      "spilled_seqs": 0, "dropped_seqs": 0, "corrupt_seqs": 0, "read_ahead": 0,
                      # admission's own time, and the one-token decodes it
                      # made to land queued stream copies first (see Streams._settle)
                      "admit_s": 0.0, "settles": 0}
        # conversations evicted from RAM go to disk (its spills, drops and
        # refusals count with the rest)
        disk = (DiskTier(disk_dir, disk_bytes, self.stats)
                if disk_dir is not None and disk_bytes else None)
        self.streams = Streams(llama_cpp, self.ctx, self.model, self.batch, seqs, self.token_bytes,
                               evicted_bytes, self._decode, self.stats, disk)
        self._seed = itertools.count(1)
        self.thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self.thread.start()

    # -- the callers' side ---------------------------------------------------------

    def submit(self, req: Request) -> None:
        error = None
        if req.resume is None and not req.prompt:
            error = ValueError("the prompt is empty: there is nothing to continue from")
        elif req.resume is None and len(req.prompt) >= self.n_ctx:
            error = ValueError(f"the prompt is {len(req.prompt)} tokens; a sequence holds "
                               f"{self.n_ctx}")
        with self._lock:
            if error is None and self._stop:   # closed: the loop is gone
                error = RuntimeError("the LLM core is shutting down")
            if error is None:
                self.waiting.append(req)
                self._lock.notify()
                return
        req.error = error
        req.finish = Finish.ERROR
        req.done.set()

    def run(self, req: Request) -> Request:
        """Submit ``req`` and wait until it finishes (or is suspended)."""
        self.submit(req)
        req.done.wait()
        return req

    def forget(self, key: str) -> None:
        """``key``'s agent has ended: drop the cells kept for it in RAM, and
        let its retained sequence be the first to go when a stream is
        needed (until then its cells still serve as a shared prefix)."""
        with self._lock:
            self.streams.gone.setdefault(key, False)
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            # still inside llama.cpp: freeing what it uses would crash the
            # process; the thread ends with its step, and the process exits
            log.error("the engine did not stop within 10 s; its context is left to the process's end")
            return
        if self.streams.disk is not None:
            self.streams.disk.close()
        self.batch.close()
        self.ctx.close()
        self.model.close()

    def describe(self) -> dict[str, Any]:
        streams = self.streams
        cells = (len(streams.seqs) + 1) * self.n_ctx
        with self._lock:
            return {
                "slots": self.slots,
                "running": len(self.running),
                "waiting": len(self.waiting),
                "seqs": len(streams.seqs),
                "seq_ctx": self.n_ctx,
                "kv_bytes": cells * self.token_bytes,
                # the cache's cells (the spare stream's too), and those holding a token
                "kv_cells": cells,
                "kv_cells_used": sum(len(s.tokens) for s in streams.seqs),
                "retained_seqs": sum(1 for s in streams.seqs if s.tokens and not s.busy),
                "evicted_kept": len(streams.evicted),
                "evicted_kept_mb": round(streams.evicted_bytes / 2**20, 1),
                "disk_kept": len(streams.disk) if streams.disk is not None else 0,
                "disk_kept_mb": round(streams.disk.bytes / 2**20, 1) if streams.disk is not None else 0,
                **self.stats,
            }

    def retained_state(self, key: str) -> bytes | None:
        """The KV state of ``key``'s retained conversation (what a snapshot
        of it would hold: its cells, its stream's number), or None if the
        cache does not hold it."""
        with self._lock:
            seq = self.streams.retained(key)
            return self.streams.state(seq) if seq is not None else None

    # -- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self.streams.gone:
                        self.streams.let_go(self.waiting)
                    if self._stop or self.waiting or self.running:
                        break
                    self._lock.wait()
                if self._stop:
                    for req in self.waiting + self.running:
                        self._fail(req, RuntimeError("the LLM core is shutting down"), drop=False)
                    return
                # Admission (copying cells, restoring a conversation or a
                # snapshot) runs outside the lock: callers' threads and the
                # worker's heartbeat (describe) take it and must not wait.
                # Only this thread takes calls off the queue, so its head
                # stays the head.
                free = max(0, self.slots - len(self.running))
                window = self.waiting[:free + admission.READ_AHEAD]
                decoding = bool(self.running)
            t = time.perf_counter()
            for req in self._choose(window, free, decoding):
                try:
                    req.check()   # cancelled while it waited: it takes no stream
                except Exception as exc:
                    req.error = exc
                else:
                    try:
                        if not self._admit(req):
                            break
                    except Exception as exc:
                        log.exception("admitting a call failed")
                        req.error = exc
                with self._lock:
                    self.waiting.remove(req)
                    if req.error is None:
                        self.running.append(req)
                if req.error is not None:
                    self._fail(req, req.error, drop=True)
            self.stats["admit_s"] += time.perf_counter() - t
            t = time.perf_counter()
            try:
                self._step()
            except Exception as exc:  # a bug in a step fails its calls, not the core
                log.exception("engine step failed")
                for req in list(self.running):
                    self._fail(req, exc, drop=True)
            self.stats["busy_s"] += time.perf_counter() - t

    def _choose(self, window: list[Request], free: int, decoding: bool) -> list[Request]:
        """The calls of ``window`` (the queue's head) to admit now, up to
        ``free``; the files of those whose conversations are on disk are
        read ahead, and those still being read passed over (see admission)."""
        disk = self.streams.disk
        if disk is None:
            return window[:free]
        views = [admission.Waiting(on_disk=r.resume is None and r.key in disk,
                                   read=disk.ready(r.key), passed=r._passed) for r in window]
        chosen = admission.plan(views, free, decoding)
        for i in chosen.read_ahead:
            disk.read_ahead(window[i].key)
        for i in chosen.passed:
            window[i]._passed += 1
        # files read for calls no longer waiting here (cancelled, expired)
        # are not held in memory meanwhile: they stay on disk
        disk.release_reads({r.key for r in window})
        return [window[i] for i in chosen.admit]

    def _step(self) -> None:
        # cancellations and suspensions happen between steps: token boundaries
        for req in list(self.running):
            try:
                req.check()
            except BaseException as exc:
                self._fail(req, exc, drop=False)
                continue
            if req._suspend and not req._todo:
                self._suspend_now(req)
        if not self.running:
            self.streams.idle()
            return
        to_decode = [r for r in self.running if not r._todo and r._pending is not None]
        for req in to_decode:
            if len(req.completion) == 1:
                self.streams.gather(req)   # about to decode its first token
        self.streams.compact_if_apart(to_decode)
        decoding = [(r, [r._pending]) for r in to_decode]
        budget = self.n_batch - len(decoding)
        chunks: list[tuple[Request, list[int]]] = []
        for req in self.running:
            if req._todo and budget > 0:
                count = prompt_chunk(len(req._todo), budget)
                if count:
                    chunks.append((req, req._todo[:count]))
                    budget -= count
        # llama.cpp splits a batch into passes of consecutive streams, in
        # batch order, taking as many tokens from each stream of a pass as
        # from the one with the fewest: a prompt chunk beside decoding calls
        # would have its first token fed alone (see MIN_PROMPT_ROWS). So the
        # decoded tokens go in one batch, and the prompt chunks in batches
        # of their own, one pass each.
        groups = [sorted(decoding, key=lambda p: p[0]._seq.id)] if decoding else []
        groups += chunk_groups(sorted(chunks, key=lambda p: p[0]._seq.id), self.n_batch)
        for i, group in enumerate(groups):
            t = time.perf_counter()
            try:
                self._decode_group(group)
            except Exception as exc:
                # llama.cpp failed this batch: its calls fail, and what their
                # cells hold is unknown. The calls of the other batches (some
                # have streamed this step's token already) go on.
                log.exception("decoding a batch of %d calls failed", len(group))
                for req, _ in group:
                    self._fail(req, exc, drop=True)
            else:
                if decoding and i == 0:
                    self.stats["gen_steps"] += 1
                    self.stats["gen_s"] += time.perf_counter() - t
        self.stats["steps"] += 1

    def _decode_group(self, planned: list[tuple[Request, list[int]]]) -> None:
        """Decode one batch: a token for each decoding call, or prompt chunks."""
        b = self.batch.batch
        n = 0
        for req, tokens in planned:
            pos0 = len(req._seq.tokens)
            for j, tok in enumerate(tokens):
                b.token[n + j] = tok
                b.pos[n + j] = pos0 + j
                b.n_seq_id[n + j] = 1
                b.seq_id[n + j][0] = req._seq.id
                b.logits[n + j] = False
            last_of_prompt = bool(req._todo) and len(tokens) == len(req._todo)
            if not req._todo or last_of_prompt:
                b.logits[n + len(tokens) - 1] = True
                req._logit_index = n + len(tokens) - 1
            else:
                req._logit_index = -1
            n += len(tokens)
        b.n_tokens = n
        self._decode(b)
        self.stats["passes"] += passes([(r._seq.id, len(t)) for r, t in planned], self.n_batch)
        now = time.monotonic()
        for req, tokens in planned:
            try:
                self._account(req, tokens, now)
            except Exception as exc:
                # what the sequence records may disagree with its cells now
                log.exception("recording a call's decoded tokens failed")
                self._fail(req, exc, drop=True)
                continue
            if req._logit_index < 0:
                continue
            try:
                self._next_token(req)
            except Exception as exc:   # its sampler or callback: this call alone fails
                log.exception("a call's next token failed")
                self._fail(req, exc, drop=False)   # its cells are sound

    def _account(self, req: Request, tokens: list[int], now: float) -> None:
        """Record ``tokens`` of ``req`` as decoded into its sequence."""
        seq = req._seq
        if req._todo:
            req._todo = req._todo[len(tokens):]
            self.stats["prefill_tokens"] += len(tokens)
        else:
            self.stats["decode_tokens"] += 1
        self.streams.extend(seq, tokens)
        seq.last_used = now

    def _next_token(self, req: Request) -> None:
        """Sample ``req``'s next token from the logits the batch computed."""
        seq = req._seq
        # (a grammar decides itself where an answer may end: with every end
        # held back, a finished structured answer would have no token left,
        # and llama.cpp's grammar sampler aborts)
        hold_back = len(req.completion) < req.min_tokens and req.grammar is None
        logits = self._logits(req._logit_index) if hold_back or req._sampler is None else None
        if hold_back:
            logits[self._eog] = -np.inf
        if req._sampler is None:
            # greedy: the likeliest token, the first of equals (as llama.cpp's
            # greedy sampler takes it), without copying the vocabulary's
            # logits into a candidate array first
            token = int(logits.argmax())
        else:
            token = req._sampler.sample(self.ctx, req._logit_index)
        if self._ll.llama_vocab_is_eog(self.model.vocab, token):
            self._finish(req, Finish.STOP)
            return
        req.completion.append(token)
        req._pending = token
        if not req.on_token(token):
            self._finish(req, Finish.CALLER)
        elif len(req.completion) >= req.max_tokens:
            self._finish(req, Finish.LENGTH)
        elif len(seq.tokens) + 1 >= self.n_ctx:
            self._finish(req, Finish.LENGTH)

    def _logits(self, index: int) -> Any:
        """The logits llama.cpp computed at batch ``index``, in place (a
        numpy view of its buffer, valid until the next decode)."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self.ctx.ctx, index),
                                     shape=(self._n_vocab,))

    def _decode(self, b: Any) -> None:
        if self._slow_decode is not None:
            time.sleep(slow_decode_delay(self._slow_decode))
        t = time.perf_counter()
        rc = self._ll.llama_decode(self.ctx.ctx, b)
        self.stats["decode_s"] += time.perf_counter() - t
        if rc != 0:
            # Each sequence has a stream of its own and stops before filling
            # it, so this is not a matter of evicting others.
            raise RuntimeError(f"llama_decode failed ({rc})")
        self.streams.copies.clear()

    def _admit(self, req: Request) -> bool:
        """Give ``req`` a stream (see Streams.admit) and its sampler; False
        if it must wait for a stream."""
        if not self.streams.admit(req):
            return False
        if req.error is None:
            req._sampler = self._sampler(req)
            if req.resume is not None and req.grammar is not None:
                # replay the generated tokens through the grammar's state
                for tok in req.completion:
                    req._sampler.accept(tok)
        return True

    def _sampler(self, req: Request) -> Any:
        """``req``'s sampler chain; None for plain greedy decoding, which
        the engine does itself (see _next_token)."""
        if req.grammar is None and req.temperature <= 0:
            return None
        s = self._internals.LlamaSampler()
        if req.grammar is not None:
            try:
                grammar = grammar_sampler(self.model, req.grammar)
            except ValueError:
                s.close()
                raise
            self._ll.llama_sampler_chain_add(s.sampler, grammar)
        if req.temperature <= 0:
            s.add_greedy()
        else:
            if req.top_p < 1.0:
                s.add_top_p(req.top_p, 1)
            s.add_temp(req.temperature)
            s.add_dist(req.seed if req.seed is not None else next(self._seed))
        return s

    def _suspend_now(self, req: Request) -> None:
        seq = req._seq
        req.snapshot = Snapshot(
            key=req.key, state=self.streams.state(seq), tokens=list(seq.tokens),
            pending=req._pending, completion=list(req.completion), prompt_len=len(req.prompt),
            cached=req.cached,
        )
        self.stats["suspended"] += 1
        # The snapshot holds the state now: free the cells for the calls
        # that run meanwhile.
        self.streams.drop(seq)
        self._finish(req, Finish.SUSPENDED)

    def _fail(self, req: Request, exc: BaseException, drop: bool) -> None:
        """End ``req`` with ``exc``; ``drop`` its cells if they are unknown."""
        if req.finish is not None:
            return   # it ended earlier in the step
        req.error = exc
        self._finish(req, Finish.ERROR)
        if drop and req._seq is not None:
            self.streams.drop(req._seq)

    def _finish(self, req: Request, how: Finish) -> None:
        req.finish = how
        seq = req._seq
        if seq is not None:
            # The sequence stays cached for the agent's next call (its last
            # sampled token was never decoded: the next prompt re-feeds it).
            seq.busy = False
            seq.last_used = time.monotonic()
        with self._lock:
            if req in self.running:
                self.running.remove(req)
        try:
            if req._sampler is not None:
                req._sampler.close()
                req._sampler = None
        finally:
            req.done.set()   # its caller waits on this, whatever happens
