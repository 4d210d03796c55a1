"""The scheduler's dispatch: the policy's inputs (service, priority, quota,
preemption), choosing a worker and starting a call on it, and a call's end
(finished, failed, cancelled, or dropped with its agent). ``Dispatch`` is a
mixin of ``Scheduler``: its methods run on the scheduler's single thread and
use its state."""

from __future__ import annotations

import time

from libaios import errors, protocol
from libaios.protocol import Message, MsgType

from .agents import Agent
from .calls import Call, CallState
from .peers import Worker


def _count(value: object) -> int:
    """A token count from a worker's usage (0 if it is not one)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Dispatch:
    """How ``Scheduler`` runs calls on workers and ends them."""

    # -- policy inputs ---------------------------------------------------------

    def _service(self, agent_id: str) -> float:
        """The service an agent has received: tokens processed for it."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return 0.0
        # calls not finished yet: what they generated in earlier turns (a
        # suspended call's too) and in the turn running now
        live = sum(c.tokens + (c.turn_tokens if c.state is CallState.RUNNING else 0)
                   for c in self.calls.values() if c.agent == agent_id)
        return agent.usage.prompt_tokens + agent.usage.completion_tokens + live

    def _name_of(self, agent_id: str) -> str:
        agent = self.agents.get(agent_id)
        return agent.name if agent is not None else agent_id

    def _priority(self, agent_id: str) -> int:
        rule = self.rules_by_agent.get(self._name_of(agent_id))
        return rule.priority if rule else 0

    def _quota_ok(self, call: Call) -> bool:
        bucket = self.buckets.get(call.caller.get("name", ""))
        return bucket is None or call.type is not MsgType.LLM_CHAT or bucket.allows(time.time())

    def _needs_slot(self, call: Call) -> bool:
        """Whether a waiting call could use a slot a preempted call gives
        up (a null call takes none; a call held back by its quota can use
        none)."""
        return call.type is MsgType.LLM_CHAT and self._quota_ok(call)

    def _preempt(self) -> None:
        """Ask the policy which running LLM calls should give way."""
        queue = self.queues["llm"]
        if not len(queue):
            return
        cores = [w for w in self.workers.values() if w.kind == "llm"]
        running = [c for w in cores for c in w.inflight.values()
                   if c.state is CallState.RUNNING and c.type is MsgType.LLM_CHAT]
        # as many give way as the waiting calls that could run need slots
        # (a null call or a call held back by its quota needs none), less the free slots
        # and those already giving way
        need = (sum(1 for c in queue if self._needs_slot(c)) - sum(max(0, w.free) for w in cores)
                - sum(1 for c in running if c.suspending))
        if need <= 0:
            return
        chosen = queue.preempt([c for c in running if not c.suspending], time.time(),
                               self._needs_slot)
        chosen.sort(key=lambda c: -c.turn_tokens)   # the longest past its quantum first
        for call in chosen[:need]:
            worker = self.workers.get(call.worker or "")
            if worker is None:
                continue
            call.suspending = True
            self.send_worker(worker, protocol.call(MsgType.WORKER_SUSPEND, {"call": call.kid}))

    # -- dispatch ------------------------------------------------------------

    def _free_worker(self, resource: str, call_type: MsgType) -> Worker | None:
        best = None
        for worker in self.workers.values():
            # a null call runs inline on the worker's loop: it takes no slot
            busy = worker.free <= 0 and call_type is not MsgType.SYS_NULL
            if worker.kind != resource or busy or call_type.value not in worker.types:
                continue
            # the most free slots first; among equals the one idle longest
            if best is None or (worker.free, -worker.last_dispatch) > (best.free, -best.last_dispatch):
                best = worker
        return best

    def _tool_free(self, call: Call) -> bool:
        if call.tool is None:
            return True
        limit = self.tool_info.get(call.tool, {}).get("concurrency")
        return limit is None or self.tool_running.get(call.tool, 0) < limit

    def _runnable(self, call: Call) -> bool:
        if not self._tool_free(call):
            return False
        if not self._quota_ok(call):
            call.throttled = True
            return False
        if call.affinity is not None:
            worker = self.workers.get(call.affinity)
            return worker is not None and worker.free > 0
        return True

    def dispatch(self) -> None:
        for resource, queue in self.queues.items():
            while len(queue):
                # A call for a saturated tool, an agent over its quota, or a
                # core busy with a suspended call's snapshot waits while the
                # calls behind it run.
                worker = self._free_worker(resource, next(iter(queue)).type)
                only_null = worker is None or worker.free <= 0
                if worker is None:   # no slot for the head: null calls behind still go
                    worker = self._free_worker(resource, MsgType.SYS_NULL)
                if worker is None:
                    break
                if not only_null:
                    call = queue.pop(self._runnable)
                else:  # only null calls may go to a worker with no free slot
                    call = queue.pop(lambda c: c.type is MsgType.SYS_NULL)
                if call is None:
                    break
                if call.affinity is not None:
                    worker = self.workers[call.affinity]
                self._start(call, worker)

    def _occupy(self, call: Call, worker: Worker, now: float) -> None:
        """``call`` runs on ``worker`` from ``now``, holding one of its slots
        (and of its tool's); ``_release`` is the reverse."""
        call.wait_s += now - call.queued_at
        call.state = CallState.RUNNING
        call.worker = worker.name
        call.dispatched = now
        worker.inflight[call.kid] = call
        if call.tool is not None:
            self.tool_running[call.tool] = self.tool_running.get(call.tool, 0) + 1

    def _start(self, call: Call, worker: Worker) -> None:
        now = time.time()
        self._occupy(call, worker, now)
        call.attempts += 1
        worker.last_dispatch = now
        call.turn_tokens = 0
        call.suspending = False
        task = Message(MsgType.WORKER_TASK, protocol.new_id(), call.task_body(),
                       deadline=call.deadline)
        self.send_worker(worker, task)

    def finish(self, call: Call, result: Message | None, now: float) -> None:
        """Account a call that left the kernel and answer its caller
        (``result`` None: the caller already has its answer, or is gone)."""
        self.calls.pop(call.kid, None)
        self.approvals.drop_call(call)
        if call.state is CallState.QUEUED and call.resume is not None:
            # suspended, and never to resume
            worker = self.workers.get(call.affinity or "")
            if worker is not None:
                self.drop_snapshot(worker, call.resume)
        if call.state is CallState.RUNNING:
            call.service_s += now - call.dispatched
        elif call.state is CallState.QUEUED:
            call.wait_s += now - call.queued_at
        if result is not None:
            self.send_client(call.client, result)
        agent = self.agents.get(call.agent)
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
            tokens = result.body.get("usage")
            tokens = tokens if isinstance(tokens, dict) else {}
            prompt, completion = (_count(tokens.get(k)) for k in ("prompt_tokens", "completion_tokens"))
            used = prompt + completion
            usage.prompt_tokens += prompt
            usage.completion_tokens += completion
            bucket = self.buckets.get(agent.name)
            if bucket is not None:
                bucket.charge(used, now)

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
        agent = self.agents.get(call.agent)
        if generated <= 0 or agent is None:
            return
        agent.usage.completion_tokens += generated
        bucket = self.buckets.get(agent.name)
        if bucket is not None:
            bucket.charge(generated, now)

    def drop_snapshot(self, worker: Worker, snapshot: str) -> None:
        """Tell ``worker`` to drop the snapshot of a call that will never
        resume (it stays in the core's RAM or on its disk otherwise)."""
        self.send_worker(worker, protocol.call(MsgType.WORKER_FORGET, {"snapshots": [snapshot]}))

    def fail(self, call: Call, exc: errors.AIOSError, now: float) -> None:
        err = protocol.error(call.client_call_id, exc.code, exc.message, exc.retriable)
        self.finish(call, err, now)

    def cancel(self, call: Call, now: float) -> None:
        """Tell the call's worker to stop it; its slot stays taken until the
        worker lets go (or is killed as wedged)."""
        worker = self.workers.get(call.worker or "")
        call.state = CallState.CANCELLING
        call.cancel_sent = now
        if worker is not None:
            self.send_worker(worker, protocol.call(MsgType.WORKER_CANCEL, {"call": call.kid}))

    def forget_agent(self, agent: Agent) -> None:
        """The agent is gone (or going): drop its calls, and tell every LLM
        core to let go of what it keeps for the agent (its cached
        conversation, in the KV cache or in RAM), if it made a call."""
        if agent.usage.first_call is None:
            return
        now = time.time()
        agent_id = agent.id
        for call in list(self.calls.values()):
            if call.agent != agent_id:
                continue
            if call.state is CallState.QUEUED:
                self.queues[call.resource].remove(call)
                self.finish(call, None, now)
            elif call.state is CallState.PENDING:
                self.finish(call, None, now)
            elif call.state is CallState.RUNNING:
                self.cancel(call, now)
        for worker in list(self.workers.values()):
            if worker.kind == "llm":
                self.send_worker(worker, protocol.call(MsgType.WORKER_FORGET, {"agent": agent_id}))
