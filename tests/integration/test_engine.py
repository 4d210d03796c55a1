"""The batching engine on the real model, without the daemon around it: a
prefix copied from another sequence's stream decodes to the same tokens as
one computed afresh, a prompt's cells the same however its feeding was
split, eviction when every stream is taken, an evicted conversation's cells
kept in RAM and restored, what is kept for an agent let go of when it
ends, a failed batch or token handler failing its own calls alone, a
snapshot restored into another stream, and a too-long prompt refused."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from aiosd.llm.engine import Engine
from aiosd.llm.generation import Finish, Request
from aiosd.llm.llamacpp import embedded_model_path

pytestmark = pytest.mark.integration

SYSTEM = ("You are a careful assistant working for a small team. Answer briefly and "
          "plainly, name your sources, and say so when you do not know. ") * 3


def make(seqs: int, slots: int | None = None, evicted_bytes: int = 0) -> Engine:
    return Engine(str(embedded_model_path()), n_ctx=512, slots=slots or seqs, threads=2,
                  seqs=seqs, evicted_bytes=evicted_bytes)


@pytest.fixture(scope="module")
def plain() -> Iterator[Engine]:
    """One sequence only: nothing can be shared, everything is computed."""
    eng = make(1)
    yield eng
    eng.close()


def tokens(eng: Engine, text: str) -> list[int]:
    return eng.model.tokenize(text.encode(), add_bos=False, special=True)


def turn(user: str, system: str = SYSTEM) -> str:
    """A prompt in the model's chat format, ready for the answer."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def generate(eng: Engine, key: str, prompt: list[int], n: int = 24, **kw) -> Request:
    req = eng.run(Request(key, prompt, n, **kw))
    assert req.error is None, req.error
    assert req.completion, "the model ended at once: pick a prompt it continues"
    return req


def test_a_shared_prefix_decodes_like_one_computed_afresh(plain: Engine) -> None:
    eng = make(4)
    try:
        system = tokens(eng, turn("")[:-len("<|im_end|>\n<|im_start|>assistant\n")])
        first = tokens(eng, turn("What is a lighthouse?"))
        second = tokens(eng, turn("Name three rivers in Europe."))
        generate(eng, "a", first)
        shared = generate(eng, "b", second)
        # b's prompt started from a copy of a's cells, whole blocks and all
        assert eng.stats["shared_tokens"] >= len(system) - 16
        assert shared.cached >= len(system) - 16
        assert shared.completion == generate(plain, "ref", second).completion
        # and a's own sequence is untouched by the copy
        assert generate(eng, "a", first).completion == generate(plain, "ref", first).completion
    finally:
        eng.close()


def test_a_prompt_fed_again_computes_the_same_cells() -> None:
    """A prompt that is all cached has its last tokens fed again (their
    logits are not kept): the cells must come out as they were. llama.cpp
    computes a token fed as its sequence's only row in a pass differently,
    in the last bits, at some positions; so the engine never feeds a
    prompt token alone."""
    eng = make(8)
    try:
        for n in range(8, 200, 12):
            prompt = tokens(eng, f"{n} bottles on the wall, and the keeper counted ships. " * 20)[:n]
            generate(eng, f"k{n}", prompt, 1)
            before = eng.retained_state(f"k{n}")
            again = generate(eng, f"k{n}", prompt, 1)
            assert again.cached == n - 2
            assert eng.retained_state(f"k{n}") == before, f"a prompt of {n} tokens"
    finally:
        eng.close()


