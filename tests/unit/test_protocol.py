"""The wire codec: round trips, every malformed case, and a fuzz of the decoders."""

from __future__ import annotations

import random
import re
import struct

import pytest

from zkv import protocol
from zkv.protocol import (
    Assign,
    Batch,
    BatchReply,
    Disconnect,
    Dispatch,
    DispatchBatch,
    Entry,
    Heartbeat,
    Kind,
    ProtocolError,
    Ready,
    Reply,
    Request,
    Status,
    batch_reply_answers,
    batch_reply_header,
    decode_batch,
    decode_batch_reply,
    decode_entries,
    decode_from_broker,
    decode_from_worker,
    decode_reply,
    decode_reply_record,
    decode_request,
    dispatch_batch_frames,
    dispatch_frames,
    encode_batch,
    encode_batch_reply,
    encode_control,
    encode_entries,
    encode_reply,
    encode_request,
    error_reply,
    pack_reply,
    pack_request,
    peek_keyed_dispatch,
    peek_reply,
    reply_frames,
    reply_from_record,
    request_record,
    split_batch,
    split_batch_reply,
    split_reply_records,
)

pytestmark = pytest.mark.unit


def _plain(request: Request) -> bool:
    """Whether the fast paths take the request: a GET, SET or DEL without an issue-12 flag
    (a GET with ttl_ms is a touch, not plain)."""
    return (
        request.kind in (Kind.GET, Kind.SET, Kind.DEL)
        and protocol.request_extra(request) is None
        and not (request.kind == Kind.GET and request.ttl_ms is not None)
    )


REQUESTS = [
    Request(Kind.GET, 1, b"k"),
    Request(Kind.GET, protocol.U64_MAX, b"\xff\x00/{tag}" * 10),
    Request(Kind.SET, 2, b"key", b"value", ttl_ms=1500),
    Request(Kind.SET, 3, b"key", b"", ttl_ms=None),
    Request(Kind.SET, 4, b"k", b"\x00" * 100_000, ttl_ms=protocol.MAX_TTL_MS),
    Request(Kind.DEL, 5, "ключ".encode()),
    # Stamped writes (flag STAMPED): the stamp in arg's top bits, beside a TTL or alone.
    Request(Kind.SET, 9, b"k", b"v", ttl_ms=protocol.MAX_TTL_MS, stamp=protocol.STAMP_MASK),
    Request(Kind.SET, 10, b"k", b"", stamp=0),
    Request(Kind.SET, 11, b"k", b"v", ttl_ms=1, stamp=1_700_000_000 & protocol.STAMP_MASK),
    Request(Kind.DEL, 12, b"k", stamp=12345),
    Request(Kind.ALL, 6),
    Request(Kind.ALL, 7, b"cursor", limit=100, keys_only=True),
    Request(Kind.PING, 8),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r.kind.name}-{r.request_id}")
def test_request_round_trip(request_):
    frames = encode_request(request_)
    assert len(frames) == (2 if request_.kind == Kind.SET else 1)
    assert decode_request(frames) == request_


def test_request_header_layout_is_the_documented_one():
    frames = encode_request(Request(Kind.SET, 0x0102030405060708, b"ab", b"v", ttl_ms=10_000))
    assert frames[0] == (
        b"\x01\x02\x01\x00"
        + bytes.fromhex("0102030405060708")
        + (10_000).to_bytes(8, "big")
        + b"ab"
    )
    assert frames[1] == b"v"


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r.kind.name}-{r.request_id}")
def test_dispatch_wraps_the_request_and_the_worker_unwraps_it(request_):
    frames = dispatch_frames(0xABCDEF, encode_request(request_))
    assert decode_from_broker(frames) == Dispatch(0xABCDEF, request_)


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r.kind.name}-{r.request_id}")
def test_a_keyed_dispatch_is_peeked_as_a_plain_tuple(request_):
    """The worker's fast path: the fields decode_from_broker finds, as one tuple, for GET, SET
    and DEL; None for anything else (left to decode_from_broker)."""
    frames = dispatch_frames(0xABCDEF, encode_request(request_))
    peeked = peek_keyed_dispatch(frames)
    if not _plain(request_):
        assert peeked is None
        return
    r = request_
    assert peeked == (0xABCDEF, r.kind, r.request_id, r.key, r.value, r.ttl_ms, r.stamp)
    if r.kind == Kind.SET:
        assert peeked[4] is frames[1]  # the value frame, not a copy


def test_dispatch_passes_the_value_frame_through_without_copying():
    value = b"x" * 1000
    frames = dispatch_frames(1, encode_request(Request(Kind.SET, 1, b"k", value)))
    assert frames[1] is value


