"""Issue 12 in the worker: versions, conditional writes, INCR, EXPIRE/persist, GET touch and
metadata, locks and fenced writes, each applied once under retries, logged, replayed, refused
when stamped too late or when the disk is full, and announced on the events hook.

Every request goes through the worker's own decoding (``wire``): a lone request as a DISPATCH
decoded by decode_from_broker, a batch's as an EXTENDED_OP of a BATCH_DISPATCH. The clock is a
FakeClock: nothing sleeps.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes import START_MS, FakeClock
from workers import aof
from workers.aof import FsyncPolicy, LogReader
from workers.persist import Durability
from workers.shard import (
    EVENT_DELETE,
    EVENT_EXPIRE,
    EVENT_INCR,
    EVENT_SET,
    EVENT_TTL,
    FENCE_MAX_AHEAD_MS,
    FENCE_MEMORY_MS,
    FENCE_PREFIX,
    LOCK_MEMORY_MS,
    LOCK_PREFIX,
    Shard,
    take_shard,
)
from workers.store import TTLStore
from zkv.hashing import key_shard
from zkv.protocol import (
    EXTENDED_OP,
    MAX_KEY_BYTES,
    MAX_RECORD_BYTES,
    MAX_VALUE_BYTES,
    Dispatch,
    Kind,
    Reply,
    Request,
    Status,
    check_report,
    decode_batch_reply,
    decode_entries,
    decode_from_broker,
    decode_old_item,
    dispatch_batch_frames,
    dispatch_frames,
    encode_request,
    pack_request,
    request_extra,
    split_incr_body,
    split_versioned,
    stamp_of,
)

pytestmark = pytest.mark.unit

V0 = START_MS * 1000  # the first version a shard at START_MS gives (the clock term)
_IDS = itertools.count(1000)


class Wire:
    """Sends requests to a shard the way the worker decodes them, with ever larger tokens."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.tokens = itertools.count(shard.last_token + 1)
        self.ids = _IDS  # shared: a shard taken again must not see old ids as retries

    def send(self, kind: Kind, key: bytes = b"", **fields: object) -> Reply:
        return self.deliver(Request(kind, next(self.ids), key, **fields))  # type: ignore[arg-type]

    def deliver(self, request: Request) -> Reply:
        token = next(self.tokens)
        message = decode_from_broker(dispatch_frames(token, encode_request(request)))
        assert isinstance(message, Dispatch)
        [answer] = self.shard.handle_batch([message])
        assert isinstance(answer, Reply) and answer.request_id == request.request_id
        return answer

    def batch(self, *requests: Request) -> list[Reply]:
        """Requests in one BATCH_DISPATCH; issue-12 ones arrive as EXTENDED_OPs."""
        token = next(self.tokens)
        records = [
            pack_request(r.kind, r.request_id, r.key, r.value, r.ttl_ms, r.stamp, request_extra(r))
            for r in requests
        ]
        message = decode_from_broker(dispatch_batch_frames(token, records))
        [answer] = self.shard.handle_batch([message])
        assert isinstance(answer, list)
        return list(decode_batch_reply(answer).replies)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def shard(clock: FakeClock) -> Shard:
    return Shard(0, TTLStore(clock))


@pytest.fixture
def wire(shard: Shard) -> Wire:
    return Wire(shard)


def version_of(wire: Wire, key: bytes) -> int:
    reply = wire.send(Kind.GET, key, versioned=True, keys_only=True)
    assert reply.status == Status.OK, reply
    return split_versioned(reply.body)[0]


# --- versions -----------------------------------------------------------------------------------


def test_every_write_gives_the_key_a_larger_version_clock_term_first(
    wire: Wire, clock: FakeClock
) -> None:
    assert wire.send(Kind.SET, b"k", value=b"a").status == Status.OK
    assert version_of(wire, b"k") == V0  # max(last + 1, now_ms * 1000)
    wire.send(Kind.SET, b"k", value=b"b")
    assert version_of(wire, b"k") == V0 + 1  # same millisecond: last + 1
    clock.advance(5)
    wire.send(Kind.SET, b"other", value=b"x")
    assert version_of(wire, b"other") == V0 + 5000
    reply = wire.send(Kind.GET, b"k", versioned=True)
    assert split_versioned(reply.body) == (V0 + 1, b"b")


def test_set_versioned_answers_the_new_version(wire: Wire) -> None:
    reply = wire.send(Kind.SET, b"k", value=b"v", versioned=True)
    assert reply.status == Status.OK and split_versioned(reply.body) == (V0, b"")


def test_get_keys_only_answers_the_deadline_and_no_value(wire: Wire) -> None:
    wire.send(Kind.SET, b"k", value=b"value", ttl_ms=5000)
    reply = wire.send(Kind.GET, b"k", keys_only=True)
    assert (reply.status, reply.deadline_ms, reply.body) == (Status.OK, START_MS + 5000, b"")
    assert wire.send(Kind.GET, b"absent", keys_only=True).status == Status.NOT_FOUND


# --- conditional writes -------------------------------------------------------------------------


def test_set_nx_writes_only_an_absent_or_expired_key(wire: Wire, clock: FakeClock) -> None:
    assert wire.send(Kind.SET, b"k", value=b"1", nx=True, ttl_ms=100).status == Status.OK
    refused = wire.send(Kind.SET, b"k", value=b"2", nx=True)
    assert (refused.status, refused.body) == (Status.PRECONDITION, b"key exists")
    assert wire.send(Kind.GET, b"k").body == b"1"
    clock.advance(100)  # expired: absent to a condition
    assert wire.send(Kind.SET, b"k", value=b"3", nx=True).status == Status.OK
    assert wire.send(Kind.GET, b"k").body == b"3"


def test_set_xx_writes_only_a_live_key(wire: Wire) -> None:
    refused = wire.send(Kind.SET, b"k", value=b"1", xx=True)
    assert (refused.status, refused.body) == (Status.PRECONDITION, b"key does not exist")
    assert wire.send(Kind.GET, b"k").status == Status.NOT_FOUND
    wire.send(Kind.SET, b"k", value=b"1")
    assert wire.send(Kind.SET, b"k", value=b"2", xx=True).status == Status.OK


def test_set_and_del_if_version(wire: Wire) -> None:
    wire.send(Kind.SET, b"k", value=b"1")
    version = version_of(wire, b"k")
    refused = wire.send(Kind.SET, b"k", value=b"2", if_version=version + 7)
    assert refused.status == Status.PRECONDITION
    assert refused.body == f"version is {version}, not {version + 7}".encode()
    assert wire.send(Kind.SET, b"k", value=b"2", if_version=version).status == Status.OK
    assert wire.send(Kind.DEL, b"k", if_version=version).status == Status.PRECONDITION
    assert wire.send(Kind.GET, b"k").body == b"2"
    reply = wire.send(Kind.DEL, b"k", if_version=version + 1, versioned=True)
    assert reply.status == Status.OK and split_versioned(reply.body)[0] == version + 2
    absent = wire.send(Kind.DEL, b"k", if_version=version + 2)
    assert (absent.status, absent.body) == (Status.PRECONDITION, b"key does not exist")
    assert wire.send(Kind.SET, b"k", value=b"3", if_version=1).status == Status.PRECONDITION


