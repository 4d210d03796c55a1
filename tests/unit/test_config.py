"""Configuration: typed, validated, and every error names its key."""

import tomllib
from pathlib import Path

import pytest

from aiosd import config
from aiosd.config import Config, ConfigError


def test_defaults_run_one_embedded_core() -> None:
    cfg = config.load(None)
    assert [(c.core, c.name, c.backend, c.path) for c in cfg.llm.cores] == [
        ("smollm2-135m", "smollm2-135m", "llamacpp", "embedded")]
    assert cfg.llm.default == "smollm2-135m"


def test_replicas_and_entries_naming_one_model_make_its_cores() -> None:
    cfg = config.from_dict({"llm": {"default_model": "b", "models": [
        {"name": "a", "replicas": 2, "cpus": [0, 1], "devices": [2, 3], "threads": 1},
        {"name": "b", "path": "/m/b.gguf"},
        {"name": "b", "path": "/m/b.gguf", "devices": [5]}]}})
    cores = [(c.core, c.name, c.index, c.cpus, c.devices) for c in cfg.llm.cores]
    assert cores == [("a-0", "a", 0, [0], [2]), ("a-1", "a", 1, [1], [3]),
                     ("b-0", "b", 0, [], []), ("b-1", "b", 1, [], [5])]
    assert cfg.llm.names() == ["a", "b"] and cfg.llm.default == "b"


def test_old_core_tables_are_refused_with_what_to_write_instead() -> None:
    with pytest.raises(ConfigError, match=r"^llm\.cores: .*\[\[llm\.models\]\]"):
        config.from_dict({"llm": {"cores": [{"name": "core0"}]}})


def test_gpus_are_shared_only_where_the_config_says_so() -> None:
    two = [{"name": "a", "devices": [0]}, {"name": "b", "path": "/b.gguf", "devices": [0, 1]}]
    with pytest.raises(ConfigError, match="GPU 0 is given to cores a, b"):
        config.from_dict({"llm": {"models": two}})
    shared = [{**m, "share": True} for m in two]
    assert [c.devices for c in config.from_dict({"llm": {"models": shared}}).llm.cores] == [
        [0], [0, 1]]


def test_default_toml_round_trips() -> None:
    assert config.from_dict(tomllib.loads(config.default_toml())) == Config()


@pytest.mark.parametrize("data, key", [
    ({"bogus": 1}, "bogus"),
    ({"kernel": {"bogus": 1}}, "kernel.bogus"),
    ({"kernel": {"call_timeout": "x"}}, "kernel.call_timeout"),
    ({"kernel": {"max_queue": True}}, "kernel.max_queue"),
    ({"kernel": {"call_timeout": 0}}, "kernel.call_timeout"),
    ({"kernel": {"log_level": "loud"}}, "kernel.log_level"),
    ({"kernel": {"log_format": "xml"}}, "kernel.log_format"),
    ({"scheduler": {"slow_core_fraction": 0}}, "scheduler.slow_core_fraction"),
    ({"scheduler": {"slow_core_fraction": 1.5}}, "scheduler.slow_core_fraction"),
    ({"scheduler": {"slow_core_seconds": -1}}, "scheduler.slow_core_seconds"),
    ({"scheduler": {"policy": "lottery"}}, "scheduler.policy"),
    ({"llm": {"models": []}}, "llm.models"),
    ({"llm": {"models": [{"name": "a"}, {"name": "a", "path": "/x.gguf"}]}}, "llm.models[1]"),
    ({"llm": {"models": [{"name": "no/slash"}]}}, "llm.models[0].name"),
    ({"llm": {"models": [{"name": "r", "backend": "openai"}]}}, "llm.models[0].base_url"),
    ({"llm": {"models": [{"threads": -1}]}}, "llm.models[0].threads"),
    ({"llm": {"models": [{"cpus": [-3]}]}}, "llm.models[0].cpus"),
    ({"llm": {"models": [{"replicas": 2, "cpus": [0, 1, 2]}]}}, "llm.models[0].cpus"),
    ({"llm": {"models": [{"replicas": 0}]}}, "llm.models[0].replicas"),
    ({"llm": {"default_model": "gpt-4"}}, "llm.default_model"),
    ({"llm": {"models": [{"n_gpu_layers": -2}]}}, "llm.models[0].n_gpu_layers"),
    ({"llm": {"models": [{"n_gpu_layers": "all"}]}}, "llm.models[0].n_gpu_layers"),
    ({"llm": {"models": [{"devices": [-1]}]}}, "llm.models[0].devices"),
    ({"llm": {"models": [{"devices": [1, 1]}]}}, "llm.models[0].devices"),
    ({"llm": {"models": [{"devices": ["0"]}]}}, "llm.models[0].devices"),
    ({"llm": {"models": [{"replicas": 2, "devices": [0, 1, 2]}]}}, "llm.models[0].devices"),
    ({"llm": {"models": [{"tensor_split": [-1.0, 2.0]}]}}, "llm.models[0].tensor_split"),
    ({"llm": {"models": [{"tensor_split": [0, 0]}]}}, "llm.models[0].tensor_split"),
    ({"llm": {"models": [{"devices": [0], "tensor_split": [1, 1]}]}},
     "llm.models[0].tensor_split"),
    ({"llm": {"models": [{"devices": [0, 1], "main_gpu": 2}]}}, "llm.models[0].main_gpu"),
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
