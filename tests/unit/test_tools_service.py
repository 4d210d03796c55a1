"""The tool worker's handlers (tool.list, tool.call: validation, timeouts,
cancellation, errors, result shapes), the file tools over a fake kernel, and
``serve`` end to end over an in-process scheduler socket."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Any

import psutil
import pytest

from aiosd.config import from_dict
from aiosd.tools.builtins import builtin_tools, file_tools
from aiosd.tools.registry import Context, Registry, Tool
from aiosd.tools.sandbox import landlock_abi
from aiosd.tools.service import ToolService, capacity_of, plain
from aiosd.worker import Task
from libaios import errors
from libaios.protocol import ErrorCode, MsgType

from .tool_worker import recv, send_task, serve_in_thread, stop


def make_task(mtype: MsgType, body: dict[str, Any], *, deadline: float | None = None,
              namespace: str | None = "alice", approved: bool = False) -> Task:
    return Task(uuid.uuid4().hex, mtype, body, deadline, caller={"agent": "a1", "name": "alice"},
                namespace=namespace, approved=approved)


def call(svc: ToolService, name: str, arguments: Any = None, **kw: Any) -> Any:
    body: dict[str, Any] = {"name": name}
    if arguments is not None:
        body["arguments"] = arguments
    return svc.call(make_task(MsgType.TOOL_CALL, body, **kw))


def slow(args: dict[str, Any], ctx: Context) -> str:
    ctx.cancelled.wait(args.get("seconds", 10))
    return "woke"


def service() -> ToolService:
    reg = Registry()
    reg.add_all(builtin_tools(from_dict({}).tools, None))
    reg.add(Tool("slow", "Sleeps.", {"type": "object",
                                     "properties": {"seconds": {"type": "number"}}},
                 slow, timeout=0.5))
    reg.add(Tool("crash", "Crashes.", {"type": "object"},
                 lambda a, c: {}["missing"]))
    reg.add(Tool("exits", "Calls sys.exit, as a command-line tool may.", {"type": "object"},
                 lambda a, c: sys.exit(2)))
    reg.add(Tool("odd", "Returns odd data.", {"type": "object"},
                 lambda a, c: {"t": (1, 2), "s": {3, 1}, 5: 2**70, "o": object.__name__}))
    return ToolService(reg)


# -- handlers -------------------------------------------------------------------------


def test_list_shape() -> None:
    reply = service().list(make_task(MsgType.TOOL_LIST, {}))
    names = [t["function"]["name"] for t in reply["tools"]]
    assert names == sorted(names) and "calculator" in names and "slow" in names
    for entry in reply["tools"]:
        assert entry["type"] == "function"
        assert set(entry["function"]) == {"name", "description", "parameters"}
        assert set(entry["aios"]) == {"concurrency", "timeout", "read_only", "destructive"}


def test_call_shape_and_validation_before_running() -> None:
    svc = service()
    assert call(svc, "calculator", {"expression": "6*7"}) == {"name": "calculator", "result": 42}
    with pytest.raises(errors.InvalidArgument,
                       match=r"^calculator: arguments.expression: 5 is not of type 'string'"):
        call(svc, "calculator", {"expression": 5})
    with pytest.raises(errors.InvalidArgument, match="'expression' is a required property"):
        call(svc, "calculator")                        # no arguments at all: {}
    with pytest.raises(errors.InvalidArgument, match="arguments must be a map"):
        call(svc, "calculator", "6*7")
    with pytest.raises(errors.NotFound, match="no tool 'nope'; the tools are: calculator, crash"):
        call(svc, "nope", {})


class Held:
    """A tool deaf to cancellation that runs until the test lets it go."""

    def __init__(self) -> None:
        self.entered, self.gate, self.finished = threading.Event(), threading.Event(), threading.Event()

    def __call__(self, args: dict[str, Any], ctx: Context) -> str:
        self.entered.set()
        self.gate.wait(60)
        self.finished.set()
        return "let go"


def test_timeout_names_the_tool_and_does_not_wait() -> None:
    svc = service()
    held = Held()
    svc.registry.add(Tool("deaf", "Runs until let go.", {"type": "object"}, held, timeout=0.5))
    try:
        with pytest.raises(errors.Timeout, match="^deaf: the tool ran past its timeout of 0.5s$"):
            call(svc, "deaf", {})
        assert held.entered.is_set() and not held.finished.is_set()   # it did not wait for it
    finally:
        held.gate.set()
    assert svc.abandoned == 1
    # a call's own, sooner deadline is said to be that
    with pytest.raises(errors.Timeout, match="^slow: the call's deadline passed"):
        call(svc, "slow", {"seconds": 30}, deadline=time.time() + 0.2)
    assert call(svc, "slow", {"seconds": 0.01}) == {"name": "slow", "result": "woke"}


def test_cancellation_of_a_tool_that_does_not_look() -> None:
    svc = service()
    held = Held()
    svc.registry.add(Tool("stubborn", "Runs until let go, deaf to cancellation.",
                          {"type": "object"}, held, timeout=60))
    task = make_task(MsgType.TOOL_CALL, {"name": "stubborn", "arguments": {}},
                     deadline=time.time() + 60)
    canceller = threading.Thread(target=lambda: held.entered.wait(30) and task.cancelled.set())
    canceller.start()
    try:
        with pytest.raises(errors.Cancelled, match="^stubborn: the call was cancelled"):
            svc.call(task)
        assert held.entered.is_set() and not held.finished.is_set()   # it did not wait for it
    finally:
        held.gate.set()
        canceller.join(30)
    assert svc.abandoned == 1


def test_tool_bugs_become_backend_errors_and_results_become_plain() -> None:
    svc = service()
    with pytest.raises(errors.BackendError, match="^crash failed: KeyError: 'missing'"):
        call(svc, "crash", {})
    with pytest.raises(errors.BackendError, match="^exits failed: SystemExit: 2"):
        call(svc, "exits", {})
    assert call(svc, "odd", {})["result"] == {"t": [1, 2], "s": [1, 3], "5": str(2**70),
                                              "o": "object"}


def test_plain_refuses_absurd_nesting() -> None:
    deep: Any = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(errors.BackendError, match="nests deeper"):
        plain(deep)


@pytest.mark.skipif(landlock_abi() < 1, reason="this kernel has no Landlock")
def test_python_tool_through_the_service() -> None:
    svc = service()
    out = call(svc, "python", {"code": "print(sum(range(10)))"})
    assert out["result"]["stdout"] == "45\n" and out["result"]["exit_code"] == 0
    # past the tool's own timeout (shorter than the sandbox's wall limit):
    # Timeout naming the tool, and the process is gone
    # (the sandbox's wall limit would return a result, not raise)
    svc.registry.tools["python"].timeout = 1.0
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(errors.Timeout, match="^python: "):
        call(svc, "python", {"code": "import time; time.sleep(60)"})
    assert {p.pid for p in psutil.Process().children()} <= before


# -- file tools ------------------------------------------------------------------------


class FakeKernel:
    """Storage calls as the storage manager answers them, per namespace."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], list[bytes]] = {}
        self.calls: list[tuple[MsgType, dict[str, Any], str | None]] = []

    def call(self, mtype: MsgType, body: dict[str, Any], as_namespace: str | None = None,
             timeout: float | None = None, cancelled: Any = None) -> dict[str, Any]:
        self.calls.append((mtype, body, as_namespace))
        assert as_namespace and timeout is not None and timeout > 0
        assert cancelled is not None and not cancelled.is_set()   # the call's own event
        key = (as_namespace, body.get("path", ""))
        if mtype is MsgType.STORAGE_READ_FILE:
            if key not in self.files:
                raise errors.NotFound(f"storage: no file {key[1]!r} in {as_namespace}")
            return {"path": key[1], "data": self.files[key][-1], "version": len(self.files[key])}
        if mtype is MsgType.STORAGE_WRITE_FILE:
            self.files.setdefault(key, []).append(body["data"])
            return {"path": key[1], "version": len(self.files[key])}
        if mtype is MsgType.STORAGE_LIST_DIR:
            names = sorted(p for ns, p in self.files if ns == as_namespace)
            return {"dir": body["dir"], "entries": [{"name": n, "type": "file"} for n in names]}
        raise AssertionError(mtype)


