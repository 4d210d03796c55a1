"""The AIOS wire protocol: the one place where messages are defined.

Every message travels as ZeroMQ frames ``[identity..., b"", header, body]``
(a DEALER peer sends and receives ``[b"", header, body]``; the ROUTER adds and
strips the identity). ``header`` and ``body`` are msgpack maps.

Header keys:

``v``
    protocol version (:data:`VERSION`); a mismatch is answered with
    :attr:`ErrorCode.BAD_VERSION`.
``id``
    the message id (hex string); a call's replies carry it in ``re``.
``type``
    a :class:`MsgType` value.
``re``
    on replies only: the id of the call answered.
``deadline``
    on calls only: absolute UNIX time after which the caller has given up,
    or ``None`` for no deadline.

A call gets zero or more ``partial`` replies (streamed tokens, agent output)
and then exactly one final ``reply`` or ``error``.

Decoding is defensive: frame size and nesting depth are limited, msgpack
ext types are refused, and every violation raises :class:`ProtocolError`
carrying the :class:`ErrorCode` to answer with. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = 1

#: Largest header frame accepted, in bytes.
MAX_HEADER_BYTES = 4 * 1024
#: Largest body frame accepted, in bytes (a long conversation fits easily).
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Largest body of a call, in bytes: the kernel sends a call's body on to a
#: worker wrapped with the call's id, its caller and namespace, and that task
#: must stay within :data:`MAX_BODY_BYTES` too.
MAX_CALL_BODY_BYTES = MAX_BODY_BYTES - 64 * 1024
#: Deepest nesting of maps and lists accepted in a body.
MAX_DEPTH = 32
#: Most identity frames a ROUTER message may carry before the delimiter.
MAX_ROUTING_FRAMES = 4
#: Most values (map keys included) a frame may hold: this many, plus one
#: for every OBJECT_BYTES bytes of it. A value decodes to a Python object of
#: tens of bytes however few it took on the wire (an empty list takes one),
#: so without a limit a body could grow many times its size when decoded.
MAX_VALUES_FLOOR = 65536
OBJECT_BYTES = 16


class MsgType(str, enum.Enum):
    """Every message type on the wire. Dispatch tables are keyed on these."""

    # -- agent and aiosctl -> scheduler (calls) --
    HELLO = "hello"                   # bind the connection to an identity
    BYE = "bye"                       # the connection closes: forget it (no answer)
    LLM_CHAT = "llm.chat"
    AGENT_WHOAMI = "agent.whoami"
    AGENT_RUN = "agent.run"           # launch an agent process
    CALL_CANCEL = "call.cancel"       # the caller gives up on one of its calls
    SYS_NULL = "sys.null"             # a no-op through a worker: measures overhead
    MEMORY_ADD = "memory.add"
    MEMORY_GET = "memory.get"
    MEMORY_UPDATE = "memory.update"
    MEMORY_DELETE = "memory.delete"
    MEMORY_SEARCH = "memory.search"
    MEMORY_LIST = "memory.list"
    MEMORY_STATS = "memory.stats"
    STORAGE_PUT = "storage.put"
    STORAGE_GET = "storage.get"
    STORAGE_DELETE = "storage.delete"
    STORAGE_LIST = "storage.list"
    STORAGE_WRITE_FILE = "storage.write_file"
    STORAGE_READ_FILE = "storage.read_file"
    STORAGE_LIST_DIR = "storage.list_dir"
    STORAGE_VERSIONS = "storage.versions"
    STORAGE_ROLLBACK = "storage.rollback"
    STORAGE_STATS = "storage.stats"
    TOOL_LIST = "tool.list"
    TOOL_CALL = "tool.call"
    # kernel-internal: only the kernel's own sessions may make these
    BLOCK_PUT = "block.put"           # memory manager -> storage: durable items
    BLOCK_GET = "block.get"
    BLOCK_DELETE = "block.delete"
    BLOCK_SCAN = "block.scan"
    AUDIT_APPEND = "audit.append"     # scheduler -> storage
    AUDIT_LIST = "audit.list"
    ADMIN_STATUS = "admin.status"
    ADMIN_PS = "admin.ps"
    ADMIN_KILL = "admin.kill"
    ADMIN_SHUTDOWN = "admin.shutdown"
    ADMIN_PROCS = "admin.procs"       # supervisor -> scheduler: process table
    ADMIN_APPROVALS = "admin.approvals"
    ADMIN_APPROVE = "admin.approve"
    ADMIN_DENY = "admin.deny"
    ADMIN_AUDIT = "admin.audit"
    ADMIN_KEYS = "admin.keys"         # the gateway's API keys: create, list, revoke
    ADMIN_METRICS = "admin.metrics"   # the kernel's figures, for the Prometheus metrics

    # -- replies (scheduler -> caller, worker -> scheduler) --
    PARTIAL = "partial"
    REPLY = "reply"
    ERROR = "error"

    # -- worker <-> scheduler --
    WORKER_READY = "worker.ready"
    WORKER_HEARTBEAT = "worker.heartbeat"
    WORKER_TASK = "worker.task"
    WORKER_CANCEL = "worker.cancel"
    WORKER_SUSPEND = "worker.suspend"
    WORKER_PROGRESS = "worker.progress"   # how many tokens a running call has generated
    WORKER_FORGET = "worker.forget"   # an agent or a suspended call is gone: drop its state
    WORKER_SHUTDOWN = "worker.shutdown"


REPLY_TYPES = frozenset({MsgType.PARTIAL, MsgType.REPLY, MsgType.ERROR})


class ErrorCode(enum.IntEnum):
    """One numeric code for every failure the kernel reports."""

    BAD_FRAME = 100        # not decodable: framing, msgpack, limits
    BAD_VERSION = 101
    UNKNOWN_TYPE = 102
    TOO_LARGE = 103
    INVALID_ARGUMENT = 104
    NOT_FOUND = 105
    PERMISSION_DENIED = 106
    UNAUTHENTICATED = 107
    TIMEOUT = 200
    CANCELLED = 201
    UNAVAILABLE = 202      # no worker can serve this now
    WORKER_LOST = 203      # the worker died holding the call
    OVERLOADED = 204
    SHUTTING_DOWN = 205
    NOT_RUNNING = 206      # client side: no daemon answers
    QUOTA_EXCEEDED = 207
    APPROVAL_REQUIRED = 208  # internal: a worker found the call destructive
    CONFLICT = 209
    BACKEND = 300          # the model backend failed
    TOOL_CALL_INCOMPLETE = 301  # a required tool call did not complete in its budget
    INTERNAL = 500


#: Codes for which the same call may succeed if simply tried again.
RETRIABLE = frozenset(
    {
        ErrorCode.TIMEOUT,
        ErrorCode.UNAVAILABLE,
        ErrorCode.WORKER_LOST,
        ErrorCode.OVERLOADED,
        ErrorCode.NOT_RUNNING,
    }
)


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` says how to answer it."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Ids:
    """Message ids: a random per-process prefix and a counter. Unique across
    processes and restarts like a uuid4, without a ``getrandom`` system call
    per message (which was a sixth of the scheduler's time under load). Ids
    name messages; they are never credentials."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = uuid.uuid4().hex[:16]
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_ids = _Ids()


def new_id() -> str:
    """A fresh message id (32 hex digits)."""
    return _ids.next()


@dataclass
class Message:
    """A decoded message: its header fields and its body."""

    type: MsgType
    id: str
    body: dict[str, Any] = field(default_factory=dict)
    re: str | None = None
    deadline: float | None = None

    def header(self) -> dict[str, Any]:
        head: dict[str, Any] = {"v": VERSION, "id": self.id, "type": self.type.value}
        if self.re is not None:
            head["re"] = self.re
        if self.deadline is not None:
            head["deadline"] = self.deadline
        return head

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.time()) > self.deadline


