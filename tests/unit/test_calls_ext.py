"""Issue 12 in the clients' sans-I/O core (zkv/calls.py): the extended operations' arguments,
records and outcomes (canned replies, no sockets), lock waits in the resend rules and the lock
refresher's decisions, on a fake clock."""

from __future__ import annotations

import itertools
import math

import pytest

from zkv import calls as c
from zkv.calls import Calls, Item, Lock, Refresher, outcome
from zkv.errors import (
    Conflict,
    InvalidArgument,
    LockLost,
    PreconditionFailed,
    RequestError,
    Timeout,
    ZkvError,
)
from zkv.protocol import (
    MAX_LOCK_WAIT_MS,
    BatchReply,
    Kind,
    Reply,
    Status,
    decode_batch,
    encode_batch_reply,
    encode_old_item,
    incr_body,
    pack_request,
    stamp_of,
    token_body,
    versioned_body,
)

pytestmark = pytest.mark.unit

OK, NOT_FOUND = int(Status.OK), int(Status.NOT_FOUND)
CONFLICT, PRECONDITION = int(Status.CONFLICT), int(Status.PRECONDITION)
GET, SET, DEL = int(Kind.GET), int(Kind.SET), int(Kind.DEL)
WALL_S = 1_700_000_000.25
V = 1_765_000_000_000_000  # a version as a worker makes them (now_ms * 1000)


def make(now: float = 100.0, **options: object) -> Calls:
    ids = itertools.count(1)
    options.setdefault("wall", lambda: WALL_S)
    return Calls(
        "tcp://broker:1",
        5.0,
        1.0,
        lambda n: [next(ids) for _ in range(n)],
        now,
        **options,  # type: ignore[arg-type]
    )


def sent_requests(calls: Calls, now: float) -> list:
    """Send what is queued; the requests as the broker decodes them."""
    batch = calls.next_batch(1000)
    assert batch is not None
    calls.sent(batch, now)
    return list(decode_batch(batch.frames).requests)


# --- outcomes of canned replies --------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "deadline_ms", "body", "expected"),
    [
        (c.C_GET, 5, versioned_body(V, b"val"), Item(b"val", 5, V)),
        (c.C_GET, None, versioned_body(7, b""), Item(b"", None, 7)),
        (c.C_META, 9, versioned_body(V), Item(b"", 9, V)),
        (c.C_SET, 1234, None, 1234),
        (c.C_PUT, 1234, versioned_body(V), (V, 1234)),
        (c.C_PUT, None, versioned_body(V), (V, None)),
        (c.C_SET_OLD, 8, encode_old_item(V, None), None),
        (c.C_SET_OLD, 8, encode_old_item(V, (V - 1, 99, b"old")), Item(b"old", 99, V - 1)),
        (c.C_SET_OLD, 8, encode_old_item(V, (V - 1, None, b"")), Item(b"", None, V - 1)),
        (c.C_DEL, None, None, True),
        (c.C_DEL, None, versioned_body(V), True),
        (c.C_INCR, None, incr_body(V, -42), -42),
        (c.C_INCR, None, incr_body(V, 2**63 - 1), 2**63 - 1),
        (c.C_INCR_ITEM, 77, incr_body(V, 3), (3, V, 77)),
        (c.C_EXPIRE, 4321, None, 4321),
        (c.C_PERSIST, None, versioned_body(V), V),
        (c.C_LOCK, 5000, token_body(V), (V, 5000)),
        (c.C_REFRESH, 6000, token_body(V), 6000),
        (c.C_UNLOCK, None, None, None),
        (c.C_FENCE_CHECK, None, None, True),
    ],
)
def test_ok_replies_read_as_each_code_promises(code, deadline_ms, body, expected):
    assert outcome(code, OK, deadline_ms, body) == expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (c.C_GET, None),
        (c.C_META, None),
        (c.C_DEL, False),
        (c.C_EXPIRE, None),
        (c.C_PERSIST, None),
        (c.C_FENCE_CHECK, False),
    ],
)
def test_not_found_is_an_answer_for_reads_deletes_and_ttl_changes(code, expected):
    assert outcome(code, NOT_FOUND, None, None) == expected


@pytest.mark.parametrize("code", [c.C_REFRESH, c.C_UNLOCK])
def test_not_found_for_a_lock_token_is_a_conflict(code):
    assert isinstance(outcome(code, NOT_FOUND, None, None), Conflict)


