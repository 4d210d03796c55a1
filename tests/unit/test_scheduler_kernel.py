"""The scheduler without its sockets (kernel): client and worker frames in,
what it would send out of its outbox. No sockets, no processes."""

import pytest
import zmq

from aiosd.scheduler.calls import Call
from libaios import protocol
from libaios.protocol import ErrorCode, MsgType


def test_a_worker_result_the_scheduler_cannot_read_ends_its_call_not_the_kernel(sched) -> None:
    """Fault injection: a core's answers that break the scheduler's handling
    (a suspension without its snapshot, a usage that is not a map, a
    progress count that is not a number) cost the call, answered with an
    internal error, and the scheduler goes on."""
    import time

    from aiosd.scheduler.calls import CallState

    sent = sched.out.clients
    now = time.time()
    worker = _core(sched, capacity=4)
    for n, (mtype, body) in enumerate([
        (MsgType.REPLY, {"finish_reason": "suspended"}),
        (MsgType.REPLY, {"text": "hi", "usage": "lots"}),
        (MsgType.WORKER_PROGRESS, {"tokens": "many"}),
    ]):
        c = Call(f"k{n}", b"client", f"c{n}", "a1", MsgType.LLM_CHAT, "llm", {}, None, now)
        sched.state.calls[c.kid] = c
        sched.life.start(c, worker, now)
        msg = protocol.Message(mtype, protocol.new_id(), body, re=c.kid)
        sched.on_worker_frames([b"core0", *protocol.encode(msg)])
        if mtype is MsgType.WORKER_PROGRESS:   # a progress note it cannot read is ignored
            assert c.state is CallState.RUNNING and not sent
            continue
        assert c.kid not in sched.state.calls and c.kid not in worker.inflight
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
    old, recent, live = (sched.state.agents.register(name, None) for name in ("old", "recent", "live"))
    sched.state.agents.disconnect(old, now - 7200)
    sched.state.agents.disconnect(recent, now - 60)
    sched.tick(now)
    assert sched.state.agents.get(old.id) is None
    assert sched.state.agents.get(recent.id) is recent and sched.state.agents.get(live.id) is live


@pytest.fixture
def make_sched(tmp_path):
    """Schedulers without sockets: what they would send stays in their
    outbox; ``scheduler`` overrides settings of the default config's
    scheduler section."""
    from dataclasses import replace

    from aiosd.config import from_dict
    from aiosd.scheduler.kernel import Kernel

    def make(**scheduler):
        # one model whose one core is named core0, as the tests' cores are
        config = from_dict({"llm": {"models": [{"name": "core0"}]}})
        return Kernel(replace(config, scheduler=replace(config.scheduler, **scheduler)), tmp_path)

    return make


def sent_workers(sched) -> list[tuple[str, protocol.Message]]:
    """What the scheduler sent its workers: (the worker's name, message)
    (a test's worker is named as its connection's routing id)."""
    return [(identity.decode(), msg) for identity, msg, _ in sched.out.workers]


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
    sched.state.workers[name] = worker
    sched.state.worker_names[worker.identity] = name
    return worker


def _queued(sched, n: int, agent: str = "a1") -> Call:
    import time

    now = time.time()
    c = Call(f"k{n}", b"client", f"c{n}", agent, MsgType.LLM_CHAT, "llm", {}, None, now, queued_at=now)
    sched.state.calls[c.kid] = c
    sched.state.queues["llm"].push(c)
    return c


