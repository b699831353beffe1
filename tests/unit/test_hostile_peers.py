"""Peers that lie: the exact messages of issue 10 item 14, owner files in any state, a bounded
fuzz of the control decoders and of the broker's worker side, and rate-limited peer logs."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from broker.core import Broker, Side
from tests.unit.test_broker_core import CONFIG, Harness, key_for
from workers.ownership import (
    ERA_FILE_BYTES,
    ERA_MARKER,
    ERA_UNIT,
    OwnershipError,
    reportable,
)
from workers.persist import Durability, ShardFiles
from zkv.logs import LogLimiter, peer
from zkv.protocol import (
    MAX_REPORTED_EPOCH,
    MAX_REPORTED_TOKEN,
    U64_MAX,
    Assign,
    Disconnect,
    Heartbeat,
    Kind,
    ProtocolError,
    Ready,
    Reply,
    Request,
    Status,
    decode_from_broker,
    decode_from_worker,
    encode_control,
    encode_reply,
)

pytestmark = pytest.mark.unit

ROGUE = b"rogue"


def assigns(h: Harness) -> list[tuple[bytes, Assign]]:
    found = []
    for side, frames in h.take():
        if side is Side.BACKEND and frames[1][1] == Kind.ASSIGN:
            message = decode_from_broker(frames[1:])
            assert isinstance(message, Assign)
            found.append((frames[0], message))
    return found


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    assert harness.register(b"w0").shard == 0
    assert harness.register(b"w1").shard == 1
    return harness


def test_a_ready_with_last_token_2_64_minus_1_then_a_request_does_not_crash_the_broker(h):
    h.broker.on_worker([ROGUE, *encode_control(Ready(None, U64_MAX))], h.now)
    assert h.broker.registry.get(ROGUE) is None  # refused, not registered
    h.send(Request(Kind.GET, 7, key_for(0)))  # was: struct.error packing token 2**64
    [(worker, dispatch, _)] = h.dispatched()
    assert worker == b"w0" and dispatch.token < MAX_REPORTED_TOKEN


def test_a_ready_near_the_top_of_the_epochs_cannot_push_the_next_takeover_out_of_range(h):
    h.broker.on_worker([ROGUE, *encode_control(Ready(None, (2**32 - 2) << 32))], h.now)
    h.register(b"w2")  # a real standby
    h.take()
    h.broker.on_worker([b"w0", *encode_control(Disconnect())], h.now)
    [(worker, assign)] = assigns(h)
    # Before: epoch 0xffffffff00000000, written into the owner file for good.
    assert worker == b"w2" and assign.shard == 0
    assert assign.epoch < MAX_REPORTED_TOKEN
    assert h.broker.issuer.epoch == 100


def test_the_largest_legal_report_still_leaves_room_to_issue(h):
    h.broker.on_worker([b"w2", *encode_control(Ready(None, MAX_REPORTED_TOKEN - 1))], h.now)
    assert h.broker.registry.get(b"w2") is not None
    h.broker.on_worker([b"w0", *encode_control(Disconnect())], h.now)
    [(_, assign)] = [a for a in assigns(h) if a[1].shard == 0]
    assert assign.epoch == MAX_REPORTED_EPOCH << 32  # 2**48 tokens of headroom above it


def test_a_claim_of_a_shard_that_does_not_exist_is_a_claim_of_none(h):
    h.broker.on_worker([b"w2", *encode_control(Ready(7, 0))], h.now)
    record = h.broker.registry.get(b"w2")
    assert record is not None and record.shard is None  # a standby, nothing freed or taken


def test_heartbeat_and_disconnect_from_unknown_peers_change_nothing(h):
    h.broker.on_worker([ROGUE, *encode_control(Heartbeat())], h.now)
    h.broker.on_worker([ROGUE, *encode_control(Disconnect())], h.now)
    h.broker.on_worker([ROGUE, *encode_reply(Reply(Status.OK, 1, U64_MAX))], h.now)
    assert h.broker.registry.owned() == [True, True]
    assert h.broker.registry.get(ROGUE) is None


# --- owner files ----------------------------------------------------------------------------


@pytest.fixture
def durability(tmp_path: Path) -> Durability:
    return Durability(tmp_path, fsync=lambda fd: None)


def owner_path(durability: Durability) -> Path:
    path = durability.shard_dir(0) / "owner"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


ASSIGNED = 1_800_000_000 << 32


@pytest.mark.parametrize("poison", [0xFFFF_FFFF_0000_0005, U64_MAX, MAX_REPORTED_TOKEN - 1])
def test_a_takeover_of_an_owner_file_at_the_limit_starts_a_new_era(durability, poison):
    owner_path(durability).write_bytes(poison.to_bytes(8, "big"))
    files = ShardFiles(durability, 0)
    assert files.take(ASSIGNED) == poison  # was: OverflowError, or 0xffffffff00000006 written
    assert files.epoch == ERA_UNIT + ASSIGNED > poison  # never backwards
    raw = owner_path(durability).read_bytes()
    assert len(raw) == ERA_FILE_BYTES and raw[:8] == ERA_MARKER.to_bytes(8, "big")
    assert reportable(files.epoch) == ASSIGNED  # what READY reports fits the wire format
    files.take(ASSIGNED)  # the next takeover goes on in the era
    assert files.epoch == ERA_UNIT + ASSIGNED + 1
    files.close()


@pytest.mark.parametrize(
    "content",
    [b"\x01", b"\x00" * 9, b"\xff" * 8 + b"\x00\x00\x00\x07", b"junk" * 10, b"\x00" * 24],
)
def test_a_takeover_of_a_corrupt_owner_file_moves_forward(durability, content):
    owner_path(durability).write_bytes(content)
    files = ShardFiles(durability, 0)
    with pytest.raises(OwnershipError):
        files.owner.read()  # a serving owner still applies nothing with such a file
    files.take(ASSIGNED)  # was: OwnershipError, forever, until edited by hand
    assert files.epoch >= ERA_UNIT  # above every 8-byte value it may have held
    assert len(owner_path(durability).read_bytes()) == ERA_FILE_BYTES  # cut to a valid file
    assert files.owner.read() == files.epoch
    files.close()


def test_a_corrupt_file_with_an_era_word_left_goes_above_that_era(durability):
    era_file = b"".join(n.to_bytes(8, "big") for n in (ERA_MARKER, 41, 5))
    owner_path(durability).write_bytes(era_file[:20])  # truncated mid-epoch
    files = ShardFiles(durability, 0)
    files.take(ASSIGNED)
    assert files.epoch // ERA_UNIT == 42
    files.close()


def test_an_empty_owner_file_takes_the_assigned_epoch(durability):
    owner_path(durability).write_bytes(b"")
    files = ShardFiles(durability, 0)
    assert files.take(ASSIGNED) == 0 and files.epoch == ASSIGNED
    assert owner_path(durability).read_bytes() == ASSIGNED.to_bytes(8, "big")
    files.close()


def test_an_owner_file_whose_era_is_lost_or_exhausted_is_refused(durability):
    path = owner_path(durability)
    path.write_bytes(b"\xff" * 7)  # an era file cut inside its marker: its era is unknown
    with pytest.raises(OwnershipError, match="era lost"):
        ShardFiles(durability, 0).take(ASSIGNED)
    path.write_bytes(b"\xff" * 24)  # the last epoch of the last era
    with pytest.raises(OwnershipError, match="exhausted"):
        ShardFiles(durability, 0).take(ASSIGNED)


# --- fuzz -----------------------------------------------------------------------------------

FUZZ_MESSAGES = 3000
EDGE_TOKENS = [0, U64_MAX, (2**32 - 2) << 32, MAX_REPORTED_TOKEN, MAX_REPORTED_TOKEN - 1]


def mutations(rng: random.Random) -> list[bytes]:
    """A control or reply message, damaged: bytes flipped, cut, stretched or frames added."""
    seeds = [
        encode_control(
            Ready(rng.choice([None, 0, 1, 5]), rng.choice([*EDGE_TOKENS, rng.getrandbits(64)]))
        ),
        encode_control(Assign(rng.choice([None, 0, 1]), 2, rng.getrandbits(64))),
        encode_control(Heartbeat()),
        encode_control(Disconnect()),
        encode_reply(Reply(Status.OK, rng.getrandbits(64), rng.getrandbits(64), None, b"v")),
    ]
    frames = [bytearray(f) for f in rng.choice(seeds)]
    for _ in range(rng.randint(0, 3)):
        frame = rng.choice(frames)
        match rng.randint(0, 3):
            case 0 if frame:
                frame[rng.randrange(len(frame))] = rng.getrandbits(8)
            case 1:
                del frame[rng.randrange(len(frame) + 1) :]
            case 2:
                frame.extend(rng.randbytes(rng.randint(1, 9)))
            case _:
                frames.append(bytearray(rng.randbytes(rng.randint(0, 20))))
    if rng.random() < 0.5 and frames and frames[0]:
        frames[0][0] = 1  # keep the version so the decoders go deeper
    return [bytes(f) for f in frames]


def test_fuzzed_control_messages_raise_only_protocol_errors_and_never_crash_the_broker():
    rng = random.Random(10)
    broker = Broker(CONFIG, 0.0, epoch=100)
    now = 0.0
    for n in range(FUZZ_MESSAGES):
        frames = mutations(rng)
        for decode in (decode_from_worker, decode_from_broker):
            try:
                decode(frames)
            except ProtocolError:
                pass
        now += 0.01
        broker.on_worker([b"peer%d" % (n % 7), *frames], now)
        if n % 100 == 0:
            broker.on_client([b"c", *encode_reply(Reply(Status.OK, 1))], now)  # junk request
            broker.on_timer(now)
        assert broker.issuer.epoch <= MAX_REPORTED_EPOCH
        broker.outbox.clear()
    broker.on_timer(now + 60)  # every timer runs over whatever state the fuzz left


# --- rate-limited logs ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeated_warnings_are_limited_per_window_with_a_count_of_the_rest(caplog):
    clock = FakeClock()
    logger = logging.getLogger("test.peers")
    limiter = LogLimiter(logger, window_s=10.0, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.peers"):
        written = [limiter.warning("bad", "bad message %d", n) for n in range(1000)]
        assert written.count(True) == 3
        assert limiter.warning("other", "another kind") is True  # kinds are counted apart
        clock.now = 9.9
        assert limiter.warning("bad", "still in the window") is False
        clock.now = 10.0
        assert limiter.warning("bad", "bad message %d", 1000) is True
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:4] == ["bad message 0", "bad message 1", "bad message 2", "another kind"]
    assert lines[4] == "bad message 1000 (998 similar message(s) suppressed in the last 10 s)"
    assert len(lines) == 5


def test_a_peer_tag_is_short_stable_and_not_the_routing_id():
    identity = bytes(range(16))
    assert peer(identity) == peer(identity) and len(peer(identity)) == 8
    assert identity.hex()[:8] not in peer(identity)


def test_no_log_line_shows_a_workers_routing_id(h, caplog):
    # A routing id is a secret: whoever knows it can take over the worker's route. Every line a
    # worker can cause names it by its tag (peer()), never by the id itself.
    secret = b"w0"
    caplog.set_level(logging.DEBUG)
    h.broker.on_oversized(Side.BACKEND, [secret, b"x", b"y"], 5)
    h.send(Request(Kind.GET, 7, key_for(0)))
    [(_, _, frames)] = h.dispatched()
    h.broker.on_backpressure([secret, *frames])
    h.broker.on_worker([secret, *encode_reply(Reply(Status.ERROR, 0, 10**9))], h.now)
    h.broker.on_worker([secret, b"\x01\x7f"], h.now)  # malformed
    h.broker.on_worker([secret, *encode_control(Disconnect())], h.now)
    text = caplog.text
    assert peer(secret) in text
    assert secret.hex() not in text.replace(peer(secret), "")
