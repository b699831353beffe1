"""BUSY answers in the clients' core (zkv/calls.py): backoff, resend with the same request id,
and the error at the deadline, on a fake clock (every ``now`` is passed in; nothing sleeps).

BUSY means "shed to protect the cluster, not applied": the call is sent again after a backoff
until its deadline; then it fails with Busy (not applied), unless an earlier attempt got no
answer at all, which may have been applied: then Timeout (outcome unknown).
"""

from __future__ import annotations

import itertools

import pytest

from zkv.calls import (
    BUSY_BACKOFF_MAX_S,
    BUSY_BACKOFF_MIN_S,
    Batch,
    Calls,
    busy_backoff_s,
)
from zkv.errors import Busy, Timeout, Unavailable
from zkv.protocol import BatchReply, Kind, Reply, Status, encode_batch_reply, split_batch

pytestmark = pytest.mark.unit

GET, SET = int(Kind.GET), int(Kind.SET)
ENDPOINT = "tcp://broker:1"
TIMEOUT_S = 5.0
ATTEMPT_S = 1.0


def make(now: float = 0.0, jitter: float = 1.0, **options: object) -> Calls:
    """Calls with ids 1, 2, ... and a fixed jitter (1.0: each backoff is its full ceiling)."""
    ids = itertools.count(1)

    def new_ids(count: int) -> list[int]:
        return [next(ids) for _ in range(count)]

    return Calls(
        ENDPOINT,
        TIMEOUT_S,
        ATTEMPT_S,
        new_ids,
        now,
        jitter=lambda: jitter,
        **options,  # type: ignore[arg-type]
    )


def answer(*replies: Reply) -> list[bytes]:
    return encode_batch_reply(BatchReply(0, tuple(replies)))


def busy(request_id: int) -> list[bytes]:
    return answer(Reply(Status.BUSY, request_id, 0, body=b"broker over its byte bound"))


def send(calls: Calls, now: float) -> Batch:
    batch = calls.next_batch(1000)
    assert batch is not None
    calls.sent(batch, now)
    return batch


def sent_ids(batch: Batch) -> list[int]:
    return [sub[1] for sub in split_batch(batch.frames)[1]]


def test_backoff_doubles_from_10_ms_to_a_500_ms_ceiling_with_jitter_of_half_of_it():
    ceilings = [busy_backoff_s(n, 1.0) for n in range(1, 10)]
    assert ceilings == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5, 0.5])
    assert BUSY_BACKOFF_MIN_S == 0.010 and BUSY_BACKOFF_MAX_S == 0.500
    assert busy_backoff_s(1, 0.0) == pytest.approx(0.005)  # jitter: between half and all
    assert busy_backoff_s(1000, 0.5) == pytest.approx(0.375)  # no overflow after many


def test_a_busy_call_waits_its_backoff_then_is_resent_with_the_same_id_and_settles():
    calls = make()
    calls.add((SET, b"k", b"v", None), "handle", 0.0)
    first = send(calls, 0.0)
    assert calls.receive(busy(1), 0.1) == []  # not a failure yet
    assert (len(calls), calls.parked, calls.in_flight, calls.queued) == (1, 1, 0, 0)
    assert calls.next_resend_at() == pytest.approx(0.1 + BUSY_BACKOFF_MIN_S)
    assert calls.due_in(0.1) == pytest.approx(BUSY_BACKOFF_MIN_S)  # the clients' timers
    assert calls.unpark(0.105) == [] and calls.queued == 0  # too early
    assert calls.unpark(0.11) == [] and calls.queued == 1
    again = send(calls, 0.11)
    assert sent_ids(again) == sent_ids(first) == [1]  # same request id, same record
    assert again.frames[1] == first.frames[1]
    assert calls.receive(answer(Reply(Status.OK, 1, 0, 1234)), 0.2) == [("handle", 1234)]
    assert len(calls) == 0 and calls.due_in(0.2) is None


def test_busy_until_the_deadline_fails_with_busy_not_applied():
    calls = make()
    calls.add((SET, b"k", b"v", None), "handle", 0.0)
    now = 0.0
    send(calls, now)
    answers = 0
    while True:
        settled = calls.receive(busy(1), now)
        answers += 1
        if settled:
            break
        now = calls.next_resend_at()
        assert calls.unpark(now) == []
        send(calls, now)
    [(handle, error)] = settled
    assert handle == "handle" and type(error) is Busy and isinstance(error, Unavailable)
    assert "not applied" in str(error) and "broker over its byte bound" in str(error)
    # It gave up when the next resend would have come after the deadline, not before.
    assert TIMEOUT_S - BUSY_BACKOFF_MAX_S <= now <= TIMEOUT_S
    assert answers == 7 + int((now - 0.63) / 0.5)  # 10+20+...+320 ms, then 500 ms each
    assert len(calls) == 0


