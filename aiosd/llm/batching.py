"""The engine's batch planning, pure (no llama.cpp): how many sequences a
KV budget holds, how a call's prompt is cut into chunks and the chunks into
batches so that no prompt token is fed alone, and how many passes llama.cpp
makes over a batch of streams."""

from __future__ import annotations

from typing import Any


#: llama.cpp's most sequences (streams) in one context, the spare included
MAX_SEQS = 255
#: llama.cpp rounds each stream's cells up to a multiple of this
CTX_ALIGN = 256


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
