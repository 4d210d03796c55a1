"""The compute floor of the benchmark workload on this machine: what the
model's kernels take for its tokens at the contexts the workload has, with
no scheduling cost at all.

Each agent's conversation grows turn by turn: the shared system prompt, then
at each turn a few prompt tokens (its task, later a tool result and the chat
template's marks) and the answer's generated tokens. ``python -m
benchmarks.floor`` follows that shape with 32 conversations, one KV stream
each as aiosd's core keeps them. It times the shared system prompt computed
once, and for each turn, at that turn's context: the turn's prompt tokens fed
for as many conversations as one batch holds (the best of three), and steps
that decode a token for each conversation (every row with its logits; the
median of five). It builds the KV cache aiosd's core builds with its
defaults. llama.cpp attends over a stream's cells rounded up to a multiple of 256, so
a row costs more once a conversation passes 512 cells, as the workload's do
in its fourth turn. The floor is the workload's tokens at these costs: aiosd
cannot finish sooner with this model on this machine, and the lower bound of
``benchmarks.run`` (short contexts, the faster of both attention kernels)
sits below it. ``benchmarks.run`` measures the floor of each size it runs
(``floor``), so that the ratios against direct can be read against it on
the same stretch.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from . import workload

#: conversations decoded together (the benchmark's N = 32; aiosd's default slots)
STREAMS = 32
#: timed decoding steps at each turn's context (the median counts)
STEPS = 5


#: llama.cpp attends over a stream's cells rounded up to a multiple of this
ATTEND_ROUND = 256


def attended(cell: int) -> int:
    """The cells a token at ``cell`` attends over (masked ones too)."""
    return max(ATTEND_ROUND, -(-(cell + 1) // ATTEND_ROUND) * ATTEND_ROUND)


@dataclass
class Turn:
    """One turn of every agent: the cells a conversation holds when the
    turn's prompt tokens are fed (the agents' mean), those tokens for each
    agent, and for each agent the cell of the answer's first decoded token."""

    start: int
    new: list[int]
    firsts: list[int]

    def rows(self) -> dict[int, int]:
        """The agents' decoded rows of this turn, by the cells they attend
        over. An answer's last token is sampled but not decoded as a row:
        the next prompt begins with it."""
        by: dict[int, int] = {}
        for first in self.firsts:
            for cell in range(first, first + workload.MAX_TOKENS - 1):
                cells = attended(cell)
                by[cells] = by.get(cells, 0) + 1
        return by


@dataclass
class Shape:
    """The workload's prompt tokens as aiosd's core meets them: the shared
    system prompt once, then each turn's own tokens of every agent."""

    shared: int
    turns: list[Turn] = field(default_factory=list)

    @property
    def distinct(self) -> int:
        return self.shared + sum(sum(t.new) for t in self.turns)


