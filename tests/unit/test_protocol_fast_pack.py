"""pack_request's fast path for the issue-12 options (_pack_extra) against its general path
(_pack_any): the same record, byte for byte, or the same refusal, for every option
combination, drawn at random with a fixed seed."""

from __future__ import annotations

import random

import pytest

from zkv import protocol
from zkv.protocol import (
    MAX_KEY_BYTES,
    MAX_TTL_MS,
    MAX_VALUE_BYTES,
    U64_MAX,
    Kind,
    ProtocolError,
    batch_frames,
    decode_batch,
    pack_request,
)

pytestmark = pytest.mark.unit

KINDS = [Kind.GET, Kind.SET, Kind.DEL, Kind.INCR, Kind.EXPIRE, Kind.LOCK, Kind.UNLOCK]
CASES = 2500
TAKES = {
    Kind.GET: {"versioned", "keys_only"},
    Kind.SET: {"nx", "xx", "versioned", "if_version"},
    Kind.DEL: {"versioned", "if_version"},
    Kind.INCR: {"versioned", "if_version", "by"},
    Kind.EXPIRE: {"versioned", "if_version"},
}
VALID = {"if_version": [0, 7, U64_MAX], "by": [0, 1, -1, 2**63 - 1, -(2**63)]}
BIG_VALUES = [b"y" * MAX_VALUE_BYTES, b"z" * (MAX_VALUE_BYTES - 9), b"w" * (MAX_VALUE_BYTES - 8)]


