"""One benchmark agent process: runs the workload against one system and
prints its timings as JSON on its last line.

    python -m benchmarks.agent aiosd|direct|shared|gateway INDEX [URL [KEY]]
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from . import workload


# Every system generates exactly MAX_TOKENS a turn: aiosd holds back the end
# of generation with min_tokens; direct and shared calls forbid the model's
# end-of-generation tokens with a logit bias (min_tokens of llama-cpp-python's
# server covers only one of them).


def end_tokens(llm: Any) -> dict[int, float]:
    """A logit bias that forbids ``llm``'s end-of-generation tokens."""
    from aiosd.llm.engine import end_of_generation

    return {t: -100.0 for t in end_of_generation(llm._model.vocab)}


def chat_aiosd(i: int, name: str | None = None) -> Any:
    import libaios

    client = libaios.connect(name=name or f"bench{i}", timeout=3600)

    def chat(messages: list[dict[str, str]]) -> tuple[str, int]:
        r = client.chat(messages, max_tokens=workload.MAX_TOKENS, min_tokens=workload.MAX_TOKENS,
                        temperature=0.0)
        return r.text, r.usage["completion_tokens"]

    return chat


def chat_direct(i: int) -> Any:
    from llama_cpp import Llama

    from aiosd.llm.llamacpp import embedded_model_path

    llm = Llama(str(embedded_model_path()), n_ctx=2048, verbose=False)
    bias = end_tokens(llm)

    def chat(messages: list[dict[str, str]]) -> tuple[str, int]:
        r = llm.create_chat_completion(messages, max_tokens=workload.MAX_TOKENS, temperature=0.0,
                                       logit_bias=bias)
        return r["choices"][0]["message"]["content"] or "", r["usage"]["completion_tokens"]

    return chat


def chat_shared(i: int, url: str) -> Any:
    import openai
    from llama_cpp import Llama

    from aiosd.llm.llamacpp import embedded_model_path

    client = openai.OpenAI(base_url=url, api_key="unused", timeout=3600, max_retries=0)
    vocab = Llama(str(embedded_model_path()), n_ctx=256, verbose=False, vocab_only=True)
    bias = {str(t): b for t, b in end_tokens(vocab).items()}

    def chat(messages: list[dict[str, str]]) -> tuple[str, int]:
        r = client.chat.completions.create(model="smollm2", messages=messages,
                                           max_tokens=workload.MAX_TOKENS, temperature=0.0,
                                           logit_bias=bias)
        return r.choices[0].message.content or "", r.usage.completion_tokens

    return chat


def chat_gateway(i: int, url: str, key: str) -> Any:
    """Through aiosd's HTTP gateway, with the openai package, as the agent
    of its own key; min_tokens (an extension the gateway takes) makes every
    turn as long as aiosd's."""
    import openai

    from aiosd.config import Config

    client = openai.OpenAI(base_url=url, api_key=key, timeout=3600, max_retries=0)

    def chat(messages: list[dict[str, str]]) -> tuple[str, int]:
        r = client.chat.completions.create(model=Config().llm.default, messages=messages,
                                           max_tokens=workload.MAX_TOKENS, temperature=0.0,
                                           extra_body={"min_tokens": workload.MAX_TOKENS})
        return r.choices[0].message.content or "", r.usage.completion_tokens

    return chat


def flood(i: int, threads: int = 6, calls: int = 10) -> None:
    """An agent that floods the kernel: several connections, calls back to back."""
    import threading

    def loop() -> None:
        chat = chat_aiosd(i, name="flood")
        for _ in range(calls):
            chat(workload.first_messages(i))

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()


def main() -> None:
    system, i = sys.argv[1], int(sys.argv[2])
    if system == "flood":
        flood(i)
        return
    start = time.time()
    # (how long this process took to get ready: its interpreter, its client's
    # imports, its client; counted in the makespan like everything else)
    import psutil

    born = psutil.Process().create_time()
    chat = {"aiosd": lambda: chat_aiosd(i), "direct": lambda: chat_direct(i),
            "shared": lambda: chat_shared(i, sys.argv[3]),
            "gateway": lambda: chat_gateway(i, sys.argv[3], sys.argv[4 + i])}[system]()
    ready_s = time.time() - born
    messages = workload.first_messages(i)
    calls, generated, failures = [], 0, 0
    for turn in range(workload.TURNS):
        t0 = time.time()
        try:
            text, n = chat(messages)
        except Exception as exc:  # a failed call is counted, and the agent goes on
            print(f"call failed: {exc}", file=sys.stderr)
            failures += 1
            text, n = "", 0
        calls.append(time.time() - t0)
        generated += n
        messages += [{"role": "assistant", "content": text}, workload.tool_result(i, turn)]
    print(json.dumps({"start": start, "end": time.time(), "calls": calls, "generated": generated,
                      "failures": failures, "ready_s": ready_s}))


if __name__ == "__main__":
    main()
