"""Every example agent runs to completion through `aiosctl run` on a real
aiosd with the embedded model, and `aiosctl demo` runs them all at once.
The model is tiny: these check what the agents did (steps taken, a tool ran,
a file written, a memory item recalled), not how clever the answers are."""

from __future__ import annotations

import json
import re

import pytest

from ..conftest import AGENTS, Daemon

pytestmark = pytest.mark.integration


def run_agent(daemon: Daemon, name: str, *args: str) -> str:
    result = daemon.ctl("run", str(AGENTS / name), *args, timeout=400)
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def test_react_takes_steps_with_the_kernels_tools(daemon: Daemon) -> None:
    out = run_agent(daemon, "react.py", "--task", "What is 17 times 23?", "--steps", "3")
    steps = re.findall(r"^step \d+: .+\n  action: (\w+)\(", out, re.M)
    assert steps, out
    assert set(steps) <= {"calculator", "python", "read_file", "write_file", "list_files",
                          "final_answer"}
    assert "final answer:" in out or "no final answer within 3 steps" in out


def test_coder_runs_the_tests_in_the_sandbox(daemon: Daemon) -> None:
    out = run_agent(daemon, "coder.py", "--task", "Write a Python function add(a, b) that returns "
                    "a + b.", "--tests", "assert add(2, 3) == 5")
    assert "code:" in out and re.search(r"^tests: (PASS|FAIL)$", out, re.M), out


def test_reflexion_reflects_into_memory_and_recalls_it(daemon: Daemon) -> None:
    # tests no function can pass: every trial fails, so every trial reflects
    out = run_agent(daemon, "reflexion.py", "--task", "Write a Python function answer() that "
                    "returns 42.", "--tests", "assert False, 'never passes'", "--trials", "2")
    trials = re.findall(r"^trial (\d): FAIL \(recalled (\d+) reflections\)$", out, re.M)
    assert [t for t, _ in trials] == ["1", "2"], out
    assert int(trials[1][1]) >= 1, "the second trial recalled no reflection"
    assert out.count("reflection: ") == 2
    assert "tests: FAIL after 2 trials" in out


def test_planner_carries_out_its_tool_call(daemon: Daemon) -> None:
    out = run_agent(daemon, "planner.py", "--task", "Paint a room.")
    path = re.search(r"-> plan saved to (\S+)$", out, re.M)
    assert path, out
    with daemon.client(operator=True) as c:   # (an agent's storage is its name's)
        text = c.storage.read_file(path.group(1), agent="planner").decode()
    assert "[started]" in text


def test_researcher_calls_the_calculator_and_saves_a_report(daemon: Daemon) -> None:
    out = run_agent(daemon, "researcher.py", "--task", "How many legs do 3 spiders have?")
    assert re.search(r"^tool: calculator\(", out, re.M), out
    assert re.search(r"^report saved to reports/\S+ \((\d+) notes\)$", out, re.M), out


def test_chat_and_summarize_answer(daemon: Daemon) -> None:
    out = run_agent(daemon, "chat.py", "--task", "Help me learn to juggle.", "--turns", "2")
    assert out.count("assistant: ") == 2
    out = run_agent(daemon, "summarize.py", "--task", "Why is ice slippery?")
    assert "notes:" in out and "summary:" in out and "answer:" in out


def test_demo_runs_every_agent_kind(daemon: Daemon) -> None:
    result = daemon.ctl("demo", "--json", timeout=900)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["agents"]
    assert len(rows) == 8
    kinds = {r["name"].rsplit("-", 1)[0] for r in rows}
    assert {"react", "coder", "reflexion", "planner", "researcher", "chat", "summarize"} <= kinds
    assert all(r["exit_code"] == 0 and r["calls"] > 0 for r in rows), rows
