"""Configuration: one TOML file loaded into a tree of typed objects.

Every value is checked as it is loaded; a bad one raises :class:`ConfigError`
naming the key (``llm.models[1].threads: ...``). With no file at all the
defaults run one ``llamacpp`` core on the embedded model with every CPU the
process may use.
"""

from __future__ import annotations

import dataclasses
import functools
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
    #: Most connections one process may hold open (agents' threads each
    #: have one); more are refused, naming this limit.
    max_sessions_per_process: int = field(default=256, metadata=_check("positive"))
    #: Most connections the processes of one uid may hold open.
    max_sessions_per_uid: int = field(default=4096, metadata=_check("positive"))
    #: Where aiosd runs as root, whom the agents it launches run as: "dynamic"
    #: (each agent a uid of its own, from 61184-65519, with no name or files),
    #: or a user name or uid. Never root: "root" or 0 is refused.
    agent_user: str = field(default="dynamic", metadata=_check("not root"))
    #: How much the daemon logs: debug, info, warning or error.
    log_level: str = field(
        default="info", metadata=_check("one of: debug, info, warning, error")
    )
    #: "text": a line a person reads; "json": one JSON object a line (ts,
    #: level, process, event, agent, call_id, message; see docs/operations.md).
    #: Under systemd the journal gets the same fields either way.
    log_format: str = field(default="text", metadata=_check("one of: text, json"))


@dataclass(frozen=True)
class AgentRule:
    """Scheduling rules for the agents of one name."""

    #: The name of the agents the rules apply to.
    agent: str = ""
    #: Higher runs sooner under the fair policy.
    priority: int = 0
    #: Most tokens (prompt + generated) a second, on average; 0: no quota.
    tokens_per_s: float = field(default=0.0, metadata=_check("non-negative"))
    #: Tokens the agent may use at once before the rate applies.
    burst: int = field(default=4096, metadata=_check("positive"))


@dataclass(frozen=True)
class SchedulerConfig:
    #: How queued calls are ordered: fifo; rr (round-robin: a call is suspended
    #: after quantum_tokens while others wait); fair (least service per agent first,
    #: with a starvation guard).
    policy: str = field(default="fifo", metadata=_check("one of: fifo, rr, fair"))
    #: rr and fair: tokens a call may generate while others wait, before it
    #: is suspended and queued again.
    quantum_tokens: int = field(default=64, metadata=_check("positive"))
    #: fair: a call waiting this long runs next, whatever its agent's service.
    starvation_s: float = field(default=10.0, metadata=_check("positive"))
    #: Rules by agent name: a fair-policy priority and a token-rate quota.
    agents: list[AgentRule] = field(default_factory=list)
    #: An agent's calls to a model go to the core holding its conversation's
    #: KV cells, unless waiting there would cost more than prefilling it again.
    affinity: bool = True
    #: A core whose decode rate stays under this fraction of its own recent
    #: median (at the same batch size) is flagged slow: an event, a warning
    #: in the log and in aiosctl status.
    slow_core_fraction: float = field(default=0.5, metadata=_check("fraction"))
    #: ... for this many seconds.
    slow_core_seconds: float = field(default=30.0, metadata=_check("positive"))


@dataclass(frozen=True)
class SupervisorConfig:
    #: First restart delay after a crash, seconds; doubles on each crash.
    backoff_initial: float = field(default=0.5, metadata=_check("positive"))
    #: Longest restart delay, seconds.
    backoff_max: float = field(default=30.0, metadata=_check("positive"))
    #: Crashes allowed within ``restart_window`` before a child is FATAL.
    restart_budget: int = field(default=5, metadata=_check("positive"))
    #: Seconds over which crashes count against ``restart_budget``.
    restart_window: float = field(default=60.0, metadata=_check("positive"))
    #: A child that stays up this long counts as RUNNING (a stable start).
    stable_after: float = field(default=1.0, metadata=_check("non-negative"))
    #: Seconds each rung of the shutdown ladder waits before the next.
    shutdown_grace: float = field(default=10.0, metadata=_check("positive"))


