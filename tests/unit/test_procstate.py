"""The supervised child's state machine, on a fake clock."""

from aiosd.procstate import ProcMachine, ProcState, RestartRules

RULES = RestartRules(backoff_initial=0.5, backoff_max=4.0, budget=3, window=60.0, stable_after=1.0)


def test_running_only_after_a_stable_start() -> None:
    m = ProcMachine(RULES)
    m.start(0.0)
    m.tick(0.9)
    assert m.state is ProcState.STARTING
    m.tick(1.0)
    assert m.state is ProcState.RUNNING


def test_backoff_doubles_and_is_capped_then_budget_makes_it_fatal() -> None:
    m = ProcMachine(RULES)
    delays = []
    now = 0.0
    for _ in range(3):
        m.start(now)
        m.exited(now, 1)
        assert m.state is ProcState.BACKOFF
        delays.append(m.retry_at - now)
        assert not m.due(now) and m.due(m.retry_at)
        now = m.retry_at
    assert delays == [0.5, 1.0, 2.0]
    m.start(now)
    m.exited(now, -9)
    assert m.state is ProcState.FATAL and m.last_exit == -9 and m.restarts == 3


def test_cap_and_forgetting_old_crashes() -> None:
    rules = RestartRules(backoff_initial=1.0, backoff_max=2.0, budget=10, window=10.0)
    m = ProcMachine(rules)
    for i in range(4):
        m.start(i)
        m.exited(i, 1)
    assert m.retry_at - 3 == 2.0  # capped
    m2 = ProcMachine(RestartRules(budget=1, window=10.0))
    m2.start(0)
    m2.exited(0, 1)
    m2.start(100)
    m2.exited(100, 1)  # the first crash is out of the window
    assert m2.state is ProcState.BACKOFF


def test_permanent_failure_and_stopping() -> None:
    m = ProcMachine(RULES)
    m.start(0)
    m.exited(0, 78, permanent=True)
    assert m.state is ProcState.FATAL
    m = ProcMachine(RULES)
    m.start(0)
    m.stop()
    assert m.state is ProcState.STOPPING
    m.exited(1, 0)
    assert m.state is ProcState.STOPPED and not m.crashes
    m = ProcMachine(RULES)
    m.start(0)
    m.exited(0, 1)
    m.stop()
    assert m.state is ProcState.STOPPED