def test_a_core_taken_for_lost_keeps_the_calls_it_still_runs(sched) -> None:
    """A core whose heartbeats came late was taken for lost; it registers
    again, still running a call: the call stays its call (not run twice),
    and a call it runs that the kernel no longer waits for is cancelled."""

    from aiosd.scheduler.calls import CallState

    worker = _core(sched)
    c = _queued(sched, 1)
    sched.life.dispatch()
    assert c.state is CallState.RUNNING and c.worker == "core0"
    sched.life.worker_lost(worker, "no heartbeat for 2.1s")
    assert c.state is CallState.QUEUED and c.lost == 1
    ready = protocol.call(MsgType.WORKER_READY, {
        "kind": "llm", "name": "core0", "capacity": 2, "pid": worker.pid + 1, "types": ["llm.chat"],
        "info": {}, "running": [c.kid, "gone-call"]})
    sent = len(sent_workers(sched))
    sched.on_worker_frames([b"core0", *protocol.encode(ready)])
    again = sched.state.workers["core0"]
    assert c.state is CallState.RUNNING and again.inflight == {c.kid: c} and c.attempts == 1
    told = [(name, m.type, m.body.get("call")) for name, m in sent_workers(sched)[sent:]]
    assert ("core0", MsgType.WORKER_CANCEL, "gone-call") in told
    assert not any(t == MsgType.WORKER_TASK for _, t, _ in told)   # not sent to run again
    assert len(sched.state.queues["llm"]) == 0


def test_calls_waiting_for_a_kind_no_worker_can_ever_run_end_at_once(sched) -> None:
    c = _queued(sched, 1)
    identity = b"supervisor"
    from aiosd.scheduler.peers import Session

    sched.state.sessions[identity] = Session(identity=identity, name="supervisor", operator=True, internal=True)
    procs = protocol.call(MsgType.ADMIN_PROCS, {"procs": [
        {"name": "core0", "kind": "llm", "state": "fatal"}]})
    sched.admin.on_procs(sched.state.sessions[identity], identity, procs)
    assert c.kid not in sched.state.calls and len(sched.state.queues["llm"]) == 0
    replies = [m for who, m in sched.out.clients if who == b"client"]
    assert replies and replies[0].body["code"] == ErrorCode.UNAVAILABLE


def test_only_as_many_calls_give_way_as_the_waiting_calls_need(make_sched) -> None:
    sched = make_sched(policy="rr", quantum_tokens=8)
    _core(sched, capacity=3)
    running = [_queued(sched, n) for n in range(3)]
    sched.life.dispatch()
    for n, c in enumerate(running):
        c.turn_tokens = 10 + n   # all past their quantum
    _queued(sched, 9, agent="a2")
    sched.life.preempt()
    suspends = [m.body["call"] for _, m in sent_workers(sched) if m.type is MsgType.WORKER_SUSPEND]
    assert suspends == ["k2"]            # one waits: one gives way, the longest
    sched.life.preempt()                     # already giving way: no more
    assert [m.body["call"] for _, m in sent_workers(sched)
            if m.type is MsgType.WORKER_SUSPEND] == ["k2"]


def test_an_operator_session_goes_once_its_process_is_gone(sched) -> None:
    import os
    import subprocess
    import time

    from aiosd.scheduler.peers import Session

    gone = subprocess.Popen(["true"])   # a process that has ended: its pid is free
    gone.wait()
    sched.state.sessions[b"gone"] = Session(b"gone", "aiosctl", operator=True, pid=gone.pid)
    sched.state.sessions[b"here"] = Session(b"here", "aiosctl", operator=True, pid=os.getpid())
    sched.tick(time.time())
    assert b"gone" not in sched.state.sessions and b"here" in sched.state.sessions


