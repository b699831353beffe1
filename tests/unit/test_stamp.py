"""Issue 10, item 1: a retry that arrives after the idempotency window is never applied.

A worker remembers writes for its window (workers/idempotency.py); a retry later than that
cannot be told from a new request by the worker alone. The client stamps every SET and DEL
with its first-send time (flag STAMPED, zkv/protocol.py), the same in every resend, and the
worker refuses a stamped write it does not remember whose stamp is older than the window
(UNAVAILABLE "outcome unknown", which the client raises as Timeout) or further in the future
than the clock skew allowed (ERROR). Everything here runs on injected clocks, no sockets.
"""

from __future__ import annotations

import itertools
import random
import struct

import pytest

from tests.fakes import START_MS, FakeClock
from workers.idempotency import DEFAULT_WINDOW_S, MAX_CLOCK_SKEW_S, RequestMemory, keep_ms
from workers.shard import Shard
from workers.store import Missing, TTLStore
from zkv import protocol
from zkv.calls import Calls, error
from zkv.errors import Timeout, Unavailable
from zkv.protocol import (
    OUTCOME_UNKNOWN,
    STAMP_MASK,
    STAMP_MODULUS,
    Dispatch,
    DispatchBatch,
    Kind,
    ProtocolError,
    Request,
    Status,
    decode_batch_reply,
    decode_from_broker,
    decode_reply,
    decode_request,
    dispatch_batch_frames,
    dispatch_frames,
    encode_request,
    pack_request,
    peek_keyed_dispatch,
    split_batch,
    stamp_age_ms,
    stamp_of,
    stamp_range,
)

pytestmark = pytest.mark.unit

GET, SET, DEL = int(Kind.GET), int(Kind.SET), int(Kind.DEL)
WINDOW_MS = round(DEFAULT_WINDOW_S * 1000)
SKEW_MS = round(MAX_CLOCK_SKEW_S * 1000)
NOW_S = START_MS // 1000  # the fake clocks' start, Unix seconds


# --- the worker -------------------------------------------------------------------------------


class Driver:
    """Delivers requests to a shard as the broker does: ever larger tokens; ``wire`` decodes
    each from its DISPATCH frames as the worker does (a plain tuple for GET, SET, DEL)."""

    def __init__(self, shard: Shard, wire: bool) -> None:
        self.shard = shard
        self.wire = wire
        self.tokens = itertools.count(1)

    def deliver(self, request: Request) -> protocol.Reply:
        dispatch = Dispatch(next(self.tokens), request)
        if not self.wire:
            return self.shard.handle(dispatch)
        keyed = peek_keyed_dispatch(dispatch_frames(dispatch.token, encode_request(request)))
        assert keyed is not None
        [answer] = self.shard.handle_batch([keyed])
        assert isinstance(answer, list)
        return decode_reply(answer)

    def batch(self, *requests: Request) -> list[protocol.Reply]:
        records = [
            pack_request(r.kind, r.request_id, r.key, r.value, r.ttl_ms, r.stamp) for r in requests
        ]
        message = decode_from_broker(dispatch_batch_frames(next(self.tokens), records))
        assert isinstance(message, DispatchBatch)
        [answer] = self.shard.handle_batch([message])
        assert isinstance(answer, list)
        return list(decode_batch_reply(answer).replies)


@pytest.fixture(params=["objects", "wire", "batch"])
def send(request: pytest.FixtureRequest, clock: FakeClock):
    """One request down one of the worker's three paths; returns its reply."""
    shard = Shard(0, TTLStore(clock))
    driver = Driver(shard, request.param == "wire")

    def deliver(req: Request) -> protocol.Reply:
        if request.param == "batch":
            [reply] = driver.batch(req)
            return reply
        return driver.deliver(req)

    deliver.shard = shard  # type: ignore[attr-defined]
    return deliver


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_stamped_write_older_than_the_window_is_refused_outcome_unknown(send, clock) -> None:
    shard = send.shard
    old = NOW_S - DEFAULT_WINDOW_S - 1  # first sent the window + 1 s ago, a clock in step
    for request in (
        Request(Kind.SET, 1, b"k", b"v", stamp=int(old)),
        Request(Kind.SET, 2, b"k", b"v", ttl_ms=5000, stamp=int(old)),
        Request(Kind.DEL, 3, b"gone", stamp=int(old)),
    ):
        reply = send(request)
        assert reply.status == Status.UNAVAILABLE, request
        assert (reply.body or b"").startswith(OUTCOME_UNKNOWN.encode())
        assert isinstance(error(reply.status, reply.body), Timeout)  # the client's view
    with pytest.raises(Missing):
        shard.store.get(b"k")  # not applied
    assert len(shard.memory) == 0  # nor remembered


