"""zkv.zmqio's send ledger over a real connection: what libzmq still holds stays counted."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from zkv.zmqio import SendLedger, send_counted

pytestmark = pytest.mark.integration

VALUE = b"v" * 60_000  # under pyzmq's 64 KiB copy threshold: the case that was never tracked
MESSAGES = 400  # 24 MB: far more than the kernel's socket buffers of a peer that reads nothing


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    sender = context.socket(zmq.DEALER)
    receiver = context.socket(zmq.DEALER)
    for socket in (sender, receiver):
        socket.setsockopt(zmq.LINGER, 0)
    sender.setsockopt(zmq.SNDHWM, 100_000)
    receiver.setsockopt(zmq.RCVHWM, 1)
    receiver.setsockopt(zmq.RCVBUF, 4096)
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    sender.connect(f"tcp://127.0.0.1:{port}")
    yield sender, receiver
    sender.close(linger=0)
    receiver.close(linger=0)
    context.term()


def queued(ledger: SendLedger) -> int:
    ledger.settle()
    return ledger.tracked + ledger.untracked


def test_small_messages_a_peer_does_not_read_stay_counted_until_it_reads(pair) -> None:
    sender, receiver = pair
    ledger = SendLedger()
    for _ in range(MESSAGES):
        send_counted(sender, [VALUE], ledger)
    time.sleep(0.2)  # let libzmq move what it can; what it cannot must still count
    held = queued(ledger)
    # Before: the messages standing for each MiB were copied by pyzmq and their trackers were
    # done at once, so nearly nothing stayed counted.
    assert held > MESSAGES * len(VALUE) // 2, held
    read = 0
    deadline = time.monotonic() + 10.0
    while read < MESSAGES and time.monotonic() < deadline:
        if receiver.poll(100):
            receiver.recv()
            read += 1
    assert read == MESSAGES
    while queued(ledger) > ledger.untracked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ledger.tracked == 0  # all of it settled once read
