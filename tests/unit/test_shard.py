"""Shard.handle: the reply to every command, fencing by token, batches, idempotency.

Tests of single requests run twice (the ``handle`` fixture): with Dispatch and Reply objects,
and down the worker's path, where a lone GET, SET or DEL is decoded from its DISPATCH frames
by peek_keyed_dispatch into a plain tuple and answered with REPLY frames.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes import START_MS, FakeClock
from workers import aof
from workers import shard as shard_module
from workers.aof import FsyncPolicy
from workers.idempotency import RequestMemory
from workers.persist import Durability
from workers.shard import Message, Shard, take_shard
from workers.store import Missing, TTLStore
from zkv.protocol import (
    KEYED_COMMANDS,
    MAX_LIST_KEYS,
    MAX_REPLY_BYTES,
    REPLY_TOO_LARGE,
    BatchReply,
    Dispatch,
    DispatchBatch,
    Entry,
    Kind,
    Reply,
    Request,
    Status,
    decode_batch_reply,
    decode_entries,
    decode_from_broker,
    decode_reply,
    dispatch_batch_frames,
    dispatch_frames,
    encode_request,
    pack_request,
    peek_keyed_dispatch,
)

pytestmark = pytest.mark.unit

Handle = Callable[[Shard, Dispatch], Reply]


def by_objects(shard: Shard, dispatch: Dispatch) -> Reply:
    return shard.handle(dispatch)


def from_the_wire(dispatch: Dispatch) -> Message:
    """What the worker decodes from the DISPATCH frames of ``dispatch``: a plain tuple for a
    GET, SET or DEL, a Dispatch for anything else."""
    frames = dispatch_frames(dispatch.token, encode_request(dispatch.request))
    keyed = peek_keyed_dispatch(frames)
    assert (keyed is not None) == (dispatch.request.kind in KEYED_COMMANDS)
    if keyed is not None:
        return keyed
    message = decode_from_broker(frames)
    assert message == dispatch
    return message


def by_wire(shard: Shard, dispatch: Dispatch) -> Reply:
    [answer] = shard.handle_batch([from_the_wire(dispatch)])
    return decode_reply(answer) if isinstance(answer, list) else answer


@pytest.fixture(params=[by_objects, by_wire], ids=["objects", "wire"])
def handle(request: pytest.FixtureRequest) -> Handle:
    """One request, one way or the other (see the module docstring)."""
    return request.param


class Driver:
    """Sends requests to a shard with ever larger tokens, as the broker does."""

    def __init__(self, shard: Shard, handle: Handle = by_objects) -> None:
        self.shard = shard
        self.handle = handle
        self.tokens = itertools.count(shard.last_token + 1)
        self.ids = itertools.count(100)

    def send(self, kind: Kind, key: bytes = b"", **fields: object) -> Reply:
        return self.deliver(Request(kind, next(self.ids), key, **fields))  # type: ignore[arg-type]

    def deliver(self, request: Request) -> Reply:
        token = next(self.tokens)
        reply = self.handle(self.shard, Dispatch(token, request))
        assert reply.request_id == request.request_id
        assert reply.token == token
        return reply


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def shard(clock: FakeClock) -> Shard:
    return Shard(3, TTLStore(clock))


@pytest.fixture
def driver(shard: Shard, handle: Handle) -> Driver:
    return Driver(shard, handle)


def test_set_then_get(driver: Driver) -> None:
    reply = driver.send(Kind.SET, b"k", value=b"v", ttl_ms=5000)
    assert (reply.status, reply.deadline_ms, reply.body) == (Status.OK, START_MS + 5000, None)
    reply = driver.send(Kind.GET, b"k")
    assert (reply.status, reply.deadline_ms, reply.body) == (Status.OK, START_MS + 5000, b"v")


def test_set_without_ttl_has_no_deadline(driver: Driver) -> None:
    assert driver.send(Kind.SET, b"k", value=b"v").deadline_ms is None
    reply = driver.send(Kind.GET, b"k")
    assert (reply.status, reply.deadline_ms, reply.body) == (Status.OK, None, b"v")


def test_set_empty_value(driver: Driver) -> None:
    driver.send(Kind.SET, b"k", value=b"")
    assert driver.send(Kind.GET, b"k").body == b""


def test_get_missing_and_expired(driver: Driver, clock: FakeClock) -> None:
    assert driver.send(Kind.GET, b"nope").status == Status.NOT_FOUND
    driver.send(Kind.SET, b"k", value=b"v", ttl_ms=10)
    clock.now += 10
    reply = driver.send(Kind.GET, b"k")
    assert (reply.status, reply.body, reply.deadline_ms) == (Status.NOT_FOUND, None, None)


def test_delete(driver: Driver) -> None:
    driver.send(Kind.SET, b"k", value=b"v")
    assert driver.send(Kind.DEL, b"k").status == Status.OK
    assert driver.send(Kind.DEL, b"k").status == Status.NOT_FOUND
    assert driver.send(Kind.GET, b"k").status == Status.NOT_FOUND


def test_all_lists_live_entries(driver: Driver, clock: FakeClock) -> None:
    driver.send(Kind.SET, b"b", value=b"2", ttl_ms=1000)
    driver.send(Kind.SET, b"a", value=b"1")
    driver.send(Kind.SET, b"c", value=b"3", ttl_ms=5)
    clock.now += 5
    reply = driver.send(Kind.ALL)
    assert reply.status == Status.OK
    assert sorted(decode_entries(reply.body or b""), key=lambda e: e.key) == [
        Entry(b"a", b"1", None),
        Entry(b"b", b"2", START_MS + 1000),
    ]


def test_all_with_cursor_limit_and_keys_only(driver: Driver) -> None:
    for key in [b"d", b"a", b"c", b"b"]:
        driver.send(Kind.SET, key, value=b"value")
    reply = driver.send(Kind.ALL, b"a", limit=2, keys_only=True)
    assert decode_entries(reply.body or b"") == [Entry(b"b", b"", None), Entry(b"c", b"", None)]


def test_all_of_an_empty_shard(driver: Driver) -> None:
    reply = driver.send(Kind.ALL)
    assert (reply.status, reply.body) == (Status.OK, b"")


def test_ping(driver: Driver) -> None:
    reply = driver.send(Kind.PING)
    assert (reply.status, reply.body) == (Status.OK, None)


def test_accepted_token_becomes_last_token(shard: Shard, handle: Handle) -> None:
    handle(shard, Dispatch(7, Request(Kind.PING, 1)))
    assert shard.last_token == 7
    handle(shard, Dispatch(1000, Request(Kind.GET, 2, b"k")))
    assert shard.last_token == 1000


@pytest.mark.parametrize("stale", [7, 5, 0])
def test_equal_or_lower_token_is_refused_and_changes_nothing(
    shard: Shard, handle: Handle, stale: int
) -> None:
    handle(shard, Dispatch(7, Request(Kind.SET, 1, b"k", b"current")))
    for request in [
        Request(Kind.SET, 2, b"k", b"stale write"),
        Request(Kind.SET, 3, b"new", b"stale write"),
        Request(Kind.DEL, 4, b"k"),
        Request(Kind.GET, 5, b"k"),
    ]:
        reply = handle(shard, Dispatch(stale, request))
        assert reply.status == Status.UNAVAILABLE
        assert reply.request_id == request.request_id
        assert reply.token == stale
        assert reply.body == f"stale token {stale}: this shard already accepted 7".encode()
    assert shard.last_token == 7
    assert shard.store.get(b"k") == (b"current", None)
    assert len(shard.store) == 1


def test_higher_token_after_a_refusal_is_accepted(shard: Shard, handle: Handle) -> None:
    handle(shard, Dispatch(7, Request(Kind.SET, 1, b"k", b"v1")))
    refused = handle(shard, Dispatch(6, Request(Kind.SET, 2, b"k", b"v2")))
    assert refused.status == Status.UNAVAILABLE
    reply = handle(shard, Dispatch(8, Request(Kind.SET, 3, b"k", b"v3")))
    assert reply.status == Status.OK
    assert shard.store.get(b"k") == (b"v3", None)


def test_shard_resumes_from_a_reported_last_token(clock: FakeClock) -> None:
    shard = Shard(0, TTLStore(clock), last_token=50)
    assert shard.handle(Dispatch(50, Request(Kind.PING, 1))).status == Status.UNAVAILABLE
    assert shard.handle(Dispatch(51, Request(Kind.PING, 2))).status == Status.OK


# --- batches and the idempotency memory ---------------------------------------------------------


def test_a_batch_is_answered_in_order_and_later_requests_see_earlier_writes(shard: Shard) -> None:
    requests = [
        Request(Kind.SET, 1, b"k", b"v1"),
        Request(Kind.GET, 2, b"k"),
        Request(Kind.DEL, 3, b"k"),
        Request(Kind.GET, 4, b"k"),
    ]
    replies = shard.handle_batch([Dispatch(10 + i, r) for i, r in enumerate(requests)])
    assert [(r.request_id, r.token, r.status) for r in replies] == [
        (1, 10, Status.OK),
        (2, 11, Status.OK),
        (3, 12, Status.OK),
        (4, 13, Status.NOT_FOUND),
    ]
    assert replies[1].body == b"v1"


def test_a_retried_set_is_answered_from_memory_not_applied_again(
    driver: Driver, shard: Shard, clock: FakeClock
) -> None:
    first = driver.deliver(Request(Kind.SET, 7, b"k", b"v1", 1000))
    driver.send(Kind.SET, b"k", value=b"newer write by someone else")
    clock.advance(10)
    retry = driver.deliver(Request(Kind.SET, 7, b"k", b"v1", 1000))
    assert (retry.status, retry.deadline_ms) == (Status.OK, first.deadline_ms)
    assert shard.store.get(b"k") == (b"newer write by someone else", None)


def test_a_retried_delete_is_answered_from_memory(driver: Driver, shard: Shard) -> None:
    driver.send(Kind.SET, b"k", value=b"v")
    assert driver.deliver(Request(Kind.DEL, 9, b"k")).status == Status.OK
    driver.send(Kind.SET, b"k", value=b"set again by someone else")
    retry = driver.deliver(Request(Kind.DEL, 9, b"k"))
    assert retry.status == Status.OK
    assert shard.store.get(b"k") == (b"set again by someone else", None)


def test_a_second_copy_of_a_delete_that_found_nothing_does_not_delete_a_later_write(
    driver: Driver, shard: Shard
) -> None:
    # A client with two brokers resent its DEL through the second while the first still held
    # it (a failover): the first copy answered NOT_FOUND, the client then wrote the key, and
    # the second copy, reaching the worker after that write, deleted it (the CI partition
    # test, 2026-12-07: "not found, but ... set 'w2-k2-19' ... must be there"). Its reply is
    # remembered like any write's, so the late copy is answered from memory.
    assert driver.deliver(Request(Kind.DEL, 9, b"k")).status == Status.NOT_FOUND
    driver.send(Kind.SET, b"k", value=b"written after the reply")
    late = driver.deliver(Request(Kind.DEL, 9, b"k"))
    assert (late.status, late.deadline_ms) == (Status.NOT_FOUND, None)
    assert shard.store.get(b"k") == (b"written after the reply", None)


def test_a_second_copy_of_a_delete_that_found_nothing_in_a_batch_deletes_nothing(
    shard: Shard,
) -> None:
    miss = Request(Kind.DEL, 9, b"k")
    batches = [
        dispatch_batch(1, miss),
        dispatch_batch(2, Request(Kind.SET, 10, b"k", b"later")),
        dispatch_batch(3, miss),
    ]
    statuses = [answers(shard.handle_batch([b])[0]).replies[0].status for b in batches]
    assert statuses == [Status.NOT_FOUND, Status.OK, Status.NOT_FOUND]
    assert shard.store.get(b"k") == (b"later", None)


@pytest.mark.parametrize(
    "other",
    [
        Request(Kind.SET, 7, b"other key", b"v1"),
        Request(Kind.SET, 7, b"k", b"another value"),
        Request(Kind.DEL, 7, b"k"),
    ],
    ids=["other-key", "other-value", "other-kind"],
)
def test_the_same_id_on_another_request_is_applied(
    driver: Driver, shard: Shard, other: Request
) -> None:
    driver.deliver(Request(Kind.SET, 7, b"k", b"v1"))
    driver.deliver(other)
    if other.kind == Kind.DEL:
        assert shard.store.entries() == []
    else:
        assert shard.store.get(other.key) == (other.value, None)


def test_a_retry_after_a_hundred_thousand_writes_is_not_applied_again(
    clock: FakeClock, handle: Handle
) -> None:
    # Issue 10, item 1: SET k=v1 whose reply is lost, DEL k, 100,000 other writes to the
    # shard (half a second for pipelined clients), then the SET's retry: k=v1 must not return.
    shard = Shard(0, TTLStore(clock))
    driver = Driver(shard, handle)
    driver.deliver(Request(Kind.SET, 7, b"k", b"v1"))  # the reply is lost
    driver.deliver(Request(Kind.DEL, 8, b"k"))
    clock.advance(500)
    ops: list = [(int(Kind.SET), rid, b"o", b"x", None, None) for rid in range(100, 100_100)]
    for start in range(0, len(ops), 1000):
        shard.handle_batch([DispatchBatch(next(driver.tokens), ops[start : start + 1000])])
    retry = driver.deliver(Request(Kind.SET, 7, b"k", b"v1"))
    assert retry.status == Status.OK  # answered from memory
    with pytest.raises(Missing):
        shard.store.get(b"k")


def test_a_memory_full_inside_its_window_refuses_new_writes_busy_not_forgetting(
    clock: FakeClock, handle: Handle
) -> None:
    memory = RequestMemory(keep_ms=1_000, capacity=3)
    shard = Shard(0, TTLStore(clock), memory=memory)
    driver = Driver(shard, handle)
    for request_id in range(1, 4):
        assert driver.deliver(Request(Kind.SET, request_id, b"k%d" % request_id, b"v")).status == (
            Status.OK
        )
    busy = driver.deliver(Request(Kind.SET, 4, b"k4", b"v"))
    assert busy.status == Status.BUSY and b"idempotency memory is full" in (busy.body or b"")
    assert driver.deliver(Request(Kind.DEL, 5, b"k1")).status == Status.BUSY
    with pytest.raises(Missing):
        shard.store.get(b"k4")  # not applied
    assert driver.deliver(Request(Kind.SET, 1, b"k1", b"v")).status == Status.OK  # a retry
    clock.advance(1_001)  # the window passes: the memory frees, writes go on
    assert driver.deliver(Request(Kind.SET, 4, b"k4", b"v")).status == Status.OK


def test_request_id_zero_is_never_remembered(driver: Driver, shard: Shard) -> None:
    driver.deliver(Request(Kind.SET, 0, b"k", b"v1"))
    assert len(shard.memory) == 0


def test_a_stale_token_is_refused_before_the_memory_is_consulted(
    shard: Shard, handle: Handle
) -> None:
    handle(shard, Dispatch(7, Request(Kind.SET, 1, b"k", b"v")))
    reply = handle(shard, Dispatch(7, Request(Kind.SET, 1, b"k", b"v")))
    assert reply.status == Status.UNAVAILABLE


@pytest.mark.parametrize("kind", [Kind.GET, Kind.SET, Kind.DEL])
def test_an_internal_error_is_answered_and_the_shard_keeps_serving(
    driver: Driver, shard: Shard, monkeypatch: pytest.MonkeyPatch, kind: Kind
) -> None:
    """A bug, not bad input: the request gets ERROR at once (no client timeout) and nothing is
    half applied."""
    driver.send(Kind.SET, b"k", value=b"v")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    for method in ("get", "set", "delete"):
        monkeypatch.setattr(shard.store, method, broken)
    value = b"new" if kind == Kind.SET else None
    reply = driver.deliver(Request(kind, 41, b"k", value))
    assert (reply.status, reply.body) == (Status.ERROR, b"internal worker error")
    monkeypatch.undo()
    assert len(shard.memory) == 1  # the failed write is not remembered
    assert driver.send(Kind.GET, b"k").body == b"v"


# --- BATCH_DISPATCH: many requests under one token ---------------------------------------------


def dispatch_batch(token: int, *requests: Request) -> DispatchBatch:
    """What the worker decodes from a BATCH_DISPATCH of ``requests``."""
    records = [pack_request(r.kind, r.request_id, r.key, r.value, r.ttl_ms) for r in requests]
    message = decode_from_broker(dispatch_batch_frames(token, records))
    assert isinstance(message, DispatchBatch)
    return message


def answers(frames: object) -> BatchReply:
    assert isinstance(frames, list)
    return decode_batch_reply(frames)


def test_a_dispatched_batch_is_applied_in_order_under_one_token(shard: Shard) -> None:
    batch = dispatch_batch(
        10,
        Request(Kind.SET, 1, b"k", b"v1", ttl_ms=1000),
        Request(Kind.GET, 2, b"k"),
        Request(Kind.DEL, 3, b"k"),
        Request(Kind.GET, 4, b"k"),
        Request(Kind.SET, 5, b"other", b""),
    )
    [frames] = shard.handle_batch([batch])
    reply = answers(frames)
    assert reply.token == 10 and shard.last_token == 10
    assert [(r.request_id, r.token, r.status) for r in reply.replies] == [
        (1, 10, Status.OK),
        (2, 10, Status.OK),
        (3, 10, Status.OK),
        (4, 10, Status.NOT_FOUND),
        (5, 10, Status.OK),
    ]
    assert reply.replies[0].deadline_ms == START_MS + 1000
    assert (reply.replies[1].body, reply.replies[1].deadline_ms) == (b"v1", START_MS + 1000)
    assert shard.store.get(b"other") == (b"", None)


def test_batches_and_single_dispatches_mix_in_one_pass(shard: Shard) -> None:
    single = Dispatch(5, Request(Kind.SET, 1, b"a", b"1"))
    batch = dispatch_batch(6, Request(Kind.GET, 2, b"a"), Request(Kind.SET, 3, b"b", b"2"))
    later = Dispatch(7, Request(Kind.GET, 4, b"b"))
    first, second, third = shard.handle_batch([single, batch, later])
    assert isinstance(first, Reply) and first.status == Status.OK
    assert [r.body for r in answers(second).replies] == [b"1", None]
    assert isinstance(third, Reply) and third.body == b"2"


def test_a_stale_batch_is_refused_whole_and_changes_nothing(shard: Shard) -> None:
    shard.handle(Dispatch(7, Request(Kind.SET, 1, b"k", b"current")))
    [frames] = shard.handle_batch(
        [dispatch_batch(7, Request(Kind.SET, 2, b"k", b"stale"), Request(Kind.DEL, 3, b"k"))]
    )
    reply = answers(frames)
    assert [(r.request_id, r.status) for r in reply.replies] == [
        (2, Status.UNAVAILABLE),
        (3, Status.UNAVAILABLE),
    ]
    assert reply.replies[0].body == b"stale token 7: this shard already accepted 7"
    assert shard.store.get(b"k") == (b"current", None) and shard.last_token == 7


def test_a_retried_write_inside_a_batch_is_answered_from_memory(shard: Shard) -> None:
    [first] = shard.handle_batch([dispatch_batch(1, Request(Kind.SET, 7, b"k", b"v", 1000))])
    shard.handle(Dispatch(2, Request(Kind.SET, 8, b"k", b"newer write")))
    [retry] = shard.handle_batch(
        [dispatch_batch(3, Request(Kind.SET, 7, b"k", b"v", 1000), Request(Kind.DEL, 9, b"x"))]
    )
    assert answers(retry).replies[0] == Reply(
        Status.OK, 7, 3, answers(first).replies[0].deadline_ms
    )
    assert shard.store.get(b"k") == (b"newer write", None)


def test_a_malformed_request_in_a_batch_gets_its_own_error(shard: Shard) -> None:
    batch = DispatchBatch(
        4, [(Kind.SET, 1, b"k", b"v", None, None), (0, 2, b"unknown flags", None, None, None)]
    )
    [frames] = shard.handle_batch([batch])
    ok_, bad = answers(frames).replies
    assert ok_.status == Status.OK and shard.store.get(b"k") == (b"v", None)
    assert (bad.status, bad.body) == (Status.ERROR, b"malformed request: unknown flags")


def test_a_durable_batch_is_one_append_and_one_fsync(tmp_path) -> None:
    calls: list[int] = []
    durability = Durability(tmp_path / "data", FsyncPolicy.ALWAYS, fsync=calls.append)
    shard = take_shard(0, 5, None, durability, FakeClock()).shard
    calls.clear()
    batch = dispatch_batch(
        10, *(Request(Kind.SET, 100 + i, b"k%d" % i, b"v", 1000) for i in range(50))
    )
    sets, dels = shard.handle_batch([batch, dispatch_batch(11, Request(Kind.DEL, 1, b"k0"))])
    assert len(calls) == 1  # group commit: the whole pass is one fsync
    assert all(r.status == Status.OK for r in answers(sets).replies + answers(dels).replies)
    shard.close()
    # The idempotency memory came back from the log: the retries are recognised.
    again = take_shard(0, 6, None, durability, FakeClock()).shard
    assert len(again.store) == 49
    [retry] = again.handle_batch([dispatch_batch(20, Request(Kind.SET, 101, b"k1", b"v", 1000))])
    assert answers(retry).replies[0].status == Status.OK
    assert len(again.memory) == 51
    again.close()


@pytest.mark.parametrize("wire", [False, True], ids=["objects", "wire"])
def test_gets_before_the_first_write_are_answered_before_the_fsync(tmp_path, wire: bool) -> None:
    """A GET ahead of every write of its batch can only read what is on disk: it is handed to
    ``early`` at once. A GET after a write may read that write, so it waits for the fsync."""
    events: list[str] = []
    durability = Durability(
        tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: events.append("fsync")
    )
    shard = take_shard(0, 5, None, durability, FakeClock()).shard
    shard.handle_batch([Dispatch(10, Request(Kind.SET, 1, b"a", b"old", None))])
    events.clear()
    early: list[Reply] = []

    def answer_early(frames: list[bytes]) -> None:
        events.append("early")
        early.append(decode_reply(frames))

    dispatches = [
        Dispatch(11, Request(Kind.GET, 2, b"a")),
        Dispatch(12, Request(Kind.SET, 3, b"a", b"new", None)),
        Dispatch(13, Request(Kind.GET, 4, b"a")),
    ]
    answered = shard.handle_batch(
        [from_the_wire(d) if wire else d for d in dispatches], answer_early
    )
    assert events == ["early", "fsync"]
    assert [(r.request_id, r.body) for r in early] == [(2, b"old")]
    assert answered[0] is None
    last = answered[2]
    assert (decode_reply(last) if wire else last).body == b"new"  # type: ignore[arg-type, union-attr]
    shard.close()


def test_lone_writes_are_logged_once_each_under_one_fsync_and_retries_survive(tmp_path) -> None:
    """Lone SETs and DELs, as the worker decodes them: one log record each, all of a pass
    appended before its one fsync; a successor replaying the log answers a retried SET from
    memory, with the original deadline, without applying it again."""
    events: list[str] = []
    durability = Durability(
        tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: events.append("fsync")
    )
    clock = FakeClock()
    shard = take_shard(0, 5, None, durability, clock).shard
    log_path = shard.files.log_path  # type: ignore[union-attr]
    events.clear()
    requests = [
        Request(Kind.SET, 7, b"k", b"v", 1000),
        Request(Kind.SET, 8, b"gone", b"x", None),
        Request(Kind.DEL, 9, b"gone"),
        Request(Kind.DEL, 10, b"never there"),  # NOT_FOUND: nothing changed, its reply logged
    ]
    messages = [from_the_wire(Dispatch(10 + i, r)) for i, r in enumerate(requests)]
    replies = [decode_reply(a) for a in shard.handle_batch(messages)]  # type: ignore[arg-type]
    assert [(r.request_id, r.token, r.status) for r in replies] == [
        (7, 10, Status.OK),
        (8, 11, Status.OK),
        (9, 12, Status.OK),
        (10, 13, Status.NOT_FOUND),
    ]
    assert replies[0].deadline_ms == START_MS + 1000
    assert events == ["fsync"]
    shard.close()
    with aof.LogReader(log_path) as reader:
        assert [record for _, record in reader.records()] == [
            aof.TimeRecord(START_MS),  # the clock's high-water mark, first in a new log
            aof.SetRecord(7, b"k", b"v", START_MS + 1000, START_MS * 1000),
            aof.SetRecord(8, b"gone", b"x", None, START_MS * 1000 + 1),
            aof.DelRecord(9, b"gone", START_MS * 1000 + 2),
            aof.MemoRecord(10, Kind.DEL, Status.NOT_FOUND, None, 0, b"never there"),
        ]
    clock.advance(10)
    again = take_shard(0, 6, None, durability, clock).shard
    again.handle_batch([from_the_wire(Dispatch(20, Request(Kind.SET, 70, b"k", b"newer")))])
    [retry] = again.handle_batch(
        [from_the_wire(Dispatch(21, Request(Kind.SET, 7, b"k", b"v", 1000)))]
    )
    assert decode_reply(retry) == Reply(Status.OK, 7, 21, START_MS + 1000)  # type: ignore[arg-type]
    assert again.store.get(b"k") == (b"newer", None)
    again.close()


# --- bounded replies (MAX_REPLY_BYTES, MAX_LIST_KEYS) -----------------------------------------


class OneValueStore(TTLStore):
    """A store whose every key holds the same 1 MiB value, without a MiB per key: the fake
    that lets a unit test ask for a gigabyte of replies."""

    VALUE = b"v" * (1 << 20)

    def get(self, key: bytes) -> tuple[bytes, int | None]:
        self.reads = getattr(self, "reads", 0) + 1
        return self.VALUE, None


def test_a_batch_of_gets_past_the_reply_bound_is_answered_busy_not_built(clock: FakeClock) -> None:
    # 1,000 GETs of a 1 MiB value asked for a gigabyte of reply; the shard builds at most
    # MAX_REPLY_BYTES of values and answers the rest BUSY without reading them.
    store = OneValueStore(clock)
    shard = Shard(0, store)
    requests = [Request(Kind.GET, i, b"k%d" % i) for i in range(1, 1001)]
    [frames] = shard.handle_batch([dispatch_batch(1, *requests)])
    assert sum(map(len, frames)) < MAX_REPLY_BYTES + 1_000 * 100
    replies = answers(frames).replies
    fit = MAX_REPLY_BYTES // len(OneValueStore.VALUE)
    assert [r.status for r in replies] == [Status.OK] * fit + [Status.BUSY] * (1000 - fit)
    assert replies[0].body == OneValueStore.VALUE
    busy = replies[-1].body
    assert busy is not None and busy.startswith(REPLY_TOO_LARGE.encode())
    assert b"fetch fewer keys per batch" in busy
    assert store.reads == fit + 1  # decided before reading: one value read past the bound


LONE_GETS = 1_000  # lone GET dispatches of a 1 MiB value in one pass: a gigabyte asked for


def _statuses(answered: list[object], early: list[list[bytes]]) -> list[Status]:
    """The statuses of lone GET replies, those handed to ``early`` first, then the others."""
    frames = early + [a for a in answered if a is not None]
    return [decode_reply(f).status for f in frames]  # type: ignore[arg-type]


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable-early"])
def test_many_lone_gets_in_one_pass_build_at_most_the_reply_bound(
    tmp_path: Path, clock: FakeClock, durable: bool
) -> None:
    # The worker hands one handle_batch call every message of a pass (up to 8,192 requests):
    # each lone GET's reply was bounded by its own value, but not the call, which read and held
    # 1,000 copies of a 1 MiB value before one was sent. Now the call's GET values together
    # fit in MAX_REPLY_BYTES and the rest are BUSY without being read, whether the replies are
    # returned or handed to ``early`` (a durable shard's GETs before any write).
    store = OneValueStore(clock)
    shard = Shard(0, store)
    if durable:
        durability = Durability(tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: None)
        shard = take_shard(0, 5, None, durability, clock).shard
        shard.store = store
    gets = [
        from_the_wire(Dispatch(10 + i, Request(Kind.GET, 1 + i, b"k%d" % i)))
        for i in range(LONE_GETS)
    ]
    early: list[list[bytes]] = []
    answered = shard.handle_batch(gets, early.append if durable else None)
    fit = MAX_REPLY_BYTES // len(OneValueStore.VALUE)
    statuses = _statuses(answered, early)
    assert statuses.count(Status.OK) == fit
    assert statuses.count(Status.BUSY) == LONE_GETS - fit
    assert store.reads == fit + 1  # decided before reading: one value read past the bound
    # The bound is per call: the next pass serves again.
    [again] = shard.handle_batch([from_the_wire(Dispatch(5_000, Request(Kind.GET, 9, b"k")))])
    assert decode_reply(again).status == Status.OK  # type: ignore[arg-type]
    shard.close()


def test_many_batches_in_one_pass_share_the_reply_bound(clock: FakeClock) -> None:
    # 100 BATCH_DISPATCHes of 10 GETs of a 1 MiB value, each well within the bound alone: in
    # one call they asked for 1,000 MiB. Their values together fit in MAX_REPLY_BYTES.
    store = OneValueStore(clock)
    shard = Shard(0, store)
    batches = [
        dispatch_batch(1 + b, *(Request(Kind.GET, 1 + b * 10 + i, b"k") for i in range(10)))
        for b in range(100)
    ]
    answered = shard.handle_batch(batches)
    built = sum(len(frame) for frames in answered for frame in frames)  # type: ignore[union-attr]
    assert built < MAX_REPLY_BYTES + 1_000 * 100
    statuses = [r.status for frames in answered for r in answers(frames).replies]
    fit = MAX_REPLY_BYTES // len(OneValueStore.VALUE)
    assert statuses == [Status.OK] * fit + [Status.BUSY] * (1_000 - fit)
    assert store.reads == fit + 1


def test_lone_and_batched_gets_of_one_pass_share_the_reply_bound(
    shard: Shard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_module, "MAX_REPLY_BYTES", 10)
    shard.store.set(b"a", b"123456", None)
    lone = from_the_wire(Dispatch(1, Request(Kind.GET, 1, b"a")))
    batch = dispatch_batch(2, Request(Kind.GET, 2, b"a"), Request(Kind.SET, 3, b"b", b"x"))
    after = Dispatch(3, Request(Kind.GET, 4, b"missing"))  # not read: past the bound
    first, second, third = shard.handle_batch([lone, batch, after])
    assert decode_reply(first).status == Status.OK  # type: ignore[arg-type]
    assert [r.status for r in answers(second).replies] == [Status.BUSY, Status.OK]
    assert isinstance(third, Reply) and third.status == Status.BUSY
    assert third.body is not None and third.body.startswith(REPLY_TOO_LARGE.encode())


def test_gets_past_the_bound_are_busy_while_writes_in_the_batch_still_apply(
    shard: Shard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_module, "MAX_REPLY_BYTES", 10)
    shard.store.set(b"a", b"123456", None)
    batch = dispatch_batch(
        1,
        Request(Kind.GET, 1, b"a"),
        Request(Kind.GET, 2, b"a"),
        Request(Kind.SET, 3, b"b", b"x"),
        Request(Kind.GET, 4, b"missing"),
    )
    [frames] = shard.handle_batch([batch])
    assert [r.status for r in answers(frames).replies] == [
        Status.OK,
        Status.BUSY,
        Status.OK,
        Status.BUSY,
    ]
    assert shard.store.get(b"b") == (b"x", None)


def test_all_past_the_key_bound_is_an_error_that_says_to_page(driver: Driver, shard: Shard) -> None:
    for i in range(MAX_LIST_KEYS + 1):
        shard.store.set(b"k%06d" % i, b"", None)
    reply = driver.send(Kind.ALL)
    assert reply.status == Status.ERROR
    assert reply.body is not None and reply.body.startswith(REPLY_TOO_LARGE.encode())
    too_many = driver.send(Kind.ALL, limit=MAX_LIST_KEYS + 1)
    assert too_many.status == Status.ERROR
    page = driver.send(Kind.ALL, b"k000099", limit=MAX_LIST_KEYS, keys_only=True)
    assert page.status == Status.OK and page.body is not None
    keys = [e.key for e in decode_entries(page.body)]
    assert keys == [b"k%06d" % i for i in range(100, MAX_LIST_KEYS + 1)]


def test_all_past_the_byte_bound_is_an_error(
    driver: Driver, shard: Shard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_module, "MAX_REPLY_BYTES", 100)
    shard.store.set(b"a", b"x" * 60, None)
    shard.store.set(b"b", b"x" * 60, None)
    reply = driver.send(Kind.ALL, limit=2)
    assert reply.status == Status.ERROR
    assert reply.body is not None and REPLY_TOO_LARGE.encode() in reply.body
    assert driver.send(Kind.ALL, limit=1).status == Status.OK
    assert driver.send(Kind.ALL, limit=2, keys_only=True).status == Status.OK


BIG_LISTING = 20 << 20  # bytes of one key's value: ALLs of it fill a pass's budget in 4


def test_alls_share_the_pass_reply_budget_with_gets(clock: FakeClock) -> None:
    # A flood of ALLs made each worker encode up to MAX_REPLY_BYTES per ALL on its only loop,
    # several in one pass, and miss its heartbeats. Now an ALL's entries come out of the same
    # budget as GET values: one that does not fit in what is left of it is BUSY (retry later),
    # not built; one that fits a whole budget is served as the first of a pass.
    store = OneValueStore(clock)
    store.set(b"big", b"b" * BIG_LISTING, None)
    shard = Shard(0, store)
    tokens = itertools.count(10)

    def listing() -> Message:
        return from_the_wire(Dispatch(next(tokens), Request(Kind.ALL, 7)))

    def gets(count: int) -> list[Message]:
        return [
            from_the_wire(Dispatch(next(tokens), Request(Kind.GET, 1 + i, b"k%d" % i)))
            for i in range(count)
        ]

    replies = shard.handle_batch([listing() for _ in range(10)])
    assert all(isinstance(r, Reply) for r in replies)
    fit = MAX_REPLY_BYTES // (BIG_LISTING + 17)  # 14 bytes of lengths and deadline, the key
    assert [r.status for r in replies] == [Status.OK] * fit + [Status.BUSY] * (10 - fit)  # type: ignore[union-attr]
    assert [e.key for e in decode_entries(replies[0].body or b"")] == [b"big"]  # type: ignore[union-attr]
    busy = replies[-1].body  # type: ignore[union-attr]
    assert busy is not None and b"retry later" in busy
    # GETs first: 60 MiB of values leave too little for the listing, which is BUSY.
    *got, listed = shard.handle_batch([*gets(60), listing()])
    assert {decode_reply(g).status for g in got} == {Status.OK}  # type: ignore[arg-type]
    assert isinstance(listed, Reply) and listed.status == Status.BUSY
    # The next pass has a whole budget: the ALL is served, and GETs after it share what is left.
    listed, *got = shard.handle_batch([listing(), *gets(50)])
    assert isinstance(listed, Reply) and listed.status == Status.OK
    statuses = [decode_reply(g).status for g in got]  # type: ignore[arg-type]
    left = (MAX_REPLY_BYTES - len(listed.body or b"")) // len(OneValueStore.VALUE)
    assert statuses == [Status.OK] * left + [Status.BUSY] * (50 - left)


def _one(shard: Shard, token: int, request: Request) -> Reply:
    [answer] = shard.handle_batch([from_the_wire(Dispatch(token, request))])
    return decode_reply(answer)  # type: ignore[arg-type]


@pytest.mark.parametrize("seen_by", ["get-and-del", "expiry-pass", "early-get"])
def test_a_key_once_gone_stays_gone_when_the_clock_steps_back_and_the_log_is_replayed(
    tmp_path: Path, seen_by: str
) -> None:
    # Issue 10, item 10: SET with a 10 s TTL; 11 s later GET and DEL say NOT_FOUND; the clock
    # steps back 60 s and the shard is replayed: the value must not be served again.
    durability = Durability(tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: None)
    clock = FakeClock()
    shard = take_shard(0, 5, None, durability, clock).shard
    assert _one(shard, 10, Request(Kind.SET, 7, b"k", b"v", 10_000)).status == Status.OK
    clock.advance(1_500)
    _one(shard, 11, Request(Kind.SET, 8, b"other", b"w"))  # a later batch: a TIME record
    clock.advance(9_500)  # 11 s after the SET
    if seen_by == "get-and-del":
        assert _one(shard, 12, Request(Kind.GET, 9, b"k")).status == Status.NOT_FOUND
        assert _one(shard, 13, Request(Kind.DEL, 10, b"k")).status == Status.NOT_FOUND
    elif seen_by == "expiry-pass":
        assert shard.store.expire(100) == 1
        assert _one(shard, 12, Request(Kind.GET, 9, b"k")).status == Status.NOT_FOUND
    else:  # a GET alone, which may be answered before the batch's write and fsync
        sent: list[list[bytes]] = []
        answers = shard.handle_batch(
            [from_the_wire(Dispatch(12, Request(Kind.GET, 9, b"k")))], early=sent.append
        )
        [frames] = sent or [a for a in answers if a is not None]
        assert decode_reply(frames).status == Status.NOT_FOUND  # type: ignore[arg-type]
        assert not sent  # it saw the key expire: its reply waited for the TIME record
    shard.close()
    clock.advance(-60_000)
    again = take_shard(0, 6, None, durability, clock).shard
    assert _one(again, 20, Request(Kind.GET, 30, b"k")).status == Status.NOT_FOUND
    assert _one(again, 21, Request(Kind.GET, 31, b"other")).status == Status.OK
    again.close()


@pytest.mark.parametrize("compact", [False, True], ids=["log", "compacted"])
def test_replayed_entries_keep_their_time_through_a_restart(tmp_path: Path, compact: bool) -> None:
    durability = Durability(tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: None)
    clock = FakeClock()
    shard = take_shard(0, 5, None, durability, clock).shard
    _one(shard, 10, Request(Kind.SET, 7, b"k", b"v1"))
    _one(shard, 11, Request(Kind.DEL, 8, b"k"))
    if compact:
        assert shard.files is not None
        shard.files.start_rewrite(shard.store, shard.memory)
        assert shard.files.wait_rewrite(5.0)
        shard.tick()
    shard.close()
    clock.advance(20_000)  # inside the window: the retry is answered from memory
    again = take_shard(0, 6, None, durability, clock).shard
    assert _one(again, 20, Request(Kind.SET, 7, b"k", b"v1")).status == Status.OK
    assert _one(again, 21, Request(Kind.GET, 30, b"k")).status == Status.NOT_FOUND
    again.close()
    clock.advance(20_000)  # 40 s after the write: past the window, by the time in the log
    last = take_shard(0, 7, None, durability, clock).shard
    _one(last, 22, Request(Kind.GET, 31, b"k"))  # a batch: the memory learns the time
    assert not last.memory.known(7) and not last.memory.known(8)
    last.close()
