"""Pure scheduler logic: the FIFO policy, the access rules, approvals."""

from aiosd.config import AccessConfig, GroupConfig
from aiosd.scheduler import policy
from aiosd.scheduler.access import AccessRules, Principal
from aiosd.scheduler.approvals import DEADLINE_MARGIN, ApprovalTable, expiry, summarize
import pytest
import zmq

from aiosd.scheduler.calls import Call
from libaios import protocol
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


def test_a_worker_result_the_scheduler_cannot_read_ends_its_call_not_the_kernel(sched) -> None:
    """Fault injection: a core's answers that break the scheduler's handling
    (a suspension without its snapshot, a usage that is not a map, a
    progress count that is not a number) cost the call, answered with an
    internal error, and the scheduler goes on."""
    import time

    from aiosd.scheduler.calls import CallState

    sent = sched.sent_clients
    now = time.time()
    worker = _core(sched, capacity=4)
    for n, (mtype, body) in enumerate([
        (MsgType.REPLY, {"finish_reason": "suspended"}),
        (MsgType.REPLY, {"text": "hi", "usage": "lots"}),
        (MsgType.WORKER_PROGRESS, {"tokens": "many"}),
    ]):
        c = Call(f"k{n}", b"client", f"c{n}", "a1", MsgType.LLM_CHAT, "llm", {}, None, now)
        sched.calls[c.kid] = c
        sched._start(c, worker)
        msg = protocol.Message(mtype, protocol.new_id(), body, re=c.kid)
        sched.on_worker_frames([b"core0", *protocol.encode(msg)])
        if mtype is MsgType.WORKER_PROGRESS:   # a progress note it cannot read is ignored
            assert c.state is CallState.RUNNING and not sent
            continue
        assert c.kid not in sched.calls and c.kid not in worker.inflight
        identity, reply = sent.pop()
        assert identity == b"client" and reply.re == c.client_call_id
        if n == 0:
            assert reply.type is MsgType.ERROR and reply.body["code"] == ErrorCode.INTERNAL
            assert "core0" in reply.body["message"]
        else:   # answered; the usage it could not read counts nothing
            assert reply.type is MsgType.REPLY


def test_records_of_agents_that_ended_long_ago_are_let_go_of(sched) -> None:
    import time

    now = time.time()
    old, recent, live = (sched.agents.register(name, None) for name in ("old", "recent", "live"))
    sched.agents.disconnect(old, now - 7200)
    sched.agents.disconnect(recent, now - 60)
    sched.tick(now)
    assert sched.agents.get(old.id) is None
    assert sched.agents.get(recent.id) is recent and sched.agents.get(live.id) is live


@pytest.fixture
def make_sched(tmp_path):
    """Schedulers whose sockets are never bound: what they send is recorded
    (``sent_clients``, ``sent_workers``); ``scheduler`` overrides settings
    of the default config's scheduler section."""
    from dataclasses import replace

    from aiosd.config import load
    from aiosd.scheduler.server import Scheduler

    made = []

    def make(**scheduler):
        config = load(None)
        config = replace(config, scheduler=replace(config.scheduler, **scheduler))
        sched = Scheduler(config, tmp_path)
        sched.sent_clients, sched.sent_workers = [], []
        sched.send_client = lambda identity, msg: sched.sent_clients.append((identity, msg))
        sched.send_worker = lambda worker, msg, **kw: sched.sent_workers.append((worker.name, msg)) or True
        made.append(sched)
        return sched

    yield make
    for sched in made:
        for sock in (sched.clients, sched.workers_sock, sched.events):
            sock.close(0)


@pytest.fixture
def sched(make_sched):
    return make_sched()


def _core(sched, name: str = "core0", capacity: int = 2):
    import os
    import time

    from aiosd.scheduler.peers import Worker

    now = time.time()
    worker = Worker(name=name, kind="llm", capacity=capacity, pid=os.getpid(),
                    types=frozenset({"llm.chat"}), info={}, last_seen=now, registered=now,
                    identity=name.encode())
    sched.workers[name] = worker
    sched.worker_names[worker.identity] = name
    return worker


