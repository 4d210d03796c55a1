"""Pure scheduler logic: the FIFO policy, the access rules, approvals."""

from aiosd.config import AccessConfig, GroupConfig
from aiosd.scheduler import policy
from aiosd.scheduler.access import AccessRules, Principal
from aiosd.scheduler.approvals import ApprovalTable, summarize
from aiosd.scheduler.calls import Call
from libaios.protocol import MsgType


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
    assert a.expires == 50.0 and b.expires == 10.0
    assert table.expired(9.9) == [] and table.expired(10.0) == [b]
    assert table.take(a.id) is a and table.take(a.id) is None


def test_summaries_hide_bytes_and_shorten() -> None:
    out = summarize({"data": b"x" * 10, "text": "y" * 500, "as_namespace": "z"}, limit=20)
    assert out == {"data": "<10 bytes>", "text": "y" * 20 + "…"}


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
    now = [0.0]
    fair = policy.make("fair", quantum=8, starvation_s=30.0, service=lambda a: service[a],
                       clock=lambda: now[0])
    heavy, light = call(1), call(2)
    heavy.agent, light.agent = "heavy", "light"
    fair.push(heavy)
    fair.push(light)
    assert fair.pop() is light
    fair.push(light)
    now[0] = 31.0  # heavy's call has waited past the starvation guard
    assert fair.pop() is heavy
    running = call(3)
    running.agent, running.turn_tokens = "heavy", 8
    assert fair.preempt([running], now[0]) == [running]  # light waits
    prio = policy.make("fair", service=lambda a: service[a],
                       priority=lambda a: 10 if a == "heavy" else 0)
    prio.push(light)
    prio.push(heavy)
    assert prio.pop() is heavy


def test_token_bucket_throttles_and_refills() -> None:
    from aiosd.scheduler.quota import TokenBucket

    b = TokenBucket(rate=10.0, burst=100.0)
    assert b.allows(0.0)
    b.charge(150, 0.0)
    assert not b.allows(1.0) and b.ready_in(1.0) > 0
    assert b.allows(5.1)
    assert b.level <= 100.0
