"""The slow-core detector, on a fake clock and made-up counters."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aiosd.scheduler import slowcore
from aiosd.scheduler.slowcore import Change, Counters, SlowCore


@dataclass
class FakeCore:
    """A core's running totals, grown one heartbeat at a time."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    now: float = 1000.0

    def beat(self, rate: float, batch: int = 1, steps: int = 10, dt: float = 0.5) -> Counters:
        """One heartbeat later: ``steps`` steps of ``batch`` calls at ``rate`` tokens/s."""
        self.now += dt
        self.steps += steps
        self.tokens += steps * batch
        self.seconds += steps * batch / rate
        return Counters(self.steps, self.tokens, self.seconds)


def run(det: SlowCore, core: FakeCore, beats: int, rate: float, batch: int = 1) -> list[Change]:
    changes = []
    for _ in range(beats):
        counters = core.beat(rate, batch)
        changes.append(det.observe(core.now, counters))
    return [c for c in changes if c is not None]


def detector() -> tuple[SlowCore, FakeCore]:
    det, core = SlowCore(fraction=0.5, seconds=10.0), FakeCore()
    assert run(det, core, 1 + slowcore.MIN_HISTORY + 20, rate=100.0) == []
    return det, core


def test_a_steady_core_is_never_flagged() -> None:
    det, core = detector()
    assert run(det, core, 10, rate=95.0) == [] and det.flagged is None
    assert det.view() == {"rate": 95.0, "median": 100.0, "slow_since": None}
    assert run(det, core, 200, rate=95.0) == []
    assert det.view()["median"] == 95.0   # the recent median: the last HISTORY windows


def test_a_core_slow_for_the_configured_time_is_flagged_once_and_cleared_when_back() -> None:
    det, core = detector()
    start = core.now + 0.5   # the first slow window
    # under half its median: flagged once 10 s of windows have been slow
    assert run(det, core, 20, rate=30.0) == []
    (flag,) = run(det, core, 2, rate=30.0)
    assert flag.slow and flag.since == start and flag.at - flag.since >= 10.0
    assert (flag.rate, flag.median) == (pytest.approx(30.0), pytest.approx(100.0))
    assert det.view()["slow_since"] == start
    assert run(det, core, 50, rate=30.0) == []   # said once, not at every window
    (back,) = run(det, core, 1, rate=90.0)
    assert not back.slow and back.since == start and det.flagged is None
    assert det.view()["slow_since"] is None


def test_a_dip_shorter_than_the_configured_time_is_not_flagged() -> None:
    det, core = detector()
    for _ in range(5):
        assert run(det, core, 15, rate=30.0) == []   # 7.5 s slow
        assert run(det, core, 1, rate=100.0) == []   # and a healthy window between
    assert det.flagged is None


def test_slow_windows_apart_across_an_idle_gap_are_not_slow_all_along() -> None:
    det, core = detector()
    assert run(det, core, 1, rate=30.0) == []
    core.now += 3600.0                           # an hour with no window: the core idled
    assert run(det, core, 1, rate=30.0) == []    # one more slow window is not ten seconds' worth
    assert det.flagged is None
    assert len(run(det, core, 21, rate=30.0)) == 1   # slow all along from here: flagged


def test_windows_that_last_long_because_the_core_is_slow_are_no_idle_gap() -> None:
    """A throttled core's windows each take longer than the configured time:
    the time between them is spent decoding, so they count as slow all along."""
    det, core = SlowCore(fraction=0.5, seconds=1.0), FakeCore()
    assert run(det, core, 1 + slowcore.MIN_HISTORY + 20, rate=100.0) == []
    changes = []
    for _ in range(3):
        counters = core.beat(5.0, dt=2.0)     # 10 steps at 5 tokens/s: 2 s of decoding
        changes.append(det.observe(core.now, counters))
    assert [c.slow for c in changes if c is not None] == [True]


def test_a_busier_core_is_compared_with_its_own_rate_at_that_batch_size() -> None:
    det, core = detector()
    assert run(det, core, 30, rate=400.0, batch=8) == []   # batched: more tokens a second
    assert run(det, core, 100, rate=100.0, batch=1) == []  # alone again: as before
    # at 8 calls a step, 100 tokens/s is slow for this core
    assert [c.slow for c in run(det, core, 30, rate=100.0, batch=8)] == [True]


def test_slow_windows_stay_out_of_the_median() -> None:
    det, core = detector()
    assert [c.slow for c in run(det, core, 500, rate=30.0)] == [True]
    assert det.view()["median"] == 100.0 and det.flagged is not None


def test_few_steps_make_one_window_over_several_heartbeats() -> None:
    det, core = SlowCore(0.5, 10.0), FakeCore()
    for _ in range(4):
        counters = core.beat(100.0, steps=3)
        det.observe(core.now, counters)
    # 3 + 3 + 3 steps: one window judged (its rate learnt), not three
    assert det.last == (100.0, None)
    assert len(det._history[0]) == 1


def test_a_restarted_core_counts_from_its_new_totals() -> None:
    det, core = detector()
    restarted = FakeCore(now=core.now)
    counters = restarted.beat(100.0)
    assert det.observe(restarted.now, counters) is None   # counters went down
    assert run(det, restarted, 30, rate=100.0) == [] and det.flagged is None
    assert det.view()["rate"] == 100.0


def test_counters_come_only_from_a_core_that_reports_them() -> None:
    assert Counters.of({"gen_steps": 3, "decode_tokens": 5, "gen_s": 0.5}) == Counters(3, 5, 0.5)
    assert Counters.of({"decode_tokens": 5}) is None
    assert Counters.of({"gen_steps": "3", "decode_tokens": 5, "gen_s": 0.5}) is None
    assert [slowcore.batch_class(b) for b in (1, 1.9, 2, 3.5, 4, 8, 0.5)] == [0, 0, 1, 1, 2, 3, 0]
