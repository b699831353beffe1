"""The wire codec of issue 12: conditional writes, counters, TTL changes, locks, events.

Every new kind, flag and extension through every encoder and decoder (alone, in a BATCH, as
a worker receives it), the documented byte layouts (what a client in another language
builds from docs/protocol.md), every refusal with a message naming what is wrong, the reply
bodies and the EVENT message. Socket-free, no clock.
"""

from __future__ import annotations

import random
import re
import struct

import pytest

from zkv import protocol
from zkv.protocol import (
    EXTENDED_OP,
    MAX_LOCK_WAIT_MS,
    Batch,
    Dispatch,
    DispatchBatch,
    Event,
    EventKind,
    Flag,
    Kind,
    ProtocolError,
    Request,
    Status,
    batch_frames,
    decode_batch,
    decode_event,
    decode_from_broker,
    decode_old_item,
    decode_request,
    dispatch_batch_frames,
    dispatch_frames,
    encode_batch,
    encode_event,
    encode_ext,
    encode_old_item,
    encode_request,
    incr_body,
    pack_request,
    peek_keyed_dispatch,
    peek_keyed_request,
    request_extra,
    request_record,
    split_batch,
    split_ext,
    split_incr_body,
    split_token_body,
    split_versioned,
    token_body,
    versioned_body,
)

pytestmark = pytest.mark.unit

U64_MAX = protocol.U64_MAX
TTL_MAX = protocol.MAX_TTL_MS

# Every new kind and every new flag, at and around their limits.
REQUESTS = [
    # Conditional and versioned SETs.
    Request(Kind.SET, 1, b"k", b"v", nx=True),
    Request(Kind.SET, 2, b"k", b"v", 1000, xx=True, stamp=5),
    Request(Kind.SET, 3, b"k", b"", if_version=0),
    Request(Kind.SET, 4, b"k", b"v", if_version=U64_MAX, versioned=True),
    Request(Kind.SET, 5, b"k", b"v", fence=(b"lock", 1)),
    Request(Kind.SET, 6, b"k", b"v", TTL_MAX, if_version=7, fence=(b"l" * 65_535, U64_MAX)),
    Request(Kind.SET, 7, b"k", b"v", return_old=True),
    Request(Kind.SET, 8, b"k", b"v", nx=True, versioned=True, return_old=True, stamp=1),
    # DEL with a condition or a fence: a value frame holding the extension block alone.
    Request(Kind.DEL, 10, b"k", if_version=3),
    Request(Kind.DEL, 11, b"k", fence=(b"lock", 9), stamp=2),
    Request(Kind.DEL, 12, b"k", versioned=True),
    # GET: versioned, metadata only, touch (a write: may be stamped).
    Request(Kind.GET, 20, b"k", versioned=True),
    Request(Kind.GET, 21, b"k", keys_only=True),
    Request(Kind.GET, 22, b"k", ttl_ms=1),
    Request(Kind.GET, 23, b"k", ttl_ms=TTL_MAX, stamp=protocol.STAMP_MASK, versioned=True),
    # INCR: by at both ends of i64, with a TTL, conditions, fence.
    Request(Kind.INCR, 30, b"c"),
    Request(Kind.INCR, 31, b"c", by=1),
    Request(Kind.INCR, 32, b"c", by=-(2**63), ttl_ms=5),
    Request(Kind.INCR, 33, b"c", by=2**63 - 1, stamp=3, versioned=True),
    Request(Kind.INCR, 34, b"c", by=-1, if_version=0, fence=(b"f", 2)),
    # EXPIRE: a new TTL, or none (persist); conditions need the extension block.
    Request(Kind.EXPIRE, 40, b"k", ttl_ms=60_000),
    Request(Kind.EXPIRE, 41, b"k"),
    Request(Kind.EXPIRE, 42, b"k", ttl_ms=1, stamp=4, versioned=True, if_version=8),
    Request(Kind.EXPIRE, 43, b"k", fence=(b"lock", 5)),
    # Locks.
    Request(Kind.LOCK, 50, b"lock", ttl_ms=10_000),
    Request(Kind.LOCK, 51, b"lock", ttl_ms=1, wait_ms=MAX_LOCK_WAIT_MS, stamp=9),
    Request(Kind.REFRESH, 52, b"lock", ttl_ms=TTL_MAX, token=1),
    Request(Kind.REFRESH, 53, b"lock", ttl_ms=5, token=U64_MAX, stamp=0),
    Request(Kind.UNLOCK, 54, b"lock", token=77),
    Request(Kind.UNLOCK, 55, b"lock", token=78, stamp=6),
    Request(Kind.FENCE_CHECK, 56, b"lock", token=U64_MAX),
]


def _ids(request: Request) -> str:
    return f"{request.kind.name}-{request.request_id}"


def _frames_count(request: Request) -> int:
    if request.kind in (Kind.DEL, Kind.EXPIRE):
        return 1 if request.if_version is None and request.fence is None else 2
    return 1 if request.kind == Kind.GET else 2


@pytest.mark.parametrize("request_", REQUESTS, ids=_ids)
def test_every_new_request_round_trips_alone(request_: Request) -> None:
    frames = encode_request(request_)
    assert len(frames) == _frames_count(request_)
    assert decode_request(frames) == request_
    # Never on a fast path: the broker and the worker read it whole.
    assert peek_keyed_request(frames) is None
    dispatch = dispatch_frames(0xD15, frames)
    assert peek_keyed_dispatch(dispatch) is None
    assert decode_from_broker(dispatch) == Dispatch(0xD15, request_)