def test_a_prompt_prefilled_beside_decoding_calls_computes_the_same_cells() -> None:
    """A turn prefilled while another call decodes, in the stream next to
    it, gets the cells it gets when prefilled alone in the same stream of
    a like engine (a state names its stream)."""
    beside, alone = make(2), make(2)      # a in stream 0, each b in stream 1
    try:
        story = tokens(beside, turn("Write a long story about a lighthouse keeper.",
                                    "You are a storyteller."))
        for eng in (beside, alone):
            generate(eng, "a", story, 1)          # a's stream: 0
        for n in (100, 112, 124, 136, 148, 160):
            # b's second turn starts at about n tokens
            first = tokens(beside, turn(f"Count to {n}, please.", "You answer briefly."))
            first = first[:2] + tokens(beside, "Be brief. " * 80)[:n - len(first)] + first[2:]
            key = f"b{n}"
            b1 = generate(beside, key, first, 6)
            assert generate(alone, key, first, 6).completion == b1.completion
            second = first + b1.completion + tokens(
                beside, "<|im_end|>\n<|im_start|>user\n" + "And then? " * 8
                        + "<|im_end|>\n<|im_start|>assistant\n")
            started = threading.Event()

            def on_token(tok: int) -> bool:
                started.set()
                return True

            a = Request("a", story + [13] * n, 48, min_tokens=48, on_token=on_token)
            beside.submit(a)
            assert started.wait(120)
            b2 = generate(beside, key, second, 4)
            assert not a.done.is_set()                     # a decoded all the while
            assert a.done.wait(120) and a.error is None
            assert generate(alone, key, second, 4).completion == b2.completion
            assert beside.retained_state(key) == alone.retained_state(key), f"turn {n}"
            for eng in (beside, alone):
                eng.run(Request("a", story, 1))           # a back to its story
    finally:
        beside.close()
        alone.close()


def test_least_recently_used_sequence_is_evicted_when_streams_run_out() -> None:
    eng = make(2, slots=1)
    try:
        prompts = {k: tokens(eng, turn(f"Tell me about the number {i}.", f"You are agent {k}."))
                   for i, k in enumerate("abc")}
        for k in "abc":
            generate(eng, k, prompts[k], 8)
        assert eng.stats["evicted_seqs"] == 1          # a's sequence made room for c
        again = generate(eng, "c", prompts["c"] + [13], 8)
        # c's own conversation is retained; its last token is fed again
        # with the new one, never a prompt token alone
        assert again.cached == len(prompts["c"]) - 1
        assert eng.describe()["retained_seqs"] == 2
    finally:
        eng.close()


NEXT_TURN = "<|im_end|>\n<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n"


def test_an_evicted_conversation_continues_from_its_kept_cells() -> None:
    """Three agents take turns on two streams, so each conversation is
    evicted before its agent's next call: its cells come back from RAM, and
    every call runs as on a cache that retained them all."""
    eng, roomy = make(2, slots=1, evicted_bytes=64 << 20), make(4, slots=1)
    try:
        convs = {k: tokens(eng, turn(f"Tell me about the number {i}.", f"You are agent {k}."))
                 for i, k in enumerate("abc")}
        for _ in range(3):
            for k in "abc":
                got, want = generate(eng, k, convs[k], 12), generate(roomy, k, convs[k], 12)
                assert (got.cached, got.completion) == (want.cached, want.completion)
                convs[k] += got.completion + tokens(eng, NEXT_TURN)
        assert roomy.stats["evicted_seqs"] == 0
        assert eng.stats["restored_seqs"] == 6          # every call after the first round
        assert eng.stats["prefill_tokens"] == roomy.stats["prefill_tokens"]
        # a's conversation was evicted again for c's last call: its cells wait in RAM
        assert list(eng.streams.evicted) == ["a"] and eng.describe()["evicted_kept"] == 1
        assert 0 < eng.streams.evicted_bytes <= 64 << 20
    finally:
        eng.close()
        roomy.close()


def test_a_conversation_evicted_with_a_stream_copy_queued_into_it_is_kept_whole() -> None:
    """A retained conversation is moved to another stream (a copy llama.cpp
    carries out at the next decode), and a call evicts it before that
    decode: what is kept must be its cells, not what its new stream held
    before."""
    eng, roomy = make(4, evicted_bytes=64 << 20), make(5, slots=4)
    try:
        convs = {k: tokens(eng, turn(f"Tell me about the number {i}.", f"You are agent {k}."))
                 for i, k in enumerate(["k0", "k1", "k2", "k3", "w"])}
        for e in (eng, roomy):
            for k in ["k0", "k1", "k2", "k3", "k2"]:
                generate(e, k, convs[k], 8)
        with eng._lock:   # the engine is idle: it waits on its lock
            streams = eng.streams
            held, other = streams.retained("k2"), streams.retained("k3")
            streams._swap(held, other)   # k2's cells go to k3's stream at the next decode
            moved = streams.retained("k2")
            assert moved is other and moved.id in streams.copies
            moved.last_used = 0.0        # the first to be evicted
            req = Request("w", convs["w"], 8)
            eng.waiting.append(req)
            eng._lock.notify()
        assert req.done.wait(120) and req.error is None
        assert "k2" in eng.streams.evicted and eng.stats["settles"] >= 1
        first = generate(roomy, "k2", convs["k2"], 8).completion
        convs["k2"] += first + tokens(eng, NEXT_TURN)
        got, want = generate(eng, "k2", convs["k2"], 12), generate(roomy, "k2", convs["k2"], 12)
        assert eng.stats["restored_seqs"] == 1
        assert (got.cached, got.completion) == (want.cached, want.completion)
    finally:
        eng.close()
        roomy.close()


