"""Pure scheduler logic, no sockets and no processes: the policies, the access rules,
approvals, quotas, and the dispatcher's decisions on a clock the test sets."""


from aiosd.config import AccessConfig, GroupConfig
from aiosd.scheduler import policy
from aiosd.scheduler.access import AccessRules, Principal
from aiosd.scheduler.approvals import DEADLINE_MARGIN, ApprovalTable, expiry, summarize
from aiosd.scheduler.calls import Call
from libaios.protocol import ErrorCode, MsgType


def call(n: int, tool: str | None = None, deadline: float | None = None) -> Call:
    return Call(kid=f"k{n}", client=b"c", client_call_id=f"c{n}", agent="a", type=MsgType.LLM_CHAT,
                resource="llm", body={}, deadline=deadline, submitted=0.0, tool=tool)


def test_fifo_order_requeue_remove() -> None:
    q = policy.make("fifo")
    a, b, c = call(1), call(2), call(3)
    for x in (a, b, c):
        q.push(x)
    assert len(q) == 3 and list(q) == [a, b, c] and len(q) == 3
    assert q.pop() is a
    q.requeue(a)
    assert q.pop() is a
    assert q.remove(c) and not q.remove(c)
    assert q.pop() is b and q.pop() is None


def test_fifo_skips_calls_that_cannot_run_without_losing_their_place() -> None:
    q = policy.FifoPolicy()
    slow1, slow2, quick = call(1, "slow"), call(2, "slow"), call(3, "calc")
    for x in (slow1, slow2, quick):
        q.push(x)
    assert q.pop(lambda c: c.tool != "slow") is quick
    assert list(q) == [slow1, slow2]


RULES = AccessRules(AccessConfig(groups=[
    GroupConfig(name="team", members=["alice", "bob"], access="write"),
    GroupConfig(name="readers", members=["alice", "rita"], access="read"),
    GroupConfig(name="trusted", members=["tess"], preapprove=["storage.delete"]),
]), daemon_uid=1000)


def who(name: str, **kw: bool) -> Principal:
    return Principal(f"{name}-1", name, **kw)


def test_own_namespace_and_groups() -> None:
    assert RULES.may_reach(who("carol"), "carol", write=True).allowed
    assert RULES.may_reach(who("bob"), "alice", write=True).allowed
    assert RULES.may_reach(who("rita"), "alice", write=False).allowed
    denied = RULES.may_reach(who("rita"), "alice", write=True)
    assert not denied.allowed and "may not write" in denied.reason
    assert not RULES.may_reach(who("carol"), "alice", write=False).allowed
    assert RULES.may_reach(who("op", operator=True), "alice", write=True).allowed


def test_destructive_calls_need_approval_unless_preapproved() -> None:
    d = RULES.check(who("carol"), MsgType.STORAGE_DELETE, "carol")
    assert d.allowed and d.approval == "storage.delete"
    assert RULES.check(who("tess"), MsgType.STORAGE_DELETE, "tess").approval is None
    assert RULES.check(who("carol"), MsgType.STORAGE_GET, "carol").approval is None
    assert RULES.check(who("carol"), MsgType.MEMORY_UPDATE, "carol").approval == "memory.update"
    assert RULES.check(who("carol"), MsgType.MEMORY_ADD, "carol").approval is None
    assert RULES.check(who("carol"), MsgType.TOOL_CALL, None, destructive_tool="rm").approval == "tool:rm"
    assert not RULES.check(who("carol"), MsgType.BLOCK_GET, "alice").allowed
    assert RULES.check(who("w", internal=True), MsgType.BLOCK_GET, "alice").allowed


def test_uids() -> None:
    assert RULES.may_connect(1000) and not RULES.may_connect(1001) and RULES.may_connect(None)
    assert AccessRules(AccessConfig(allow_uids=[1001]), daemon_uid=1000).may_connect(1001)


def test_approvals_expire_at_the_deadline_or_timeout() -> None:
    table = ApprovalTable()
    a = table.request(call(1, deadline=50.0), "storage.delete", "x", now=0.0, timeout=100.0)
    b = table.request(call(2), "storage.delete", "y", now=0.0, timeout=10.0)
    assert a.expires == 50.0 - DEADLINE_MARGIN and b.expires == 10.0
    assert table.expired(9.9) == [] and table.expired(10.0) == [b]
    assert table.take(a.id) is a and table.take(a.id) is None


