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
common prefix, instead of recomputing them. When every stream is taken, the
least recently used retained sequence is evicted: its cells are copied out
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
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .prefix import PrefixTree

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
    #: end-of-generation tokens are held back until this many are generated
    min_tokens: int = 0
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


#: llama.cpp's most sequences (streams) in one context, the spare included
MAX_SEQS = 255
#: llama.cpp rounds each stream's cells up to a multiple of this
CTX_ALIGN = 256


def kv_bytes_per_token(model: Any) -> int:
    """KV cache bytes one token costs in ``model`` (f16 keys and values)."""
    import llama_cpp

    m = model.model
    n_head = llama_cpp.llama_model_n_head(m)
    head_dim = llama_cpp.llama_model_n_embd(m) // n_head
    return 2 * 2 * llama_cpp.llama_model_n_layer(m) * llama_cpp.llama_model_n_head_kv(m) * head_dim


def end_of_generation(vocab: Any) -> list[int]:
    """The tokens of ``vocab`` that end a generation."""
    import llama_cpp

    return [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab))
            if llama_cpp.llama_vocab_is_eog(vocab, t)]


def sequences_for(kv_bytes: int, n_ctx: int, per_token: int, slots: int) -> int:
    """How many sequences of ``n_ctx`` cells fit in ``kv_bytes``.

    At least ``slots`` (every running call needs one); ValueError if even
    those do not fit."""
    fit = min(MAX_SEQS, kv_bytes // (n_ctx * per_token) - 1)   # one stream is the spare
    if fit < slots:
        need = -(-(slots + 1) * n_ctx * per_token // 2**20)   # the spare too
        raise ValueError(f"{slots} slots of {n_ctx} tokens need {need} MiB of KV cache (kv_mb); "
                         f"{kv_bytes // 2**20} MiB hold {fit} sequences")
    return fit


#: A prompt is fed at least this many tokens of a sequence to a pass.
#: llama.cpp computes a token that is its sequence's only row in a pass (as
#: every decoded token is) slightly differently, in the last bits, from one
#: fed with others; were a prompt token ever fed alone, its cells, and the
#: tokens decoded after it, would depend on which other calls shared the
#: step and on what the cache held.
MIN_PROMPT_ROWS = 2


def prompt_chunk(todo: int, budget: int) -> int:
    """How many of a call's ``todo`` prompt tokens to feed in a step with
    ``budget`` batch places left: as many as fit, but never a lone token,
    now or as the last one left for a later step (0: wait a step)."""
    if todo < MIN_PROMPT_ROWS:
        return todo if budget >= todo else 0   # a one-token prompt is only ever fed alone
    count = min(todo, budget)
    if todo - count == 1:
        count -= 1
    return count if count >= MIN_PROMPT_ROWS else 0


def chunk_groups(chunks: list[tuple[Any, list[int]]], n_batch: int) -> list[list[tuple[Any, list[int]]]]:
    """Batches of prompt chunks (sorted by stream) that llama.cpp decodes in
    one pass each, a chunk's tokens all in it: chunks of consecutive
    streams with the same number of tokens, up to ``n_batch`` tokens."""
    groups: list[list[tuple[Any, list[int]]]] = []
    for req, tokens in chunks:
        last = groups[-1] if groups else None
        if (last is not None and last[-1][0]._seq.id + 1 == req._seq.id
                and len(last[-1][1]) == len(tokens) and (len(last) + 1) * len(tokens) <= n_batch):
            last.append((req, tokens))
        else:
            groups.append([(req, tokens)])
    return groups


def passes(batch: list[tuple[int, int]], n_ubatch: int) -> int:
    """How many passes llama.cpp makes over a batch of ``(stream, tokens)``
    sorted by stream: each takes a run of consecutive streams that still
    have tokens, the same number from each (the fewest left, within
    ``n_ubatch``)."""
    left = [[sid, n] for sid, n in batch]
    count = 0
    while True:
        run: list[list[int]] = []
        for item in left:
            if item[1] and (not run or item[0] == run[-1][0] + 1):
                run.append(item)
            elif run and item[1]:
                break
        if not run:
            return count
        take = max(1, min(min(i[1] for i in run), n_ubatch // len(run)))
        for item in run:
            item[1] -= min(take, item[1])
        count += 1


class Engine:
    """A llama.cpp context serving many sequences from one thread.

    ``n_ctx`` is the cells of one sequence (the longest conversation);
    ``seqs`` the sequences the cache holds at once, running and retained
    (or, if not given, as many as ``kv_bytes`` holds); ``evicted_bytes``
    the RAM for the cells of evicted conversations (0: none are kept)."""

    def __init__(self, model_path: str, *, n_ctx: int, slots: int, threads: int,
                 seqs: int | None = None, kv_bytes: int | None = None, n_batch: int = 512,
                 flash_attn: bool = False, evicted_bytes: int = 0):
        import llama_cpp
        from llama_cpp import _internals

        import llama_cpp._logger as llama_logger

        # llama.cpp logs every context it builds; the core's own log says enough.
        llama_logger.logger.setLevel(logging.CRITICAL)
        self._ll = llama_cpp
        self._internals = _internals
        mparams = llama_cpp.llama_model_default_params()
        self.model = _internals.LlamaModel(path_model=model_path, params=mparams, verbose=False)
        n_ctx = -(-n_ctx // CTX_ALIGN) * CTX_ALIGN
        self.token_bytes = kv_bytes_per_token(self.model)
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
        self._eog = end_of_generation(self.model.vocab)
        self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.seqs = [_Seq(i) for i in range(seqs)]
        self._spare = seqs
        self.tree = PrefixTree()
        # agent key -> (tokens, KV state) of conversations evicted from the
        # cache, least recently evicted first
        self.evicted: OrderedDict[str, tuple[list[int], bytes]] = OrderedDict()
        self.evicted_bytes = 0
        self.evicted_limit = evicted_bytes
        self._copying = False   # a stream copy is queued in llama.cpp
        # agents that ended, not yet let go of -> whether anything was held
        self._gone: dict[str, bool] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._lock = threading.Condition()
        self._stop = False
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "cached_tokens": 0,
                      "shared_tokens": 0, "evicted_seqs": 0, "moved_seqs": 0, "passes": 0,
                      "kept_seqs": 0, "restored_seqs": 0, "restored_tokens": 0, "forgotten": 0,
                      "suspended": 0, "resumed": 0, "decode_s": 0.0, "busy_s": 0.0}
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
        if error is not None:
            req.error = error
            req.finish = Finish.ERROR
            req.done.set()
            return
        with self._lock:
            self.waiting.append(req)
            self._lock.notify()

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
            self._gone.setdefault(key, False)
            self._lock.notify()

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
                "seqs": len(self.seqs),
                "seq_ctx": self.n_ctx,
                "kv_bytes": (len(self.seqs) + 1) * self.n_ctx * self.token_bytes,
                "retained_seqs": sum(1 for s in self.seqs if s.tokens and not s.busy),
                "evicted_kept": len(self.evicted),
                "evicted_kept_mb": round(self.evicted_bytes / 2**20, 1),
                **self.stats,
            }

    def retained_state(self, key: str) -> bytes | None:
        """The KV state of ``key``'s retained conversation (what a snapshot
        of it would hold: its cells, its stream's number), or None if the
        cache does not hold it."""
        with self._lock:
            seq = self._retained(key)
            return self._state(seq) if seq is not None else None

    # -- sequences -------------------------------------------------------------------

    @property
    def _mem(self) -> Any:
        return self.ctx.memory

    def _retained(self, key: str) -> _Seq | None:
        """The idle sequence holding ``key``'s conversation, if any."""
        return next((s for s in self.seqs if s.key == key and not s.busy), None)

    def _free_seq(self) -> _Seq | None:
        """An idle sequence: an empty one, else the least recently used
        retained one, dropped."""
        idle = [s for s in self.seqs if not s.busy]
        if not idle:
            return None
        empty = [s for s in idle if not s.tokens]
        if empty:
            return empty[0]
        victim = min(idle, key=lambda s: s.last_used)
        self._keep_evicted(victim)
        self._drop(victim)
        self.stats["evicted_seqs"] += 1
        return victim

    def _let_go(self) -> None:
        """Carry out ``forget``. A call of a gone agent still here (being
        cancelled) keeps its sequence until it stops; it is let go of then."""
        for key, held in list(self._gone.items()):
            held |= self._forget_evicted(key) is not None
            pending = any(r.key == key for r in self.waiting)
            for seq in self.seqs:
                if seq.key != key:
                    continue
                if seq.busy:
                    pending = True
                else:
                    # no owner: never kept in RAM, evicted before any other
                    seq.key = None
                    seq.last_used = 0.0
                    held = True
            if pending:
                self._gone[key] = held
                continue
            del self._gone[key]
            if held:
                self.stats["forgotten"] += 1

    def _keep_evicted(self, seq: _Seq) -> None:
        """Copy the cells of ``seq``, about to be evicted, into RAM for its
        agent's next call; the least recently evicted go past the bound."""
        if seq.key is None or not seq.tokens:
            return
        self._forget_evicted(seq.key)
        if len(seq.tokens) * self.token_bytes > self.evicted_limit:
            return   # (also when none are kept)
        # a stream copy queued into seq must land before its cells are read;
        # the token _settle decodes for that goes again at once
        self._settle(seq)
        self._ll.llama_memory_seq_rm(self._mem, seq.id, len(seq.tokens), -1)
        state = self._state(seq)
        if not state or len(state) > self.evicted_limit:
            return
        self.evicted[seq.key] = (list(seq.tokens), state)
        self.evicted_bytes += len(state)
        self.stats["kept_seqs"] += 1
        while self.evicted_bytes > self.evicted_limit:
            _, (_, old) = self.evicted.popitem(last=False)
            self.evicted_bytes -= len(old)

    def _forget_evicted(self, key: str) -> tuple[list[int], bytes] | None:
        kept = self.evicted.pop(key, None)
        if kept is not None:
            self.evicted_bytes -= len(kept[1])
        return kept

    def _set_state(self, seq: _Seq, tokens: list[int], state: bytes) -> bool:
        """Set ``state`` (cells of ``tokens``, as ``_state`` copied them out)
        into ``seq``, emptied first; False, and ``seq`` empty, if llama.cpp
        refuses it."""
        self._settle(seq)
        self._drop(seq)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._ll.llama_state_seq_set_data(self.ctx.ctx, buf, len(state), seq.id) == 0:
            self._drop(seq)
            return False
        self._extend(seq, list(tokens))
        return True

    def _trim(self, seq: _Seq, n: int) -> None:
        """Keep the first ``n`` tokens of ``seq``."""
        if n < len(seq.tokens):
            self._ll.llama_memory_seq_rm(self._mem, seq.id, n, -1)
            seq.tokens = seq.tokens[:n]
            self.tree.truncate(seq.id, n)

    def _drop(self, seq: _Seq) -> None:
        self._ll.llama_memory_seq_rm(self._mem, seq.id, -1, -1)
        seq.tokens = []
        self.tree.drop(seq.id)
        seq.key = None

    def _extend(self, seq: _Seq, tokens: list[int]) -> None:
        seq.tokens.extend(tokens)
        self.tree.grow(seq.id, seq.tokens)

    @staticmethod
    def _common(a: list[int], b: list[int], start: int = 0) -> int:
        n = min(len(a), len(b))
        i = min(start, n)
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def _admit(self, req: Request) -> bool:
        """Give ``req`` a sequence, reusing what the cache already holds."""
        if req.resume is not None:
            return self._admit_resumed(req)
        prompt = req.prompt
        own = self._retained(req.key)
        if own is None and all(s.busy for s in self.seqs):
            return False   # no stream to free: the call waits
        # Whatever was kept of this agent's evicted conversation is either
        # restored now or out of date once this call retains a sequence;
        # taken out first, so that the eviction that frees a stream for
        # this call cannot push it out of RAM.
        kept = self._forget_evicted(req.key)
        seq = own if own is not None else self._free_seq()
        assert seq is not None
        seq = self._place(seq)
        keep = self._common(seq.tokens, prompt)
        other_id, run = self.tree.longest(prompt, exclude=seq.id)
        # The agent's conversation, evicted earlier: its own cells again,
        # unless the cache holds about as much of the prompt (copying
        # megabytes in to keep a few tokens of them is not worth it). Should
        # restoring fail, seq is empty and the prompt is prefilled.
        restored = False
        if kept is not None and self._common(kept[0], prompt) > max(keep, run) + self.tree.block:
            restored = self._set_state(seq, *kept)
            if not restored:
                log.warning("an evicted conversation's cells could not be restored; "
                            "its prompt is prefilled instead")
        keep = self._common(seq.tokens, prompt)   # what seq holds now
        shared = False
        if restored:
            self._trim(seq, keep)
            self.stats["restored_seqs"] += 1
        elif other_id is not None and run > keep + self.tree.block:
            # Another sequence holds more of this prompt (a shared system
            # prompt): start from a copy of its cells instead of recomputing
            # them.
            other = self.seqs[other_id]
            run = self._common(other.tokens, prompt, run)
            self._drop(seq)
            # Streams copy whole: take all of the other's cells, cut back to
            # the shared run.
            self._ll.llama_memory_seq_cp(self._mem, other.id, seq.id, -1, -1)
            self._copying = True
            seq.tokens = list(other.tokens)
            self._trim(seq, run)
            self.tree.grow(seq.id, seq.tokens)
            keep = run
            shared = True
        else:
            self._trim(seq, keep)
        if len(prompt) - keep < MIN_PROMPT_ROWS:
            # Everything is cached but the logits of the last prompt token
            # (or all but one token is): feed the last two again, as a
            # prompt fed afresh would have fed them (see MIN_PROMPT_ROWS).
            keep = max(0, len(prompt) - MIN_PROMPT_ROWS)
            self._trim(seq, keep)
        req.cached = keep
        self.stats["cached_tokens"] += keep
        if restored:
            self.stats["restored_tokens"] += keep
        elif shared:
            self.stats["shared_tokens"] += keep
        seq.key = req.key
        seq.busy = True
        req._seq = seq
        req._todo = prompt[keep:]
        req._sampler = self._sampler(req)
        return True

    def _admit_resumed(self, req: Request) -> bool:
        snap = req.resume
        assert snap is not None
        self._forget_evicted(req.key)   # older than the snapshot
        seq = self._free_seq()
        if seq is None:
            return False
        seq = self._place(seq)
        if not self._set_state(seq, snap.tokens, snap.state):
            req.error = RuntimeError("the snapshot could not be restored into the KV cache")
            return True
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

    def _place(self, seq: _Seq) -> _Seq:
        """The stream a call on ``seq`` should run in.

        llama.cpp decodes in one pass only a run of consecutive streams, and
        each pass reads all of the model's weights: running sequences
        scattered over the cache would make every step several passes. So a
        call that would start a run of its own moves next to the running
        ones (into a hole between them, or at a run's end), its cells
        swapped with that stream's."""
        busy = {s.id for s in self.seqs if s.busy}

        def joins(i: int) -> bool:
            return i - 1 in busy or i + 1 in busy

        if not busy or joins(seq.id):
            return seq
        target = next((s for s in self.seqs if not s.busy and joins(s.id)), None)
        if target is None:
            return seq
        self._swap(seq, target)
        return target

    def _swap(self, a: _Seq, b: _Seq) -> None:
        """Exchange what streams ``a`` and ``b`` hold. llama.cpp copies
        whole streams, in order, at the start of the next decode; a third
        (the spare) holds one side meanwhile."""
        cp, mem = self._ll.llama_memory_seq_cp, self._mem
        if a.tokens and b.tokens:
            cp(mem, a.id, self._spare, -1, -1)
            cp(mem, b.id, a.id, -1, -1)
            cp(mem, self._spare, b.id, -1, -1)
            self._ll.llama_memory_seq_rm(mem, self._spare, -1, -1)
        elif a.tokens or b.tokens:
            src, dst = (a, b) if a.tokens else (b, a)
            cp(mem, src.id, dst.id, -1, -1)
            self._ll.llama_memory_seq_rm(mem, src.id, -1, -1)
        else:
            return
        self._copying = True
        self.stats["moved_seqs"] += 1
        self.tree.drop(a.id)
        self.tree.drop(b.id)
        a.key, b.key = b.key, a.key
        a.tokens, b.tokens = b.tokens, a.tokens
        a.last_used, b.last_used = b.last_used, a.last_used
        self.tree.grow(a.id, a.tokens)
        self.tree.grow(b.id, b.tokens)

    def _settle(self, seq: _Seq) -> None:
        """Carry out the stream copies llama.cpp has queued before cells are
        written directly: it copies at the start of the next decode, which
        would overwrite a snapshot restored into a copy's target. One token
        decoded into ``seq`` (about to be cleared) starts that decode."""
        if not self._copying:
            return
        b = self.batch.batch
        b.token[0] = self.model.token_bos()
        b.pos[0] = len(seq.tokens)
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = seq.id
        b.logits[0] = True
        b.n_tokens = 1
        self._decode(b)

    def _decode(self, b: Any) -> None:
        t = time.perf_counter()
        rc = self._ll.llama_decode(self.ctx.ctx, b)
        self.stats["decode_s"] += time.perf_counter() - t
        if rc != 0:
            # Each sequence has a stream of its own and stops before filling
            # it, so this is not a matter of evicting others.
            raise RuntimeError(f"llama_decode failed ({rc})")
        self._copying = False

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
                while True:
                    if self._gone:
                        self._let_go()
                    if self._stop or self.waiting or self.running:
                        break
                    self._lock.wait()
                if self._stop:
                    for req in self.waiting + self.running:
                        req.error = RuntimeError("the LLM core is shutting down")
                        req.done.set()
                    return
                while self.waiting and len(self.running) < self.slots:
                    req = self.waiting[0]
                    try:
                        if not self._admit(req):
                            break
                    except Exception as exc:
                        log.exception("admitting a call failed")
                        req.error = exc
                    self.waiting.pop(0)
                    if req.error is not None:
                        if req._seq is not None:
                            self._drop(req._seq)
                            req._seq.busy = False
                        req.finish = Finish.ERROR
                        req.done.set()
                        continue
                    self.running.append(req)
            t = time.perf_counter()
            try:
                self._step()
            except Exception as exc:  # a bug in a step fails its calls, not the core
                log.exception("engine step failed")
                for req in list(self.running):
                    self._fail(req, exc, drop=True)
            self.stats["busy_s"] += time.perf_counter() - t

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
            return
        decoding = [(r, [r._pending]) for r in self.running
                    if not r._todo and r._pending is not None]
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
        for group in groups:
            try:
                self._decode_group(group)
            except Exception as exc:
                # llama.cpp failed this batch: its calls fail, and what their
                # cells hold is unknown. The calls of the other batches (some
                # have streamed this step's token already) go on.
                log.exception("decoding a batch of %d calls failed", len(group))
                for req, _ in group:
                    self._fail(req, exc, drop=True)
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
                self._advance(req, tokens, now)
            except Exception as exc:   # its sampler or callback: this call alone fails
                log.exception("a call's next token failed")
                self._fail(req, exc, drop=False)   # its cells are sound

    def _advance(self, req: Request, tokens: list[int], now: float) -> None:
        """Account ``tokens`` of ``req`` as decoded; sample its next token if
        the batch computed its logits."""
        seq = req._seq
        if req._todo:
            req._todo = req._todo[len(tokens):]
            self.stats["prefill_tokens"] += len(tokens)
        else:
            self.stats["decode_tokens"] += 1
        self._extend(seq, tokens)
        seq.last_used = now
        if req._logit_index < 0:
            return
        if len(req.completion) < req.min_tokens:
            self._hold_back_end(req._logit_index)
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

    def _hold_back_end(self, index: int) -> None:
        """Make the end-of-generation tokens impossible at batch ``index``."""
        logits = self._ll.llama_get_logits_ith(self.ctx.ctx, index)
        for token in self._eog:
            logits[token] = float("-inf")

    def _state(self, seq: _Seq) -> bytes:
        """The KV state of ``seq``, as ``llama_state_seq_set_data`` takes it."""
        size = self._ll.llama_state_seq_get_size(self.ctx.ctx, seq.id)
        buf = (ctypes.c_uint8 * size)()
        written = self._ll.llama_state_seq_get_data(self.ctx.ctx, buf, size, seq.id)
        return ctypes.string_at(buf, written)

    def _suspend_now(self, req: Request) -> None:
        seq = req._seq
        req.snapshot = Snapshot(
            key=req.key, state=self._state(seq), tokens=list(seq.tokens),
            pending=req._pending, completion=list(req.completion), prompt_len=len(req.prompt),
            cached=req.cached,
        )
        self.stats["suspended"] += 1
        # The snapshot holds the state now: free the cells for the calls
        # that run meanwhile.
        self._drop(seq)
        self._finish(req, Finish.SUSPENDED)

    def _fail(self, req: Request, exc: BaseException, drop: bool) -> None:
        """End ``req`` with ``exc``; ``drop`` its cells if they are unknown."""
        if req.finish is not None:
            return   # it ended earlier in the step
        req.error = exc
        self._finish(req, Finish.ERROR)
        if drop and req._seq is not None:
            self._drop(req._seq)

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