def test_running_calls_are_moved_together_only_when_they_would_stay_apart(
        plain: Engine) -> None:
    """llama.cpp decodes a run of consecutive streams in one pass, so calls
    that decode apart from each other cost a pass each a step; moving one is
    a swap of whole streams. Two calls that come back together beside a
    running one need no move (moved as they arrived, one was); two that
    decode apart from it are moved beside it after COMPACT_AFTER steps; one
    alone is moved when it begins to decode. The answers are those computed
    without any move, and the conversations swapped places with are intact."""
    keys = "abcdef"
    eng = make(6)
    try:
        convs = {k: tokens(eng, turn(f"Write a long story about the number {i}.", f"You are agent {k}."))
                 for i, k in enumerate(keys)}
        firsts = {k: generate(eng, k, convs[k], 4).completion for k in keys}   # streams 0-5
        nexts = {k: convs[k] + firsts[k] + tokens(eng, NEXT_TURN) for k in keys}
        want = {k: generate(plain, "ref", nexts[k], 16).completion for k in "bcdef"}
        # long enough answers for COMPACT_AFTER steps
        assert all(len(w) > 10 for w in want.values()), want
        again = nexts["b"] + want["b"] + tokens(eng, NEXT_TURN)
        want_again = generate(plain, "ref", again, 8).completion
        stop = threading.Event()
        long = Request("a", nexts["a"], 400, min_tokens=400, on_token=lambda token: not stop.is_set())
        eng.submit(long)
        deadline = time.monotonic() + 60
        while len(long.completion) < 3:   # a decodes in stream 0
            assert time.monotonic() < deadline and not long.done.is_set()
            time.sleep(0.01)

        def together(ks: str) -> list[Request]:
            reqs = [Request(k, nexts[k], 16) for k in ks]
            with eng._lock:   # admitted in one step
                eng.waiting.extend(reqs)
                eng._lock.notify()
            for r in reqs:
                assert r.done.wait(120) and r.error is None
                assert r.cached >= len(convs[r.key]) and r.completion == want[r.key]
            return reqs

        moved = eng.stats["moved_seqs"]
        together("cb")   # streams 2 and 1, beside a's: one run
        assert eng.stats["moved_seqs"] == moved
        e, f = together("ef")   # streams 4 and 5: apart from a's until moved
        assert eng.stats["moved_seqs"] == moved + 2 and {e._seq.id, f._seq.id} == {1, 2}
        d = generate(eng, "d", nexts["d"], 16)   # stream 3, alone: moved as it decodes
        assert eng.stats["moved_seqs"] == moved + 3 and d._seq.id == 1
        assert d.completion == want["d"]
        b = generate(eng, "b", again, 8)   # b's cells went to 4 or 5, whole
        assert b.cached >= len(nexts["b"]) and b.completion == want_again
        assert not long.done.is_set(), "a's call ended before the others ran beside it"
        stop.set()
        assert long.done.wait(120) and long.finish is Finish.CALLER
    finally:
        eng.close()


def test_the_eviction_that_makes_room_for_a_call_keeps_that_call_s_cells() -> None:
    """Agents served in turn on one stream: the conversation a call needs is
    the one evicted longest ago, and the eviction that frees the stream for
    the call must not push it out of RAM."""
    eng = make(1, evicted_bytes=64 << 20)
    try:
        convs = {k: tokens(eng, turn(f"Tell me about the number {i}.", f"You are agent {k}."))
                 for i, k in enumerate("abc")}
        for k in "abc":
            convs[k] += generate(eng, k, convs[k], 8).completion + tokens(eng, NEXT_TURN)
        assert list(eng.streams.evicted) == ["a", "b"]
        # room for a's, b's and c's cells, but one byte
        eng.streams.evicted_limit = eng.streams.evicted_bytes + len(eng.retained_state("c") or b"") - 1
        again = generate(eng, "a", convs["a"], 8)
        assert eng.stats["restored_seqs"] == 1 and again.cached > len(convs["a"]) // 2
        assert list(eng.streams.evicted) == ["b", "c"]
    finally:
        eng.close()


