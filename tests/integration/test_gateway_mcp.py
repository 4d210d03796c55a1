"""The gateway's MCP server (/mcp) on a real daemon, through the ``mcp``
SDK's streamable-HTTP client: its tools are the key's agent's memory,
storage and kernel tools; the kernel's access rules hold (another agent's
data only within a shared group); a missing, unknown or revoked key gets
401, and a session cannot be carried on with another key."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from ..conftest import Daemon, daemon_with

pytestmark = pytest.mark.integration

CONFIG = {"access": {"groups": [{"name": "team", "members": [], "access": "write"}]}}
#: both ways a client talks to /mcp: the initialize handshake (a session),
#: and the SDK's default (server/discover, then per-request envelopes)
MODES = ["legacy", "auto"]
#: an MCP request's headers besides the key (the streamable-HTTP transport's)
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
HANDSHAKE_VERSION = "2025-11-25"


@pytest.fixture(scope="module")
def d() -> Iterator[Daemon]:
    with daemon_with(CONFIG) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def url(d: Daemon) -> str:
    status = d.wait_for(lambda s: bool((s.get("gateway") or {}).get("url")),
                        what="the gateway's URL")
    return status["gateway"]["url"] + "/mcp"


def make_key(d: Daemon, name: str, *groups: str) -> str:
    args = ["keys", "create", name, "--json"]
    for group in groups:
        args += ["--group", group]
    result = d.ctl(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["key"]


@pytest.fixture(scope="module")
def keys(d: Daemon) -> dict[str, str]:
    return {"alice": make_key(d, "mcp-alice"), "bob": make_key(d, "mcp-bob"),
            "carol": make_key(d, "mcp-carol", "team"), "dave": make_key(d, "mcp-dave", "team")}


@contextlib.asynccontextmanager
async def connect(url: str, key: str | None, mode: str = "auto") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with httpx2.AsyncClient(headers=headers, timeout=120) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            yield client


async def call(client: Client, name: str, arguments: dict[str, Any]) -> Any:
    """A tool's structured result (failing the test on a tool error)."""
    result = await client.call_tool(name, arguments)
    assert not result.is_error, f"{name}: {result.content}"
    return result.structured_content


async def refused(client: Client, name: str, arguments: dict[str, Any]) -> str:
    """The text of a tool error (failing the test if the call succeeds)."""
    result = await client.call_tool(name, arguments)
    assert result.is_error, f"{name} was not refused: {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize("mode", MODES)
def test_lists_services_and_kernel_tools(url: str, keys: dict[str, str], mode: str) -> None:
    async def main() -> dict[str, Any]:
        async with connect(url, keys["alice"], mode) as client:
            return {t.name: t for t in (await client.list_tools()).tools}

    tools = asyncio.run(main())
    for name in ("memory_add", "memory_search", "memory_get", "memory_delete", "storage_put",
                 "storage_get", "storage_list", "storage_read_file", "storage_write_file",
                 "calculator", "python", "read_file", "write_file", "list_files"):
        assert name in tools, sorted(tools)
    calc = tools["calculator"]
    assert "expression" in calc.input_schema["properties"]
    assert calc.annotations.read_only_hint is True
    assert tools["memory_delete"].annotations.destructive_hint is True
    assert tools["memory_search"].annotations.read_only_hint is True
    assert tools["write_file"].annotations.read_only_hint is False
    assert "agent" in tools["memory_add"].input_schema["properties"]


