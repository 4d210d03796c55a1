"""systemd's journal through its native protocol: a datagram of fields to
``/run/systemd/journal/socket`` (see systemd's "Native Journal Protocol").

A field is ``KEY=VALUE\\n``; a value holding a newline is sent as ``KEY\\n``,
its length as a little-endian 64-bit integer, the value and ``\\n``. A
record too large for one datagram goes in a sealed memfd whose descriptor
is passed instead. Nothing here formats a log record: :mod:`aiosd.logs`
says which fields a record has.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct

SOCKET = "/run/systemd/journal/socket"

#: logging levels as syslog priorities (the journal's PRIORITY field)
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level: the next
    standard one below it)."""
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream: systemd names that stream
    in JOURNAL_STREAM (``DEVICE:INODE``), and a process whose stderr was
    redirected elsewhere since must not take the variable's word for it."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def encode(fields: dict[str, str]) -> bytes:
    """The datagram carrying ``fields`` (keys: upper-case letters, digits
    and '_', not starting with '_')."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        name = key.encode("ascii")
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    """A connection to the journal's socket; ``send`` raises OSError when
    the journal cannot take a record (gone, or never there)."""

    def __init__(self, path: str = SOCKET) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def send(self, fields: dict[str, str]) -> None:
        data = encode(fields)
        try:
            self._send(data)
        except OSError as exc:
            # journald restarted: its socket is a new one; connect again, once
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE):
                raise
            self.close()
            self._send(data)

    def _send(self, data: bytes) -> None:
        sock = self._connect()
        try:
            sock.send(data)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_large(sock, data)

    @staticmethod
    def _send_large(sock: socket.socket, data: bytes) -> None:
        """Past a datagram's size: the record in a sealed memfd, whose
        descriptor alone is sent (journald reads and closes it)."""
        fd = os.memfd_create("aios-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            socket.send_fds(sock, [b""], [fd])
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
