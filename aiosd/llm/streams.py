"""The engine's sequences: which stream of the KV cache a call runs in and
what the streams hold. An agent's conversation is retained in its stream
between calls; when a stream is needed the least recently used is evicted,
its cells kept in RAM up to a bound; the streams of agents that ended are
let go of first. A call is admitted with as much of its prompt as the cache
holds (its own cells, its kept evicted cells, or another sequence's shared
prefix), or with its snapshot set back into a stream; a call that would run
apart is swapped next to the running ones. ``Streams`` is a mixin of
``Engine``: its methods run on the engine's thread and use its state."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from typing import Any

from .batching import MIN_PROMPT_ROWS
from .generation import Request

log = logging.getLogger(__name__)

#: steps in a row the running calls may lie in several runs of streams
#: before they are moved together (see Streams._compact_if_apart)
COMPACT_AFTER = 8


@dataclass(eq=False)
class _Seq:
    id: int
    key: str | None = None
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


class Streams:
    """How ``Engine`` gives calls sequences and keeps their cells."""

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
        if not seq.tokens:
            # An empty stream is placed now, while a move costs one copy;
            # one holding a conversation when it begins to decode (see
            # _gather).
            seq = self._placed(seq)
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
        req._sampler = self._sampler(req)
        if req.grammar is not None:
            # replay the generated tokens through the grammar's state
            for tok in snap.completion:
                req._sampler.accept(tok)
        self.stats["resumed"] += 1
        return True

    def _gather(self, req: Request) -> None:
        """Before ``req`` decodes its first token: if its stream would make
        a run of its own, move it next to the others (see _place).

        A call whose stream holds a conversation is placed here rather than
        at admission: its prompt is prefilled in a pass of its own wherever
        it lies, and by the time it decodes, the calls that arrived with it
        are often busy beside it. When many calls come back at once (every
        agent's next turn), most then need no move; placed as they arrived,
        most were swapped, three whole-stream copies each."""
        self._move(req, self._place(req._seq))

    def _move(self, req: Request, target: _Seq) -> None:
        """Run ``req`` in ``target`` (idle) from now on: their cells swap."""
        seq = req._seq
        if target is seq:
            return
        self._swap(seq, target)
        seq.busy, target.busy = False, True
        req._seq = target

    def _compact_if_apart(self, decoding: list[Request]) -> None:
        """Close the gaps between the ``decoding`` calls' streams once they
        have lasted ``COMPACT_AFTER`` steps: each gap costs every step a
        pass of its own (all of the model's weights read again), and a move
        costs about as much as two such passes. Gaps that calls arriving
        together fill by themselves (_gather leaves those alone) are not
        worth moving for. A hole is an idle stream between the decoding
        calls' (a prefilling call's stays where it is)."""
        # (prompt chunks are decoded in batches of their own: only the
        # decoding calls' streams need to lie together)
        ids = sorted(r._seq.id for r in decoding)
        apart = any(b - a > 1 for a, b in zip(ids, ids[1:]))
        self._apart_steps = self._apart_steps + 1 if apart else 0
        if self._apart_steps < COMPACT_AFTER:
            return
        self._apart_steps = 0
        by_id = {r._seq.id: r for r in decoding}
        while True:
            ids = sorted(by_id)
            hole = next((s for s in self.seqs if not s.busy and ids[0] < s.id < ids[-1]), None)
            if hole is None:
                return
            # the call in the last stream moves into the first gap
            req = by_id.pop(ids[-1])
            self._move(req, hole)
            by_id[hole.id] = req

    def _placed(self, seq: _Seq) -> _Seq:
        """The stream to admit a call into, ``seq``'s cells swapped there
        (see _place); ``seq`` is not busy yet."""
        target = self._place(seq)
        if target is not seq:
            self._swap(seq, target)
        return target

    def _place(self, seq: _Seq) -> _Seq:
        """The stream a call on ``seq`` should run in (``seq`` itself, or an
        idle one to swap cells with).

        llama.cpp decodes in one pass only a run of consecutive streams, and
        each pass reads all of the model's weights: running sequences
        scattered over the cache would make every step several passes. So a
        call that would start a run of its own moves next to the running
        ones (into a hole between them, or at a run's end), its cells
        swapped with that stream's."""
        busy = {s.id for s in self.seqs if s.busy and s is not seq}

        def joins(i: int) -> bool:
            return i - 1 in busy or i + 1 in busy

        if not busy or joins(seq.id):
            return seq
        return next((s for s in self.seqs if not s.busy and joins(s.id)), seq)

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
        else:   # no cells to copy: whose the streams are still changes
            a.key, b.key = b.key, a.key
            a.last_used, b.last_used = b.last_used, a.last_used
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
        b.token[0] = max(0, self.model.token_bos())   # any token: some vocabularies have no BOS
        b.pos[0] = len(seq.tokens)
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = seq.id
        b.logits[0] = True
        b.n_tokens = 1
        self._decode(b)

    def _state(self, seq: _Seq) -> bytes:
        """The KV state of ``seq``, as ``llama_state_seq_set_data`` takes it."""
        size = self._ll.llama_state_seq_get_size(self.ctx.ctx, seq.id)
        buf = (ctypes.c_uint8 * size)()
        written = self._ll.llama_state_seq_get_data(self.ctx.ctx, buf, size, seq.id)
        return ctypes.string_at(buf, written)
