"""Which waiting calls the engine admits: those whose conversations are on
disk are read ahead and passed over while their files load, a bounded
number of steps, and only while other calls decode."""

from __future__ import annotations

from aiosd.llm.admission import MAX_PASSED, Waiting, plan

NEAR = Waiting()                       # in the KV cache, in RAM, or new
UNREAD = Waiting(on_disk=True)
READ = Waiting(on_disk=True, read=True)


def test_calls_are_admitted_in_order_up_to_the_free_slots() -> None:
    assert plan([NEAR, NEAR, NEAR], free=2, decoding=True).admit == [0, 1]
    assert plan([NEAR, READ], free=5, decoding=True).admit == [0, 1]
    assert plan([NEAR], free=0, decoding=True).admit == []


def test_a_call_whose_file_is_being_read_is_passed_over_while_others_decode() -> None:
    p = plan([UNREAD, NEAR, NEAR], free=2, decoding=True)
    assert p.admit == [1, 2] and p.passed == [0] and p.read_ahead == [0]
    # its file read, it goes first again
    assert plan([READ, NEAR, NEAR], free=2, decoding=True).admit == [0, 1]


def test_files_are_read_ahead_for_calls_that_cannot_be_admitted_yet() -> None:
    p = plan([NEAR, UNREAD, UNREAD], free=0, decoding=True)
    assert p.admit == [] and p.read_ahead == [1, 2]
    # with no room for them they are not passed over: their bound is not spent
    assert p.passed == []
    p = plan([NEAR, UNREAD, UNREAD], free=1, decoding=True)
    assert p.admit == [0] and p.passed == [] and p.read_ahead == [1, 2]


def test_with_nothing_decoding_the_read_is_waited_for() -> None:
    """Nothing would overlap the read: passing the call over only delays it."""
    p = plan([UNREAD, NEAR], free=1, decoding=False)
    assert p.admit == [0] and p.passed == [] and p.read_ahead == [0]


def test_a_call_is_passed_over_a_bounded_number_of_steps() -> None:
    late = Waiting(on_disk=True, passed=MAX_PASSED)
    p = plan([late, NEAR], free=1, decoding=True)
    assert p.admit == [0] and p.read_ahead == [0]
    almost = Waiting(on_disk=True, passed=MAX_PASSED - 1)
    assert plan([almost, NEAR], free=1, decoding=True).admit == [1]
