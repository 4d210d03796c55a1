"""Chat request checks, structured output, the stop-string scanner, and the
store of suspended calls' snapshots."""

import json

import jsonschema
import pytest

from aiosd import chat as request
from aiosd.llm import structured
from aiosd.llm.backend import StopScanner
from libaios.errors import InvalidArgument

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
TOOL2 = {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}


def test_defaults() -> None:
    req = request.parse({"messages": MSG})
    assert (req.max_tokens, req.temperature, req.top_p, req.stop) == (256, 0.0, 1.0, [])
    assert req.min_tokens == 0
    held = request.parse({"messages": MSG, "max_tokens": 8, "min_tokens": 8,
                          "tools": [TOOL], "tool_choice": "none"})
    assert held.min_tokens == 8


@pytest.mark.parametrize("body, field", [
    ({}, "messages"),
    ({"messages": ["x"]}, r"messages\[0\]"),
    ({"messages": [{"role": "god", "content": "x"}]}, r"messages\[0\].role"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_tokens": True}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 1e9}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 8, "min_tokens": 9}, "min_tokens"),
    ({"messages": MSG, "min_tokens": -1}, "min_tokens"),
    ({"messages": MSG, "min_tokens": 2.5}, "min_tokens"),
    ({"messages": MSG, "min_tokens": 4, "response_format": {"type": "json_object"}}, "min_tokens"),
    ({"messages": MSG, "min_tokens": 4, "tools": [TOOL]}, "min_tokens"),
    ({"messages": MSG, "temperature": 3}, "temperature"),
    ({"messages": MSG, "stop": [1]}, "stop"),
    ({"messages": MSG, "seed": -1}, "seed"),
    ({"messages": MSG, "tools": {}}, "tools"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {}}]}, r"tools\[0\].function.name"),
    ({"messages": MSG, "tools": [TOOL, TOOL]}, "used twice"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "parameters"),
    ({"messages": MSG, "tools": [TOOL], "tool_choice": {"function": {"name": "zz"}}}, "tool_choice"),
    ({"messages": MSG, "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": MSG, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {}}}, "schema"),
    ({"messages": MSG, "tools": [TOOL], "response_format": {"type": "json_object"}}, "not both"),
])
def test_bad_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        request.parse(body)


def test_output_schemas_for_each_tool_choice() -> None:
    one = request.parse({"messages": MSG, "tools": [TOOL], "tool_choice": "required",
                         "parallel_tool_calls": False})
    assert structured.output_schema(one)["properties"]["name"] == {"const": "f"}
    two = request.parse({"messages": MSG, "tools": [TOOL, TOOL2], "tool_choice": "required",
                         "parallel_tool_calls": False})
    assert len(structured.output_schema(two)["anyOf"]) == 2
    both = request.parse({"messages": MSG, "tools": [TOOL, TOOL2], "tool_choice": "required"})
    assert len(structured.output_schema(both)["anyOf"]) == 3   # and a list of calls
    auto = request.parse({"messages": MSG, "tools": [TOOL, TOOL2]})
    assert structured.REPLY_SCHEMA in structured.output_schema(auto)["anyOf"]
    named = request.parse({"messages": MSG, "tools": [TOOL, TOOL2],
                           "tool_choice": {"type": "function", "function": {"name": "g"}}})
    assert structured.output_schema(named)["properties"]["name"] == {"const": "g"}
    assert structured.output_schema(request.parse({"messages": MSG, "tools": [TOOL],
                                                   "tool_choice": "none"})) is None


def test_prompt_messages_carry_the_instruction() -> None:
    req = request.parse({"messages": [{"role": "system", "content": "S"}] + MSG, "tools": [TOOL]})
    msgs = structured.prompt_messages(req)
    assert msgs[0]["content"].startswith("S\n\n") and "f:" in msgs[0]["content"]
    req = request.parse({"messages": MSG, "response_format": {"type": "json_object"}})
    assert structured.prompt_messages(req)[0]["role"] == "system"
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": '{"x": 1}'}}]}
    shown = structured.prompt_messages(request.parse({"messages": MSG + [call]}))
    assert json.loads(shown[-1]["content"]) == {"name": "f", "arguments": {"x": 1}}