@pytest.mark.parametrize("code", [c.C_SET, c.C_PUT, c.C_INCR, c.C_LOCK])
def test_an_unexpected_not_found_is_an_error_not_a_result(code):
    assert isinstance(outcome(code, NOT_FOUND, None, None), ZkvError)


@pytest.mark.parametrize("code", [SET, DEL, c.C_SET, c.C_PUT, c.C_SET_OLD, c.C_DEL])
def test_precondition_is_precondition_failed_with_the_workers_reason(code):
    err = outcome(code, PRECONDITION, None, b"version is 7, not 5")
    assert isinstance(err, PreconditionFailed) and str(err) == "version is 7, not 5"
    assert not isinstance(err, Conflict)


@pytest.mark.parametrize("code", [c.C_SET, c.C_DEL, c.C_INCR, c.C_LOCK, c.C_REFRESH, c.C_UNLOCK])
def test_conflict_carries_the_reason_and_the_holders_expiry(code):
    err = outcome(code, CONFLICT, 1_800_000_000_000, b"lock is held")
    assert isinstance(err, Conflict) and str(err) == "lock is held"
    assert err.deadline_ms == 1_800_000_000_000


def test_a_fence_check_answered_conflict_is_false_not_an_error():
    assert outcome(c.C_FENCE_CHECK, CONFLICT, None, b"fence token 3 is older than 4") is False


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (c.C_GET, None),
        (c.C_GET, b"short"),
        (c.C_META, b""),
        (c.C_PUT, b"1234567"),
        (c.C_SET_OLD, b"\x00" * 8 + b"\x02"),  # had is neither 0 nor 1
        (c.C_SET_OLD, b"\x00" * 8 + b"\x01" + b"\x00" * 3),  # an item cut short
        (c.C_INCR, b"\x00" * 15),
        (c.C_PERSIST, None),
        (c.C_LOCK, b"\x00" * 8),  # token 0 is never issued
        (c.C_LOCK, b"\x00" * 9),
    ],
)
def test_a_malformed_body_is_an_error_returned_never_raised(code, body):
    err = outcome(code, OK, 5, body)
    assert isinstance(err, ZkvError) and "malformed reply" in str(err), err


def test_a_lock_or_refresh_reply_without_an_expiry_is_malformed():
    assert isinstance(outcome(c.C_LOCK, OK, None, token_body(3)), ZkvError)
    assert isinstance(outcome(c.C_REFRESH, OK, None, token_body(3)), ZkvError)


def test_an_unknown_code_is_an_error():
    assert isinstance(outcome(0x1FF, OK, None, None), ZkvError)


# --- arguments -------------------------------------------------------------------------------


