"""Affinity: an agent's turns go to the core that holds its conversation.

A core keeps an agent's KV cells after a call (see aiosd.llm.engine), so
the agent's next call to the same model prefills only its new turn there;
on another core of the model it prefills the whole conversation again. The
scheduler remembers, per agent and model, the core that served the agent's
last call (its *home*) and how long the conversation was. :func:`choose`
decides where a call runs: at home when home has a free slot; on another
core of the model only when that core has a free slot and waiting at home
would cost more than prefilling the conversation there.

Pure: no clock, no sockets; the dispatcher gives it what it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: What a choice was, as counted per core (``aiosctl top``): the call ran
#: at home; it moved to another core; it had no home yet (or home is gone).
HIT, MOVE, NEW = "hits", "moves", "new"


@dataclass(frozen=True)
class Home:
    """The core holding an agent's conversation with a model, and how many
    tokens that conversation had when its last call ended."""

    core: str
    tokens: int


@dataclass(frozen=True)
class CoreView:
    """What the dispatcher knows of one core of the call's model, now."""

    name: str
    free: int                    # slots not taken
    capacity: int
    #: calls queued whose home is this core
    waiting: int = 0
    #: a call's mean time on this core, seconds (None: none has finished yet)
    call_s: float | None = None
    #: tokens a second this core's model evaluates (None: not measured yet)
    token_rate: float | None = None
    #: when a call was last sent to it (among equals, the idle longest wins)
    last_dispatch: float = 0.0


def expected_wait(core: CoreView) -> float | None:
    """Seconds a call that joins the calls waiting for ``core`` waits for a
    slot: one slot frees every call_s / capacity on average. 0 with a free
    slot; None if the core's call time is not known yet."""
    if core.free > 0:
        return 0.0
    if core.call_s is None:
        return None
    return (core.waiting + 1) * core.call_s / max(1, core.capacity)


def prefill_cost(tokens: int, core: CoreView) -> float | None:
    """Seconds ``core`` takes to prefill a conversation of ``tokens`` again
    (None: its rate is not measured yet)."""
    if not core.token_rate:
        return None
    return tokens / core.token_rate


def best_free(cores: list[CoreView]) -> CoreView | None:
    """The core with the most free slots, among equals the one idle longest."""
    free = [c for c in cores if c.free > 0]
    return max(free, key=lambda c: (c.free, -c.last_dispatch), default=None)


def choose(home: Home | None, cores: list[CoreView]) -> tuple[str | None, str]:
    """Where a call runs now: (core, what the choice was), or (None, why it
    waits). ``cores`` are the serving cores of the call's model.

    - No home (or its core is not among ``cores``): the best free core.
    - Home has a free slot: home.
    - Else another core with a free slot, only when the wait at home is
      longer than that core's prefilling the conversation (both known).
    - Else the call waits for home.
    """
    at_home = next((c for c in cores if home is not None and c.name == home.core), None)
    if home is None or at_home is None:
        best = best_free(cores)
        return (best.name, NEW) if best is not None else (None, "no free slot")
    if at_home.free > 0:
        return at_home.name, HIT
    other = best_free([c for c in cores if c.name != at_home.name])
    if other is None:
        return None, "no free slot"
    wait, cost = expected_wait(at_home), prefill_cost(home.tokens, other)
    if wait is not None and cost is not None and wait > cost:
        return other.name, MOVE
    return None, f"waits for {at_home.name}, which holds its conversation"


def token_rate(stats: dict[str, Any]) -> float | None:
    """Tokens a second a llamacpp core evaluates, from its own figures
    (prompt and generated tokens over the time spent in llama_decode);
    None for a core that reports no such figures, or none yet."""
    try:
        tokens = float(stats.get("prefill_tokens", 0)) + float(stats.get("decode_tokens", 0))
        seconds = float(stats.get("decode_s", 0.0))
    except (TypeError, ValueError):
        return None
    if tokens <= 0 or seconds <= 0:
        return None
    return tokens / seconds
