"""`aiosd --print-default-config`: every key of the configuration has a
comment, written once above its field in aiosd/config.py, and the printed
TOML loads back to the defaults."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner

from aiosd import config, configdoc
from aiosd.config import Config


def config_classes(cls: type = Config) -> list[type]:
    """``cls`` and every dataclass its keys hold (tables and lists of tables)."""
    found = [cls]
    for hint in typing.get_type_hints(cls).values():
        inner = configdoc.entry_class(hint) or hint
        if dataclasses.is_dataclass(inner) and inner not in found:
            found += [c for c in config_classes(inner) if c not in found]
    return found


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_key_has_a_comment_above_its_field(cls: type) -> None:
    docs = configdoc.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: give these fields a #: comment in aiosd/config.py: {missing}"


def test_the_comments_are_read_from_the_source() -> None:
    docs = configdoc.field_docs(config.MemoryConfig)
    assert docs["high_water"] == "Evict once usage passes this fraction of the budget ..."
    assert docs["budget_bytes"] == "Bytes of item text the memory manager keeps in RAM."
    # multi-line comments are joined; a subclass has its base's
    assert configdoc.field_docs(config.KernelConfig)["max_sessions_per_process"].startswith(
        "Most connections one process may hold open (agents' threads each have one); more")
    assert configdoc.field_docs(config.CoreConfig)["n_ctx"] == configdoc.field_docs(
        config.ModelConfig)["n_ctx"]


def test_a_field_without_a_comment_has_none() -> None:
    @dataclasses.dataclass
    class Sample:
        #: documented
        a: int = 1
        b: int = 2   # a plain comment is no doc

        #: a comment apart from its field still counts only when right above it

        c: int = 3

    assert configdoc.field_docs(Sample) == {"a": "documented"}


def commented_keys(text: str) -> list[str]:
    """The keys and table headers of ``text`` not right under a comment (the
    headers of a list's later tables excepted: its comment is above the first)."""
    lines = text.splitlines()
    bare = []
    for i, line in enumerate(lines):
        later_entry = line.startswith("[[") and line in lines[:i]
        if (line and not line.startswith(("#", " ", "]")) and not later_entry
                and (i == 0 or not lines[i - 1].startswith("#"))):
            bare.append(line)
    return bare


def test_the_default_config_prints_each_key_under_its_comment_and_loads_back() -> None:
    text = config.default_toml()
    assert config.from_dict(tomllib.loads(text)) == Config()
    assert commented_keys(text) == []
    lines = text.splitlines()
    at = lines.index("call_timeout = 300.0")
    assert lines[at - 1] == "# Default deadline of a system call that gives none, seconds."
    assert lines[lines.index("[kernel]") - 1].startswith("# ")
    # unset keys and the keys of lists of tables empty by default show commented out
    assert "# n_gpu_layers is unset" in lines
    for key in ("[[scheduler.agents]]", "[[tools.mcp]]", "[[tools.limits]]", "[[access.groups]]"):
        assert f"# {key}" in lines
    assert "## Calls to its tools running at once." in lines
    assert max(len(line) for line in lines if line.startswith("#")) <= configdoc.WIDTH


def test_a_config_with_tables_of_its_own_round_trips() -> None:
    cfg = config.from_dict({
        "llm": {"models": [{"name": "a"}, {"name": "b", "path": "/m/b.gguf", "n_gpu_layers": -1}]},
        "tools": {"mcp": [{"name": "m", "command": ["srv", "--x"], "env": {"A B": 'q"', "K": "v"}}]},
        "access": {"groups": [{"name": "g", "members": ["x", "y"], "access": "write"}]},
    })
    text = configdoc.commented_toml(cfg)
    assert config.from_dict(tomllib.loads(text)) == cfg
    assert commented_keys(text) == []
    assert text.count("[[llm.models]]") == 2 and 'env = { "A B" = "q\\"", K = "v" }' in text


def test_aiosd_prints_it(tmp_path: Path) -> None:
    from aiosd.main import main

    result = CliRunner().invoke(main, ["--print-default-config"])
    assert result.exit_code == 0, result.output
    assert result.output == config.default_toml()
    (tmp_path / "aiosd.toml").write_text(result.output)
    assert config.load(tmp_path / "aiosd.toml") == Config()