def test_set_return_old_answers_the_previous_item(wire: Wire) -> None:
    first = wire.send(Kind.SET, b"k", value=b"one", ttl_ms=9000, return_old=True)
    assert decode_old_item(first.body) == (V0, None)
    second = wire.send(Kind.SET, b"k", value=b"two", return_old=True)
    assert decode_old_item(second.body) == (V0 + 1, (V0, START_MS + 9000, b"one"))


# --- INCR ---------------------------------------------------------------------------------------


def test_incr_creates_adds_and_keeps_or_sets_the_deadline(wire: Wire, clock: FakeClock) -> None:
    reply = wire.send(Kind.INCR, b"n", by=5, ttl_ms=1000)
    assert reply.status == Status.OK and reply.deadline_ms == START_MS + 1000
    assert split_incr_body(reply.body) == (V0, 5)
    clock.advance(10)
    reply = wire.send(Kind.INCR, b"n", by=-7)  # keeps its deadline
    assert split_incr_body(reply.body)[1] == -2 and reply.deadline_ms == START_MS + 1000
    assert wire.send(Kind.GET, b"n").body == b"-2"  # stored as decimal ASCII
    reply = wire.send(Kind.INCR, b"n", by=1, ttl_ms=50)
    assert reply.deadline_ms == START_MS + 60
    assert wire.send(Kind.INCR, b"plain", by=1).deadline_ms is None


@pytest.mark.parametrize(
    ("stored", "by", "reason"),
    [
        (b"abc", 1, b"value is not an integer"),
        (b" 1", 1, b"value is not an integer"),
        (b"+1", 1, b"value is not an integer"),
        (b"1_0", 1, b"value is not an integer"),
        (b"", 1, b"value is not an integer"),
        (b"9" * 21, 1, b"value is not an integer"),
        (b"9223372036854775808", 1, b"value is not an integer"),
        (b"9223372036854775807", 1, b"increment would overflow"),
        (b"-9223372036854775808", -1, b"increment would overflow"),
    ],
)
def test_incr_refuses_a_non_integer_or_an_overflow_and_changes_nothing(
    wire: Wire, stored: bytes, by: int, reason: bytes
) -> None:
    wire.send(Kind.SET, b"n", value=stored)
    version = version_of(wire, b"n")
    reply = wire.send(Kind.INCR, b"n", by=by)
    assert (reply.status, reply.body) == (Status.CONFLICT, reason)
    assert wire.send(Kind.GET, b"n").body == stored
    assert version_of(wire, b"n") == version


def test_incr_at_the_edges_of_64_bits(wire: Wire) -> None:
    wire.send(Kind.SET, b"n", value=b"9223372036854775806")
    assert split_incr_body(wire.send(Kind.INCR, b"n", by=1).body)[1] == 2**63 - 1
    wire.send(Kind.SET, b"m", value=b"-9223372036854775807")
    assert split_incr_body(wire.send(Kind.INCR, b"m", by=-1).body)[1] == -(2**63)


# --- EXPIRE, persist, touch ---------------------------------------------------------------------


def test_expire_sets_or_removes_the_deadline_and_bumps_the_version(
    wire: Wire, clock: FakeClock
) -> None:
    assert wire.send(Kind.EXPIRE, b"k", ttl_ms=10).status == Status.NOT_FOUND
    wire.send(Kind.SET, b"k", value=b"v")
    reply = wire.send(Kind.EXPIRE, b"k", ttl_ms=500, versioned=True)
    assert reply.status == Status.OK and reply.deadline_ms == START_MS + 500
    assert split_versioned(reply.body)[0] == V0 + 1
    reply = wire.send(Kind.EXPIRE, b"k")  # persist
    assert (reply.status, reply.deadline_ms) == (Status.OK, None)
    clock.advance(1000)
    assert wire.send(Kind.GET, b"k").body == b"v"
    wire.send(Kind.EXPIRE, b"k", ttl_ms=1)
    clock.advance(1)
    assert wire.send(Kind.EXPIRE, b"k").status == Status.NOT_FOUND  # already expired


def test_get_touch_reads_and_moves_the_deadline(wire: Wire, clock: FakeClock) -> None:
    wire.send(Kind.SET, b"s", value=b"session", ttl_ms=100)
    clock.advance(90)
    reply = wire.send(Kind.GET, b"s", ttl_ms=100)
    assert (reply.status, reply.body, reply.deadline_ms) == (
        Status.OK,
        b"session",
        START_MS + 190,
    )
    clock.advance(90)  # past the first deadline, not the touched one
    assert wire.send(Kind.GET, b"s").body == b"session"
    clock.advance(10)
    assert wire.send(Kind.GET, b"s", ttl_ms=100).status == Status.NOT_FOUND


# --- locks and fences ---------------------------------------------------------------------------


def lock(wire: Wire, name: bytes, ttl_ms: int) -> Reply:
    return wire.send(Kind.LOCK, name, ttl_ms=ttl_ms)


def token_of(reply: Reply) -> int:
    assert reply.status == Status.OK, reply
    return split_versioned(reply.body)[0]


def test_a_lock_is_taken_refused_while_held_and_its_tokens_increase(
    wire: Wire, clock: FakeClock
) -> None:
    first = lock(wire, b"job", 1000)
    assert first.deadline_ms == START_MS + 1000
    one = token_of(first)
    held = lock(wire, b"job", 1000)
    assert (held.status, held.deadline_ms) == (Status.CONFLICT, START_MS + 1000)
    clock.advance(1000)  # expired: free to take
    two = token_of(lock(wire, b"job", 1000))
    assert two > one
    assert token_of(lock(wire, b"other", 10)) > two  # tokens are versions of the shard


