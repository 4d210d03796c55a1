"""Bad arguments against the real daemon: each is refused with a named error
that says what was wrong, at once, and the connection goes on working.
Values a call cannot carry and bodies past the call limit are refused by
libaios before they are sent; malformed tool calls in a conversation by the
kernel before the call queues; file names that only begin with dots are
names, while a '..' component is still an escape."""

from __future__ import annotations

import asyncio
import uuid

import msgpack
import pytest

import libaios.aio
from libaios import errors
from libaios.protocol import MAX_CALL_BODY_BYTES

from ..conftest import Daemon

pytestmark = pytest.mark.integration


def test_values_a_call_cannot_carry_are_named_errors(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(errors.InvalidArgument, match=r"^llm\.chat: .*'max_tokens'"):
            c.chat("hi", max_tokens=2**70)
        with pytest.raises(errors.InvalidArgument) as info:
            c.storage.put("a-set", {1, 2})
        assert info.value.message == "storage.put: a set cannot be sent (field 'value')"
        assert c.chat("Say hi.", max_tokens=2).finish_reason in ("length", "stop")

    async def main() -> None:
        async with libaios.aio.connect(daemon.endpoint, name="test") as aios:
            with pytest.raises(errors.InvalidArgument, match=r"^llm\.chat: .*'max_tokens'"):
                await aios.chat("hi", max_tokens=2**70)
            with pytest.raises(errors.InvalidArgument, match=r"'value'"):
                await aios.storage.put("a-set", {1, 2})
            assert (await aios.whoami())["name"] == "test"

    asyncio.run(main())


def test_a_body_too_large_for_the_transport_is_refused_at_once(daemon: Daemon) -> None:
    """100 MB is past what the transport carries (it would drop the
    connection, and the caller wait out its timeout)."""
    value = b"x" * (100 * 1024 * 1024)
    with daemon.client(timeout=60) as c:
        # refused by the client (a body the transport dropped would wait out
        # the timeout: Timeout, not TooLarge)
        with pytest.raises(errors.TooLarge) as info:
            c.storage.put("huge", value)
        assert "too large" in info.value.message and str(MAX_CALL_BODY_BYTES) in info.value.message
        assert f"{len(msgpack.packb({'key': 'huge', 'value': value}))} bytes" in info.value.message
        assert c.storage.put(f"small-{uuid.uuid4().hex}", b"x")["version"] == 1

    async def main() -> None:
        async with libaios.aio.connect(daemon.endpoint, name="test", timeout=60) as aios:
            with pytest.raises(errors.TooLarge, match="too large"):
                await aios.storage.put("huge", value)
            assert (await aios.whoami())["name"] == "test"

    asyncio.run(main())


def turn(tool_calls: object) -> list[dict[str, object]]:
    return [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": None, "tool_calls": tool_calls},
            {"role": "tool", "tool_call_id": "c1", "content": "4"}]


def call_with(arguments: str) -> list[dict[str, object]]:
    return [{"id": "c1", "type": "function",
             "function": {"name": "calculator", "arguments": arguments}}]


@pytest.mark.parametrize("tool_calls, field", [
    ("x", r"messages\[1\]\.tool_calls must"),
    ([1], r"messages\[1\]\.tool_calls\[0\] must"),
    (call_with("not json"), r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    (call_with('{"expression": NaN}'), r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    (call_with('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
], ids=["a string", "a number", "arguments not JSON", "NaN", "nested past parsing"])
def test_malformed_tool_calls_in_a_conversation_name_the_field(
        daemon: Daemon, tool_calls: object, field: str) -> None:
    with daemon.client() as c:
        with pytest.raises(errors.InvalidArgument, match=rf"^llm\.chat: {field}"):
            c.chat(turn(tool_calls), max_tokens=4)
        for piece in c.chat(turn(call_with('{"expression": "2+2"}')), max_tokens=2, stream=True):
            assert isinstance(piece, (str, dict))


def test_names_that_begin_with_dots_are_file_names_and_dotdot_is_not(daemon: Daemon) -> None:
    tag = uuid.uuid4().hex[:8]
    with daemon.client() as c:
        for name in (f"...{tag}", f"..{tag}", f"{tag}/...", f"{tag}/..x/y.txt"):
            wrote = c.tools.call("write_file", {"path": name, "content": name})
            assert wrote["path"] == name
            assert c.tools.call("read_file", {"path": name})["content"] == name
            assert c.storage.read_file(name) == name.encode()
        for escape in ("..", "../x", f"{tag}/../../x", "./../x", "/etc/passwd"):
            with pytest.raises(errors.InvalidArgument, match="leaves|relative"):
                c.tools.call("write_file", {"path": escape, "content": "x"})
            with pytest.raises(errors.InvalidArgument, match="leaves|relative"):
                c.storage.write_file(escape, b"x")