@dataclass(frozen=True)
class ModelConfig:
    """A named model, served by one or more LLM cores (a worker process each)."""

    #: What calls name it by (``chat(model=...)``, the gateway's ``model``).
    name: str = "smollm2-135m"
    #: Who runs it: llamacpp (a local GGUF file) or openai (an OpenAI-compatible
    #: server at ``base_url``).
    backend: str = field(default="llamacpp", metadata=_check("one of: llamacpp, openai"))
    #: llamacpp: a GGUF file, a directory holding one (such as a Hugging Face
    #: cache snapshot), or "embedded" (the model shipped with AIOS).
    path: str = "embedded"
    #: Cores serving it. Their ``cpus`` and ``devices`` are shared out among
    #: them in order (two replicas on cpus = [0, 1]: one CPU each).
    replicas: int = field(default=1, metadata=_check("positive"))
    #: Tokens one sequence (an agent's conversation) holds (llamacpp).
    n_ctx: int = field(default=2048, metadata=_check("positive"))
    #: KV cache memory in MiB: it holds kv_mb / (n_ctx x KV bytes per token)
    #: sequences, running and retained; beyond that the least recently used
    #: retained conversation is evicted from it (llamacpp; see evicted_mb).
    #: "auto": sized at start to the memory the process may use.
    kv_mb: int | str = field(default="auto", metadata=_check("auto or positive"))
    #: RAM in MiB for the cells of conversations evicted from the KV cache,
    #: from which their agents' next calls start instead of prefilling again;
    #: past it the least recently evicted go to disk; 0 keeps none in RAM
    #: (llamacpp). "auto": sized at start.
    evicted_mb: int | str = field(default="auto", metadata=_check("auto or non-negative"))
    #: Disk in MiB for the cells of conversations evicted from RAM (a file
    #: each, checked when read back); past it the least recently evicted
    #: are dropped, to be prefilled again; 0 keeps none (llamacpp).
    disk_mb: int = field(default=16384, metadata=_check("non-negative"))
    #: Flash attention (llamacpp). On, greedy output may depend on how a
    #: prompt is split and on which calls share a step; off (the default), a
    #: call's cells do not: see docs/configuration.md.
    flash_attn: bool = False
    #: Decode threads; 0 means one per CPU the core may use (llamacpp).
    threads: int = field(default=0, metadata=_check("non-negative"))
    #: CPUs to pin the cores to; empty means every CPU the process may use.
    cpus: list[int] = field(default_factory=list)
    #: Calls a core runs at once (decoded together in one batch). Each
    #: running call needs a KV sequence: kv_mb must hold slots + 1 of them.
    #: "auto": as many as the KV cache holds, up to 32.
    slots: int | str = field(default="auto", metadata=_check("auto or positive"))
    #: RAM for snapshots of suspended calls; past it they spill to disk.
    snapshot_ram_bytes: int = field(default=256 * 1024 * 1024, metadata=_check("positive"))
    #: Layers offloaded to the GPU (llamacpp): -1 all; unset, all where
    #: llama.cpp was built with GPU support and a GPU is found, else 0.
    n_gpu_layers: int | None = field(default=None, metadata=_check("layers"))
    #: The GPU (among the core's devices) that holds the model when it is
    #: not split, and the scratch buffers when it is.
    main_gpu: int = field(default=0, metadata=_check("non-negative"))
    #: How much of the model each of the core's GPUs holds, in proportion.
    tensor_split: list[float] = field(default_factory=list)
    #: GPUs the cores may see (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES in
    #: their environment); empty: the environment's own.
    devices: list[int] = field(default_factory=list)
    #: Let this model's cores use a GPU another core is given too.
    share: bool = False
    #: openai: the server's base URL, such as http://127.0.0.1:8000/v1.
    base_url: str = ""
    #: openai: the model's name on that server (default: this model's name).
    remote_name: str = ""
    #: openai: the environment variable holding the API key.
    api_key_env: str = "OPENAI_API_KEY"
    #: openai: seconds to wait for the server.
    request_timeout: float = field(default=120.0, metadata=_check("positive"))