def test_busy_after_an_attempt_without_answer_fails_with_timeout_outcome_unknown():
    calls = make()
    calls.add((SET, b"k", b"v", None), "handle", 0.0)
    send(calls, 0.0)
    assert calls.resend_due(ATTEMPT_S)  # no answer: that attempt may have been applied
    calls.resend(ATTEMPT_S)
    now = ATTEMPT_S
    send(calls, now)
    while not (settled := calls.receive(busy(1), now)):
        now = calls.next_resend_at()
        calls.unpark(now)
        send(calls, now)
    [(_, error)] = settled
    assert type(error) is Timeout and "outcome unknown" in str(error)


def test_a_pipeline_call_gives_up_on_busy_timeout_s_after_it_was_added():
    calls = make(recent_batches=None, per_call_deadline=False)
    calls.add((GET, b"k", None, None), 0, 2.0)
    send(calls, 2.0)
    now = 2.0
    while not (settled := calls.receive(busy(1), now)):
        now = calls.next_resend_at()
        calls.unpark(now)
        send(calls, now)
    [(_, error)] = settled
    assert type(error) is Busy and 2.0 + TIMEOUT_S - BUSY_BACKOFF_MAX_S <= now <= 2.0 + TIMEOUT_S


def test_a_whole_batch_answered_busy_under_its_batch_id_is_parked_call_by_call():
    calls = make()
    for key in (b"a", b"b"):
        calls.add((GET, key, None, None), key, 0.0)
    batch = send(calls, 0.0)
    assert calls.receive(busy(batch.batch_id), 0.0) == []
    assert calls.parked == 2 and calls.in_flight == 0
    calls.unpark(1.0)
    assert sent_ids(send(calls, 1.0)) == [1, 2]


def test_a_late_answer_to_an_earlier_attempt_settles_a_parked_call():
    calls = make()
    calls.add((SET, b"k", b"v", None), "handle", 0.0)
    send(calls, 0.0)
    calls.resend(1.0)
    send(calls, 1.0)
    calls.receive(busy(1), 1.1)  # the second attempt was shed ...
    settled = calls.receive(answer(Reply(Status.OK, 1, 0, 99)), 1.105)  # ... the first applied
    assert settled == [("handle", 99)] and len(calls) == 0
    assert calls.unpark(2.0) == []  # nothing is resent


def test_a_call_resent_after_busy_still_expires_at_its_own_deadline():
    """A resent call goes back behind calls made after it: expire() must not wait for them."""
    calls = make()
    calls.add((GET, b"a", None, None), "a", 0.0)
    send(calls, 0.0)
    calls.add((GET, b"b", None, None), "b", 1.0)
    send(calls, 1.0)
    calls.receive(busy(1), 1.0)
    calls.unpark(1.01)
    send(calls, 1.01)
    calls.last_progress = 4.5  # a reply just came: no resend is due before 5.5
    assert calls.due_in(4.5) == pytest.approx(0.5)  # a's deadline, 5.0, not b's, 6.0
    [(handle, error)] = calls.expire(TIMEOUT_S)
    assert handle == "a" and type(error) is Timeout  # in flight again: outcome unknown
    assert [handle for handle, _ in calls.expire(TIMEOUT_S + 1.0)] == ["b"]


def test_a_parked_call_whose_deadline_passed_fails_at_the_next_unpark():
    calls = make()
    calls.add((GET, b"a", None, None), "a", 0.0)
    send(calls, 0.0)
    calls.receive(busy(1), 4.9)  # resend due at 4.91, before the deadline: parked
    assert calls.parked == 1
    [(handle, error)] = calls.unpark(6.0)  # a caller late by a second
    assert handle == "a" and type(error) is Busy


def test_failing_and_forgetting_include_parked_calls():
    calls = make()
    calls.add((GET, b"a", None, None), "a", 0.0)
    calls.add((GET, b"b", None, None), "b", 0.0)
    send(calls, 0.0)
    calls.receive(busy(1), 0.0)
    calls.receive(busy(2), 0.0)
    calls.forget(2)
    assert len(calls) == 1
    error = Unavailable("closed")
    assert calls.fail(None, error) == [("a", error)]
    assert len(calls) == 0 and calls.due_in(0.0) is None
