"""What the synchronous and the asyncio client share: who a client is,
which kernel it talks to, and how it reads a reply.

:class:`ClientCore` does no socket I/O. It holds a client's identity and
settings, its memory, storage and tool system calls (:mod:`.services`), the
identity of the kernel socket it connected to (a restarted kernel binds a
new socket file, which is how a client knows its calls in flight are lost),
the hello that introduces it, and the decoding of replies.
:class:`libaios.Client` and :class:`libaios.aio.AsyncClient` add the socket
and the waiting, each in its own I/O model.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import errors, paths, protocol
from .protocol import MsgType
from .services import Memory, Storage, Take, Tools, field_of

DEFAULT_TIMEOUT = 120.0


@dataclass
class ChatResult:
    """The answer to :meth:`Client.chat`."""

    text: str
    finish_reason: str
    usage: dict[str, int]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    parsed: Any = None
    core: str = ""

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ChatResult:
        return cls(
            text=body.get("text", ""),
            finish_reason=body.get("finish_reason", ""),
            usage=dict(body.get("usage", {})),
            tool_calls=list(body.get("tool_calls") or []),
            parsed=body.get("parsed"),
            core=body.get("core", ""),
        )


def resolve(endpoint: str | None, token: str | None, name: str | None) -> tuple[str, str | None, str]:
    """Endpoint, credential and name of a client: given, else what the kernel
    put in the environment when it launched this agent, else the defaults."""
    return (
        endpoint or paths.kernel_endpoint(),
        token if token is not None else os.environ.get("AIOS_AGENT_TOKEN"),
        name or os.environ.get("AIOS_AGENT_NAME") or Path(sys.argv[0]).stem,
    )


def no_reply(msg: protocol.Message, endpoint: str, timeout: float) -> errors.Timeout:
    """The error of a call that got no answer in time, saying what to check."""
    return errors.Timeout(f"no reply to {msg.type.value} from aiosd at {endpoint} within "
                          f"{timeout:g}s: is aiosd running? `aiosctl status`")


def encode_call(msg: protocol.Message) -> list[bytes]:
    """The frames of call ``msg``; a body the kernel could not take is
    refused here, before it is sent: InvalidArgument naming the call and the
    field (a value msgpack cannot carry), TooLarge with its size and the limit."""
    try:
        return protocol.encode_call(msg)
    except protocol.ProtocolError as exc:
        raise errors.error_class(exc.code)(exc.message) from None


def seconds(timeout: Any) -> float:
    """``timeout``, checked: a number of seconds (InvalidArgument if not)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise errors.InvalidArgument(f"'timeout' must be a number of seconds, got {timeout!r}")
    return timeout


def chat_body(messages: list[dict[str, Any]] | str, *, stream: bool = False,
              **options: Any) -> dict[str, Any]:
    """The body of an ``llm.chat`` call; options left as None are not sent."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body: dict[str, Any] = {"messages": messages, "stream": stream}
    body.update({k: v for k, v in options.items() if v is not None})
    return body


#: what a call in flight when the kernel went away fails with
RESTARTED = "aiosd restarted while this call was in flight; retry it"


def kernel_socket_id(endpoint: str) -> tuple[int, int] | None:
    """The identity of the kernel's ipc socket file: its inode and the time
    it was made (a restarted kernel makes a new file, and a file system may
    give it the old one's inode number). None for other transports;
    NotRunning if there is no socket file."""
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://"):])
    try:
        st = path.stat()
    except FileNotFoundError:
        raise errors.NotRunning(
            f"aiosd is not running: no kernel socket at {path} "
            "(start it with `aiosctl start`, or set AIOS_RUNTIME_DIR)"
        ) from None
    except PermissionError:
        raise errors.PermissionDenied(
            f"cannot reach the kernel socket at {path}: its directory is not open to this "
            "user (aiosd's runtime directory is its own user's alone)"
        ) from None
    return st.st_ino, st.st_ctime_ns


def stream_pieces(part: dict[str, Any]) -> Iterator[str | dict[str, Any]]:
    """What a partial reply of a streamed chat gives its caller: a piece of
    text, and each tool-call delta (OpenAI's shape: ``index``, then ``id``
    and ``function.name``, then ``function.arguments`` fragments)."""
    if part.get("text"):
        yield part["text"]
    for delta in part.get("tool_calls") or []:
        yield delta


def decode_reply(frames: list[bytes]) -> protocol.Message:
    """A reply from the kernel, decoded. One that cannot be raises BadFrame;
    its ``details["re"]`` names the call it answers where that can be read,
    so that the call can fail with the reason rather than wait."""
    try:
        _, payload = protocol.split_envelope(frames)
    except protocol.ProtocolError as exc:
        raise _undecodable(exc, None) from None
    try:
        return protocol.decode(payload)
    except protocol.ProtocolError as exc:
        raise _undecodable(exc, protocol.peek_id(payload, "re")) from None


def _undecodable(exc: protocol.ProtocolError, call_id: str | None) -> errors.BadFrame:
    return errors.BadFrame(f"undecodable reply from aiosd: {exc.message}",
                           details={"re": call_id} if call_id else None)


class ClientCore:
    """A client without its socket; see :class:`libaios.Client` for the
    arguments. ``take`` says how a system call's reply gives its result
    (:func:`~libaios.services.field_of`, or an awaiting version)."""

    def __init__(self, endpoint: str | None, *, token: str | None, name: str | None,
                 timeout: float, operator: bool, take: Take = field_of,
                 key: str | None = None):
        self.endpoint, self.token, self.name = resolve(endpoint, token, name)
        #: (the kernel's gateway only) the API key of the caller it connects for
        self.key = key
        self.timeout = seconds(timeout)
        self.operator = operator
        #: who the kernel says this client is (the hello's answer)
        self.identity: dict[str, Any] = {}
        #: the kernel socket file's identity at connect (kernel_socket_id)
        self._inode: tuple[int, int] | None = None
        #: memory, storage and tool system calls: ``client.memory.add(...)``
        self.memory = Memory(self.call, take)
        self.storage = Storage(self.call, take)
        self.tools = Tools(self.call, take)

    def call(self, mtype: MsgType, body: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        raise NotImplementedError

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else seconds(timeout)

    def _attach(self) -> None:
        """Note the kernel socket this client connects to (NotRunning if
        there is none)."""
        self._inode = kernel_socket_id(self.endpoint)

    def _kernel_replaced(self) -> bool:
        """Whether the kernel socket file is another than the one this
        client connected to (NotRunning if there is none)."""
        return self._inode is not None and kernel_socket_id(self.endpoint) != self._inode

    def _hello(self) -> tuple[dict[str, Any], float]:
        """The hello that introduces this process to the kernel, and how long
        to wait for its answer. The kernel checks the pid against the
        connection's peer, never trusts it alone."""
        body = {"name": self.name, "pid": os.getpid(), "token": self.token,
                "operator": self.operator}
        if self.key is not None:
            body["key"] = self.key
        return body, min(self.timeout, 10.0)