@dataclass(frozen=True)
class CoreConfig(ModelConfig):
    """One LLM core: a worker process serving a model (``name``) with its
    share of the model's ``cpus`` and ``devices``. Made from the models,
    never written in the file."""

    #: the core's own name (the model's when it has one core, else NAME-I)
    core: str = ""
    #: which of the model's cores it is (0, 1, ...)
    index: int = 0


@dataclass(frozen=True)
class LLMConfig:
    #: The models calls can name, each served by its own cores.
    models: list[ModelConfig] = field(default_factory=lambda: [ModelConfig()])
    #: The model of a call that names none; empty: the first one.
    default_model: str = ""

    @property
    def default(self) -> str:
        return self.default_model or (self.models[0].name if self.models else "")

    @functools.cached_property
    def cores(self) -> list[CoreConfig]:
        """Every core of every model, in the order of the models (made once:
        the config does not change)."""
        counts: dict[str, int] = {}
        for model in self.models:
            counts[model.name] = counts.get(model.name, 0) + model.replicas
        out: list[CoreConfig] = []
        seen: dict[str, int] = {}
        for model in self.models:
            for r in range(model.replicas):
                i = seen.get(model.name, 0)
                seen[model.name] = i + 1
                name = model.name if counts[model.name] == 1 else f"{model.name}-{i}"
                fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
                fields.update(cpus=_share(model.cpus, model.replicas, r),
                              devices=_share(model.devices, model.replicas, r))
                out.append(CoreConfig(**fields, core=name, index=i))
        return out

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def names(self) -> list[str]:
        """The model names, each once, in the config's order."""
        return list(dict.fromkeys(m.name for m in self.models))


def _share(items: list[int], parts: int, part: int) -> list[int]:
    """Part ``part`` of ``items`` shared out evenly among ``parts``."""
    if not items:
        return []
    size = len(items) // parts
    return items[part * size:(part + 1) * size]


@dataclass(frozen=True)
class MemoryConfig:
    #: Bytes of item text the memory manager keeps in RAM.
    budget_bytes: int = field(default=8 * 1024 * 1024, metadata=_check("positive"))
    #: K of the K-LRU replacer.
    k: int = field(default=2, metadata=_check("positive"))
    #: Evict once usage passes this fraction of the budget ...
    high_water: float = field(default=0.8, metadata=_check("fraction"))
    #: ... down to this fraction.
    low_water: float = field(default=0.6, metadata=_check("fraction"))


@dataclass(frozen=True)
class StorageConfig:
    #: Bytes of keys and files (all versions) one agent may hold.
    quota_bytes: int = field(default=64 * 1024 * 1024, metadata=_check("positive"))
    #: Initial LMDB map size; it doubles whenever it fills.
    map_size: int = field(default=32 * 1024 * 1024, metadata=_check("positive"))
    #: Versions kept per key or file (the oldest beyond are dropped).
    max_versions: int = field(default=16, metadata=_check("positive"))


@dataclass(frozen=True)
class McpServerConfig:
    """An MCP server started over stdio; its tools are named SERVER__TOOL."""

    #: Its name, the prefix of its tools' names.
    name: str = ""
    #: The command that starts it (a program and its arguments).
    command: list[str] = field(default_factory=list)
    #: Environment variables to start it with.
    env: dict[str, str] = field(default_factory=dict)
    #: Calls to its tools running at once.
    concurrency: int = field(default=4, metadata=_check("positive"))
    #: Seconds a call to one of its tools may take.
    timeout: float = field(default=30.0, metadata=_check("positive"))
    #: Its tools wait for a person's approval, whatever the server says of them.
    destructive: bool = False
    #: Its tools change nothing (a call may be run again after a worker died).
    read_only: bool = False