@pytest.mark.parametrize("mode", MODES)
def test_memory_add_search_get(url: str, keys: dict[str, str], mode: str) -> None:
    word = f"zebra{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with connect(url, keys["alice"], mode) as client:
            added = await call(client, "memory_add", {"text": f"the {word} lives in Kenya",
                                                      "metadata": {"topic": "animals"}})
            item_id = added["item"]["id"]
            found = await call(client, "memory_search", {"query": word, "limit": 5})
            assert [i["id"] for i in found["items"]][:1] == [item_id], found
            got = await call(client, "memory_get", {"id": item_id})
            assert got["item"]["text"] == f"the {word} lives in Kenya"
            assert got["item"]["metadata"] == {"topic": "animals"}

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_files_and_keys(url: str, keys: dict[str, str], mode: str) -> None:
    path = f"notes/{mode}-{uuid.uuid4().hex[:8]}.txt"

    async def main() -> None:
        async with connect(url, keys["alice"], mode) as client:
            await call(client, "storage_write_file", {"path": path, "data": "héllo, MCP\n"})
            read = await call(client, "storage_read_file", {"path": path})
            assert (read["encoding"], read["data"], read["version"]) == ("utf-8", "héllo, MCP\n", 1)
            raw = base64.b64encode(bytes(range(250, 256))).decode()   # not UTF-8
            await call(client, "storage_write_file", {"path": path + ".bin", "data": raw,
                                                      "encoding": "base64"})
            read = await call(client, "storage_read_file", {"path": path + ".bin"})
            assert (read["encoding"], read["data"]) == ("base64", raw), read
            key = f"cfg-{mode}-{uuid.uuid4().hex[:8]}"
            await call(client, "storage_put", {"key": key, "value": {"n": 3, "tags": ["a"]}})
            got = await call(client, "storage_get", {"key": key})
            assert got["value"] == {"n": 3, "tags": ["a"]}
            listed = await call(client, "storage_list", {"prefix": key})
            assert [k["key"] for k in listed["keys"]] == [key]
            # the kernel's own file tool sees the same storage
            through_tool = await call(client, "read_file", {"path": path})
            assert "héllo, MCP" in json.dumps(through_tool, ensure_ascii=False)

    asyncio.run(main())


def test_trailing_slash(url: str, keys: dict[str, str]) -> None:
    async def main() -> Any:
        async with connect(url + "/", keys["alice"], "legacy") as client:
            return await call(client, "calculator", {"expression": "2 + 3"})

    assert asyncio.run(main()) == {"result": 5}


@pytest.mark.parametrize("mode", MODES)
def test_kernel_tool_and_bad_arguments(url: str, keys: dict[str, str], mode: str) -> None:
    async def main() -> None:
        async with connect(url, keys["bob"], mode) as client:
            result = await client.call_tool("calculator", {"expression": "(3 + 4) * 6"})
            assert not result.is_error and result.content[0].text == "42"
            # the kernel validates a kernel tool's arguments
            text = await refused(client, "calculator", {"expr": "1"})
            assert "invalid_argument" in text and "expression" in text, text
            text = await refused(client, "no_such_tool", {})
            assert "not_found" in text and "calculator" in text, text
            # the gateway validates a service's, naming the field
            text = await refused(client, "memory_add", {"txt": "x"})
            assert "memory_add" in text and "'text' is a required property" in text, text
            text = await refused(client, "storage_read_file", {"path": "x", "version": 0})
            assert "arguments.version" in text, text
            text = await refused(client, "storage_write_file",
                                 {"path": "a.bin", "data": "not base64!", "encoding": "base64"})
            assert "base64" in text, text
            text = await refused(client, "memory_get", {"id": "nope"})
            assert "not_found" in text, text
            # the session goes on after refusals
            assert await call(client, "calculator", {"expression": "1 + 1"}) == {"result": 2}

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_another_agents_data_outside_a_group(url: str, keys: dict[str, str], mode: str) -> None:
    async def main() -> None:
        async with connect(url, keys["alice"], mode) as alice:
            await call(alice, "memory_add", {"text": "alice's secret plan"})
            await call(alice, "storage_put", {"key": f"secret-{mode}", "value": "s3cr3t"})
        async with connect(url, keys["bob"], mode) as bob:
            for name, args in (("memory_search", {"query": "secret plan"}),
                               ("storage_get", {"key": f"secret-{mode}"}),
                               ("storage_list", {}),
                               ("memory_add", {"text": "planted"})):
                text = await refused(bob, name, {**args, "agent": "mcp-alice"})
                assert "permission_denied" in text and "mcp-bob may not" in text, text
                assert "mcp-alice" in text, text
            # bob's own namespace is his
            assert (await call(bob, "memory_search", {"query": "secret plan"}))["items"] == []

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_group_members_share(url: str, keys: dict[str, str], mode: str) -> None:
    word = f"okapi{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with connect(url, keys["carol"], mode) as carol:
            await call(carol, "memory_add", {"text": f"the {word} is shy"})
        async with connect(url, keys["dave"], mode) as dave:
            found = await call(dave, "memory_search", {"query": word, "agent": "mcp-carol"})
            assert [i["text"] for i in found["items"]] == [f"the {word} is shy"]
            # a write group: dave may add to carol's memory too
            await call(dave, "memory_add", {"text": f"dave saw the {word}", "agent": "mcp-carol"})
        async with connect(url, keys["carol"], mode) as carol:
            found = await call(carol, "memory_search", {"query": word})
            assert sorted(i["text"] for i in found["items"]) == [
                f"dave saw the {word}", f"the {word} is shy"]
            # but not alice's, who is in no group
            text = await refused(carol, "memory_search", {"query": "x", "agent": "mcp-alice"})
            assert "permission_denied" in text, text

    asyncio.run(main())