def file_service(kernel: FakeKernel) -> ToolService:
    reg = Registry()
    reg.add_all(file_tools(kernel))  # type: ignore[arg-type]
    return ToolService(reg)


def test_file_tools_work_in_the_callers_namespace() -> None:
    kernel = FakeKernel()
    svc = file_service(kernel)
    assert call(svc, "write_file", {"path": "notes/a.txt", "content": "héllo"})["result"] == {
        "path": "notes/a.txt", "version": 1}
    assert kernel.files == {("alice", "notes/a.txt"): ["héllo".encode()]}
    assert all(ns == "alice" for _, _, ns in kernel.calls)
    assert call(svc, "read_file", {"path": "notes/a.txt"})["result"] == {
        "path": "notes/a.txt", "version": 1, "content": "héllo"}
    assert call(svc, "list_files", {})["result"] == {
        "dir": "", "entries": [{"name": "notes/a.txt", "type": "file"}]}
    # another agent's call sees its own namespace only
    with pytest.raises(errors.NotFound):
        call(svc, "read_file", {"path": "notes/a.txt"}, namespace="bob")
    with pytest.raises(errors.InvalidArgument, match="no namespace"):
        call(svc, "read_file", {"path": "notes/a.txt"}, namespace=None)


def test_overwriting_through_write_file_needs_approval() -> None:
    kernel = FakeKernel()
    svc = file_service(kernel)
    call(svc, "write_file", {"path": "a.txt", "content": "one"})
    with pytest.raises(errors.ApprovalRequired) as info:
        call(svc, "write_file", {"path": "a.txt", "content": "two"})
    assert info.value.details == {"op": "storage.overwrite", "file": "a.txt"}
    assert kernel.files[("alice", "a.txt")] == [b"one"]
    # re-dispatched approved (as the scheduler does after a person said yes)
    assert call(svc, "write_file", {"path": "a.txt", "content": "two"},
                approved=True)["result"]["version"] == 2