def _queued(sched, n: int, agent: str = "a1") -> Call:
    import time

    now = time.time()
    c = Call(f"k{n}", b"client", f"c{n}", agent, MsgType.LLM_CHAT, "llm", {}, None, now, queued_at=now)
    sched.calls[c.kid] = c
    sched.queues["llm"].push(c)
    return c


def test_a_core_taken_for_lost_keeps_the_calls_it_still_runs(sched) -> None:
    """A core whose heartbeats came late was taken for lost; it registers
    again, still running a call: the call stays its call (not run twice),
    and a call it runs that the kernel no longer waits for is cancelled."""
    import time

    from aiosd.scheduler.calls import CallState

    worker = _core(sched)
    c = _queued(sched, 1)
    sched.dispatch()
    assert c.state is CallState.RUNNING and c.worker == "core0"
    sched.worker_lost(worker, "no heartbeat for 2.1s")
    assert c.state is CallState.QUEUED and c.lost == 1
    ready = protocol.call(MsgType.WORKER_READY, {
        "kind": "llm", "name": "core0", "capacity": 2, "pid": worker.pid + 1, "types": ["llm.chat"],
        "info": {}, "running": [c.kid, "gone-call"]})
    sent = len(sched.sent_workers)
    sched.on_worker_frames([b"core0", *protocol.encode(ready)])
    again = sched.workers["core0"]
    assert c.state is CallState.RUNNING and again.inflight == {c.kid: c} and c.attempts == 1
    told = [(name, m.type, m.body.get("call")) for name, m in sched.sent_workers[sent:]]
    assert ("core0", MsgType.WORKER_CANCEL, "gone-call") in told
    assert not any(t == MsgType.WORKER_TASK for _, t, _ in told)   # not sent to run again
    assert len(sched.queues["llm"]) == 0


def test_calls_waiting_for_a_kind_no_worker_can_ever_run_end_at_once(sched) -> None:
    c = _queued(sched, 1)
    identity = b"supervisor"
    from aiosd.scheduler.peers import Session

    sched.sessions[identity] = Session(identity=identity, name="supervisor", operator=True, internal=True)
    procs = protocol.call(MsgType.ADMIN_PROCS, {"procs": [
        {"name": "core0", "kind": "llm", "state": "fatal"}]})
    sched.on_procs(sched.sessions[identity], identity, procs)
    assert c.kid not in sched.calls and len(sched.queues["llm"]) == 0
    replies = [m for who, m in sched.sent_clients if who == b"client"]
    assert replies and replies[0].body["code"] == ErrorCode.UNAVAILABLE


def test_only_as_many_calls_give_way_as_the_waiting_calls_need(make_sched) -> None:
    sched = make_sched(policy="rr", quantum_tokens=8)
    _core(sched, capacity=3)
    running = [_queued(sched, n) for n in range(3)]
    sched.dispatch()
    for n, c in enumerate(running):
        c.turn_tokens = 10 + n   # all past their quantum
    _queued(sched, 9, agent="a2")
    sched._preempt()
    suspends = [m.body["call"] for _, m in sched.sent_workers if m.type is MsgType.WORKER_SUSPEND]
    assert suspends == ["k2"]            # one waits: one gives way, the longest
    sched._preempt()                     # already giving way: no more
    assert [m.body["call"] for _, m in sched.sent_workers
            if m.type is MsgType.WORKER_SUSPEND] == ["k2"]


def test_an_operator_session_goes_once_its_process_is_gone(sched) -> None:
    import os
    import subprocess
    import time

    from aiosd.scheduler.peers import Session

    gone = subprocess.Popen(["true"])   # a process that has ended: its pid is free
    gone.wait()
    sched.sessions[b"gone"] = Session(b"gone", "aiosctl", operator=True, pid=gone.pid)
    sched.sessions[b"here"] = Session(b"here", "aiosctl", operator=True, pid=os.getpid())
    sched.tick(time.time())
    assert b"gone" not in sched.sessions and b"here" in sched.sessions


