"""The compute floor of the benchmark workload on this machine: what the
model's kernels take for its tokens at the contexts the workload has, with
no scheduling cost at all.

``python -m benchmarks.floor`` prefills 32 conversations of ``--context``
tokens each (one KV stream each, as aiosd's core keeps them), then times
decoding steps that give each conversation 1, 2 and 4 rows, every row with
its logits (a step of 2 or 4 rows a conversation is what checking drafted
tokens costs). The floor at N = 32 is the workload's distinct prompt tokens
at that prefill rate plus its generated tokens at the cost of a row in
steps of one row a conversation: aiosd cannot finish sooner with this
model on this machine, and the lower bound of ``benchmarks.run`` (short
contexts, the faster of both attention kernels) sits below it.
``benchmarks.run`` measures the floor of each size it runs (``floor``), so
that the ratios against direct can be read against it on the same stretch.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from . import workload

#: conversations decoded together (the benchmark's N = 32; aiosd's default slots)
STREAMS = 32
#: cells of each conversation: the workload's run from about 300 to 700
CONTEXT = 450


def measure(context: int = CONTEXT, streams: int = STREAMS, steps: int = 5,
            rows: tuple[int, ...] = (1, 2, 4)) -> tuple[float, dict[int, float]]:
    """Seconds per prefilled token, and seconds per decoded row for each of
    ``rows`` rows a conversation, at ``context`` cells of ``streams``
    conversations."""
    import llama_cpp

    from aiosd.llm.engine import Engine
    from aiosd.llm.llamacpp import embedded_model_path

    # The context aiosd's core builds (a KV stream a conversation, flash
    # attention off); its loop waits for calls, and none come.
    engine = Engine(str(embedded_model_path()), n_ctx=1024, slots=streams, seqs=streams,
                    threads=len(os.sched_getaffinity(0)))
    ctx, batch = engine.ctx, engine.batch
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    rng = random.Random(0)
    vocab = llama_cpp.llama_vocab_n_tokens(engine.model.vocab)

    def decode(rows: list[tuple[int, int, bool]]) -> float:
        """Decode (stream, position, logits) rows of random tokens; seconds."""
        b = batch.batch
        b.n_tokens = len(rows)
        for k, (seq, pos, logits) in enumerate(rows):
            b.token[k], b.pos[k], b.n_seq_id[k] = rng.randrange(100, vocab), pos, 1
            b.seq_id[k][0], b.logits[k] = seq, logits
        t = time.perf_counter()
        if llama_cpp.llama_decode(ctx.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t

    try:
        decode([(0, 0, True)])   # builds the graphs
        llama_cpp.llama_memory_seq_rm(memory, 0, 0, -1)
        prefill = 0.0
        for seq in range(streams):
            for start in range(0, context, 512):
                n = min(512, context - start)
                prefill += decode([(seq, start + j, j == n - 1) for j in range(n)])
        per_row: dict[int, float] = {}
        for k in rows:
            times = []
            for _ in range(steps):
                times.append(decode([(seq, context + j, True)
                                     for seq in range(streams) for j in range(k)]))
                for seq in range(streams):
                    llama_cpp.llama_memory_seq_rm(memory, seq, context, -1)
            per_row[k] = sorted(times)[len(times) // 2] / (streams * k)
        return prefill / (streams * context), per_row
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=CONTEXT,
                        help="cells of each conversation (the workload's run from about 300 to 700)")
    args = parser.parse_args()
    from .run import distinct_prompt_tokens

    prefill, per_row = measure(args.context)
    print(f"at {args.context} cells of context, {STREAMS} conversations, flash attention off:")
    print(f"  prefill {prefill * 1e3:.2f} ms a token ({1 / prefill:.1f} tok/s)")
    for k, cost in per_row.items():
        print(f"  decoding {k} row(s) a conversation ({STREAMS * k} rows, all with logits): "
              f"{cost * 1e3:.2f} ms a row, {cost * STREAMS * k * 1e3:.0f} ms a step")
    distinct = distinct_prompt_tokens(STREAMS)
    generated = STREAMS * workload.TURNS * workload.MAX_TOKENS
    floor = distinct * prefill + generated * per_row[1]
    print(f"floor at N = {STREAMS}: {distinct} distinct prompt tokens and {generated} generated: "
          f"{floor:.1f} s; 10x sooner than direct needs direct to take {10 * floor:.0f} s or more")


if __name__ == "__main__":
    main()
