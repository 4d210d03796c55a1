"""Configuration: one TOML file loaded into a tree of typed objects.

Every value is checked as it is loaded; a bad one raises :class:`ConfigError`
naming the key (``llm.cores[1].threads: ...``). With no file at all the
defaults run one ``llamacpp`` core on the embedded model with every CPU the
process may use.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def _check(rule: str) -> dict[str, str]:
    """Field metadata: a constraint checked after the type (see _validate)."""
    return {"rule": rule}


@dataclass(frozen=True)
class KernelConfig:
    #: Default deadline of a system call that gives none, seconds.
    call_timeout: float = field(default=300.0, metadata=_check("positive"))
    #: Seconds between worker heartbeats.
    heartbeat_interval: float = field(default=0.5, metadata=_check("positive"))
    #: Heartbeats a worker may miss before the scheduler drops it.
    heartbeat_liveness: int = field(default=4, metadata=_check("positive"))
    #: Most calls waiting in one resource's queue; more are refused (OVERLOADED).
    max_queue: int = field(default=4096, metadata=_check("positive"))
    #: How often a call may be re-dispatched after its worker died.
    max_redispatch: int = field(default=1, metadata=_check("non-negative"))
    log_level: str = field(
        default="info", metadata=_check("one of: debug, info, warning, error")
    )


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = field(default="fifo", metadata=_check("one of: fifo"))


@dataclass(frozen=True)
class SupervisorConfig:
    #: First restart delay after a crash, seconds; doubles on each crash.
    backoff_initial: float = field(default=0.5, metadata=_check("positive"))
    backoff_max: float = field(default=30.0, metadata=_check("positive"))
    #: Crashes allowed within ``restart_window`` before a child is FATAL.
    restart_budget: int = field(default=5, metadata=_check("positive"))
    restart_window: float = field(default=60.0, metadata=_check("positive"))
    #: A child that stays up this long counts as RUNNING (a stable start).
    stable_after: float = field(default=1.0, metadata=_check("non-negative"))
    #: Seconds each rung of the shutdown ladder waits before the next.
    shutdown_grace: float = field(default=10.0, metadata=_check("positive"))


@dataclass(frozen=True)
class CoreConfig:
    """One LLM core: a worker process serving one model instance."""

    name: str = "core0"
    backend: str = field(default="llamacpp", metadata=_check("one of: llamacpp, openai"))
    #: llamacpp: a GGUF path or "embedded"; openai: the served model's name.
    model: str = "embedded"
    #: Context length in tokens (llamacpp).
    n_ctx: int = field(default=4096, metadata=_check("positive"))
    #: Decode threads; 0 means one per CPU the core may use (llamacpp).
    threads: int = field(default=0, metadata=_check("non-negative"))
    #: CPUs to pin the core to; empty means every CPU the process may use.
    cpus: list[int] = field(default_factory=list)
    #: Calls the core runs at once.
    slots: int = field(default=1, metadata=_check("positive"))
    #: openai: the server's base URL, such as http://127.0.0.1:8000/v1.
    base_url: str = ""
    #: openai: the environment variable holding the API key.
    api_key_env: str = "OPENAI_API_KEY"
    #: openai: seconds to wait for the server.
    request_timeout: float = field(default=120.0, metadata=_check("positive"))


@dataclass(frozen=True)
class LLMConfig:
    cores: list[CoreConfig] = field(default_factory=lambda: [CoreConfig()])


@dataclass(frozen=True)
class Config:
    kernel: KernelConfig = field(default_factory=KernelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# --------------------------------------------------------------------------
# Loading and validation

_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _validate_rule(key: str, value: Any, rule: str) -> None:
    if rule == "positive" and not value > 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
    if rule == "non-negative" and not value >= 0:
        raise ConfigError(f"{key}: must be 0 or more, got {value!r}")
    if rule.startswith("one of: "):
        allowed = rule[len("one of: "):].split(", ")
        if value not in allowed:
            raise ConfigError(f"{key}: must be {rule}; got {value!r}")


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if isinstance(tp, types.UnionType):
        raise TypeError(f"unsupported config type at {key}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_TYPE_WORDS.get(tp, tp)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(key, hints[name], value)
        rule = known[name].metadata.get("rule")
        if rule:
            _validate_rule(key, converted, rule)
        kwargs[name] = converted
    return cls(**kwargs)


def _check_cores(cfg: Config) -> None:
    if not cfg.llm.cores:
        raise ConfigError("llm.cores: at least one core is needed")
    seen: set[str] = set()
    for i, core in enumerate(cfg.llm.cores):
        key = f"llm.cores[{i}]"
        if not core.name or not core.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{key}.name: must be letters, digits, '-' or '_', got {core.name!r}")
        if core.name in seen:
            raise ConfigError(f"{key}.name: {core.name!r} names two cores")
        seen.add(core.name)
        if core.backend == "openai" and not core.base_url:
            raise ConfigError(f"{key}.base_url: the openai backend needs the server's URL")
        for cpu in core.cpus:
            if cpu < 0:
                raise ConfigError(f"{key}.cpus: CPU numbers are 0 or more, got {cpu}")


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from plain data."""
    cfg = _build(Config, data, "")
    _check_cores(cfg)
    return cfg


def load(path: str | Path | None) -> Config:
    """Load the TOML file at ``path``, or the defaults when ``path`` is None."""
    if path is None:
        return from_dict({})
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data)


def default_toml() -> str:
    """The default configuration as TOML (``aiosd --print-default-config``)."""
    import tomli_w

    return tomli_w.dumps(Config().to_dict())