def test_binary_files_are_read_as_text_with_a_note() -> None:
    kernel = FakeKernel()
    kernel.files[("alice", "b.bin")] = [b"\xff\xfeok"]
    out = call(file_service(kernel), "read_file", {"path": "b.bin"})["result"]
    assert out["content"].endswith("ok") and "not UTF-8" in out["note"]


# -- serve --------------------------------------------------------------------------------


def test_serve_ready_list_and_call(scheduler: Any) -> None:
    router, endpoint = scheduler
    config = from_dict({"kernel": {"heartbeat_interval": 0.1},
                        "tools": {"entry_points": False,
                                  "limits": [{"name": "python", "concurrency": 1,
                                              "timeout": 20.0}]}})
    thread = serve_in_thread(config, endpoint)
    ready = recv(router)
    assert ready.type is MsgType.WORKER_READY
    body = ready.body
    assert (body["kind"], body["name"]) == ("tool", "tools")
    assert set(body["types"]) == {"tool.list", "tool.call"}
    tools = body["info"]["tools"]
    assert set(tools) == {"calculator", "python", "read_file", "write_file", "list_files"}
    assert tools["python"] == {"concurrency": 1, "timeout": 20.0, "read_only": False,
                               "destructive": False}
    assert body["capacity"] == sum(t["concurrency"] for t in tools.values()) >= 8

    kid = send_task(router, MsgType.TOOL_LIST, {})
    reply = recv(router)
    assert reply.type is MsgType.REPLY and reply.re == kid
    assert [t["function"]["name"] for t in reply.body["tools"]] == sorted(tools)

    kid = send_task(router, MsgType.TOOL_CALL, {"name": "calculator",
                                                "arguments": {"expression": "2**10"}})
    reply = recv(router)
    assert reply.re == kid and reply.body == {"name": "calculator", "result": 1024}

    send_task(router, MsgType.TOOL_CALL, {"name": "calculator", "arguments": {"expression": 5}})
    reply = recv(router)
    assert reply.type is MsgType.ERROR and reply.body["code"] == ErrorCode.INVALID_ARGUMENT
    assert "arguments.expression" in reply.body["message"]

    send_task(router, MsgType.TOOL_CALL, {"name": "nope", "arguments": {}})
    assert recv(router).body["code"] == ErrorCode.NOT_FOUND
    stop(router, thread)


def test_capacity_is_at_least_eight() -> None:
    reg = Registry()
    reg.add(Tool("one", "x", {"type": "object"}, lambda a, c: None, concurrency=1))
    assert capacity_of(reg) == 8
