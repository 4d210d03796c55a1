"""Where a chat runs: its model's cores, and the core that holds its agent's
conversation (pure: the affinity choice, and the dispatcher on a state the
test builds, with no sockets or processes)."""

from __future__ import annotations

from aiosd.scheduler import affinity, dispatcher
from aiosd.scheduler.affinity import HIT, MOVE, NEW, CoreView, Home
from libaios.protocol import MsgType

from .test_scheduling import _starts, _waiting, _worker


def core(name: str, free: int, capacity: int = 4, **kw) -> CoreView:
    return CoreView(name, free, capacity, **kw)


def test_a_call_goes_home_when_home_has_a_free_slot() -> None:
    home = Home("a", tokens=900)
    cores = [core("a", free=1), core("b", free=4, last_dispatch=-5.0)]
    assert affinity.choose(home, cores) == ("a", HIT)


def test_a_call_with_no_home_takes_the_freest_core_then_the_one_idle_longest() -> None:
    cores = [core("a", free=2, last_dispatch=1.0), core("b", free=2, last_dispatch=0.5),
             core("c", free=1)]
    assert affinity.choose(None, cores) == ("b", NEW)
    # a home whose core is gone (lost, restarted) is no home
    assert affinity.choose(Home("gone", 100), cores) == ("b", NEW)
    assert affinity.choose(None, [core("a", free=0)]) == (None, "no free slot")


def test_a_call_moves_only_when_waiting_costs_more_than_prefilling_again() -> None:
    # home is full: 3 calls wait for it besides this one; a call there takes
    # 2 s and it has 4 slots, so a slot is 2 s away (4 x 2 / 4)
    busy = dict(free=0, waiting=3, call_s=2.0)
    # 900 tokens at 1000 tokens/s elsewhere: 0.9 s < 2 s: move
    assert affinity.choose(Home("a", 900), [core("a", **busy),
                                            core("b", 1, token_rate=1000.0)]) == ("b", MOVE)
    # 3000 tokens: 3 s > 2 s: wait for home
    name, why = affinity.choose(Home("a", 3000), [core("a", **busy),
                                                  core("b", 1, token_rate=1000.0)])
    assert name is None and "holds its conversation" in why
    # nothing measured yet (no call finished at home, no rate): stay
    assert affinity.choose(Home("a", 10), [core("a", free=0, waiting=9),
                                           core("b", 1, token_rate=1000.0)])[0] is None
    assert affinity.choose(Home("a", 10), [core("a", **busy), core("b", 1)])[0] is None
    # no other core has a slot: wait
    assert affinity.choose(Home("a", 10), [core("a", **busy), core("b", 0, token_rate=1e6)])[0] is None


def test_the_wait_and_the_cost_are_what_the_figures_say() -> None:
    assert affinity.expected_wait(core("a", free=1, call_s=9.0)) == 0.0
    assert affinity.expected_wait(core("a", free=0)) is None
    assert affinity.expected_wait(core("a", free=0, capacity=2, waiting=1, call_s=3.0)) == 3.0
    assert affinity.prefill_cost(500, core("b", 1, token_rate=250.0)) == 2.0
    assert affinity.token_rate({"prefill_tokens": 900, "decode_tokens": 100, "decode_s": 2.0}) == 500.0
    assert affinity.token_rate({}) is None
    assert affinity.token_rate({"prefill_tokens": "x", "decode_s": 1}) is None


# -- the dispatcher: models and homes -------------------------------------------------


def _two_models(tmp_path, **scheduler):
    from dataclasses import replace

    from aiosd.config import from_dict
    from aiosd.scheduler.state import State

    config = from_dict({"llm": {"models": [{"name": "small", "replicas": 2},
                                           {"name": "big", "path": "/m/big.gguf"}]}})
    state = State.create(replace(config, scheduler=replace(config.scheduler, **scheduler)),
                         tmp_path)
    assert state.core_model == {"small-0": "small", "small-1": "small", "big": "big"}
    for name in state.core_model:
        _worker(state, name, capacity=2)
    return state


def test_a_chat_goes_only_to_a_core_of_its_model(tmp_path) -> None:
    state = _two_models(tmp_path)
    big = [_waiting(state, n, model="big") for n in range(3)]
    small = _waiting(state, 3, model="small")
    starts = _starts(dispatcher.plan(state, now=1.0))
    # big's one core has two slots: the third call waits, the small call does not
    assert starts == [("k0", "big"), ("k1", "big"), ("k3", "small-0")]
    assert big[2].kid not in dict(starts) and small.kid in dict(starts)
    # a null call names no model: any core
    _waiting(state, 9, type=MsgType.SYS_NULL)
    assert ("k9", "small-1") in _starts(dispatcher.plan(state, now=1.0))


def test_an_agents_turn_goes_to_the_core_holding_its_conversation(tmp_path) -> None:
    state = _two_models(tmp_path)
    state.homes[("agent-1", "small")] = Home("small-1", 400)
    state.workers["small-0"].last_dispatch = -10.0   # the other core idle longer
    _waiting(state, 1, agent="agent-1", model="small")
    plan = dispatcher.plan(state, now=1.0)
    assert [(s.call.kid, s.worker.name, s.outcome) for s in plan.starts] == [
        ("k1", "small-1", HIT)]
    # with affinity off, the freest core idle longest, as for a new agent
    state = _two_models(tmp_path, affinity=False)
    state.homes[("agent-1", "small")] = Home("small-1", 400)
    state.workers["small-0"].last_dispatch = -10.0
    _waiting(state, 1, agent="agent-1", model="small")
    assert _starts(dispatcher.plan(state, now=1.0)) == [("k1", "small-0")]


def test_a_turn_waits_for_its_busy_home_unless_prefilling_elsewhere_is_quicker(tmp_path) -> None:
    from aiosd.scheduler.calls import CallState

    state = _two_models(tmp_path)
    home = state.workers["small-1"]
    for n in (90, 91):   # home's two slots are taken
        running = _waiting(state, n, agent="other", model="small")
        state.queues["llm"].remove(running)
        running.state, running.worker = CallState.RUNNING, home.name
        home.inflight[running.kid] = running
    state.homes[("agent-1", "small")] = Home("small-1", 3000)
    state.call_s["small-1"] = 2.0
    state.workers["small-0"].stats = {"prefill_tokens": 1000, "decode_tokens": 0, "decode_s": 1.0}
    _waiting(state, 1, agent="agent-1", model="small")
    # a slot at home in 1 s (2 s a call, 2 slots); 3000 tokens elsewhere: 3 s
    assert _starts(dispatcher.plan(state, now=1.0)) == []
    # a short conversation (0.5 s to prefill) moves
    state.homes[("agent-1", "small")] = Home("small-1", 500)
    plan = dispatcher.plan(state, now=1.0)
    assert [(s.worker.name, s.outcome) for s in plan.starts] == [("small-0", MOVE)]
