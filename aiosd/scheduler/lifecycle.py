"""The life of a call in the scheduler, over its state and outbox: started
on a worker as the dispatcher decides, suspended, held for approval,
finished, failed, cancelled, timed out, run again when its worker is lost,
dropped when its agent is gone.

Every handler (clients, admin, workers) and the scheduler's tick end calls
through this one place, so a call's accounting (its agent's usage, its
quota, its slot) is done once, the same way, however it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil

from libaios import errors, protocol
from libaios.protocol import Message, MsgType

from .. import logs
from . import dispatcher, tally
from .affinity import Home
from .agents import Agent
from .approvals import Approval
from .calls import Call, CallState
from .outbox import Outbox
from .peers import Worker, parent_of
from .state import State

log = logging.getLogger("aiosd.scheduler")

#: How long a worker may take to let go of a cancelled call before it is
#: considered wedged and killed (the supervisor restarts it).
CANCEL_GRACE = 5.0
#: weight of the newest call in a core's mean call time
CALL_S_WEIGHT = 0.2


def _count(value: object) -> int:
    """A token count from a worker's usage (0 if it is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def chat_usage(result: Message) -> tuple[int, int]:
    """(prompt, completion) tokens of a chat's reply, as its core counted them."""
    tokens = result.body.get("usage")
    tokens = tokens if isinstance(tokens, dict) else {}
    return _count(tokens.get("prompt_tokens")), _count(tokens.get("completion_tokens"))