def test_refresh_and_unlock_need_the_current_token(wire: Wire, clock: FakeClock) -> None:
    one = token_of(lock(wire, b"job", 100))
    clock.advance(150)  # expired but not taken again: the token is still the newest
    refreshed = wire.send(Kind.REFRESH, b"job", token=one, ttl_ms=100)
    assert (refreshed.status, refreshed.deadline_ms) == (Status.OK, START_MS + 250)
    assert token_of(refreshed) == one
    assert lock(wire, b"job", 100).status == Status.CONFLICT
    stale = wire.send(Kind.REFRESH, b"job", token=one - 1, ttl_ms=100)
    assert stale.status == Status.CONFLICT
    assert wire.send(Kind.UNLOCK, b"job", token=one - 1).status == Status.CONFLICT
    assert wire.send(Kind.UNLOCK, b"job", token=one).status == Status.OK
    assert wire.send(Kind.UNLOCK, b"job", token=one).status == Status.CONFLICT  # released
    assert wire.send(Kind.REFRESH, b"job", token=one, ttl_ms=10).status == Status.CONFLICT
    two = token_of(lock(wire, b"job", 100))  # free at once after UNLOCK
    assert two > one
    assert wire.send(Kind.UNLOCK, b"never", token=1).status == Status.CONFLICT


def test_fence_check_is_ok_only_for_the_newest_token(wire: Wire, clock: FakeClock) -> None:
    assert wire.send(Kind.FENCE_CHECK, b"job", token=1).status == Status.CONFLICT
    one = token_of(lock(wire, b"job", 100))
    assert wire.send(Kind.FENCE_CHECK, b"job", token=one).status == Status.OK
    clock.advance(100)
    two = token_of(lock(wire, b"job", 100))
    assert wire.send(Kind.FENCE_CHECK, b"job", token=one).status == Status.CONFLICT
    assert wire.send(Kind.FENCE_CHECK, b"job", token=two).status == Status.OK


def test_the_newest_token_outlives_the_lock_for_a_day(shard: Shard, wire: Wire) -> None:
    token = token_of(lock(wire, b"job", 100))
    _, version, deadline = shard.store.item(LOCK_PREFIX + b"job")
    assert (version, deadline) == (token, START_MS + 100 + LOCK_MEMORY_MS)


def test_a_fenced_write_with_an_older_token_is_refused_and_changes_nothing(
    shard: Shard, wire: Wire, clock: FakeClock
) -> None:
    assert wire.send(Kind.SET, b"k", value=b"new", fence=(b"job", 20)).status == Status.OK
    _, _, deadline = shard.store.item(FENCE_PREFIX + b"job")
    assert deadline == START_MS + FENCE_MEMORY_MS
    for kind, fields in [
        (Kind.SET, {"value": b"old"}),
        (Kind.DEL, {}),
        (Kind.INCR, {"by": 1}),
        (Kind.EXPIRE, {"ttl_ms": 5}),
    ]:
        reply = wire.send(kind, b"k", fence=(b"job", 19), **fields)
        assert reply.status == Status.CONFLICT, kind
        assert reply.body == b"fence token 19 is older than 20: not applied"
    assert wire.send(Kind.GET, b"k").body == b"new"
    clock.advance(1000)
    assert wire.send(Kind.SET, b"k", value=b"same", fence=(b"job", 20)).status == Status.OK
    _, _, deadline = shard.store.item(FENCE_PREFIX + b"job")
    assert deadline == START_MS + 1000 + FENCE_MEMORY_MS  # refreshed by each fenced write
    assert wire.send(Kind.DEL, b"k", fence=(b"job", 21)).status == Status.OK
    assert wire.send(Kind.SET, b"k", value=b"x", fence=(b"job", 20)).status == Status.CONFLICT
    # A condition refused after the fence passed raises nothing: the fence stays at 21.
    refused = wire.send(Kind.SET, b"k", value=b"y", xx=True, fence=(b"job", 30))
    assert refused.status == Status.PRECONDITION
    assert wire.send(Kind.SET, b"k", value=b"z", fence=(b"job", 21)).status == Status.OK


def test_listings_skip_the_workers_own_keys(wire: Wire) -> None:
    token = token_of(lock(wire, b"job", 100))
    wire.send(Kind.SET, b"a", value=b"1", fence=(b"job", token))
    wire.send(Kind.SET, b"\x01", value=b"2")
    reply = wire.send(Kind.ALL)
    assert [e.key for e in decode_entries(reply.body or b"")] == [b"\x01", b"a"]
    reply = wire.send(Kind.ALL, b"\x00", limit=1)
    assert [e.key for e in decode_entries(reply.body or b"")] == [b"\x01"]


# --- applied once -------------------------------------------------------------------------------


def test_retries_are_answered_from_memory_and_applied_once(wire: Wire) -> None:
    incr = Request(Kind.INCR, 77, b"n", by=3)
    first = wire.deliver(incr)
    assert wire.deliver(incr) == Reply(Status.OK, 77, first.token + 1, None, first.body)
    assert wire.send(Kind.GET, b"n").body == b"3"
    take = Request(Kind.LOCK, 78, b"job", ttl_ms=100)
    token = token_of(wire.deliver(take))
    assert token_of(wire.deliver(take)) == token  # the same token, not CONFLICT
    for request in [
        Request(Kind.SET, 79, b"k", b"v", versioned=True, nx=True),
        Request(Kind.SET, 80, b"k", b"w", return_old=True),
        Request(Kind.EXPIRE, 81, b"k", ttl_ms=50, versioned=True),
        Request(Kind.REFRESH, 82, b"job", token=token, ttl_ms=500),
        Request(Kind.UNLOCK, 83, b"job", token=token),
        Request(Kind.DEL, 84, b"k", versioned=True),
    ]:
        reply = wire.deliver(request)
        assert reply.status == Status.OK, request
        again = wire.deliver(request)
        assert (again.status, again.deadline_ms, again.body) == (
            reply.status,
            reply.deadline_ms,
            reply.body,
        ), request


def test_a_stamped_write_past_the_window_is_refused_as_set_is(wire: Wire, clock: FakeClock) -> None:
    stamp = stamp_of(clock() / 1000 - 3600)
    for kind, fields in [
        (Kind.INCR, {"by": 1}),
        (Kind.EXPIRE, {}),
        (Kind.LOCK, {"ttl_ms": 10}),
        (Kind.SET, {"value": b"v", "nx": True}),
        (Kind.GET, {"ttl_ms": 10}),
    ]:
        reply = wire.send(kind, b"k", stamp=stamp, **fields)
        assert reply.status == Status.UNAVAILABLE, kind
        assert reply.body is not None and reply.body.startswith(b"outcome unknown")
    assert wire.send(Kind.GET, b"k").status == Status.NOT_FOUND


def test_a_full_memory_refuses_new_issue_12_writes_busy(clock: FakeClock) -> None:
    from workers.idempotency import RequestMemory

    shard = Shard(0, TTLStore(clock), memory=RequestMemory(capacity=1))
    wire = Wire(shard)
    assert wire.send(Kind.INCR, b"n", by=1).status == Status.OK
    assert wire.send(Kind.INCR, b"n", by=1).status == Status.BUSY
    assert wire.send(Kind.GET, b"n").body == b"1"


# --- the batch path -----------------------------------------------------------------------------