@pytest.mark.parametrize("request_", REQUESTS, ids=_ids)
def test_every_new_request_round_trips_in_a_batch(request_: Request) -> None:
    record = pack_request(
        request_.kind,
        request_.request_id,
        request_.key,
        request_.value,
        request_.ttl_ms,
        request_.stamp,
        request_extra(request_),
    )
    # The same record as the lone request's (a broker groups lone requests into batches).
    assert record == request_record(encode_request(request_))
    assert decode_batch(encode_batch(Batch(9, (request_,)))) == Batch(9, (request_,))
    # The broker routes it by key, like GET, SET and DEL, with its record untouched.
    _, [(kind, request_id, key, sliced)] = split_batch(batch_frames(9, [record]))
    assert (kind, request_id, key, bytes(sliced)) == (
        request_.kind,
        request_.request_id,
        request_.key,
        record,
    )
    # The worker gets the whole Request, under EXTENDED_OP, never as a plain op.
    dispatch = decode_from_broker(dispatch_batch_frames(4, [record]))
    assert isinstance(dispatch, DispatchBatch)
    assert dispatch.ops == [
        (EXTENDED_OP, request_.request_id, request_.key, request_, request_.ttl_ms, request_.stamp)
    ]


def test_a_batch_mixes_plain_and_new_requests_in_order() -> None:
    plain = [Request(Kind.GET, 100, b"a"), Request(Kind.SET, 101, b"b", b"v", 5, stamp=1)]
    batch = Batch(1, (plain[0], *REQUESTS, plain[1]))
    frames = encode_batch(batch)
    assert decode_batch(frames) == batch
    ops = _worker_ops(frames)
    assert len(ops) == 2 + len(REQUESTS)
    assert ops[0] == (Kind.GET, 100, b"a", None, None, None)
    assert ops[-1] == (Kind.SET, 101, b"b", b"v", 5, 1)
    assert [op[0] for op in ops[1:-1]] == [EXTENDED_OP] * len(REQUESTS)
    assert [op[3] for op in ops[1:-1]] == REQUESTS


def _worker_ops(batch: list[bytes]) -> list:
    """The ops a worker reads from a BATCH's records forwarded whole in a BATCH_DISPATCH."""
    count = struct.unpack_from("!4xI", batch[0])[0]
    header = struct.pack("!BBxxIQ", 1, Kind.BATCH_DISPATCH, count, 2)
    dispatch = decode_from_broker([header, batch[1]])
    assert isinstance(dispatch, DispatchBatch)
    return dispatch.ops


def test_extended_op_is_no_kind() -> None:
    assert EXTENDED_OP not in {int(kind) for kind in Kind}
    assert 0 not in {int(kind) for kind in Kind}  # kind 0 marks a malformed op


def test_the_new_keyed_kinds_are_routed_and_batched_like_get_set_del() -> None:
    new = {Kind.INCR, Kind.EXPIRE, Kind.LOCK, Kind.REFRESH, Kind.UNLOCK, Kind.FENCE_CHECK}
    assert new == protocol.NEW_COMMANDS
    assert new < protocol.KEYED_COMMANDS < protocol.COMMANDS
    assert Kind.EVENT not in protocol.COMMANDS


def test_codes_are_the_documented_ones() -> None:
    assert [int(k) for k in sorted(protocol.NEW_COMMANDS)] == [8, 9, 10, 11, 12, 13]
    assert (Kind.EVENT, Status.CONFLICT, Status.PRECONDITION) == (0x40, 6, 7)
    assert (Flag.NX, Flag.XX, Flag.EXT, Flag.VERSIONED, Flag.RETURN_OLD) == (8, 16, 32, 64, 128)
    assert (protocol.EXT_IF_VERSION, protocol.EXT_FENCE) == (1, 2)
    assert (MAX_LOCK_WAIT_MS, protocol.RESERVED_KEY_BYTE) == (300_000, 0)
    assert [int(e) for e in EventKind] == [1, 2, 3, 4, 5]


# --- byte layouts (docs/protocol.md, section 3) ----------------------------------------------


def _header(kind: int, flags: int = 0, request_id: int = 77, arg: int = 0, key: bytes = b"k"):
    return struct.pack("!BBBxQQ", 1, kind, flags, request_id, arg) + key