def test_a_stamped_write_at_the_edges_of_the_window(send, clock) -> None:
    shard = send.shard
    clock.advance(999)  # mid-second: the stamp's rounding must not widen the window
    # Exactly the window ago (the stamp's second began the window + 0.999 s before): refused.
    window_s = round(DEFAULT_WINDOW_S)
    refused = send(Request(Kind.SET, 1, b"a", b"v", stamp=NOW_S - window_s))
    assert refused.status == Status.UNAVAILABLE
    assert send(Request(Kind.SET, 2, b"b", b"v", stamp=NOW_S - window_s + 1)).status == Status.OK
    # The clock skew allowed ahead (5 s): applied; further: ERROR, the client's clock is wrong.
    assert send(Request(Kind.SET, 3, b"c", b"v", stamp=NOW_S + 5)).status == Status.OK
    ahead = send(Request(Kind.SET, 4, b"d", b"v", stamp=NOW_S + 7))
    assert ahead.status == Status.ERROR and b"ahead" in (ahead.body or b"")
    assert sorted(e.key for e in shard.store.entries()) == [b"b", b"c"]
    # An unstamped request (an earlier client) is applied as before, whatever the time.
    assert send(Request(Kind.SET, 5, b"e", b"v")).status == Status.OK


def test_a_remembered_write_is_answered_from_memory_even_past_the_window(send, clock) -> None:
    shard = send.shard
    stamp = NOW_S
    assert send(Request(Kind.SET, 1, b"k", b"v1", stamp=stamp)).status == Status.OK
    clock.advance(WINDOW_MS + 3_000)  # past the window, still inside what is kept (+6 s)
    retry = send(Request(Kind.SET, 1, b"k", b"v1", stamp=stamp))
    assert retry.status == Status.OK  # the outcome is known: the memory answers
    assert shard.store.get(b"k")[0] == b"v1"


