"""Test agent: makes N chat calls and prints, as its last line, the JSON of
what it made (usage totals and its identity), for the test to compare with
the kernel's accounting."""

import argparse
import json

import libaios

parser = argparse.ArgumentParser()
parser.add_argument("--calls", type=int, default=3)
parser.add_argument("--max-tokens", type=int, default=12)
parser.add_argument("--task", default="Count to five.")
args = parser.parse_args()

totals = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}
with libaios.connect() as aios:
    me = aios.whoami()
    messages = [{"role": "user", "content": args.task}]
    for _ in range(args.calls):
        reply = aios.chat(messages, max_tokens=args.max_tokens)
        assert reply.usage["completion_tokens"] <= args.max_tokens
        totals["prompt_tokens"] += reply.usage["prompt_tokens"]
        totals["completion_tokens"] += reply.usage["completion_tokens"]
        totals["calls"] += 1
        messages += [{"role": "assistant", "content": reply.text},
                     {"role": "user", "content": "Go on."}]
print(json.dumps({"totals": totals, "whoami": me}))
