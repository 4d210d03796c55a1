"""A multi-turn conversational agent: it keeps a conversation with the
kernel's model, one turn building on the last.

    aiosctl run agents/chat.py --task "Plan a weekend trip to the mountains."
"""

import argparse

import libaios
from libaios.agent import AGENT_TIMEOUT, run, text_of

FOLLOW_UPS = [
    "What is the first step?",
    "What could go wrong, and how do I avoid it?",
    "Sum it up in one sentence.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="Help me plan my week.")
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()

    messages = [
        {"role": "system", "content": "You are a concise, practical assistant."},
        {"role": "user", "content": args.task},
    ]
    with libaios.connect(timeout=AGENT_TIMEOUT) as aios:
        for turn in range(args.turns):
            # The first turn streams its tokens as they are generated.
            if turn == 0:
                stream = aios.chat(messages, max_tokens=48, stream=True)
                print("assistant: ", end="", flush=True)
                for piece in stream:
                    print(piece, end="", flush=True)
                print()
                text = text_of(stream.result, f"turn {turn + 1}")
            else:
                text = text_of(aios.chat(messages, max_tokens=48), f"turn {turn + 1}")
                print(f"assistant: {text}")
            messages.append({"role": "assistant", "content": text})
            if turn + 1 < args.turns:
                question = FOLLOW_UPS[turn % len(FOLLOW_UPS)]
                print(f"user: {question}")
                messages.append({"role": "user", "content": question})


if __name__ == "__main__":
    run(main)
