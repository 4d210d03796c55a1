"""Log records in text and JSON, their agent and call fields, and the
journal's native protocol (over a socket of the test's own)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiosd import journal, logs


def record(msg: str = "hello %s", *args: object, **extra: str) -> logging.LogRecord:
    rec = logging.LogRecord("aiosd.test", logging.WARNING, __file__, 7, msg, args or ("there",),
                            None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_carry_the_fields_a_record_has() -> None:
    line = json.loads(logs.JsonFormatter("scheduler").format(
        record(**logs.fields(event="call.finished", agent="calls-3", call_id="ab12"))))
    assert line["process"] == "scheduler" and line["level"] == "warning"
    assert (line["event"], line["agent"], line["call_id"]) == ("call.finished", "calls-3", "ab12")
    assert line["message"] == "hello there" and line["ts"].endswith("Z")
    bare = json.loads(logs.JsonFormatter("memory").format(record()))
    assert not {"event", "agent", "call_id"} & set(bare)


def test_text_lines_tag_the_fields_and_quote_what_would_end_them() -> None:
    text = logs.TextFormatter("llm:a").format(record(agent="my agent: x", call_id="ab12"))
    assert ' llm:a[' in text and ' WARNING aiosd.test agent="my agent: x" call=ab12: hello there' \
        in text


def test_records_inside_a_context_carry_its_agent_and_call() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("tools"))
    handler.addFilter(logs.ContextFilter())
    log = logging.getLogger("aiosd.test.context")
    log.addHandler(handler)
    log.propagate = False
    try:
        with logs.context(agent="a-1", call_id="c1"):
            log.warning("inside")
            log.warning("own", extra=logs.fields(call_id="c2"))
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    inside, own, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (inside["agent"], inside["call_id"]) == ("a-1", "c1")
    assert (own["agent"], own["call_id"]) == ("a-1", "c2")
    assert "agent" not in outside


def fields_of(datagram: bytes) -> dict[str, str]:
    """Parse the journal's native protocol (both forms of a field)."""
    out, pos = {}, 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", datagram[end + 1:end + 9])
            value = datagram[end + 9:end + 9 + size]
            assert datagram[end + 9 + size:end + 10 + size] == b"\n"
            pos = end + 10 + size
        out[key.decode()] = value.decode()
    return out


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_the_journal_gets_the_message_priority_and_fields(
        journal_socket: tuple[socket.socket, str]) -> None:
    sock, path = journal_socket
    handler = logs.JournalHandler("scheduler", logging.StreamHandler(io.StringIO()),
                                  journal.Journal(path))
    handler.handle(record("two\nlines %s", "here", agent="a-1", call_id="c1", event="call.x"))
    got = fields_of(sock.recv(65536))
    assert got["MESSAGE"] == "two\nlines here" and got["PRIORITY"] == "4"
    assert got["SYSLOG_IDENTIFIER"] == "scheduler" and got["AIOS_PROCESS"] == "scheduler"
    assert (got["AIOS_AGENT"], got["AIOS_CALL_ID"], got["AIOS_EVENT"]) == ("a-1", "c1", "call.x")
    handler.close()


def test_a_record_too_large_for_a_datagram_goes_in_a_memfd(
        journal_socket: tuple[socket.socket, str]) -> None:
    sock, path = journal_socket
    sink = journal.Journal(path)
    big = "x" * (4 * 2**20)
    sink.send({"MESSAGE": big})
    data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
    assert data == b"" and len(fds) == 1
    with os.fdopen(fds[0], "rb") as memfd:
        memfd.seek(0)   # (journald reads it from the start; the offset is the writer's)
        assert fields_of(memfd.read()) == {"MESSAGE": big}
    sink.close()


def test_an_unreachable_journal_falls_back_to_stderr(tmp_path: Path) -> None:
    stream = io.StringIO()
    fallback = logging.StreamHandler(stream)
    fallback.setFormatter(logs.TextFormatter("memory"))
    handler = logs.JournalHandler("memory", fallback, journal.Journal(str(tmp_path / "none")))
    handler.handle(record(agent="a-1"))
    assert "memory[" in stream.getvalue() and "agent=a-1: hello there" in stream.getvalue()


def test_journal_stream_is_believed_only_for_the_stream_stderr_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert journal.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not journal.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not journal.stderr_is_journal()