class Lifecycle:
    def __init__(self, state: State, out: Outbox, clock: Callable[[], float] = time.time):
        self.state = state
        self.out = out
        self.clock = clock

    # -- starting ----------------------------------------------------------------

    def dispatch(self) -> None:
        """Start what the dispatcher decides can start now."""
        now = self.clock()
        decided = dispatcher.plan(self.state, now)
        for call in decided.throttled:
            call.throttled = True
        for start in decided.starts:
            self.state.queues[start.call.resource].remove(start.call)
            if start.outcome is not None:
                self.state.affinity_counts.setdefault(start.worker.name, Counter())[start.outcome] += 1
            self.start(start.call, start.worker, now)

    def preempt(self) -> None:
        """Ask the running calls the dispatcher chooses to give way."""
        for call in dispatcher.preemptions(self.state, self.clock()):
            call.suspending = True
            self.out.send_worker(self.state.workers[call.worker or ""],
                                 protocol.call(MsgType.WORKER_SUSPEND, {"call": call.kid}))

    def occupy(self, call: Call, worker: Worker, now: float) -> None:
        """``call`` runs on ``worker`` from ``now``, holding one of its slots
        (and of its tool's); ``release`` is the reverse."""
        call.wait_s += now - call.queued_at
        call.state = CallState.RUNNING
        call.worker = worker.name
        call.dispatched = now
        worker.inflight[call.kid] = call
        if call.tool is not None:
            self.state.tool_running[call.tool] = self.state.tool_running.get(call.tool, 0) + 1

    def start(self, call: Call, worker: Worker, now: float) -> None:
        self.occupy(call, worker, now)
        call.attempts += 1
        worker.last_dispatch = now
        call.turn_tokens = 0
        call.suspending = False
        task = Message(MsgType.WORKER_TASK, protocol.new_id(), call.task_body(),
                       deadline=call.deadline)
        self.out.send_worker(worker, task)
        log.debug("%s runs on %s (attempt %d)", call.type.value, worker.name, call.attempts,
                  extra=logs.fields(event="call.started", agent=call.agent, call_id=call.kid))

    def release(self, worker: Worker, call: Call) -> None:
        """``call`` no longer holds a slot of ``worker`` (nor of its tool)."""
        worker.inflight.pop(call.kid, None)
        running = self.state.tool_running
        if call.tool is not None and running.get(call.tool):
            running[call.tool] -= 1

    def release_held(self, call: Call) -> None:
        """Release ``call``'s slot if its worker still counts it as running
        (a result that still comes for it is then passed over)."""
        worker = self.state.workers.get(call.worker or "")
        if worker is not None and worker.inflight.get(call.kid) is call:
            self.release(worker, call)

    # -- ending ------------------------------------------------------------------

    def finish(self, call: Call, result: Message | None, now: float) -> None:
        """Account a call that left the kernel and answer its caller
        (``result`` None: the caller already has its answer, or is gone)."""
        state = self.state
        state.calls.pop(call.kid, None)
        state.approvals.drop_call(call)
        if call.state is CallState.QUEUED and call.resume is not None:
            # suspended, and never to resume
            worker = state.workers.get(call.affinity or "")
            if worker is not None:
                self.drop_snapshot(worker, call.resume)
        if call.state is CallState.RUNNING:
            call.service_s += now - call.dispatched
        elif call.state is CallState.QUEUED:
            call.wait_s += now - call.queued_at
        if result is not None:
            self.out.send_client(call.client, result)
        prompt = completion = 0
        if result is None:
            outcome = tally.DROPPED
        elif result.type is MsgType.ERROR:
            outcome = tally.outcome_of(result.body.get("code"))
        else:
            outcome = "ok"
            if call.type is MsgType.LLM_CHAT:
                prompt, completion = chat_usage(result)
                state.tally.chat_tokens(call.model or "", prompt, completion)
        self.record_end(call, outcome, result, now)
        agent = state.agents.get(call.agent)
        if agent is None:
            return
        usage = agent.usage
        usage.calls += 1
        usage.wait_s += call.wait_s
        usage.service_s += call.service_s
        usage.preemptions += call.preemptions
        usage.throttled += call.throttled
        usage.last_done = now
        if result is None or result.type is MsgType.ERROR:
            usage.failed += 1
            self.charge_generated(call, now)
        elif call.type is MsgType.LLM_CHAT:
            self.served_chat(call, prompt + completion)
            usage.prompt_tokens += prompt
            usage.completion_tokens += completion
            bucket = state.buckets.get(agent.name)
            if bucket is not None:
                bucket.charge(prompt + completion, now)

    def served_chat(self, call: Call, tokens: int) -> None:
        """A chat ended well on its core: the core now holds the agent's
        conversation (``tokens`` long), and its time there feeds the core's
        mean call time (what the affinity choice weighs)."""
        state = self.state
        core = call.worker
        if core is None or core not in state.workers:
            return
        if call.model is not None:
            state.homes[(call.agent, call.model)] = Home(core, tokens)
        if call.service_s > 0:
            mean = state.call_s.get(core)
            state.call_s[core] = (call.service_s if mean is None
                                  else mean + CALL_S_WEIGHT * (call.service_s - mean))

    def charge_generated(self, call: Call, now: float) -> None:
        """An LLM call that ends without its usage (failed, timed out,
        cancelled) is charged what it generated as far as the kernel heard
        (its progress): those tokens were made for its agent all the same,
        and count against the agent's quota and for the fair policy."""
        if call.type is not MsgType.LLM_CHAT:
            return
        # a suspended call's turn was added to its tokens when it gave way
        live = call.state in (CallState.RUNNING, CallState.CANCELLING)
        generated = call.tokens + (call.turn_tokens if live else 0)
        agent = self.state.agents.get(call.agent)
        if generated <= 0 or agent is None:
            return
        agent.usage.completion_tokens += generated
        bucket = self.state.buckets.get(agent.name)
        if bucket is not None:
            bucket.charge(generated, now)

    def drop_snapshot(self, worker: Worker, snapshot: str) -> None:
        """Tell ``worker`` to drop the snapshot of a call that will never
        resume (it stays in the core's RAM or on its disk otherwise)."""
        self.out.send_worker(worker, protocol.call(MsgType.WORKER_FORGET, {"snapshots": [snapshot]}))

    def fail(self, call: Call, exc: errors.AIOSError, now: float) -> None:
        err = protocol.error(call.client_call_id, exc.code, exc.message, exc.retriable)
        self.finish(call, err, now)

    def cancel(self, call: Call, now: float) -> None:
        """Tell the call's worker to stop it; its slot stays taken until the
        worker lets go (or is killed as wedged)."""
        worker = self.state.workers.get(call.worker or "")
        call.state = CallState.CANCELLING
        call.cancel_sent = now
        if worker is not None:
            self.out.send_worker(worker, protocol.call(MsgType.WORKER_CANCEL, {"call": call.kid}))

    def expire(self, now: float) -> None:
        """End what ran out of time: approvals past their expiry, calls past
        their deadline, workers that ignore a cancel."""
        state = self.state
        for approval in state.approvals.expired(now):
            self.settle(approval, False, "by timeout: no decision before the deadline", now,
                        expired=True)
        for call in list(state.calls.values()):
            if call.state is CallState.PENDING:
                continue  # its approval's expiry (at most the deadline) settles it
            if call.state is CallState.CANCELLING:
                if now - call.cancel_sent > CANCEL_GRACE:
                    self.kill_wedged(call)
                continue
            if call.deadline is None or now <= call.deadline:
                continue
            where = f"running on {call.worker}"
            if call.state is CallState.QUEUED:
                where = "queued"
                bucket = state.buckets.get(call.caller.get("name", ""))
                if call.throttled and bucket is not None:
                    where += (f", held back by its agent's token quota of {bucket.rate:g} "
                              f"tokens/s (scheduler.agents[].tokens_per_s)")
            timeout: errors.AIOSError = errors.Timeout(
                f"{call.type.value} did not finish before its deadline ({where})")
            if call.held_for is not None:
                # it may have run, or run still: not a call that never started
                timeout = not_run_again(call, call.held_for, "its deadline passed first")
            self.end_now(call, timeout, now)

    def end_now(self, call: Call, exc: errors.AIOSError, now: float) -> None:
        """Answer ``call`` with ``exc`` now, whatever its state: a queued
        or held call leaves the kernel; a running one is cancelled on its
        worker, which keeps its slot until it lets go."""
        if call.state is CallState.QUEUED:
            self.state.queues[call.resource].remove(call)
            self.fail(call, exc, now)
        elif call.state is CallState.PENDING:
            self.fail(call, exc, now)
        elif call.state is CallState.RUNNING:
            answer = protocol.error(call.client_call_id, exc.code, exc.message)
            self.out.send_client(call.client, answer)
            self.ended_running(call, tally.outcome_of(exc.code), answer, now)
            self.cancel(call, now)

    def ended_running(self, call: Call, outcome: str, answer: Message | None, now: float) -> None:
        """Account ``call``, still running on its worker, as ended now with
        ``outcome`` (its caller has ``answer``, or is gone: None): the
        worker's reply, when it lets go, is no longer the call's end. Its
        figures, its log record and its agent's usage are counted here."""
        self.record_end(call, outcome, answer, now, running_s=now - call.dispatched)
        agent = self.state.agents.get(call.agent)
        if agent is not None:
            agent.usage.calls += 1
            agent.usage.failed += 1
            agent.usage.throttled += call.throttled

    def record_end(self, call: Call, outcome: str, result: Message | None, now: float,
                   running_s: float = 0.0) -> None:
        """Count ``call``'s end in the metrics and log it: once a call, however
        it ends (see log_end for ``running_s``)."""
        self.state.tally.ended(call, outcome, now)
        log_end(call, result, now, running_s)

    def give_up(self, call: Call, now: float) -> bool:
        """Its caller gave up on ``call`` (call.cancel): False if it was
        ending already."""
        if call.state is CallState.CANCELLING:
            return False
        self.end_now(call, errors.Cancelled("cancelled by its caller"), now)
        self.dispatch()
        return True

    def kill_wedged(self, call: Call) -> None:
        state = self.state
        worker = state.workers.get(call.worker or "")
        if worker is None:
            state.calls.pop(call.kid, None)
            return
        log.warning("worker %s ignored a cancel for %ss: killing it", worker.name, CANCEL_GRACE)
        try:
            # only a process the supervisor started (the pid is what the OS
            # reported when it registered; it may have ended and been reused)
            if state.supervisor_pid is not None and parent_of(worker.pid) != state.supervisor_pid:
                raise ProcessLookupError(f"pid {worker.pid} is no longer a process of aiosd's")
            os.kill(worker.pid, signal.SIGKILL)
        except OSError as exc:   # gone already, or (a bad READY) not ours
            log.warning("could not kill worker %s (pid %d): %s", worker.name, worker.pid, exc)
        self.worker_lost(worker, "it did not let go of a cancelled call")

    # -- approvals and the audit log ----------------------------------------------

    def hold(self, call: Call, op: str, detail: str, now: float,
             values: dict[str, Any] | None = None) -> None:
        """Keep ``call`` until a person approves or denies it, or time runs
        out. ``values``: what it would act on, as its worker found it (the
        ``details`` of its APPROVAL_REQUIRED answer, less the op)."""
        call.state = CallState.PENDING
        shown = {k: v for k, v in (values or {}).items() if k != "op" and isinstance(k, str)}
        approval = self.state.approvals.request(call, op, detail, now,
                                                self.state.config.access.approval_timeout, shown)
        info = approval.to_dict(now)
        self.out.publish(f"approval.{approval.id}.requested", info)
        self.audit("approval.requested", info)

    def settle(self, approval: Approval, granted: bool, why: str, now: float,
               expired: bool = False) -> None:
        """A decision on ``approval``: a person's, or (``expired``) none
        before its expiry, which denies it."""
        call = approval.call
        verdict = "approved" if granted else "denied"
        self.state.tally.decided("expired" if expired else verdict)
        info = {**approval.to_dict(now), "why": why}
        self.out.publish(f"approval.{approval.id}.{verdict}", info)
        self.audit(f"approval.{verdict}", info)
        if call.kid not in self.state.calls:
            return  # its caller is gone
        call.wait_s += now - call.queued_at
        call.state = CallState.QUEUED  # (denied: so finish() accounts the wait, not service)
        call.queued_at = now
        if granted:
            call.approved = True
            self.submit(call)
        else:
            self.fail(call, errors.PermissionDenied(
                f"{call.type.value} needs approval ({approval.op}) and was {verdict} {why}"
            ), now)

    def audit(self, event: str, record: dict[str, Any]) -> None:
        """Publish an access decision and append it to the audit log in storage."""
        now = self.clock()
        record = {"event": event, "time": now, **record}
        self.out.publish(f"audit.{event}", record)
        if not self.state.can_ever_serve("storage"):
            return
        self.submit(Call(
            kid=protocol.new_id(), client=None, client_call_id="", agent="kernel",
            type=MsgType.AUDIT_APPEND, resource="storage", body={"record": record},
            deadline=now + self.state.config.kernel.call_timeout, submitted=now, queued_at=now,
            approved=True,
        ), dispatch=False)

    def submit(self, call: Call, dispatch: bool = True) -> None:
        """``call`` waits in its resource's queue (a new call, or one an
        operator approved)."""
        self.state.calls[call.kid] = call
        self.state.queues[call.resource].push(call)
        if dispatch:
            self.dispatch()

    # -- peers that are gone ---------------------------------------------------------

    def forget_agent(self, agent: Agent) -> None:
        """The agent is gone (or going): drop its calls, and tell every LLM
        core to let go of what it keeps for the agent (its cached
        conversation, in the KV cache or in RAM), if it made a call."""
        if agent.usage.first_call is None:
            return
        now = self.clock()
        state = self.state
        for key in [k for k in state.homes if k[0] == agent.id]:
            del state.homes[key]
        for call in list(state.calls.values()):
            if call.agent != agent.id:
                continue
            if call.state is CallState.QUEUED:
                state.queues[call.resource].remove(call)
                self.finish(call, None, now)
            elif call.state is CallState.PENDING:
                self.finish(call, None, now)
            elif call.state is CallState.RUNNING:
                self.ended_running(call, tally.DROPPED, None, now)
                self.cancel(call, now)
        for worker in list(state.workers.values()):
            if worker.kind == "llm":
                self.out.send_worker(worker, protocol.call(MsgType.WORKER_FORGET, {"agent": agent.id}))

    def client_gone(self, identity: bytes) -> None:
        session = self.state.drop_session(identity)
        if session is None:
            return
        agent = session.agent
        if agent is not None and not agent.launched and not agent.sessions:
            self.state.agents.disconnect(agent, self.clock())
            self.agent_ended(agent)

    def agent_ended(self, agent: Agent) -> None:
        self.forget_agent(agent)
        if agent.launched:
            self.state.users.release(agent.uid)
        for identity in list(agent.sessions):
            self.state.drop_session(identity)
        body = {"event": "exited", "agent": agent.id, "exit_code": agent.exit_code,
                "state": agent.state.value}
        for identity, call_id in agent.watchers:
            self.out.send_client(identity, protocol.reply(call_id, body))
        agent.watchers.clear()
        self.out.publish(f"agent.{agent.id}.{agent.state.value}", {**body, "name": agent.name})
        how = agent.state.value + (f" (exit code {agent.exit_code})" if agent.launched else "")
        log.info("agent %s %s", agent.id, how,
                 extra=logs.fields(event=f"agent.{agent.state.value}", agent=agent.id))

    def worker_lost(self, worker: Worker, why: str) -> None:
        """Forget ``worker``; run its calls again elsewhere, or fail them."""
        state = self.state
        # the conversations it held went with it
        for key in [k for k, home in state.homes.items() if home.core == worker.name]:
            del state.homes[key]
        if state.workers.get(worker.name) is worker:
            del state.workers[worker.name]
        log.warning("worker %s lost: %s", worker.name, why, extra=logs.fields(event="worker.lost"))
        self.out.publish(f"worker.{worker.name}.lost", {"name": worker.name, "why": why})
        now = self.clock()
        for call in list(worker.inflight.values()):
            self.release(worker, call)
            if call.state is not CallState.RUNNING:
                self.charge_generated(call, now)
                state.calls.pop(call.kid, None)
                continue
            call.service_s += now - call.dispatched
            if call.tool is not None and not state.tool_info.get(call.tool, {}).get("read_only"):
                # A tool that changes things may have done so: it is never
                # run a second time. If the worker's process is gone, its
                # caller hears so now; if it lives (its heartbeats came
                # late), the call waits for it to register again and say
                # whether it still runs it (see WorkerMessages.adopt).
                if process_gone(worker.pid):
                    self.fail(call, not_run_again(call, worker.name, f"it stopped ({why})"), now)
                else:
                    call.state, call.worker, call.held_for = CallState.QUEUED, None, worker.name
                    call.queued_at = now
                continue
            if call.streamed or call.lost >= state.config.kernel.max_redispatch:
                # Streamed text cannot be taken back; past the redispatch
                # budget the caller decides whether to try again. (Resumes
                # after a preemption are dispatches too, but not losses.)
                self.fail(call, errors.WorkerLost(
                    f"{worker.name} stopped while running this call ({why}); it may be retried"
                ), now)
                continue
            call.lost += 1
            call.state = CallState.QUEUED
            call.worker = None
            call.queued_at = now
            state.queues[call.resource].requeue(call)
        # Snapshots of suspended calls died with the core: those calls start
        # over (nothing of theirs reached the caller unless they streamed).
        orphaned = []
        for call in list(state.calls.values()):
            if call.affinity == worker.name and call.state is CallState.QUEUED:
                orphaned.append(call.resume)
                if call.streamed:
                    state.queues[call.resource].remove(call)
                    self.fail(call, errors.WorkerLost(
                        f"{worker.name} stopped while this call was suspended ({why}); retry"), now)
                else:
                    call.affinity = call.resume = None
        if orphaned:
            # A core taken for lost may be alive still (its heartbeat came
            # late), and would keep those snapshots for good (if it is gone
            # indeed, they went with it).
            self.out.send_worker(worker, protocol.call(MsgType.WORKER_FORGET, {"snapshots": orphaned}),
                                 gone_if_unreachable=False)
        self.dispatch()

    def fail_unservable(self, now: float) -> None:
        """Queued calls of a kind no worker can ever run again (all of its
        processes failed for good) end now, not at their deadline."""
        state = self.state
        for resource, queue in state.queues.items():
            for call in list(queue):
                if not state.can_ever_serve(resource, call.model):
                    queue.remove(call)
                    self.fail(call, unservable(resource, call.model), now)
            if state.can_ever_serve(resource):
                continue
            for call in [c for c in state.calls.values() if c.held_for and c.resource == resource]:
                call.held_for = None
                self.fail(call, unservable(resource), now)


