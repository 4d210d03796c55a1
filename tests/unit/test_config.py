"""Configuration: typed, validated, and every error names its key."""

import tomllib
from pathlib import Path

import pytest

from aiosd import config
from aiosd.config import Config, ConfigError


def test_defaults_run_one_embedded_core() -> None:
    cfg = config.load(None)
    assert [(c.name, c.backend, c.model) for c in cfg.llm.cores] == [("core0", "llamacpp", "embedded")]


def test_default_toml_round_trips() -> None:
    assert config.from_dict(tomllib.loads(config.default_toml())) == Config()


@pytest.mark.parametrize("data, key", [
    ({"bogus": 1}, "bogus"),
    ({"kernel": {"bogus": 1}}, "kernel.bogus"),
    ({"kernel": {"call_timeout": "x"}}, "kernel.call_timeout"),
    ({"kernel": {"max_queue": True}}, "kernel.max_queue"),
    ({"kernel": {"call_timeout": 0}}, "kernel.call_timeout"),
    ({"kernel": {"log_level": "loud"}}, "kernel.log_level"),
    ({"scheduler": {"policy": "lottery"}}, "scheduler.policy"),
    ({"llm": {"cores": []}}, "llm.cores"),
    ({"llm": {"cores": [{"name": "a"}, {"name": "a"}]}}, "llm.cores[1].name"),
    ({"llm": {"cores": [{"name": "r", "backend": "openai"}]}}, "llm.cores[0].base_url"),
    ({"llm": {"cores": [{"threads": -1}]}}, "llm.cores[0].threads"),
    ({"llm": {"cores": [{"cpus": [-3]}]}}, "llm.cores[0].cpus"),
    ({"memory": {"high_water": 1.5}}, "memory.high_water"),
    ({"memory": {"low_water": 0.9}}, "memory.low_water"),
    ({"tools": {"builtin": ["teleport"]}}, "tools.builtin[0]"),
    ({"tools": {"mcp": [{"name": "m"}]}}, "tools.mcp[0].command"),
    ({"access": {"groups": [{"name": "g", "access": "admin"}]}}, "access.groups[0].access"),
])
def test_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    assert str(info.value).startswith(key), str(info.value)


def test_ints_are_accepted_for_floats_and_files_load(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[kernel]\ncall_timeout = 5\n")
    assert config.load(path).kernel.call_timeout == 5.0
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")
    path.write_text("[kernel\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_the_config_children_are_given_reads_back() -> None:
    """The supervisor hands its children the validated configuration as
    JSON (AIOS_CONFIG_JSON); a [[tools.limits]] entry as docs/tools.md shows
    it (no flags) must read back the same."""
    import json

    cfg = config.from_dict({"tools": {"limits": [{"name": "python", "concurrency": 1,
                                                  "timeout": 20.0}]}})
    assert config.from_dict(json.loads(cfg.to_json())) == cfg