def call(
    mtype: MsgType, body: dict[str, Any] | None = None, timeout: float | None = None
) -> Message:
    """Build a call with a new id and, if ``timeout`` is given, a deadline."""
    deadline = None if timeout is None else time.time() + timeout
    return Message(mtype, new_id(), body or {}, deadline=deadline)


def reply(to: str, body: dict[str, Any] | None = None) -> Message:
    """The final successful reply to call ``to``."""
    return Message(MsgType.REPLY, new_id(), body or {}, re=to)


def partial(to: str, body: dict[str, Any]) -> Message:
    """One streamed part of the answer to call ``to``."""
    return Message(MsgType.PARTIAL, new_id(), body, re=to)


def error(
    to: str | None,
    code: ErrorCode,
    message: str,
    retriable: bool | None = None,
    name: str | None = None,
    details: dict[str, Any] | None = None,
) -> Message:
    """The error envelope: code, a message a person can act on, retriable,
    and optional machine-readable details."""
    body = {
        "code": int(code),
        "name": name or code.name,
        "message": message,
        "retriable": code in RETRIABLE if retriable is None else retriable,
    }
    if details:
        body["details"] = details
    return Message(MsgType.ERROR, new_id(), body, re=to)


# --------------------------------------------------------------------------
# Encoding

def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode(msg: Message) -> list[bytes]:
    """Frames ``[b"", header, body]`` for a DEALER to send (prefix identities
    for a ROUTER)."""
    return [b"", _packb(msg.header()), _packb(msg.body)]