@pytest.mark.parametrize(
    "reply",
    [
        Reply(Status.OK, 1, 2, 1_700_000_000_123, b"value"),
        Reply(Status.OK, 1, 2, None, None),
        Reply(Status.NOT_FOUND, 9, 10),
        Reply(Status.ERROR, 3, 0, None, b"what went wrong"),
        Reply(Status.UNAVAILABLE, protocol.U64_MAX, protocol.U64_MAX, None, b""),
    ],
)
def test_reply_round_trip(reply):
    frames = encode_reply(reply)
    assert decode_reply(frames) == reply
    assert peek_reply(frames) == (reply.status, reply.token)
    assert decode_from_worker(frames) == reply


@pytest.mark.parametrize(
    "reply",
    [
        Reply(Status.OK, 1, 2, 1_700_000_000_123, b"value"),
        Reply(Status.OK, 1, 2, None, None),
        Reply(Status.OK, 1, 2, None, b""),
        Reply(Status.NOT_FOUND, 9, 10),
        Reply(Status.UNAVAILABLE, protocol.U64_MAX, protocol.U64_MAX, None, b"stale"),
    ],
)
def test_reply_frames_are_those_of_encode_reply(reply):
    frames = reply_frames(
        reply.status, reply.request_id, reply.token, reply.deadline_ms, reply.body
    )
    assert frames == encode_reply(reply)
    assert decode_reply(frames) == reply


def test_error_reply_carries_the_message():
    reply = decode_reply(error_reply(5, "no such thing", Status.UNAVAILABLE))
    assert (reply.status, reply.request_id, reply.body) == (Status.UNAVAILABLE, 5, b"no such thing")


@pytest.mark.parametrize(
    ("message", "decode"),
    [
        (Ready(), decode_from_worker),
        (Ready(3, 12345), decode_from_worker),
        (Ready(None, 7, durable=True, cluster=2**64 - 1), decode_from_worker),
        (Heartbeat(), decode_from_worker),
        (Disconnect(), decode_from_worker),
        (Assign(1, 4), decode_from_broker),
        (Assign(None, 2), decode_from_broker),
        (Assign(0, 2, epoch=2**40 + 5), decode_from_broker),
        (Heartbeat(), decode_from_broker),
        (Disconnect(), decode_from_broker),
    ],
)
def test_control_round_trip(message, decode):
    assert decode(encode_control(message)) == message


def test_a_ready_without_its_cluster_id_from_an_earlier_version_reads_as_in_memory():
    earlier = bytes([1, 0x20, 0, 0]) + (3).to_bytes(4, "big") + (99).to_bytes(8, "big")
    assert decode_from_worker([earlier]) == Ready(3, 99, durable=False, cluster=0)
    with pytest.raises(ProtocolError):
        decode_from_worker([earlier + b"\0"])  # neither size


def test_entries_round_trip_and_concatenate():
    a = [Entry(b"a", b"1", 5), Entry(b"", b"", None)]
    b = [Entry(b"\xff" * 300, b"v" * 70_000, 2**63)]
    assert decode_entries(encode_entries(a)) == a
    assert decode_entries(encode_entries(a) + encode_entries(b)) == a + b
    assert decode_entries(b"") == []


def _header(kind: int, flags: int = 0, request_id: int = 77, arg: int = 0, key: bytes = b"k"):
    return struct.pack("!BBBxQQ", 1, kind, flags, request_id, arg) + key


MALFORMED_REQUESTS = {
    "no frames": ([], "empty message"),
    "empty header": ([b""], "too short"),
    "wrong version": ([b"\x02" + _header(Kind.GET)[1:]], "unsupported protocol version 2"),
    "short header": ([_header(Kind.GET)[:10]], "shorter than 20"),
    "unknown command": ([_header(0x7E)], "unknown command 0x7e"),
    "reply kind as request": ([_header(Kind.REPLY)], "unknown command"),
    "flag of another kind": ([_header(Kind.GET, flags=0x80)], "RETURN_OLD does not apply to GET"),
    "GET with a value": ([_header(Kind.GET), b"v"], "GET takes 1 frame(s), got 2"),
    "SET without a value": ([_header(Kind.SET)], "SET takes 2 frame(s), got 1"),
    "SET with three frames": ([_header(Kind.SET), b"v", b"w"], "SET takes 2 frame(s), got 3"),
    "empty key": ([_header(Kind.GET, key=b"")], "GET needs a non-empty key"),
    "oversized key": ([_header(Kind.DEL, key=b"k" * 65_536)], "exceeds 65535"),
    "zero TTL": ([_header(Kind.SET, flags=1, arg=0), b"v"], "ttl_ms must be between 1"),
    "absurd TTL": ([_header(Kind.SET, flags=1, arg=2**63), b"v"], "ttl_ms must be between 1"),
    "arg without TTL flag": ([_header(Kind.SET, arg=5), b"v"], "without flag TTL"),
    "TTL on DEL": ([_header(Kind.DEL, flags=1)], "flag TTL does not apply to DEL"),
    "KEYS_ONLY on DEL": ([_header(Kind.DEL, flags=2)], "KEYS_ONLY does not apply to DEL"),
    "arg on GET": ([_header(Kind.GET, arg=1)], "GET must have arg 0"),
    "PING with key": ([_header(Kind.PING)], "PING takes no key"),
}