@dataclass(frozen=True)
class ToolLimits:
    """Overrides for one tool's limits and flags, by name; what an entry
    leaves out stays as the tool has it."""

    #: The tool's name.
    name: str = ""
    #: Calls to it running at once.
    concurrency: int | None = field(default=None, metadata=_check("positive"))
    #: Seconds a call to it may take.
    timeout: float | None = field(default=None, metadata=_check("positive"))
    #: Whether it waits for a person's approval.
    destructive: bool | None = None
    #: Whether it changes nothing (a call may be run again after a worker died).
    read_only: bool | None = None


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of the python sandbox tool."""

    #: CPU seconds a run may use.
    cpu_seconds: int = field(default=5, metadata=_check("positive"))
    #: Memory a run may use, MiB.
    memory_mb: int = field(default=256, metadata=_check("positive"))
    #: Seconds a run may take on the clock.
    wall_seconds: float = field(default=10.0, metadata=_check("positive"))
    #: Bytes of stdout, and of stderr, a run returns at most.
    output_bytes: int = field(default=65536, metadata=_check("positive"))


@dataclass(frozen=True)
class ToolsConfig:
    #: Built-in tools to offer.
    builtin: list[str] = field(
        default_factory=lambda: ["calculator", "python", "read_file", "write_file", "list_files"]
    )
    #: Load tools from the "aios.tools" Python entry point group.
    entry_points: bool = True
    #: MCP servers whose tools to offer (started over stdio).
    mcp: list[McpServerConfig] = field(default_factory=list)
    #: Overrides of tools' limits and flags, by tool name.
    limits: list[ToolLimits] = field(default_factory=list)
    #: Limits of the python tool's sandbox.
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass(frozen=True)
class GroupConfig:
    """A privilege group: its members may reach each other's memory and
    storage (read, or read and write)."""

    #: The group's name.
    name: str = ""
    #: The agents in it, by name.
    members: list[str] = field(default_factory=list)
    #: What members may do to each other's memory and storage: read, or write.
    access: str = field(default="read", metadata=_check("one of: read, write"))
    #: Destructive operations done without asking a person, for members'
    #: own data ("storage.delete", "storage.overwrite", "storage.rollback",
    #: "memory.delete", "memory.update", "tool:NAME", or "*").
    preapprove: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AccessConfig:
    #: uids whose hand-started agents may register; empty: the daemon's own.
    allow_uids: list[int] = field(default_factory=list)
    #: Privilege groups: agents that may reach each other's data.
    groups: list[GroupConfig] = field(default_factory=list)
    #: Longest wait for a person's decision, seconds (the call's deadline
    #: may end it sooner); no decision means denied.
    approval_timeout: float = field(default=120.0, metadata=_check("positive"))
    #: Require approval for destructive operations at all.
    require_approval: bool = True


@dataclass(frozen=True)
class GatewayConfig:
    """The OpenAI-compatible HTTP gateway and MCP server (see docs/gateway.md)."""

    #: Run the gateway.
    enabled: bool = True
    #: "HOST:PORT" (port 0: any free port; aiosctl status shows the URL), or
    #: the path of a unix socket
    listen: str = "127.0.0.1:8090"
    #: the largest request body read, bytes
    max_body_bytes: int = field(default=4 * 2**20, metadata=_check("positive"))
    #: origins a browser may call from (CORS); none by default
    cors_origins: list[str] = field(default_factory=list)


#: The most agents whose figures the metrics may show one by one.
MAX_TOP_K = 1000


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus metrics (the gateway's /metrics, aiosctl metrics;
    see docs/metrics.md)."""

    #: Show the figures of this many agents one by one (an ``agent`` label):
    #: those with the most tokens (or calls: per_agent_by). 0: none, only
    #: kernel-wide figures, whatever the number of agents.
    per_agent_top_k: int = field(default=0, metadata=_check("non-negative"))
    #: What ranks the agents shown one by one: "tokens" or "calls".
    per_agent_by: str = field(default="tokens", metadata=_check("one of: tokens, calls"))


