"""The broker core with the issue-12 commands: routing of the new keyed kinds (alone and in
batches, per-key tokens, retries, admission), lock waits (broker/locks.py through
broker/core.py), and hostile frames. Scripted histories with a fake clock and a fake wall
clock (lock deadlines in replies are wall-clock ms); no sockets."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from broker.core import CLAIM_WINDOW_HEARTBEATS, Broker, BrokerConfig, Side
from tests.unit.test_broker_core import (
    CLIENT,
    CONFIG,
    Harness,
    batch_dispatches,
    by_client,
    key_for,
    send_batch,
)
from zkv.hashing import key_shard
from zkv.protocol import (
    MAX_LOCK_WAIT_MS,
    BatchReply,
    Dispatch,
    DispatchBatch,
    Kind,
    Ready,
    Reply,
    Request,
    Status,
    batch_frames,
    decode_from_broker,
    decode_reply,
    encode_batch_reply,
    encode_control,
    encode_reply,
    encode_request,
    request_record,
    stamp_of,
)

pytestmark = pytest.mark.unit

WALL_S = 1_800_000_000.0  # the fake wall clock's start (Unix seconds)
OTHER = b"client-2"


class LockHarness(Harness):
    """:class:`Harness` whose broker reads a fake wall clock that moves with ``now``."""

    def __init__(self, config: BrokerConfig = CONFIG) -> None:
        self.now = 0.0
        self.wall_s = WALL_S
        self.broker = Broker(config, self.now, epoch=100, wall=lambda: self.wall_s)
        self.advance(CLAIM_WINDOW_HEARTBEATS * config.heartbeat_interval_s)

    def advance(self, seconds: float, silent: tuple[bytes, ...] = ()) -> None:
        self.wall_s += seconds
        super().advance(seconds, silent)

    def wall_ms(self, after_s: float = 0.0) -> int:
        return round((self.wall_s + after_s) * 1000)

    def one_dispatch(self) -> tuple[bytes, Dispatch]:
        [(worker, dispatch, _)] = self.dispatched()
        return worker, dispatch

    def reply(self, worker: bytes, dispatch: Dispatch, status: Status, **fields: object) -> None:
        reply = Reply(status, dispatch.request.request_id, dispatch.token, **fields)  # type: ignore[arg-type]
        self.answer(worker, dispatch, reply)

    def stats(self) -> dict:
        return json.loads(self.broker.stats(self.now))["broker"]


@pytest.fixture
def h() -> LockHarness:
    harness = LockHarness()
    assert harness.register(b"w0").shard == 0
    assert harness.register(b"w1").shard == 1
    return harness


NAME = key_for(1, "lock")


def lock(request_id: int, wait_ms: int = 0, ttl_ms: int = 10_000, **fields: object) -> Request:
    return Request(Kind.LOCK, request_id, NAME, ttl_ms=ttl_ms, wait_ms=wait_ms, **fields)  # type: ignore[arg-type]


def unlock(request_id: int, token: int) -> Request:
    return Request(Kind.UNLOCK, request_id, NAME, token=token)


# --- routing of the new kinds ---------------------------------------------------------------

NEW_KINDS = [
    Request(Kind.INCR, 11, b"counter", by=-5, ttl_ms=1000),
    Request(Kind.EXPIRE, 12, b"session", ttl_ms=2000),
    Request(Kind.EXPIRE, 13, b"session"),  # persist
    Request(Kind.LOCK, 14, b"lock", ttl_ms=1000),
    Request(Kind.REFRESH, 15, b"lock", ttl_ms=1000, token=7),
    Request(Kind.UNLOCK, 16, b"lock", token=7),
    Request(Kind.FENCE_CHECK, 17, b"lock", token=7),
    Request(Kind.GET, 18, b"session", ttl_ms=5000),  # a touch
    Request(Kind.SET, 19, b"k", b"v", nx=True, return_old=True),
    Request(Kind.SET, 20, b"k", b"v", xx=True, if_version=3, fence=(b"lock", 9)),
    Request(Kind.DEL, 21, b"k", if_version=4, versioned=True),
]


@pytest.mark.parametrize("request_", NEW_KINDS, ids=lambda r: f"{r.kind.name}-{r.request_id}")
def test_each_new_request_alone_goes_to_its_keys_shard_and_its_reply_back(
    h: LockHarness, request_: Request
) -> None:
    h.send(request_)
    worker, dispatch = h.one_dispatch()
    assert worker == b"w%d" % key_shard(request_.key, CONFIG.shards)
    assert dispatch.request == request_
    h.reply(worker, dispatch, Status.OK, deadline_ms=123, body=b"\x00" * 8)
    [reply] = h.replies()
    assert (reply.status, reply.request_id, reply.deadline_ms) == (
        Status.OK,
        request_.request_id,
        123,
    )
    assert not h.broker._by_request and h.broker.held_ops == 0


def test_the_new_requests_travel_in_one_batch_dispatch_per_shard(h: LockHarness) -> None:
    send_batch(h, NEW_KINDS)
    sent = batch_dispatches(h)
    ids = sorted(op[1] for _, run, _ in sent for op in run.ops)
    assert ids == [r.request_id for r in NEW_KINDS]
    for worker, run, _ in sent:
        replies = tuple(Reply(Status.OK, op[1], run.token) for op in run.ops)
        h.broker.on_worker([worker, *encode_batch_reply(BatchReply(run.token, replies))], h.now)
    answered = by_client(h)[CLIENT]
    assert sorted(r.request_id for r in answered) == ids
    assert not h.broker._by_request and h.broker.held_ops == 0


def test_new_writes_of_one_key_wait_for_its_token_in_order(h: LockHarness) -> None:
    h.send(Request(Kind.INCR, 1, b"n", by=1))
    h.send(Request(Kind.EXPIRE, 2, b"n", ttl_ms=5))
    h.send(Request(Kind.INCR, 3, b"n", by=2))
    worker, first = h.one_dispatch()
    assert first.request.request_id == 1  # the others wait for the key's token
    h.reply(worker, first, Status.OK)
    out = h.take()
    run = decode_from_broker(out[-1][1][1:])
    assert isinstance(run, DispatchBatch) and [op[1] for op in run.ops] == [2, 3]


def test_a_retried_incr_is_merged_but_one_with_another_amount_is_another_write(
    h: LockHarness,
) -> None:
    """An INCR is a write: a resend with the same id, key and amount runs once, as a SET's
    would; the same id with another amount is another request (the old broker merged any
    two non-SET requests with the same id, kind and key: the second INCR was lost)."""
    h.send(Request(Kind.INCR, 5, b"n", by=1))
    h.send(Request(Kind.INCR, 5, b"n", by=1), client=OTHER)  # a retry, on a fresh socket
    worker, first = h.one_dispatch()
    h.send(Request(Kind.INCR, 5, b"n", by=2))  # same id, another amount: another write
    assert h.take() == []  # waits for the key's token behind the first
    h.reply(worker, first, Status.OK)
    out = h.take()
    assert [frames[0] for side, frames in out if side is Side.FRONTEND] == [OTHER]
    [(_side, frames)] = [item for item in out if item[0] is Side.BACKEND]
    second = decode_from_broker(frames[1:])
    assert isinstance(second, Dispatch) and second.request.by == 2


@pytest.mark.parametrize(
    ("first", "other", "retry"),
    [
        # the TTL of the issue-12 commands is compared, as the worker's memory does
        (Request(Kind.EXPIRE, 5, b"n", ttl_ms=1000), Request(Kind.EXPIRE, 5, b"n", ttl_ms=2000), 0),
        (Request(Kind.EXPIRE, 5, b"n", ttl_ms=1000), Request(Kind.EXPIRE, 5, b"n"), 0),
        (lock(5), lock(5, ttl_ms=99), 0),
        (
            Request(Kind.REFRESH, 5, b"n", ttl_ms=9, token=1),
            Request(Kind.REFRESH, 5, b"n", ttl_ms=9, token=2),
            0,
        ),
        (Request(Kind.GET, 5, b"n"), Request(Kind.GET, 5, b"n", ttl_ms=10), 0),
        # a SET's condition or fence, a DEL's, a LOCK's wait are not (nor at the worker)
        (Request(Kind.SET, 5, b"n", b"v", nx=True), Request(Kind.SET, 5, b"n", b"v", xx=True), 1),
        (Request(Kind.DEL, 5, b"n"), Request(Kind.DEL, 5, b"n", fence=(b"l", 3)), 1),
        (lock(5, wait_ms=10), lock(5, wait_ms=20), 1),
    ],
    ids=lambda r: r.kind.name if isinstance(r, Request) else str(r),
)
def test_a_request_reusing_an_id_is_merged_exactly_when_the_worker_would_recall_it(
    h: LockHarness, first: Request, other: Request, retry: int
) -> None:
    """The worker's idempotency memory tells a retry by id, kind, key and a fingerprint
    (workers/shard.py: the amount, token and TTL of the issue-12 commands); the broker must
    merge the same pairs, or a request merged away here would have been applied there."""
    h.send(first)
    h.send(first, client=OTHER)  # a retry
    h.send(other)
    worker, dispatch = h.one_dispatch()  # the others wait for the key's token, or merged
    h.reply(worker, dispatch, Status.OK)
    out = h.take()
    if retry:
        assert [f[0] for side, f in out if side is Side.FRONTEND] == [CLIENT]
        assert [side for side, _ in out] == [Side.FRONTEND]
        return
    assert [f[0] for side, f in out if side is Side.FRONTEND] == [OTHER]
    [(_, frames)] = [item for item in out if item[0] is Side.BACKEND]
    assert decode_from_broker(frames[1:]).request == other


def test_a_touching_get_is_a_write_never_refused_busy_for_a_client_not_reading(
    h: LockHarness,
) -> None:
    """A GET whose value is not sent to a client that does not read is answered BUSY ("not
    applied"): true of a read, false of a touch, which moved the deadline."""
    h.send(Request(Kind.GET, 1, b"s", ttl_ms=1000))
    h.send(Request(Kind.GET, 2, b"t"))
    sent = h.dispatched()
    ledger = h.broker.ledger(CLIENT)
    ledger.untracked = CONFIG.max_client_bytes  # replies queued to it reached its limit
    h.broker.queued_bytes = 1
    for worker, dispatch, _ in sent:
        h.reply(worker, dispatch, Status.OK, body=b"value")
    replies = {r.request_id: r.status for r in h.replies()}
    assert replies == {1: Status.OK, 2: Status.BUSY}


def test_new_requests_count_against_the_admission_limits(h: LockHarness) -> None:
    import dataclasses

    broker = LockHarness(dataclasses.replace(CONFIG, max_client_ops=1))
    broker.register(b"w0")
    broker.register(b"w1")
    broker.send(Request(Kind.INCR, 1, b"a", by=1))
    broker.send(lock(2, wait_ms=1000))
    out = broker.take()
    busy = [decode_reply(f[1:]) for side, f in out if side is Side.FRONTEND]
    assert [(r.request_id, r.status) for r in busy] == [(2, Status.BUSY)]


@pytest.mark.parametrize(
    "frames",
    [
        # LOCK waiting longer than the limit
        [
            *encode_request(Request(Kind.LOCK, 1, b"l", ttl_ms=10))[:1],
            (MAX_LOCK_WAIT_MS + 1).to_bytes(4, "big"),
        ],
        # LOCK value of the wrong size
        [*encode_request(Request(Kind.LOCK, 2, b"l", ttl_ms=10))[:1], b"\x00\x00\x01"],
        # LOCK without TTL
        [bytes([1, Kind.LOCK, 0, 0]) + (3).to_bytes(8, "big") + bytes(8) + b"l", bytes(4)],
        # INCR by of 7 bytes
        [*encode_request(Request(Kind.INCR, 4, b"n", by=1))[:1], bytes(7)],
        # SET NX and XX together
        [bytes([1, Kind.SET, 0x08 | 0x10, 0]) + (5).to_bytes(8, "big") + bytes(8) + b"k", b"v"],
        # EXT with an unknown extension bit, and a truncated fence
        [bytes([1, Kind.SET, 0x20, 0]) + (6).to_bytes(8, "big") + bytes(8) + b"k", b"\x80v"],
        [bytes([1, Kind.DEL, 0x20, 0]) + (7).to_bytes(8, "big") + bytes(8) + b"k", b"\x02\x00"],
        # a reserved key
        [encode_request(Request(Kind.GET, 8, b"k"))[0][:-1] + b"\x00lock"],
        # UNLOCK without a token, FENCE_CHECK with flags
        [bytes([1, Kind.UNLOCK, 0, 0]) + (9).to_bytes(8, "big") + bytes(8) + b"l"],
        [
            bytes([1, Kind.FENCE_CHECK, 0x01, 0]) + (10).to_bytes(8, "big") + bytes(8) + b"l",
            bytes(8),
        ],
    ],
)
def test_malformed_new_requests_get_an_error_and_leave_nothing_held(
    h: LockHarness, frames: list[bytes]
) -> None:
    h.broker.on_client([CLIENT, *frames], h.now)
    out = h.take()
    assert len(out) == 1 and out[0][0] is Side.FRONTEND
    assert decode_reply(out[0][1][1:]).status == Status.ERROR
    # the same records in a batch: each refused on its own, the batch's good one served
    records = []
    try:
        records.append(request_record(frames))
    except Exception:  # a header too short to cut a record from: nothing to batch
        pass
    if records:
        good = request_record(encode_request(Request(Kind.GET, 99, b"g")))
        h.broker.on_client([CLIENT, *batch_frames(1, [*records, good])], h.now)
        out = h.take()
        refused = [decode_from_batch(f) for side, f in out if side is Side.FRONTEND]
        assert [r.status for rs in refused for r in rs] == [Status.ERROR]
        assert [side for side, _ in out].count(Side.BACKEND) == 1
    assert h.broker.locks.count == 0


def decode_from_batch(frames: list[bytes]) -> list[Reply]:
    from zkv.protocol import decode_batch_reply

    return list(decode_batch_reply(frames[1:]).replies)


# --- lock waits -----------------------------------------------------------------------------


def conflict(h: LockHarness, worker: bytes, dispatch: Dispatch, expires_in_s: float) -> None:
    h.reply(worker, dispatch, Status.CONFLICT, deadline_ms=h.wall_ms(expires_in_s), body=b"held")


def test_a_waiting_lock_is_parked_on_conflict_and_sent_again_when_the_lock_is_released(
    h: LockHarness,
) -> None:
    h.send(lock(1, wait_ms=5000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, expires_in_s=10)
    assert h.take() == []  # not answered: it waits
    assert h.stats()["lock_waiters"] == 1
    h.send(unlock(2, token=41), client=OTHER)
    worker, release = h.one_dispatch()
    h.reply(worker, release, Status.OK)
    out = h.take()
    assert [(s, f[0]) for s, f in out] == [(Side.FRONTEND, OTHER), (Side.BACKEND, worker)]
    again = decode_from_broker(out[1][1][1:])
    assert isinstance(again, Dispatch) and again.request == lock(1, wait_ms=5000)
    h.reply(worker, again, Status.OK, deadline_ms=h.wall_ms(10), body=(42).to_bytes(8, "big"))
    [reply] = h.replies()
    assert (reply.status, reply.request_id, reply.body) == (Status.OK, 1, (42).to_bytes(8, "big"))
    assert h.stats()["lock_waiters"] == 0 and not h.broker._by_request and h.broker.held_ops == 0


def test_waiters_get_the_lock_in_arrival_order_and_newcomers_queue_behind(
    h: LockHarness,
) -> None:
    h.send(lock(1, wait_ms=60_000))
    h.send(lock(2, wait_ms=60_000), client=OTHER)
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 30)
    [(_, second, _)] = h.dispatched()  # the second had waited for the name's token
    conflict(h, worker, second, 30)
    h.send(lock(3, wait_ms=60_000))  # the queue is not empty: parked, never sent
    assert h.take() == [] and h.stats()["lock_waiters"] == 3
    order = []
    for n in range(3):
        h.send(unlock(10 + n, token=1))
        worker, release = h.one_dispatch()
        h.reply(worker, release, Status.OK)
        h.replies_and_dispatch = h.take()
        [(_side, frames)] = [item for item in h.replies_and_dispatch if item[0] is Side.BACKEND]
        woken = decode_from_broker(frames[1:])
        order.append(woken.request.request_id)
        h.reply(worker, woken, Status.OK, deadline_ms=h.wall_ms(30), body=bytes(8))
        h.take()
    assert order == [1, 2, 3]


def test_a_woken_waiter_refused_again_keeps_its_place(h: LockHarness) -> None:
    h.send(lock(1, wait_ms=60_000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 30)
    h.send(lock(2, wait_ms=60_000))
    assert h.take() == []  # parked behind 1
    h.send(unlock(9, token=1))
    worker, release = h.one_dispatch()
    h.reply(worker, release, Status.OK)
    [woken] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    assert woken.request.request_id == 1
    conflict(h, worker, woken, 30)  # someone else took it meanwhile
    assert h.take() == []
    h.send(unlock(10, token=1))
    worker, release = h.one_dispatch()
    h.reply(worker, release, Status.OK)
    [woken] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    assert woken.request.request_id == 1  # still first


def test_a_waiter_is_sent_again_when_the_holder_expires(h: LockHarness) -> None:
    h.send(lock(1, wait_ms=5000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, expires_in_s=0.5)
    h.advance(0.4)
    assert h.take() == []
    assert 0.0 < h.broker.next_timer(h.now) <= 0.1 + 1e-9
    h.advance(0.1)
    [(_, again, _)] = h.dispatched()
    assert again.request.request_id == 1


def test_a_refresh_of_the_holder_moves_the_waiters_next_try(h: LockHarness) -> None:
    h.send(lock(1, wait_ms=5000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, expires_in_s=0.5)
    h.send(Request(Kind.REFRESH, 2, NAME, ttl_ms=10_000, token=7), client=OTHER)
    worker, refresh = h.one_dispatch()
    h.reply(worker, refresh, Status.OK, deadline_ms=h.wall_ms(10), body=(7).to_bytes(8, "big"))
    assert [r.request_id for r in h.replies(OTHER)] == [2]
    h.advance(0.6)  # past the old expiry: not sent, the holder refreshed its lease
    assert h.take() == []
    h.advance(0.4)  # the recheck still comes
    [(_, again, _)] = h.dispatched()
    assert again.request.request_id == 1


def test_a_waiter_whose_wait_runs_out_gets_the_last_conflict(h: LockHarness) -> None:
    h.send(lock(1, wait_ms=1500))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, expires_in_s=60)
    h.advance(1.0)  # the recheck: sent again, refused again (a new holder, another expiry)
    [(_, again, _)] = h.dispatched()
    conflict(h, worker, again, expires_in_s=30)
    held_until = h.wall_ms(30)
    h.advance(0.49)
    assert h.take() == []
    h.advance(0.01)
    [reply] = h.replies()
    assert (reply.status, reply.request_id) == (Status.CONFLICT, 1)
    assert reply.deadline_ms == held_until
    assert not h.broker._by_request and h.broker.held_ops == 0 and h.broker.locks.count == 0


def test_a_lock_without_a_wait_is_answered_its_conflict_at_once(h: LockHarness) -> None:
    h.send(lock(1))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 10)
    [reply] = h.replies()
    assert reply.status == Status.CONFLICT and h.broker.locks.count == 0


def test_a_waiting_lock_in_a_batch_is_parked_and_answered_in_a_batch_reply(
    h: LockHarness,
) -> None:
    send_batch(h, [lock(1, wait_ms=5000), Request(Kind.SET, 2, NAME + b"x", b"v")])
    answers: dict[int, Reply] = {}
    for worker, run, _ in batch_dispatches(h) or []:
        replies = []
        for op in run.ops:
            if op[1] == 1:
                replies.append(Reply(Status.CONFLICT, 1, run.token, h.wall_ms(10), b"held"))
            else:
                replies.append(Reply(Status.OK, op[1], run.token))
        h.broker.on_worker(
            [worker, *encode_batch_reply(BatchReply(run.token, tuple(replies)))], h.now
        )
    for reply in by_client(h).get(CLIENT, []):
        answers[reply.request_id] = reply
    assert set(answers) <= {2} and h.broker.locks.count == 1
    h.send(unlock(3, token=5), client=OTHER)
    worker, release = h.one_dispatch()
    h.reply(worker, release, Status.OK)
    out = h.take()
    [woken] = [decode_from_broker(f[1:]) for s, f in out if s is Side.BACKEND]
    assert isinstance(woken, DispatchBatch) and [op[1] for op in woken.ops] == [1]
    reply_ = BatchReply(woken.token, (Reply(Status.OK, 1, woken.token, h.wall_ms(10), bytes(8)),))
    h.broker.on_worker([worker, *encode_batch_reply(reply_)], h.now)
    [got] = by_client(h)[CLIENT]
    assert (got.status, got.request_id) == (Status.OK, 1)


def test_waiters_past_the_bound_are_answered_busy(h: LockHarness) -> None:
    h.broker.locks.limit = 1
    h.send(lock(1, wait_ms=5000))
    worker, first = h.one_dispatch()
    h.send(lock(2, wait_ms=5000), client=OTHER)
    conflict(h, worker, first, 10)
    [(_, second, _)] = h.dispatched()
    conflict(h, worker, second, 10)
    [reply] = h.replies(OTHER)
    assert (reply.status, reply.request_id) == (Status.BUSY, 2)
    assert h.broker.locks.count == 1 and h.broker.held_ops == 1


def test_a_clients_retry_of_a_parked_lock_joins_it(h: LockHarness) -> None:
    h.send(lock(1, wait_ms=5000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 10)
    h.send(lock(1, wait_ms=5000), client=OTHER)  # Lazy Pirate: the same request, a new socket
    assert h.take() == [] and h.broker.locks.count == 1
    h.send(unlock(2, token=5))
    worker, release = h.one_dispatch()
    h.reply(worker, release, Status.OK)
    [woken] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    h.reply(worker, woken, Status.OK, deadline_ms=h.wall_ms(10), body=bytes(8))
    [reply] = h.replies(OTHER)  # answered on the socket the retry came from
    assert reply.request_id == 1


def test_a_stamped_waiter_is_stamped_anew_when_sent_again(h: LockHarness) -> None:
    """A worker refuses a stamped write first sent longer ago than its idempotency window;
    a wait may be longer, and every earlier attempt was refused (nothing applied)."""
    first_sent = stamp_of(h.wall_s)
    h.send(lock(1, wait_ms=60_000, stamp=first_sent))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 100)
    h.advance(40.0)  # 40 rechecks, each refused again
    for _ in range(200):
        sent = h.dispatched()
        if not sent:
            break
        for w, d, _ in sent:
            assert d.request.request_id == 1
            last = d
            conflict(h, w, d, 100)
    assert last.request.stamp == stamp_of(h.wall_s) != first_sent


def test_parked_locks_are_answered_unavailable_when_the_broker_stops(h: LockHarness) -> None:
    h.send(lock(1, wait_ms=5000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 10)
    h.send(Request(Kind.LOCK, 2, b"other", ttl_ms=10, wait_ms=5000), client=OTHER)
    worker2, second = h.one_dispatch()  # in flight when the broker begins to stop
    h.broker.begin_shutdown()
    [reply] = h.replies()
    assert (reply.status, reply.request_id) == (Status.UNAVAILABLE, 1)
    conflict(h, worker2, second, 10)  # refused while the broker stops: not parked either
    [reply] = h.replies(OTHER)
    assert (reply.status, reply.request_id) == (Status.UNAVAILABLE, 2)
    assert h.broker.idle() and h.broker.held_ops == 0 and h.broker.locks.count == 0


# --- hostile peers --------------------------------------------------------------------------

FUZZ_MESSAGES = 3000  # bounded: about a second


def test_mutated_new_requests_and_lying_workers_never_hurt_the_broker(h: LockHarness) -> None:
    """Valid issue-12 requests with random bytes flipped, cut or added, alone and in batches,
    and workers answering what was dispatched with random statuses (CONFLICT with any
    deadline, OK to LOCKs and UNLOCKs) or with garbage: no exception, every client message
    answered or dispatched, and once time passes every wait's end nothing is held."""
    rng = random.Random(12)
    seeds = [encode_request(r) for r in NEW_KINDS] + [
        encode_request(lock(30, wait_ms=2000, stamp=5)),
        encode_request(unlock(31, token=3)),
    ]
    statuses = [Status.OK, Status.CONFLICT, Status.NOT_FOUND, Status.PRECONDITION, Status.ERROR]

    def mutate(frames: list[bytes]) -> list[bytes]:
        out = []
        for frame in frames:
            data = bytearray(frame)
            for _ in range(rng.randrange(3)):
                choice = rng.randrange(3)
                if choice == 0 and data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                elif choice == 1 and data:
                    del data[rng.randrange(len(data)) :]
                else:
                    data += bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
            out.append(bytes(data))
        return out

    for n in range(FUZZ_MESSAGES):
        frames = mutate(rng.choice(seeds))
        if rng.random() < 0.3:
            records = []
            for _ in range(rng.randrange(1, 4)):
                try:
                    records.append(request_record(mutate(rng.choice(seeds))))
                except Exception:  # a header too short to cut: leave it out
                    continue
            if not records:
                continue
            frames = batch_frames(n, records)
        h.broker.on_client([b"c%d" % rng.randrange(4), *frames], h.now)
        for side, out in h.take():
            if side is Side.FRONTEND:
                continue
            worker, body = out[0], out[1:]
            message = decode_from_broker(body)
            if rng.random() < 0.05:  # a lying worker
                garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
                h.broker.on_worker([worker, garbage], h.now)
                continue
            if isinstance(message, Dispatch):
                reply = Reply(
                    rng.choice(statuses),
                    message.request.request_id,
                    message.token,
                    h.wall_ms(rng.uniform(-1, 3)) if rng.random() < 0.8 else None,
                    bytes(8),
                )
                h.broker.on_worker([worker, *encode_reply(reply)], h.now)
            elif isinstance(message, DispatchBatch):
                replies = tuple(
                    Reply(rng.choice(statuses), op[1], message.token, h.wall_ms(1), bytes(8))
                    for op in message.ops
                )
                h.broker.on_worker(
                    [worker, *encode_batch_reply(BatchReply(message.token, replies))], h.now
                )
        if n % 100 == 0:
            h.advance(0.05)
    # Every wait ends: parked LOCKs (a mutated wait_ms may reach MAX_LOCK_WAIT_MS), flights
    # whose reply was garbage (the worker timeout), keys' waiters. Redispatched waiters are
    # refused again as they come.
    for _ in range(MAX_LOCK_WAIT_MS // 500 + 20):
        h.advance(0.5)
        for side, out in h.take():
            if side is Side.BACKEND:
                message = decode_from_broker(out[1:])
                if isinstance(message, Dispatch):
                    reply = Reply(Status.CONFLICT, message.request.request_id, message.token)
                    h.broker.on_worker([out[0], *encode_reply(reply)], h.now)
                elif isinstance(message, DispatchBatch):
                    replies = tuple(
                        Reply(Status.CONFLICT, op[1], message.token) for op in message.ops
                    )
                    h.broker.on_worker(
                        [out[0], *encode_batch_reply(BatchReply(message.token, replies))], h.now
                    )
    assert h.broker.locks.count == 0
    assert h.broker.held_ops == 0 and h.broker.held_bytes == 0
    assert not h.broker._by_request and not h.broker._inflight


def test_a_batch_with_malformed_sub_requests_leaves_no_bytes_charged(h: LockHarness) -> None:
    """A malformed sub-request's bytes were charged with its batch and never refunded: each
    such batch leaked them from held_bytes for good (found by the fuzz above)."""
    good = request_record(encode_request(Request(Kind.GET, 1, b"g")))
    bad = bytearray(request_record(encode_request(Request(Kind.LOCK, 2, b"l", ttl_ms=5))))
    bad[-4:] = bytes(5)
    bad[4:8] = (5).to_bytes(4, "big")  # value_len 5: a LOCK's wait is 4 bytes
    h.broker.on_client([CLIENT, *batch_frames(1, [bytes(bad), good])], h.now)
    out = h.take()
    [(worker, frames)] = [(f[0], f[1:]) for side, f in out if side is Side.BACKEND]
    run = decode_from_broker(frames)
    assert isinstance(run, DispatchBatch)
    replies = tuple(Reply(Status.NOT_FOUND, op[1], run.token) for op in run.ops)
    h.broker.on_worker([worker, *encode_batch_reply(BatchReply(run.token, replies))], h.now)
    assert h.broker.held_ops == 0 and h.broker.held_bytes == 0


def test_in_cluster_mode_new_requests_and_woken_waiters_go_to_the_shards_leader() -> None:
    """Cluster mode routes by etcd's leaders: a waiter parked while one worker led goes, when
    woken, to the leader of that moment (a failover happened meanwhile)."""
    h = LockHarness(dataclasses.replace(CONFIG, cluster_mode=True))
    shard = key_shard(NAME, CONFIG.shards)
    for worker in (b"w-a", b"w-b"):
        h.broker.on_worker([worker, *encode_control(Ready(shard, 0))], h.now)
    h.broker.set_leaders({shard: b"w-a"}, h.now)
    h.take()
    h.send(Request(Kind.INCR, 1, NAME, by=3))
    worker, dispatch = h.one_dispatch()
    assert worker == b"w-a"
    h.reply(worker, dispatch, Status.OK)
    h.take()
    h.send(lock(2, wait_ms=10_000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 30)
    h.broker.set_leaders({shard: b"w-b"}, h.now)  # failover
    h.advance(1.0)  # the recheck
    [(worker, again, _)] = h.dispatched()
    assert worker == b"w-b" and again.request.request_id == 2


# --- what parked waiters cost (hostile test: 10,000 waiters with 60 KB names) ----------------

BIG_NAME = b"L" * 60_000
BIG_WAITERS = 100


def park_big_waiters(h: LockHarness, count: int, client: bytes = CLIENT) -> None:
    """One holder's CONFLICT, then ``count`` LOCKs with a 60 KB name parked behind it (each
    its own request, as decoded from its own message)."""
    h.send(Request(Kind.LOCK, 1, BIG_NAME, ttl_ms=10_000, wait_ms=5000), client=client)
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 100)
    for request_id in range(2, count + 1):
        h.send(Request(Kind.LOCK, request_id, BIG_NAME, ttl_ms=10_000, wait_ms=5000), client=client)
    assert h.take() == [] and h.broker.locks.count == count


def test_parked_waiters_are_charged_the_bytes_they_really_keep_and_leave_nothing() -> None:
    """The broker's held_bytes (what --max-pending-bytes bounds) covers what its parked LOCKs
    really keep, measured with tracemalloc; once every wait ran out nothing of them is kept."""
    import gc
    import tracemalloc

    roomy = dataclasses.replace(CONFIG, max_client_bytes=1 << 30, max_pending_bytes=1 << 30)
    h = LockHarness(roomy)
    h.register(b"w0")
    h.register(b"w1")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        park_big_waiters(h, BIG_WAITERS)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
        assert kept > BIG_WAITERS * len(BIG_NAME)
        assert h.broker.held_bytes >= kept * 0.9, (h.broker.held_bytes, kept)
        h.advance(6.0)  # every wait runs out: each answered its CONFLICT
        assert len(h.replies()) == BIG_WAITERS
        h.advance(2.0)  # the name's last recheck comes up (stale)
        assert h.take() == []
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    broker = h.broker
    assert broker.held_bytes == broker.held_ops == 0 and not broker._accounts
    assert not broker._by_request and not broker._by_identity
    waits = broker.locks
    assert waits.count == 0 and not waits._names and not waits.by_client
    assert not waits._give_ups and not waits._retries
    assert left < len(BIG_NAME), left  # not one name's worth kept


def test_parked_waiters_count_against_the_pending_bytes_limit() -> None:
    """Parked LOCKs' real bytes count against --max-pending-bytes: a new request is refused
    BUSY once they fill it (before: they were charged about half of what they keep)."""
    limit = 30 * 2 * len(BIG_NAME)  # 30 waiters' worth, charged right
    h = LockHarness(dataclasses.replace(CONFIG, max_client_bytes=1 << 30, max_pending_bytes=limit))
    h.register(b"w0")
    h.register(b"w1")
    statuses = []
    for request_id in range(1, 61):
        h.send(Request(Kind.LOCK, request_id, BIG_NAME, ttl_ms=10_000, wait_ms=5000))
        for side, frames in h.take():
            if side is Side.BACKEND:
                message = decode_from_broker(frames[1:])
                assert isinstance(message, Dispatch)
                conflict(h, frames[0], message, 100)
            else:
                statuses.append(decode_reply(frames[1:]).status)
    assert h.broker.locks.count <= 31
    assert statuses.count(Status.BUSY) >= 29
    assert h.broker.held_bytes <= limit + 2 * len(BIG_NAME)


def test_one_client_cannot_take_every_waiters_place(h: LockHarness) -> None:
    """MAX_CLIENT_LOCK_WAITERS per client socket: past it, that client's LOCKs are BUSY while
    another client's still park (the global MAX_LOCK_WAITERS alone let one client take all)."""
    from broker.locks import MAX_CLIENT_LOCK_WAITERS

    assert MAX_CLIENT_LOCK_WAITERS < h.broker.locks.limit
    h.broker.locks.client_limit = 3
    h.send(lock(1, wait_ms=5000))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 100)
    for request_id in (2, 3):
        h.send(lock(request_id, wait_ms=5000))
    assert h.take() == [] and h.broker.locks.count == 3
    h.send(lock(4, wait_ms=5000))
    [busy] = h.replies()
    assert (busy.status, busy.request_id) == (Status.BUSY, 4)
    assert b"per client 3" in busy.body
    h.send(lock(5, wait_ms=5000), client=OTHER)  # another client still gets a place
    assert h.take() == [] and h.broker.locks.count == 4
    assert h.broker.locks.by_client == {CLIENT: 3, OTHER: 1}
    h.advance(6.0)
    assert h.broker.locks.count == 0 and h.broker.locks.by_client == {}


def test_resends_of_a_parked_lock_restamped_on_fresh_sockets_merge_and_are_answered_once(
    h: LockHarness,
) -> None:
    """A waiting client resends its LOCK every attempt interval (zkv/calls.py), stamped anew,
    on a fresh socket: each resend merges with the parked waiter (not dispatched, not parked
    twice, not charged twice), and the one answer goes to the latest socket."""
    h.send(lock(1, wait_ms=60_000, stamp=stamp_of(h.wall_s)))
    worker, first = h.one_dispatch()
    conflict(h, worker, first, 100)
    h.send(lock(2, wait_ms=60_000, stamp=stamp_of(h.wall_s)), client=OTHER)  # parked on arrival
    held = (h.broker.held_ops, h.broker.held_bytes)
    for attempt in range(1, 6):
        h.advance(0.5)
        h.send(lock(1, wait_ms=60_000, stamp=stamp_of(h.wall_s)), client=b"fresh-%d" % attempt)
        h.send(lock(2, wait_ms=60_000, stamp=stamp_of(h.wall_s)), client=b"other-%d" % attempt)
        for w, d, _ in h.dispatched():  # the name's rechecks only: the oldest waiter, refused
            assert d.request.request_id == 1
            conflict(h, w, d, 100)
        assert h.broker.locks.count == 2 and (h.broker.held_ops, h.broker.held_bytes) == held
    h.send(unlock(3, token=5))
    worker, release = h.one_dispatch()
    h.reply(worker, release, Status.OK)
    [woken] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    assert woken.request.request_id == 1
    h.reply(worker, woken, Status.OK, deadline_ms=h.wall_ms(10), body=bytes(8))
    [reply] = h.replies(b"fresh-5")
    assert (reply.status, reply.request_id) == (Status.OK, 1)
    h.send(unlock(4, token=5))
    worker, release = h.one_dispatch()
    h.reply(worker, release, Status.OK)
    [woken] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    h.reply(worker, woken, Status.OK, deadline_ms=h.wall_ms(10), body=bytes(8))
    [reply] = h.replies(b"other-5")
    assert (reply.status, reply.request_id) == (Status.OK, 2)
    assert h.broker.locks.count == 0 and h.broker.held_ops == 0 and not h.broker._by_request
