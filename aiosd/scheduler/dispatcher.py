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

from . import affinity
from .affinity import Home
from .calls import Call, CallState
from .peers import Worker
from .state import State


@dataclass(frozen=True)
class Start:
    """Start ``call`` on ``worker``."""

    call: Call
    worker: Worker
    #: a chat's affinity outcome (affinity.HIT, MOVE or NEW)
    outcome: str | None = None


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
    """The calls to start now: for each resource, while a call can start,
    the one its queue's policy chooses among those that can. A chat goes to
    a core of its model (see affinity: to the core holding its agent's
    conversation, where it has one); a call for a saturated tool, an agent
    over its quota, or a core busy with a suspended call's snapshot waits
    while the calls behind it run. A null call runs inline on its worker's
    loop and takes no slot."""
    decided = Plan()
    free = {name: worker.free for name, worker in state.workers.items()}
    last = {name: worker.last_dispatch for name, worker in state.workers.items()}
    tools: Counter[str] = Counter(state.tool_running)
    chosen: set[str] = set()
    held: set[str] = set()
    sticky = state.config.scheduler.affinity
    # calls waiting for each core that holds their conversation
    homed: Counter[str] = Counter()
    if sticky:
        for call in state.queues.get("llm", ()):
            home = home_of(state, call)
            if home is not None:
                homed[home.core] += 1

    def workers_for(resource: str, call: Call) -> list[Worker]:
        return [w for w in state.workers.values()
                if w.kind == resource and call.type.value in w.types
                and (call.model is None or state.core_model.get(w.name) == call.model)]

    def view(worker: Worker, home: Home | None) -> affinity.CoreView:
        mine = home is not None and home.core == worker.name
        return affinity.CoreView(
            worker.name, free[worker.name], worker.capacity,
            waiting=homed[worker.name] - (1 if mine else 0),
            call_s=state.call_s.get(worker.name),
            token_rate=affinity.token_rate(worker.stats), last_dispatch=last[worker.name])

    def target(call: Call) -> tuple[Worker, str | None] | None:
        """Where ``call`` runs now, and its affinity outcome; None: it waits."""
        if call.affinity is not None:   # resumes from a snapshot that core holds
            worker = state.workers.get(call.affinity)
            return (worker, None) if worker is not None and free[worker.name] > 0 else None
        workers = workers_for(call.resource, call)
        if call.type is MsgType.SYS_NULL:   # inline: a full worker will do
            best = max(workers, key=lambda w: (free[w.name], -last[w.name]), default=None)
            return (best, None) if best is not None else None
        home = home_of(state, call) if sticky else None
        name, outcome = affinity.choose(home, [view(w, home) for w in workers])
        if name is None:
            return None
        return state.workers[name], outcome if call.model is not None else None

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
        return True

    targets: dict[str, tuple[Worker, str | None]] = {}
    only_null = [False]

    def startable(call: Call) -> bool:
        if only_null[0] and call.type is not MsgType.SYS_NULL:
            return False
        if not runnable(call):
            return False
        where = target(call)
        if where is None:
            return False
        targets[call.kid] = where
        return True

    for resource, queue in state.queues.items():
        while True:
            targets.clear()
            # with no free slot anywhere only null calls can start: skip the rest
            only_null[0] = not any(free[w.name] > 0 for w in state.workers.values()
                                   if w.kind == resource)
            call = queue.choose(startable, now)
            if call is None:
                break
            worker, outcome = targets[call.kid]
            chosen.add(call.kid)
            last[worker.name] = now
            if call.type is not MsgType.SYS_NULL:
                free[worker.name] -= 1
            if call.tool is not None:
                tools[call.tool] += 1
            decided.starts.append(Start(call, worker, outcome))
    return decided


def home_of(state: State, call: Call) -> Home | None:
    """The core holding the conversation of ``call``'s agent with its model."""
    if call.type is not MsgType.LLM_CHAT or call.model is None:
        return None
    return state.homes.get((call.agent, call.model))


def needs_slot(state: State, call: Call, now: float) -> bool:
    """Whether a waiting call could use a slot a preempted call gives up
    (a null call takes none; a call held back by its quota can use none)."""
    return call.type is MsgType.LLM_CHAT and quota_ok(state, call, now)


def preemptions(state: State, now: float) -> list[Call]:
    """The running LLM calls that should give way now: for each model, as
    many as the waiting calls for it that could run need slots, less its
    cores' free slots and the calls already giving way, chosen by the
    policy, the longest past its quantum first."""
    queue = state.queues["llm"]
    if not len(queue):
        return []
    out: list[Call] = []
    for model in {c.model for c in queue}:
        cores = [w for w in state.workers.values() if w.kind == "llm"
                 and (model is None or state.core_model.get(w.name) == model)]
        running = [c for w in cores for c in w.inflight.values()
                   if c.state is CallState.RUNNING and c.type is MsgType.LLM_CHAT]

        def wants(call: Call, model: str | None = model) -> bool:
            return call.model == model and needs_slot(state, call, now)

        need = (sum(1 for c in queue if wants(c))
                - sum(max(0, w.free) for w in cores)
                - sum(1 for c in running if c.suspending))
        if need <= 0:
            continue
        chosen = queue.preempt([c for c in running if not c.suspending], now, wants)
        chosen.sort(key=lambda c: -c.turn_tokens)
        out += [c for c in chosen[:need] if c.worker in state.workers]
    return out
