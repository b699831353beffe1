"""The replication frames (FOLLOW, SNAPSHOT, RECORDS, ACK, REFUSE): round trips, every bound,
and a fuzz of the decoders (random and mutated frames raise nothing but ProtocolError)."""

from __future__ import annotations

import random
import struct

import pytest

from zkv import protocol as p
from zkv.protocol import (
    Ack,
    Follow,
    Kind,
    ProtocolError,
    Records,
    Refuse,
    SnapshotChunk,
    decode_to_follower,
    decode_to_leader,
    encode_replication,
)

pytestmark = pytest.mark.unit

U64 = p.U64_MAX
RECORD = b"r" * 40  # stands for log records: the codec does not parse the body

TO_LEADER = [
    Follow(0, 1, "w1"),
    Follow(7, U64, "é" * 127, have_seq=0),
    Follow(p.NO_SHARD - 1, 5, "x" * 255, have_seq=U64),
    Ack(0, 1, 0),
    Ack(3, U64, U64, chunk=0xFFFF_FFFF),
    Ack(3, 9, 12, chunk=0),
    Refuse(1, 2, ""),
    Refuse(1, 2, "following epoch 2"),
]
TO_FOLLOWER = [
    SnapshotChunk(0, 1, 0, 0, False, b"Z"),
    SnapshotChunk(2, U64, U64, 0xFFFF_FFFF, True, b"s" * p.MAX_SNAPSHOT_CHUNK_BYTES),
    Records(0, 1, 1, 1, RECORD),
    Records(4, 8, U64, 1, RECORD),
    Records(4, 8, 10, 2, RECORD),
    Records(4, 8, 10, 1, b"x" * (p.MAX_RECORDS_BYTES + 1)),
]


@pytest.mark.parametrize("message", TO_LEADER)
def test_round_trip_to_leader(message) -> None:
    assert decode_to_leader(encode_replication(message)) == message


@pytest.mark.parametrize("message", TO_FOLLOWER)
def test_round_trip_to_follower(message) -> None:
    assert decode_to_follower(encode_replication(message)) == message


def test_records_last_seq() -> None:
    assert Records(0, 1, 10, 3, RECORD * 3).last_seq == 12


@pytest.mark.parametrize(
    "message",
    [
        Follow(0, 0, "w"),  # epoch 0
        Follow(0, U64 + 1, "w"),
        Follow(p.NO_SHARD, 1, "w"),
        Follow(-1, 1, "w"),
        Follow(0, 1, ""),
        Follow(0, 1, "x" * 256),
        Follow(0, 1, "w", have_seq=U64 + 1),
        Follow(0, 1, "w", have_seq=-1),
        SnapshotChunk(0, 1, 0, 0, False, b""),
        SnapshotChunk(0, 1, 0, 0, False, b"s" * (p.MAX_SNAPSHOT_CHUNK_BYTES + 1)),
        SnapshotChunk(0, 1, 0, 2**32, False, b"s"),
        SnapshotChunk(0, 1, U64 + 1, 0, False, b"s"),
        Records(0, 1, 0, 1, RECORD),  # seq 0 is the snapshot base, never a batch
        Records(0, 1, 1, 0, RECORD),
        Records(0, 1, 1, 3, RECORD),  # more batches than 17-byte records fit
        Records(0, 1, U64, 2, RECORD),  # runs past the u64
        Records(0, 1, 1, 2, b"x" * (p.MAX_RECORDS_BYTES + 1)),
        Records(0, 1, 1, 1, b"x" * (p.MAX_RECORD_BYTES + 1)),
        Ack(0, 0, 1),
        Ack(0, 1, U64 + 1),
        Ack(0, 1, 1, chunk=2**32),
        Refuse(0, 0, "why"),
    ],
)
def test_encoder_refuses_what_decoders_refuse(message) -> None:
    with pytest.raises(ProtocolError):
        encode_replication(message)


def test_refuse_reason_is_cut_to_its_bound() -> None:
    frames = encode_replication(Refuse(0, 1, "y" * 5000))
    assert len(frames[1]) == p.MAX_REFUSE_REASON_BYTES
    assert decode_to_leader(frames).reason == "y" * 1024


def _follow(flags=0, id_len=1, shard=0, epoch=1, have_seq=0, name=b"w") -> list[bytes]:
    return [struct.pack("!BBBBIQQ", 1, Kind.FOLLOW, flags, id_len, shard, epoch, have_seq) + name]


def _ack(flags=0, shard=0, epoch=1, seq=1, chunk=0) -> list[bytes]:
    return [struct.pack("!BBBxIQQI", 1, Kind.ACK, flags, shard, epoch, seq, chunk)]


