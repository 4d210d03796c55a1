"""The tool registry's validation and the calculator."""

import pytest

from aiosd.config import ToolLimits, ToolsConfig
from aiosd.tools.builtins import calculator, evaluate
from aiosd.tools.registry import Context, Registry, Tool
from libaios.errors import InvalidArgument, NotFound


def test_calculator() -> None:
    assert evaluate("(3 + 4) * 12 / 2") == 42
    assert evaluate("2 ** 10 - sqrt(16)") == 1020
    assert evaluate("-pi") < -3
    for bad in ("9 ** 9 ** 9", "__import__('os')", "1 / 0", "x + 1", "open('f')", "2 +"):
        with pytest.raises(InvalidArgument):
            evaluate(bad)


def test_validation_errors_name_the_field_and_rule() -> None:
    tool = calculator()
    with pytest.raises(InvalidArgument) as info:
        tool.check({"expression": 5})
    assert "arguments.expression" in info.value.message and "type" in info.value.message
    with pytest.raises(InvalidArgument, match="required"):
        tool.check({})
    with pytest.raises(InvalidArgument, match="additionalProperties"):
        tool.check({"expression": "1", "extra": 1})
    assert tool.check({"expression": "1+1"}) == {"expression": "1+1"}


def test_registry_limits_and_schemas() -> None:
    reg = Registry()
    reg.add(calculator())
    reg.add(Tool("rm", "remove", {"type": "object"}, lambda a, c: None))
    reg.apply_limits(ToolsConfig(limits=[ToolLimits(name="rm", concurrency=1, timeout=2.0,
                                                    destructive=True)]))
    assert reg.info()["rm"] == {"concurrency": 1, "timeout": 2.0, "read_only": False,
                                "destructive": True}
    schema = reg.schemas()[0]
    assert schema["type"] == "function" and schema["function"]["name"] == "calculator"
    with pytest.raises(NotFound, match="calculator"):
        reg.get("nope")
    assert reg.get("calculator").run({"expression": "6*7"}, Context("a", "a", None)) == 42


def test_entry_point_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def shout(text: str) -> str:
        return text.upper()

    shout.__aios_tool__ = {"description": "Shout.", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}

    class EP:
        name, value = "shout", "pkg:shout"

        def load(self) -> object:
            return shout

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [EP()])
    reg = Registry()
    reg.load_entry_points()
    tool = reg.get("shout")
    assert tool.run(tool.check({"text": "hi"}), Context("a", "a", None)) == "HI"