def test_a_set_without_options_stays_the_plain_op_of_the_hot_path():
    assert c.set_op("k", "v") == (SET, b"k", b"v", None)
    assert c.set_op(b"k", b"v", 1.5) == (SET, b"k", b"v", 1500)
    assert c.delete_op("k") == (DEL, b"k", None, None)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: c.set_op("k", "v", nx=True, xx=True), InvalidArgument, "nx and xx"),
        (lambda: c.set_op("k", "v", nx=True, if_version=3), InvalidArgument, "nx and if_version"),
        (lambda: c.set_op("k", "v", if_version=-1), InvalidArgument, "if_version"),
        (lambda: c.set_op("k", "v", if_version=2**64), InvalidArgument, "if_version"),
        (lambda: c.set_op("k", "v", if_version="3"), TypeError, "if_version must be an int"),
        (lambda: c.set_op("k", "v", if_version=True), TypeError, "if_version"),
        (lambda: c.set_op("k", "v", ttl_s=0), InvalidArgument, "ttl_s must be a positive"),
        (lambda: c.set_op("k", "v", fence="lock:3"), TypeError, "fence must be a Lock"),
        (lambda: c.set_op("k", "v", fence=("lock", 0)), InvalidArgument, "fence token"),
        (lambda: c.set_op("k", "v", fence=("", 3)), InvalidArgument, "name must be 1 to"),
        (lambda: c.incr_op("k", 2**63), InvalidArgument, "by must be within signed 64 bits"),
        (lambda: c.incr_op("k", -(2**63) - 1), InvalidArgument, "by must be within"),
        (lambda: c.incr_op("k", 1.5), TypeError, "by must be an int, not float"),
        (lambda: c.incr_op("k", True), TypeError, "by must be an int, not bool"),
        (lambda: c.incr_op("k", ttl_s=-1), InvalidArgument, "ttl_s"),
        (lambda: c.expire_op("k", 0), InvalidArgument, "ttl_s must be a positive"),
        (lambda: c.expire_op("k", None), InvalidArgument, "persist"),
        (lambda: c.expire_op("k", math.nan), InvalidArgument, "ttl_s"),
        (lambda: c.get_op("k", touch_s=0), InvalidArgument, "touch_s must be a positive"),
        (lambda: c.lock_op("job", None), InvalidArgument, "ttl_s is required"),
        (lambda: c.lock_op("job", 10, wait_s=-1), InvalidArgument, "wait_s must be between"),
        (
            lambda: c.lock_op("job", 10, wait_s=MAX_LOCK_WAIT_MS / 1000 + 1),
            InvalidArgument,
            "wait_s",
        ),
        (lambda: c.lock_op("job", 10, wait_s="1"), TypeError, "wait_s must be a number"),
        (lambda: c.lock_op("\x00job", 10), InvalidArgument, "NUL"),
        (lambda: c.refresh_op("job", 0, 10), InvalidArgument, "token must be between 1"),
        (lambda: c.unlock_op("job", 2**64), InvalidArgument, "token"),
        (lambda: c.fence_check_op("job", 1.0), TypeError, "token must be an int"),
    ],
)
def test_wrong_arguments_are_refused_naming_the_argument(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_an_invalid_argument_is_both_a_request_error_and_a_value_error():
    with pytest.raises(ValueError):
        c.set_op("k", "v", nx=True, xx=True)
    with pytest.raises(RequestError):
        c.ttl_to_ms(-1)


def test_fence_takes_a_lock_or_a_pair():
    assert c.fence_of(Lock(b"job", 7, 0)) == (b"job", 7)
    assert c.fence_of(("job", 7)) == (b"job", 7)
    assert c.fence_of(None) is None


# --- records ---------------------------------------------------------------------------------


def test_extended_records_carry_every_option_and_writes_carry_the_stamp():
    calls = make()
    lock = Lock(b"job", 41, 0)
    ops = [
        c.get_op("g"),
        c.get_op("t", touch_s=2),
        c.meta_op("m"),
        c.set_op("s", "v", 3, xx=True, if_version=V, fence=lock),
        c.set_op("n", "v", nx=True, get=True),
        c.set_op("p", "v", versioned=True),
        c.delete_op("d", if_version=5),
        c.incr_op("i", -3, 60, fence=("job", 41)),
        c.expire_op("e", 1.5),
        c.persist_op("e"),
        c.lock_op("job", 10, 2.5),
        c.refresh_op("job", 41, 10),
        c.unlock_op("job", 41),
        c.fence_check_op("job", 41),
    ]
    for op in ops:
        calls.add(op, op[1], 100.0)
    got = sent_requests(calls, 100.0)
    stamp = stamp_of(WALL_S)
    by_kind = [(r.kind, r.key) for r in got]
    assert by_kind == [
        (Kind.GET, b"g"),
        (Kind.GET, b"t"),
        (Kind.GET, b"m"),
        (Kind.SET, b"s"),
        (Kind.SET, b"n"),
        (Kind.SET, b"p"),
        (Kind.DEL, b"d"),
        (Kind.INCR, b"i"),
        (Kind.EXPIRE, b"e"),
        (Kind.EXPIRE, b"e"),
        (Kind.LOCK, b"job"),
        (Kind.REFRESH, b"job"),
        (Kind.UNLOCK, b"job"),
        (Kind.FENCE_CHECK, b"job"),
    ]
    get, touch, meta, cond, old, put, delete, incr, expire, persist, lk, refresh, unlock, fc = got
    assert get.versioned and get.ttl_ms is None and get.stamp is None
    assert touch.versioned and touch.ttl_ms == 2000 and touch.stamp == stamp
    assert meta.versioned and meta.keys_only and meta.stamp is None
    assert (cond.xx, cond.if_version, cond.fence, cond.ttl_ms) == (True, V, (b"job", 41), 3000)
    assert cond.value == b"v" and cond.stamp == stamp
    assert old.nx and old.return_old and old.stamp == stamp
    assert put.versioned and not put.return_old
    assert delete.if_version == 5 and delete.stamp == stamp
    assert (incr.by, incr.ttl_ms, incr.fence, incr.stamp) == (-3, 60_000, (b"job", 41), stamp)
    assert (expire.ttl_ms, expire.versioned) == (1500, False)
    assert (persist.ttl_ms, persist.versioned) == (None, True)
    assert (lk.ttl_ms, lk.wait_ms, lk.stamp) == (10_000, 2500, stamp)
    assert (refresh.token, refresh.ttl_ms, unlock.token, fc.token) == (41, 10_000, 41, 41)
    assert unlock.stamp == stamp and fc.stamp is None


def test_plain_ops_still_pack_exactly_as_pack_request_does():
    calls = make()
    calls.add_many([(SET, b"k", b"v", 5), (GET, b"k", None, None)], 0, 2, 100.0)
    batch = calls.next_batch(10)
    assert batch is not None
    stamp = stamp_of(WALL_S)
    assert batch.frames[1] == pack_request(SET, 1, b"k", b"v", 5, stamp) + pack_request(
        GET, 2, b"k"
    )


@pytest.mark.parametrize("plain", [True, False])
def test_add_many_takes_extended_ops_through_either_loop(plain):
    calls = make()
    ops = [(SET, b"a", b"1", None), c.incr_op("n", 2), (GET, b"a", None, None)]
    assert calls.add_many(ops, 0, 3, 100.0, plain) == []
    kinds = [r.kind for r in sent_requests(calls, 100.0)]
    assert sorted(kinds) == sorted([Kind.SET, Kind.INCR, Kind.GET])
    assert len(calls) == 3


def test_add_many_refuses_a_bad_extended_op_in_its_place():
    calls = make()
    bad = (c.C_INCR, b"\x00reserved", (int(Kind.INCR), None, {"by": 1}), None)
    refused = calls.add_many([c.incr_op("n"), bad], 0, 2, 100.0, False)
    assert [(position, type(err)) for position, err in refused] == [(1, RequestError)]
    assert "reserved" in str(refused[0][1])


def test_receive_settles_extended_calls_by_their_code():
    calls = make()
    calls.add(c.get_op("g"), "get", 100.0)
    calls.add(c.incr_op("n", 5), "incr", 100.0)
    calls.add(c.set_op("s", "v", nx=True), "nx", 100.0)
    calls.add(c.fence_check_op("job", 4), "fence", 100.0)
    sent_requests(calls, 100.0)
    frames = encode_batch_reply(
        BatchReply(
            0,
            (
                Reply(Status.OK, 1, 0, 77, versioned_body(V, b"x")),
                Reply(Status.OK, 2, 0, None, incr_body(V, 6)),
                Reply(Status.PRECONDITION, 3, 0, None, b"key exists"),
                Reply(Status.CONFLICT, 4, 0, None, b"fence token 4 is older than 5"),
            ),
        )
    )
    settled = dict(calls.receive(frames, 100.1))
    assert settled["get"] == Item(b"x", 77, V)
    assert settled["incr"] == 6
    assert isinstance(settled["nx"], PreconditionFailed)
    assert settled["fence"] is False
    assert len(calls) == 0


# --- lock waits --------------------------------------------------------------------------------


def test_a_waiting_lock_is_resent_every_attempt_interval_but_not_timed_out_before_its_wait():
    """The broker holds a waiting LOCK, but a broker restarted since lost its queue: a LOCK
    resent only after its whole wait got a Timeout although the lock was long free (hostile
    test: holder ttl 4 s, wait 20 s, broker restart at 1 s: Timeout at 21 s). It is resent
    after each attempt_s of silence, to the same broker, and times out only after its wait."""
    wall = [WALL_S]
    ids = itertools.count(1)
    brokers = c.Brokers(("tcp://a:1", "tcp://b:1"), 1.0, 5.0, first=0, jitter=lambda: 0.0)
    calls = Calls(brokers, 5.0, 1.0, lambda n: [next(ids) for _ in range(n)], 100.0)
    calls._wall = lambda: wall[0]
    calls.add(c.lock_op("job", 10, wait_s=30), "lock", 100.0)
    [first] = sent_requests(calls, 100.0)
    assert not calls.resend_due(100.5)
    assert calls.due_in(100.5) is not None and calls.due_in(100.5) <= 0.5  # wakes for it
    resent = []
    for second in range(1, 29):  # the wait ends at 130: none within an attempt of that
        now = 100.0 + second + 0.01
        wall[0] = WALL_S + second + 0.01
        assert calls.resend_due(now)
        calls.resend(now)
        assert calls.brokers.endpoint == "tcp://a:1"  # a wait is no failure of the broker
        [again] = sent_requests(calls, now)
        resent.append(again)
        assert calls.expire(now) == []  # timeout_s (5 s) passed: the wait has not
    assert {r.request_id for r in resent} == {first.request_id}
    # Stamped anew each time: past the workers' idempotency window (15 s) a stamped LOCK
    # they do not remember is refused 'outcome unknown'.
    assert resent[-1].stamp == stamp_of(WALL_S + 28.01) != first.stamp
    assert not calls.resend_due(129.5) and not calls.resend_due(130.9)  # the answer's time
    assert calls.resend_due(131.05)  # then silence means loss again
    failed = calls.expire(135.1)  # timeout_s after the wait
    assert [(handle, type(err)) for handle, err in failed] == [("lock", Timeout)]


def test_expire_and_persist_carry_a_fence_checked_first():
    lock = Lock(b"job", 7, 1)
    calls = make()
    for op in (c.expire_op("k", 5, fence=lock), c.persist_op("k", fence=(b"job", 7))):
        assert c.fence_of_op(op) == (b"job", 7)  # what the clients pre-check
        calls.add(op, None, 100.0)
    expire, persist = sent_requests(calls, 100.0)
    assert (expire.kind, expire.ttl_ms, expire.fence) == (Kind.EXPIRE, 5000, (b"job", 7))
    assert (persist.kind, persist.ttl_ms, persist.fence) == (Kind.EXPIRE, None, (b"job", 7))
    assert c.fence_of_op(c.expire_op("k", 5)) is None
    assert c.fence_of_op(c.persist_op("k")) is None


def test_a_waiting_lock_is_not_resent_as_its_wait_ends():
    """The broker answers when the wait runs out: a resend then would race that answer (lost
    on the old socket) and restart the wait at the broker (a 1 s wait taking 3 s or more)."""
    calls = make()
    calls.add(c.lock_op("job", 10, wait_s=1), "lock", 100.0)
    sent_requests(calls, 100.0)
    assert not calls.resend_due(101.001)  # the wait just ran out: its answer is on its way
    assert not calls.resend_due(101.9)  # one attempt (1 s) is allowed for it, as for any call
    assert calls.due_in(101.001) == pytest.approx(0.999)
    assert calls.resend_due(102.05)  # then silence means loss again
    assert calls.expire(105.9) == []  # the deadline is timeout_s + the wait
    [(handle, err)] = calls.expire(106.1)
    assert handle == "lock" and "within 6 s" in str(err)  # the time it was allowed


def test_a_call_made_after_a_waiting_lock_still_expires_on_time():
    calls = make()
    calls.add(c.lock_op("job", 10, wait_s=30), "lock", 100.0)
    calls.add(c.get_op("k"), "get", 100.0)
    sent_requests(calls, 100.0)
    assert calls.resend_due(101.5)
    assert [handle for handle, _ in calls.expire(105.1)] == ["get"]
    assert len(calls) == 1 and calls.expire(134.9) == []


def test_a_lock_without_wait_is_an_ordinary_call():
    calls = make()
    calls.add(c.lock_op("job", 10), "lock", 100.0)
    sent_requests(calls, 100.0)
    assert calls.resend_due(101.5)
    assert [handle for handle, _ in calls.expire(105.1)] == ["lock"]


# --- the lock refresher ----------------------------------------------------------------------


def test_the_refresher_runs_every_third_of_the_ttl():
    lock = Lock(b"job", 9, 1_000_000)
    refresher = Refresher(lock, 9.0, 50.0)
    assert refresher.due_in(50.0) == pytest.approx(3.0)
    refresher.refreshed(1_009_000, 53.0)
    assert lock.expires_at_ms == 1_009_000 and refresher.due_in(53.0) == pytest.approx(3.0)
    assert not lock.lost
    lock.check()


def test_a_refused_refresh_loses_the_lock_at_once():
    lock = Lock(b"job", 9, 1_000_000)
    refresher = Refresher(lock, 9.0, 50.0)
    assert not refresher.failed(Conflict("token 9 is not current"), 53.0, 900_000)
    assert lock.lost and isinstance(lock.error, LockLost)
    assert "token 9" in str(lock.error)
    with pytest.raises(LockLost):
        lock.check()


def test_a_failed_refresh_is_retried_soon_until_the_hold_expires():
    lock = Lock(b"job", 9, 1_000_000)
    refresher = Refresher(lock, 9.0, 50.0)
    assert refresher.failed(Timeout("no reply"), 53.0, 999_000)
    assert not lock.lost
    assert refresher.due_in(53.0) == pytest.approx(c.REFRESH_RETRY_S)
    assert not refresher.failed(Timeout("no reply"), 56.0, 1_000_000)
    assert isinstance(lock.error, LockLost) and "not refreshed before it expired" in str(lock.error)