def _snapshot(flags=0, shard=0, epoch=1, seq=0, chunk=0, body=b"s") -> list[bytes]:
    return [struct.pack("!BBBxIQQI", 1, Kind.SNAPSHOT, flags, shard, epoch, seq, chunk), body]


def _records(shard=0, epoch=1, first=1, count=1, body=RECORD) -> list[bytes]:
    return [struct.pack("!BBxxIQQI", 1, Kind.RECORDS, shard, epoch, first, count), body]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\x01"],
        [b"\x02\x30"],  # another version
        [b"\x01\x3f"],  # an unknown kind in the replication range
        _follow(flags=2),
        _follow(id_len=0, name=b""),
        _follow(id_len=2),  # says 2 bytes, has 1
        _follow(name=b"\xff"),
        _follow(have_seq=5),  # have_seq without RESUME
        _follow(epoch=0),
        _follow(shard=p.NO_SHARD),
        [*_follow(), b"extra"],
        [_follow()[0][:10]],
        _ack(flags=2),
        _ack(chunk=3),  # chunk_no without CHUNK
        _ack(epoch=0),
        [_ack()[0] + b"x"],
        [*_ack(), b""],
        [struct.pack("!BBxxIQ", 1, Kind.REFUSE, 0, 1)],  # no reason frame
        [struct.pack("!BBxxIQ", 1, Kind.REFUSE, 0, 1), b"\xff"],
        [struct.pack("!BBxxIQ", 1, Kind.REFUSE, 0, 1), b"r" * 1025],
        [struct.pack("!BBxxIQ", 1, Kind.REFUSE, 0, 0), b""],
        _snapshot(),  # a follower-bound kind sent to the leader
        _records(),
        [struct.pack("!BBHIQQ", 1, Kind.READY, 0, 0, 0, 0)],
    ],
)
def test_leader_decoder_refuses(frames) -> None:
    with pytest.raises(ProtocolError):
        decode_to_leader(frames)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\x01"],
        _snapshot(flags=2),
        _snapshot(body=b""),
        _snapshot(body=b"s" * (p.MAX_SNAPSHOT_CHUNK_BYTES + 1)),
        _snapshot(epoch=0),
        _snapshot()[:1],
        [_snapshot()[0][:-1], b"s"],
        _records(first=0),
        _records(count=0),
        _records(count=3),
        _records(first=U64, count=2, body=RECORD * 2),
        _records(count=2, body=b"x" * (p.MAX_RECORDS_BYTES + 1)),
        _records(body=b"x" * (p.MAX_RECORD_BYTES + 1)),
        _records(epoch=0),
        _records(shard=p.NO_SHARD),
        [*_records(), b"more"],
        _follow(),  # a leader-bound kind sent to a follower
        _ack(),
    ],
)
def test_follower_decoder_refuses(frames) -> None:
    with pytest.raises(ProtocolError):
        decode_to_follower(frames)


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    out = []
    for frame in frames:
        data = bytearray(frame)
        for _ in range(rng.randint(0, 4)):
            roll = rng.random()
            if roll < 0.4 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif roll < 0.6 and data:
                del data[rng.randrange(len(data)) :]
            elif roll < 0.8:
                data[rng.randrange(len(data) + 1) : 0] = rng.randbytes(rng.randint(1, 9))
            else:
                data += data[:3]  # a repeated tail
        out.append(bytes(data))
    roll = rng.random()
    if roll < 0.1:
        out.append(rng.randbytes(rng.randint(0, 5)))
    elif roll < 0.2 and out:
        out.pop()
    return out


def test_fuzz_replication_decoders_raise_only_protocol_error() -> None:
    rng = random.Random(2026)
    seeds = [encode_replication(m) for m in TO_LEADER + TO_FOLLOWER[:3]]
    decoded = 0
    for _ in range(20_000):
        if rng.random() < 0.2:
            frames = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 3))]
            if frames and frames[0] and rng.random() < 0.8:
                head = bytearray(frames[0].ljust(2, b"\0"))
                head[0], head[1] = 1, rng.randint(0x30, 0x35)
                frames[0] = bytes(head)
        else:
            frames = _mutate(rng, list(rng.choice(seeds)))
        for decode in (decode_to_leader, decode_to_follower):
            try:
                message = decode(frames)
            except ProtocolError:
                continue
            decoded += 1
            # Whatever decodes is a message the encoder accepts and reproduces.
            assert decode(encode_replication(message)) == message
    assert decoded > 1000  # the mutations do not only produce garbage
