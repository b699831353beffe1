"""The broker's lock waits as state (broker/locks.py), driven with a fake clock: FIFO order,
the wake-ups (release, the holder's expiry, the recheck), giving up, and the bounds."""

from __future__ import annotations

import pytest

from broker.locks import (
    HEAP_FLOOR,
    LOCK_RECHECK_S,
    LOCK_RETRY_MIN_S,
    LockWaits,
)

pytestmark = pytest.mark.unit

NAME = b"lock:a"


def test_waiters_are_released_oldest_first_and_a_refused_one_keeps_its_place() -> None:
    waits: LockWaits[str] = LockWaits()
    for item in ("a", "b", "c"):
        assert waits.park(item, NAME, give_up=10.0, now=0.0, conflict=b"c-" + item.encode())
    assert waits.waiting(NAME) and waits.count == 3
    first = waits.released(NAME, now=0.1)
    assert first is not None and first.item == "a" and waits.count == 2
    # dispatched again and refused again (someone else took the lock): back to the front
    assert waits.park("a", NAME, 10.0, 0.2, conflict=b"again", front=True)
    assert [w.item for w in (waits.released(NAME, 0.3), waits.released(NAME, 0.4))] == ["a", "b"]
    last = waits.released(NAME, 0.5)
    assert last is not None and last.item == "c"
    assert waits.released(NAME, 0.6) is None
    assert not waits.waiting(NAME) and waits.count == 0


def test_the_oldest_waiter_goes_again_when_the_holder_expires_or_at_the_recheck() -> None:
    waits: LockWaits[str] = LockWaits()
    waits.park("a", NAME, 30.0, 0.0, conflict=b"c", holder_expiry=0.5, deadline_ms=1500)
    waits.park("b", NAME, 30.0, 0.0, conflict=b"c", holder_expiry=0.5, deadline_ms=1500)
    assert waits.next_due() == 0.5
    assert waits.due(0.49) == ([], [])
    woken, expired = waits.due(0.5)
    assert [w.item for w in woken] == ["a"] and not expired
    # the next dispatch of the name is at most LOCK_RECHECK_S away, even with no reply
    assert waits.next_due() == pytest.approx(0.5 + LOCK_RECHECK_S)
    # the winner's OK says its lease ends at 0.8: b goes then
    waits.held(NAME, 0.6, holder_expiry=0.8)
    assert [w.item for w in waits.due(0.8)[0]] == ["b"]
    assert waits.count == 0 and waits.next_due() is not None  # stale entries only
    assert waits.due(10.0) == ([], [])


def test_an_expiry_in_the_past_is_retried_no_sooner_than_the_minimum() -> None:
    """Clocks that disagree (the worker says held until a deadline the broker has passed)
    must not make a busy loop of dispatches."""
    waits: LockWaits[str] = LockWaits()
    waits.park("a", NAME, 30.0, 5.0, conflict=b"c", holder_expiry=4.0)
    assert waits.next_due() == pytest.approx(5.0 + LOCK_RETRY_MIN_S)


def test_a_wait_that_runs_out_is_answered_and_leaves_no_state() -> None:
    waits: LockWaits[str] = LockWaits()
    waits.park("a", NAME, 0.5, 0.0, conflict=b"held", deadline_ms=99, reason=b"held by x")
    waits.park("b", NAME, 0.8, 0.0)  # parked on arrival: no CONFLICT of its own
    assert waits.last_conflict(NAME) == (99, b"held by x")
    woken, expired = waits.due(0.5)
    assert [(w.item, w.conflict) for w in expired] == [("a", b"held")] and woken == []
    assert waits.count == 1 and waits.waiting(NAME)
    woken, expired = waits.due(0.8)
    assert [w.item for w in expired] == ["b"] and woken == []
    assert waits.count == 0 and not waits.waiting(NAME)
    assert waits.released(NAME, 3.0) is None


def test_the_number_of_waiters_is_bounded() -> None:
    waits: LockWaits[int] = LockWaits(limit=2)
    assert waits.park(1, b"x", 5.0, 0.0) and waits.park(2, b"y", 5.0, 0.0)
    assert not waits.park(3, b"z", 5.0, 0.0)
    assert waits.count == 2 and not waits.waiting(b"z")
    assert [w.item for w in waits.drain()] == [1, 2]
    assert waits.count == 0 and waits.next_due() is None


def test_the_timer_heaps_stay_within_a_few_times_the_waiters() -> None:
    """Each park, wake and refusal pushes a heap entry; stale ones are dropped in bulk, so
    a long wait with many rounds does not grow them without bound."""
    waits: LockWaits[str] = LockWaits()
    now = 0.0
    waits.park("w", NAME, 1e9, now, conflict=b"c")
    for _ in range(20 * HEAP_FLOOR):
        now += 0.01
        waiter = waits.released(NAME, now)
        assert waiter is not None
        waits.park("w", NAME, 1e9, now, conflict=b"c", holder_expiry=now + 5, front=True)
    assert len(waits._give_ups) <= HEAP_FLOOR + 4 * waits.count + 1
    assert len(waits._retries) <= HEAP_FLOOR + 4 * waits.count + 1


def test_waiters_that_gave_up_behind_a_patient_one_are_not_kept_until_it_leaves() -> None:
    """Answered waiters stayed in their name's FIFO, with their requests, until they reached
    its front: behind waiters with long waits, any number of them. Now at most about
    twice the parked ones (plus FIFO_SLACK)."""
    from broker.locks import FIFO_SLACK

    waits: LockWaits[bytes] = LockWaits()
    for patient in (b"patient-1", b"patient-2"):
        assert waits.park(patient, NAME, give_up=300.0, now=0.0, conflict=b"c")
    for second in range(1, 201):
        assert waits.park(b"x" * 1000, NAME, give_up=second + 0.5, now=float(second))
        woken, expired = waits.due(second + 0.6)  # the newcomer gives up
        assert [w.item for w in expired] == [b"x" * 1000]
        for waiter in woken:  # the patient one's recheck, refused again: keeps its place
            assert waits.park(waiter.item, NAME, 300.0, second + 0.6, conflict=b"c", front=True)
    assert waits.count == 2
    assert len(waits._names[NAME].waiters) <= 2 * 2 + FIFO_SLACK + 1


def test_each_client_has_its_own_bound_on_parked_waiters() -> None:
    waits: LockWaits[str] = LockWaits(limit=10, client_limit=2)
    assert waits.park("a1", NAME, 10.0, 0.0, client=b"a")
    assert waits.park("a2", NAME, 10.0, 0.0, client=b"a")
    assert not waits.park("a3", NAME, 10.0, 0.0, client=b"a")
    assert waits.park("b1", NAME, 10.0, 0.0, client=b"b")
    assert waits.by_client == {b"a": 2, b"b": 1}
    first = waits.released(NAME, 0.1)
    assert first is not None and first.item == "a1" and waits.by_client == {b"a": 1, b"b": 1}
    assert waits.park("a3", NAME, 10.0, 0.2, client=b"a")
    _, expired = waits.due(10.0)
    assert len(expired) == 3 and waits.by_client == {} and waits.count == 0
