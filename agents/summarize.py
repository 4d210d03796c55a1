"""A summarise-then-answer agent: it first has the model write short notes
on the topic, then answers the question from those notes alone.

    aiosctl run agents/summarize.py --task "Why is the sky blue?"
"""

import argparse

import libaios
from libaios.agent import AGENT_TIMEOUT, run, text_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="Why is the sky blue?")
    args = parser.parse_args()

    with libaios.connect(timeout=AGENT_TIMEOUT) as aios:
        notes = text_of(aios.chat(
            [
                {"role": "system", "content": "You write short factual notes."},
                {"role": "user", "content": f"Write three short notes about: {args.task}"},
            ],
            max_tokens=64,
        ), "the notes")
        print(f"notes: {notes}")
        summary = text_of(aios.chat(f"Summarise these notes in one sentence:\n{notes}",
                                    max_tokens=40), "the summary")
        print(f"summary: {summary}")
        answer = text_of(aios.chat(
            [
                {"role": "system", "content": f"Answer using only these notes: {summary}"},
                {"role": "user", "content": args.task},
            ],
            max_tokens=48,
        ), "the answer")
        print(f"answer: {answer}")


if __name__ == "__main__":
    run(main)