def test_evicted_cells_are_kept_within_their_bound() -> None:
    eng = make(1, evicted_bytes=256 << 10)   # less than one conversation's cells
    try:
        first = tokens(eng, turn("Tell me about the number 1.", "You are agent a."))
        generate(eng, "a", first, 8)
        generate(eng, "b", tokens(eng, turn("Tell me about the number 2.", "You are agent b.")), 8)
        assert eng.stats["evicted_seqs"] == 1 and not eng.streams.evicted and eng.streams.evicted_bytes == 0
        again = generate(eng, "a", first, 8)
        assert eng.stats["restored_seqs"] == 0 and again.cached < len(first) // 2
    finally:
        eng.close()


def forgotten(eng: Engine, count: int) -> None:
    """Wait until the engine thread has let go of ``count`` agents."""
    deadline = time.monotonic() + 30
    while eng.stats["forgotten"] < count:
        assert time.monotonic() < deadline, f"forgotten: {eng.stats['forgotten']} of {count}"
        time.sleep(0.01)


def test_what_is_kept_for_an_agent_that_ended_is_let_go_of() -> None:
    """An ended agent's cells kept in RAM go at once; its retained stream
    is the next one evicted, before a live agent's older one, and is not
    kept in RAM then."""
    eng = make(2, slots=1, evicted_bytes=64 << 20)
    try:
        convs = {k: tokens(eng, turn(f"Tell me about the number {i}.", f"You are agent {k}."))
                 for i, k in enumerate("abcd")}
        for k in "abc":
            generate(eng, k, convs[k], 8)
        assert list(eng.streams.evicted) == ["a"]              # a's stream made room for c
        eng.forget("a")
        eng.forget("c")
        forgotten(eng, 2)
        assert not eng.streams.evicted and eng.streams.evicted_bytes == 0
        assert eng.streams.retained("c") is None and eng.describe()["retained_seqs"] == 2
        generate(eng, "d", convs["d"], 8)              # LRU alone would evict b's
        assert not eng.streams.evicted                         # c's cells were not kept
        again = generate(eng, "b", convs["b"], 8)
        assert again.cached == len(convs["b"]) - 2 and eng.stats["restored_seqs"] == 0
        eng.forget("nobody")                           # nothing held: nothing counted
        eng.forget("d")
        forgotten(eng, 3)
    finally:
        eng.close()


def test_a_call_cancelled_while_it_waits_takes_no_stream() -> None:
    eng = make(1)
    try:
        prompt = tokens(eng, turn("Tell me about the number 1."))
        generate(eng, "a", prompt, 8)

        def cancelled() -> None:
            raise RuntimeError("injected: the call was cancelled")

        b = eng.run(Request("b", tokens(eng, turn("Name three rivers.")), 8, check=cancelled))
        assert b.finish is Finish.ERROR and "cancelled" in str(b.error) and b._seq is None
        assert eng.stats["evicted_seqs"] == 0 and eng.streams.retained("a") is not None
    finally:
        eng.close()


def test_calls_still_there_when_the_engine_closes_end_with_an_error() -> None:
    eng = make(1)
    running = Request("a", tokens(eng, turn(STORY)), 256, min_tokens=256)
    waiting = Request("b", tokens(eng, turn("Name three rivers.")), 8)
    eng.submit(running)
    started(running)
    eng.submit(waiting)   # the one stream is taken: it waits
    late = Request("c", tokens(eng, turn("Name three rivers.")), 8)
    eng.close()
    eng.submit(late)      # after the close: answered at once, not left waiting
    for req in (running, waiting, late):
        assert req.done.is_set() and req.finish is Finish.ERROR
        assert "shutting down" in str(req.error)


def test_a_grammar_llama_cpp_cannot_parse_fails_its_call_not_the_core(plain: Engine) -> None:
    from llama_cpp import LlamaGrammar

    bad = LlamaGrammar.from_string('root ::= root "a"', verbose=False)   # left recursion
    req = plain.run(Request("g", tokens(plain, turn("Say yes.")), 8, grammar=bad))
    assert req.finish is Finish.ERROR and "grammar" in str(req.error)
    ok = generate(plain, "after", tokens(plain, turn("Say yes.")), 4)
    assert ok.error is None and ok.completion