def test_issue_12_requests_in_a_batch_are_applied_in_order(shard: Shard, wire: Wire) -> None:
    replies = wire.batch(
        Request(Kind.SET, 1, b"k", b"v"),
        Request(Kind.INCR, 2, b"n", by=2),
        Request(Kind.SET, 3, b"k", b"w", nx=True),
        Request(Kind.GET, 4, b"k", versioned=True),
        Request(Kind.LOCK, 5, b"job", ttl_ms=100),
        Request(Kind.INCR, 2, b"n", by=2),  # a retry inside the batch
        Request(Kind.GET, 6, b"n"),
    )
    assert [r.status for r in replies] == [
        Status.OK,
        Status.OK,
        Status.PRECONDITION,
        Status.OK,
        Status.OK,
        Status.OK,
        Status.OK,
    ]
    assert split_versioned(replies[3].body) == (V0, b"v")
    assert replies[5].body == replies[1].body
    assert replies[6].body == b"2"
    assert shard.tally[Kind.INCR << 3 | Status.OK] == 2
    assert shard.tally[Kind.SET << 3 | Status.PRECONDITION] == 1
    assert EXTENDED_OP > 0x7F  # the tally indexes by the command, never by this


def test_a_stale_batch_of_issue_12_requests_is_refused_and_tallied(shard: Shard) -> None:
    wire = Wire(shard)
    wire.batch(Request(Kind.INCR, 1, b"n", by=1))
    wire.tokens = itertools.count(1)  # a stale token
    [reply] = wire.batch(Request(Kind.INCR, 2, b"n", by=1))
    assert reply.status == Status.UNAVAILABLE
    assert shard.tally[Kind.INCR << 3 | Status.UNAVAILABLE] == 1


# --- events -------------------------------------------------------------------------------------


def test_the_events_hook_sees_every_change_in_order_and_nothing_internal(
    shard: Shard, wire: Wire, clock: FakeClock
) -> None:
    assert shard.events is None
    events: list[tuple[int, bytes, int, int]] = []
    shard.events = events
    wire.send(Kind.SET, b"a", value=b"1", ttl_ms=100)
    wire.batch(Request(Kind.SET, 1, b"b", b"2"), Request(Kind.INCR, 2, b"n", by=1))
    wire.send(Kind.EXPIRE, b"b", ttl_ms=50)
    wire.send(Kind.GET, b"b", ttl_ms=60)  # touch
    wire.send(Kind.DEL, b"n")
    wire.send(Kind.DEL, b"n")  # NOT_FOUND: no event
    wire.send(Kind.SET, b"a", value=b"x", nx=True)  # PRECONDITION: no event
    token = token_of(lock(wire, b"job", 10))  # internal: no event
    wire.send(Kind.SET, b"c", value=b"3", fence=(b"job", token))  # the fence record: no event
    clock.advance(100)
    shard.store.expire(100)  # the active expiry: b (touched to +60), then a (+100)
    v = V0
    assert events == [
        (EVENT_SET, b"a", v, START_MS + 100),
        (EVENT_SET, b"b", v + 1, 0),
        (EVENT_INCR, b"n", v + 2, 0),
        (EVENT_TTL, b"b", v + 3, START_MS + 50),
        (EVENT_TTL, b"b", v + 4, START_MS + 60),
        (EVENT_DELETE, b"n", v + 5, 0),
        (EVENT_SET, b"c", v + 7, 0),
        (EVENT_EXPIRE, b"b", v + 4, START_MS + 60),  # the version and deadline it had
        (EVENT_EXPIRE, b"a", v, START_MS + 100),
    ]


def test_a_read_that_finds_a_key_expired_announces_its_expiry(
    shard: Shard, wire: Wire, clock: FakeClock
) -> None:
    events: list[tuple[int, bytes, int, int]] = []
    shard.events = events
    wire.send(Kind.SET, b"a", value=b"1", ttl_ms=10)
    clock.advance(10)
    assert wire.send(Kind.GET, b"a").status == Status.NOT_FOUND
    assert events[-1] == (EVENT_EXPIRE, b"a", V0, START_MS + 10)
    shard.store.expire(100)
    assert len(events) == 2  # once


# --- the log ------------------------------------------------------------------------------------


@pytest.fixture
def durability(tmp_path: Path) -> Durability:
    return Durability(tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: None)


def test_everything_is_logged_as_setv_delv_and_replays_exactly(
    durability: Durability, clock: FakeClock
) -> None:
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    wire.send(Kind.SET, b"k", value=b"v", ttl_ms=10_000)
    wire.send(Kind.INCR, b"n", by=41)
    incr = Request(Kind.INCR, 5, b"n", by=1)
    answered = wire.deliver(incr)
    token = token_of(wire.send(Kind.LOCK, b"job", ttl_ms=5000))
    wire.send(Kind.EXPIRE, b"k", ttl_ms=20_000)
    wire.send(Kind.SET, b"d", value=b"x")
    wire.send(Kind.DEL, b"d", versioned=True)
    before = dict(shard.store._data)
    last = shard.store.last_version
    shard.close()
    with LogReader(durability.shard_dir(0) / "log") as reader:
        types = {type(r) for _, r in reader.records()}
    assert types == {aof.TimeRecord, aof.SetRecord, aof.DelRecord, aof.MemosRecord}
    again = take_shard(0, 2, None, durability, clock).shard
    assert again.store._data == before and again.store.last_version == last
    rewire = Wire(again)
    retried = rewire.deliver(incr)
    assert (retried.status, retried.body) == (Status.OK, answered.body)  # not applied again
    assert rewire.send(Kind.LOCK, b"job", ttl_ms=10).status == Status.CONFLICT
    assert rewire.send(Kind.FENCE_CHECK, b"job", token=token).status == Status.OK
    assert token_of(rewire.send(Kind.LOCK, b"other", ttl_ms=10)) == last + 1
    again.close()


def test_compaction_keeps_the_version_high_water_of_deleted_keys(
    durability: Durability, clock: FakeClock
) -> None:
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    for _ in range(5):
        wire.send(Kind.SET, b"k", value=b"v")
    wire.send(Kind.DEL, b"k")
    last = shard.store.last_version
    files = shard.files
    assert files is not None
    files.start_rewrite(shard.store, shard.memory)
    assert files.wait_rewrite(10.0)
    shard.tick()
    shard.close()
    again = take_shard(0, 2, None, durability, clock).shard
    assert again.store.last_version == last  # the key is gone from the log, not its versions
    Wire(again).send(Kind.SET, b"k", value=b"v")
    assert again.store.item(b"k")[1] == last + 1
    again.close()