def general(*args: object) -> bytes | str:
    """The general path's record, or its refusal's message."""
    try:
        return protocol._pack_any(*args)  # type: ignore[arg-type]
    except (ProtocolError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def fast(*args: object) -> bytes | str:
    try:
        return pack_request(*args)  # type: ignore[arg-type]
    except (ProtocolError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def draw(rng: random.Random) -> tuple:
    kind = rng.choice(KINDS)
    key = rng.choice([b"k", b"key:%d" % rng.randrange(10**6), b"\x00x", b"", b"k" * MAX_KEY_BYTES])
    value = rng.choice([None, b"", b"v", b"x" * rng.randrange(64)])
    if rng.random() < 0.02:  # at the value limit, with and without room for the block
        value = rng.choice(BIG_VALUES)
    ttl_ms = rng.choice([None, None, None, 1, rng.randrange(1, MAX_TTL_MS), MAX_TTL_MS])
    if rng.random() < 0.1:
        ttl_ms = rng.choice([0, -5, MAX_TTL_MS + 1])
    stamp = rng.choice([None, 0, rng.randrange(2**40), 1_765_000_000])
    extra: dict[str, object] = {}
    options = {
        "nx": [True, False, 1],
        "xx": [True, False],
        "versioned": [True, False],
        "keys_only": [True, False],
        "if_version": [None, 0, 7, U64_MAX, U64_MAX + 1, -1, True],
        "by": [0, 1, -1, 2**63 - 1, -(2**63), 2**63, True, 1.5],
        "return_old": [True],
        "fence": [(b"L", 3)],
        "token": [5],
        "wait_ms": [10],
    }
    takes = TAKES.get(kind, set())
    picky = rng.random() < 0.7  # mostly the options the kind takes, with valid values
    for name, choices in options.items():
        if picky and name not in takes:
            continue
        if picky:
            choices = [c for c in choices if c in VALID.get(name, choices)] or choices
        if rng.random() < (0.05 if name in ("return_old", "fence", "token", "wait_ms") else 0.35):
            extra[name] = rng.choice(choices)
    request_id = rng.randrange(1, 2**64)
    return kind, request_id, key, value, ttl_ms, stamp, extra


def test_the_fast_path_packs_every_option_combination_as_the_general_path() -> None:
    rng = random.Random(12)
    taken = 0
    for _ in range(CASES):
        args = draw(rng)
        expected = general(*args)
        assert fast(*args) == expected, args
        key = args[2]
        if key and len(key) <= MAX_KEY_BYTES and key[0] and protocol._pack_extra(*args):
            taken += 1
    assert taken > CASES // 8  # the fast path was exercised, not only the fallback


@pytest.mark.parametrize(
    ("kind", "value", "ttl_ms", "extra"),
    [
        (Kind.INCR, None, None, {"by": 1}),
        (Kind.INCR, None, 5000, {"by": -3, "versioned": True, "if_version": 4}),
        (Kind.SET, b"v", None, {"nx": True}),
        (Kind.SET, b"v", 100, {"xx": True}),
        (Kind.SET, b"v", None, {"if_version": 9}),
        (Kind.SET, b"v", None, {"versioned": True}),
        (Kind.GET, None, None, {"versioned": True}),
        (Kind.GET, None, 2000, {"versioned": True, "keys_only": True}),
        (Kind.EXPIRE, None, 5000, {}),
        (Kind.EXPIRE, None, None, {"versioned": True}),
        (Kind.DEL, None, None, {"if_version": 2}),
    ],
)
def test_the_common_issue12_ops_take_the_fast_path_and_decode_back(
    kind: Kind, value: bytes | None, ttl_ms: int | None, extra: dict
) -> None:
    args = (int(kind), 77, b"key", value, ttl_ms, 1_765_000_000, extra)
    record = protocol._pack_extra(*args)  # type: ignore[arg-type]
    assert record is not None and record == protocol._pack_any(*args)  # type: ignore[arg-type]
    (request,) = decode_batch(batch_frames(1, [record])).requests
    assert request.kind == kind and request.key == b"key" and request.ttl_ms == ttl_ms
    for name, wanted in extra.items():
        assert getattr(request, name) == wanted


# --- the splitters' fast path for the same records -------------------------------------------

HEAD = protocol._SUB_REQUEST


def mutate(record: bytes, rng: random.Random) -> bytes:
    """The record with its kind, flags, arg or a value byte changed (the framing kept)."""
    data = bytearray(record)
    where = rng.choice(["kind", "flags", "arg", "value", "ext"])
    if where == "kind":
        data[0] = rng.choice([int(k) for k in KINDS] + [0x0D, 0x0B])
    elif where == "flags":
        data[1] ^= 1 << rng.randrange(8)
    elif where == "arg":
        data[16 + rng.randrange(8)] ^= 1 << rng.randrange(8)
    elif where == "ext":  # the value's first byte: an extension block's bits
        key_end = HEAD.size + HEAD.unpack_from(record)[2]
        if key_end < len(data):
            data[key_end] = rng.choice([0, 2, 3, 0x41])
    elif where == "value" and len(data) > HEAD.size:
        index = rng.randrange(HEAD.size, len(data))
        data[index] = rng.choice([0, 1, 2, 3, 0x41, 0xFF])
    return bytes(data)


def general_read(record: bytes) -> object:
    """What _record_request makes of a record: its Request, or its error's message."""
    kind, flags, key_len, _, request_id, arg = HEAD.unpack_from(record)
    key_end = HEAD.size + key_len
    try:
        return protocol._record_request(
            kind, flags, arg, record[HEAD.size : key_end], record[key_end:], request_id
        )
    except ProtocolError as exc:
        return str(exc)


def test_the_splitters_read_every_record_as_the_general_path() -> None:
    rng = random.Random(1212)
    fast_reads = 0
    for _ in range(CASES):
        args = draw(rng)
        record = general(*args)
        if not isinstance(record, bytes):
            continue
        for variant in [record] + [mutate(record, rng) for _ in range(2)]:
            fast_reads += check_split(variant)
    assert fast_reads > CASES // 10


def check_split(record: bytes) -> int:
    """Assert the splitters read ``record`` as the general path; 1 if their fast path read it."""
    (op,) = protocol._split_requests(record, 1, 0, True)
    (sub,) = protocol._split_requests(record, 1, 0, False)
    if op[0] not in (0, protocol.EXTENDED_OP):
        return 0  # a plain GET, SET or DEL: the older fast path, tested elsewhere
    expected = general_read(record)
    if isinstance(expected, str):
        assert op[:3] == (0, op[1], expected.encode()) and sub[0] == 0, record
        return 0
    assert op == (
        protocol.EXTENDED_OP,
        expected.request_id,
        expected.key,
        expected,
        expected.ttl_ms,
        expected.stamp,
    ), record
    assert sub == (record[0], expected.request_id, expected.key, record), record
    kind, flags, _, _, _, arg = HEAD.unpack_from(record)
    stamp_free = (flags & ~0x04, arg & protocol.ARG_MASK) if kind != Kind.GET else (flags, arg)
    if kind in protocol._FAST_EXTENDED and protocol._extended_fields(
        kind, *stamp_free, record, HEAD.size, HEAD.size + len(expected.key), len(record)
    ):
        return 1
    return 0