def log_end(call: Call, result: Message | None, now: float, running_s: float = 0.0) -> None:
    """Log how ``call`` ended (``running_s``: its time on its worker not
    yet in its service time): an agent's or an operator's at INFO (a null
    call, which only measures the kernel, at DEBUG); the kernel's own (its
    audit records, the memory manager's blocks) at DEBUG."""
    if result is None:
        how = "dropped (its caller is gone)"
    elif result.type is MsgType.ERROR:
        how = f"failed: {result.body.get('name')}: {result.body.get('message')}"
    else:
        how = "done"
    level = (logging.DEBUG if call.client is None or call.type is MsgType.SYS_NULL
             else logging.INFO)
    if log.isEnabledFor(level):
        log.log(level, "%s %s in %.3fs (queued %.3fs, ran %.3fs on %s)", call.type.value, how,
                now - call.submitted, call.wait_s, call.service_s + running_s,
                call.worker or "no worker",
                extra=logs.fields(event="call.finished", agent=call.agent, call_id=call.kid))


def unservable(resource: str, model: str | None = None) -> errors.Unavailable:
    if model is not None:
        return errors.Unavailable(f"no core of model {model!r} can run (each failed for good): "
                                  "see `aiosctl status`")
    return errors.Unavailable(f"no {resource} worker can run: see `aiosctl status`")


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def not_run_again(call: Call, worker: str, what: str) -> errors.WorkerLost:
    """The error of a tool call that ``worker`` no longer runs: it is not
    run again (see Lifecycle.worker_lost)."""
    return errors.WorkerLost(
        f"{worker} no longer runs tool {call.tool}: {what}; the call was not run again, "
        "since it may have had effects: check them before retrying")