def encode_call(msg: Message) -> list[bytes]:
    """A call's frames, as :func:`encode`, refused before they are sent where
    the kernel could not take them: a body msgpack cannot carry raises
    ProtocolError(INVALID_ARGUMENT) naming the call and the field, one larger
    than :data:`MAX_CALL_BODY_BYTES` ProtocolError(TOO_LARGE) with its size
    (a message past the transport's own limit is dropped with its
    connection, unanswered)."""
    try:
        body = _packb(msg.body)
    except (TypeError, ValueError, OverflowError) as exc:   # what msgpack raises
        raise ProtocolError(ErrorCode.INVALID_ARGUMENT, _unsendable(msg, exc)) from None
    if len(body) > MAX_CALL_BODY_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{msg.type.value}: the body is too large to send: {len(body)} bytes; a call's "
            f"body may be at most {MAX_CALL_BODY_BYTES} bytes; send less at a time")
    return [b"", _packb(msg.header()), body]


def _unsendable(msg: Message, exc: Exception) -> str:
    """Why ``msg``'s body cannot be packed, naming the field where it can be told."""
    found = _unpackable(msg.body, "", 0)
    if found is None:
        return f"{msg.type.value}: the arguments cannot be sent: {exc}"
    where, what = found
    return f"{msg.type.value}: {what} cannot be sent (field {where!r})"


def _unpackable(value: Any, where: str, depth: int) -> tuple[str, str] | None:
    """(field, what) for the first value under ``value`` that msgpack cannot
    pack, or None. Walked only once packing has failed."""
    if depth > MAX_DEPTH:
        return where, f"a value nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, dict):
        for key, item in value.items():
            inner = _field(where, key)
            found = _unpackable(key, inner, depth + 1) or _unpackable(item, inner, depth + 1)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _unpackable(item, f"{where}[{i}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, bool) or value is None or isinstance(
            value, (float, bytes, bytearray, memoryview)):
        return None
    if isinstance(value, int):
        return None if -(1 << 63) <= value < (1 << 64) else (where, "an integer beyond 64 bits")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where, "text with a lone surrogate (not valid UTF-8)"
        return None
    kind = type(value).__qualname__
    if type(value).__module__ != "builtins":
        kind = f"{type(value).__module__}.{kind}"
    return where, f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _field(where: str, key: Any) -> str:
    """The name of field ``key`` of the map at ``where``: ``messages[1].content``."""
    if isinstance(key, str):
        return f"{where}.{key}" if where else key
    try:
        shown = repr(key)
    except ValueError:   # (an integer too long to write out)
        shown = type(key).__name__
    return f"{where}[{shown}]"


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.BAD_FRAME, f"msgpack ext type {code} is not allowed")


def _unpack(frame: bytes, limit: int, what: str) -> Any:
    if len(frame) > limit:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{what} frame is {len(frame)} bytes; the limit is {limit}"
        )
    most = MAX_VALUES_FLOOR + len(frame) // OBJECT_BYTES
    if len(frame) > MAX_VALUES_FLOOR:   # (a value takes a byte at least)
        _count_values(frame, most, what)
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_array_len=most,
            max_map_len=most,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated classes
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{what} frame is not valid msgpack: {exc}") from None


# msgpack's formats by their first byte: scalars of a fixed size; strings,
# binaries and extensions that give their size first (bytes of the size);
# arrays and maps that give their length first.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_ARRAY = {0xDC: 2, 0xDD: 4}
_MAP = {0xDE: 2, 0xDF: 4}


def _count_values(frame: bytes, most: int, what: str) -> None:
    """Refuse ``frame`` if it holds more than ``most`` values, found by
    walking its encoding without building anything (a string is skipped
    over at once, so the walk costs at most ``most`` steps). Where the frame
    is not valid msgpack the walk stops, and decoding it says what is wrong."""
    pos, left, count, end = 0, 1, 0, len(frame)
    while left and pos < end:
        byte = frame[pos]
        pos += 1
        left -= 1
        count += 1
        if count > most:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"{what} frame holds more than {most} values (at most {MAX_VALUES_FLOOR} and one "
                f"per {OBJECT_BYTES} bytes of it): send fewer, larger values")
        if byte <= 0x7F or byte >= 0xE0:      # fixint
            continue
        if byte <= 0x8F:                      # fixmap
            left += 2 * (byte & 0x0F)
        elif byte <= 0x9F:                    # fixarray
            left += byte & 0x0F
        elif byte <= 0xBF:                    # fixstr
            pos += byte & 0x1F
        elif byte in _FIXED:
            pos += _FIXED[byte]
        elif byte in _SIZED or byte in _EXT:
            n = _SIZED.get(byte) or _EXT[byte]
            pos += n + int.from_bytes(frame[pos:pos + n], "big") + (byte in _EXT)
        elif byte in _ARRAY or byte in _MAP:
            n = _ARRAY.get(byte) or _MAP[byte]
            left += int.from_bytes(frame[pos:pos + n], "big") * (2 if byte in _MAP else 1)
            pos += n
        else:
            return