def test_an_old_log_replays_with_version_zero_and_new_versions_follow_the_clock(
    durability: Durability, clock: FakeClock
) -> None:
    directory = durability.shard_dir(0)
    directory.mkdir(parents=True)
    old = [aof.SetRecord(1, b"k", b"v", None), aof.DelRecord(2, b"x")]
    (directory / "log").write_bytes(aof.MAGIC_V3 + b"".join(aof.encode(r) for r in old))
    shard = take_shard(0, 1, None, durability, clock).shard
    assert shard.store.item(b"k") == (b"v", 0, None)
    reply = Wire(shard).send(Kind.SET, b"k", value=b"w", if_version=0, versioned=True)
    assert split_versioned(reply.body)[0] == V0
    shard.close()


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_refuses_issue_12_writes_before_applying_them(
    durability: Durability, clock: FakeClock
) -> None:
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    incr = Request(Kind.INCR, 9, b"n", by=1)
    assert wire.deliver(incr).status == Status.OK
    files = shard.files
    assert files is not None
    files.refuse_writes("No space left on device", 1)
    replies = wire.batch(
        Request(Kind.INCR, 10, b"n", by=1),
        Request(Kind.LOCK, 11, b"job", ttl_ms=10),
        Request(Kind.SET, 12, b"k", b"v", nx=True),
        Request(Kind.GET, 13, b"n", versioned=True),  # a read: served
        incr,  # a retry of an applied write: answered from memory
    )
    assert [r.status for r in replies] == [
        Status.NO_SPACE,
        Status.NO_SPACE,
        Status.NO_SPACE,
        Status.OK,
        Status.OK,
    ]
    assert wire.send(Kind.GET, b"n").body == b"1"
    assert wire.deliver(Request(Kind.EXPIRE, 14, b"n")).status == Status.NO_SPACE
    shard.close()


def test_a_lock_and_a_fence_of_the_longest_name_replay(
    durability: Durability, clock: FakeClock
) -> None:
    """The worker's own keys are a prefix longer than the client's name: the log must take
    them back (a reader that refused keys over MAX_KEY_BYTES refused this shard's log)."""
    name = b"n" * MAX_KEY_BYTES
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    token = token_of(wire.send(Kind.LOCK, name, ttl_ms=1000))
    assert wire.send(Kind.SET, b"k", value=b"v", fence=(name, token)).status == Status.OK
    other = b"m" * MAX_KEY_BYTES  # another shard's lock: a fence record is stored
    assert wire.send(Kind.SET, b"k", value=b"v", fence=(other, token)).status == Status.OK
    reserved = (shard.store.reserved, shard.store.reserved_bytes)
    assert reserved[0] == 2
    shard.close()
    again = take_shard(0, 2, None, durability, clock).shard
    assert (again.store.reserved, again.store.reserved_bytes) == reserved  # the budget's count
    assert Wire(again).send(Kind.FENCE_CHECK, name, token=token).status == Status.OK
    assert Wire(again).send(Kind.SET, b"k", value=b"w", fence=(name, token - 1)).status == (
        Status.CONFLICT
    )
    assert Wire(again).send(Kind.SET, b"k", value=b"w", fence=(other, token - 1)).status == (
        Status.CONFLICT
    )
    again.close()


def test_a_follower_takes_the_largest_setv_record() -> None:
    """Replication ships log records whole: its bound must hold the largest SETV."""
    largest = aof.PREFIX_BYTES + aof.encode_setv(0, b"", b"", None, 1).__len__() - 8
    assert largest + MAX_KEY_BYTES + MAX_VALUE_BYTES <= MAX_RECORD_BYTES


def test_a_retry_of_a_return_old_set_whose_old_value_was_large_is_refused_not_applied(
    wire: Wire,
) -> None:
    wire.send(Kind.SET, b"k", value=b"x" * 5000)
    request = Request(Kind.SET, 4242, b"k", b"new", return_old=True)
    first = wire.deliver(request)
    assert decode_old_item(first.body)[1] is not None
    wire.send(Kind.SET, b"k", value=b"newer")
    again = wire.deliver(request)
    assert again.status == Status.CONFLICT
    assert again.body is not None and b"applied by an earlier attempt" in again.body
    assert wire.send(Kind.GET, b"k").body == b"newer"


def test_a_compacted_log_keeps_the_replies_of_issue_12_writes(
    durability: Durability, clock: FakeClock
) -> None:
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    incr = Request(Kind.INCR, 5151, b"n", by=2)
    first = wire.deliver(incr)
    files = shard.files
    assert files is not None
    files.start_rewrite(shard.store, shard.memory)
    assert files.wait_rewrite(10.0)
    shard.tick()
    shard.close()
    again = take_shard(0, 2, None, durability, clock).shard
    retried = Wire(again).deliver(incr)
    assert (retried.status, retried.body) == (Status.OK, first.body)
    assert again.store.item(b"n")[0] == b"2"
    again.close()


def test_a_batch_undone_by_a_full_disk_announces_no_event(tmp_path: Path, clock: FakeClock) -> None:
    """An append that meets ENOSPC undoes the batch (a replay of the log): its changes were
    never acknowledged, so the events hook must not keep them."""
    full = [False]

    def write(fd: int, data: memoryview) -> int:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    durability = Durability(
        tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: None, write=write
    )
    shard = take_shard(0, 1, None, durability, clock).shard
    events: list[tuple[int, bytes, int, int]] = []
    shard.events = events
    wire = Wire(shard)
    assert wire.send(Kind.SET, b"kept", value=b"1").status == Status.OK
    full[0] = True
    replies = wire.batch(Request(Kind.SET, 1, b"lost", b"2"), Request(Kind.INCR, 2, b"n", by=1))
    assert [r.status for r in replies] == [Status.NO_SPACE, Status.NO_SPACE]
    assert [key for _, key, _, _ in events] == [b"kept"]
    assert shard.store.events is events  # the rebuilt store still feeds the hook
    shard.close(sync=False)


def test_a_follower_applying_the_shipped_records_holds_the_same_keys_versions_and_replies(
    durability: Durability, clock: FakeClock
) -> None:
    """Cluster mode ships the bytes the leader appends; a follower applies them with replay's
    code (persist.apply_record): versions, locks and remembered replies come along."""
    from workers.idempotency import RequestMemory
    from workers.persist import apply_record

    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    incr = Request(Kind.INCR, 6161, b"n", by=9)
    first = wire.deliver(incr)
    token_of(wire.send(Kind.LOCK, b"job", ttl_ms=100))
    wire.send(Kind.SET, b"k", value=b"v", fence=(b"job", 3), nx=True)
    wire.send(Kind.EXPIRE, b"k", ttl_ms=500)
    shard.close()
    store, memory = TTLStore(clock), RequestMemory()
    with LogReader(durability.shard_dir(0) / "log") as reader:
        for _, record in reader.records():
            apply_record(record, store, memory)
    assert store._data == shard.store._data and store.last_version == shard.store.last_version
    follower = Shard(0, store, memory=memory)
    retried = Wire(follower).deliver(incr)
    assert (retried.status, retried.body) == (Status.OK, first.body)