def test_a_call_running_when_its_agent_is_forgotten_lets_go_when_it_stops() -> None:
    eng = make(2, slots=1)
    try:
        req = Request("a", tokens(eng, turn("Write a long story about a dragon.")), 64,
                      min_tokens=64)
        eng.submit(req)
        deadline = time.monotonic() + 30
        while not req.completion:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        eng.forget("a")
        assert req.done.wait(120) and req.error is None and len(req.completion) == 64
        forgotten(eng, 1)
        assert eng.streams.retained("a") is None and not eng.streams.gone
    finally:
        eng.close()


STORY = "Write a long story about a dragon."


def started(req: Request) -> None:
    deadline = time.monotonic() + 60
    while not req.completion:
        assert time.monotonic() < deadline and not req.done.is_set(), req.error
        time.sleep(0.002)


def test_a_batch_llama_cpp_fails_fails_its_calls_alone(plain: Engine) -> None:
    """Fault injection: the batch of a prompt that arrives while another
    call decodes fails; the decoding call, whose token of that step was
    decoded in a batch of its own, goes on to the tokens it makes alone."""
    alone = generate(plain, "solo", tokens(plain, turn(STORY)), 32, min_tokens=32)
    eng = make(2)
    try:
        a = Request("a", tokens(eng, turn(STORY)), 32, min_tokens=32)
        eng.submit(a)
        started(a)
        real = eng._decode

        def failing(b) -> None:
            if b.n_tokens >= 2:   # a prompt's chunk, never a decoded token
                raise RuntimeError("injected: llama_decode failed")
            real(b)

        eng._decode = failing
        b = eng.run(Request("b", tokens(eng, turn("Name three rivers.")), 8))
        eng._decode = real
        assert b.finish is Finish.ERROR and "injected" in str(b.error)
        assert a.done.wait(120) and a.error is None
        assert a.completion == alone.completion
        assert eng.streams.retained("b") is None            # its cells were unknown: dropped
    finally:
        eng.close()


def fails_beside_a_story(eng: Engine, b: Request, alone: Request) -> None:
    """Run ``b`` (made to fail) beside a story; ``b`` ends with the injected
    error, and the story makes the tokens it makes alone."""
    a = Request("a", tokens(eng, turn(STORY)), 32, min_tokens=32)
    with eng._lock:   # admitted together: they share every step
        eng.waiting.extend([a, b])
        eng._lock.notify()
    assert b.done.wait(120) and b.finish is Finish.ERROR and "injected" in str(b.error)
    assert a.done.wait(120) and a.error is None
    assert a.completion == alone.completion


def test_a_call_whose_token_handler_fails_ends_alone(plain: Engine) -> None:
    alone = generate(plain, "solo", tokens(plain, turn(STORY)), 32, min_tokens=32)
    eng = make(2)
    try:
        def broken(token: int) -> bool:
            raise ValueError("injected: the handler failed")

        b = Request("b", tokens(eng, turn("Name three rivers.")), 8, on_token=broken)
        fails_beside_a_story(eng, b, alone)
    finally:
        eng.close()


def test_a_call_whose_tokens_cannot_be_recorded_ends_alone_and_its_cells_go(plain: Engine) -> None:
    """Fault injection: recording b's decoded tokens into its sequence
    fails; what the sequence says it holds may then disagree with its
    cells, so they are dropped, and the call beside it goes on."""
    alone = generate(plain, "solo", tokens(plain, turn(STORY)), 32, min_tokens=32)
    eng = make(2)
    try:
        real = eng.streams.extend
        b = Request("b", tokens(eng, turn("Name three rivers.")), 8)

        def failing(seq, toks) -> None:
            if b._seq is seq and b.completion:
                raise RuntimeError("injected: the prefix tree failed")
            real(seq, toks)

        eng.streams.extend = failing
        fails_beside_a_story(eng, b, alone)
        assert eng.streams.retained("b") is None            # its cells were unknown: dropped
    finally:
        eng.close()