def _check_depth(obj: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"body nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        for value in obj.values():
            _check_depth(value, depth + 1)
    elif isinstance(obj, list):
        for value in obj:
            _check_depth(value, depth + 1)


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split ROUTER frames into (identity frames, [header, body])."""
    try:
        delim = frames.index(b"")
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "no empty delimiter frame") from None
    if delim > MAX_ROUTING_FRAMES:
        raise ProtocolError(ErrorCode.BAD_FRAME, "too many routing frames")
    return frames[:delim], frames[delim + 1:]


def peek_id(payload: list[bytes], field: str = "id") -> str | None:
    """Best effort: the id of a message whose full decoding failed (or,
    with ``field="re"``, of the call it answers), so that the error can
    still be matched to its call."""
    if not payload or len(payload[0]) > MAX_HEADER_BYTES:
        return None
    try:
        head = msgpack.unpackb(payload[0], raw=False, ext_hook=_refuse_ext)
    except Exception:  # anything undecodable simply has no id to answer
        return None
    if isinstance(head, dict) and isinstance(head.get(field), str) and len(head[field]) <= 64:
        return head[field]
    return None


def decode(payload: list[bytes]) -> Message:
    """Decode ``[header, body]`` (the frames after the delimiter)."""
    if len(payload) != 2:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"expected 2 frames after the delimiter, got {len(payload)}"
        )
    head = _unpack(payload[0], MAX_HEADER_BYTES, "header")
    if not isinstance(head, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "header is not a map")
    if head.get("v") != VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {head.get('v')!r} is not supported; this kernel speaks {VERSION}",
        )
    mid = head.get("id")
    if not isinstance(mid, str) or not 0 < len(mid) <= 64:
        raise ProtocolError(ErrorCode.BAD_FRAME, "header 'id' must be a string of 1-64 chars")
    try:
        mtype = MsgType(head.get("type"))
    except ValueError:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {head.get('type')!r}"
        ) from None
    re_ = head.get("re")
    if re_ is not None and not isinstance(re_, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "header 're' must be a string")
    deadline = head.get("deadline")
    if deadline is not None and not isinstance(deadline, (int, float)):
        raise ProtocolError(ErrorCode.BAD_FRAME, "header 'deadline' must be a number")
    body = _unpack(payload[1], MAX_BODY_BYTES, "body")
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "body is not a map")
    _check_depth(body)
    return Message(mtype, mid, body, re=re_, deadline=deadline)


# --------------------------------------------------------------------------
# Events
#
# The scheduler publishes events on its PUB socket (events.sock) as frames
# ``[topic, header, body]``: the topic first (UTF-8, dotted, such as
# ``agent.ID.started``), since subscribers filter on its prefix; the header
# ``{"v": VERSION, "ts": UNIX time}``; the body a map. docs/operations.md
# lists the topics and their bodies.

#: Topic prefix of the answer to a subscription: a subscriber that also
#: subscribes to ``SUBSCRIBED + TOKEN`` gets one event of that topic once
#: the kernel has its subscriptions (events published after it reach it).
SUBSCRIBED = "kernel.subscribed."
#: Longest topic accepted, in bytes.
MAX_TOPIC_BYTES = 512


@dataclass
class Event:
    """A decoded event: its topic, when it was published, and its body."""

    topic: str
    ts: float
    body: dict[str, Any] = field(default_factory=dict)


def encode_event(topic: str, body: dict[str, Any], ts: float | None = None) -> list[bytes]:
    """The frames of an event on ``topic`` (published now unless ``ts``)."""
    head = {"v": VERSION, "ts": time.time() if ts is None else ts}
    return [topic.encode("utf-8"), _packb(head), _packb(body)]


def decode_event(frames: list[bytes]) -> Event:
    """Decode an event's frames (as a subscriber receives them)."""
    if len(frames) != 3:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"an event has 3 frames, got {len(frames)}")
    if len(frames[0]) > MAX_TOPIC_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"event topic is {len(frames[0])} bytes; "
                                                 f"the limit is {MAX_TOPIC_BYTES}")
    try:
        topic = frames[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "event topic is not UTF-8") from None
    head = _unpack(frames[1], MAX_HEADER_BYTES, "event header")
    if not isinstance(head, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "event header is not a map")
    if head.get("v") != VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION,
                            f"event protocol version {head.get('v')!r} is not supported; "
                            f"this side speaks {VERSION}")
    ts = head.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ProtocolError(ErrorCode.BAD_FRAME, "event header 'ts' must be a number")
    body = _unpack(frames[2], MAX_BODY_BYTES, "event body")
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "event body is not a map")
    _check_depth(body)
    return Event(topic, float(ts), body)
