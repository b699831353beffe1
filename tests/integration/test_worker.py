"""The worker loop over real ZeroMQ sockets: a worker thread against a fake broker ROUTER."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.fakes import FakeClock, bare
from workers import aof
from workers.store import wall_clock_ms
from workers.worker import EXIT_CONFIG, EXIT_CORRUPT_LOG, Worker, WorkerConfig
from zkv.hashing import key_shard
from zkv.protocol import (
    Assign,
    Disconnect,
    FromWorker,
    Heartbeat,
    Kind,
    Ready,
    Reply,
    Report,
    Request,
    Status,
    decode_from_worker,
    dispatch_batch_frames,
    dispatch_frames,
    encode_control,
    encode_request,
    pack_request,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.05  # heartbeat interval: short, so liveness tests take a fraction of a second
PATIENT = 100  # liveness for tests that must not see a re-registration (5 s of silence)
RECV_TIMEOUT_S = 2.0


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # closes any socket a failed test left open, then terminates


class FakeBroker:
    """The broker's backend ROUTER socket, driven by hand, every receive with a deadline."""

    def __init__(self, context: zmq.Context) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the real broker's backend
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.ids = itertools.count(1)
        self.tokens = itertools.count(1)

    def close(self) -> None:
        self.socket.close(linger=0)

    def recv_raw(self, timeout_s: float = RECV_TIMEOUT_S) -> tuple[bytes, list[bytes]]:
        """The next message as (identity, frames); fails the test instead of hanging."""
        if not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            pytest.fail(f"the fake broker received nothing within {timeout_s} s")
        identity, *frames = self.socket.recv_multipart()
        return identity, frames

    def recv(
        self, timeout_s: float = RECV_TIMEOUT_S, skip_heartbeats: bool = True
    ) -> tuple[bytes, FromWorker]:
        """The next decoded message (by default not a heartbeat, nor the REPORT that comes
        with each) before the deadline."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                pytest.fail(f"no message from the worker within {timeout_s} s")
            identity, frames = self.recv_raw(remaining_s)
            message = decode_from_worker(frames)
            if not (skip_heartbeats and isinstance(message, Heartbeat | Report)):
                return identity, message

    def recv_reply(self, identity: bytes) -> Reply:
        sender, message = self.recv()
        assert sender == identity
        assert isinstance(message, Reply), message
        return message

    def expect_silence(self, seconds: float) -> None:
        """Fail if anything but heartbeats (and their REPORTs) arrives within ``seconds``."""
        deadline_s = time.monotonic() + seconds
        while (remaining_s := deadline_s - time.monotonic()) > 0:
            if not self.socket.poll(int(remaining_s * 1000) + 1, zmq.POLLIN):
                return
            _, *frames = self.socket.recv_multipart()
            message = decode_from_worker(frames)
            assert isinstance(message, Heartbeat | Report), f"unexpected {message}"

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        self.socket.send_multipart([identity, *frames])

    def assign(self, identity: bytes, shard: int | None, shards: int = 2, epoch: int = 0) -> None:
        self.send(identity, encode_control(Assign(shard, shards, epoch)))

    def request(self, identity: bytes, request: Request, token: int | None = None) -> Reply:
        """Dispatch a request (with the next token unless given) and wait for its reply."""
        request_id = next(self.ids)
        frames = encode_request(dataclasses.replace(request, request_id=request_id))
        token = next(self.tokens) if token is None else token
        self.send(identity, dispatch_frames(token, frames))
        reply = self.recv_reply(identity)
        assert reply.request_id == request_id
        return reply


@pytest.fixture
def broker(context: zmq.Context) -> Iterator[FakeBroker]:
    broker = FakeBroker(context)
    try:
        yield broker
    finally:
        broker.close()


@dataclass
class RunningWorker:
    worker: Worker
    thread: threading.Thread
    exit_codes: list[int]

    def stop(self, timeout_s: float = 5.0) -> int:
        self.worker.stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"worker thread still running after {timeout_s} s"
        assert len(self.exit_codes) == 1, "worker.run() raised instead of returning"
        return self.exit_codes[0]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def start_worker(
    context: zmq.Context, broker: FakeBroker, data_dir: Path
) -> Iterator[Callable[..., RunningWorker]]:
    """Starts worker threads; by default durable, in the test's own data directory."""
    running: list[RunningWorker] = []

    def start(
        liveness: int = PATIENT, clock: Callable[[], int] | None = None, **config_fields: Any
    ) -> RunningWorker:
        config_fields.setdefault("data_dir", data_dir)
        config = WorkerConfig(
            backend=broker.endpoint,
            heartbeat_interval_s=INTERVAL_S,
            heartbeat_liveness=liveness,
            **config_fields,
        )
        worker = Worker(config, context=context, clock=clock or wall_clock_ms)
        exit_codes: list[int] = []
        thread = threading.Thread(
            target=lambda: exit_codes.append(worker.run()), name="worker", daemon=True
        )
        handle = RunningWorker(worker, thread, exit_codes)
        thread.start()
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if handle.thread.is_alive():
            handle.stop()