def test_a_null_call_goes_to_a_full_core_past_the_chats_that_wait(sched) -> None:
    """A null call takes no slot: with every slot taken and chats waiting,
    it still runs at once (and is no reason to suspend a chat)."""
    from aiosd.scheduler.calls import CallState

    worker = _core(sched, capacity=1)
    worker.types = frozenset({"llm.chat", "sys.null"})
    running, waiting = _queued(sched, 1), None
    sched.dispatch()
    waiting = _queued(sched, 2)
    null = _queued(sched, 3)
    null.type = MsgType.SYS_NULL
    sched.dispatch()
    assert running.state is CallState.RUNNING and null.state is CallState.RUNNING
    assert waiting.state is CallState.QUEUED
    assert [m.body["call"] for _, m in sched.sent_workers if m.type is MsgType.WORKER_TASK] == ["k1", "k3"]
    assert worker.free == 0   # the null call holds no slot: the chat's end frees one
    done = protocol.reply(running.kid, {"text": "", "finish_reason": "stop"})
    sched.on_worker_frames([b"core0", *protocol.encode(done)])
    assert waiting.state is CallState.RUNNING


def test_calls_that_could_not_take_a_freed_slot_suspend_no_one(make_sched) -> None:
    import time

    from aiosd.scheduler.quota import TokenBucket

    for name in ("rr", "fair"):
        sched = make_sched(policy=name, quantum_tokens=8)
        _core(sched, capacity=1)
        one, two, three = (sched.agents.register(n, None) for n in ("one", "flood", "three"))
        running = _queued(sched, 1, agent=one.id)
        sched.dispatch()
        running.turn_tokens = 50               # past its quantum, and ahead in service
        held = _queued(sched, 2, agent=two.id)   # its agent is over its quota
        held.caller = {"name": "flood"}
        sched.buckets["flood"] = bucket = TokenBucket(rate=1.0, burst=10.0)
        bucket.charge(1000, time.time())
        sched._preempt()
        assert not [m for _, m in sched.sent_workers if m.type is MsgType.WORKER_SUSPEND], name
        _queued(sched, 3, agent=three.id)      # one that could run
        sched._preempt()
        assert [m.body["call"] for _, m in sched.sent_workers
                if m.type is MsgType.WORKER_SUSPEND] == ["k1"], name


def test_a_call_that_times_out_is_charged_what_it_generated(sched) -> None:
    """A running call past its deadline is answered with a timeout; when
    its core lets go of it, its agent is charged the tokens it generated
    (its quota and its service under the fair policy count them)."""
    import time

    from aiosd.scheduler.calls import CallState
    from aiosd.scheduler.quota import TokenBucket

    agent = sched.agents.register("flood", None)
    sched.buckets["flood"] = bucket = TokenBucket(rate=1.0, burst=100.0)
    worker = _core(sched)
    c = _queued(sched, 1, agent=agent.id)
    c.caller = {"name": "flood"}
    sched.dispatch()
    progress = protocol.Message(MsgType.WORKER_PROGRESS, protocol.new_id(), {"tokens": 40}, re=c.kid)
    sched.on_worker_frames([b"core0", *protocol.encode(progress)])
    c.deadline = time.time() - 1
    sched.tick(time.time())
    assert c.state is CallState.CANCELLING
    reply = sched.sent_clients[-1][1]
    assert reply.type is MsgType.ERROR and reply.body["code"] == ErrorCode.TIMEOUT
    cancelled = protocol.error(c.kid, ErrorCode.CANCELLED, "cancelled")
    sched.on_worker_frames([b"core0", *protocol.encode(cancelled)])
    assert c.kid not in sched.calls and not worker.inflight
    assert agent.usage.completion_tokens == 40
    assert 59 <= bucket.level <= 61
    assert sched._service(agent.id) == 40


def test_a_queued_call_held_by_its_quota_says_so_when_it_times_out(sched) -> None:
    import time

    from aiosd.scheduler.quota import TokenBucket

    _core(sched, capacity=1)
    sched.buckets["flood"] = bucket = TokenBucket(rate=2.5, burst=10.0)
    bucket.charge(1000, time.time())
    c = _queued(sched, 1)
    c.caller = {"name": "flood"}
    sched.dispatch()
    c.deadline = time.time() - 1
    sched.tick(time.time())
    reply = sched.sent_clients[-1][1]
    assert reply.body["code"] == ErrorCode.TIMEOUT
    assert "token quota of 2.5 tokens/s" in reply.body["message"]