def test_approvals_end_before_the_deadline_their_caller_waits_for() -> None:
    # the caller's client gives up at the call's deadline: the kernel's
    # answer must come first, however the approval's timeout compares
    assert expiry(0.0, 120.0, deadline=60.0) == 60.0 - DEADLINE_MARGIN
    assert expiry(0.0, 120.0, deadline=120.0) == 120.0 - DEADLINE_MARGIN
    assert expiry(0.0, 10.0, deadline=60.0) == 10.0          # the approval's own timeout
    assert expiry(0.0, 10.0, deadline=None) == 10.0
    assert expiry(0.0, 120.0, deadline=1.0) == 0.5           # a short call keeps half
    assert expiry(5.0, 120.0, deadline=4.0) == 4.0           # (already past it: at once)
    table = ApprovalTable()
    a = table.request(call(1, deadline=30.0), "storage.delete", "x", now=0.0, timeout=120.0,
                      values={"key": "k", "versions": 2})
    assert a.expires < 30.0 and table.expired(a.expires - 0.01) == []
    assert table.expired(a.expires) == [a]
    assert a.to_dict(0.0)["values"] == {"key": "k", "versions": 2}


def test_summaries_hide_bytes_and_shorten() -> None:
    out = summarize({"data": b"x" * 10, "text": "y" * 500, "as_namespace": "z", "version": 3,
                     "flag": None}, limit=20)
    assert out == {"data": "<10 bytes>", "text": "y" * 20 + "…", "version": 3, "flag": None}


def test_round_robin_preempts_only_while_others_wait() -> None:
    rr = policy.make("rr", quantum=8)
    running = call(1)
    running.turn_tokens = 8
    assert rr.preempt([running], 0.0) == []
    rr.push(call(2))
    assert rr.preempt([running], 0.0) == [running]
    running.turn_tokens = 7
    assert rr.preempt([running], 0.0) == []


def test_fair_serves_the_least_served_agent_and_guards_against_starvation() -> None:
    service = {"heavy": 5000.0, "light": 10.0}
    fair = policy.make("fair", quantum=8, starvation_s=30.0, service=lambda a: service[a])
    heavy, light = call(1), call(2)
    heavy.agent, light.agent = "heavy", "light"
    fair.push(heavy)
    fair.push(light)
    assert fair.choose(now=0.0) is light and len(fair) == 2   # chosen, not taken
    assert fair.pop(now=0.0) is light
    fair.push(light)
    # heavy's call has waited past the starvation guard
    assert fair.pop(now=31.0) is heavy
    running = call(3)
    running.agent, running.turn_tokens = "heavy", 8
    assert fair.preempt([running], 31.0) == [running]  # light waits
    prio = policy.make("fair", service=lambda a: service[a],
                       priority=lambda a: 10 if a == "heavy" else 0)
    prio.push(light)
    prio.push(heavy)
    assert prio.pop() is heavy


def test_fair_works_out_each_agent_s_service_once_per_decision() -> None:
    # an agent's service scans every call in the kernel: a queue of many
    # calls from few agents must not scan it once per call
    asked: list[str] = []
    fair = policy.make("fair", quantum=8, service=lambda a: asked.append(a) or len(a))
    calls = [call(n) for n in range(200)]
    for n, c in enumerate(calls):
        c.agent = "flooder" if n % 2 else "a"
        fair.push(c)
    assert fair.pop() is calls[0]          # "a" has the least service
    assert sorted(asked) == ["a", "flooder"]
    asked.clear()
    running = call(300)
    running.agent, running.turn_tokens = "flooder", 8
    assert fair.preempt([running], 0.0) == [running]
    assert sorted(asked) == ["a", "flooder"]


def test_token_bucket_throttles_and_refills() -> None:
    from aiosd.scheduler.quota import TokenBucket

    b = TokenBucket(rate=10.0, burst=100.0)
    assert b.allows(0.0)
    b.charge(150, 0.0)
    assert not b.allows(1.0) and b.ready_in(1.0) > 0
    assert b.allows(5.1)
    assert b.level <= 100.0


# -- the dispatcher: decisions from the state and a clock the test sets --------


def _state(tmp_path, **scheduler):
    from dataclasses import replace

    from aiosd.config import load
    from aiosd.scheduler.state import State

    config = load(None)
    return State.create(replace(config, scheduler=replace(config.scheduler, **scheduler)), tmp_path)