def test_a_null_call_goes_to_a_full_core_past_the_chats_that_wait(sched) -> None:
    """A null call takes no slot: with every slot taken and chats waiting,
    it still runs at once (and is no reason to suspend a chat)."""
    from aiosd.scheduler.calls import CallState

    worker = _core(sched, capacity=1)
    worker.types = frozenset({"llm.chat", "sys.null"})
    running, waiting = _queued(sched, 1), None
    sched.life.dispatch()
    waiting = _queued(sched, 2)
    null = _queued(sched, 3)
    null.type = MsgType.SYS_NULL
    sched.life.dispatch()
    assert running.state is CallState.RUNNING and null.state is CallState.RUNNING
    assert waiting.state is CallState.QUEUED
    assert [m.body["call"] for _, m in sent_workers(sched) if m.type is MsgType.WORKER_TASK] == ["k1", "k3"]
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
        one, two, three = (sched.state.agents.register(n, None) for n in ("one", "flood", "three"))
        running = _queued(sched, 1, agent=one.id)
        sched.life.dispatch()
        running.turn_tokens = 50               # past its quantum, and ahead in service
        held = _queued(sched, 2, agent=two.id)   # its agent is over its quota
        held.caller = {"name": "flood"}
        sched.state.buckets["flood"] = bucket = TokenBucket(rate=1.0, burst=10.0)
        bucket.charge(1000, time.time())
        sched.life.preempt()
        assert not [m for _, m in sent_workers(sched) if m.type is MsgType.WORKER_SUSPEND], name
        _queued(sched, 3, agent=three.id)      # one that could run
        sched.life.preempt()
        assert [m.body["call"] for _, m in sent_workers(sched)
                if m.type is MsgType.WORKER_SUSPEND] == ["k1"], name


def test_a_call_that_times_out_is_charged_what_it_generated(sched) -> None:
    """A running call past its deadline is answered with a timeout; when
    its core lets go of it, its agent is charged the tokens it generated
    (its quota and its service under the fair policy count them)."""
    import time

    from aiosd.scheduler.calls import CallState
    from aiosd.scheduler.quota import TokenBucket

    agent = sched.state.agents.register("flood", None)
    sched.state.buckets["flood"] = bucket = TokenBucket(rate=1.0, burst=100.0)
    worker = _core(sched)
    c = _queued(sched, 1, agent=agent.id)
    c.caller = {"name": "flood"}
    sched.life.dispatch()
    progress = protocol.Message(MsgType.WORKER_PROGRESS, protocol.new_id(), {"tokens": 40}, re=c.kid)
    sched.on_worker_frames([b"core0", *protocol.encode(progress)])
    c.deadline = time.time() - 1
    sched.tick(time.time())
    assert c.state is CallState.CANCELLING
    reply = sched.out.clients[-1][1]
    assert reply.type is MsgType.ERROR and reply.body["code"] == ErrorCode.TIMEOUT
    cancelled = protocol.error(c.kid, ErrorCode.CANCELLED, "cancelled")
    sched.on_worker_frames([b"core0", *protocol.encode(cancelled)])
    assert c.kid not in sched.state.calls and not worker.inflight
    assert agent.usage.completion_tokens == 40
    assert 59 <= bucket.level <= 61
    assert sched.state.service(agent.id) == 40


def test_a_queued_call_held_by_its_quota_says_so_when_it_times_out(sched) -> None:
    import time

    from aiosd.scheduler.quota import TokenBucket

    _core(sched, capacity=1)
    sched.state.buckets["flood"] = bucket = TokenBucket(rate=2.5, burst=10.0)
    bucket.charge(1000, time.time())
    c = _queued(sched, 1)
    c.caller = {"name": "flood"}
    sched.life.dispatch()
    c.deadline = time.time() - 1
    sched.tick(time.time())
    reply = sched.out.clients[-1][1]
    assert reply.body["code"] == ErrorCode.TIMEOUT
    assert "token quota of 2.5 tokens/s" in reply.body["message"]


def test_a_core_taken_for_lost_is_told_to_drop_the_snapshots_of_calls_that_start_over(sched) -> None:
    from aiosd.scheduler.calls import CallState

    worker = _core(sched, capacity=1)
    c = _queued(sched, 1)
    sched.life.dispatch()
    _queued(sched, 2)   # takes the slot c gives up
    suspended = protocol.reply(c.kid, {"finish_reason": "suspended", "snapshot": "snap-1"})
    sched.on_worker_frames([b"core0", *protocol.encode(suspended)])
    assert c.state is CallState.QUEUED and c.affinity == "core0"
    sched.life.worker_lost(worker, "no heartbeat for 2.1s")
    assert c.affinity is None and c.resume is None
    forgets = [(name, m.body) for name, m in sent_workers(sched) if m.type is MsgType.WORKER_FORGET]
    assert forgets == [("core0", {"snapshots": ["snap-1"]})]


