"""What the scheduler knows, in one typed object: the calls and their
queues, the workers, the client sessions, the agents, quotas and approvals.

Every part of the scheduler (the dispatcher, the call lifecycle, the
handlers of clients, operators and workers) reads and changes this state;
none holds state of its own apart from it. Its methods keep its own
invariants (a session's counts) and answer questions about it; none does
I/O.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libaios import paths

from .. import confine, credentials, gpus
from ..config import Config
from . import access
from . import policy as policies
from .affinity import Home
from .agents import AgentTable
from .approvals import ApprovalTable
from .calls import Call, CallState
from .keys import KeyStore
from .peers import Session, Worker
from .quota import TokenBucket
from .slowcore import SlowCore
from .tally import Tally


@dataclass(eq=False)
class State:
    config: Config
    runtime_dir: Path
    data_dir: Path
    agents: AgentTable
    #: whom launched agents run as (see confine)
    users: confine.Users
    rules: access.AccessRules
    started: float
    #: the supervisor's pid (None: a scheduler run on its own, as in tests)
    supervisor_pid: int | None = None
    #: the supervisor's secret (see credentials): it proves the supervisor,
    #: and every kernel process's credential derives from it
    supervisor_token: str | None = None
    landlock_abi: int = 0
    #: per resource ("llm", "memory", "storage", "tool"): its waiting calls
    queues: dict[str, policies.Policy] = field(default_factory=dict)
    #: every call in the kernel, by its kernel id
    calls: dict[str, Call] = field(default_factory=dict)
    #: registered workers by name, and a worker connection's routing id -> name
    workers: dict[str, Worker] = field(default_factory=dict)
    worker_names: dict[bytes, str] = field(default_factory=dict)
    #: client connections that said hello, by routing id
    sessions: dict[bytes, Session] = field(default_factory=dict)
    #: open connections per ("pid", pid) and per ("uid", uid)
    session_counts: Counter[tuple[str, int | None]] = field(default_factory=Counter)
    #: per agent name: its scheduling rule, and its token-rate quota if it has one
    rules_by_agent: dict[str, Any] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    approvals: ApprovalTable = field(default_factory=ApprovalTable)
    #: tool name -> {"concurrency", "timeout", "read_only", "destructive"}
    tool_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    tool_running: dict[str, int] = field(default_factory=dict)
    #: the supervisor's process table, as it last sent it
    procs: list[dict[str, Any]] = field(default_factory=list)
    stopping: bool = False
    preemptions: int = 0
    #: where the HTTP gateway listens, as it said when it connected
    gateway_url: str | None = None
    #: core name -> the model it serves
    core_model: dict[str, str] = field(default_factory=dict)
    #: (agent id, model) -> the core holding the agent's conversation (affinity)
    homes: dict[tuple[str, str], Home] = field(default_factory=dict)
    #: per core: a chat's mean time there, seconds (moving average)
    call_s: dict[str, float] = field(default_factory=dict)
    #: per core: its calls by affinity outcome (hits, moves, new)
    affinity_counts: dict[str, Counter[str]] = field(default_factory=dict)
    #: per core: its decode rate against its own recent median (see slowcore)
    slow_cores: dict[str, SlowCore] = field(default_factory=dict)
    #: the machine's GPUs, as the supervisor found them when it started
    gpus: list[dict[str, Any]] = field(default_factory=list)
    #: calls by type and outcome, their latencies, approvals decided (metrics)
    tally: Tally = field(default_factory=Tally)
    _keys: KeyStore | None = None

    @property
    def keys(self) -> KeyStore:
        """The API keys (opened when first needed)."""
        if self._keys is None:
            self._keys = KeyStore(self.data_dir / "keys")
        return self._keys

    @classmethod
    def create(cls, config: Config, runtime_dir: Path) -> State:
        """The state of a scheduler starting under ``config``."""
        endpoint = paths.ipc(runtime_dir, paths.KERNEL_SOCKET)
        agents = AgentTable(endpoint, runtime_dir)
        agents.withheld = {model.api_key_env for model in config.llm.models
                           if model.backend == "openai" and model.api_key_env}
        sched = config.scheduler
        state = cls(
            config=config, runtime_dir=runtime_dir,
            data_dir=Path(os.environ.get("AIOS_DATA_DIR") or paths.data_dir()),
            agents=agents, users=confine.Users(config.kernel.agent_user),
            rules=access.AccessRules(config.access), started=time.time(),
            supervisor_pid=int(os.environ.get("AIOS_SUPERVISOR_PID", "0")) or None,
            supervisor_token=credentials.mine() or None,
            landlock_abi=confine.landlock_abi(),
            rules_by_agent={rule.agent: rule for rule in sched.agents},
            core_model={core.core: core.name for core in config.llm.cores},
            gpus=gpus.from_env(),
            buckets={rule.agent: TokenBucket(rule.tokens_per_s, rule.burst)
                     for rule in sched.agents if rule.tokens_per_s > 0},
        )
        state.queues = {resource: policies.make("fifo")
                        for resource in ("memory", "storage", "tool")}
        state.queues["llm"] = policies.make(
            sched.policy, sched.quantum_tokens, sched.starvation_s,
            service=state.service, priority=state.priority)
        return state

    # -- what the policies ask ----------------------------------------------------

    def service(self, agent_id: str) -> float:
        """The service an agent has received: tokens processed for it."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return 0.0
        # calls not finished yet: what they generated in earlier turns (a
        # suspended call's too) and in the turn running now
        live = sum(c.tokens + (c.turn_tokens if c.state is CallState.RUNNING else 0)
                   for c in self.calls.values() if c.agent == agent_id)
        return agent.usage.prompt_tokens + agent.usage.completion_tokens + live

    def priority(self, agent_id: str) -> int:
        agent = self.agents.get(agent_id)
        rule = self.rules_by_agent.get(agent.name if agent is not None else agent_id)
        return rule.priority if rule else 0

    def can_ever_serve(self, resource: str, model: str | None = None) -> bool:
        """Whether a worker of ``resource`` (a core of ``model``, if given)
        serves, or one may yet: not when all its processes have failed for
        good."""
        def mine(name: str) -> bool:
            return model is None or self.core_model.get(name) == model

        if any(w.kind == resource and mine(w.name) for w in self.workers.values()):
            return True
        if not self.procs:
            return True  # the process table has not arrived yet
        return any(p.get("state") != "fatal" for p in self.procs
                   if p.get("kind") == resource and mine(str(p.get("name"))))

    # -- sessions -----------------------------------------------------------------

    def add_session(self, session: Session) -> None:
        self.sessions[session.identity] = session
        for key in (("pid", session.pid), ("uid", session.uid)):
            self.session_counts[key] += 1
        if session.agent is not None:
            session.agent.sessions.add(session.identity)

    def drop_session(self, identity: bytes) -> Session | None:
        """Forget one connection: its cost is its own, never all sessions'."""
        session = self.sessions.pop(identity, None)
        if session is None:
            return None
        for key in (("pid", session.pid), ("uid", session.uid)):
            self.session_counts[key] -= 1
            if self.session_counts[key] <= 0:
                del self.session_counts[key]
        if session.agent is not None:
            session.agent.sessions.discard(identity)
        for agent in session.watching:
            agent.watchers = [w for w in agent.watchers if w[0] != identity]
        return session