@dataclass(frozen=True)
class Config:
    #: Calls and connections: deadlines, heartbeats, queue and session limits.
    kernel: KernelConfig = field(default_factory=KernelConfig)
    #: Which queued call runs next, and on which core.
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    #: How crashed processes are restarted and the daemon shut down.
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    #: The models and their LLM cores.
    llm: LLMConfig = field(default_factory=LLMConfig)
    #: The memory manager: agents' runtime memory in RAM.
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    #: The storage manager: agents' durable keys and files (LMDB).
    storage: StorageConfig = field(default_factory=StorageConfig)
    #: The tool manager: built-in tools, entry points, MCP servers.
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    #: Who may reach whose data, and approval of destructive calls.
    access: AccessConfig = field(default_factory=AccessConfig)
    #: The OpenAI-compatible HTTP gateway and MCP server.
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    #: The Prometheus metrics: which figures go out one agent at a time.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# --------------------------------------------------------------------------
# Loading and validation

_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _validate_rule(key: str, value: Any, rule: str) -> None:
    if rule.startswith("auto or "):
        if value == "auto":
            return
        if isinstance(value, str):
            raise ConfigError(f"{key}: must be \"auto\" or a number, got {value!r}")
        rule = rule[len("auto or "):]
    if rule == "positive" and not value > 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
    if rule == "non-negative" and not value >= 0:
        raise ConfigError(f"{key}: must be 0 or more, got {value!r}")
    if rule == "layers" and not value >= -1:
        raise ConfigError(f"{key}: must be -1 (all layers) or a number of layers, got {value!r}")
    if rule == "fraction" and not 0 < value <= 1:
        raise ConfigError(f"{key}: must be a fraction in (0, 1], got {value!r}")
    if rule == "not root" and str(value).strip() in ("root", "0", ""):
        raise ConfigError(f"{key}: launched agents never run as root; give \"dynamic\", "
                          f"or an unprivileged user's name or uid, not {value!r}")
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
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{key}: expected a table of strings")
        return dict(value)
    if isinstance(tp, types.UnionType):
        # X | None: a key that may be left out (TOML has no null to give;
        # the config handed to children as JSON writes one as null)
        given = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and type(None) in typing.get_args(tp):
            return None
        if given == [int, str]:   # a number or a word ("auto": see the field's rule)
            if isinstance(value, str):
                return value
            return _convert(key, int, value)
        if len(given) != 1:
            raise TypeError(f"unsupported config type at {key}")
        return _convert(key, given[0], value)
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
        if rule and converted is not None:
            _validate_rule(key, converted, rule)
        kwargs[name] = converted
    return cls(**kwargs)


NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _check_models(cfg: Config) -> None:
    models = cfg.llm.models
    if not models:
        raise ConfigError("llm.models: at least one model is needed")
    first: dict[str, ModelConfig] = {}
    for i, model in enumerate(models):
        key = f"llm.models[{i}]"
        if not model.name or not model.name[0].isalnum() or not set(model.name) <= NAME_CHARS:
            raise ConfigError(f"{key}.name: must start with a letter or digit and hold only "
                              f"letters, digits, '-', '_' or '.', got {model.name!r}")
        same = first.setdefault(model.name, model)
        if (same.backend, same.path, same.base_url, same.remote_name) != (
                model.backend, model.path, model.base_url, model.remote_name):
            raise ConfigError(f"{key}: two entries name model {model.name!r} with different "
                              "backends, paths or servers; give each model a name of its own")
        if model.backend == "openai" and not model.base_url:
            raise ConfigError(f"{key}.base_url: the openai backend needs the server's URL")
        for what in ("cpus", "devices"):
            items = getattr(model, what)
            if any(n < 0 for n in items):
                raise ConfigError(f"{key}.{what}: numbers are 0 or more, got {items}")
            if len(set(items)) != len(items):
                raise ConfigError(f"{key}.{what}: {items} names one twice")
            if items and len(items) % model.replicas:
                raise ConfigError(f"{key}.{what}: {len(items)} cannot be shared out evenly "
                                  f"among {model.replicas} replicas")
        per_core = len(model.devices) // model.replicas
        if any(not x >= 0 for x in model.tensor_split) or (
                model.tensor_split and not sum(model.tensor_split) > 0):
            raise ConfigError(f"{key}.tensor_split: proportions are 0 or more, not all 0; "
                              f"got {model.tensor_split}")
        if model.devices and len(model.tensor_split) > per_core:
            raise ConfigError(f"{key}.tensor_split: {len(model.tensor_split)} proportions for "
                              f"the {per_core} GPU(s) each core is given (devices)")
        if model.devices and model.main_gpu >= per_core:
            raise ConfigError(f"{key}.main_gpu: {model.main_gpu} is not among the {per_core} "
                              "GPU(s) each core is given (devices; counted from 0)")
    default = cfg.llm.default_model
    if default and cfg.llm.model(default) is None:
        raise ConfigError(f"llm.default_model: no model {default!r} "
                          f"(there are: {', '.join(cfg.llm.names())})")
    cores = cfg.llm.cores
    names: dict[str, str] = {}
    for core in cores:
        if core.core in names:
            raise ConfigError(f"llm.models: models {names[core.core]!r} and {core.name!r} "
                              f"both have a core named {core.core!r}; rename one")
        names[core.core] = core.name
    holders: dict[int, list[CoreConfig]] = {}
    for core in cores:
        for gpu in core.devices:
            holders.setdefault(gpu, []).append(core)
    for gpu, held in sorted(holders.items()):
        if len(held) > 1 and not all(c.share for c in held):
            raise ConfigError(f"llm.models: GPU {gpu} is given to cores "
                              f"{', '.join(c.core for c in held)}; set share = true on their "
                              "models to let them share it")


