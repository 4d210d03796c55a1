"""Agents as the kernel knows them: the processes it launched, the
connections that introduced themselves, and what each has used.

An agent launched by the kernel gets a random credential in its environment;
the connection that presents it is bound to that agent. Nothing an agent
writes in a request can make it another agent.
"""

from __future__ import annotations

import enum
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .. import confine, credentials, procs
from .keys import AGENT_PREFIX as AGENT_KEY_PREFIX


class AgentState(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"
    KILLED = "killed"
    CONNECTED = "connected"        # started by hand, connected
    DISCONNECTED = "disconnected"  # started by hand, gone


def agent_name_ok(name: object) -> bool:
    """Whether ``name`` can name an agent (and its namespace, whose keys
    the storage and memory managers separate with NUL bytes): 1 to 64
    characters, none of them a control character."""
    return (isinstance(name, str) and 0 < len(name) <= 64
            and not any(c < " " or c == "\x7f" for c in name))


@dataclass
class Usage:
    """What an agent has used of the kernel."""

    calls: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wait_s: float = 0.0
    service_s: float = 0.0
    #: times its calls were suspended to let others run (rr, fair)
    preemptions: int = 0
    #: calls held back by its token quota (llm.chat) before they ran
    throttled: int = 0
    first_call: float | None = None
    last_done: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "wait_s": round(self.wait_s, 4),
            "service_s": round(self.service_s, 4),
            "preemptions": self.preemptions,
            "throttled": self.throttled,
        }


@dataclass(eq=False)
class Agent:
    id: str
    name: str
    launched: bool
    started: float
    state: AgentState
    pid: int | None = None
    token: str | None = None
    path: str | None = None
    popen: subprocess.Popen | None = None
    ended: float | None = None
    exit_code: int | None = None
    create_time: float | None = None   # psutil's, to tell a reused pid apart
    usage: Usage = field(default_factory=Usage)
    #: (client identity, call id) of callers streaming this agent's output.
    watchers: list[tuple[bytes, str]] = field(default_factory=list)
    #: open output pipes: fd -> stream name
    pipes: dict[int, str] = field(default_factory=dict)
    kill_at: float | None = None
    #: the client connections (identities) bound to this agent
    sessions: set[bytes] = field(default_factory=set)
    #: the uid its process runs as (a launched agent's, as the kernel chose)
    uid: int | None = None

    @property
    def alive(self) -> bool:
        return self.state in (AgentState.RUNNING, AgentState.CONNECTED)

    def turnaround(self, now: float) -> float:
        return (self.ended or now) - self.started

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "pid": self.pid,
            "state": self.state.value,
            "launched": self.launched,
            "path": self.path,
            "exit_code": self.exit_code,
            "exit": procs.describe_exit(self.exit_code) if self.ended else None,
            "started": self.started,
            "turnaround_s": round(self.turnaround(now), 4),
            **self.usage.to_dict(),
        }