def test_the_layouts_are_the_documented_ones() -> None:
    # SET NX with a fence: flags NX|EXT, the value frame = ext_flags, token, name_len, name,
    # then the value.
    frames = encode_request(Request(Kind.SET, 5, b"k", b"val", nx=True, fence=(b"lk", 258)))
    assert frames == [
        _header(Kind.SET, 0x08 | 0x20, 5),
        b"\x02" + (258).to_bytes(8, "big") + b"\x00\x02" + b"lk" + b"val",
    ]
    # DEL if version 3: one more frame, the block alone.
    assert encode_request(Request(Kind.DEL, 5, b"k", if_version=3)) == [
        _header(Kind.DEL, 0x20, 5),
        b"\x01" + (3).to_bytes(8, "big"),
    ]
    # Both conditions: if_version first, then the fence.
    assert encode_ext(1, (b"n", 2)) == (
        b"\x03" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + b"\x00\x01n"
    )
    # INCR by -2 with a TTL: by is a signed big-endian 64-bit integer.
    assert encode_request(Request(Kind.INCR, 5, b"c", by=-2, ttl_ms=1000)) == [
        _header(Kind.INCR, 0x01, 5, 1000, b"c"),
        b"\xff" * 7 + b"\xfe",
    ]
    # EXPIRE without a TTL (persist): one frame, arg 0.
    assert encode_request(Request(Kind.EXPIRE, 5, b"k")) == [_header(Kind.EXPIRE, 0, 5)]
    # LOCK: ttl in arg, wait_ms:u32 in the value; REFRESH, UNLOCK, FENCE_CHECK: token:u64.
    assert encode_request(Request(Kind.LOCK, 5, b"l", ttl_ms=9, wait_ms=258)) == [
        _header(Kind.LOCK, 0x01, 5, 9, b"l"),
        b"\x00\x00\x01\x02",
    ]
    assert encode_request(Request(Kind.UNLOCK, 5, b"l", token=258)) == [
        _header(Kind.UNLOCK, 0, 5, 0, b"l"),
        (258).to_bytes(8, "big"),
    ]
    # A touch, stamped: TTL in arg's low bits, the stamp in its top 24.
    assert encode_request(Request(Kind.GET, 5, b"k", ttl_ms=7, stamp=3, versioned=True)) == [
        _header(Kind.GET, 0x01 | 0x04 | 0x40, 5, 3 << 40 | 7)
    ]
    # In a batch: value_len covers the whole value frame, block included.
    record = pack_request(Kind.DEL, 5, b"k", extra={"if_version": 3})
    assert record == struct.pack("!BBHIQQ", Kind.DEL, 0x20, 1, 9, 5, 0) + b"k" + b"\x01" + (
        3
    ).to_bytes(8, "big")


def test_a_read_drops_a_stamp_and_a_touch_keeps_it() -> None:
    read = encode_request(Request(Kind.GET, 1, b"k", stamp=5))
    assert read == [_header(Kind.GET, 0, 1)]
    assert pack_request(Kind.GET, 1, b"k", None, None, 5) == pack_request(Kind.GET, 1, b"k")
    touch = pack_request(Kind.GET, 1, b"k", None, 10, 5)
    assert touch[1] == 0x01 | 0x04
    # FENCE_CHECK is a read too: no stamp on the wire.
    check = encode_request(Request(Kind.FENCE_CHECK, 1, b"l", token=1, stamp=5))
    assert check[0] == _header(Kind.FENCE_CHECK, 0, 1, 0, b"l")


# --- refusals --------------------------------------------------------------------------------

_TOKEN = (5).to_bytes(8, "big")
_WAIT = (0).to_bytes(4, "big")
_BY = (1).to_bytes(8, "big", signed=True)
_IFV = b"\x01" + (1).to_bytes(8, "big")