def test_stamps_wrap_around_without_a_wrong_answer(clock) -> None:
    """Stamps are Unix seconds mod 2**24: a worker whose clock sits just past a wrap reads a
    stamp from just before it as recent, and one 2**24 s off as the same second."""
    wrap_ms = (NOW_S // STAMP_MODULUS + 1) * STAMP_MODULUS * 1000
    assert stamp_age_ms(STAMP_MASK, wrap_ms + 500) == 1_500
    assert stamp_age_ms(0, wrap_ms + 500) == 500
    assert stamp_age_ms(3, wrap_ms) == -3_000
    low, span = stamp_range(wrap_ms + 500, WINDOW_MS, SKEW_MS)
    for seconds in range(-40, 10):
        stamp = (wrap_ms // 1000 + seconds) & STAMP_MASK
        age = stamp_age_ms(stamp, wrap_ms + 500)
        assert ((stamp - low) & STAMP_MASK <= span) == (-SKEW_MS <= age <= WINDOW_MS), seconds


def test_the_window_follows_the_memorys_setting(clock) -> None:
    memory = RequestMemory(keep_ms(5.0))
    shard = Shard(0, TTLStore(clock), memory=memory)
    driver = Driver(shard, wire=True)
    assert memory.window_ms == 5_000
    assert driver.deliver(Request(Kind.SET, 1, b"k", b"v", stamp=NOW_S - 4)).status == Status.OK
    late = driver.deliver(Request(Kind.SET, 2, b"k", b"v", stamp=NOW_S - 6))
    assert late.status == Status.UNAVAILABLE and b"window of 5 s" in (late.body or b"")


# --- the scenario, client and worker together --------------------------------------------


def test_a_set_retried_after_the_window_after_a_del_is_not_applied(clock) -> None:
    """SET k=v1 whose reply is lost, DEL k, then the SET's retry with its request id arrives
    after the window (the memory forgot it): k stays deleted and the caller gets Timeout,
    "outcome unknown", never k=v1 back."""
    wall = [clock() / 1000]
    ids = itertools.count(7)
    calls = Calls("tcp://broker:1", 60.0, 1.0, lambda n: [next(ids) for _ in range(n)], 0.0,
                  wall=lambda: wall[0])  # fmt: skip
    shard = Shard(0, TTLStore(clock))
    tokens = itertools.count(1)

    def to_worker(frames: list[bytes]) -> list[bytes]:
        _, subs = split_batch(frames)
        dispatch = decode_from_broker(dispatch_batch_frames(next(tokens), [s[3] for s in subs]))
        [answer] = shard.handle_batch([dispatch])
        assert isinstance(answer, list)
        return answer

    calls.add((SET, b"k", b"v1", None), "set", 0.0)
    first = calls.next_batch(100)
    assert first is not None
    calls.sent(first, 0.0)
    to_worker(first.frames)  # applied; its reply is lost
    assert shard.store.get(b"k")[0] == b"v1"
    delete = Driver(shard, wire=True)
    delete.tokens = tokens
    assert delete.deliver(Request(Kind.DEL, 99, b"k", stamp=NOW_S)).status == Status.OK

    clock.advance(keep_ms(DEFAULT_WINDOW_S) + 1_000)  # the memory forgets the SET
    wall[0] += 37.0
    shard.handle_batch([])  # a batch passes: the memory forgets what is older than keep_ms
    assert not shard.memory.known(first.request_ids[0])
    calls.resend(1.0)
    again = calls.next_batch(100)
    assert again is not None and again.request_ids == first.request_ids
    assert again.frames[1] == first.frames[1]  # the same record: the same stamp
    calls.sent(again, 1.0)
    [(handle, outcome)] = calls.receive(to_worker(again.frames), 1.0)
    assert handle == "set" and isinstance(outcome, Timeout)
    assert OUTCOME_UNKNOWN in str(outcome)
    with pytest.raises(Missing):
        shard.store.get(b"k")  # stays deleted


# --- the client -------------------------------------------------------------------------------


def test_every_resend_carries_the_stamp_of_the_first_send() -> None:
    wall = [1_700_000_123.9]
    ids = itertools.count(1)
    calls = Calls("tcp://broker:1", 60.0, 1.0, lambda n: [next(ids) for _ in range(n)], 0.0,
                  wall=lambda: wall[0])  # fmt: skip
    calls.add((SET, b"a", b"v", None), "a", 0.0)
    calls.add_many([(DEL, b"b", None, None), (GET, b"c", None, None)], 0, 2, 0.0)
    first = calls.next_batch(100)
    assert first is not None
    calls.sent(first, 0.0)

    def stamps(frames: list[bytes]) -> list[int | None]:
        batch = protocol.decode_batch(frames)
        return [r.stamp for r in batch.requests]

    expected = stamp_of(1_700_000_123.9)
    assert expected == 1_700_000_123 & STAMP_MASK
    assert stamps(first.frames) == [expected, expected, None]  # writes only
    for step in range(3):  # resent later, by a later clock: the same stamps
        wall[0] += 2.0
        calls.resend(1.0 + step)
        again = calls.next_batch(100)
        assert again is not None and stamps(again.frames) == [expected, expected, None]
        calls.sent(again, 1.0 + step)


def test_an_unavailable_without_the_prefix_stays_unavailable() -> None:
    assert type(error(Status.UNAVAILABLE, b"shard 0 has no worker")) is Unavailable
    assert type(error(Status.UNAVAILABLE, None)) is Unavailable


# --- the codec --------------------------------------------------------------------------------


def test_the_stamp_lives_in_args_top_bits_and_an_unstamped_request_is_unchanged() -> None:
    plain = encode_request(Request(Kind.SET, 1, b"k", b"v", ttl_ms=10_000))
    assert (
        plain[0]
        == b"\x01\x02\x01\x00" + (1).to_bytes(8, "big") + (10_000).to_bytes(8, "big") + b"k"
    )
    stamped = encode_request(Request(Kind.SET, 1, b"k", b"v", ttl_ms=10_000, stamp=0xABCDEF))
    assert stamped[0][:12] == b"\x01\x02\x05\x00" + (1).to_bytes(8, "big")
    assert stamped[0][12:20] == bytes.fromhex("abcdef0000002710")  # stamp | TTL
    delete = encode_request(Request(Kind.DEL, 1, b"k", stamp=STAMP_MODULUS + 2))
    assert delete[0][2] == 0x04 and delete[0][12:20] == bytes.fromhex("0000020000000000")
    # A GET, an ALL or a PING drops a stamp (it applies to writes only).
    assert encode_request(Request(Kind.GET, 1, b"k", stamp=5)) == encode_request(
        Request(Kind.GET, 1, b"k")
    )
    assert pack_request(GET, 1, b"k", None, None, 5) == pack_request(GET, 1, b"k")


def _header(kind: int, flags: int, arg: int, key: bytes = b"k") -> bytes:
    return struct.pack("!BBBxQQ", 1, kind, flags, 77, arg) + key


@pytest.mark.parametrize(
    ("frames", "error_text"),
    [
        ([_header(GET, 0x04, 5 << 40)], "flag STAMPED does not apply to GET"),
        ([_header(int(Kind.ALL), 0x04, 0, b"")], "flag STAMPED does not apply to ALL"),
        ([_header(int(Kind.PING), 0x04, 0, b"")], "flag STAMPED does not apply to PING"),
        ([_header(DEL, 0x04, (5 << 40) | 1)], "DEL must have arg 0"),
        ([_header(DEL, 0x04, 1 << 39)], "DEL must have arg 0"),  # bit 39 is no stamp's
        ([_header(SET, 0x04, 1), b"v"], "SET without flag TTL must have arg 0"),
        ([_header(SET, 0x05, 5 << 40), b"v"], "ttl_ms must be between 1"),
        ([_header(SET, 0x05, (5 << 40) | (1 << 39)), b"v"], "ttl_ms must be between 1"),
        ([_header(SET, 0x1C, 0), b"v"], "flags NX and XX cannot be combined"),
    ],
)
def test_a_malformed_stamped_request_is_refused(frames, error_text) -> None:
    with pytest.raises(ProtocolError, match=error_text) as raised:
        decode_request(frames)
    assert raised.value.request_id == 77
    assert protocol.peek_keyed_request(frames) is None
    assert peek_keyed_dispatch(dispatch_frames(1, frames)) is None


def test_a_stamped_get_in_a_batch_is_refused_alone() -> None:
    good = pack_request(SET, 1, b"k", b"v", None, 9)
    bad = struct.pack("!BBHIQQ", GET, 0x04, 1, 0, 2, 9 << 40) + b"k"
    _, subs = split_batch(protocol.batch_frames(1, [good, bad]))
    assert subs[0][:3] == (SET, 1, b"k")
    assert subs[1][0] == 0 and b"flag STAMPED does not apply to GET" in subs[1][2]


def test_random_stamped_requests_round_trip_through_every_decoder() -> None:
    rng = random.Random(10)
    for _ in range(2000):
        kind = rng.choice((Kind.SET, Kind.DEL))
        stamp = rng.choice((0, STAMP_MASK, rng.randrange(STAMP_MODULUS)))
        ttl = rng.choice((None, 1, protocol.MAX_TTL_MS, rng.randrange(1, protocol.MAX_TTL_MS)))
        request = Request(
            kind,
            rng.randrange(1, 2**64),
            b"k" + rng.randbytes(rng.randrange(0, 39)),  # a key never starts with NUL (reserved)
            rng.randbytes(rng.randrange(0, 40)) if kind == Kind.SET else None,
            ttl if kind == Kind.SET else None,
            stamp=stamp,
        )
        frames = encode_request(request)
        assert decode_request(frames) == request
        record = protocol.request_record(frames)
        assert record == pack_request(
            kind, request.request_id, request.key, request.value, request.ttl_ms, stamp
        )
        op = decode_from_broker(dispatch_batch_frames(1, [record]))
        assert isinstance(op, DispatchBatch)
        ttl_ms = ttl if kind == Kind.SET else None
        assert op.ops[0] == (kind, request.request_id, request.key, request.value, ttl_ms, stamp)
        keyed = peek_keyed_dispatch(dispatch_frames(3, frames))
        assert keyed is not None and keyed[6] == stamp and keyed[5] == request.ttl_ms
