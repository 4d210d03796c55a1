"""A Reflexion agent: it tries a coding task, checks the attempt by running
the tests in the kernel's sandbox, and when they fail writes a reflection on
what went wrong into its memory. Each new try recalls the reflections on the
task by a memory search.

    aiosctl run agents/reflexion.py --task "Write is_even(n) that tells whether n is even." \\
        --tests "assert is_even(4) and not is_even(3)"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import libaios
from libaios.agent import AGENT_TIMEOUT, AgentFailed, run, text_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coder import test_code, write_code  # noqa: E402  (the coding agent's own steps)


def reflect(aios: Any, task: str, code: str, output: str) -> str:
    reply = aios.chat(
        [{"role": "system", "content": "You review failed code in one sentence."},
         {"role": "user", "content": f"Task: {task}\nCode:\n{code}\nTest output:\n{output}\n"
                                     "In one sentence, what should the next attempt do differently?"}],
        max_tokens=48)
    return text_of(reply, "a reflection")


def solve(aios: Any, task: str, tests: str, trials: int = 3, log: Any = print) -> dict[str, Any]:
    attempts = []
    for trial in range(1, trials + 1):
        recalled = aios.memory.search(task, filters={"task": task, "kind": "reflection"}, limit=3)
        hints = [item["text"] for item in recalled]
        code = write_code(aios, task, hints)
        checked = test_code(aios, code, tests)
        log(f"trial {trial}: {'PASS' if checked['passed'] else 'FAIL'} "
            f"(recalled {len(hints)} reflections)")
        attempts.append({"code": code, "recalled": len(hints), **checked})
        if checked["passed"]:
            break
        lesson = reflect(aios, task, code, checked["output"])
        aios.memory.add(lesson, {"task": task, "kind": "reflection", "trial": trial})
        log(f"  reflection: {lesson}")
    return {"passed": attempts[-1]["passed"], "attempts": attempts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="Write a Python function is_even(n) that returns True "
                                          "when n is even.")
    parser.add_argument("--tests", default="assert is_even(4)\nassert not is_even(3)")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    if args.trials < 1:
        raise AgentFailed("--trials must be at least 1")
    with libaios.connect(timeout=AGENT_TIMEOUT) as aios:
        out = solve(aios, args.task, args.tests, args.trials)
    print(f"tests: {'PASS' if out['passed'] else 'FAIL'} after {len(out['attempts'])} trials")


if __name__ == "__main__":
    run(main)