def _worker(state, name: str, capacity: int, kind: str = "llm", last_dispatch: float = 0.0):
    from aiosd.scheduler.peers import Worker

    worker = Worker(name=name, kind=kind, capacity=capacity, pid=1,
                    types=frozenset({"llm.chat", "sys.null", "tool.call"}), info={},
                    last_seen=0.0, registered=0.0, identity=name.encode(),
                    last_dispatch=last_dispatch)
    state.workers[name] = worker
    return worker


def _waiting(state, n: int, at: float = 0.0, agent: str = "a", **fields) -> Call:
    c = Call(f"k{n}", b"c", f"c{n}", agent, fields.pop("type", MsgType.LLM_CHAT),
             fields.pop("resource", "llm"), {}, None, at, queued_at=at, **fields)
    state.calls[c.kid] = c
    state.queues[c.resource].push(c)
    return c


def _starts(plan) -> list[tuple[str, str]]:
    return [(s.call.kid, s.worker.name) for s in plan.starts]


def test_the_dispatcher_fills_free_slots_without_changing_anything(tmp_path) -> None:
    from aiosd.scheduler import dispatcher

    state = _state(tmp_path)
    _worker(state, "busy", capacity=1, last_dispatch=5.0)
    _worker(state, "idle", capacity=1, last_dispatch=1.0)
    _worker(state, "wide", capacity=2, last_dispatch=9.0)
    calls = [_waiting(state, n) for n in range(5)]
    plan = dispatcher.plan(state, now=10.0)
    # the most free slots first, then the one idle longest (a worker just
    # given a call counts as just dispatched to)
    assert _starts(plan) == [("k0", "wide"), ("k1", "idle"), ("k2", "busy"), ("k3", "wide")]
    assert len(state.queues["llm"]) == 5 and all(c.state.value == "queued" for c in calls)
    assert all(not w.inflight for w in state.workers.values())
    assert dispatcher.plan(state, now=10.0).starts == plan.starts   # the same state, the same plan


def test_the_dispatcher_passes_over_a_saturated_tool_and_keeps_its_place(tmp_path) -> None:
    from aiosd.scheduler import dispatcher

    state = _state(tmp_path)
    _worker(state, "tools", capacity=4, kind="tool")
    state.tool_info = {"slow": {"concurrency": 1}, "calc": {}}
    slow1, slow2, quick = (_waiting(state, n, type=MsgType.TOOL_CALL, resource="tool", tool=t)
                           for n, t in ((1, "slow"), (2, "slow"), (3, "calc")))
    assert _starts(dispatcher.plan(state, 0.0)) == [("k1", "tools"), ("k3", "tools")]
    state.tool_running["slow"] = 1   # one runs already
    assert _starts(dispatcher.plan(state, 0.0)) == [("k3", "tools")]


def test_a_call_over_its_quota_waits_until_its_bucket_refills(tmp_path) -> None:
    from aiosd.scheduler import dispatcher
    from aiosd.scheduler.quota import TokenBucket

    state = _state(tmp_path)
    _worker(state, "core0", capacity=2)
    state.buckets["flood"] = bucket = TokenBucket(rate=10.0, burst=100.0)
    bucket.charge(150, now=0.0)               # 50 tokens in debt at t=0
    held = _waiting(state, 1, caller={"name": "flood"})
    other = _waiting(state, 2)
    plan = dispatcher.plan(state, now=1.0)
    assert _starts(plan) == [("k2", "core0")] and plan.throttled == [held]
    assert not held.throttled                 # the plan marks nothing itself
    state.queues["llm"].remove(other)
    assert _starts(dispatcher.plan(state, now=4.9)) == []      # 1 token still owed
    assert _starts(dispatcher.plan(state, now=5.2)) == [("k1", "core0")]


def test_a_suspended_call_waits_for_the_core_that_holds_its_snapshot(tmp_path) -> None:
    from aiosd.scheduler import dispatcher

    state = _state(tmp_path)
    full = _worker(state, "core1", capacity=1)
    _worker(state, "core0", capacity=1)
    running = _waiting(state, 0)
    state.queues["llm"].remove(running)
    full.inflight[running.kid] = running
    suspended = _waiting(state, 1, affinity="core1", resume="snap")
    _waiting(state, 2)
    assert _starts(dispatcher.plan(state, 0.0)) == [("k2", "core0")]
    del full.inflight[running.kid]
    assert _starts(dispatcher.plan(state, 0.0)) == [("k1", "core1"), ("k2", "core0")]
    assert suspended.resume == "snap"


