"""The scheduler's operator calls (status, the call table, ps, kill,
shutdown, the supervisor's process table, the audit log, approvals and their
decisions) and agent.run. ``AdminCalls`` works over the scheduler's state
and outbox, and ends calls through the call lifecycle."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import libaios
from libaios import errors, protocol
from libaios.protocol import Message, MsgType

from .. import confine, credentials, gpus, logs, roles
from . import metrics
from .agents import Agent, agent_name_ok
from .calls import Call, CallState
from .lifecycle import Lifecycle
from .outbox import Outbox
from .peers import Handler, Session
from .state import State

log = logging.getLogger("aiosd.scheduler")

#: The kernel services besides the LLM cores: worker name -> the kind it registers as.
SERVICES = {name: kind for name, (kind, _) in roles.SERVICES.items()}


#: Agents in one page of admin.ps by default, and at most.
PS_PAGE = 200
PS_MOST = 5000


class AdminCalls:
    """The operator calls and agent.run."""

    def __init__(self, state: State, out: Outbox, life: Lifecycle) -> None:
        self.state = state
        self.out = out
        self.life = life
        self.handlers: dict[MsgType, Handler] = {
            MsgType.AGENT_RUN: self.on_agent_run,
            MsgType.ADMIN_STATUS: self.on_status,
            MsgType.ADMIN_PS: self.on_ps,
            MsgType.ADMIN_KILL: self.on_kill,
            MsgType.ADMIN_SHUTDOWN: self.on_shutdown,
            MsgType.ADMIN_PROCS: self.on_procs,
            MsgType.ADMIN_APPROVALS: self.on_approvals,
            MsgType.ADMIN_APPROVE: self.on_decide,
            MsgType.ADMIN_DENY: self.on_decide,
            MsgType.ADMIN_AUDIT: self.on_audit,
            MsgType.ADMIN_KEYS: self.on_keys,
            MsgType.ADMIN_METRICS: self.on_metrics,
        }

    # -- approvals ---------------------------------------------------------------

    def on_approvals(self, session: Session | None, identity: bytes, msg: Message) -> None:
        now = time.time()
        rows = [a.to_dict(now) for a in self.state.approvals.pending.values()]
        self.out.send_client(identity, protocol.reply(msg.id, {"approvals": rows}))

    def on_decide(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        if not session.operator or session.internal:
            raise errors.PermissionDenied("only an operator (aiosctl) may decide approvals")
        approval_id = msg.body.get("id")
        approval = self.state.approvals.take(approval_id) if isinstance(approval_id, str) else None
        if approval is None:
            raise errors.NotFound(f"no pending approval {approval_id!r}: see `aiosctl approvals`")
        now = time.time()
        granted = msg.type is MsgType.ADMIN_APPROVE
        self.life.settle(approval, granted, f"by {session.name}", now)
        self.out.send_client(identity, protocol.reply(msg.id, {"id": approval.id, "approved": granted}))

    def on_audit(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        if not session.operator:
            raise errors.PermissionDenied("the audit log is for operators (aiosctl audit)")
        now = time.time()
        call = Call(
            kid=protocol.new_id(), client=identity, client_call_id=msg.id,
            agent=session.account, type=MsgType.AUDIT_LIST, resource="storage",
            body={k: v for k, v in msg.body.items() if k in ("after", "limit", "agent")},
            deadline=msg.deadline or now + 30, submitted=now, queued_at=now, approved=True,
        )
        self.life.submit(call)

    def on_agent_run(self, session: Session | None, identity: bytes, msg: Message) -> None:
        body = msg.body
        path = body.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise errors.InvalidArgument("agent.run: 'path' must be an absolute path to a Python file")
        if not os.path.isfile(path):
            raise errors.NotFound(f"agent.run: no agent file at {path}")
        args = body.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise errors.InvalidArgument("agent.run: 'args' must be a list of strings")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise errors.InvalidArgument("agent.run: 'env' must map strings to strings")
        assert session is not None
        requested = body.get("name")
        name = requested or Path(path).stem
        if not isinstance(name, str) or not name:
            raise errors.InvalidArgument("agent.run: 'name' must be a string of 1-64 characters")
        if not session.operator:
            # An agent's sub-agents are named under it, so that none takes
            # another agent's name, and with it that agent's data.
            prefix = f"{session.name}."
            if not requested:
                name = prefix + name
            elif not name.startswith(prefix):
                raise errors.PermissionDenied(
                    f"agent.run: a sub-agent of {session.name} is named {prefix}NAME, "
                    f"not {name!r}")
        if not agent_name_ok(name):
            raise errors.InvalidArgument("agent.run: 'name' must be a string of 1-64 characters, "
                                         "none of them a control character")
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not os.path.isdir(cwd)):
            raise errors.InvalidArgument(f"agent.run: 'cwd' {cwd!r} is not a directory")
        run_as = self._run_as(session)
        try:
            plan = confine.plan(path, cwd, self.state.runtime_dir, self.state.data_dir, run_as,
                                self.state.landlock_abi)
            url = self.state.gateway_url
            agent = self.state.agents.launch(path, args, name, cwd, env, plan,
                                             openai_base_url=f"{url}/v1" if url else None)
        except (OSError, subprocess.SubprocessError) as exc:
            self.state.users.release(run_as[0] if run_as else None)
            raise errors.InvalidArgument(f"agent.run: cannot start {path}: "
                                         f"{getattr(exc, 'strerror', None) or exc}") from None
        self.out.watch.extend(agent.pipes)
        self.out.publish(f"agent.{agent.id}.started",
                         {"agent": agent.id, "name": agent.name, "pid": agent.pid, "path": path})
        log.info("agent %s started (pid %d): %s", agent.id, agent.pid, path,
                 extra=logs.fields(event="agent.started", agent=agent.id))
        info = {"agent": agent.id, "pid": agent.pid, "name": agent.name}
        if body.get("wait"):
            agent.watchers.append((identity, msg.id))
            session.watching.append(agent)
            self.out.send_client(identity, protocol.partial(msg.id, {"event": "started", **info}))
        else:
            self.out.send_client(identity, protocol.reply(msg.id, info))

    def _run_as(self, session: Session) -> tuple[int, int] | None:
        """The uid and gid an agent that ``session`` starts runs as (None:
        the daemon's). Never the daemon's where that is root; never the
        daemon's for another user's agent, which runs as its own user."""
        kernel_side = session.operator or session.internal or (
            session.agent is not None and session.agent.launched)
        caller = session.uid
        if not kernel_side and caller is not None and caller != self.state.rules.daemon_uid:
            if os.getuid() != 0:
                raise errors.PermissionDenied(
                    f"agent.run: aiosd runs as uid {os.getuid()} and cannot start a program as "
                    f"uid {caller}; run it yourself: it connects as a hand-started agent")
            return caller, caller
        if os.getuid() != 0:
            return None
        try:
            return self.state.users.allot()
        except LookupError as exc:
            raise errors.Overloaded(f"agent.run: {exc}") from None

    def on_status(self, session: Session | None, identity: bytes, msg: Message) -> None:
        status = self.status()
        if msg.body.get("calls"):
            status["calls"] = self.call_table()
        self.out.send_client(identity, protocol.reply(msg.id, status))

    def on_metrics(self, session: Session | None, identity: bytes, msg: Message) -> None:
        """The kernel's figures, which aiosd.metrics renders for Prometheus."""
        self.out.send_client(identity, protocol.reply(msg.id, metrics.figures(self.state)))

    def call_table(self) -> list[dict[str, Any]]:
        """Every call in the kernel now, for `aiosctl top`."""
        now = time.time()
        rows = []
        for call in self.state.calls.values():
            if call.client is None:
                continue  # the kernel's own bookkeeping
            state = call.state.value
            if call.state is CallState.QUEUED and call.affinity:
                state = "suspended"
            elif call.held_for is not None:
                state = "held"   # its worker was taken for lost and may still run it
            running_for = now - call.dispatched if call.state is CallState.RUNNING else 0.0
            rows.append({
                "call": call.kid[-8:], "agent": call.agent, "type": call.type.value, "state": state,
                "worker": call.worker or call.affinity or call.held_for, "tokens": call.tokens + call.turn_tokens,
                "preemptions": call.preemptions,
                "wait_s": round(call.wait_s + (now - call.queued_at if call.state in (
                    CallState.QUEUED, CallState.PENDING) else 0.0), 3),
                "service_s": round(call.service_s + running_for, 3),
            })
        return rows

    def models(self, cores: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each model with its backend, where it is, its context, its cores,
        slots and state (ready: every core serves; partial: some do)."""
        out = []
        llm = self.state.config.llm
        for name in llm.names():
            model = llm.model(name)
            assert model is not None
            mine = [c for c in cores if c["model"] == name]
            states = {c["state"] for c in mine}
            state = (states.pop() if len(states) == 1
                     else "partial" if "ready" in states else "starting")
            out.append({
                "name": name, "backend": model.backend,
                "source": model.base_url if model.backend == "openai" else model.path,
                "remote_name": (model.remote_name or name) if model.backend == "openai" else None,
                "n_ctx": model.n_ctx if model.backend == "llamacpp" else None,
                "cores": [c["name"] for c in mine],
                "slots": sum(c.get("capacity") or 0 for c in mine),
                "state": state, "default": name == llm.default,
            })
        return out

    def status(self) -> dict[str, Any]:
        now = time.time()
        cores = []
        for core in self.state.config.llm.cores:
            worker = self.state.workers.get(core.core)
            proc = next((p for p in self.state.procs if p.get("name") == core.core), {})
            state = "ready" if worker else ("failed" if proc.get("state") == "fatal" else "starting")
            entry = {"name": core.core, "model": core.name, "backend": core.backend,
                     "state": state, "proc": proc or None,
                     "affinity": dict(self.state.affinity_counts.get(core.core, {})),
                     # as configured (info's n_gpu_layers: what the core resolved)
                     "devices": core.devices, "n_gpu_layers": core.n_gpu_layers,
                     "main_gpu": core.main_gpu, "tensor_split": core.tensor_split}
            watch = self.state.slow_cores.get(core.core)
            # its decode rate against its own recent median (see slowcore)
            entry["decode"] = watch.view() if watch is not None else None
            if worker:
                entry.update(worker.to_dict())
            cores.append(entry)
        services = []
        for name, kind in SERVICES.items():
            worker = self.state.workers.get(name)
            proc = next((p for p in self.state.procs if p.get("name") == name), {})
            state = "ready" if worker else ("failed" if proc.get("state") == "fatal" else "starting")
            entry = {"name": name, "kind": kind, "state": state}
            if worker:
                entry.update(worker.to_dict())
            services.append(entry)
        return {
            "version": libaios.__version__,
            "pid": os.getpid(),
            "supervisor_pid": self.state.supervisor_pid,
            "runtime_dir": str(self.state.runtime_dir),
            "started": self.state.started,
            "uptime_s": round(now - self.state.started, 3),
            # ready: nothing is still starting (every core and service serves
            # or has failed for good), and (under a supervisor) the process
            # table has arrived, so what status shows is complete;
            # healthy: and nothing failed
            "ready": all(c["state"] != "starting" for c in cores + services)
            and (bool(self.state.procs) or not self.state.supervisor_token),
            "healthy": all(c["state"] == "ready" for c in cores + services),
            "stopping": self.state.stopping,
            "policy": self.state.config.scheduler.policy,
            "cores": cores,
            "models": self.models(cores),
            "default_model": self.state.config.llm.default,
            "services": services,
            "approvals": len(self.state.approvals.pending),
            "procs": self.state.procs,
            "gpus": gpus.assigned(self.state.gpus, self.state.config.llm.cores),
            "queues": {name: len(q) for name, q in self.state.queues.items()},
            "tools_running": {k: v for k, v in self.state.tool_running.items() if v},
            "preemptions": self.state.preemptions,
            "running": sum(len(w.inflight) for w in self.state.workers.values()),
            "agents": sum(1 for a in self.state.agents.agents.values() if a.alive),
            "sessions": len(self.state.sessions),
            "confinement": self.confinement(),
            "gateway": self.gateway(),
            "slow_cores": sorted(name for name, watch in self.state.slow_cores.items()
                                 if watch.flagged is not None),
            "log": logs.where(),
        }

    def gateway(self) -> dict[str, Any]:
        """Where the gateway listens, and its process's state."""
        config = self.state.config.gateway
        if not config.enabled:
            return {"enabled": False}
        proc = next((p for p in self.state.procs if p.get("name") == roles.GATEWAY), {})
        url = self.state.gateway_url
        return {"enabled": True, "listen": config.listen, "url": url,
                "state": "ready" if url else proc.get("state", "starting")}

    def confinement(self) -> dict[str, Any]:
        """What keeps launched agents from the kernel, as in force here."""
        root = os.getuid() == 0
        setting = self.state.config.kernel.agent_user
        if root:
            run_as = ("a dynamic user each (uids 61184-65519)" if setting == "dynamic"
                      else f"user {setting}")
        else:
            run_as = f"the daemon's user (uid {os.getuid()}): aiosd does not run as root"
        abi = self.state.landlock_abi
        files = (f"Landlock ABI {abi}: no data or runtime directory, writes in /tmp, "
                 f"/var/tmp, /dev and the start directory only" if abi else
                 "by file permissions only: this kernel has no Landlock"
                 + ("" if root else "; agents can read the data directory"))
        return {
            "agents_run_as": run_as,
            "landlock_abi": abi,
            "files": files,
            "signals": ("confined to the agent's own processes" if abi >= 6 else
                        "by user" if root else "unconfined: agents share the daemon's user"),
            "kernel_dumpable": credentials.dumpable(),
        }

    def on_ps(self, session: Session | None, identity: bytes, msg: Message) -> None:
        """The agents, one page of them: those named in 'ids', or (with
        'live') those running or connected, newest first; 'limit' (default
        PS_PAGE) and 'offset' choose the page, and 'total' and 'counts'
        (agents by state) summarise them all."""
        body = msg.body
        limit, offset, ids = body.get("limit", PS_PAGE), body.get("offset", 0), body.get("ids")
        for key, value in (("limit", limit), ("offset", offset)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise errors.InvalidArgument(f"admin.ps: '{key}' must be a whole number >= 0")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise errors.InvalidArgument("admin.ps: 'ids' must be a list of agent ids")
        agents = list(self.state.agents.agents.values())
        counts: dict[str, int] = {}
        for agent in agents:
            counts[agent.state.value] = counts.get(agent.state.value, 0) + 1
        if ids is not None:
            chosen = [a for a in (self.state.agents.get(i) for i in ids) if a is not None]
        else:
            chosen = [a for a in reversed(agents) if a.alive or not body.get("live")]
        page = chosen[offset:offset + min(limit, PS_MOST)]
        calls: dict[tuple[str, CallState], int] = {}
        for call in self.state.calls.values():
            calls[call.agent, call.state] = calls.get((call.agent, call.state), 0) + 1
        now = time.time()
        rows = []
        for agent in page:
            row = agent.to_dict(now)
            row["queued"] = calls.get((agent.id, CallState.QUEUED), 0)
            row["running"] = calls.get((agent.id, CallState.RUNNING), 0)
            rows.append(row)
        self.out.send_client(identity, protocol.reply(
            msg.id, {"agents": rows, "total": len(chosen), "offset": offset, "counts": counts}))

    def _find_agent(self, ref: Any) -> Agent:
        if isinstance(ref, str):
            agent = self.state.agents.get(ref)
            if agent is not None:
                return agent
        matches = [
            a for a in self.state.agents.agents.values()
            if a.alive and (a.name == ref or (isinstance(ref, int) and a.pid == ref)
                            or (isinstance(ref, str) and ref.isdigit() and a.pid == int(ref)))
        ]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise errors.InvalidArgument(
                f"{ref!r} names {len(matches)} agents: give one id ({', '.join(a.id for a in matches)})"
            )
        raise errors.NotFound(f"no agent {ref!r}: see `aiosctl ps`")

    def on_kill(self, session: Session | None, identity: bytes, msg: Message) -> None:
        agent = self._find_agent(msg.body.get("agent"))
        if not agent.launched:
            raise errors.InvalidArgument(
                f"agent {agent.id} was started by hand (pid {agent.pid}); the kernel only kills "
                "agents it launched"
            )
        if not agent.alive:
            raise errors.NotFound(f"agent {agent.id} has already ended ({agent.state.value})")
        self.state.agents.kill(agent, time.time())
        self.life.forget_agent(agent)
        self.out.send_client(identity, protocol.reply(msg.id, {"agent": agent.id, "pid": agent.pid}))

    def on_shutdown(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        self.out.send_client(identity, protocol.reply(msg.id, {"stopping": True}))
        if session.name == "supervisor" and session.operator and self.state.supervisor_token:
            self.state.stopping = True  # the supervisor's ladder, first rung
        elif self.state.supervisor_pid:
            os.kill(self.state.supervisor_pid, signal.SIGTERM)
        else:
            self.state.stopping = True

    def on_keys(self, session: Session | None, identity: bytes, msg: Message) -> None:
        """The gateway's API keys: 'op' create (a 'name', 'groups'), list,
        or revoke (every key of a 'name')."""
        assert session is not None
        if session.internal:
            raise errors.PermissionDenied("admin.keys is for operators (aiosctl keys)")
        body, state = msg.body, self.state
        op = body.get("op")
        if op == "list":
            self.out.send_client(identity, protocol.reply(msg.id, {"keys": state.keys.rows()}))
            return
        name = body.get("name")
        if op not in ("create", "revoke"):
            raise errors.InvalidArgument("admin.keys: 'op' must be create, list or revoke")
        if not agent_name_ok(name) or "@" in name or "." in name:
            raise errors.InvalidArgument(
                f"admin.keys: 'name' must name an agent (1-64 characters, no control "
                f"character, '@' or '.'), got {name!r}")
        if op == "revoke":
            count = state.keys.revoke(name)
            if not count:
                raise errors.NotFound(f"admin.keys: no key of {name!r}: see `aiosctl keys list`")
            state.rules.joined.pop(name, None)   # the groups its keys brought go with them
            self.life.audit("key.revoked", {"name": name, "keys": count, "by": session.name})
            # what the gateway holds open for those keys is closed: its next
            # call says hello again, and is refused
            for ident, other in list(state.sessions.items()):
                if other.key is not None and other.name == name and state.keys.by_digest.get(
                        other.key) is None:
                    self.life.client_gone(ident)
            self.out.send_client(identity, protocol.reply(msg.id, {"name": name, "revoked": count}))
            return
        groups = body.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise errors.InvalidArgument("admin.keys: 'groups' must be a list of group names")
        unknown = [g for g in groups if not state.rules.has_group(g)]
        if unknown:
            raise errors.InvalidArgument(
                f"admin.keys: no group {unknown[0]!r}; the groups are access.groups in the "
                f"config ({', '.join(g.name for g in state.config.access.groups) or 'none'})")
        key = state.keys.create(name, groups)
        self.life.audit("key.created", {"name": name, "groups": groups, "by": session.name})
        self.out.send_client(identity, protocol.reply(
            msg.id, {"name": name, "groups": groups, "key": key}))

    def on_procs(self, session: Session | None, identity: bytes, msg: Message) -> None:
        assert session is not None
        if session.name != "supervisor" or not session.internal:
            raise errors.PermissionDenied("admin.procs comes from the supervisor only")
        procs = msg.body.get("procs")
        if isinstance(procs, list):
            old = {p.get("name"): p.get("state") for p in self.state.procs}
            self.state.procs = procs
            for proc in procs:
                if old.get(proc.get("name")) != proc.get("state"):
                    self.out.publish(f"proc.{proc.get('name')}.{proc.get('state')}", proc)
            self.life.fail_unservable(time.time())
        self.out.send_client(identity, protocol.reply(msg.id, {}))
