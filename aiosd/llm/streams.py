"""The engine's streams: what each stream of the KV cache holds, carried
out on llama.cpp. An agent's conversation is retained in its stream between
calls; when a stream is needed one is evicted (see placement.reusable),
its cells kept in RAM up to a bound, then on disk; the streams of agents
that ended are let go of first. A call is admitted with as much of its prompt as the cache
holds (its own cells, its kept evicted cells, or another stream's shared
prefix), or with its snapshot set back into a stream; a call that would run
apart is swapped next to the running ones. Where a call runs is decided in
``placement`` (pure); the llama.cpp calls that move cells are all here.
Its methods run on the engine's thread."""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from . import placement
from .batching import MIN_PROMPT_ROWS
from .generation import Request
from .placement import Seq
from .prefix import PrefixTree
from .tiers import DiskTier

log = logging.getLogger(__name__)


class Streams:
    """The streams of one llama.cpp context: ``count`` of them, and a spare
    (the last) for swapping two. ``decode`` decodes a batch (the engine's,
    which counts its time); ``stats`` are the engine's counters."""

    def __init__(self, ll: Any, ctx: Any, model: Any, batch: Any, count: int, token_bytes: int,
                 evicted_limit: int, decode: Callable[[Any], None], stats: dict[str, Any],
                 disk: DiskTier | None = None) -> None:
        self._ll = ll
        self.ctx = ctx
        self.model = model
        self.batch = batch
        self._decode = decode
        self.stats = stats
        self.token_bytes = token_bytes
        self.seqs = [Seq(i) for i in range(count)]
        self._spare = count
        self.tree = PrefixTree()
        # agent key -> (tokens, KV state) of conversations evicted from the
        # cache, least recently evicted first
        self.evicted: OrderedDict[str, tuple[list[int], bytes]] = OrderedDict()
        self.evicted_bytes = 0
        self.evicted_limit = evicted_limit
        #: where conversations evicted from RAM go, instead of being dropped
        self.disk = disk
        #: agents whose conversation a stream, RAM or disk held at some
        #: point (a call of theirs that finds it nowhere is a miss)
        self.known: set[str] = set()
        #: the streams that queued copies read or write: llama.cpp copies
        #: them at the start of the next decode (see _settle)
        self.copies: set[int] = set()
        self._apart_steps = 0   # steps in a row whose running calls made several runs
        #: agents that ended, not yet let go of -> whether anything was held
        self.gone: dict[str, bool] = {}

    @property
    def _mem(self) -> Any:
        return self.ctx.memory

    def retained(self, key: str) -> Seq | None:
        return placement.retained(self.seqs, key)

    def _free_seq(self) -> Seq | None:
        """An idle stream: an empty one, else a retained one (see
        placement.reusable), its conversation evicted."""
        seq = placement.reusable(self.seqs)
        if seq is not None and seq.tokens:
            self._keep_evicted(seq)
            self.drop(seq)
            self.stats["evicted_seqs"] += 1
        return seq

    def let_go(self, waiting: Iterable[Request]) -> None:
        """Carry out the engine's ``forget``. A call of a gone agent still
        here (``waiting``, or being cancelled) keeps its stream until it
        stops; it is let go of then."""
        waiting_keys = {r.key for r in waiting}
        for key, held in list(self.gone.items()):
            held |= self._drop_kept(key)
            self.known.discard(key)
            pending = key in waiting_keys
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
                self.gone[key] = held
                continue
            del self.gone[key]
            if held:
                self.stats["forgotten"] += 1

    def _keep_evicted(self, seq: Seq) -> None:
        """Copy the cells of ``seq``, about to be evicted, into RAM for its
        agent's next call; past the bound the least recently evicted go to
        disk (and past the disk's bound, the least recently spilled are
        dropped)."""
        if seq.key is None or not seq.tokens:
            return
        self._drop_kept(seq.key)
        if self.disk is None and len(seq.tokens) * self.token_bytes > self.evicted_limit:
            return   # (also when none are kept)
        # a stream copy queued into seq must land before its cells are read;
        # the token _settle decodes for that goes again at once
        self._settle(seq)
        self._ll.llama_memory_seq_rm(self._mem, seq.id, len(seq.tokens), -1)
        state = self.state(seq)
        if not state:
            return
        self.evicted[seq.key] = (list(seq.tokens), state)
        self.evicted_bytes += len(state)
        self.stats["kept_seqs"] += 1
        while self.evicted_bytes > self.evicted_limit and self.evicted:
            key, (tokens, old) = self.evicted.popitem(last=False)
            self.evicted_bytes -= len(old)
            if self.disk is not None:
                self.disk.put(key, tokens, old)

    def _take_kept(self, key: str) -> tuple[tuple[list[int], bytes] | None, str]:
        """``key``'s evicted conversation, out of RAM or off disk (checked;
        a file that fails the check is dropped: None), and its tier."""
        kept = self._forget_evicted(key)
        if kept is not None:
            return kept, "ram"
        if self.disk is not None and key in self.disk:
            return self.disk.take(key), "disk"
        return None, ""

    def _drop_kept(self, key: str) -> bool:
        """Drop ``key``'s evicted conversation from RAM and disk, unread;
        whether either held it."""
        in_ram = self._forget_evicted(key) is not None
        on_disk = self.disk is not None and self.disk.forget(key)
        return in_ram or on_disk

    def _forget_evicted(self, key: str) -> tuple[list[int], bytes] | None:
        kept = self.evicted.pop(key, None)
        if kept is not None:
            self.evicted_bytes -= len(kept[1])
        return kept

    def _set_state(self, seq: Seq, tokens: list[int], state: bytes) -> bool:
        """Set ``state`` (cells of ``tokens``, as ``_state`` copied them out)
        into ``seq``, emptied first; False, and ``seq`` empty, if llama.cpp
        refuses it."""
        self._settle(seq)
        self.drop(seq)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._ll.llama_state_seq_set_data(self.ctx.ctx, buf, len(state), seq.id) == 0:
            self.drop(seq)
            return False
        self.extend(seq, list(tokens))
        return True

    def _trim(self, seq: Seq, n: int) -> None:
        """Keep the first ``n`` tokens of ``seq``."""
        if n < len(seq.tokens):
            self._ll.llama_memory_seq_rm(self._mem, seq.id, n, -1)
            seq.tokens = seq.tokens[:n]
            self.tree.truncate(seq.id, n)

    def drop(self, seq: Seq) -> None:
        self._ll.llama_memory_seq_rm(self._mem, seq.id, -1, -1)
        seq.tokens = []
        self.tree.drop(seq.id)
        seq.key = None

    def extend(self, seq: Seq, tokens: list[int]) -> None:
        seq.tokens.extend(tokens)
        self.tree.grow(seq.id, seq.tokens)

    def admit(self, req: Request) -> bool:
        """Give ``req`` a stream, reusing what the cache already holds;
        False if every stream runs a call (it waits). The engine gives an
        admitted call its sampler."""
        if req.resume is not None:
            return self._admit_resumed(req)
        prompt = req.prompt
        own = self.retained(req.key)
        if own is None and all(s.busy for s in self.seqs):
            return False   # no stream to free: the call waits
        # Whatever was kept of this agent's evicted conversation is either
        # restored now or out of date once this call retains a stream;
        # taken out first, so that the eviction that frees a stream for
        # this call cannot push it out of RAM.
        kept, tier = self._take_kept(req.key)
        seq = own if own is not None else self._free_seq()
        assert seq is not None
        if not seq.tokens:
            # An empty stream is placed now, while a move costs one copy;
            # one holding a conversation when it begins to decode (see
            # gather).
            seq = self._placed(seq)
        other_id, run = self.tree.longest(prompt, exclude=seq.id)
        run = run if other_id is not None else 0
        source = placement.prompt_source(
            placement.common(seq.tokens, prompt),
            placement.common(kept[0], prompt) if kept is not None else None, run, self.tree.block)
        if source == "restore":
            assert kept is not None
            if not self._set_state(seq, *kept):
                # seq is empty now: what else holds the prompt decides
                log.warning("an evicted conversation's cells could not be restored; "
                            "its prompt is prefilled instead")
                source = placement.prompt_source(0, None, run, self.tree.block)
        keep = placement.common(seq.tokens, prompt)   # what seq holds now
        if source == "share":
            # Another stream holds more of this prompt (a shared system
            # prompt): start from a copy of its cells instead of recomputing
            # them.
            assert other_id is not None
            other = self.seqs[other_id]
            run = placement.common(other.tokens, prompt, run)
            self.drop(seq)
            # Streams copy whole: take all of the other's cells, cut back to
            # the shared run.
            self._ll.llama_memory_seq_cp(self._mem, other.id, seq.id, -1, -1)
            self.copies |= {other.id, seq.id}
            seq.tokens = list(other.tokens)
            self._trim(seq, run)
            self.tree.grow(seq.id, seq.tokens)
            keep = run
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
        # which tier held the agent's conversation (a shared prefix is none)
        if source == "restore":
            self.stats[f"{tier}_hits"] += 1
        elif source == "own" and keep > 0:
            self.stats["kv_hits"] += 1
        else:
            self.stats["misses" if req.key in self.known else "cold"] += 1
        self.known.add(req.key)
        if source == "restore":
            self.stats["restored_seqs"] += 1
            self.stats["restored_tokens"] += keep
        elif source == "share":
            self.stats["shared_tokens"] += keep
        seq.key = req.key
        seq.busy = True
        req._seq = seq
        req._todo = prompt[keep:]
        return True

    def _admit_resumed(self, req: Request) -> bool:
        snap = req.resume
        assert snap is not None
        self._drop_kept(req.key)   # older than the snapshot
        seq = self._free_seq()
        if seq is None:
            return False
        seq = self._placed(seq)
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
        self.stats["resumed"] += 1
        return True

    def gather(self, req: Request) -> None:
        """Before ``req`` decodes its first token: if its stream would make
        a run of its own, move it next to the others (see placement.place).

        A call whose stream holds a conversation is placed here rather than
        at admission: its prompt is prefilled in a pass of its own wherever
        it lies, and by the time it decodes, the calls that arrived with it
        are often busy beside it. When many calls come back at once (every
        agent's next turn), most then need no move; placed as they arrived,
        most were swapped, three whole-stream copies each."""
        self._move(req, placement.place(self.seqs, req._seq))

    def _move(self, req: Request, target: Seq) -> None:
        """Run ``req`` in ``target`` (idle) from now on: their cells swap."""
        seq = req._seq
        if target is seq:
            return
        self._swap(seq, target)
        seq.busy, target.busy = False, True
        req._seq = target

    def compact_if_apart(self, decoding: list[Request]) -> None:
        """Close the gaps between the ``decoding`` calls' streams once they
        have lasted ``COMPACT_AFTER`` steps (see placement.compaction)."""
        # (prompt chunks are decoded in batches of their own: only the
        # decoding calls' streams need to lie together)
        ids = [r._seq.id for r in decoding]
        self._apart_steps = self._apart_steps + 1 if placement.apart(ids) else 0
        if self._apart_steps < placement.COMPACT_AFTER:
            return
        self._apart_steps = 0
        by_id = {r._seq.id: r for r in decoding}
        for source, target in placement.compaction(self.seqs, ids):
            req = by_id.pop(source)
            self._move(req, self.seqs[target])
            by_id[target] = req

    def idle(self) -> None:
        """No call runs: the streams' gaps count from zero again."""
        self._apart_steps = 0

    def _placed(self, seq: Seq) -> Seq:
        """The stream to admit a call into, ``seq``'s cells swapped there
        (see placement.place); ``seq`` is not busy yet."""
        target = placement.place(self.seqs, seq)
        if target is not seq:
            self._swap(seq, target)
        return target

    def _swap(self, a: Seq, b: Seq) -> None:
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
        else:   # no cells to copy: whose the streams are still changes
            a.key, b.key = b.key, a.key
            a.last_used, b.last_used = b.last_used, a.last_used
            return
        self.copies |= {a.id, b.id, self._spare}
        self.stats["moved_seqs"] += 1
        self.tree.drop(a.id)
        self.tree.drop(b.id)
        a.key, b.key = b.key, a.key
        a.tokens, b.tokens = b.tokens, a.tokens
        a.last_used, b.last_used = b.last_used, a.last_used
        self.tree.grow(a.id, a.tokens)
        self.tree.grow(b.id, b.tokens)

    def _settle(self, seq: Seq) -> None:
        """Carry out the stream copies llama.cpp has queued before ``seq``'s
        cells are read or written directly: it copies at the start of the
        next decode, which would overwrite a snapshot restored into a copy's
        target, or copy out what was restored over its source. One token
        decoded into ``seq`` (about to be cleared) starts that decode. A
        stream no queued copy touches needs none: its cells are in place."""
        if seq.id not in self.copies:
            return
        b = self.batch.batch
        b.token[0] = max(0, self.model.token_bos())   # any token: some vocabularies have no BOS
        b.pos[0] = len(seq.tokens)
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = seq.id
        b.logits[0] = True
        b.n_tokens = 1
        self._decode(b)
        self.stats["settles"] += 1

    def state(self, seq: Seq) -> bytes:
        """The KV state of ``seq``, as ``llama_state_seq_set_data`` takes it."""
        size = self._ll.llama_state_seq_get_size(self.ctx.ctx, seq.id)
        buf = (ctypes.c_uint8 * size)()
        written = self._ll.llama_state_seq_get_data(self.ctx.ctx, buf, size, seq.id)
        return ctypes.string_at(buf, written)
