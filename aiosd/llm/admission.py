"""Which waiting calls the engine admits at a step: a pure decision over
where each call's conversation is, with no llama.cpp call.

A call whose conversation was spilled to disk would stall the step that
admits it while its file is read and checked. So its file is read ahead on
the disk tier's thread, and the call is passed over (the calls behind it go
first) until the file is in memory; its restore is then a copy from RAM.
It is passed over only while other calls decode (a read that overlaps
nothing may as well be waited for) and for at most ``MAX_PASSED`` steps,
so a slow disk delays it by a bounded amount and never starves it. Calls
are otherwise admitted in the order they came.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: steps a call may be passed over while its conversation is read from disk
MAX_PASSED = 8
#: calls beyond those that can be admitted now whose files are read ahead
#: (each file read is held in memory until its call is admitted)
READ_AHEAD = 4


@dataclass(frozen=True)
class Waiting:
    """A waiting call as admission sees it: whether its conversation is on
    disk (and nowhere nearer), whether that file has been read yet, and
    the steps it has been passed over."""

    on_disk: bool = False
    read: bool = False
    passed: int = 0


@dataclass(frozen=True)
class Plan:
    """The calls (their places in the queue) to admit, in order; those
    passed over while their files are read (each a step nearer its bound);
    and those whose files to start reading."""

    admit: list[int]
    passed: list[int]
    read_ahead: list[int]


def plan(waiting: Sequence[Waiting], free: int, decoding: bool) -> Plan:
    """Admit up to ``free`` of ``waiting`` (in queue order), passing over
    those whose files are still being read while calls are ``decoding``;
    read ahead the files of all those not read yet. A call counts as passed
    over only when there was room for it."""
    admit: list[int] = []
    passed: list[int] = []
    read_ahead: list[int] = []
    for i, w in enumerate(waiting):
        unread = w.on_disk and not w.read
        if unread:
            read_ahead.append(i)
        if len(admit) == free:
            continue
        if unread and decoding and w.passed < MAX_PASSED:
            passed.append(i)
            continue
        admit.append(i)
    return Plan(admit, passed, read_ahead)