class AgentTable:
    """Every agent the kernel knows, by id."""

    def __init__(self, endpoint: str, runtime_dir: Path):
        self.endpoint = endpoint
        self.runtime_dir = runtime_dir
        self.agents: dict[str, Agent] = {}
        self._by_token: dict[str, Agent] = {}
        self._by_fd: dict[int, Agent] = {}
        #: hand-started agents connected now, by name: a name is its
        #: holder's while it is connected
        self._connected: dict[str, Agent] = {}
        #: variables of the kernel's environment an agent is not given (the
        #: API keys of remote cores)
        self.withheld: set[str] = set()
        self._counter = 0

    def _new_id(self, name: str) -> str:
        self._counter += 1
        return f"{name}-{self._counter}"

    def get(self, agent_id: str) -> Agent | None:
        return self.agents.get(agent_id)

    def by_token(self, token: str) -> Agent | None:
        return self._by_token.get(token)

    def by_fd(self, fd: int) -> Agent | None:
        return self._by_fd.get(fd)

    def launch(
        self, path: str, args: list[str], name: str, cwd: str | None, env: dict[str, str],
        confinement: confine.Plan | None = None, openai_base_url: str | None = None,
    ) -> Agent:
        """Start an agent process with its credential in the environment,
        confined as ``confinement`` says. With ``openai_base_url`` (the
        gateway's), an OpenAI client in it finds the gateway, and its key
        is the agent's own (see keys)."""
        agent = Agent(
            id=self._new_id(name), name=name, launched=True, started=time.time(),
            state=AgentState.RUNNING, token=secrets.token_hex(16), path=path,
            uid=confinement.uid if confinement is not None else None,
        )
        child_env = dict(os.environ)
        child_env.update(env)
        child_env.update(
            {
                "AIOS_ENDPOINT": self.endpoint,
                "AIOS_RUNTIME_DIR": str(self.runtime_dir),
                "AIOS_AGENT_TOKEN": agent.token or "",
                "AIOS_AGENT_ID": agent.id,
                "AIOS_AGENT_NAME": name,
                "PYTHONUNBUFFERED": "1",
            }
        )
        for var in ("AIOS_CONFIG_JSON", "AIOS_GPUS_JSON", "AIOS_DATA_DIR", credentials.FD_ENV, *self.withheld):
            child_env.pop(var, None)
        if openai_base_url:
            child_env["OPENAI_BASE_URL"] = openai_base_url
            child_env["OPENAI_API_KEY"] = AGENT_KEY_PREFIX + (agent.token or "")
        if agent.uid is not None:
            child_env["HOME"] = "/"   # a dynamic user has no home
        agent.popen = procs.spawn(
            [sys.executable, path, *args],
            child_env,
            death_signal=signal.SIGTERM,
            preexec=confinement.preexec() if confinement is not None else None,
            cwd=cwd or None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        agent.pid = agent.popen.pid
        for stream, pipe in (("stdout", agent.popen.stdout), ("stderr", agent.popen.stderr)):
            assert pipe is not None
            fd = pipe.fileno()
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            agent.pipes[fd] = stream
            self._by_fd[fd] = agent
        self.agents[agent.id] = agent
        self._by_token[agent.token or ""] = agent
        return agent

    def register(self, name: str, pid: int | None) -> Agent:
        """An agent started by hand introduced itself."""
        agent = Agent(
            id=self._new_id(name), name=name, launched=False, started=time.time(),
            state=AgentState.CONNECTED, pid=pid,
        )
        if pid:
            try:
                agent.create_time = psutil.Process(pid).create_time()
            except psutil.Error:
                agent.create_time = None
        self.agents[agent.id] = agent
        self._connected[name] = agent
        return agent

    def connected(self, name: str) -> Agent | None:
        """The hand-started agent connected now under ``name``, if any."""
        agent = self._connected.get(name)
        return agent if agent is not None and agent.state is AgentState.CONNECTED else None

    def read_output(self, fd: int) -> tuple[Agent, str, bytes] | None:
        """Read what an agent wrote on ``fd`` (b"" at end of file); None if
        the fd is not an agent's or had nothing to read after all."""
        agent = self._by_fd.get(fd)
        if agent is None:
            return None
        stream = agent.pipes[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return None
        if not data:
            self.close_pipe(agent, fd)
        return agent, stream, data

    def close_pipe(self, agent: Agent, fd: int) -> None:
        agent.pipes.pop(fd, None)
        self._by_fd.pop(fd, None)
        os.close(fd)

    def reap(self, now: float, check_pids: bool = True) -> list[Agent]:
        """Launched agents whose process has exited and whose output is
        drained; with ``check_pids``, hand-started agents whose process is gone."""
        done = []
        for agent in self.agents.values():
            if agent.state is AgentState.RUNNING and agent.popen is not None:
                code = agent.popen.poll()
                if code is None or agent.pipes:
                    continue
                agent.exit_code = code
                agent.ended = now
                agent.state = AgentState.KILLED if agent.kill_at is not None else AgentState.EXITED
                if agent.token:
                    self._by_token.pop(agent.token, None)
                done.append(agent)
            elif (check_pids and agent.state is AgentState.CONNECTED and agent.pid
                  and not self._pid_alive(agent)):
                self.disconnect(agent, now)
                done.append(agent)
        return done

    def is_process_of(self, agent: Agent, pid: int) -> bool:
        """Whether ``pid`` is the agent's process or one it started."""
        if agent.pid is None:
            return False
        if pid == agent.pid:
            return True
        try:
            return any(p.pid == agent.pid for p in psutil.Process(pid).parents())
        except psutil.Error:
            return False

    def _running_launched(self) -> dict[int, Agent]:
        """Launched agents whose process runs, by pid (a process already
        waited for is gone even while its output is drained)."""
        return {a.pid: a for a in self.agents.values()
                if a.launched and a.alive and a.pid and a.popen is not None
                and a.popen.returncode is None}

    def agent_tree(self, pid: int) -> tuple[bool, Agent | None]:
        """Whether ``pid`` descends from this process, which starts nothing
        but agents (and, being their subreaper, adopts what they abandon),
        and the running agent in whose tree it is, if any."""
        try:
            ancestors = [p.pid for p in psutil.Process(pid).parents()]
        except psutil.Error:
            return False, None
        if os.getpid() not in ancestors:
            return False, None
        running = self._running_launched()
        return True, next((running[p] for p in (pid, *ancestors) if p in running), None)

    def live_launched(self, name: str) -> Agent | None:
        """A running agent the kernel launched under ``name``, if any."""
        return next((a for a in self._running_launched().values() if a.name == name), None)

    def own_children(self) -> set[int]:
        """Pids of launched agents a ``Popen`` still waits for."""
        return {a.popen.pid for a in self.agents.values()
                if a.popen is not None and a.popen.returncode is None}

    def _pid_alive(self, agent: Agent) -> bool:
        try:
            proc = psutil.Process(agent.pid)
            return agent.create_time is None or proc.create_time() == agent.create_time
        except psutil.Error:
            return False

    def disconnect(self, agent: Agent, now: float) -> None:
        agent.state = AgentState.DISCONNECTED
        agent.ended = now
        if self._connected.get(agent.name) is agent:
            del self._connected[agent.name]

    def kill(self, agent: Agent, now: float, grace: float = 3.0) -> None:
        """SIGTERM the agent's process group now, SIGKILL after ``grace``."""
        if agent.popen is None or agent.popen.poll() is not None:
            return
        agent.kill_at = now + grace
        try:
            os.killpg(agent.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def enforce_kills(self, now: float) -> None:
        for agent in self.agents.values():
            if agent.kill_at is not None and now >= agent.kill_at and agent.popen is not None:
                if agent.popen.poll() is None:
                    try:
                        os.killpg(agent.popen.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                agent.kill_at = now + 3600  # once is enough

    def prune(self, now: float, keep: float = 3600.0, most: int = 1000) -> None:
        """Forget finished agents an hour after they ended (or past ``most``)."""
        ended = sorted(
            (a for a in self.agents.values() if a.ended is not None and not a.pipes),
            key=lambda a: a.ended or 0,
        )
        excess = max(0, len(ended) - most)
        for i, agent in enumerate(ended):
            if i < excess or now - (agent.ended or now) > keep:
                self.agents.pop(agent.id, None)
