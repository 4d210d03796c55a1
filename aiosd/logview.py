"""Reading the daemon's log for ``aiosctl logs``: lines of either format
(``kernel.log_format``), kept or left out by process and agent, and
followed as the file grows.

A record is a line aiosd's logging wrote (see aiosd.logs) and the lines
after it that are not records themselves (a traceback, what a library
printed): those go with the record they follow.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .logs import TEXT_NAMES

#: a text record: TIME ROLE[PID] LEVEL LOGGER [FIELD=VALUE ...]: MESSAGE
TEXT_LINE = re.compile(
    r"^(?P<ts>\S+ \S+) (?P<process>\S+)\[(?P<pid>\d+)\] (?P<level>[A-Z]+) (?P<logger>\S+)"
    r'(?P<tags>(?: \w+=(?:"(?:[^"\\]|\\.)*"|[^\s:"]+))*): (?P<message>.*)$')
TAG = re.compile(r' (\w+)=("(?:[^"\\]|\\.)*"|[^\s:"]+)')
FIELD_OF_TAG = {text: name for name, text in TEXT_NAMES.items()}


def parse(line: str) -> dict[str, Any] | None:
    """The fields of a record's line (either format), or None for a line
    that is not a record's."""
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            return None
        return data if isinstance(data, dict) and "process" in data else None
    match = TEXT_LINE.match(line)
    if match is None:
        return None
    record: dict[str, Any] = {
        "ts": match["ts"], "level": match["level"].lower(), "process": match["process"],
        "pid": int(match["pid"]), "logger": match["logger"]}
    for key, value in TAG.findall(match["tags"]):
        record[FIELD_OF_TAG.get(key, key)] = json.loads(value) if value.startswith('"') else value
    record["message"] = match["message"]
    return record


def process_matches(wanted: str, process: str) -> bool:
    """Whether ``--process wanted`` takes a record of ``process``: the role
    itself ("llm:a"), its kind ("llm": every core) or its name ("a")."""
    kind, _, name = process.partition(":")
    return wanted in (process, kind, name)


def agent_matches(wanted: str, agent: str) -> bool:
    """Whether ``--agent wanted`` takes a record of agent id ``agent``: the
    id itself ("calls-3") or the name of its agent ("calls": every run)."""
    name, _, number = agent.rpartition("-")
    return wanted == agent or (wanted == name and number.isdigit())


@dataclass
class Shown:
    """A line to show: as written, and its fields (a record's, or for a
    line that goes with one, its message and the record's process and agent)."""

    line: str
    fields: dict[str, Any]


class LogFilter:
    """Decides, line by line, what ``aiosctl logs`` shows."""

    def __init__(self, process: str | None = None, agent: str | None = None) -> None:
        self.process = process
        self.agent = agent
        self._current: dict[str, Any] | None = None
        self._keep = self._keeps(None)

    def _keeps(self, record: dict[str, Any] | None) -> bool:
        if self.process is None and self.agent is None:
            return True
        if record is None:
            return False
        if self.process is not None and not process_matches(self.process,
                                                            str(record.get("process", ""))):
            return False
        return self.agent is None or agent_matches(self.agent, str(record.get("agent") or ""))

    def feed(self, line: str) -> Shown | None:
        """``line`` as shown, or None if it is left out."""
        record = parse(line)
        if record is not None:
            self._current, self._keep = record, self._keeps(record)
            return Shown(line, record) if self._keep else None
        if not self._keep:
            return None
        more: dict[str, Any] = {"message": line, "continues": True}
        for key in ("process", "agent"):
            if self._current is not None and self._current.get(key):
                more[key] = self._current[key]
        return Shown(line, more)


class LogFile:
    """A log file read line by line from ``offset`` (bytes), which moves
    past each whole line read."""

    def __init__(self, path: str, offset: int = 0) -> None:
        self.path = path
        self.offset = offset

    def read(self, follow: bool = False, partial: bool = True, poll: float = 0.25,
             stopped: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """The lines from the offset on; with ``follow``, then those written
        later, until ``stopped()`` (asked every ``poll`` seconds while
        nothing comes). A file truncated or replaced (rotated) meanwhile is
        read again from its start. Without ``follow``, a last line not
        ended yet is given too if ``partial`` (the offset stays before it)."""
        f = open(self.path, "rb")   # noqa: SIM115 (reopened when the file is replaced)
        try:
            f.seek(self.offset)
            pending = b""
            while True:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith(b"\n"):
                        self.offset += len(pending)
                        yield pending[:-1].decode("utf-8", errors="replace")
                        pending = b""
                    continue
                if not follow:
                    if pending and partial:
                        yield pending.decode("utf-8", errors="replace")
                    return
                if stopped():
                    return
                time.sleep(poll)   # (a file gives no event to wait for)
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    continue   # being replaced
                if st.st_ino != os.fstat(f.fileno()).st_ino or st.st_size < self.offset:
                    f.close()
                    f = open(self.path, "rb")   # noqa: SIM115
                    self.offset, pending = 0, b""
        finally:
            f.close()