def test_a_core_taken_for_lost_is_told_to_drop_the_snapshots_of_calls_that_start_over(sched) -> None:
    from aiosd.scheduler.calls import CallState

    worker = _core(sched, capacity=1)
    c = _queued(sched, 1)
    sched.dispatch()
    _queued(sched, 2)   # takes the slot c gives up
    suspended = protocol.reply(c.kid, {"finish_reason": "suspended", "snapshot": "snap-1"})
    sched.on_worker_frames([b"core0", *protocol.encode(suspended)])
    assert c.state is CallState.QUEUED and c.affinity == "core0"
    sched.worker_lost(worker, "no heartbeat for 2.1s")
    assert c.affinity is None and c.resume is None
    forgets = [(name, m.body) for name, m in sched.sent_workers if m.type is MsgType.WORKER_FORGET]
    assert forgets == [("core0", {"snapshots": ["snap-1"]})]


def test_a_chat_cannot_name_a_snapshot_to_resume_from(sched) -> None:
    """The snapshot a suspended call resumes from is a field of the kernel's
    task, never of the caller's body: a caller that writes one in its body
    changes nothing of what its core is told."""
    from aiosd.scheduler.peers import Session

    _core(sched)
    agent = sched.agents.register("a", None)
    sched.sessions[b"a"] = Session(b"a", "a", operator=False, agent=agent)
    chat = protocol.call(MsgType.LLM_CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                            "resume": "0123456789abcdef"})
    sched.on_client_frames([zmq.Frame(f) for f in [b"a", *protocol.encode(chat)]])
    tasks = [m for _, m in sched.sent_workers if m.type is MsgType.WORKER_TASK]
    assert len(tasks) == 1 and "resume" not in tasks[0].body


def test_a_call_too_large_to_hand_to_a_worker_is_refused_at_once(sched) -> None:
    from aiosd.scheduler.clients import MAX_CALL_BODY
    from aiosd.scheduler.peers import Session

    agent = sched.agents.register("a", None)
    sched.sessions[b"a"] = Session(b"a", "a", operator=False, agent=agent)
    put = protocol.call(MsgType.STORAGE_PUT, {"key": "k", "value": "x" * MAX_CALL_BODY})
    sched.on_client_frames([zmq.Frame(f) for f in [b"a", *protocol.encode(put)]])
    identity, reply = sched.sent_clients[-1]
    assert reply.re == put.id and reply.body["code"] == ErrorCode.TOO_LARGE
    assert "a call's body may be at most" in reply.body["message"]
    assert not sched.calls


@pytest.mark.parametrize("name", ["alice\x00key\x00notes", "tab\there", "x" * 65])
def test_names_that_cannot_name_a_namespace_are_refused(sched, name: str) -> None:
    hello = protocol.call(MsgType.HELLO, {"name": name, "pid": 1})
    sched.on_client_frames([zmq.Frame(f) for f in [b"c", *protocol.encode(hello)]])
    identity, reply = sched.sent_clients[-1]
    assert reply.type is MsgType.ERROR and reply.body["code"] == ErrorCode.INVALID_ARGUMENT
    assert b"c" not in sched.sessions
    from aiosd.scheduler.peers import Session

    agent = sched.agents.register("a", None)
    sched.sessions[b"a"] = Session(b"a", "a", operator=False, agent=agent)
    get = protocol.call(MsgType.STORAGE_GET, {"key": "k", "agent": name})
    sched.on_client_frames([zmq.Frame(f) for f in [b"a", *protocol.encode(get)]])
    assert sched.sent_clients[-1][1].body["code"] == ErrorCode.INVALID_ARGUMENT


def _tool_calls(sched, pid: int) -> tuple:
    """A tool worker of process ``pid`` running a read-only tool's call and
    a call of a tool that changes things."""
    import time

    from aiosd.scheduler.calls import CallState
    from aiosd.scheduler.peers import Worker

    now = time.time()
    worker = Worker(name="tools", kind="tool", capacity=4, pid=pid,
                    types=frozenset({"tool.call"}), info={}, last_seen=now, registered=now,
                    identity=b"tools")
    sched.workers["tools"] = worker
    sched.worker_names[b"tools"] = "tools"
    sched.tool_info = {"lookup": {"concurrency": 2, "read_only": True},
                       "deploy": {"concurrency": 2, "read_only": False}}
    made = []
    for n, tool in ((1, "lookup"), (2, "deploy")):
        c = Call(f"t{n}", b"client", f"c{n}", "a1", MsgType.TOOL_CALL, "tool", {}, None, now,
                 queued_at=now, tool=tool)
        sched.calls[c.kid] = c
        sched.queues["tool"].push(c)
        made.append(c)
    sched.dispatch()
    assert all(c.state is CallState.RUNNING for c in made)
    return worker, made[0], made[1]


