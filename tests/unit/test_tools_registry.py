"""The tool registry: OpenAI-style schemas, argument validation that names the
field and the rule, limits overrides, and tools from entry points."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import pytest

from aiosd import chat as chat_request
from aiosd.config import ConfigError, ToolLimits, ToolsConfig, from_dict
from aiosd.tools.builtins import builtin_tools, calculator
from aiosd.tools.registry import (
    Context,
    Registry,
    Tool,
    aios_tool,
    parameters_from_signature,
    tool_from_object,
)
from aiosd.tools.service import registry_of
from libaios.errors import InvalidArgument, NotFound

ALL_BUILTINS = {"calculator", "python", "read_file", "write_file", "list_files"}


def ctx() -> Context:
    return Context(agent="a1", namespace="alice")


def nested_tool() -> Tool:
    return Tool("plan", "Plan steps.", {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "minItems": 1,
                      "items": {"type": "object",
                                "properties": {"title": {"type": "string"},
                                               "hours": {"type": "number", "minimum": 0}},
                                "required": ["title"]}},
            "mode": {"enum": ["fast", "careful"]},
        },
        "required": ["steps"], "additionalProperties": False,
    }, lambda args, c: len(args["steps"]))


# -- schemas ------------------------------------------------------------------------


def test_openai_schema_shape_and_flags_outside_function() -> None:
    schema = calculator().openai_schema()
    assert schema["type"] == "function"
    assert set(schema["function"]) == {"name", "description", "parameters"}
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]
    assert schema["aios"] == {"concurrency": 16, "timeout": 5.0, "read_only": True,
                              "destructive": False}


def test_tool_list_can_go_straight_into_chat() -> None:
    reg = Registry()
    reg.add_all(builtin_tools(ToolsConfig(), None))
    reg.add(nested_tool())
    tools = reg.schemas()
    assert {t["function"]["name"] for t in tools} == ALL_BUILTINS | {"plan"}
    req = chat_request.parse({"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                              "tool_choice": {"type": "function",
                                              "function": {"name": "calculator"}}})
    assert req.tool_names() == sorted(ALL_BUILTINS | {"plan"})
    # the schema handed out is a copy: whatever the caller does to it, the
    # registry's own stays as it was
    tools[0]["function"]["parameters"]["properties"].clear()
    assert reg.schemas()[0]["function"]["parameters"]["properties"]


def test_info_is_what_ready_announces() -> None:
    reg = Registry()
    reg.add_all(builtin_tools(ToolsConfig(), None))
    info = reg.info()
    assert set(info) == ALL_BUILTINS
    for flags in info.values():
        assert set(flags) == {"concurrency", "timeout", "read_only", "destructive"}
    assert info["read_file"]["read_only"] and not info["write_file"]["read_only"]
    assert info["python"]["timeout"] == ToolsConfig().sandbox.wall_seconds + 5.0


# -- validation ---------------------------------------------------------------------


def test_validation_error_names_the_field_and_rule() -> None:
    tool = calculator()
    with pytest.raises(InvalidArgument) as info:
        tool.check({"expression": 5})
    msg = info.value.message
    assert msg.startswith("calculator: arguments.expression: 5 is not of type 'string'")
    assert "(rule: type)" in msg
    assert info.value.details == {"tool": "calculator", "path": "arguments.expression",
                                  "rule": "type"}


@pytest.mark.parametrize("arguments, path, rule", [
    ({}, "arguments", "required"),
    ({"expression": "1", "extra": 1}, "arguments", "additionalProperties"),
    ({"expression": ""}, "arguments.expression", "minLength"),
    ({"expression": "1" * 1001}, "arguments.expression", "maxLength"),
])
def test_calculator_argument_rules(arguments: dict[str, Any], path: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        calculator().check(arguments)
    assert info.value.message.startswith(f"calculator: {path}: ")
    assert info.value.message.endswith(f"(rule: {rule})")


@pytest.mark.parametrize("arguments, expected", [
    ({"steps": []}, "plan: arguments.steps: [] should be non-empty (rule: minItems)"),
    ({"steps": [{"title": "a"}, {"hours": 1}]},
     "plan: arguments.steps[1]: 'title' is a required property (rule: required)"),
    ({"steps": [{"title": "a", "hours": -1}]},
     "plan: arguments.steps[0].hours: -1 is less than the minimum of 0 (rule: minimum)"),
    ({"steps": [{"title": "a"}], "mode": "slow"},
     "plan: arguments.mode: 'slow' is not one of ['fast', 'careful'] (rule: enum)"),
])
def test_nested_paths(arguments: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        nested_tool().check(arguments)
    assert info.value.message == expected


def test_arguments_must_be_a_map_and_valid_ones_pass() -> None:
    with pytest.raises(InvalidArgument, match="arguments must be a map, not list"):
        calculator().check([1])
    assert calculator().check({"expression": "1+1"}) == {"expression": "1+1"}
    assert nested_tool().check({"steps": [{"title": "x", "hours": 2.5}]})


def test_unknown_tool_lists_the_available_ones() -> None:
    reg = Registry()
    reg.add(calculator())
    reg.add(nested_tool())
    with pytest.raises(NotFound) as info:
        reg.get("nope")
    assert "'nope'" in info.value.message and "calculator, plan" in info.value.message
    with pytest.raises(NotFound):
        reg.get(None)
    assert reg.get("calculator").run({"expression": "6*7"}, ctx()) == 42


def test_bad_tools_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry()
    def noop(a: Any, c: Any) -> None:
        return None

    assert not reg.add(Tool("has space", "x", {"type": "object"}, noop))
    assert not reg.add(Tool("x" * 65, "x", {"type": "object"}, noop))
    assert not reg.add(Tool("badschema", "x", {"type": "objekt"}, noop))
    assert not reg.add(Tool("zero", "x", {"type": "object"}, noop, concurrency=0))
    assert reg.add(Tool("fine", "x", {"type": "object"}, noop))
    assert not reg.add(Tool("fine", "again", {"type": "object"}, noop))
    assert list(reg.tools) == ["fine"] and reg.tools["fine"].description == "x"
    assert "name is taken" in caplog.text and "not a valid JSON schema" in caplog.text


# -- limits -------------------------------------------------------------------------


def test_limits_override_what_they_give_and_leave_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry()
    reg.add(calculator())
    reg.add(Tool("rm", "remove", {"type": "object"}, lambda a, c: None, destructive=True,
                 concurrency=2, timeout=15.0))
    reg.add(Tool("mv", "move", {"type": "object"}, lambda a, c: None))
    reg.add(Tool("ls", "list", {"type": "object"}, lambda a, c: None, destructive=True))
    reg.apply_limits(ToolsConfig(limits=[
        ToolLimits(name="rm", timeout=2.0),          # concurrency and destructive stay
        ToolLimits(name="mv", concurrency=3, timeout=9.0, destructive=True),
        ToolLimits(name="calculator", concurrency=2, timeout=1.0),  # read_only stays
        ToolLimits(name="ls", destructive=False, read_only=True),  # flags, said outright
        ToolLimits(name="ghost", concurrency=1, timeout=1.0),
    ]))
    info = reg.info()
    assert info["rm"] == {"concurrency": 2, "timeout": 2.0, "read_only": False, "destructive": True}
    assert info["mv"] == {"concurrency": 3, "timeout": 9.0, "read_only": False, "destructive": True}
    assert info["ls"] == {"concurrency": 4, "timeout": 30.0, "read_only": True, "destructive": False}
    assert info["calculator"] == {"concurrency": 2, "timeout": 1.0, "read_only": True,
                                  "destructive": False}
    assert reg.schemas()[0]["aios"]["concurrency"] == 2
    assert "'ghost'" in caplog.text
    # the tool still validates and runs after being replaced
    assert reg.get("calculator").run(reg.get("calculator").check({"expression": "2*3"}), ctx()) == 6


def test_from_config_builtins_subset_and_limits() -> None:
    cfg = from_dict({"tools": {"builtin": ["calculator", "read_file"], "entry_points": False,
                               "limits": [{"name": "read_file", "concurrency": 2,
                                           "timeout": 5.0}]}}).tools
    reg = registry_of(cfg)
    assert set(reg.tools) == {"calculator", "read_file"}
    assert reg.info()["read_file"]["concurrency"] == 2
    # an entry that gives only a flag leaves the tool's limits as they were
    python = registry_of(from_dict({"tools": {"builtin": ["python"], "entry_points": False}}).tools)
    own = python.info()["python"]
    cfg = from_dict({"tools": {"builtin": ["python"], "entry_points": False,
                               "limits": [{"name": "python", "destructive": True}]}}).tools
    assert registry_of(cfg).info()["python"] == {**own, "destructive": True}
    with pytest.raises(ConfigError, match="concurrency: must be greater than 0"):
        from_dict({"tools": {"limits": [{"name": "python", "concurrency": 0}]}})


# -- entry points -------------------------------------------------------------------


def shout(text: str, times: int = 1) -> str:
    """Shout the text."""
    return (text.upper() + " ") * times


shout.__aios_tool__ = {"description": "Shout.", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}, "times": {"type": "integer"}},
    "required": ["text"]}, "concurrency": 2, "read_only": True}


@aios_tool(timeout=3.0, destructive=True)
def wipe(table: str, keep: bool = False) -> dict[str, Any]:
    """Wipe a table."""
    return {"wiped": table, "kept": keep}


def not_a_tool() -> None:
    pass


class FakeEntryPoint:
    def __init__(self, name: str, value: str, obj: Any):
        self.name, self.value, self._obj = name, value, obj

    def load(self) -> Any:
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_entry_points(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    as_tool = Tool("weather", "The weather.", {"type": "object",
                                               "properties": {"city": {"type": "string"}}},
                   lambda args, c: f"sunny in {args['city']} for {c.namespace}")
    eps = [
        FakeEntryPoint("shout", "pkg.tools:shout", shout),
        FakeEntryPoint("wipe", "pkg.tools:wipe", wipe),
        FakeEntryPoint("weather_ep", "pkg.tools:WEATHER", as_tool),
        FakeEntryPoint("broken", "pkg.broken:tool", ImportError("no module named pkg.broken")),
        FakeEntryPoint("plain", "pkg.tools:not_a_tool", not_a_tool),
        FakeEntryPoint("calculator", "evil:calculator", shout),  # may not shadow a built-in
    ]
    seen: list[str] = []

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        seen.append(group)
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    caplog.set_level(logging.ERROR)
    reg = registry_of(ToolsConfig(builtin=["calculator"]))
    assert seen == ["aios.tools"]
    assert set(reg.tools) == {"calculator", "shout", "wipe", "weather"}
    assert reg.tools["calculator"].source == "builtin"
    assert "broken" in caplog.text and "no module named pkg.broken" in caplog.text
    assert "neither a Tool nor a function" in caplog.text

    t = reg.get("shout")
    assert (t.description, t.concurrency, t.read_only, t.source) == (
        "Shout.", 2, True, "entry point pkg.tools:shout")
    assert t.run(t.check({"text": "hi", "times": 2}), ctx()) == "HI HI "
    with pytest.raises(InvalidArgument, match=r"arguments.times: 'x' is not of type 'integer'"):
        t.check({"text": "hi", "times": "x"})

    w = reg.get("wipe")  # schema from the signature, description from the docstring
    assert w.description == "Wipe a table."
    assert w.parameters["required"] == ["table"]
    assert w.parameters["properties"] == {"table": {"type": "string"}, "keep": {"type": "boolean"}}
    assert (w.timeout, w.destructive) == (3.0, True)
    assert w.run(w.check({"table": "t"}), ctx()) == {"wiped": "t", "kept": False}
    with pytest.raises(InvalidArgument, match="rule: additionalProperties"):
        w.check({"table": "t", "drop": True})

    assert reg.get("weather").run({"city": "Oslo"}, ctx()) == "sunny in Oslo for alice"


def test_entry_points_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(**_: Any) -> None:
        raise AssertionError("entry points were read although tools.entry_points is off")

    monkeypatch.setattr(importlib.metadata, "entry_points", boom)
    reg = registry_of(ToolsConfig(builtin=[], entry_points=False))
    assert reg.tools == {}


def test_signature_schema_and_tool_from_object() -> None:
    def f(a: int, b: float, *args: Any, c: str = "x", d: list | None = None, e=None,
          **kw: Any) -> None:
        pass

    from typing import Optional

    def g(x: int | None, y: Optional[str] = None, z: int | str = 1) -> None:  # noqa: UP045
        pass

    schema = parameters_from_signature(f)
    assert schema["properties"] == {"a": {"type": "integer"}, "b": {"type": "number"},
                                    "c": {"type": "string"}, "d": {"type": "array"}, "e": {}}
    g.__annotations__ = {"x": int | None, "y": Optional[str], "z": int | str}  # noqa: UP045
    assert parameters_from_signature(g)["properties"] == {
        "x": {"type": "integer"}, "y": {"type": "string"}, "z": {}}
    assert schema["required"] == ["a", "b"]
    with pytest.raises(TypeError):
        tool_from_object("x", object(), "test")
