"""A coding agent in the shape of HumanEval: it writes a Python function for a
task statement, runs the given tests on it in the kernel's Python sandbox,
and reports whether they pass.

    aiosctl run agents/coder.py --task "Write add(a, b) that returns a + b." \\
        --tests "assert add(2, 3) == 5"
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

import libaios
from libaios.agent import AGENT_TIMEOUT, AgentFailed, run, text_of

SYSTEM = "You write short, correct Python functions."


def code_in(text: str) -> str:
    """The Python code in a model's answer: its first fenced block, else
    everything from its first ``def`` on."""
    fenced = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", text, re.S)
    if fenced:
        return fenced.group(1).strip()
    at = text.find("def ")
    return text[at:].strip() if at >= 0 else ""


def write_code(aios: Any, task: str, hints: Sequence[str] = ()) -> str:
    """Ask the model for code solving ``task`` (with ``hints`` from earlier tries)."""
    prompt = f"Task: {task}\nAnswer with the whole function in a ```python block."
    if hints:
        prompt += "\nLessons from earlier attempts:\n" + "\n".join(f"- {h}" for h in hints)
    reply = aios.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                      max_tokens=200)
    code = code_in(text_of(reply, "the code"))
    if not code:
        raise AgentFailed(f"the model's answer holds no Python function: {reply.text[:120]!r}")
    return code


def test_code(aios: Any, code: str, tests: str) -> dict[str, Any]:
    """Run ``code`` and then ``tests`` in the sandbox: passed, and what it printed."""
    program = f"{code}\n\n{tests}\nprint('all tests passed')\n"
    try:
        result = aios.tools.call("python", {"code": program})
    except libaios.AIOSError as exc:
        return {"passed": False, "output": f"error: {exc.message}"}
    output = (result.get("stdout", "") + result.get("stderr", "")).strip()
    passed = result.get("exit_code") == 0 and "all tests passed" in result.get("stdout", "")
    return {"passed": passed, "output": output[-400:]}


def solve(aios: Any, task: str, tests: str, log: Any = print) -> dict[str, Any]:
    code = write_code(aios, task)
    log(f"code:\n{code}")
    return {"code": code, **test_code(aios, code, tests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="Write a Python function add(a, b) that returns a + b.")
    parser.add_argument("--tests", default="assert add(2, 3) == 5\nassert add(-1, 1) == 0")
    args = parser.parse_args()
    with libaios.connect(timeout=AGENT_TIMEOUT) as aios:
        out = solve(aios, args.task, args.tests)
    print(f"tests: {'PASS' if out['passed'] else 'FAIL'}")
    if not out["passed"]:
        print(out["output"])


if __name__ == "__main__":
    run(main)