def test_a_snapshot_resumes_in_another_stream_even_with_a_copy_queued(plain: Engine) -> None:
    eng = make(2, slots=1)
    try:
        story = tokens(eng, turn("Write a long story about a lighthouse keeper.",
                                 "You are a storyteller."))
        baseline = generate(plain, "ref", story, 32).completion

        # suspend the story after a few tokens: its stream is freed
        req = Request("s", story, 32)
        seen: list[int] = []

        def on_token(tok: int) -> bool:
            seen.append(tok)
            if len(seen) == 5:
                req.suspend()
            return True

        req.on_token = on_token
        eng.run(req)
        assert req.finish is Finish.SUSPENDED and req.snapshot is not None
        assert len(baseline) > 5

        # a holds the system prompt; b starts from a copy of it and is
        # cancelled at its first step, before any decode (a call cancelled
        # before it is admitted takes no stream), so the copy is still
        # queued in llama.cpp
        system = tokens(eng, turn("")[:-len("<|im_end|>\n<|im_start|>assistant\n")])
        generate(eng, "a", tokens(eng, turn("What is a lighthouse?")))
        question = tokens(eng, turn("Name three rivers in Europe."))
        checks = [0]

        def cancel() -> None:
            checks[0] += 1
            if checks[0] > 1:   # admitted, then cancelled
                raise RuntimeError("cancelled")

        cancelled = eng.run(Request("b", question, 8, check=cancel))
        assert cancelled.finish is Finish.ERROR and cancelled.cached >= len(system) - 16

        # the snapshot goes into a's stream (least recently used), the copy's source
        resumed = eng.run(Request("s", story, 32, resume=req.snapshot))
        assert resumed.error is None
        assert resumed.completion == baseline
        # b's retained copy still holds the system prompt's true cells
        again = generate(eng, "b", question)
        assert again.completion == generate(plain, "ref", question).completion
    finally:
        eng.close()


def test_a_prompt_longer_than_a_sequence_is_refused(plain: Engine) -> None:
    req = plain.run(Request("long", [1] * 600, 4))
    assert req.finish is Finish.ERROR
    assert "600 tokens" in str(req.error) and "512" in str(req.error)


def test_an_empty_prompt_is_refused(plain: Engine) -> None:
    req = plain.run(Request("empty", [], 4))
    assert req.finish is Finish.ERROR and "prompt is empty" in str(req.error)
    assert generate(plain, "after", tokens(plain, turn("Hello?")), 2).completion  # still serving


def test_greedy_decoding_takes_the_tokens_llama_cpp_s_greedy_sampler_takes(
        plain: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy calls take the likeliest token straight from the logits; a
    chain of llama.cpp's greedy sampler picks the same ones, the ends of
    generation held back alike."""
    # (left alone, the model ends this answer within a few tokens)
    prompt = tokens(plain, turn("What is 2+2? Answer with a number only."))
    assert len(generate(plain, "free", prompt, 48).completion) < 24
    fast = generate(plain, "fast", prompt, 48, min_tokens=48)
    assert len(fast.completion) == 48

    def chain(req: Request) -> object:
        s = plain._internals.LlamaSampler()
        s.add_greedy()
        return s

    monkeypatch.setattr(plain, "_sampler", chain)
    slow = generate(plain, "chain", prompt, 48, min_tokens=48)
    assert slow.completion == fast.completion


def test_many_sequences_decode_together(plain: Engine) -> None:
    eng = make(8)
    try:
        prompts = [tokens(eng, turn(f"Tell me a fact about the number {i}.")) for i in range(8)]
        reqs = [Request(f"k{i}", p, 16) for i, p in enumerate(prompts)]
        for r in reqs:
            eng.submit(r)
        for r in reqs:
            assert r.done.wait(120)
        assert eng.stats["steps"] < sum(len(r.completion) for r in reqs)   # batched
        for r, p in zip(reqs, prompts):
            assert r.completion == generate(plain, "ref", p, 16).completion
    finally:
        eng.close()


def test_engine_survives_concurrent_submitters() -> None:
    eng = make(4)
    try:
        errors: list[BaseException] = []

        def agent(i: int) -> None:
            conv = tokens(eng, turn(f"Agent {i} here. Tell me a story."))
            for _ in range(3):
                r = eng.run(Request(f"c{i}", conv, 8))
                if r.error is not None:
                    errors.append(r.error)
                conv = conv + r.completion + tokens(
                    eng, "<|im_end|>\n<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n")

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors
        assert eng.stats["cached_tokens"] > 0 and eng.stats["shared_tokens"] > 0
    finally:
        eng.close()