def test_a_chat_cannot_name_a_snapshot_to_resume_from(sched) -> None:
    """The snapshot a suspended call resumes from is a field of the kernel's
    task, never of the caller's body: a caller that writes one in its body
    changes nothing of what its core is told."""
    from aiosd.scheduler.peers import Session

    _core(sched)
    agent = sched.state.agents.register("a", None)
    sched.state.sessions[b"a"] = Session(b"a", "a", operator=False, agent=agent)
    chat = protocol.call(MsgType.LLM_CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                            "resume": "0123456789abcdef"})
    sched.on_client_frames([zmq.Frame(f) for f in [b"a", *protocol.encode(chat)]])
    tasks = [m for _, m in sent_workers(sched) if m.type is MsgType.WORKER_TASK]
    assert len(tasks) == 1 and "resume" not in tasks[0].body


def test_a_call_too_large_to_hand_to_a_worker_is_refused_at_once(sched) -> None:
    from aiosd.scheduler.clients import MAX_CALL_BODY
    from aiosd.scheduler.peers import Session

    agent = sched.state.agents.register("a", None)
    sched.state.sessions[b"a"] = Session(b"a", "a", operator=False, agent=agent)
    put = protocol.call(MsgType.STORAGE_PUT, {"key": "k", "value": "x" * MAX_CALL_BODY})
    sched.on_client_frames([zmq.Frame(f) for f in [b"a", *protocol.encode(put)]])
    identity, reply = sched.out.clients[-1]
    assert reply.re == put.id and reply.body["code"] == ErrorCode.TOO_LARGE
    assert "a call's body may be at most" in reply.body["message"]
    assert not sched.state.calls


@pytest.mark.parametrize("name", ["alice\x00key\x00notes", "tab\there", "x" * 65])
def test_names_that_cannot_name_a_namespace_are_refused(sched, name: str) -> None:
    hello = protocol.call(MsgType.HELLO, {"name": name, "pid": 1})
    sched.on_client_frames([zmq.Frame(f) for f in [b"c", *protocol.encode(hello)]])
    identity, reply = sched.out.clients[-1]
    assert reply.type is MsgType.ERROR and reply.body["code"] == ErrorCode.INVALID_ARGUMENT
    assert b"c" not in sched.state.sessions
    from aiosd.scheduler.peers import Session

    agent = sched.state.agents.register("a", None)
    sched.state.sessions[b"a"] = Session(b"a", "a", operator=False, agent=agent)
    get = protocol.call(MsgType.STORAGE_GET, {"key": "k", "agent": name})
    sched.on_client_frames([zmq.Frame(f) for f in [b"a", *protocol.encode(get)]])
    assert sched.out.clients[-1][1].body["code"] == ErrorCode.INVALID_ARGUMENT


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
    sched.state.workers["tools"] = worker
    sched.state.worker_names[b"tools"] = "tools"
    sched.state.tool_info = {"lookup": {"concurrency": 2, "read_only": True},
                       "deploy": {"concurrency": 2, "read_only": False}}
    made = []
    for n, tool in ((1, "lookup"), (2, "deploy")):
        c = Call(f"t{n}", b"client", f"c{n}", "a1", MsgType.TOOL_CALL, "tool", {}, None, now,
                 queued_at=now, tool=tool)
        sched.state.calls[c.kid] = c
        sched.state.queues["tool"].push(c)
        made.append(c)
    sched.life.dispatch()
    assert all(c.state is CallState.RUNNING for c in made)
    return worker, made[0], made[1]


def _ready_again(sched, running: list[str]) -> None:
    ready = protocol.call(MsgType.WORKER_READY, {
        "kind": "tool", "name": "tools", "capacity": 4, "pid": 1, "types": ["tool.call"],
        "info": {"tools": sched.state.tool_info}, "running": running})
    sched.on_worker_frames([b"tools", *protocol.encode(ready)])


