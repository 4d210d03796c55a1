"""The batching engine of a local LLM core: several sequences decoded
together, KV caches kept between calls, shared prefixes, suspend and resume.

One context holds a unified KV cache for up to ``n_seq_max`` sequences.
Each agent's conversation keeps its own sequence after a call ends, so its
next call prefills only what it has not seen (longest common token prefix);
a new sequence whose prompt begins like another cached one (the same system
prompt) starts from a copy of that prefix (``llama_memory_seq_cp`` shares
the cells, it does not recompute them). Retained sequences are dropped least
recently used when the cache fills.

The engine runs in its own thread: every step it builds one batch from all
running requests (a chunk of prompt for those prefilling, one token for
those decoding), decodes it, and samples each request's next token with the
request's own sampler chain. A request can be suspended at a token boundary:
its KV state is copied out (``llama_state_seq_get_data``) into a snapshot
and its sequence freed; resuming sets the state into a sequence again
(``llama_state_seq_set_data``) and decoding continues exactly where it
stopped.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)



class Finish(enum.Enum):
    STOP = "stop"          # end-of-generation token
    LENGTH = "length"      # max_tokens reached
    CALLER = "caller"      # the callback asked to stop (a stop string)
    SUSPENDED = "suspended"
    ERROR = "error"


@dataclass
class Snapshot:
    """A suspended generation: enough to continue it exactly."""

    key: str
    state: bytes            # the sequence's KV state
    tokens: list[int]       # tokens whose KV is in ``state``
    pending: int | None     # sampled, not yet decoded
    completion: list[int]   # generated so far
    prompt_len: int
    cached: int

    @property
    def nbytes(self) -> int:
        return len(self.state)


@dataclass(eq=False)
class Request:
    key: str                          # whose KV to retain (the agent)
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    grammar: Any = None               # a LlamaGrammar, or None
    #: called in the engine thread with each new token; returns False to stop
    on_token: Callable[[int], bool] = lambda token: True
    #: called in the engine thread each step; raises to cancel
    check: Callable[[], None] = lambda: None
    resume: Snapshot | None = None
    # -- filled in by the engine --
    completion: list[int] = field(default_factory=list)
    finish: Finish | None = None
    error: BaseException | None = None
    cached: int = 0                   # prompt tokens found in the KV cache
    snapshot: Snapshot | None = None  # set when suspended
    done: threading.Event = field(default_factory=threading.Event)
    _suspend: bool = False
    _seq: Any = None
    _todo: list[int] = field(default_factory=list)
    _pending: int | None = None
    _sampler: Any = None
    _logit_index: int = -1

    def suspend(self) -> None:
        """Ask the engine to suspend this request at the next token boundary."""
        self._suspend = True


@dataclass(eq=False)
class _Seq:
    id: int
    key: str | None = None
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


class Engine:
    """A llama.cpp context serving many sequences from one thread."""

    def __init__(self, model_path: str, *, n_ctx: int, slots: int, threads: int,
                 n_seq_max: int = 64, n_batch: int = 512):
        import llama_cpp
        from llama_cpp import _internals

        import llama_cpp._logger as llama_logger

        # llama.cpp logs every context it builds; the core's own log says enough.
        llama_logger.logger.setLevel(logging.CRITICAL)
        self._ll = llama_cpp
        self._internals = _internals
        mparams = llama_cpp.llama_model_default_params()
        self.model = _internals.LlamaModel(path_model=model_path, params=mparams, verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True   # any sequence may use any cell: sharing works
        self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.slots = slots
        self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.seqs = [_Seq(i) for i in range(n_seq_max)]
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._lock = threading.Condition()
        self._stop = False
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "cached_tokens": 0,
                      "shared_tokens": 0, "evicted_seqs": 0, "suspended": 0, "resumed": 0}
        self._seed = itertools.count(1)
        self.thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self.thread.start()

    # -- the callers' side ---------------------------------------------------------

    def submit(self, req: Request) -> None:
        with self._lock:
            self.waiting.append(req)
            self._lock.notify()

    def run(self, req: Request) -> Request:
        """Submit ``req`` and wait until it finishes (or is suspended)."""
        self.submit(req)
        req.done.wait()
        return req

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self.thread.join(timeout=10)
        self.batch.close()
        self.ctx.close()
        self.model.close()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "slots": self.slots,
                "running": len(self.running),
                "waiting": len(self.waiting),
                "retained_seqs": sum(1 for s in self.seqs if s.key is not None and not s.busy),
                **self.stats,
            }

    # -- sequences -------------------------------------------------------------------

    @property
    def _mem(self) -> Any:
        return self.ctx.memory

    def _free_seq(self) -> _Seq | None:
        idle = [s for s in self.seqs if not s.busy]
        if not idle:
            return None
        empty = [s for s in idle if not s.tokens]
        if empty:
            return empty[0]
        victim = min(idle, key=lambda s: s.last_used)
        self._drop(victim)
        return victim

    def _drop(self, seq: _Seq, evicted: bool = True) -> None:
        self._ll.llama_memory_seq_rm(self._mem, seq.id, -1, -1)
        if seq.tokens and evicted:
            self.stats["evicted_seqs"] += 1
        seq.tokens = []
        seq.key = None

    def _evict_one(self) -> bool:
        """Free KV cells by dropping the least recently used retained sequence."""
        idle = [s for s in self.seqs if not s.busy and s.tokens]
        if not idle:
            return False
        self._drop(min(idle, key=lambda s: s.last_used))
        return True

    @staticmethod
    def _common(a: list[int], b: list[int]) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def _admit(self, req: Request) -> bool:
        """Give ``req`` a sequence, reusing what the cache already holds."""
        if req.resume is not None:
            return self._admit_resumed(req)
        prompt = req.prompt
        own = next((s for s in self.seqs if s.key == req.key and not s.busy), None)
        if own is not None:
            seq = own
        else:
            seq = self._free_seq()
            if seq is None:
                return False
        keep = self._common(seq.tokens, prompt)
        # A new sequence may start from another's identical prefix (a shared
        # system prompt): share those cells instead of recomputing them.
        best, best_len = None, keep
        for other in self.seqs:
            if other is seq or not other.tokens:
                continue
            n = self._common(other.tokens, prompt)
            if n > best_len:
                best, best_len = other, n
        if best is not None and best_len > keep + 16:
            self._ll.llama_memory_seq_rm(self._mem, seq.id, -1, -1)
            self._ll.llama_memory_seq_cp(self._mem, best.id, seq.id, 0, best_len)
            seq.tokens = prompt[:best_len]
            self.stats["shared_tokens"] += best_len
            keep = best_len
        else:
            self._ll.llama_memory_seq_rm(self._mem, seq.id, keep, -1)
            seq.tokens = seq.tokens[:keep]
        if keep >= len(prompt):
            # Everything is cached, but the logits of the last prompt token
            # are not: decode it again.
            keep = len(prompt) - 1
            self._ll.llama_memory_seq_rm(self._mem, seq.id, keep, -1)
            seq.tokens = seq.tokens[:keep]
        req.cached = keep
        self.stats["cached_tokens"] += keep
        seq.key = req.key
        seq.busy = True
        req._seq = seq
        req._todo = prompt[keep:]
        req._sampler = self._sampler(req)
        return True

    def _admit_resumed(self, req: Request) -> bool:
        snap = req.resume
        assert snap is not None
        seq = self._free_seq()
        if seq is None:
            return False
        self._ll.llama_memory_seq_rm(self._mem, seq.id, -1, -1)
        buf = (ctypes.c_uint8 * len(snap.state)).from_buffer_copy(snap.state)
        got = self._ll.llama_state_seq_set_data(self.ctx.ctx, buf, len(snap.state), seq.id)
        if got == 0:
            req.error = RuntimeError("the snapshot could not be restored into the KV cache")
            return True
        seq.tokens = list(snap.tokens)
        seq.key = req.key
        seq.busy = True
        req._seq = seq
        req.completion = list(snap.completion)
        req.cached = snap.cached
        req._pending = snap.pending
        req._todo = []
        req._sampler = self._sampler(req)
        if req.grammar is not None:
            # replay the generated tokens through the grammar's state
            for tok in snap.completion:
                req._sampler.accept(tok)
        self.stats["resumed"] += 1
        return True

    def _sampler(self, req: Request) -> Any:
        s = self._internals.LlamaSampler()
        if req.grammar is not None:
            s.add_grammar(self.model, req.grammar)
        if req.temperature <= 0:
            s.add_greedy()
        else:
            if req.top_p < 1.0:
                s.add_top_p(req.top_p, 1)
            s.add_temp(req.temperature)
            s.add_dist(req.seed if req.seed is not None else next(self._seed))
        return s

    # -- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.waiting and not self.running:
                    self._lock.wait()
                if self._stop:
                    for req in self.waiting + self.running:
                        req.error = RuntimeError("the LLM core is shutting down")
                        req.done.set()
                    return
                while self.waiting and len(self.running) < self.slots:
                    req = self.waiting[0]
                    if not self._admit(req):
                        break
                    self.waiting.pop(0)
                    if req.error is not None:
                        req.done.set()
                        continue
                    self.running.append(req)
            try:
                self._step()
            except Exception as exc:  # a decode failure fails the batch, not the core
                log.exception("engine step failed")
                for req in list(self.running):
                    req.error = exc
                    self._finish(req, Finish.ERROR)

    def _step(self) -> None:
        # cancellations and suspensions happen between steps: token boundaries
        for req in list(self.running):
            try:
                req.check()
            except BaseException as exc:
                req.error = exc
                self._finish(req, Finish.ERROR)
                continue
            if req._suspend and not req._todo:
                self._suspend_now(req)
        if not self.running:
            return
        b = self.batch.batch
        n = 0
        budget = self.n_batch
        entries: list[tuple[Request, int, int]] = []  # (req, first index, count)
        decoding = [r for r in self.running if not r._todo and r._pending is not None]
        prefilling = [r for r in self.running if r._todo]
        for req in decoding + prefilling:
            if budget <= 0:
                break
            tokens = [req._pending] if not req._todo else req._todo[:budget]
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
            entries.append((req, n, len(tokens)))
            n += len(tokens)
            budget -= len(tokens)
        b.n_tokens = n
        while True:
            rc = self._ll.llama_decode(self.ctx.ctx, b)
            if rc == 0:
                break
            if rc == 1 and self._evict_one():
                continue  # no room in the KV cache: retained sequences go first
            raise RuntimeError(f"llama_decode failed ({rc}): the KV cache is full "
                               f"({self.n_ctx} cells, llm.cores[].n_ctx)")
        self.stats["steps"] += 1
        now = time.monotonic()
        for req, first, count in entries:
            seq = req._seq
            if req._todo:
                added = req._todo[:count]
                req._todo = req._todo[count:]
                self.stats["prefill_tokens"] += count
            else:
                added = [req._pending]
                self.stats["decode_tokens"] += 1
            seq.tokens.extend(added)
            seq.last_used = now
            if req._logit_index < 0:
                continue
            token = req._sampler.sample(self.ctx, req._logit_index)
            if self._ll.llama_vocab_is_eog(self.model.vocab, token):
                self._finish(req, Finish.STOP)
                continue
            req.completion.append(token)
            req._pending = token
            if not req.on_token(token):
                self._finish(req, Finish.CALLER)
            elif len(req.completion) >= req.max_tokens:
                self._finish(req, Finish.LENGTH)
            elif len(seq.tokens) + 1 >= self.n_ctx:
                self._finish(req, Finish.LENGTH)

    def _suspend_now(self, req: Request) -> None:
        seq = req._seq
        size = self._ll.llama_state_seq_get_size(self.ctx.ctx, seq.id)
        buf = (ctypes.c_uint8 * size)()
        written = self._ll.llama_state_seq_get_data(self.ctx.ctx, buf, size, seq.id)
        req.snapshot = Snapshot(
            key=req.key, state=bytes(buf[:written]), tokens=list(seq.tokens),
            pending=req._pending, completion=list(req.completion), prompt_len=len(req.prompt),
            cached=req.cached,
        )
        self.stats["suspended"] += 1
        # The snapshot holds the state now: free the cells for the calls
        # that run meanwhile.
        self._drop(seq, evicted=False)
        self._finish(req, Finish.SUSPENDED)

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
        if req._sampler is not None:
            req._sampler.close()
            req._sampler = None
        req.done.set()