def _ready_again(sched, running: list[str]) -> None:
    ready = protocol.call(MsgType.WORKER_READY, {
        "kind": "tool", "name": "tools", "capacity": 4, "pid": 1, "types": ["tool.call"],
        "info": {"tools": sched.tool_info}, "running": running})
    sched.on_worker_frames([b"tools", *protocol.encode(ready)])


def _lost_reply(sched) -> protocol.Message:
    """The one reply the call of the tool that changes things got."""
    (reply,) = [m for who, m in sched.sent_clients if who == b"client" and m.re == "c2"]
    assert reply.body["code"] == ErrorCode.WORKER_LOST
    assert "deploy" in reply.body["message"] and "not run again" in reply.body["message"]
    return reply


def test_a_tool_call_whose_worker_died_runs_again_only_if_the_tool_is_read_only(sched) -> None:
    import subprocess

    from aiosd.scheduler.calls import CallState

    gone = subprocess.Popen(["true"])
    gone.wait()
    worker, lookup, deploy = _tool_calls(sched, gone.pid)
    sched.worker_lost(worker, "no heartbeat for 2.1s")
    # the read-only tool waits to run again; the other is answered at once
    assert lookup.state is CallState.QUEUED and lookup.lost == 1
    assert deploy.kid not in sched.calls
    assert "stopped" in _lost_reply(sched).body["message"]


def test_a_tool_call_of_a_worker_taken_for_lost_waits_for_it_to_say_whether_it_runs(sched) -> None:
    import os

    from aiosd.scheduler.calls import CallState

    # late heartbeats, and the process lives: it may still be running the call
    worker, lookup, deploy = _tool_calls(sched, os.getpid())
    sched.worker_lost(worker, "no heartbeat for 2.1s")
    assert deploy.state is CallState.QUEUED and deploy.held_for == "tools"
    assert deploy not in list(sched.queues["tool"]) and not sched.sent_clients
    (row,) = [r for r in sched.call_table() if r["call"] == deploy.kid[-8:]]
    assert (row["state"], row["worker"]) == ("held", "tools")
    _ready_again(sched, running=[deploy.kid])
    assert deploy.state is CallState.RUNNING and deploy.held_for is None
    assert sched.workers["tools"].inflight[deploy.kid] is deploy
    # taken for lost again, and this time it comes back without the call
    sched.worker_lost(sched.workers["tools"], "no heartbeat for 2.1s")
    assert deploy.held_for == "tools"
    _ready_again(sched, running=[])
    assert deploy.kid not in sched.calls
    assert "restarted" in _lost_reply(sched).body["message"]


def test_a_held_tool_call_that_ends_on_its_worker_gets_its_answer(sched) -> None:
    import os

    worker, lookup, deploy = _tool_calls(sched, os.getpid())
    sched.worker_lost(worker, "no heartbeat for 2.1s")
    assert deploy.held_for == "tools"
    # the worker did not know it was taken for lost, and answers
    done = protocol.reply(deploy.kid, {"name": "deploy", "result": {"ok": True}})
    sched.on_worker_frames([b"tools", *protocol.encode(done)])
    assert deploy.kid not in sched.calls and deploy.held_for is None
    (reply,) = [m for who, m in sched.sent_clients if who == b"client" and m.re == "c2"]
    assert reply.type is MsgType.REPLY and reply.body["result"] == {"ok": True}


def test_a_throttled_call_that_times_out_running_counts_as_throttled(sched) -> None:
    import time

    agent = sched.agents.register("slow", None)
    _core(sched)
    c = _queued(sched, 1, agent=agent.id)
    c.throttled = True   # held back by its quota once, then run
    sched.dispatch()
    c.deadline = time.time() - 1
    sched.tick(time.time())
    assert agent.usage.failed == 1 and agent.usage.throttled == 1
