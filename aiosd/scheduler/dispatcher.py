"""The dispatcher: which waiting calls start now and on which worker, and
which running calls give way. It only decides.

Both functions take the scheduler's state and the time and return their
decisions; they send nothing, read no clock and change no call, queue or
worker (a quota's bucket refills to ``now`` as it is read). The call
lifecycle (lifecycle) carries the decisions out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from libaios.protocol import MsgType

from .calls import Call, CallState
from .peers import Worker
from .state import State


@dataclass(frozen=True)
class Start:
    """Start ``call`` on ``worker``."""

    call: Call
    worker: Worker


@dataclass
class Plan:
    starts: list[Start] = field(default_factory=list)
    #: calls held back by their agent's token quota (to be marked so)
    throttled: list[Call] = field(default_factory=list)


def quota_ok(state: State, call: Call, now: float) -> bool:
    """Whether ``call``'s agent may use tokens now (only a chat spends any)."""
    bucket = state.buckets.get(call.caller.get("name", ""))
    return bucket is None or call.type is not MsgType.LLM_CHAT or bucket.allows(now)


def plan(state: State, now: float) -> Plan:
    """The calls to start now: for each resource, while a worker has a free
    slot, the call its queue's policy chooses among those that can run. A
    call for a saturated tool, an agent over its quota, or a core busy with
    a suspended call's snapshot waits while the calls behind it run. A null
    call runs inline on its worker's loop and takes no slot."""
    decided = Plan()
    free = {name: worker.free for name, worker in state.workers.items()}
    last = {name: worker.last_dispatch for name, worker in state.workers.items()}
    tools: Counter[str] = Counter(state.tool_running)
    chosen: set[str] = set()
    held: set[str] = set()

    def worker_for(resource: str, call_type: MsgType) -> Worker | None:
        best = None
        for worker in state.workers.values():
            busy = free[worker.name] <= 0 and call_type is not MsgType.SYS_NULL
            if worker.kind != resource or busy or call_type.value not in worker.types:
                continue
            # the most free slots first; among equals the one idle longest
            if best is None or ((free[worker.name], -last[worker.name])
                                > (free[best.name], -last[best.name])):
                best = worker
        return best

    def runnable(call: Call) -> bool:
        if call.kid in chosen:
            return False
        if call.tool is not None:
            limit = state.tool_info.get(call.tool, {}).get("concurrency")
            if limit is not None and tools[call.tool] >= limit:
                return False
        if not quota_ok(state, call, now):
            if call.kid not in held:
                held.add(call.kid)
                decided.throttled.append(call)
            return False
        if call.affinity is not None:
            return call.affinity in state.workers and free[call.affinity] > 0
        return True

    def null(call: Call) -> bool:
        return call.kid not in chosen and call.type is MsgType.SYS_NULL

    for resource, queue in state.queues.items():
        while True:
            head = next((c for c in queue if c.kid not in chosen), None)
            if head is None:
                break
            worker = worker_for(resource, head.type)
            only_null = worker is None or free[worker.name] <= 0
            if worker is None:   # no slot for the head: null calls behind still go
                worker = worker_for(resource, MsgType.SYS_NULL)
            if worker is None:
                break
            # only null calls may go to a worker with no free slot
            call = queue.choose(null if only_null else runnable, now)
            if call is None:
                break
            if call.affinity is not None:
                worker = state.workers[call.affinity]
            chosen.add(call.kid)
            last[worker.name] = now
            if call.type is not MsgType.SYS_NULL:
                free[worker.name] -= 1
            if call.tool is not None:
                tools[call.tool] += 1
            decided.starts.append(Start(call, worker))
    return decided


def needs_slot(state: State, call: Call, now: float) -> bool:
    """Whether a waiting call could use a slot a preempted call gives up
    (a null call takes none; a call held back by its quota can use none)."""
    return call.type is MsgType.LLM_CHAT and quota_ok(state, call, now)


def preemptions(state: State, now: float) -> list[Call]:
    """The running LLM calls that should give way now: as many as the
    waiting calls that could run need slots, less the free slots and the
    calls already giving way, chosen by the policy, the longest past its
    quantum first."""
    queue = state.queues["llm"]
    if not len(queue):
        return []
    cores = [w for w in state.workers.values() if w.kind == "llm"]
    running = [c for w in cores for c in w.inflight.values()
               if c.state is CallState.RUNNING and c.type is MsgType.LLM_CHAT]
    need = (sum(1 for c in queue if needs_slot(state, c, now))
            - sum(max(0, w.free) for w in cores)
            - sum(1 for c in running if c.suspending))
    if need <= 0:
        return []
    chosen = queue.preempt([c for c in running if not c.suspending], now,
                           lambda c: needs_slot(state, c, now))
    chosen.sort(key=lambda c: -c.turn_tokens)
    return [c for c in chosen[:need] if c.worker in state.workers]
