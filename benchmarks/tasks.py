"""Task quality under concurrency (the AIOS paper's RQ1).

A fixed set of tasks runs twice: one agent at a time directly on
llama-cpp-python (no kernel), and all agents at once through aiosd. Word
problems go to the ReAct agent with the calculator; coding tasks with tests go
to the coding agent, which runs them in the Python sandbox. The agents are
the ones in ``agents/``, unchanged: directly, their system calls are served
in this process by the same prompt rendering, grammar and tools the kernel
uses. Greedy decoding, so the two runs should give the same answers; the
benchmark prints each run's success rate and how many answers are identical,
and names any that differ.

    python -m benchmarks.tasks          (make bench-tasks)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .run import RESULTS, ROOT, wait_ready

AGENTS = Path(__file__).resolve().parent.parent / "agents"
#: the tools both runs offer the ReAct agent (the file tools need a kernel)
REACT_TOOLS = ("calculator", "python")
REACT_STEPS = 3

WORD_PROBLEMS = [
    ("A box holds 12 eggs. How many eggs are in 7 boxes?", 84),
    ("A train travels 60 km each hour. How far does it go in 5 hours?", 300),
    ("Tom has 45 apples and gives away 17. How many are left?", 28),
    ("A shelf has 8 rows of 15 books. How many books are there?", 120),
    ("What is 17 times 23?", 391),
    ("A ticket costs 9 dollars. How much do 14 tickets cost?", 126),
    ("There are 365 days in a year. How many days are in 4 years?", 1460),
    ("A pizza has 8 slices. How many slices do 13 pizzas have?", 104),
    ("Anna saves 25 dollars a week. How much has she saved after 12 weeks?", 300),
    ("A farmer has 96 eggs and packs them 6 to a box. How many boxes does he fill?", 16),
    ("What is 1000 minus 358?", 642),
    ("A class of 28 pupils shares 112 pencils equally. How many does each get?", 4),
]

CODING = [
    ("Write a Python function add(a, b) that returns a + b.",
     "assert add(2, 3) == 5\nassert add(-1, 1) == 0"),
    ("Write a Python function square(n) that returns n * n.",
     "assert square(4) == 16\nassert square(-3) == 9"),
    ("Write a Python function is_even(n) that returns True when n is even.",
     "assert is_even(4)\nassert not is_even(7)"),
    ("Write a Python function maximum(xs) that returns the largest number in the list xs.",
     "assert maximum([3, 9, 2]) == 9\nassert maximum([-5, -2]) == -2"),
    ("Write a Python function reverse(s) that returns the string s reversed.",
     "assert reverse('abc') == 'cba'\nassert reverse('') == ''"),
    ("Write a Python function count_vowels(s) that returns how many vowels (aeiou) s has.",
     "assert count_vowels('banana') == 3\nassert count_vowels('xyz') == 0"),
    ("Write a Python function factorial(n) that returns n factorial.",
     "assert factorial(5) == 120\nassert factorial(0) == 1"),
    ("Write a Python function total(xs) that returns the sum of the list xs.",
     "assert total([1, 2, 3]) == 6\nassert total([]) == 0"),
    ("Write a Python function is_palindrome(s) that returns True when s reads the same backwards.",
     "assert is_palindrome('level')\nassert not is_palindrome('abc')"),
    ("Write a Python function fizz(n) that returns 'Fizz' if n is divisible by 3, else str(n).",
     "assert fizz(9) == 'Fizz'\nassert fizz(4) == '4'"),
]


def load_agent(name: str) -> Any:
    """An agent of ``agents/`` as a module (its ``solve`` is the agent's loop)."""
    sys.path.insert(0, str(AGENTS))
    spec = importlib.util.spec_from_file_location(f"agent_{name}", AGENTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _DirectTools:
    """The kernel's calculator and Python sandbox, served in this process by
    the tool manager's own service (arguments checked against each tool's
    schema, results and errors as through the kernel)."""

    def __init__(self) -> None:
        from aiosd.config import ToolsConfig
        from aiosd.tools import builtins
        from aiosd.tools.registry import Registry
        from aiosd.tools.service import ToolService

        registry = Registry()
        registry.add_all([builtins.calculator(), builtins.python(ToolsConfig())])
        self._service = ToolService(registry)

    def _task(self, mtype: Any, body: dict[str, Any]) -> Any:
        from aiosd.worker import Task

        return Task(call_id="direct", type=mtype, body=body, deadline=None,
                    caller={"agent": "direct", "name": "direct"}, namespace="direct")

    def list(self) -> list[dict[str, Any]]:
        from libaios.protocol import MsgType

        return self._service.list(self._task(MsgType.TOOL_LIST, {}))["tools"]

    def call(self, name: str, arguments: dict[str, Any]) -> Any:
        from libaios.protocol import MsgType

        body = {"name": name, "arguments": arguments}
        return self._service.call(self._task(MsgType.TOOL_CALL, body))["result"]


class DirectOS:
    """What an agent's ``aios`` offers, served directly by llama-cpp-python
    with the kernel's prompt rendering, fitted grammar and answer parsing."""

    def __init__(self) -> None:
        from llama_cpp import Llama

        from aiosd.llm.llamacpp import embedded_model_path

        self.llm = Llama(str(embedded_model_path()), n_ctx=2048, verbose=False)
        self.tools = _DirectTools()

    def chat(self, messages: list[dict[str, Any]] | str, **options: Any) -> Any:
        from llama_cpp import LlamaGrammar

        from aiosd import chat as request
        from aiosd.llm import structured
        from libaios.client import ChatResult, chat_body

        req = request.parse(chat_body(messages, **options))
        count = lambda s: len(self.llm.tokenize(s.encode(), add_bos=False))  # noqa: E731
        schema = structured.fitted_schema(req, req.max_tokens, count)
        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema else None
        out = self.llm.create_chat_completion(structured.prompt_messages(req), max_tokens=req.max_tokens,
                                              temperature=0.0, grammar=grammar, stop=req.stop or None)
        choice = out["choices"][0]
        finish = "length" if choice["finish_reason"] == "length" else "stop"
        fields = structured.parse_answer(req, choice["message"]["content"] or "", finish,
                                         budget=req.max_tokens)
        return ChatResult.from_body({**fields, "usage": out["usage"]})


def run_task(aios: Any, kind: str, task: str, check: Any) -> dict[str, Any]:
    """One task by its agent: the answer, whether it is right, or the error."""
    from libaios.agent import AgentFailed
    from libaios.errors import AIOSError

    quiet = lambda *_: None  # noqa: E731
    try:
        if kind == "react":
            out = load_agent("react").solve(aios, task, steps=REACT_STEPS, log=quiet,
                                            tool_names=REACT_TOOLS)
            answer = out["answer"]
            ok = answer is not None and str(check) in re.sub(r"[,\s]", "", answer)
            trace = [s["call"] + json.dumps(s["arguments"]) for s in out["steps"]]
            return {"answer": answer, "trace": trace, "ok": ok}
        out = load_agent("coder").solve(aios, task, check, log=quiet)
        return {"answer": out["code"], "trace": [], "ok": out["passed"]}
    except (AgentFailed, AIOSError) as exc:
        return {"answer": None, "trace": [], "ok": False, "error": str(exc)}


def all_tasks() -> list[tuple[str, str, Any]]:
    return ([("react", t, n) for t, n in WORD_PROBLEMS] + [("coder", t, tests) for t, tests in CODING])


def run_direct(tasks: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    aios = DirectOS()
    results = []
    for i, (kind, task, check) in enumerate(tasks, 1):
        results.append(run_task(aios, kind, task, check))
        print(f"\r  direct: {i}/{len(tasks)} tasks", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return results


def run_aiosd(tasks: list[tuple[str, str, Any]], env: dict[str, str]) -> list[dict[str, Any]]:
    import libaios

    results: list[dict[str, Any] | None] = [None] * len(tasks)
    done = [0]

    def agent(i: int) -> None:
        kind, task, check = tasks[i]
        with libaios.Client(name=f"task{i}", timeout=1800) as aios:
            results[i] = run_task(aios, kind, task, check)
        done[0] += 1

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        print(f"\r  aiosd: {done[0]}/{len(tasks)} tasks", end="", flush=True, file=sys.stderr)
        time.sleep(0.5)
    print(f"\r  aiosd: {done[0]}/{len(tasks)} tasks", file=sys.stderr)
    return [r for r in results if r is not None]


def start_daemon() -> tuple[subprocess.Popen, dict[str, str]]:
    """aiosd on its defaults, on a runtime directory of its own."""
    tmp = Path(tempfile.mkdtemp(prefix="aios-tasks-"))
    env = dict(os.environ, AIOS_RUNTIME_DIR=str(tmp / "run"), AIOS_DATA_DIR=str(tmp / "data"))
    daemon = subprocess.Popen([sys.executable, "-m", "aiosd"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "aiosd.log", "wb"), cwd=ROOT)
    wait_ready(env)
    return daemon, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    tasks = all_tasks()
    print(f"{len(tasks)} tasks: {len(WORD_PROBLEMS)} word problems (react + calculator), "
          f"{len(CODING)} coding tasks (coder + sandbox)", file=sys.stderr)
    t0 = time.time()
    direct = run_direct(tasks)
    t_direct = time.time() - t0
    daemon, env = start_daemon()
    try:
        os.environ["AIOS_RUNTIME_DIR"] = env["AIOS_RUNTIME_DIR"]
        t0 = time.time()
        kernel = run_aiosd(tasks, env)
        t_kernel = time.time() - t0
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    same = [d["answer"] == k["answer"] and d["trace"] == k["trace"] for d, k in zip(direct, kernel)]
    report = {
        "tasks": len(tasks),
        "direct": {"ok": sum(r["ok"] for r in direct), "seconds": round(t_direct, 1)},
        "aiosd": {"ok": sum(r["ok"] for r in kernel), "seconds": round(t_kernel, 1)},
        "identical": sum(same),
        "differing": [{"task": tasks[i][1], "direct": direct[i], "aiosd": kernel[i]}
                      for i, s in enumerate(same) if not s],
    }
    for name in ("direct", "aiosd"):
        r = report[name]
        print(f"{name:>7}: {r['ok']}/{len(tasks)} tasks solved ({100 * r['ok'] / len(tasks):.0f} %) "
              f"in {r['seconds']} s")
    print(f"identical answers: {report['identical']}/{len(tasks)}")
    for d in report["differing"]:
        print(f"  differs: {d['task']}\n    direct: {d['direct']}\n    aiosd:  {d['aiosd']}")
    path = RESULTS.with_name("tasks.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
