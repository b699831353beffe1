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
CASES = 4000
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