def assigned(broker: FakeBroker, start_worker: Callable[..., RunningWorker], **kw: int) -> bytes:
    """Start a worker, check its first READY, give it shard 0 of 2; returns its identity."""
    shard = kw.pop("shard", 0)
    start_worker(**kw)
    identity, message = broker.recv()
    assert bare(message) == Ready(None, 0)
    broker.assign(identity, shard)
    return identity


def test_worker_registers_then_serves_after_assign(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker)
    reply = broker.request(identity, Request(Kind.SET, 0, b"k", b"v", ttl_ms=60_000))
    assert reply.status == Status.OK
    assert reply.deadline_ms is not None
    assert abs(reply.deadline_ms - (time.time() * 1000 + 60_000)) < 5_000
    got = broker.request(identity, Request(Kind.GET, 0, b"k"))
    assert (got.status, got.body, got.deadline_ms) == (Status.OK, b"v", reply.deadline_ms)
    assert broker.request(identity, Request(Kind.DEL, 0, b"k")).status == Status.OK
    assert broker.request(identity, Request(Kind.GET, 0, b"k")).status == Status.NOT_FOUND
    assert broker.request(identity, Request(Kind.PING, 0)).status == Status.OK


def test_the_worker_tells_its_shards_locks_from_others_for_fenced_writes(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    # The worker gives its shard the cluster's shard count: a fence naming a lock of shard 0 of
    # 2 with no record there is refused (nobody holds a token for it); another shard's is not.
    identity = assigned(broker, start_worker)
    names = [b"lock%d" % n for n in range(64)]
    here = next(name for name in names if key_shard(name, 2) == 0)
    there = next(name for name in names if key_shard(name, 2) == 1)
    reply = broker.request(identity, Request(Kind.SET, 0, b"k", b"v", fence=(here, 5)))
    assert reply.status == Status.CONFLICT
    assert (reply.body or b"").startswith(b"no such lock token")
    reply = broker.request(identity, Request(Kind.SET, 0, b"k", b"v", fence=(there, 5)))
    assert reply.status == Status.OK


def test_reply_echoes_the_dispatch_token(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker)
    assert broker.request(identity, Request(Kind.PING, 0), token=41).token == 41


def test_a_dispatch_to_a_worker_without_a_shard_is_handed_back_not_answered(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    # The broker thinks this worker holds a shard it does not: an answer would fail the
    # request; a READY saying what it holds makes the broker route it anew.
    start_worker()
    identity, message = broker.recv()
    assert bare(message) == Ready(None, 0)
    broker.assign(identity, None)  # standby
    request = Request(Kind.SET, 5, b"k", b"v")
    broker.send(identity, dispatch_frames(next(broker.tokens), encode_request(request)))
    sender, message = broker.recv()
    assert (sender, bare(message)) == (identity, Ready(None, 0))  # nothing applied or accepted
    with pytest.raises(pytest.fail.Exception):  # and no reply
        broker.recv(timeout_s=0.3)


def test_stale_token_is_refused(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker)
    assert broker.request(identity, Request(Kind.SET, 0, b"k", b"new"), token=7).status == (
        Status.OK
    )
    for stale in (7, 3):
        reply = broker.request(identity, Request(Kind.SET, 0, b"k", b"old"), token=stale)
        assert reply.status == Status.UNAVAILABLE
        assert reply.body == f"stale token {stale}: this shard already accepted 7".encode()
    assert broker.request(identity, Request(Kind.GET, 0, b"k"), token=8).body == b"new"


def test_reassigning_the_same_shard_keeps_the_data_another_shard_starts_empty(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker)
    broker.request(identity, Request(Kind.SET, 0, b"k", b"v"))
    broker.assign(identity, 0)
    assert broker.request(identity, Request(Kind.GET, 0, b"k")).body == b"v"
    broker.assign(identity, 1)
    assert broker.request(identity, Request(Kind.GET, 0, b"k")).status == Status.NOT_FOUND


MALFORMED = [
    pytest.param([b""], id="empty-frame"),
    pytest.param([b"garbage that is no header"], id="garbage"),
    pytest.param([bytes([9, Kind.DISPATCH]) + bytes(30)], id="wrong-version"),
    pytest.param([bytes([1, Kind.DISPATCH, 0, 0])], id="truncated-dispatch-header"),
    pytest.param([bytes([1, 0x7F])], id="unknown-kind"),
    pytest.param([bytes([1, Kind.ASSIGN, 0, 0])], id="truncated-assign"),
    pytest.param([encode_control(Assign(0, 2))[0] + b"x"], id="overlong-assign"),
    pytest.param([encode_control(Ready(None, 0))[0]], id="ready-from-broker"),
    pytest.param([encode_control(Heartbeat())[0], b"extra"], id="heartbeat-two-frames"),
]


@pytest.mark.parametrize("frames", MALFORMED)
def test_malformed_messages_are_dropped_and_the_worker_keeps_serving(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker], frames: list[bytes]
) -> None:
    identity = assigned(broker, start_worker)
    broker.request(identity, Request(Kind.SET, 0, b"k", b"v"))
    broker.send(identity, frames)
    assert broker.request(identity, Request(Kind.GET, 0, b"k")).body == b"v"


@pytest.mark.parametrize(
    ("request_frames", "error"),
    [
        pytest.param(
            [*encode_request(Request(Kind.GET, 77, b"k")), b"stray frame"],
            b"GET takes 1 frame(s), got 2",
            id="get-with-two-frames",
        ),
        pytest.param(
            [struct.pack("!BBBxQQ", 1, Kind.SET, 1, 77, 0) + b"k", b"v"],
            b"ttl_ms must be between 1",
            id="set-with-zero-ttl",
        ),
    ],
)
def test_malformed_dispatch_with_a_readable_request_id_gets_an_error_reply(
    broker: FakeBroker,
    start_worker: Callable[..., RunningWorker],
    request_frames: list[bytes],
    error: bytes,
) -> None:
    identity = assigned(broker, start_worker)
    # The header parses far enough to read request id 77.
    broker.send(identity, dispatch_frames(next(broker.tokens), request_frames))
    reply = broker.recv_reply(identity)
    assert (reply.request_id, reply.status) == (77, Status.ERROR)
    assert error in (reply.body or b"")
    assert broker.request(identity, Request(Kind.PING, 0)).status == Status.OK


def test_unreadable_dispatch_gets_no_reply(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker)
    broker.send(identity, [bytes([1, Kind.DISPATCH, 0, 0])])
    broker.expect_silence(0.2)


def test_heartbeats_arrive_every_interval(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    start_worker()
    started_s = time.monotonic()
    heartbeats = 0
    while heartbeats < 4:
        _, message = broker.recv(skip_heartbeats=False)
        heartbeats += isinstance(message, Heartbeat)
    elapsed_s = time.monotonic() - started_s
    assert 3 * INTERVAL_S * 0.8 <= elapsed_s < 1.0


def test_silent_broker_makes_the_worker_reregister_claiming_its_shard(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    liveness = 3
    identity = assigned(broker, start_worker, shard=1, liveness=liveness)
    broker.request(identity, Request(Kind.SET, 0, b"k", b"kept"), token=7)
    silent_from_s = time.monotonic()
    # The fake broker never sends heartbeats: the worker must give up on it and start over.
    new_identity, message = broker.recv(timeout_s=2.0)
    waited_s = time.monotonic() - silent_from_s
    assert bare(message) == Ready(1, 7)
    assert new_identity == identity  # a fresh socket, the same routing id
    assert waited_s >= liveness * INTERVAL_S * 0.8
    broker.assign(new_identity, 1)
    assert broker.request(new_identity, Request(Kind.GET, 0, b"k"), token=8).body == b"kept"


def test_heartbeats_from_the_broker_keep_the_worker_registered(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker, liveness=3)
    deadline_s = time.monotonic() + 10 * INTERVAL_S
    while time.monotonic() < deadline_s:
        broker.send(identity, encode_control(Heartbeat()))
        broker.expect_silence(INTERVAL_S)  # heartbeats only: no new READY
    assert broker.request(identity, Request(Kind.PING, 0)).status == Status.OK


def test_keys_nobody_reads_are_expired_in_the_background(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    handle = start_worker()
    identity, _ = broker.recv()
    broker.assign(identity, 0)
    for i in range(50):
        broker.request(identity, Request(Kind.SET, 0, b"k%d" % i, b"v", ttl_ms=20))
    broker.request(identity, Request(Kind.SET, 0, b"forever", b"v"))
    shard = handle.worker.shard
    assert shard is not None
    last_deadline_s = time.monotonic() + 0.02
    # len() is read from this thread while the worker thread runs: fine for a test of a dict.
    while len(shard.store) > 1:
        if time.monotonic() > last_deadline_s + 0.5:
            pytest.fail(f"{len(shard.store) - 1} expired keys still stored 0.5 s after expiry")
        time.sleep(0.005)
    assert time.monotonic() - last_deadline_s < 0.2


def test_an_expiry_backlog_drains_in_back_to_back_passes(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    # 10 keys per pass: at one pass per 50 ms cycle, 600 expired keys would need 3 s. A pass
    # that hit its bound must be followed at once by the next one, between requests. The keys'
    # clock stands still while they are written, then jumps past every deadline at once, so how
    # fast this machine happens to be while writing them plays no part.
    clock = FakeClock()
    handle = start_worker(expire_max_keys=10, data_dir=None, clock=clock)
    identity, _ = broker.recv()
    broker.assign(identity, 0)
    for i in range(600):
        broker.request(identity, Request(Kind.SET, 0, b"k%d" % i, b"v", ttl_ms=300))
    shard = handle.worker.shard
    assert shard is not None and len(shard.store) == 600
    clock.advance(300)  # every deadline passes at once
    expired_at_s = time.monotonic()
    while len(shard.store) > 0:
        if time.monotonic() - expired_at_s > 1.5:  # half what one pass per cycle would need
            pytest.fail(f"{len(shard.store)} expired keys still stored 1.5 s after expiry")
        time.sleep(0.005)
    assert broker.request(identity, Request(Kind.PING, 0)).status == Status.OK


def test_stop_sends_disconnect_and_ends_the_thread(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    handle = start_worker()
    identity, _ = broker.recv()
    broker.assign(identity, 0)
    assert broker.request(identity, Request(Kind.PING, 0)).status == Status.OK
    assert handle.stop() == 0
    sender, message = broker.recv()
    assert (sender, message) == (identity, Disconnect())


def test_requests_queued_before_stop_are_answered(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    handle = start_worker()
    identity, _ = broker.recv()
    broker.assign(identity, 0)
    assert broker.request(identity, Request(Kind.PING, 0)).status == Status.OK
    handle.worker.stop()
    for request_id in range(1000, 1010):
        get = encode_request(Request(Kind.GET, request_id, b"k"))
        broker.send(identity, dispatch_frames(next(broker.tokens), get))
    handle.thread.join(5.0)
    assert not handle.thread.is_alive()
    messages = []
    while True:
        _, message = broker.recv()
        messages.append(message)
        if isinstance(message, Disconnect):
            break
    # Whatever arrived before the worker left was answered, and DISCONNECT came last.
    assert all(isinstance(m, Reply) and m.status == Status.NOT_FOUND for m in messages[:-1])


# --- durable shards and ownership ---------------------------------------------------------------


def test_a_new_worker_assigned_the_shard_serves_the_data_of_a_stopped_one(
    broker: FakeBroker,
    start_worker: Callable[..., RunningWorker],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.worker")
    first = start_worker()
    identity, _ = broker.recv()
    broker.assign(identity, 1, epoch=500)
    for i in range(20):
        reply = broker.request(identity, Request(Kind.SET, 0, b"k%d" % i, b"v%d" % i))
        assert reply.status == Status.OK
    broker.request(identity, Request(Kind.DEL, 0, b"k0"))
    assert first.stop() == 0
    assert broker.recv() == (identity, Disconnect())

    start_worker()
    second, message = broker.recv()
    assert bare(message) == Ready(None, 0)
    broker.assign(second, 1, epoch=600)
    assert broker.request(second, Request(Kind.GET, 0, b"k0")).status == Status.NOT_FOUND
    for i in range(1, 20):
        assert broker.request(second, Request(Kind.GET, 0, b"k%d" % i)).body == b"v%d" % i
    log_path = data_dir / "shard-1" / "log"
    messages = [r.getMessage() for r in caplog.records]
    assert f"took shard 1 epoch 500 (0 keys replayed from {log_path})" in messages
    assert "left shard 1 epoch 500: stopping" in messages
    assert f"took shard 1 epoch 600 (19 keys replayed from {log_path})" in messages


def test_disconnect_from_the_broker_makes_the_worker_register_again_at_once(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker, shard=1)
    broker.request(identity, Request(Kind.SET, 0, b"k", b"kept"), token=2**40)
    sent_s = time.monotonic()
    broker.send(identity, encode_control(Disconnect()))
    sender, message = broker.recv()
    assert time.monotonic() - sent_s < 1.0  # at once, not after the liveness (5 s here)
    assert sender == identity  # the same routing id
    assert bare(message) == Ready(1, 2**40)  # claiming its shard, with its last token
    broker.assign(identity, 1, epoch=2**40 + 1)
    assert broker.request(identity, Request(Kind.GET, 0, b"k"), token=2**41).body == b"kept"


def test_a_burst_of_disconnects_is_answered_by_one_ready(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    # A broker that forgot the worker answers each message of it with a DISCONNECT (replies and
    # heartbeats queued behind a large reply: many at once). One READY answers them all: a
    # READY each made the broker re-register the worker as many times, sending its requests
    # round again each time, and the worker lost its shard over and over.
    handle = start_worker()
    handle.worker._ready_again_s = 10.0  # the interval is 50 ms here: no race with a slow pass
    identity, _ = broker.recv()
    broker.assign(identity, 1)
    broker.request(identity, Request(Kind.PING, 0), token=5)  # assigned and serving
    for _ in range(5):
        broker.send(identity, encode_control(Disconnect()))
    sender, message = broker.recv()
    assert (sender, bare(message)) == (identity, Ready(1, 5))
    with pytest.raises(pytest.fail.Exception):  # one READY, not five
        broker.recv(timeout_s=0.5)
    broker.assign(identity, 1, epoch=7)
    broker.send(identity, encode_control(Disconnect()))  # answered: a new DISCONNECT is news
    assert bare(broker.recv()[1]) == Ready(1, 7)


def test_ready_reports_the_ownership_epoch_when_it_is_above_the_last_token(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    identity = assigned(broker, start_worker, shard=0)
    broker.assign(identity, 0, epoch=2**50)
    broker.request(identity, Request(Kind.PING, 0), token=5)
    broker.send(identity, encode_control(Disconnect()))
    sender, message = broker.recv()
    assert (sender, bare(message)) == (identity, Ready(0, 2**50))


def test_a_worker_that_finds_a_newer_owner_refuses_the_batch_and_registers_as_new(
    broker: FakeBroker,
    start_worker: Callable[..., RunningWorker],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.worker")
    start_worker()
    old, _ = broker.recv()
    broker.assign(old, 0, epoch=10)
    broker.request(old, Request(Kind.SET, 0, b"k", b"v1"))
    start_worker()
    new, _ = broker.recv()
    broker.assign(new, 0, epoch=20)  # as if the broker had given up on the old one
    owner = data_dir / "shard-0" / "owner"
    deadline_s = time.monotonic() + RECV_TIMEOUT_S
    while owner.read_bytes() != (20).to_bytes(8, "big"):
        assert time.monotonic() < deadline_s, "the new worker did not take the shard"
        time.sleep(0.005)
    log_path = data_dir / "shard-0" / "log"
    before = log_path.read_bytes()

    # Two writes and a read reach the former owner: none is applied, and none is answered
    # (an UNAVAILABLE would fail them, as "outcome unknown" if an earlier worker had them):
    # its READY, claiming nothing, makes the broker take them back and route them anew.
    # Either the batch finds the newer epoch under the lock, or the former owner's timers
    # found it first (they read the epoch every pass) and it holds no shard any more.
    stale = [
        Request(Kind.SET, 901, b"k", b"stale"),
        Request(Kind.GET, 902, b"k"),
        Request(Kind.DEL, 903, b"k"),
    ]
    for request in stale:
        broker.send(old, dispatch_frames(next(broker.tokens), encode_request(request)))
    sender, message = broker.recv()
    assert sender == old and isinstance(message, Ready), message
    readies = [message]
    with pytest.raises(pytest.fail.Exception):  # no reply to any of them, no second READY
        broker.recv(timeout_s=0.3)
    assert [bare(r) for r in readies] == [Ready(None, readies[0].last_token)]  # as a new worker
    assert readies[0].last_token >= 10
    assert log_path.read_bytes() == before
    assert "left shard 0 epoch 10: moved to a newer owner (epoch 20)" in [
        r.getMessage() for r in caplog.records
    ]
    assert broker.request(new, Request(Kind.GET, 0, b"k")).body == b"v1"


def test_a_corrupt_log_stops_the_worker_with_a_repair_hint(
    broker: FakeBroker,
    start_worker: Callable[..., RunningWorker],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shard_dir = data_dir / "shard-0"
    shard_dir.mkdir(parents=True)
    records = [aof.encode_set(i, b"k%d" % i, b"v", None) for i in range(3)]
    data = bytearray(aof.MAGIC + b"".join(records))
    bad = len(aof.MAGIC) + len(records[0])
    data[bad + 12] ^= 0x01
    (shard_dir / "log").write_bytes(bytes(data))
    handle = start_worker()
    identity, _ = broker.recv()
    broker.assign(identity, 0, epoch=3)
    assert broker.recv() == (identity, Disconnect())
    handle.thread.join(5.0)
    assert handle.exit_codes == [EXIT_CORRUPT_LOG]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        f"{shard_dir / 'log'} is damaged at byte {bad}" in m
        and f"python -m workers.repair {shard_dir / 'log'}" in m
        for m in errors
    ), errors


def test_an_in_memory_worker_writes_no_files(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker], data_dir: Path
) -> None:
    handle = start_worker(data_dir=None)
    identity, _ = broker.recv()
    broker.assign(identity, 0, epoch=7)
    assert broker.request(identity, Request(Kind.SET, 0, b"k", b"v")).status == Status.OK
    assert broker.request(identity, Request(Kind.GET, 0, b"k")).body == b"v"
    assert handle.stop() == 0
    assert not data_dir.exists()


def test_a_damaged_owner_file_is_taken_over_in_a_new_era(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker], data_dir: Path
) -> None:
    """Issue 10 item 14: a worker starts with any owner file it finds. A damaged one is read
    as a value above anything it held (a new era), so the takeover still moves forward."""
    shard_dir = data_dir / "shard-0"
    shard_dir.mkdir(parents=True)
    (shard_dir / "owner").write_bytes(b"\x00\x01\x02")  # not an owner file
    handle = start_worker()
    identity, _ = broker.recv()
    broker.assign(identity, 0, epoch=3)
    assert broker.request(identity, Request(Kind.SET, 0, b"k", b"v")).status == Status.OK
    assert len((shard_dir / "owner").read_bytes()) == 24  # rewritten whole, era 1
    assert handle.stop() == 0


def test_a_batch_dispatch_refused_whole_is_answered_by_its_token(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    # A BATCH_DISPATCH has no request id to answer by: the refusal carries its token, so the
    # broker tells its requests at once that nothing was applied (not "outcome unknown" later).
    identity = assigned(broker, start_worker)
    token = next(broker.tokens)
    record = pack_request(Kind.SET, 5, b"k", b"v")
    frames = dispatch_batch_frames(token, [record])
    broker.send(identity, [frames[0], frames[1] + b"trailing"])
    reply = broker.recv_reply(identity)
    assert (reply.status, reply.request_id, reply.token) == (Status.ERROR, 0, token)
    assert b"after the last" in (reply.body or b"")
    assert broker.request(identity, Request(Kind.GET, 0, b"k")).status == Status.NOT_FOUND


def test_an_assign_with_another_shard_count_than_the_data_directory_stops_the_worker(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker], data_dir: Path
) -> None:
    first = start_worker()
    identity, ready = broker.recv()
    assert isinstance(ready, Ready) and ready.durable and ready.cluster != 0
    broker.assign(identity, 0, shards=2)
    assert broker.request(identity, Request(Kind.SET, 0, b"k", b"v")).status == Status.OK
    assert first.stop() == 0
    assert isinstance(broker.recv()[1], Disconnect)
    second = start_worker()
    identity, again = broker.recv()
    assert isinstance(again, Ready) and again.cluster == ready.cluster  # the directory's id
    broker.assign(identity, 0, shards=3)
    second.thread.join(5.0)
    assert second.exit_codes == [EXIT_CONFIG]
    assert (data_dir / "shard-0" / "log").stat().st_size > len(aof.MAGIC)  # left as it was


def test_a_loop_busy_past_the_liveness_with_messages_waiting_does_not_reconnect(
    broker: FakeBroker, start_worker: Callable[..., RunningWorker]
) -> None:
    # A batch that held the loop (an undo replay on a full disk took 4 s) while the broker's
    # messages queued: the broker was not silent, and reconnecting dropped everything queued.
    handle = start_worker(liveness=2)  # silent for 0.1 s: reconnect
    identity, _ = broker.recv()
    broker.assign(identity, 0)
    broker.request(identity, Request(Kind.SET, 0, b"k", b"v"))
    shard = handle.worker.shard
    assert shard is not None
    handle_batch = shard.handle_batch
    busy = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        busy.set()
        time.sleep(0.5)  # ten liveness periods
        return handle_batch(*args, **kwargs)

    shard.handle_batch = slow  # type: ignore[method-assign]
    request_id = next(broker.ids)
    request = Request(Kind.GET, request_id, b"k")
    broker.send(identity, dispatch_frames(next(broker.tokens), encode_request(request)))
    assert busy.wait(RECV_TIMEOUT_S)
    broker.send(identity, encode_control(Heartbeat()))  # queued while the loop is busy
    _, message = broker.recv()
    assert isinstance(message, Reply) and message.body == b"v", message
    # The broker keeps beating; the worker must not register again (a READY on a new socket).
    deadline_s = time.monotonic() + 0.5
    while time.monotonic() < deadline_s:
        broker.send(identity, encode_control(Heartbeat()))
        try:
            _, message = broker.recv(timeout_s=0.02)
        except pytest.fail.Exception:
            continue
        assert not isinstance(message, Ready), "the worker reconnected"