def test_a_null_call_goes_to_a_full_core(tmp_path) -> None:
    from aiosd.scheduler import dispatcher

    state = _state(tmp_path)
    core = _worker(state, "core0", capacity=1)
    core.inflight["x"] = _waiting(state, 9)
    state.queues["llm"].remove(core.inflight["x"])
    _waiting(state, 1)
    _waiting(state, 2, type=MsgType.SYS_NULL)
    _waiting(state, 3, type=MsgType.SYS_NULL)
    assert _starts(dispatcher.plan(state, 0.0)) == [("k2", "core0"), ("k3", "core0")]


def test_the_fair_dispatcher_serves_the_least_served_and_then_the_starved(tmp_path) -> None:
    from aiosd.scheduler import dispatcher

    state = _state(tmp_path, policy="fair", starvation_s=30.0)
    _worker(state, "core0", capacity=1)
    heavy, light = state.agents.register("heavy", None), state.agents.register("light", None)
    heavy.usage.completion_tokens = 5000
    _waiting(state, 1, at=0.0, agent=heavy.id)
    _waiting(state, 2, at=20.0, agent=light.id)
    assert _starts(dispatcher.plan(state, now=25.0)) == [("k2", "core0")]
    assert _starts(dispatcher.plan(state, now=30.0)) == [("k1", "core0")]   # waited 30 s


def test_only_as_many_give_way_as_the_waiting_calls_can_use(tmp_path) -> None:
    from aiosd.scheduler import dispatcher
    from aiosd.scheduler.quota import TokenBucket

    state = _state(tmp_path, policy="rr", quantum_tokens=8)
    core = _worker(state, "core0", capacity=3)
    for n, tokens in enumerate((9, 30, 3)):
        c = _waiting(state, n)
        state.queues["llm"].remove(c)
        c.state, c.worker, c.turn_tokens = c.state.RUNNING, "core0", tokens
        core.inflight[c.kid] = c
    assert dispatcher.preemptions(state, 0.0) == []     # nobody waits
    state.buckets["flood"] = bucket = TokenBucket(rate=1.0, burst=10.0)
    bucket.charge(20, now=0.0)
    _waiting(state, 7, caller={"name": "flood"})
    assert dispatcher.preemptions(state, 5.0) == []     # it could not use the slot yet
    assert [c.kid for c in dispatcher.preemptions(state, 11.0)] == ["k1"]   # the longest
    _waiting(state, 8)
    assert [c.kid for c in dispatcher.preemptions(state, 11.0)] == ["k1", "k0"]
    core.inflight["k1"].suspending = True                # already giving way
    assert [c.kid for c in dispatcher.preemptions(state, 11.0)] == ["k0"]


def test_a_call_whose_core_is_lost_runs_again_once_then_fails(tmp_path) -> None:
    """Re-dispatch, on a clock the test sets: the call lost with its core
    goes to the front of the queue and to the other core, its time there
    counted as service; lost again past kernel.max_redispatch, it fails
    with a retriable error."""
    from aiosd.scheduler.lifecycle import Lifecycle
    from aiosd.scheduler.outbox import Outbox

    now = [100.0]
    state = _state(tmp_path)
    assert state.config.kernel.max_redispatch == 1
    out = Outbox()
    life = Lifecycle(state, out, clock=lambda: now[0])
    first, second = _worker(state, "core0", capacity=1), _worker(state, "core1", capacity=1)
    c = _waiting(state, 1, at=100.0)
    life.dispatch()
    taken = first if c.worker == "core0" else second
    other = second if taken is first else first
    other.inflight["busy"] = _waiting(state, 2)          # the other core is busy
    state.queues["llm"].remove(other.inflight["busy"])
    _waiting(state, 3, at=100.0)
    now[0] = 104.0
    life.worker_lost(taken, "no heartbeat for 2.1s")
    assert c.state.value == "queued" and c.lost == 1 and c.service_s == 4.0
    assert next(iter(state.queues["llm"])) is c          # ahead of the call that waited
    del other.inflight["busy"]
    life.dispatch()
    assert c.worker == other.name and c.attempts == 2
    now[0] = 105.0
    life.worker_lost(other, "it was restarted")
    assert c.kid not in state.calls
    (reply,) = [m for who, m in out.clients if m.re == "c1"]
    assert reply.body["code"] == ErrorCode.WORKER_LOST and reply.body["retriable"]