def test_parse_answers() -> None:
    req = request.parse({"messages": MSG, "tools": [TOOL]})
    out = structured.parse_answer(req, '{"name": "f", "arguments": {"x": 2}}')
    args = json.loads(out["tool_calls"][0]["function"]["arguments"])
    jsonschema.validate(args, TOOL["function"]["parameters"])
    assert structured.parse_answer(req, '{"reply": "hello"}') == {
        "text": "hello", "tool_calls": [], "parsed": None, "finish_reason": "stop"}
    assert structured.parse_answer(req, '{"name": "f", "argu')["tool_calls"] == []
    js = request.parse({"messages": MSG, "response_format": {"type": "json_object"}})
    assert structured.parse_answer(js, '{"a": 1}')["parsed"] == {"a": 1}


def test_stop_scanner() -> None:
    s = StopScanner(["STOP"])
    assert s.feed(b"hello S") == "hello "
    assert s.feed(b"T") == ""
    assert s.feed(b"ay") == "STay"
    assert s.feed(b" then ST") == " then "
    assert s.feed(b"OP and more") == "" and s.stopped
    assert s.text == "hello STay then "
    u = StopScanner([])
    euro = "€".encode()
    assert u.feed(euro[:1]) == "" and u.feed(euro[1:]) == "€"
    assert u.feed(b"x") == "x" and u.finish() == ""


def test_snapshots_spill_past_their_bound_and_are_dropped_unread(tmp_path) -> None:
    from aiosd.llm.generation import Snapshot
    from aiosd.llm.snapshots import SnapshotStore

    def snap(n: int) -> Snapshot:
        return Snapshot(key="a", state=bytes(n), tokens=[1], pending=None, completion=[],
                        prompt_len=1, cached=0)

    store = SnapshotStore(ram_bytes=100, spill_dir=tmp_path / "snaps")
    first, second = store.put(snap(80)), store.put(snap(80))   # the first spills
    assert store.describe() == {"in_ram": 1, "ram_bytes": 80, "on_disk": 1, "spilled": 1,
                                "spill_failures": 0}
    assert len(list((tmp_path / "snaps").iterdir())) == 1
    store.drop(first)
    store.drop(second)
    store.drop("unknown")
    assert store.describe() == {"in_ram": 0, "ram_bytes": 0, "on_disk": 0, "spilled": 1,
                                "spill_failures": 0}
    assert not list((tmp_path / "snaps").iterdir())
    assert store.take(first) is None
    third = store.put(snap(10))
    assert store.take(third).nbytes == 10 and store.take(third) is None


def _snapshot(n: int):
    from aiosd.llm.generation import Snapshot

    return Snapshot(key="a", state=bytes(n), tokens=[1], pending=None, completion=[],
                    prompt_len=1, cached=0)


def test_a_snapshot_that_cannot_be_spilled_stays_in_ram(tmp_path) -> None:
    from aiosd.llm.snapshots import SnapshotStore

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")   # the spill directory cannot be made under a file
    store = SnapshotStore(ram_bytes=100, spill_dir=blocker / "snaps")
    first, second = store.put(_snapshot(80)), store.put(_snapshot(70))
    assert store.describe() == {"in_ram": 2, "ram_bytes": 150, "on_disk": 0, "spilled": 0,
                                "spill_failures": 1}
    assert store.take(first).nbytes == 80 and store.take(second).nbytes == 70
    assert store.describe()["ram_bytes"] == 0


def test_a_snapshot_being_spilled_can_be_taken_or_dropped_without_waiting(tmp_path) -> None:
    import pickle
    import threading

    from aiosd.llm import snapshots
    from aiosd.llm.snapshots import SnapshotStore

    writing, release = threading.Event(), threading.Event()

    class SlowPickle:   # stands in for pickle in the store: the write waits to be released
        HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
        load = staticmethod(pickle.load)

        @staticmethod
        def dump(obj, fh, protocol):
            writing.set()
            release.wait(10)
            pickle.dump(obj, fh, protocol=protocol)

    store = SnapshotStore(ram_bytes=100, spill_dir=tmp_path / "snaps")
    for outcome in ("taken", "dropped"):
        writing.clear()
        release.clear()
        first = store.put(_snapshot(80))
        original = snapshots.pickle
        snapshots.pickle = SlowPickle
        try:
            putter = threading.Thread(target=store.put, args=(_snapshot(80),))
            putter.start()
            assert writing.wait(10)
            # the store's lock is free while the file is written
            if outcome == "taken":
                assert store.take(first).nbytes == 80
            else:
                store.drop(first)
            assert store.describe()["in_ram"] == 1
            release.set()
            putter.join(10)
        finally:
            snapshots.pickle = original
        # the file written for a snapshot that is gone is removed, never indexed
        assert store.describe()["on_disk"] == 0 and store.take(first) is None
        assert not list((tmp_path / "snaps").iterdir())
        store.clear()