def _lost_reply(sched) -> protocol.Message:
    """The one reply the call of the tool that changes things got."""
    (reply,) = [m for who, m in sched.out.clients if who == b"client" and m.re == "c2"]
    assert reply.body["code"] == ErrorCode.WORKER_LOST
    assert "deploy" in reply.body["message"] and "not run again" in reply.body["message"]
    return reply


def test_a_tool_call_whose_worker_died_runs_again_only_if_the_tool_is_read_only(sched) -> None:
    import subprocess

    from aiosd.scheduler.calls import CallState

    gone = subprocess.Popen(["true"])
    gone.wait()
    worker, lookup, deploy = _tool_calls(sched, gone.pid)
    sched.life.worker_lost(worker, "no heartbeat for 2.1s")
    # the read-only tool waits to run again; the other is answered at once
    assert lookup.state is CallState.QUEUED and lookup.lost == 1
    assert deploy.kid not in sched.state.calls
    assert "stopped" in _lost_reply(sched).body["message"]


def test_a_tool_call_of_a_worker_taken_for_lost_waits_for_it_to_say_whether_it_runs(sched) -> None:
    import os

    from aiosd.scheduler.calls import CallState

    # late heartbeats, and the process lives: it may still be running the call
    worker, lookup, deploy = _tool_calls(sched, os.getpid())
    sched.life.worker_lost(worker, "no heartbeat for 2.1s")
    assert deploy.state is CallState.QUEUED and deploy.held_for == "tools"
    assert deploy not in list(sched.state.queues["tool"]) and not sched.out.clients
    (row,) = [r for r in sched.admin.call_table() if r["call"] == deploy.kid[-8:]]
    assert (row["state"], row["worker"]) == ("held", "tools")
    _ready_again(sched, running=[deploy.kid])
    assert deploy.state is CallState.RUNNING and deploy.held_for is None
    assert sched.state.workers["tools"].inflight[deploy.kid] is deploy
    # taken for lost again, and this time it comes back without the call
    sched.life.worker_lost(sched.state.workers["tools"], "no heartbeat for 2.1s")
    assert deploy.held_for == "tools"
    _ready_again(sched, running=[])
    assert deploy.kid not in sched.state.calls
    assert "restarted" in _lost_reply(sched).body["message"]


def test_a_held_tool_call_that_ends_on_its_worker_gets_its_answer(sched) -> None:
    import os

    worker, lookup, deploy = _tool_calls(sched, os.getpid())
    sched.life.worker_lost(worker, "no heartbeat for 2.1s")
    assert deploy.held_for == "tools"
    # the worker did not know it was taken for lost, and answers
    done = protocol.reply(deploy.kid, {"name": "deploy", "result": {"ok": True}})
    sched.on_worker_frames([b"tools", *protocol.encode(done)])
    assert deploy.kid not in sched.state.calls and deploy.held_for is None
    (reply,) = [m for who, m in sched.out.clients if who == b"client" and m.re == "c2"]
    assert reply.type is MsgType.REPLY and reply.body["result"] == {"ok": True}


def test_a_throttled_call_that_times_out_running_counts_as_throttled(sched) -> None:
    import time

    agent = sched.state.agents.register("slow", None)
    _core(sched)
    c = _queued(sched, 1, agent=agent.id)
    c.throttled = True   # held back by its quota once, then run
    sched.life.dispatch()
    c.deadline = time.time() - 1
    sched.tick(time.time())
    assert agent.usage.failed == 1 and agent.usage.throttled == 1


