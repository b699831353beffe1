"""The arithmetic of reply bytes queued in libzmq (zkv.zmqio.SendLedger, send_counted) and the
broker's admission with them (issue 10, items 6 and 7): fake sockets and trackers, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from broker.core import Broker, BrokerConfig
from zkv.protocol import Kind, Request, Status, decode_reply, encode_request
from zkv.zmqio import COPY_THRESHOLD, TRACK_EVERY_BYTES, SendLedger, send_counted

pytestmark = pytest.mark.unit


class FakeTracker:
    def __init__(self) -> None:
        self.done = False


class FakeSocket:
    """Records sends; a tracked send returns a FakeTracker."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, bool, bool]] = []
        self.trackers: list[FakeTracker] = []

    def send(self, frame: bytes, flags: int, copy: bool = True, track: bool = False) -> Any:
        self.sent.append((len(frame), flags, copy, track))
        if track:
            tracker = FakeTracker()
            self.trackers.append(tracker)
            return tracker
        return None


def test_a_large_frame_is_tracked_with_every_byte_before_it() -> None:
    socket, ledger = FakeSocket(), SendLedger()
    assert send_counted(socket, [b"i" * 5, b"h" * 30], ledger) == 0  # type: ignore[arg-type]
    assert ledger.untracked == 35 and ledger.tracked == 0 and ledger.queued == 35
    big = b"v" * COPY_THRESHOLD
    carried = send_counted(socket, [b"i" * 5, b"h" * 30, big], ledger)  # type: ignore[arg-type]
    assert carried == 35 + 35 + COPY_THRESHOLD
    assert ledger.tracked == carried and ledger.untracked == 0
    assert socket.sent[-1][2:] == (False, True)  # zero-copy, tracked
    assert ledger.settle() == 0  # not done yet
    socket.trackers[0].done = True
    assert ledger.settle() == carried and ledger.queued == 0 and not ledger.trackers


def test_small_frames_are_tracked_once_they_add_up() -> None:
    socket, ledger = FakeSocket(), SendLedger()
    frame = b"x" * (COPY_THRESHOLD - 1)
    sends = 0
    while not socket.trackers:
        send_counted(socket, [frame], ledger)  # type: ignore[arg-type]
        sends += 1
        assert ledger.untracked < TRACK_EVERY_BYTES
    assert ledger.tracked == sends * len(frame) >= TRACK_EVERY_BYTES
    assert socket.sent[-1][2:] == (False, True)  # the sentinel: small, but tracked


def test_trackers_settle_in_order() -> None:
    socket, ledger = FakeSocket(), SendLedger()
    big = b"v" * COPY_THRESHOLD
    for _ in range(3):
        send_counted(socket, [big], ledger)  # type: ignore[arg-type]
    socket.trackers[1].done = True  # out of order: the first still holds the pipe
    assert ledger.settle() == 0 and ledger.tracked == 3 * COPY_THRESHOLD
    socket.trackers[0].done = True
    assert ledger.settle() == 2 * COPY_THRESHOLD


CONFIG = BrokerConfig(
    shards=1,
    shard_wait_s=3.0,
    worker_timeout_s=4.0,
    heartbeat_interval_s=1.0,
    heartbeat_liveness=3,
    max_client_bytes=4 * COPY_THRESHOLD,
)


def get(broker: Broker, client: bytes, request_id: int) -> None:
    broker.on_client([client, *encode_request(Request(Kind.GET, request_id, b"k"))], 0.0)


def test_replies_queued_to_a_client_make_it_busy_until_sent() -> None:
    broker = Broker(CONFIG, 0.0, epoch=100)
    socket = FakeSocket()
    ledger = broker.ledger(b"c")
    for _ in range(4):  # four replies of 64 KiB not yet sent: the client's limit
        broker.queued_bytes += send_counted(socket, [b"c", b"h", b"v" * COPY_THRESHOLD], ledger)  # type: ignore[arg-type]
    get(broker, b"c", 7)
    [(_, frames)] = broker.outbox
    assert decode_reply(frames[1:]).status == Status.BUSY
    broker.outbox.clear()
    get(broker, b"other", 8)  # another client is not refused
    assert not any(decode_reply(f[1:]).status == Status.BUSY for _, f in broker.outbox)
    for tracker in socket.trackers:
        tracker.done = True
    broker.outbox.clear()
    get(broker, b"c", 9)  # settled as it is admitted
    assert broker.queued_bytes == 0
    assert not any(decode_reply(f[1:]).status == Status.BUSY for _, f in broker.outbox)


def test_the_timer_settles_queued_replies() -> None:
    broker = Broker(CONFIG, 0.0, epoch=100)
    socket = FakeSocket()
    broker.queued_bytes += send_counted(socket, [b"c", b"v" * COPY_THRESHOLD], broker.ledger(b"c"))  # type: ignore[arg-type]
    assert broker.next_timer(0.0) == 0.0  # a settle is due
    socket.trackers[0].done = True
    broker.on_timer(0.0)
    assert broker.queued_bytes == 0
