"""Logging for the daemon's processes: every process sets it up here, once,
as it starts (:func:`setup`).

A record goes to stderr as one line, tagged with the process's role
(``scheduler``, ``llm:NAME``, ``aiosd`` for the supervisor): text a person
reads, or a JSON object (``kernel.log_format``). Where stderr is systemd's
journal, records go to the journal itself with the same fields as journal
fields, and to stderr while the journal cannot be reached.

A record about a call or an agent names them as fields, never only in its
text, so that ``aiosctl logs --agent`` can find it in either format::

    log.info("...", extra=logs.fields(event="call.finished", agent=a, call_id=c))

Inside :func:`context` (a worker running a task) every record gets the
task's agent and call id without saying so.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import journal

if TYPE_CHECKING:
    from .config import KernelConfig

#: The structured fields a record may carry (``extra=fields(...)``).
FIELDS = ("event", "agent", "call_id")
#: Text lines show them under these names (``call`` is shorter).
TEXT_NAMES = {"event": "event", "agent": "agent", "call_id": "call"}

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "aios_log_context", default=None)
#: how this process logs, as set up (for aiosctl status: where the log goes)
_where: dict[str, Any] = {}


def fields(event: str | None = None, agent: str | None = None,
           call_id: str | None = None) -> dict[str, str]:
    """The ``extra`` of a record about ``event``, ``agent`` and ``call_id``
    (those given)."""
    given = {"event": event, "agent": agent, "call_id": call_id}
    return {k: v for k, v in given.items() if v}


@contextlib.contextmanager
def context(agent: str | None = None, call_id: str | None = None) -> Iterator[None]:
    """Records logged inside carry ``agent`` and ``call_id`` (a record's
    own fields win)."""
    token = _context.set({**(_context.get() or {}), **fields(agent=agent, call_id=call_id)})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Fills a record's fields from :func:`context`."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The structured fields ``record`` carries."""
    return {k: str(v) for k in FIELDS if (v := getattr(record, k, None))}


def quoted(value: str) -> str:
    """A text line's field value: as is, or JSON-quoted where it holds
    what would end it (an agent's name may hold spaces and colons)."""
    if value and not any(c.isspace() or c in ':="\\' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME ROLE[PID] LEVEL LOGGER [FIELD=VALUE ...]: MESSAGE``."""

    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s%(aios_tags)s: "
                         "%(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.aios_tags = "".join(f" {TEXT_NAMES[k]}={quoted(v)}"
                                   for k, v in record_fields(record).items())
        return super().formatMessage(record)


def iso_time(created: float) -> str:
    """``created`` as RFC 3339 UTC with milliseconds."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, process, pid, logger, the record's
    fields (event, agent, call_id) where it has them, message, and exc
    (a traceback) where there is one."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": iso_time(record.created), "level": record.levelname.lower(),
                                "process": self.role, "pid": record.process,
                                "logger": record.name, **record_fields(record),
                                "message": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class JournalHandler(logging.Handler):
    """Records to systemd's journal: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER
    (the role) and AIOS_* fields; through ``fallback`` when the journal
    cannot take them."""

    def __init__(self, role: str, fallback: logging.Handler,
                 sink: journal.Journal | None = None) -> None:
        super().__init__()
        self.role = role
        self.fallback = fallback
        self.sink = sink or journal.Journal()
        self._plain = logging.Formatter()   # (only for a traceback's text)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self._plain.formatException(record.exc_info)
            data = {"MESSAGE": message, "PRIORITY": str(journal.priority(record.levelno)),
                    "SYSLOG_IDENTIFIER": self.role, "AIOS_PROCESS": self.role,
                    "AIOS_LOGGER": record.name, "CODE_FILE": record.pathname,
                    "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName or ""}
            data.update({f"AIOS_{k.upper()}": v for k, v in record_fields(record).items()})
        except Exception:   # a record that cannot be formatted, as logging's own handlers do
            self.handleError(record)
            return
        try:
            self.sink.send(data)
        except OSError:
            self.fallback.handle(record)

    def close(self) -> None:
        self.sink.close()
        super().close()


def stderr_file() -> str | None:
    """The file stderr is written to, if it is a regular file (aiosctl start
    and the tests send it to one), else None (a terminal, a pipe, the journal)."""
    try:
        if not stat.S_ISREG(os.fstat(2).st_mode):
            return None
        return os.readlink("/proc/self/fd/2")
    except OSError:
        return None


def setup(kernel: KernelConfig, role: str) -> None:
    """Log records of ``kernel.log_level`` and above, as ``role``, in
    ``kernel.log_format`` ("text" or "json"): to the journal under
    systemd, else to stderr."""
    level, fmt = kernel.log_level, kernel.log_format
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter(role) if fmt == "json" else TextFormatter(role))
    handler: logging.Handler = stream
    to_journal = journal.stderr_is_journal()
    if to_journal:
        handler = JournalHandler(role, stream)
    for h in (stream, handler):
        h.addFilter(ContextFilter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler],
                        force=True)
    _where.clear()
    _where.update(format=fmt, journal=to_journal, file=None if to_journal else stderr_file())


def where() -> dict[str, Any]:
    """Where this process's records go: {"format", "journal", "file"}."""
    return dict(_where)