def test_key_counts_leave_the_workers_own_keys_out(
    shard: Shard, wire: Wire, clock: FakeClock
) -> None:
    from workers.figures import WorkerCounters, figures

    wire.send(Kind.SET, b"a", value=b"1", ttl_ms=10)
    token = token_of(lock(wire, b"job", 5))
    wire.send(Kind.SET, b"b", value=b"2", fence=(b"other", token))  # another shard's lock
    assert len(shard.store) == 4 and shard.store.reserved == 2
    made = figures(shard, WorkerCounters(), 1.0)
    assert made["keys"] == 2 and made["internal_keys"] == 2
    data = shard.store._data
    assert made["internal_bytes"] == sum(len(k) + len(data[k]) for k in data if k < b"\x01")
    checked = check_report(made)  # the broker keeps them (an older worker's report: 0)
    assert (checked["internal_keys"], checked["internal_bytes"]) == (2, made["internal_bytes"])
    del made["internal_keys"], made["internal_bytes"]
    assert check_report(made)["internal_bytes"] == 0
    clock.advance(LOCK_MEMORY_MS + FENCE_MEMORY_MS)
    while shard.store.expire(1000):  # the expiry pass removes the reserved keys too
        pass
    assert shard.store.reserved == 0 and figures(shard, WorkerCounters(), 1.0)["keys"] == 1
    assert figures(shard, WorkerCounters(), 1.0)["internal_bytes"] == 0


# --- a refusal is remembered: a late second copy is answered the same and changes nothing -------
#
# A client with two brokers resends an unanswered request, with the same id, through the other
# broker while the first still holds its copy: one copy is answered (here, refused: nothing
# changed), the client goes on, and the other copy reaches the shard after the state changed so
# that it would now succeed. Each case sets the state up, and returns the refused request, the
# change that would let it through, and what must still hold afterwards (a read: it is checked
# more than once).

Change = Callable[[Wire], object]
Case = Callable[[Wire], tuple[Request, Change, Change]]


def _next_version(wire: Wire) -> int:
    """The version the shard's next write gets (the fake clock stands still)."""
    return wire.shard.store.last_version + 1


def _set_nx(wire: Wire) -> tuple[Request, Change, Change]:
    wire.send(Kind.SET, b"k", value=b"there")
    return (
        Request(Kind.SET, next(_IDS), b"k", b"mine", nx=True),
        lambda w: w.send(Kind.DEL, b"k"),
        lambda w: w.send(Kind.GET, b"k").status == Status.NOT_FOUND,
    )


def _set_xx(wire: Wire) -> tuple[Request, Change, Change]:
    return (
        Request(Kind.SET, next(_IDS), b"k", b"mine", xx=True),
        lambda w: w.send(Kind.SET, b"k", value=b"theirs"),
        lambda w: w.send(Kind.GET, b"k").body == b"theirs",
    )


def _set_if_version(wire: Wire) -> tuple[Request, Change, Change]:
    wire.send(Kind.SET, b"k", value=b"first")
    future = _next_version(wire)  # the version the change below gives the key
    return (
        Request(Kind.SET, next(_IDS), b"k", b"mine", if_version=future),
        lambda w: w.send(Kind.SET, b"k", value=b"theirs", versioned=True),
        lambda w: w.send(Kind.GET, b"k").body == b"theirs" and version_of(w, b"k") == future,
    )


def _del_if_version(wire: Wire) -> tuple[Request, Change, Change]:
    wire.send(Kind.SET, b"k", value=b"first")
    future = _next_version(wire)
    return (
        Request(Kind.DEL, next(_IDS), b"k", if_version=future),
        lambda w: w.send(Kind.SET, b"k", value=b"theirs"),
        lambda w: w.send(Kind.GET, b"k").body == b"theirs" and version_of(w, b"k") == future,
    )


def _stale_fence(wire: Wire) -> tuple[Request, Change, Change]:
    # The newest fence seen only grows within the window, so the late copy cannot pass; its
    # reply must still be the first one's (the fence has moved on since), from memory.
    wire.send(Kind.SET, b"f", value=b"x", fence=(b"job", 10))
    return (
        Request(Kind.SET, next(_IDS), b"k", b"mine", fence=(b"job", 5)),
        lambda w: w.send(Kind.SET, b"f", value=b"y", fence=(b"job", 12)),
        lambda w: w.send(Kind.GET, b"k").status == Status.NOT_FOUND,
    )


def _incr_not_an_integer(wire: Wire) -> tuple[Request, Change, Change]:
    wire.send(Kind.SET, b"n", value=b"abc")
    return (
        Request(Kind.INCR, next(_IDS), b"n", by=1),
        lambda w: w.send(Kind.SET, b"n", value=b"5"),
        lambda w: w.send(Kind.GET, b"n").body == b"5",
    )


def _incr_overflow(wire: Wire) -> tuple[Request, Change, Change]:
    wire.send(Kind.SET, b"n", value=b"%d" % (2**63 - 1))
    return (
        Request(Kind.INCR, next(_IDS), b"n", by=1),
        lambda w: w.send(Kind.SET, b"n", value=b"0"),
        lambda w: w.send(Kind.GET, b"n").body == b"0",
    )


def _lock_held(wire: Wire) -> tuple[Request, Change, Change]:
    holder = token_of(lock(wire, b"job", 1000))
    return (
        Request(Kind.LOCK, next(_IDS), b"job", ttl_ms=1000),
        lambda w: w.send(Kind.UNLOCK, b"job", token=holder),
        lambda w: w.shard._lock_state(b"job")[0] == 0,  # released: the late copy took nothing
    )


def _refresh_stale(wire: Wire) -> tuple[Request, Change, Change]:
    one = token_of(lock(wire, b"job", 100))
    wire.send(Kind.UNLOCK, b"job", token=one)
    two = _next_version(wire)  # the token the next LOCK gets
    return (
        Request(Kind.REFRESH, next(_IDS), b"job", token=two, ttl_ms=5000),
        lambda w: token_of(lock(w, b"job", 100)) == two,
        lambda w: w.shard._lock_state(b"job")[2] == START_MS + 100,  # not refreshed
    )


def _unlock_stale(wire: Wire) -> tuple[Request, Change, Change]:
    one = token_of(lock(wire, b"job", 100))
    wire.send(Kind.UNLOCK, b"job", token=one)
    two = _next_version(wire)
    return (
        Request(Kind.UNLOCK, next(_IDS), b"job", token=two),
        lambda w: token_of(lock(w, b"job", 100)) == two,
        lambda w: w.shard._lock_state(b"job")[0] == 1,  # still held
    )