@pytest.mark.parametrize("case", MALFORMED_REQUESTS, ids=str)
def test_malformed_requests_name_what_is_wrong(case):
    frames, message = MALFORMED_REQUESTS[case]
    with pytest.raises(ProtocolError, match=re.escape(message)) as raised:
        decode_request(frames)
    if frames and len(frames[0]) >= 20 and frames[0][0] == 1:
        assert raised.value.request_id == 77  # echoed so the error reply can be matched


def test_oversized_value_is_refused(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_VALUE_BYTES", 10)
    with pytest.raises(ProtocolError, match="value of 11 bytes exceeds 10"):
        decode_request([_header(Kind.SET), b"x" * 11])


def test_encoder_refuses_what_the_decoder_would():
    with pytest.raises(ProtocolError):
        encode_request(Request(Kind.GET, 1, b""))
    with pytest.raises(ProtocolError):
        encode_request(Request(Kind.SET, 1, b"k", None))
    with pytest.raises(ProtocolError):
        encode_request(Request(Kind.SET, 1, b"k", b"v", ttl_ms=0))


@pytest.mark.parametrize(
    "frames",
    [
        [b"\x01\x10" + b"\x00" * 5],  # short reply
        [b"\x01\x10\x09" + b"\x00" * 25],  # unknown status
        [encode_reply(Reply(Status.OK, 1))[0] + b"x"],  # long reply header
        [*encode_reply(Reply(Status.OK, 1, body=b"b")), b"extra"],
        [b"\x01\x20"],  # short READY
        [b"\x01\x22", b"x"],  # HEARTBEAT with a second frame
        [b"\x01\x21" + b"\x00" * 10],  # ASSIGN is broker -> worker only
        [b"\x01\x01" + b"\x00" * 18],  # a request is not a worker message
    ],
)
def test_malformed_worker_messages_raise(frames):
    with pytest.raises(ProtocolError):
        decode_from_worker(frames)


@pytest.mark.parametrize(
    "frames",
    [
        [b"\x01\x11\x00"],  # short DISPATCH
        [b"\x01\x11" + b"\x00" * 8 + b"\x01\x7f" + b"\x00" * 18],  # wraps an unknown command
        [struct.pack("!BBxxIIQ", 1, Kind.ASSIGN, 5, 2, 1)],  # shard out of range
        [struct.pack("!BBxxIIQ", 1, Kind.ASSIGN, 0, 0, 1)],  # zero shards
        [b"\x01\x20" + b"\x00" * 14],  # READY is worker -> broker only
        [b"\x01\x10" + b"\x00" * 26],  # a reply is not for workers
    ],
)
def test_malformed_broker_messages_raise(frames):
    with pytest.raises(ProtocolError):
        decode_from_broker(frames)


@pytest.mark.parametrize("body", [b"\x00", b"\x00\x05\x00\x00\x00\x00" + b"\x00" * 8 + b"abc"])
def test_truncated_entries_raise(body):
    with pytest.raises(ProtocolError):
        decode_entries(body)


def test_fuzz_decoders_raise_only_protocol_error():
    """Random and mutated frames: every decoder either parses or raises ProtocolError."""
    rng = random.Random(1234)
    seeds = [f for r in REQUESTS for f in encode_request(r)]
    seeds += encode_reply(Reply(Status.OK, 1, 2, 3, b"body"))
    seeds += [f for m in (Ready(1, 2), Assign(0, 2), Heartbeat()) for f in encode_control(m)]
    decoders = [
        decode_request,
        decode_reply,
        decode_from_worker,
        decode_from_broker,
        peek_keyed_dispatch,  # never raises: None for anything it does not take
    ]
    for _ in range(5_000):
        frames = []
        for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
            if rng.random() < 0.5:
                frame = bytearray(rng.choice(seeds))
                for _ in range(rng.randint(1, 4)):
                    if frame and rng.random() < 0.7:
                        frame[rng.randrange(len(frame))] = rng.randrange(256)
                    else:
                        frame = frame[: rng.randrange(len(frame) + 1)]
                frames.append(bytes(frame))
            else:
                frames.append(rng.randbytes(rng.randrange(40)))
        for decode in decoders:
            try:
                decode(frames)
            except ProtocolError:
                pass
        try:
            decode_entries(frames[0] if frames else b"")
        except ProtocolError:
            pass


# --- batches ----------------------------------------------------------------------------------

BATCHABLE = [r for r in REQUESTS if r.kind in (Kind.GET, Kind.SET, Kind.DEL)]


def test_batch_round_trip_and_layout():
    batch = Batch(0xB0B, tuple(BATCHABLE))
    frames = encode_batch(batch)
    assert len(frames) == 2
    assert frames[0] == struct.pack("!BBxxIQ", 1, Kind.BATCH, len(BATCHABLE), 0xB0B)
    assert decode_batch(frames) == batch
    # Each record: kind flags key_len value_len request_id arg, then key and value.
    first = pack_request(Kind.SET, 7, b"ab", b"xyz", ttl_ms=10)
    assert first == struct.pack("!BBHIQQ", Kind.SET, 1, 2, 3, 7, 10) + b"ab" + b"xyz"


def test_split_batch_gives_records_that_rebuild_a_dispatch():
    batch = Batch(1, tuple(BATCHABLE))
    batch_id, subs = split_batch(encode_batch(batch))
    assert batch_id == 1
    assert [(kind, rid, key) for kind, rid, key, _ in subs] == [
        (r.kind, r.request_id, r.key) for r in BATCHABLE
    ]
    dispatch = decode_from_broker(dispatch_batch_frames(99, [record for *_, record in subs]))
    assert dispatch == DispatchBatch(
        99, [(r.kind, r.request_id, r.key, r.value, r.ttl_ms, r.stamp) for r in BATCHABLE]
    )


def test_pack_request_packs_what_the_broker_accepts_and_refuses_what_it_refuses():
    """pack_request's shortcut for the common GET and SET and its general checks agree with
    the broker's reading of a batch (split_batch), at and around every limit."""
    rng = random.Random(11)
    big = protocol.MAX_KEY_BYTES
    for _ in range(3000):
        kind = rng.choice((Kind.GET, Kind.SET, Kind.DEL, Kind.PING))
        key = b"k" * rng.choice((0, 1, 5, big, big + 1))
        value = rng.choice((None, b"", b"v" * 16))
        ttl = rng.choice((None, 0, 1, protocol.MAX_TTL_MS, protocol.MAX_TTL_MS + 1))
        stamp = rng.choice((None, None, 0, 1, protocol.STAMP_MASK, 2**40 + 5))
        try:
            record = pack_request(kind, 9, key, value, ttl, stamp)
        except ProtocolError:
            refused = True
        else:
            refused = False
            ((got_kind, rid, got_key, _),) = split_batch(protocol.batch_frames(1, [record]))[1]
            assert (got_kind, rid, got_key) == (kind, 9, key), (kind, key, value, ttl)
            op = decode_from_broker(dispatch_batch_frames(1, [record])).ops[0]
            expected_value = value if kind == Kind.SET else None
            expected_ttl = ttl if kind in (Kind.SET, Kind.GET) else None
            # Only a write (or a touch) carries a stamp, and only its low STAMP_BITS travel.
            expected_stamp = (
                None
                if stamp is None or (kind == Kind.GET and ttl is None)
                else stamp & protocol.STAMP_MASK
            )
            if kind == Kind.GET and ttl is not None:  # a touch: not a plain GET
                touch = Request(Kind.GET, 9, key, None, ttl, stamp=expected_stamp)
                assert op == (protocol.EXTENDED_OP, 9, key, touch, ttl, expected_stamp)
            else:
                assert op == (kind, 9, key, expected_value, expected_ttl, expected_stamp), (
                    kind,
                    key,
                    value,
                    ttl,
                    stamp,
                )
        should_refuse = (
            not 0 < len(key) <= big
            or kind not in (Kind.GET, Kind.SET, Kind.DEL)
            or (kind == Kind.SET and value is None)
            or (kind in (Kind.SET, Kind.GET) and ttl is not None and ttl < 1)
            or (kind in (Kind.SET, Kind.GET) and ttl is not None and ttl > protocol.MAX_TTL_MS)
        )
        assert refused == should_refuse, (kind, key, value, ttl)


def test_a_single_request_becomes_the_same_record_as_in_a_batch():
    for request in BATCHABLE:
        expected = pack_request(
            request.kind,
            request.request_id,
            request.key,
            request.value,
            request.ttl_ms,
            request.stamp,
        )
        assert request_record(encode_request(request)) == expected


def test_batch_reply_round_trip_and_helpers():
    replies = (
        Reply(Status.OK, 1, 9, 1_700_000_000_000, b"value"),
        Reply(Status.OK, 2, 9, None, b""),  # an empty body is still a body
        Reply(Status.NOT_FOUND, 3, 9),
        Reply(Status.UNAVAILABLE, protocol.U64_MAX, 9, None, b"why"),
    )
    frames = encode_batch_reply(BatchReply(9, replies))
    assert frames[0] == struct.pack("!BBxxIQ", 1, Kind.BATCH_REPLY, 4, 9)
    assert decode_batch_reply(frames) == BatchReply(9, replies)
    assert decode_from_worker(frames) == BatchReply(9, replies)
    assert batch_reply_header(frames) == (9, 4)
    records = split_reply_records(frames, 4)
    assert [decode_reply_record(record) for record in records] == list(replies)
    assert [decode_reply(reply_from_record(record)) for record in records] == list(replies)
    assert split_batch_reply(frames)[1][1] == (0, 2, 9, None, b"")


def _batch(records: list[bytes], count: int | None = None, batch_id: int = 55) -> list[bytes]:
    header = struct.pack("!BBxxIQ", 1, Kind.BATCH, len(records) if count is None else count, 55)
    return [header[:8] + batch_id.to_bytes(8, "big"), b"".join(records)]


def _record(kind=Kind.GET, flags=0, request_id=7, arg=0, key=b"k", value=b"") -> bytes:
    return struct.pack("!BBHIQQ", kind, flags, len(key), len(value), request_id, arg) + key + value


MALFORMED_BATCHES = {
    "one frame": ([_batch([_record()])[0]], "BATCH takes 2 frames"),
    "three frames": ([*_batch([_record()]), b"x"], "BATCH takes 2 frames"),
    "short header": ([_batch([_record()])[0][:12], b""], "BATCH header of 12 bytes"),
    "zero count": (_batch([], count=0), "a batch holds 1 to 10000 items, got 0"),
    "too many": (_batch([_record()], count=10_001), "got 10001"),
    "count above records": (_batch([_record()], count=2), "sub-request 1 of 2 is truncated"),
    "count below records": (_batch([_record(), _record()], count=1), "bytes after the last"),
    "record past the end": ([_batch([_record()])[0], _record()[:-1]], "runs past the end"),
}


@pytest.mark.parametrize("case", MALFORMED_BATCHES, ids=str)
def test_malformed_batches_name_what_is_wrong_and_carry_the_batch_id(case):
    frames, message = MALFORMED_BATCHES[case]
    with pytest.raises(ProtocolError, match=re.escape(message)) as raised:
        split_batch(frames)
    if len(frames[0]) == 16:
        assert raised.value.request_id == 55  # so the client can match the error reply


def test_oversized_batch_is_refused(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_BATCH_BYTES", 50)
    with pytest.raises(ProtocolError, match="exceeds 50"):
        split_batch(_batch([_record(), _record(), _record()]))


MALFORMED_SUB_REQUESTS = {
    "unknown command": (_record(kind=0x7E), "unknown command 0x7e"),
    "ALL in a batch": (_record(kind=Kind.ALL), "ALL cannot be sent in a batch"),
    "PING in a batch": (_record(kind=Kind.PING, key=b""), "PING cannot be sent in a batch"),
    "empty key": (_record(key=b""), "GET needs a non-empty key"),
    "GET with a value": (_record(value=b"v"), "GET takes no value"),
    "arg on DEL": (_record(kind=Kind.DEL, arg=3), "DEL must have arg 0"),
    "TTL on DEL": (_record(kind=Kind.DEL, flags=1, arg=5), "flag TTL does not apply to DEL"),
    "flag of another kind": (_record(flags=0x80), "flag RETURN_OLD does not apply to GET"),
    "KEYS_ONLY on SET": (_record(kind=Kind.SET, flags=2), "KEYS_ONLY does not apply to SET"),
    "zero TTL": (_record(kind=Kind.SET, flags=1, arg=0, value=b"v"), "ttl_ms must be between 1"),
    "absurd TTL": (_record(kind=Kind.SET, flags=1, arg=2**63), "ttl_ms must be between 1"),
    "arg without TTL": (_record(kind=Kind.SET, arg=5), "SET without flag TTL must have arg 0"),
}


@pytest.mark.parametrize("case", MALFORMED_SUB_REQUESTS, ids=str)
def test_a_malformed_sub_request_is_marked_and_the_others_kept(case):
    record, message = MALFORMED_SUB_REQUESTS[case]
    good = _record(request_id=8, key=b"fine")
    _, subs = split_batch(_batch([good, record, good]))
    assert [(kind, rid) for kind, rid, _, _ in subs] == [(Kind.GET, 8), (0, 7), (Kind.GET, 8)]
    assert subs[1][2].decode() == message or message in subs[1][2].decode()
    with pytest.raises(ProtocolError, match=re.escape(message)) as raised:
        decode_batch(_batch([good, record]))
    assert raised.value.request_id == 7
    with pytest.raises(ProtocolError):
        pack_request(subs[1][0] or 0x7E, 7, b"" if "key" in case else b"k", None, None)


def test_the_batch_encoder_refuses_what_the_broker_would():
    with pytest.raises(ProtocolError, match="non-empty key"):
        encode_batch(Batch(1, (Request(Kind.GET, 1, b""),)))
    with pytest.raises(ProtocolError, match="cannot be sent in a batch"):
        encode_batch(Batch(1, (Request(Kind.ALL, 1),)))
    with pytest.raises(ProtocolError, match="ttl_ms"):
        encode_batch(Batch(1, (Request(Kind.SET, 1, b"k", b"v", ttl_ms=0),)))
    with pytest.raises(ProtocolError, match="1 to 10000"):
        encode_batch(Batch(1, ()))


def test_a_malformed_sub_request_in_a_dispatch_reaches_the_worker_marked():
    frames = [struct.pack("!BBxxIQ", 1, Kind.BATCH_DISPATCH, 2, 5), _record() + _record(kind=0x7E)]
    dispatch = decode_from_broker(frames)
    assert isinstance(dispatch, DispatchBatch) and dispatch.token == 5
    assert dispatch.ops[0] == (Kind.GET, 7, b"k", None, None, None)
    assert dispatch.ops[1][:2] == (0, 7) and b"unknown command" in dispatch.ops[1][2]


@pytest.mark.parametrize(
    "frames",
    [
        [struct.pack("!BBxxIQ", 1, Kind.BATCH_REPLY, 1, 0)],  # one frame
        [struct.pack("!BBxxIQ", 1, Kind.BATCH_REPLY, 2, 0), pack_reply(0, 1, 0, None, None)],
        [struct.pack("!BBxxIQ", 1, Kind.BATCH_REPLY, 1, 0), pack_reply(9, 1, 0, None, None)],
        [struct.pack("!BBxxIQ", 1, Kind.BATCH_REPLY, 1, 0), pack_reply(0, 1, 0, None, b"x")[:-1]],
        [struct.pack("!BBxxIQ", 1, Kind.BATCH_REPLY, 1, 0), pack_reply(0, 1, 0, None, None) + b"!"],
    ],
)
def test_malformed_batch_replies_raise(frames):
    with pytest.raises(ProtocolError):
        split_batch_reply(frames)
    with pytest.raises(ProtocolError):
        decode_from_worker(frames)


def test_fuzz_batch_decoders_raise_only_protocol_error():
    """Mutated batches, dispatches and replies: parse or ProtocolError, nothing else."""
    rng = random.Random(4321)
    batch = encode_batch(Batch(3, tuple(BATCHABLE[:4])))
    dispatch = dispatch_batch_frames(4, [r for *_, r in split_batch(batch)[1]])
    reply = encode_batch_reply(BatchReply(5, (Reply(Status.OK, 1, 5, 6, b"v"), Reply(1, 2, 5))))
    seeds = [batch, dispatch, reply]
    decoders = [
        split_batch,
        decode_batch,
        split_batch_reply,
        batch_reply_answers,
        decode_batch_reply,
        decode_from_broker,
        decode_from_worker,
        peek_keyed_dispatch,
        lambda frames: split_reply_records(frames, rng.randrange(4)),
    ]
    for _ in range(5_000):
        frames = [bytearray(frame) for frame in rng.choice(seeds)]
        for _ in range(rng.randint(1, 4)):
            frame = rng.choice(frames)
            roll = rng.random()
            if frame and roll < 0.6:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            elif roll < 0.8:
                del frame[rng.randrange(len(frame) + 1) :]
            else:
                frame.extend(rng.randbytes(rng.randrange(30)))
        if rng.random() < 0.1:
            frames = frames[: rng.randrange(len(frames) + 1)] or [bytearray()]
        message = [bytes(frame) for frame in frames]
        for decode in decoders:
            try:
                decode(message)
            except ProtocolError:
                pass


def test_peek_keyed_request_agrees_with_decode_request() -> None:
    """The broker's fast path reads (kind, id, key) of exactly the GET/SET/DEL requests that
    decode_request accepts; anything else is left to decode_request (None)."""
    rng = random.Random(7)
    valid = [
        Request(Kind.GET, 1, b"k"),
        Request(Kind.DEL, 2**64 - 1, b"key" * 100),
        Request(Kind.SET, 3, b"k", b""),
        Request(Kind.SET, 4, b"k", b"v" * 100, 1),
        Request(Kind.SET, 5, b"k", b"v", protocol.MAX_TTL_MS),
        Request(Kind.SET, 6, b"k", b"v", protocol.MAX_TTL_MS, stamp=protocol.STAMP_MASK),
        Request(Kind.SET, 7, b"k", b"v", stamp=1),
        Request(Kind.DEL, 8, b"k", stamp=0),
    ]
    for request in valid:
        frames = protocol.encode_request(request)
        assert protocol.peek_keyed_request(frames) == (
            request.kind,
            request.request_id,
            request.key,
            request.ttl_ms,
            request.stamp,
        )
    others = [
        protocol.encode_request(Request(Kind.PING, 6)),
        protocol.encode_request(Request(Kind.ALL, 7)),
    ]
    for frames in others:
        assert protocol.peek_keyed_request(frames) is None
    header = struct.Struct("!BBBxQQ")
    for _ in range(5000):
        frames = [
            header.pack(
                rng.choice((1, 1, 1, 2)),
                rng.choice((0, 1, 2, 3, 4, 5, 6, 9)),
                rng.choice((0, 0, 1, 2, 3, 4, 5, 6, 8)),
                rng.randrange(4),
                rng.choice((0, 0, 1, protocol.MAX_TTL_MS, protocol.MAX_TTL_MS + 1))
                | rng.choice((0, 0, 1 << 39, 7 << protocol.STAMP_SHIFT)),
            )
            + rng.choice((b"", b"k", b"key"))
        ]
        frames += [b"v"] * rng.choice((0, 0, 1, 2))
        try:
            request = decode_request(frames)
        except ProtocolError:
            assert protocol.peek_keyed_request(frames) is None
            continue
        peeked = protocol.peek_keyed_request(frames)
        if _plain(request):
            assert peeked == (
                request.kind,
                request.request_id,
                request.key,
                request.ttl_ms,
                request.stamp,
            )
        else:
            assert peeked is None


def test_peek_keyed_dispatch_agrees_with_decode_from_broker() -> None:
    """The worker's fast path takes exactly the DISPATCHes of GET, SET and DEL that
    decode_from_broker accepts, with the same fields; a malformed one is left to
    decode_from_broker (None), which raises with its request id so the worker answers ERROR."""
    rng = random.Random(11)
    header = struct.Struct("!BBQBBBxQQ")  # DISPATCH header, then the request header
    taken = 0
    for _ in range(5000):
        kind = rng.choice((Kind.GET, Kind.SET, Kind.DEL))
        ttl_ms = rng.choice((None, 1, protocol.MAX_TTL_MS)) if kind == Kind.SET else None
        # A valid keyed DISPATCH: version, DISPATCH, token, version, kind, flags, id, arg...
        fields = [1, Kind.DISPATCH, rng.randrange(2**64), 1, kind, 0, rng.randrange(2**64), 0]
        if ttl_ms is not None:
            fields[5], fields[7] = 1, ttl_ms
        if kind != Kind.GET and rng.random() < 0.5:  # stamped
            fields[5] |= 4
            fields[7] |= rng.randrange(protocol.STAMP_MODULUS) << protocol.STAMP_SHIFT
        key = rng.choice((b"k", b"key"))
        values = [b"v"] if kind == Kind.SET else []
        # ... then, most of the time, one thing wrong with it.
        roll = rng.randrange(8)
        if roll < 4:
            field = rng.choice((0, 1, 3, 4, 5, 7))
            fields[field] = rng.choice((0, 1, 2, 3, 4, 5, 9, Kind.BATCH_DISPATCH, 2**40))
            fields[field] &= 0xFF if field != 7 else protocol.U64_MAX
        elif roll == 4:
            key = b""
        elif roll == 5:
            values = rng.choice(([], [b"v"], [b"v", b"w"]))
        first = header.pack(*fields) + key
        if roll == 6:
            first = first[: rng.randrange(len(first))]
        frames = [first, *values]
        peeked = peek_keyed_dispatch(frames)
        try:
            message = decode_from_broker(frames)
        except ProtocolError:
            assert peeked is None
            continue
        if isinstance(message, Dispatch) and _plain(message.request):
            r = message.request
            assert peeked == (
                message.token,
                r.kind,
                r.request_id,
                r.key,
                r.value,
                r.ttl_ms,
                r.stamp,
            )
            taken += 1
        else:
            assert peeked is None
    assert taken > 1000  # the valid ones, and mutations that stayed valid


@pytest.mark.parametrize(
    ("request_frames", "error"),
    [
        ([_header(Kind.GET), b"stray"], "GET takes 1 frame(s), got 2"),
        ([_header(Kind.SET)], "SET takes 2 frame(s), got 1"),
        ([_header(Kind.SET, flags=1, arg=0), b"v"], "ttl_ms must be between 1"),
        ([_header(Kind.DEL, key=b"")], "DEL needs a non-empty key"),
        ([_header(Kind.DEL, arg=3)], "DEL must have arg 0"),
    ],
)
def test_a_malformed_keyed_dispatch_is_left_to_decode_from_broker(request_frames, error):
    frames = dispatch_frames(5, request_frames)
    assert peek_keyed_dispatch(frames) is None
    with pytest.raises(ProtocolError, match=re.escape(error)) as raised:
        decode_from_broker(frames)
    assert raised.value.request_id == 77


def test_peek_reply_accepts_exactly_the_replies_decode_reply_accepts():
    rng = random.Random(5)
    good = encode_reply(Reply(Status.OK, 77, 99, 1_700_000_000_000, b"value"))
    cases = [good, good[:1], [good[0], b"x", b"y"], [], [good[0] + b"!"], [b""]]
    for _ in range(2000):
        frame = bytearray(good[0])
        for _ in range(rng.randint(1, 3)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        cases.append([bytes(frame), *good[1:]])
    for frames in cases:
        try:
            reply = decode_reply(frames)
        except ProtocolError:
            assert peek_reply(frames) is None, frames
        else:
            assert peek_reply(frames) == (reply.status, reply.token), frames


def test_batch_reply_answers_are_split_batch_reply_without_tokens() -> None:
    """batch_reply_answers reads an all-bodiless BATCH_REPLY by byte columns, not record by
    record: on every message, mutated or not, it must give what split_batch_reply gives
    (tokens left out), or raise where that raises."""
    rng = random.Random(2024)
    fast = 0
    for _ in range(3_000):
        count = rng.randint(1, 12)
        records = [
            pack_reply(
                rng.choice([0, 0, 1, 2, 3]),
                rng.getrandbits(64),
                rng.getrandbits(64),
                rng.choice([None, 0, 1, rng.getrandbits(64)]),
                None if rng.random() < 0.9 else rng.randbytes(rng.randrange(3)),
            )
            for _ in range(count)
        ]
        body = bytearray(b"".join(records))
        for _ in range(rng.choice([0, 0, 1, 2])):
            roll = rng.random()
            if body and roll < 0.7:
                body[rng.randrange(len(body))] = rng.choice([0, 1, 4, 32, rng.randrange(256)])
            elif roll < 0.85:
                del body[rng.randrange(len(body) + 1) :]
            else:
                body.extend(bytes(rng.randrange(40)))
        if rng.random() < 0.1:
            count += rng.choice([-1, 1])
        frames = [struct.pack("!BBxxIQ", 1, Kind.BATCH_REPLY, count, 9), bytes(body)]
        try:
            expected = [(s, r, d, b) for s, r, _, d, b in split_batch_reply(frames)[1]]
        except ProtocolError:
            with pytest.raises(ProtocolError):
                batch_reply_answers(frames)
            continue
        assert batch_reply_answers(frames) == expected
        fast += all(body is None for *_, body in expected)
    assert fast > 500  # the fast path was taken (it applies exactly when no record has a body)


def test_pack_request_fast_paths_agree_with_encoding_a_request() -> None:
    """pack_request accepts the common GET, SET and DEL with a few integer tests before its
    general checks: for any arguments it must give the record of the request that
    encode_request (which validates with decode_request) makes, or refuse what that refuses."""
    rng = random.Random(11)
    kinds = [Kind.GET, Kind.SET, Kind.DEL, Kind.ALL, Kind.PING, 0, 0x07, Kind.REPLY]
    keys = [b"", b"k", b"x" * protocol.MAX_KEY_BYTES, b"x" * (protocol.MAX_KEY_BYTES + 1)]
    values = [None, b"", b"v"]
    ttls = [None, 0, 1, protocol.MAX_TTL_MS, protocol.MAX_TTL_MS + 1]
    for _ in range(3_000):
        kind = rng.choice(kinds)
        key = rng.choice([*keys, rng.randbytes(rng.randint(1, 20))])
        value = rng.choice([*values, rng.randbytes(rng.randint(1, 20))])
        ttl = rng.choice([*ttls, rng.randint(1, 10**9)])
        request_id = rng.getrandbits(64)
        try:
            record = pack_request(kind, request_id, key, value, ttl)
        except ProtocolError:
            record = None
        try:
            if kind not in protocol.KEYED_COMMANDS:
                raise ProtocolError("not batchable")
            expected = request_record(encode_request(Request(kind, request_id, key, value, ttl)))
        except ProtocolError:
            expected = None
        assert record == expected, (kind, key[:8], value, ttl)


def test_records_are_cut_as_copies_when_small_and_as_views_of_the_frame_when_large():
    """split_batch and split_reply_records: the same bytes either way, each record a bytes copy
    below COPIED_RECORD_BYTES and a memoryview (no copy of a large value) from there on."""
    limit = protocol.COPIED_RECORD_BYTES
    head = protocol.SUB_REQUEST_BYTES + 1  # a one-byte key
    values = [b"", b"s" * (limit - head - 1), b"e" * (limit - head), b"L" * (limit * 4)]
    records = [pack_request(Kind.SET, i + 1, b"k", v) for i, v in enumerate(values)]
    assert [len(r) for r in records[1:3]] == [limit - 1, limit]
    _, subs = split_batch(protocol.batch_frames(9, records))
    assert [bytes(sub[3]) for sub in subs] == records
    assert [type(sub[3]) for sub in subs] == [bytes, bytes, memoryview, memoryview]
    joined = dispatch_batch_frames(7, [sub[3] for sub in subs])
    assert joined == dispatch_batch_frames(7, records)

    head = protocol.SUB_REPLY_BYTES
    bodies = [b"", b"s" * (limit - head - 1), b"e" * (limit - head), b"L" * (limit * 4)]
    replies = [pack_reply(Status.OK, i + 1, 7, None, b) for i, b in enumerate(bodies)]
    frames = protocol.batch_reply_frames(7, replies)
    cut = split_reply_records(frames, len(replies))
    assert [bytes(r) for r in cut] == replies
    assert [type(r) for r in cut] == [bytes, bytes, memoryview, memoryview]
