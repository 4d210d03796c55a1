"""aiosctl logs: records of either format read back, filtered by process
and agent, their tracebacks kept with them, and a growing file followed."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aiosd import logs, logview
from aiosd.ctl import main


def line(fmt: str, role: str, msg: str, exc: bool = False, **fields: str) -> str:
    """A record's line(s) as the daemon's own formatters write them."""
    rec = logging.LogRecord("aiosd.x", logging.INFO, __file__, 1, msg, None, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            rec.exc_info = sys.exc_info()
    for key, value in fields.items():
        setattr(rec, key, value)
    formatter = logs.JsonFormatter(role) if fmt == "json" else logs.TextFormatter(role)
    return formatter.format(rec)


def sample(fmt: str) -> list[str]:
    return [
        "a line some library printed before any record",
        line(fmt, "aiosd", "started scheduler (pid 7)"),
        line(fmt, "scheduler", "llm.chat done", event="call.finished", agent="calls-3",
             call_id="c1"),
        line(fmt, "llm:smollm2-135m", "llm.chat failed", exc=True, agent="calls-3", call_id="c1"),
        line(fmt, "llm:other", "llm.chat done", agent="my agent: x-1", call_id="c2"),
        line(fmt, "scheduler", "agent calls-4 exited", agent="calls-4"),
        line(fmt, "memory", "memory.add done", agent="calls10-1"),
    ]


def shown(lines: list[str], process: str | None = None, agent: str | None = None) -> list[str]:
    keep = logview.LogFilter(process, agent)
    return [s.line for text in lines for part in text.split("\n")
            if (s := keep.feed(part)) is not None]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_records_of_either_format_parse_with_their_fields(fmt: str) -> None:
    record = logview.parse(sample(fmt)[2])
    assert record is not None
    assert (record["process"], record["event"], record["agent"], record["call_id"]) == (
        "scheduler", "call.finished", "calls-3", "c1")
    assert record["message"] == "llm.chat done" and record["level"] == "info"
    quoted = logview.parse(sample(fmt)[4])
    assert quoted is not None and quoted["agent"] == "my agent: x-1"
    assert logview.parse(sample(fmt)[0]) is None


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_filters_by_process_and_agent_keep_a_records_traceback(fmt: str) -> None:
    lines = sample(fmt)
    core = shown(lines, process="llm")
    assert [logview.parse(x)["process"] for x in core if logview.parse(x)] == [
        "llm:smollm2-135m", "llm:other"]
    if fmt == "text":   # the traceback's lines went with their record
        assert any("ValueError: boom" in x for x in core)
    assert [logview.parse(x)["message"] for x in shown(lines, process="other")] == ["llm.chat done"]
    calls = [logview.parse(x) for x in shown(lines, agent="calls")]
    assert [r["agent"] for r in calls if r] == ["calls-3", "calls-3", "calls-4"]
    assert [r["agent"] for r in map(logview.parse, shown(lines, agent="calls-3")) if r] == [
        "calls-3", "calls-3"]
    both = [r for r in map(logview.parse, shown(lines, process="scheduler", agent="calls-3")) if r]
    assert [r["message"] for r in both] == ["llm.chat done"]
    assert len(shown(lines)) == sum(len(x.split("\n")) for x in lines)   # no filter: all


def test_aiosctl_logs_filters_a_file_and_prints_json(tmp_path: Path) -> None:
    path = tmp_path / "aiosd.log"
    lines = sample("text")
    path.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    got = runner.invoke(main, ["logs", "--file", str(path), "--agent", "calls-3", "--json"])
    assert got.exit_code == 0, got.output
    rows = [json.loads(x) for x in got.output.splitlines()]
    assert [r["process"] for r in rows if not r.get("continues")] == ["scheduler",
                                                                      "llm:smollm2-135m"]
    assert all(r["agent"] == "calls-3" for r in rows)
    assert any("ValueError: boom" in r["message"] for r in rows if r.get("continues"))
    last = runner.invoke(main, ["logs", "--file", str(path), "--process", "scheduler", "-n", "1"])
    assert last.exit_code == 0 and last.output.splitlines() == [lines[5]]
    missing = runner.invoke(main, ["logs", "--file", str(tmp_path / "none.log")])
    assert missing.exit_code == 1 and "cannot read the log" in missing.output


def test_a_followed_file_gives_lines_written_later_and_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "aiosd.log"
    path.write_text("one\ntw")
    polls = []

    def stopped() -> bool:
        polls.append(1)
        if len(polls) == 1:
            with path.open("a") as f:
                f.write("o\nthree\n")   # the half line ends; another comes
        elif len(polls) == 2:
            path.rename(tmp_path / "aiosd.log.1")   # rotated: a new file
            path.write_text("four\n")
        return len(polls) > 3

    log = logview.LogFile(str(path))
    assert list(log.read(follow=True, poll=0, stopped=stopped)) == ["one", "two", "three", "four"]
    assert list(logview.LogFile(str(tmp_path / "aiosd.log.1")).read()) == ["one", "two", "three"]
    half = tmp_path / "half.log"
    half.write_text("whole\nhalf")
    reader = logview.LogFile(str(half))
    assert list(reader.read(partial=False)) == ["whole"] and reader.offset == len("whole\n")


def test_without_a_daemon_logs_and_events_exit_3(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("AIOS_ENDPOINT", raising=False)
    runner = CliRunner()
    logs_run = runner.invoke(main, ["logs"])
    assert logs_run.exit_code == 3 and "no log at" in logs_run.output
    events_run = runner.invoke(main, ["events", "--wait", "1"])
    assert events_run.exit_code == 3 and "not running" in events_run.output
    # the log aiosctl start left is read without a daemon
    (tmp_path / "aiosd.log").write_text(sample("text")[1] + "\n")
    assert runner.invoke(main, ["logs", "--process", "aiosd"]).output.count("started scheduler") == 1