def _expire_missing(wire: Wire) -> tuple[Request, Change, Change]:
    return (
        Request(Kind.EXPIRE, next(_IDS), b"k", ttl_ms=50),
        lambda w: w.send(Kind.SET, b"k", value=b"v"),
        lambda w: w.send(Kind.GET, b"k").deadline_ms is None,
    )


def _persist_missing(wire: Wire) -> tuple[Request, Change, Change]:
    return (
        Request(Kind.EXPIRE, next(_IDS), b"k"),  # no ttl: persist
        lambda w: w.send(Kind.SET, b"k", value=b"v", ttl_ms=1000),
        lambda w: w.send(Kind.GET, b"k").deadline_ms == START_MS + 1000,
    )


def _del_versioned_missing(wire: Wire) -> tuple[Request, Change, Change]:
    return (
        Request(Kind.DEL, next(_IDS), b"k", versioned=True),
        lambda w: w.send(Kind.SET, b"k", value=b"v"),
        lambda w: w.send(Kind.GET, b"k").body == b"v",
    )


def _touch_missing(wire: Wire) -> tuple[Request, Change, Change]:
    return (
        Request(Kind.GET, next(_IDS), b"k", ttl_ms=5000),
        lambda w: w.send(Kind.SET, b"k", value=b"v", ttl_ms=1000),
        lambda w: w.send(Kind.GET, b"k").deadline_ms == START_MS + 1000,
    )


REFUSALS: dict[str, tuple[Case, Status]] = {
    "set nx": (_set_nx, Status.PRECONDITION),
    "set xx": (_set_xx, Status.PRECONDITION),
    "set if_version": (_set_if_version, Status.PRECONDITION),
    "del if_version": (_del_if_version, Status.PRECONDITION),
    "stale fence": (_stale_fence, Status.CONFLICT),
    "incr not an integer": (_incr_not_an_integer, Status.CONFLICT),
    "incr overflow": (_incr_overflow, Status.CONFLICT),
    "lock held": (_lock_held, Status.CONFLICT),
    "refresh stale token": (_refresh_stale, Status.CONFLICT),
    "unlock stale token": (_unlock_stale, Status.CONFLICT),
    "expire missing": (_expire_missing, Status.NOT_FOUND),
    "persist missing": (_persist_missing, Status.NOT_FOUND),
    "del versioned missing": (_del_versioned_missing, Status.NOT_FOUND),
    "touch missing": (_touch_missing, Status.NOT_FOUND),
}


def _same(late: Reply, first: Reply) -> bool:
    return (late.status, late.deadline_ms, late.body) == (
        first.status,
        first.deadline_ms,
        first.body,
    )


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_late_copy_of_a_refused_write_is_answered_the_same_and_changes_nothing(
    name: str, wire: Wire
) -> None:
    case, status = REFUSALS[name]
    request, change, check = case(wire)
    first = wire.deliver(request)
    assert first.status == status, first
    change(wire)
    late = wire.deliver(request)
    assert _same(late, first), late
    assert check(wire), name


def test_a_lock_with_a_wait_sent_again_by_the_broker_takes_the_lock_once_free(
    wire: Wire,
) -> None:
    # The broker parks a LOCK with a wait that was answered CONFLICT and sends it again, same
    # request id, when the lock may be free (broker/locks.py): its CONFLICT is not final, so
    # it is not remembered (a remembered one would keep it waiting until its wait ran out).
    holder = token_of(lock(wire, b"job", 1000))
    waiting = Request(Kind.LOCK, next(_IDS), b"job", ttl_ms=1000, wait_ms=5000)
    assert wire.deliver(waiting).status == Status.CONFLICT
    wire.send(Kind.UNLOCK, b"job", token=holder)
    taken = wire.deliver(waiting)
    assert token_of(taken) > holder
    assert _same(wire.deliver(waiting), taken)  # and applied once


@pytest.mark.parametrize("name", ["set nx", "incr not an integer", "lock held", "expire missing"])
def test_a_late_copy_of_a_refused_write_in_a_batch_is_answered_the_same(
    name: str, wire: Wire
) -> None:
    case, status = REFUSALS[name]
    request, change, check = case(wire)
    [first] = wire.batch(request)
    assert first.status == status
    change(wire)
    [late] = wire.batch(request)
    assert _same(late, first) and check(wire)


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_refusal_survives_a_restart_and_reaches_a_follower(
    name: str, durability: Durability, clock: FakeClock
) -> None:
    """Logged as a MEMOS record: replay, compaction and a follower (which applies the leader's
    records with replay's code) all answer the late copy from memory."""
    from workers.idempotency import RequestMemory
    from workers.persist import apply_record

    case, status = REFUSALS[name]
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    request, change, check = case(wire)
    first = wire.deliver(request)
    assert first.status == status
    change(wire)
    shard.close()
    store, memory = TTLStore(clock), RequestMemory()
    with LogReader(durability.shard_dir(0) / "log") as reader:
        for _, record in reader.records():
            apply_record(record, store, memory)
    follower = Wire(Shard(0, store, memory=memory))
    assert _same(follower.deliver(request), first) and check(follower), "follower"
    again = take_shard(0, 2, None, durability, clock).shard
    assert _same(Wire(again).deliver(request), first) and check(Wire(again)), "replay"
    files = again.files
    assert files is not None
    files.start_rewrite(again.store, again.memory)
    assert files.wait_rewrite(10.0)
    again.tick()
    again.close()
    with LogReader(durability.shard_dir(0) / "log") as reader:  # compacted: MEMOS, no MEMO
        assert aof.MemoRecord not in {type(r) for _, r in reader.records()}
    replayed = take_shard(0, 3, None, durability, clock).shard
    rewire = Wire(replayed)
    assert _same(rewire.deliver(request), first) and check(rewire), "replay after compaction"
    replayed.close()


def test_a_late_copy_of_a_touch_does_not_move_the_deadline_again(
    wire: Wire, clock: FakeClock
) -> None:
    wire.send(Kind.SET, b"k", value=b"v", ttl_ms=1000)
    touch = Request(Kind.GET, next(_IDS), b"k", ttl_ms=5000, versioned=True)
    first = wire.deliver(touch)
    assert (first.status, first.deadline_ms) == (Status.OK, START_MS + 5000)
    clock.advance(2000)  # untouched since: answered as the touch was, the deadline stays
    late = wire.deliver(touch)
    assert _same(late, first)
    assert wire.send(Kind.GET, b"k").deadline_ms == START_MS + 5000
    wire.send(Kind.EXPIRE, b"k", ttl_ms=100)  # the client changes the deadline
    later = wire.deliver(touch)
    assert (later.status, later.deadline_ms) == (Status.CONFLICT, START_MS + 5000)
    assert later.body is not None and b"changed since" in later.body
    assert wire.send(Kind.GET, b"k").deadline_ms == START_MS + 2000 + 100