def _check_names(items: list[Any], key: str, what: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not item.name:
            raise ConfigError(f"{key}[{i}].name: every {what} needs a name")
        if item.name in seen:
            raise ConfigError(f"{key}[{i}].name: {item.name!r} names two {what}s")
        seen.add(item.name)


BUILTIN_TOOLS = ("calculator", "python", "read_file", "write_file", "list_files")


def _check_services(cfg: Config) -> None:
    for i, name in enumerate(cfg.tools.builtin):
        if name not in BUILTIN_TOOLS:
            raise ConfigError(f"tools.builtin[{i}]: no built-in tool {name!r} "
                              f"(there are: {', '.join(BUILTIN_TOOLS)})")
    if cfg.memory.low_water >= cfg.memory.high_water:
        raise ConfigError("memory.low_water: must be below memory.high_water")
    _check_names(cfg.tools.mcp, "tools.mcp", "MCP server")
    for i, server in enumerate(cfg.tools.mcp):
        if not server.command:
            raise ConfigError(f"tools.mcp[{i}].command: the command that starts the server is missing")
    _check_names(cfg.tools.limits, "tools.limits", "tool limit")
    _check_names(cfg.access.groups, "access.groups", "group")
    listen = cfg.gateway.listen
    if not listen.startswith("/"):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"gateway.listen: {listen!r} is neither HOST:PORT nor the absolute "
                              "path of a unix socket")
    if cfg.metrics.per_agent_top_k > MAX_TOP_K:
        raise ConfigError(f"metrics.per_agent_top_k: at most {MAX_TOP_K} agents are shown one "
                          f"by one (each is a set of series), got {cfg.metrics.per_agent_top_k}")
    seen: set[str] = set()
    for i, rule in enumerate(cfg.scheduler.agents):
        if not rule.agent or rule.agent in seen:
            raise ConfigError(f"scheduler.agents[{i}].agent: each rule names one agent, once")
        seen.add(rule.agent)


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from plain data."""
    llm = data.get("llm")
    if isinstance(llm, dict) and "cores" in llm:
        raise ConfigError("llm.cores: cores are now given by model: [[llm.models]] with its "
                          "name, path (was model) and replicas (see docs/configuration.md)")
    cfg = _build(Config, data, "")
    _check_models(cfg)
    _check_services(cfg)
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
    """The default configuration as TOML, each key under the ``#:`` comment
    of its field above (``aiosd --print-default-config``)."""
    # (imported here: it brings tomli_w, which nothing else needs)
    from .configdoc import commented_toml

    return commented_toml(Config())