def connect_error(url: str, key: str | None) -> MCPError:
    """The MCPError an SDK client meets connecting with ``key`` (which it
    raises inside an exception group)."""
    async def main() -> None:
        async with connect(url, key):
            pass

    try:
        asyncio.run(main())
    except BaseException as exc:   # noqa: BLE001 (looked into below)
        pending = [exc]
        while pending:
            e = pending.pop()
            if isinstance(e, MCPError):
                return e
            pending.extend(getattr(e, "exceptions", ()))
        raise
    raise AssertionError("the client connected")


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> httpx2.Response:
    with httpx2.Client(timeout=60) as http:
        return http.post(url, json=body, headers={**ACCEPT, **headers})


def initialize_body() -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {},
                       "clientInfo": {"name": "test", "version": "0"}}}


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic dXNlcjpwYXNz", "aios-sk-nobearer"])
def test_no_key_is_401(url: str, header: str | None) -> None:
    r = post(url, initialize_body(), {} if header is None else {"Authorization": header})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    error = r.json()["error"]
    assert "Authorization: Bearer KEY" in error["message"]


def test_unknown_key_is_401(url: str) -> None:
    r = post(url, initialize_body(), {"Authorization": "Bearer aios-sk-not-a-real-key"})
    assert r.status_code == 401, r.text
    assert "not valid" in r.json()["error"]["message"]

    for key, message in (("aios-sk-not-a-real-key", "API key is not valid"),
                         (None, "no API key")):
        error = connect_error(url, key)
        assert message in error.message, error.message


@pytest.mark.parametrize("mode", MODES)
def test_revoked_key_is_401(d: Daemon, url: str, mode: str) -> None:
    name = f"mcp-erin-{mode}"
    key = make_key(d, name)

    async def main() -> None:
        async with connect(url, key, mode) as client:
            assert await call(client, "calculator", {"expression": "1 + 2"}) == {"result": 3}
            result = d.ctl("keys", "revoke", name)
            assert result.returncode == 0, result.stderr
            with pytest.raises(MCPError, match="API key is not valid"):
                await client.call_tool("calculator", {"expression": "1 + 2"})

    asyncio.run(main())
    r = post(url, initialize_body(), {"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and "not valid" in r.json()["error"]["message"], r.text


def test_a_session_keeps_its_key(url: str, keys: dict[str, str]) -> None:
    """A session opened with one key cannot be used with another: the SDK
    answers as if it did not exist."""
    alice = {"Authorization": f"Bearer {keys['alice']}"}
    r = post(url, initialize_body(), alice)
    assert r.status_code == 200, r.text
    session = {"Mcp-Session-Id": r.headers["mcp-session-id"],
               "MCP-Protocol-Version": HANDSHAKE_VERSION}
    r = post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, {**alice, **session})
    assert r.status_code == 202, r.text
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    r = post(url, listing, {"Authorization": f"Bearer {keys['bob']}", **session})
    assert r.status_code == 404, r.text
    r = post(url, listing, {**alice, **session})
    assert r.status_code == 200 and "memory_add" in r.text, r.text
    with httpx2.Client(timeout=60) as http:
        assert http.delete(url, headers={**alice, **session}).status_code in (200, 204)