def test_a_key_binds_the_gateway_s_connection_and_its_revocation_ends_it(
        tmp_path, monkeypatch) -> None:
    """An API key, presented by the gateway (its kernel credential), makes
    the connection its agent's, in the groups the key was made with; the
    same hello from anyone else is refused; revoking the key drops the
    connection and the groups."""
    from aiosd import credentials
    from aiosd.config import from_dict
    from aiosd.scheduler.kernel import Kernel
    from aiosd.scheduler.peers import Session

    monkeypatch.setenv("AIOS_DATA_DIR", str(tmp_path / "data"))
    config = from_dict({"access": {"groups": [{"name": "team", "members": [],
                                                "access": "write"}]}})
    k = Kernel(config, tmp_path)
    k.state.supervisor_token = "the supervisor's secret"   # (no supervisor pid: not checked)
    k.state.add_session(Session(b"op", "op", operator=True))

    def send(identity: bytes, mtype: MsgType, body: dict) -> protocol.Message:
        msg = protocol.call(mtype, body)
        k.on_client_frames([zmq.Frame(f) for f in [identity, *protocol.encode(msg)]])
        (reply,) = [m for who, m in k.out.clients if m.re == msg.id]
        return reply

    made = send(b"op", MsgType.ADMIN_KEYS, {"op": "create", "name": "alice", "groups": ["team"]})
    key = made.body["key"]
    assert key.startswith("aios-sk-") and k.state.keys.rows()[0]["name"] == "alice"
    refused = send(b"agent", MsgType.HELLO, {"name": "alice", "key": key})
    assert refused.body["code"] == ErrorCode.PERMISSION_DENIED
    gateway = credentials.derive("the supervisor's secret", "gateway")
    hello = send(b"gw", MsgType.HELLO, {"name": "gateway", "token": gateway, "key": key})
    assert hello.body["name"] == "alice" and not hello.body["operator"]
    assert k.state.rules.groups_of("alice") == ["team"]
    bad = send(b"gw2", MsgType.HELLO, {"name": "gateway", "token": gateway, "key": key + "x"})
    assert bad.body["code"] == ErrorCode.UNAUTHENTICATED
    send(b"op", MsgType.ADMIN_KEYS, {"op": "revoke", "name": "alice"})
    assert b"gw" not in k.state.sessions and k.state.rules.groups_of("alice") == []
    assert send(b"gw", MsgType.SYS_NULL, {}).body["code"] == ErrorCode.UNAUTHENTICATED


def test_heartbeats_tell_of_evictions_and_of_a_core_slowing_down_and_back(make_sched) -> None:
    """What a core's heartbeats count becomes events: conversations it
    evicted, and its decode rate falling under half its median for 2 s
    (a fake clock: the heartbeats' times are given)."""
    from aiosd.scheduler import slowcore

    sched = make_sched(slow_core_fraction=0.5, slow_core_seconds=2.0)
    worker = _core(sched)
    health, now = sched.workers.health, 1000.0
    totals = {"gen_steps": 0, "decode_tokens": 0, "gen_s": 0.0, "evicted_seqs": 3}

    def beat(rate: float, evicted: int = 0) -> list[tuple[str, dict]]:
        nonlocal now
        now += 0.5
        totals["gen_steps"] += 10
        totals["decode_tokens"] += 10
        totals["gen_s"] += 10 / rate
        totals["evicted_seqs"] += evicted
        health.on_stats(worker, dict(totals), now)
        worker.stats = dict(totals)
        events, sched.out.events = sched.out.events, []
        return events

    for _ in range(slowcore.MIN_HISTORY + 2):
        assert beat(100.0) == []
    assert beat(100.0, evicted=2) == [("worker.core0.evicted", {
        "worker": "core0", "kind": "llm", "evicted": {"evicted_seqs": 2}})]
    assert [e for _ in range(4) for e in beat(20.0)] == []   # slow, 1.5 s so far
    ((topic, body),) = beat(20.0)
    assert topic == "core.core0.slow" and body["slow"] and body["median"] == 100.0
    status = sched.admin.status()
    assert status["slow_cores"] == ["core0"]
    assert status["cores"][0]["decode"]["slow_since"] == body["since"]
    ((topic, body),) = beat(100.0)
    assert topic == "core.core0.recovered" and not body["slow"]
    assert sched.admin.status()["slow_cores"] == []