def test_a_touch_is_remembered_across_a_restart(durability: Durability, clock: FakeClock) -> None:
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    wire.send(Kind.SET, b"k", value=b"v", ttl_ms=1000)
    touch = Request(Kind.GET, next(_IDS), b"k", ttl_ms=5000)
    first = wire.deliver(touch)
    shard.close()
    clock.advance(1000)
    again = take_shard(0, 2, None, durability, clock).shard
    rewire = Wire(again)
    assert _same(rewire.deliver(touch), first)
    assert rewire.send(Kind.GET, b"k").deadline_ms == START_MS + 5000
    again.close()


def test_a_late_copy_of_a_write_refused_no_space_is_not_applied_once_space_frees(
    durability: Durability, clock: FakeClock
) -> None:
    """Remembered in memory only (no room to log it): this process answers the late copy."""
    shard = take_shard(0, 1, None, durability, clock).shard
    wire = Wire(shard)
    files = shard.files
    assert files is not None
    files.refuse_writes("No space left on device", 1)
    refused = [
        Request(Kind.INCR, next(_IDS), b"n", by=1),
        Request(Kind.SET, next(_IDS), b"k", b"v", nx=True),
        Request(Kind.SET, next(_IDS), b"plain", b"v"),
    ]
    firsts = [wire.deliver(r) for r in refused]
    assert [r.status for r in firsts] == [Status.NO_SPACE] * 3
    files.no_space = None  # space freed (ShardFiles._check_space)
    assert wire.send(Kind.SET, b"other", value=b"w").status == Status.OK
    for request, first in zip(refused, firsts, strict=True):
        assert _same(wire.deliver(request), first), request
    for key in (b"n", b"k", b"plain"):
        assert wire.send(Kind.GET, key).status == Status.NOT_FOUND
    shard.close()


# --- forged fence tokens and the budget of the worker's own records ------------------------------


def test_a_forged_future_fence_token_is_refused_and_blocks_the_holders_at_most_briefly(
    wire: Wire, shard: Shard, clock: FakeClock
) -> None:
    # The lock lives on another shard (no record here): a token no lock shard can have issued
    # yet is refused, so it is never remembered as the newest and blocks nobody for a day.
    forged = 2**64 - 1
    writes = (
        (Kind.SET, {"value": b"x"}),
        (Kind.INCR, {"by": 1}),
        (Kind.DEL, {}),
        (Kind.EXPIRE, {"ttl_ms": 5}),
    )
    for kind, fields in writes:
        reply = wire.send(kind, b"k", fence=(b"job", forged), **fields)
        assert reply.status == Status.CONFLICT, (kind, reply)
        assert b"from the future" in (reply.body or b"")
    assert FENCE_PREFIX + b"job" not in dict((k, 0) for k, _, _ in shard.store.entries())
    clock.advance(1)
    real = clock() * 1000  # what the lock's shard issues now
    assert wire.send(Kind.SET, b"k", value=b"v", fence=(b"job", real)).status == Status.OK
    # The bound: a token up to FENCE_MAX_AHEAD_MS ahead passes (clock skew between hosts)...
    ahead = (clock() + FENCE_MAX_AHEAD_MS) * 1000
    assert wire.send(Kind.SET, b"k", value=b"w", fence=(b"job", ahead + 1)).status == (
        Status.CONFLICT
    )
    assert wire.send(Kind.SET, b"k", value=b"w", fence=(b"job", ahead)).status == Status.OK
    # ...and so blocks the real holders' tokens only until the clocks pass it.
    assert wire.send(Kind.SET, b"k", value=b"v", fence=(b"job", real + 1)).status == (
        Status.CONFLICT
    )
    clock.advance(FENCE_MAX_AHEAD_MS + 1)
    assert wire.send(Kind.SET, b"k", value=b"v", fence=(b"job", clock() * 1000)).status == (
        Status.OK
    )


def test_a_fence_of_a_lock_of_this_shard_must_be_its_current_token(
    wire: Wire, shard: Shard
) -> None:
    token = token_of(lock(wire, b"job", 1000))
    for other in (token + 1, token - 1, 2**64 - 1):
        reply = wire.send(Kind.SET, b"k", value=b"x", fence=(b"job", other))
        assert reply.status == Status.CONFLICT, other
        assert b"is not the current token of the lock" in (reply.body or b"")
    assert wire.send(Kind.SET, b"k", value=b"x", fence=(b"job", token)).status == Status.OK
    # A lock name of this shard with no record: no holder can have a token for it. A name of
    # another shard is checked by order (the lock's shard has its record).
    shard.shards = 4
    names = [b"lock%d" % n for n in range(64)]
    here = next(name for name in names if key_shard(name, 4) == shard.number)
    there = next(name for name in names if key_shard(name, 4) != shard.number)
    reply = wire.send(Kind.SET, b"k", value=b"y", fence=(here, 5))
    assert reply.status == Status.CONFLICT
    assert (reply.body or b"").startswith(b"no such lock token")
    assert wire.send(Kind.SET, b"k", value=b"y", fence=(there, 5)).status == Status.OK


def test_the_workers_own_records_are_bounded_by_a_byte_budget(
    wire: Wire, shard: Shard, clock: FakeClock
) -> None:
    store = shard.store
    shard.reserved_max_bytes = 4_000
    names = (b"%d:" % n + b"n" * 1_000 for n in itertools.count())
    taken = []
    while True:
        name = next(names)
        reply = lock(wire, name, 1)
        if reply.status != Status.OK:
            break
        taken.append(name)
    assert reply.status == Status.BUSY
    assert b"RESERVED_MAX_BYTES" in (reply.body or b"")
    assert len(taken) == 4  # about 1,030 bytes each
    assert 4_000 <= store.reserved_bytes < 4_000 + 1_100
    assert store.reserved == 4
    before = store.reserved_bytes
    # Nothing issued or written; the existing locks keep working, their fences too (a lock of
    # this shard needs no fence record); a write fenced by another shard's lock that would
    # store a new fence record is BUSY.
    clock.advance(2)
    token = token_of(lock(wire, taken[0], 1_000))
    assert wire.send(Kind.SET, b"k", value=b"v", fence=(taken[0], token)).status == Status.OK
    reply = wire.send(Kind.SET, b"k", value=b"w", fence=(b"elsewhere", token))
    assert reply.status == Status.BUSY
    assert b"RESERVED_MAX_BYTES" in (reply.body or b"")
    assert store.reserved_bytes == before
    # Past their memory the records go, with their bytes, and new names are taken again.
    clock.advance(LOCK_MEMORY_MS + 1_000)
    store.expire(100)
    assert (store.reserved, store.reserved_bytes) == (0, 0)
    assert lock(wire, next(names), 1).status == Status.OK