# (kind, flags, arg, key, value or None) -> what the ERROR names. Each is refused alone (the
# value as a second frame) and as a batch record (the value as its value bytes).
MALFORMED = {
    # A flag the kind does not take is named.
    "NX on GET": ((Kind.GET, 0x08, 0, b"k", None), "flag NX does not apply to GET"),
    "XX on DEL": ((Kind.DEL, 0x10, 0, b"k", None), "flag XX does not apply to DEL"),
    "EXT on GET": ((Kind.GET, 0x20, 0, b"k", None), "flag EXT does not apply to GET"),
    "RETURN_OLD on DEL": ((Kind.DEL, 0x80, 0, b"k", None), "flag RETURN_OLD does not apply"),
    "VERSIONED on LOCK": (
        (Kind.LOCK, 0x41, 5, b"l", _WAIT),
        "flag VERSIONED does not apply to LOCK",
    ),
    "NX on INCR": ((Kind.INCR, 0x08, 0, b"c", _BY), "flag NX does not apply to INCR"),
    "KEYS_ONLY on INCR": ((Kind.INCR, 0x02, 0, b"c", _BY), "KEYS_ONLY does not apply to INCR"),
    "EXT on LOCK": ((Kind.LOCK, 0x21, 5, b"l", _IFV + _WAIT), "EXT does not apply to LOCK"),
    "TTL on UNLOCK": ((Kind.UNLOCK, 0x01, 5, b"l", _TOKEN), "TTL does not apply to UNLOCK"),
    "TTL on FENCE_CHECK": ((Kind.FENCE_CHECK, 1, 5, b"l", _TOKEN), "TTL does not apply to"),
    "STAMPED on FENCE_CHECK": (
        (Kind.FENCE_CHECK, 0x04, 0, b"l", _TOKEN),
        "flag STAMPED does not apply to FENCE_CHECK",
    ),
    "STAMPED read": (
        (Kind.GET, 0x04, 5 << 40, b"k", None),
        "flag STAMPED does not apply to GET without flag TTL",
    ),
    "NX and XX": ((Kind.SET, 0x18, 0, b"k", b"v"), "flags NX and XX cannot be combined"),
    # Reserved keys (and lock names): the workers' own.
    "NUL GET": ((Kind.GET, 0, 0, b"\x00k", None), "key starts with NUL (reserved)"),
    "NUL SET": ((Kind.SET, 0, 0, b"\x00", b"v"), "key starts with NUL (reserved)"),
    "NUL DEL": ((Kind.DEL, 0x04, 1 << 40, b"\x00lock\x00x", None), "starts with NUL"),
    "NUL INCR": ((Kind.INCR, 0, 0, b"\x00c", _BY), "key starts with NUL (reserved)"),
    "NUL EXPIRE": ((Kind.EXPIRE, 0, 0, b"\x00", None), "key starts with NUL (reserved)"),
    "NUL LOCK": ((Kind.LOCK, 1, 5, b"\x00l", _WAIT), "key starts with NUL (reserved)"),
    "NUL UNLOCK": ((Kind.UNLOCK, 0, 0, b"\x00", _TOKEN), "key starts with NUL (reserved)"),
    "empty lock name": ((Kind.FENCE_CHECK, 0, 0, b"", _TOKEN), "FENCE_CHECK needs a non-empty"),
    # TTL rules.
    "LOCK without TTL": ((Kind.LOCK, 0, 0, b"l", _WAIT), "LOCK needs flag TTL"),
    "REFRESH without TTL": ((Kind.REFRESH, 0, 0, b"l", _TOKEN), "REFRESH needs flag TTL"),
    "zero touch": ((Kind.GET, 0x01, 0, b"k", None), "ttl_ms must be between 1"),
    "absurd EXPIRE": ((Kind.EXPIRE, 0x01, TTL_MAX + 1, b"k", None), "ttl_ms must be between"),
    "arg on INCR": ((Kind.INCR, 0, 5, b"c", _BY), "INCR without flag TTL must have arg 0"),
    "arg on EXPIRE": ((Kind.EXPIRE, 0, 5, b"k", None), "EXPIRE must have arg 0"),
    "arg on UNLOCK": ((Kind.UNLOCK, 0, 5, b"l", _TOKEN), "UNLOCK must have arg 0"),
    # Values.
    "short INCR": ((Kind.INCR, 0, 0, b"c", b"\x01"), "INCR value must be by:i64 (8 bytes)"),
    "long INCR": ((Kind.INCR, 0, 0, b"c", _BY + b"!"), "got 9 bytes"),
    "empty INCR": ((Kind.INCR, 0, 0, b"c", b""), "INCR value must be by:i64 (8 bytes), got 0"),
    "short LOCK": ((Kind.LOCK, 1, 5, b"l", b"\x00"), "LOCK value must be wait_ms:u32"),
    "long wait": (
        (Kind.LOCK, 1, 5, b"l", (MAX_LOCK_WAIT_MS + 1).to_bytes(4, "big")),
        "wait_ms must be between 0 and 300000, got 300001",
    ),
    "short token": ((Kind.UNLOCK, 0, 0, b"l", b"\x00" * 7), "UNLOCK value must be token:u64"),
    "zero token": ((Kind.REFRESH, 1, 5, b"l", bytes(8)), "REFRESH token must be at least 1"),
    "EXPIRE value": ((Kind.EXPIRE, 0, 0, b"k", b"v"), "EXPIRE takes"),
    "after the block": (
        (Kind.DEL, 0x20, 0, b"k", _IFV + b"x"),
        "DEL takes no value after the extension block, got 1 bytes",
    ),
    # The extension block.
    "empty block": ((Kind.SET, 0x20, 0, b"k", b""), "flag EXT without an extension block"),
    "unknown ext bit": ((Kind.SET, 0x20, 0, b"k", b"\x04v"), "unknown extension bits 0x04"),
    "short if_version": ((Kind.DEL, 0x20, 0, b"k", b"\x01" + bytes(7)), "truncated in if_ver"),
    "short fence": ((Kind.DEL, 0x20, 0, b"k", b"\x02" + bytes(9)), "truncated in the fence"),
    "short fence name": (
        (Kind.DEL, 0x20, 0, b"k", b"\x02" + _TOKEN + b"\x00\x05abc"),
        "truncated in the fence's lock name",
    ),
    "empty fence name": (
        (Kind.INCR, 0x20, 0, b"c", b"\x02" + _TOKEN + b"\x00\x00" + _BY),
        "fence lock name of 0 bytes",
    ),
    "NUL fence name": (
        (Kind.EXPIRE, 0x20, 0, b"k", b"\x02" + _TOKEN + b"\x00\x01\x00"),
        "fence lock name: key starts with NUL (reserved)",
    ),
    "zero fence token": (
        (Kind.SET, 0x20, 0, b"k", b"\x02" + bytes(8) + b"\x00\x01l"),
        "fence token must be at least 1",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_a_malformed_request_alone_is_refused_naming_what_is_wrong(case: str) -> None:
    (kind, flags, arg, key, value), message = MALFORMED[case]
    frames = [_header(kind, flags, 77, arg, key)]
    if value is not None and (value or kind in (Kind.SET, Kind.INCR) or flags & 0x20):
        frames.append(value)
    with pytest.raises(ProtocolError, match=re.escape(message)) as raised:
        decode_request(frames)
    assert raised.value.request_id == 77
    assert peek_keyed_request(frames) is None
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode_from_broker(dispatch_frames(1, frames))


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_a_malformed_record_is_refused_alone_naming_what_is_wrong(case: str) -> None:
    (kind, flags, arg, key, value), message = MALFORMED[case]
    value = value or b""
    bad = struct.pack("!BBHIQQ", kind, flags, len(key), len(value), 7, arg) + key + value
    good = pack_request(Kind.INCR, 8, b"ok", extra={"by": 2})
    _, subs = split_batch(batch_frames(3, [good, bad, good]))
    assert [(sub[0], sub[1]) for sub in subs] == [(Kind.INCR, 8), (0, 7), (Kind.INCR, 8)]
    assert message in subs[1][2].decode()
    ops = decode_from_broker(dispatch_batch_frames(3, [good, bad])).ops  # type: ignore[union-attr]
    assert ops[1][:2] == (0, 7) and message in ops[1][2].decode()
    with pytest.raises(ProtocolError, match=re.escape(message)) as raised:
        decode_batch(batch_frames(3, [good, bad]))
    assert raised.value.request_id == 7


def test_a_frame_count_that_does_not_fit_the_kind_is_refused() -> None:
    cases = [
        ([_header(Kind.INCR)], "INCR takes 2 frame(s), got 1"),
        ([_header(Kind.LOCK, 1, arg=5)], "LOCK takes 2 frame(s), got 1"),
        ([_header(Kind.DEL, 0x20)], "DEL takes 2 frame(s), got 1"),  # EXT: the block's frame
        ([_header(Kind.EXPIRE), b""], "EXPIRE takes 1 frame(s), got 2"),
        ([_header(Kind.FENCE_CHECK), _TOKEN, b""], "FENCE_CHECK takes 2 frame(s), got 3"),
        # A flag the kind does not take explains it better than the frame count.
        ([_header(Kind.GET, 0x20), _IFV], "flag EXT does not apply to GET"),
    ]
    for frames, message in cases:
        with pytest.raises(ProtocolError, match=re.escape(message)):
            decode_request(frames)


BAD_REQUESTS = {
    "NX and XX": (Request(Kind.SET, 1, b"k", b"v", nx=True, xx=True), "NX and XX"),
    "NUL key": (Request(Kind.SET, 1, b"\x00k", b"v"), "key starts with NUL (reserved)"),
    "NUL touch": (Request(Kind.GET, 1, b"\x00", ttl_ms=5), "key starts with NUL (reserved)"),
    "LOCK without ttl": (Request(Kind.LOCK, 1, b"l"), "LOCK needs flag TTL"),
    "long wait": (
        Request(Kind.LOCK, 1, b"l", ttl_ms=1, wait_ms=MAX_LOCK_WAIT_MS + 1),
        "wait_ms must be between 0 and 300000",
    ),
    "negative wait": (Request(Kind.LOCK, 1, b"l", ttl_ms=1, wait_ms=-1), "LOCK wait_ms -1"),
    "no token": (Request(Kind.UNLOCK, 1, b"l"), "UNLOCK token must be at least 1"),
    "huge token": (Request(Kind.FENCE_CHECK, 1, b"l", token=2**64), "is not a u64"),
    "INCR overflow": (Request(Kind.INCR, 1, b"c", by=2**63), "not a signed 64-bit integer"),
    "INCR by bool": (Request(Kind.INCR, 1, b"c", by=True), "not a signed 64-bit integer"),
    "negative version": (Request(Kind.DEL, 1, b"k", if_version=-1), "if_version -1"),
    "fence token 0": (Request(Kind.SET, 1, b"k", b"v", fence=(b"l", 0)), "fence token 0"),
    "fence name NUL": (Request(Kind.SET, 1, b"k", b"v", fence=(b"\x00", 1)), "starts with NUL"),
    "fence name long": (
        Request(Kind.DEL, 1, b"k", fence=(b"l" * 65_536, 1)),
        "fence lock name of 65536 bytes",
    ),
    "zero TTL": (Request(Kind.EXPIRE, 1, b"k", ttl_ms=0), "ttl_ms must be between 1"),
    # An option the kind does not take is refused, never dropped.
    "NX on GET": (Request(Kind.GET, 1, b"k", nx=True), "flag NX does not apply to GET"),
    "RETURN_OLD on DEL": (Request(Kind.DEL, 1, b"k", return_old=True), "RETURN_OLD does not"),
    "keys_only on SET": (Request(Kind.SET, 1, b"k", b"v", keys_only=True), "KEYS_ONLY does not"),
    "VERSIONED on LOCK": (Request(Kind.LOCK, 1, b"l", ttl_ms=1, versioned=True), "VERSIONED"),
    "fence on LOCK": (
        Request(Kind.LOCK, 1, b"l", ttl_ms=1, fence=(b"m", 1)),
        "flag EXT does not apply to LOCK",
    ),
    "if_version on GET": (Request(Kind.GET, 1, b"k", if_version=1), "EXT does not apply to GET"),
    "by on SET": (Request(Kind.SET, 1, b"k", b"v", by=1), "by applies to INCR only, not SET"),
    "token on SET": (Request(Kind.SET, 1, b"k", b"v", token=1), "token does not apply to SET"),
    "wait on UNLOCK": (Request(Kind.UNLOCK, 1, b"l", token=1, wait_ms=5), "wait_ms applies to"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=str)
def test_the_encoders_refuse_what_the_decoders_would(case: str) -> None:
    request, message = BAD_REQUESTS[case]
    with pytest.raises(ProtocolError, match=re.escape(message)):
        encode_request(request)
    with pytest.raises(ProtocolError, match=re.escape(message)):
        pack_request(
            request.kind,
            request.request_id,
            request.key,
            request.value,
            request.ttl_ms,
            request.stamp,
            request_extra(request),
        )
    with pytest.raises(ProtocolError, match=re.escape(message)):
        encode_batch(Batch(1, (request,)))


def test_pack_request_refuses_what_no_batch_carries() -> None:
    with pytest.raises(ProtocolError, match="ALL cannot be sent in a batch"):
        pack_request(Kind.ALL, 1, b"k", extra={"keys_only": True})
    with pytest.raises(ProtocolError, match="unknown command 0x40"):
        pack_request(Kind.EVENT, 1, b"k")


def test_the_plain_fast_paths_refuse_a_reserved_key() -> None:
    """A NUL key must not slip through the shortcuts of GET, SET and DEL (it did before)."""
    for frames in (
        [_header(Kind.GET, key=b"\x00lock\x00x")],
        [_header(Kind.SET, key=b"\x00fence\x00x"), b"v"],
        [_header(Kind.DEL, 0x04, arg=1 << 40, key=b"\x00")],
    ):
        assert peek_keyed_request(frames) is None
        assert peek_keyed_dispatch(dispatch_frames(1, frames)) is None
        with pytest.raises(ProtocolError, match=re.escape("key starts with NUL (reserved)")):
            decode_request(frames)
        record = request_record(frames)
        assert split_batch(batch_frames(1, [record]))[1][0][0] == 0
    for kind, value in ((Kind.GET, None), (Kind.SET, b"v"), (Kind.DEL, None)):
        with pytest.raises(ProtocolError, match="NUL"):
            pack_request(kind, 1, b"\x00k", value)
    # A listing cursor is no key: it may start with NUL.
    assert decode_request([_header(Kind.ALL, key=b"\x00")]).key == b"\x00"


# --- the extension block ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("if_version", "fence"),
    [(None, None), (0, None), (U64_MAX, None), (None, (b"l", 1)), (5, (b"\xff" * 300, U64_MAX))],
)
def test_the_extension_block_round_trips(if_version, fence) -> None:
    block = encode_ext(if_version, fence)
    assert block[0] == (if_version is not None) | (fence is not None) << 1
    got_version, got_fence, rest = split_ext(block + b"tail")
    assert (got_version, got_fence, bytes(rest)) == (if_version, fence, b"tail")


# --- reply bodies ----------------------------------------------------------------------------


def test_reply_bodies_round_trip_with_their_layouts() -> None:
    assert versioned_body(258, b"v") == (258).to_bytes(8, "big") + b"v"
    assert split_versioned(versioned_body(258, b"v")) == (258, b"v")
    assert split_versioned(versioned_body(U64_MAX)) == (U64_MAX, b"")
    assert incr_body(3, -1) == (3).to_bytes(8, "big") + b"\xff" * 8
    for value in (-(2**63), -1, 0, 2**63 - 1):
        assert split_incr_body(incr_body(U64_MAX, value)) == (U64_MAX, value)
    assert token_body(9) == (9).to_bytes(8, "big") and split_token_body(token_body(9)) == 9
    assert encode_old_item(7, None) == (7).to_bytes(8, "big") + b"\x00"
    assert (
        encode_old_item(7, (5, 1234, b"old"))
        == ((7).to_bytes(8, "big") + b"\x01" + (5).to_bytes(8, "big") + (1234).to_bytes(8, "big"))
        + b"old"
    )
    for old in (None, (0, None, b""), (5, 1234, b"old"), (U64_MAX, U64_MAX, b"\x00" * 100)):
        assert decode_old_item(encode_old_item(9, old)) == (9, old)


@pytest.mark.parametrize(
    ("decode", "body", "message"),
    [
        (split_versioned, None, "versioned body of 0 bytes"),
        (split_versioned, b"\x00" * 7, "versioned body of 7 bytes, need 8"),
        (split_incr_body, b"\x00" * 15, "INCR body of 15 bytes, need 16"),
        (split_incr_body, b"\x00" * 17, "INCR body of 17 bytes"),
        (split_token_body, b"\x00" * 9, "token body of 9 bytes, need 8"),
        (decode_old_item, b"\x00" * 8, "RETURN_OLD body of 8 bytes"),
        (decode_old_item, b"\x00" * 9 + b"x", "without an item has 1 extra bytes"),
        (decode_old_item, b"\x00" * 8 + b"\x02", "had is 2, not 0 or 1"),
        (decode_old_item, b"\x00" * 8 + b"\x01" + b"\x00" * 15, "need at least 25"),
    ],
)
def test_malformed_reply_bodies_are_refused(decode, body, message) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode(body)


def test_reply_body_encoders_refuse_out_of_range_numbers() -> None:
    with pytest.raises(ProtocolError):
        incr_body(1, 2**63)
    with pytest.raises(ProtocolError):
        versioned_body(-1)
    with pytest.raises(ProtocolError):
        encode_old_item(1, (2**64, None, b""))
    with pytest.raises(ProtocolError):
        token_body(2**64)


# --- events ----------------------------------------------------------------------------------

EVENTS = [
    Event(b"k", EventKind.SET, 0, protocol.event_seq(1, 1), 1, 1_700_000_000_000),
    Event(b"user:1", EventKind.DELETE, 7, protocol.event_seq(2**32 - 1, 2**32 - 1), U64_MAX),
    Event(b"\xff" * 65_535, EventKind.EXPIRE, 0xFFFF_FFFE, U64_MAX, 0, None),
    Event(b"n", EventKind.INCR, 3, 5, 6, U64_MAX),
    Event(b"s", EventKind.TTL, 3, 0, 6, None),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.event.name)
def test_events_round_trip(event: Event) -> None:
    frames = encode_event(event)
    assert frames[0] == event.key  # first: ZeroMQ subscriptions filter on its prefix
    assert len(frames[1]) == protocol.EVENT_HEADER_BYTES == 32
    assert decode_event(frames) == event


def test_an_owner_epoch_folds_into_a_stream_that_changes_with_the_owner() -> None:
    assert protocol.event_stream(7) == 7  # a leader epoch
    broker = 1_700_000_000 << 32  # ownership epochs are broker tokens
    assert protocol.event_stream(broker | 5) != protocol.event_stream(broker | 6)
    assert protocol.event_stream(broker | 5) != protocol.event_stream((broker + (1 << 32)) | 5)
    assert protocol.event_stream(U64_MAX) == 0 and protocol.event_stream(2**32) == 1
    with pytest.raises(ProtocolError):
        protocol.event_stream(2**64)


def test_the_event_layout_is_the_documented_one() -> None:
    seq = protocol.event_seq(3, 4)
    assert seq == 3 << 32 | 4 and protocol.split_event_seq(seq) == (3, 4)
    frames = encode_event(Event(b"key", EventKind.EXPIRE, 2, seq, 258, 1000))
    assert frames == [
        b"key",
        b"\x01\x40\x03\x00"
        + (2).to_bytes(4, "big")
        + seq.to_bytes(8, "big")
        + (258).to_bytes(8, "big")
        + (1000).to_bytes(8, "big"),
    ]


def test_the_unchecked_event_header_is_encode_events() -> None:
    for event in EVENTS:
        header = protocol.event_header(
            event.event, event.shard, event.seq, event.version, event.deadline_ms or 0
        )
        assert [event.key, header] == encode_event(event)


_EVENT_HEADER = encode_event(Event(b"k", EventKind.SET, 1, 2, 3, 4))[1]

MALFORMED_EVENTS = {
    "one frame": ([_EVENT_HEADER], "EVENT takes 2 frames, got 1"),
    "three frames": ([b"k", _EVENT_HEADER, b""], "EVENT takes 2 frames, got 3"),
    "short header": ([b"k", _EVENT_HEADER[:31]], "EVENT header of 31 bytes, expected 32"),
    "version": ([b"k", b"\x02" + _EVENT_HEADER[1:]], "unsupported protocol version 2"),
    "kind": ([b"k", _EVENT_HEADER[:1] + b"\x10" + _EVENT_HEADER[2:]], "expected EVENT, got REPLY"),
    "event": ([b"k", _EVENT_HEADER[:2] + b"\x06" + _EVENT_HEADER[3:]], "unknown event 6"),
    "no event": ([b"k", _EVENT_HEADER[:2] + b"\x00" + _EVENT_HEADER[3:]], "unknown event 0"),
    "shard": ([b"k", _EVENT_HEADER[:4] + b"\xff" * 4 + _EVENT_HEADER[8:]], "shard 0xFFFFFFFF"),
    "empty key": ([b"", _EVENT_HEADER], "EVENT key of 0 bytes"),
    "long key": ([b"k" * 65_536, _EVENT_HEADER], "EVENT key of 65536 bytes"),
    "reserved key": ([b"\x00lock\x00l", _EVENT_HEADER], "key starts with NUL (reserved)"),
}


@pytest.mark.parametrize("case", MALFORMED_EVENTS, ids=str)
def test_malformed_events_are_refused_naming_what_is_wrong(case: str) -> None:
    frames, message = MALFORMED_EVENTS[case]
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode_event(frames)


def test_the_event_encoder_refuses_what_the_decoder_would() -> None:
    for event in (
        Event(b"", EventKind.SET, 0, 1, 1),
        Event(b"\x00x", EventKind.SET, 0, 1, 1),
        Event(b"k", EventKind.SET, protocol.NO_SHARD, 1, 1),
        Event(b"k", EventKind.SET, 0, 2**64, 1),
        Event(b"k", EventKind.SET, 0, 1, -1),
        Event(b"k", 9, 0, 1, 1),  # type: ignore[arg-type]
    ):
        with pytest.raises(ProtocolError):
            encode_event(event)
    with pytest.raises(ProtocolError):
        protocol.event_seq(2**32, 1)


# --- properties ------------------------------------------------------------------------------


def _random_request(rng: random.Random, request_id: int) -> Request:
    """A valid request of a keyed kind, with random options among those the kind takes."""
    kind = rng.choice(sorted(protocol.KEYED_COMMANDS))
    key = rng.choice((b"k", b"\xff\x00", b"key" * rng.randrange(1, 50)))
    ttl = rng.choice((None, 1, rng.randrange(1, TTL_MAX), TTL_MAX))
    stamp = rng.choice((None, 0, rng.randrange(protocol.STAMP_MODULUS)))
    ext = {}
    if kind in (Kind.SET, Kind.DEL, Kind.INCR, Kind.EXPIRE):
        if rng.random() < 0.5:
            ext["if_version"] = rng.choice((0, 1, U64_MAX, rng.randrange(2**64)))
        if rng.random() < 0.5:
            ext["fence"] = (rng.choice((b"l", b"lock", b"\x01" * 40)), rng.randrange(1, 2**64))
        ext["versioned"] = rng.random() < 0.5
    fields: dict = {"stamp": stamp, **ext}
    if kind == Kind.SET:
        cond = rng.choice(({}, {"nx": True}, {"xx": True}))
        return Request(
            kind,
            request_id,
            key,
            rng.randbytes(rng.randrange(50)),
            ttl,
            return_old=rng.random() < 0.3,
            **cond,
            **fields,
        )
    if kind == Kind.DEL:
        return Request(kind, request_id, key, **fields)
    if kind == Kind.INCR:
        by = rng.choice((0, 1, -1, -(2**63), 2**63 - 1, rng.randrange(-(2**63), 2**63)))
        return Request(kind, request_id, key, None, ttl, by=by, **fields)
    if kind == Kind.EXPIRE:
        return Request(kind, request_id, key, None, ttl, **fields)
    if kind == Kind.GET:
        touch = rng.choice((None, ttl or 1))
        return Request(
            kind,
            request_id,
            key,
            None,
            touch,
            keys_only=rng.random() < 0.3,
            stamp=stamp if touch is not None else None,
            versioned=rng.random() < 0.5,
        )
    if kind == Kind.LOCK:
        wait = rng.choice((0, MAX_LOCK_WAIT_MS, rng.randrange(MAX_LOCK_WAIT_MS)))
        return Request(kind, request_id, key, None, ttl or 1, stamp=stamp, wait_ms=wait)
    token = rng.choice((1, U64_MAX, rng.randrange(1, 2**64)))
    if kind == Kind.REFRESH:
        return Request(kind, request_id, key, None, ttl or 1, stamp=stamp, token=token)
    if kind == Kind.UNLOCK:
        return Request(kind, request_id, key, stamp=stamp, token=token)
    return Request(kind, request_id, key, token=token)  # FENCE_CHECK


def test_random_requests_read_the_same_alone_in_a_batch_and_at_the_worker() -> None:
    rng = random.Random(12)
    requests = [_random_request(rng, request_id) for request_id in range(1, 1500)]
    for request in requests:
        frames = encode_request(request)
        assert decode_request(frames) == request, request
        assert decode_from_broker(dispatch_frames(1, frames)) == Dispatch(1, request)
    frames = encode_batch(Batch(5, tuple(requests)))
    assert decode_batch(frames) == Batch(5, tuple(requests))
    ops = _worker_ops(frames)
    for op, request in zip(ops, requests, strict=True):
        if op[0] == EXTENDED_OP:
            r = request
            assert op == (EXTENDED_OP, r.request_id, r.key, r, r.ttl_ms, r.stamp)
        else:  # a plain GET, SET or DEL: the fast path's tuple
            assert request_extra(request) is None and op[:3] == (
                request.kind,
                request.request_id,
                request.key,
            )


_FITTING = {
    Kind.SET: b"v",
    Kind.INCR: _BY,
    Kind.LOCK: _WAIT,
    Kind.REFRESH: _TOKEN,
    Kind.UNLOCK: _TOKEN,
    Kind.FENCE_CHECK: _TOKEN,
}


def test_random_headers_read_the_same_alone_and_as_a_record() -> None:
    """One set of rules: for any fields, a lone request and the same fields as a batch record
    are both accepted as the same Request, or both refused with the same message."""
    rng = random.Random(13)
    fence = b"\x02" + _TOKEN + b"\x00\x01l"
    values = [None, b"", _TOKEN, _WAIT, _BY, _IFV, _IFV + _BY, fence, fence + _BY, b"\x00"]
    accepted = 0
    for _ in range(6000):
        kind = rng.choice((*sorted(protocol.KEYED_COMMANDS), 0x7E))
        # Mostly flags the kind takes (else nearly every case is "flag X does not apply").
        allowed = protocol._ALLOWED_FLAGS.get(kind, 0)  # type: ignore[call-overload]
        flags = rng.choice(
            (0, allowed & rng.randrange(256), allowed & rng.randrange(256), 1 << rng.randrange(8))
        )
        arg = rng.choice((5, 5, 0, TTL_MAX + 1) if flags & 0x01 else (0, 0, 5))
        arg |= rng.choice((0, 3 << protocol.STAMP_SHIFT))
        key = rng.choice((b"k", b"k", b"k", b"k", b"k", b"\x00", b""))
        value = rng.choice(values)
        if rng.random() < 0.6:  # mostly the value the kind takes
            value = _FITTING.get(kind)
            if flags & 0x20:
                value = rng.choice((_IFV, fence, b"\x00")) + (value or b"")
        alone = [_header(kind, flags, 9, arg, key)] + ([] if value is None else [value])
        record = struct.pack("!BBHIQQ", kind, flags, len(key), len(value or b""), 9, arg)
        record += key + (value or b"")
        try:
            request = decode_request(alone)
        except ProtocolError as exc:
            request, alone_error = None, str(exc)
        try:
            [in_batch] = decode_batch(batch_frames(1, [record])).requests
        except ProtocolError as exc:
            in_batch, batch_error = None, str(exc)
        if request is not None:
            accepted += 1
            # Accepted alone: the record holds the same fields (an empty value frame alone
            # is the only difference a record cannot show, and the kinds that take none
            # refuse one alone).
            assert in_batch == request, (kind, flags, arg, key, value)
        elif in_batch is not None:
            # Refused alone, accepted in a batch: only for want of the value frame that a
            # record's value_len 0 stands for.
            assert "frame(s)" in alone_error, (kind, flags, arg, key, value, alone_error)
        elif "frame(s)" not in alone_error:
            assert alone_error == batch_error, (kind, flags, arg, key, value)
    assert accepted > 600  # the acceptances are compared too, not only the refusals


def test_the_fast_request_init_keeps_the_dataclass_contract() -> None:
    """Request's __init__ is generated by zkv.protocol._fast_init (speed): the same fields,
    order, defaults, keywords, immutability, equality and hash as the dataclass's own."""
    import dataclasses

    names = [field.name for field in dataclasses.fields(Request)]
    assert " ".join(names) == (
        "kind request_id key value ttl_ms limit keys_only stamp "
        "nx xx if_version fence versioned return_old by token wait_ms"
    )
    full = Request(Kind.SET, 1, b"k", b"v", 5, 0, False, 3, True, False, 7, (b"l", 2), True)
    assert (full.nx, full.if_version, full.fence, full.versioned, full.by) == (
        True,
        7,
        (b"l", 2),
        True,
        0,
    )
    assert Request(Kind.GET, 1) == Request(kind=Kind.GET, request_id=1, key=b"", value=None)
    assert dataclasses.replace(full, request_id=9).request_id == 9
    assert hash(full) == hash(dataclasses.replace(full))
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.key = b"x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Request(Kind.GET)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Request(Kind.GET, 1, colour=1)  # type: ignore[call-arg]