def shape(n: int) -> Shape:
    """The prompt tokens of ``n`` agents' conversations, rendered with the
    model's own chat template. An answer is ``workload.MAX_TOKENS`` generated
    tokens, each decoded as a row but the last (see Turn.rows); the tokens a
    turn adds are the rest of its prompt (the answer's end mark, the tool
    result, the marks that open the next answer). Rendered with empty
    answers, these come out about as many as aiosd's core prefills."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from aiosd.llm.llamacpp import embedded_model_path

    llm = Llama(str(embedded_model_path()), n_ctx=512, verbose=False, vocab_only=True)
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                              eos_token="", bos_token="")

    def tokens(messages: list[dict[str, str]]) -> list[int]:
        return llm.tokenize(fmt(messages=messages).prompt.encode(), add_bos=False, special=True)

    def common(a: list[int], b: list[int]) -> int:
        return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    system = tokens(workload.first_messages(0)[:1])
    per_agent: list[list[tuple[int, int, int]]] = []   # (start, new, first decoded cell) per turn
    for i in range(n):
        messages = workload.first_messages(i)
        prompt = tokens(messages)
        start = common(system, prompt)
        turns = [(start, len(prompt) - start, len(prompt))]
        for turn in range(1, workload.TURNS):
            # the answers' text is left empty: their tokens are counted as generated
            messages += [{"role": "assistant", "content": ""}, workload.tool_result(i, turn - 1)]
            before = len(prompt)
            prompt = tokens(messages)
            answered = turn * workload.MAX_TOKENS
            turns.append((before + answered, len(prompt) - before, len(prompt) + answered))
        per_agent.append(turns)
    result = Shape(shared=max(t[0][0] for t in per_agent))
    for k in range(workload.TURNS):
        at = [a[k] for a in per_agent]
        result.turns.append(Turn(start=round(sum(s for s, _, _ in at) / n), new=[m for _, m, _ in at],
                                 firsts=[f for _, _, f in at]))
    return result


@dataclass
class Costs:
    """Seconds a token of the shared prompt costs, a prompt token of each
    turn, and a decoded row by the cells it attends over."""

    shared: float
    prompt: list[float]
    row: dict[int, float]

    def floor(self, sh: Shape) -> float:
        total = sh.shared * self.shared
        for turn, prompt in zip(sh.turns, self.prompt):
            total += sum(turn.new) * prompt
            total += sum(rows * self.row[cells] for cells, rows in turn.rows().items())
        return total

    def mean_row(self, sh: Shape) -> float:
        """A decoded row's cost over the workload's answers."""
        rows = [(cells, k) for t in sh.turns for cells, k in t.rows().items()]
        return sum(self.row[c] * k for c, k in rows) / sum(k for _, k in rows)

    def report(self) -> dict[str, Any]:
        return {"shared_ms_per_token": round(self.shared * 1e3, 3),
                "prompt_ms_per_token": [round(p * 1e3, 3) for p in self.prompt],
                "decode_ms_per_row": {str(c): round(r * 1e3, 3) for c, r in sorted(self.row.items())}}


def measure(sh: Shape, streams: int = STREAMS, steps: int = STEPS) -> Costs:
    """What the kernel aiosd runs (a KV stream a conversation, flash
    attention off) takes for the tokens of ``sh`` with ``streams``
    conversations at the workload's contexts."""
    import llama_cpp

    from aiosd.config import CoreConfig
    from aiosd.llm import sizing
    from aiosd.llm.engine import Engine
    from aiosd.llm.llamacpp import embedded_model_path

    classes = sorted({c for t in sh.turns for c in t.rows()})
    # The context aiosd's core builds with its defaults (the KV cache's
    # layout changes what a step costs: the longer its streams, the further
    # apart a conversation's cells lie); its loop waits for calls, and none come.
    core = CoreConfig()

    def sized(token_bytes: int, n_ctx: int) -> tuple[int, int, int]:
        # the KV cache a core of the defaults sizes for itself here
        s = sizing.auto_sizes(usable_bytes=sizing.usable_now(), cores=1, token_bytes=token_bytes,
                              n_ctx=n_ctx, slots=streams)
        return s.kv_mb * 2**20, streams, 0

    engine = Engine(str(embedded_model_path()), n_ctx=core.n_ctx, slots=streams,
                    threads=len(os.sched_getaffinity(0)), sizer=sized)
    ctx, batch, n_batch = engine.ctx, engine.batch, engine.n_batch
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    rng = random.Random(0)
    vocab = llama_cpp.llama_vocab_n_tokens(engine.model.vocab)
    held = [0] * streams   # cells each stream holds
    everyone = list(range(streams))

    def decode(rows: list[tuple[int, bool]]) -> float:
        """Decode a random token for each (stream, logits) row, each at its
        stream's next cell; seconds."""
        b = batch.batch
        b.n_tokens = len(rows)
        for k, (seq, logits) in enumerate(rows):
            b.token[k], b.pos[k], b.n_seq_id[k] = rng.randrange(100, vocab), held[seq], 1
            b.seq_id[k][0], b.logits[k] = seq, logits
            held[seq] += 1
        t = time.perf_counter()
        if llama_cpp.llama_decode(ctx.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t

    def feed(seqs: list[int], count: int) -> float:
        """Feed ``count`` tokens to each of ``seqs``, as many streams a
        batch as it holds, the last token of each with logits; seconds."""
        per = max(1, n_batch // count)
        spent = 0.0
        for g in range(0, len(seqs), per):
            group, done = seqs[g:g + per], 0
            while done < count:
                k = min(count - done, n_batch // len(group))
                spent += decode([(s, done + j == count - 1) for s in group for j in range(k)])
                done += k
        return spent

    def cut(seq: int, to: int) -> None:
        llama_cpp.llama_memory_seq_rm(memory, seq, to, -1)
        held[seq] = min(held[seq], to)

    def every_stream_at(cells: int) -> None:
        """Every stream holding ``cells`` cells: stream 0 grown (untimed)
        and copied into the others."""
        cut(0, cells)
        if held[0] < cells:
            feed([0], cells - held[0])
        for seq in everyone[1:]:
            cut(seq, 0)
            llama_cpp.llama_memory_seq_cp(memory, 0, seq, -1, -1)
            held[seq] = cells
        decode([(s, True) for s in everyone])   # applies the copies (untimed)
        for s in everyone:
            cut(s, cells)

    try:
        decode([(0, True)])   # builds the graphs
        times = []
        for _ in range(2):
            cut(0, 0)
            times.append(feed([0], sh.shared))
        shared = min(times) / sh.shared
        # Each turn's prompt tokens where that turn feeds them, and decoded
        # rows in each run of cells attended over (a few cells before its
        # end), in order of the cells they need.
        events = [(t.start, "prompt", k) for k, t in enumerate(sh.turns)]
        events += [(c - 8, "row", c) for c in classes]
        prompt = [0.0] * len(sh.turns)
        row: dict[int, float] = {}
        for cells, what, which in sorted(events):
            every_stream_at(cells)
            if what == "prompt":
                # as many conversations as one batch holds, the best of three
                turn = sh.turns[which]
                count = max(2, round(sum(turn.new) / len(turn.new)))
                group = everyone[:max(1, n_batch // count)]
                taken = []
                for _ in range(3):
                    for s in group:
                        cut(s, cells)
                    taken.append(feed(group, count) / (len(group) * count))
                prompt[which] = min(taken)
            else:
                taken = []
                for _ in range(steps):
                    taken.append(decode([(s, True) for s in everyone]))
                    for s in everyone:
                        cut(s, cells)
                row[which] = sorted(taken)[len(taken) // 2] / streams
        return Costs(shared=shared, prompt=prompt, row=row)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    sh = shape(STREAMS)
    costs = measure(sh)
    print(f"{STREAMS} conversations, flash attention off: the shared prompt ({sh.shared} tokens) "
          f"{costs.shared * 1e3:.2f} ms a token")
    for k, (turn, p) in enumerate(zip(sh.turns, costs.prompt), 1):
        print(f"  turn {k}: {sum(turn.new)} prompt tokens at {turn.start} cells, {p * 1e3:.2f} ms a token; "
              f"answers from cell {round(sum(turn.firsts) / len(turn.firsts))}")
    for cells, r in sorted(costs.row.items()):
        print(f"  a decoded row attending over {cells} cells: {r * 1e3:.2f} ms "
              f"({r * STREAMS * 1e3:.0f} ms a step)")
    floor = costs.floor(sh)
    decoded = sum(sum(t.rows().values()) for t in sh.turns)
    print(f"floor at N = {STREAMS}: {sh.distinct} distinct prompt tokens and {decoded} decoded rows: "
          f"{floor:.1f} s; 10x sooner than direct needs direct to take {10 * floor:.0f} s or more")


if __name__ == "__main__":
    main()
