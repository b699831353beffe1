"""The broker's socket handling (broker/server.py) on real ZeroMQ sockets in one process: the
core driven by hand, the sends and receives the poll loop makes."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator

import pytest
import zmq

from broker import server
from broker.core import CLAIM_WINDOW_HEARTBEATS, Broker, BrokerConfig, Side
from zkv.hashing import key_shard
from zkv.protocol import (
    Dispatch,
    Heartbeat,
    Kind,
    Ready,
    Request,
    Status,
    decode_from_broker,
    decode_reply,
    encode_control,
    encode_request,
)

pytestmark = pytest.mark.integration

CONFIG = BrokerConfig(
    shards=1, shard_wait_s=3.0, worker_timeout_s=4.0, heartbeat_interval_s=1.0, heartbeat_liveness=3
)
DEADLINE_S = 5.0


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def slow_worker(
    context: zmq.Context, name: str
) -> tuple[Broker, zmq.Socket, zmq.Socket, zmq.Socket, float]:
    """A broker core whose one worker (``w0``, shard 0) has the smallest queue there is:
    inproc pipes hold SNDHWM + RCVHWM messages, so it is full after 2. The ASSIGN is read."""
    backend = context.socket(zmq.ROUTER)
    backend.setsockopt(zmq.SNDHWM, 1)
    backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
    backend.bind(f"inproc://backend{name}")
    frontend = context.socket(zmq.ROUTER)
    frontend.bind(f"inproc://frontend{name}")
    worker = context.socket(zmq.DEALER)
    worker.setsockopt(zmq.RCVHWM, 1)
    worker.setsockopt(zmq.IDENTITY, b"w0")
    worker.connect(f"inproc://backend{name}")
    now = CLAIM_WINDOW_HEARTBEATS * CONFIG.heartbeat_interval_s
    core = Broker(CONFIG, 0.0, epoch=100)
    core.on_timer(now)
    core.on_worker([b"w0", *encode_control(Ready(None, 0))], now)
    server._flush(core, frontend, backend)
    assert worker.recv_multipart()  # the ASSIGN
    return core, frontend, backend, worker, now


def test_a_worker_whose_queue_is_full_is_held_back_not_evicted(context: zmq.Context) -> None:
    core, frontend, backend, worker, now = slow_worker(context, "1")
    keys = [f"key{i}".encode() for i in range(10)]
    assert {key_shard(key, 1) for key in keys} == {0}
    for request_id, key in enumerate(keys, 1):
        core.on_client([b"client", *encode_request(Request(Kind.GET, request_id, key))], now)
        server._flush(core, frontend, backend)
    assert core.registry.get(b"w0") is not None  # slow, not dead: still the owner
    assert core.held.get(b"w0")  # what did not fit waits in order
    received: list[int] = []
    deadline = time.monotonic() + DEADLINE_S
    while len(received) < len(keys) and time.monotonic() < deadline:
        if worker.poll(10):
            message = decode_from_broker(worker.recv_multipart())
            assert isinstance(message, Dispatch)
            received.append(message.request.request_id)
        server._resend_held(core, frontend, backend)
    assert received == list(range(1, len(keys) + 1))  # every one, in dispatch order
    assert not core.held
    for socket in (worker, backend, frontend):
        socket.close(linger=0)


def test_a_held_dispatch_whose_flight_expired_is_dropped_not_sent_late(
    context: zmq.Context,
) -> None:
    core, frontend, backend, worker, now = slow_worker(context, "2")
    for request_id in range(1, 6):
        request = Request(Kind.GET, request_id, f"key{request_id}".encode())
        core.on_client([b"client", *encode_request(request)], now)
        server._flush(core, frontend, backend)
    assert core.held.get(b"w0")
    now += CONFIG.worker_timeout_s  # every flight times out while the worker is stuck
    core.on_worker([b"w0", *encode_control(Heartbeat())], now)  # alive all along
    core.on_timer(now)
    server._flush(core, frontend, backend)
    assert core.registry.get(b"w0") is not None
    assert not core.held.get(b"w0")  # the expired dispatches are gone, not sent later
    for socket in (worker, backend, frontend):
        socket.close(linger=0)


def test_a_client_message_of_too_many_frames_is_refused_without_copying_its_frames(
    context: zmq.Context,
) -> None:
    # 16 frames of 4 MiB: libzmq holds the message whole before the broker sees any of it (it
    # bounds frames, not messages), but the broker copies out at most the two frames a legal
    # message has, drops the rest at once and answers ERROR with the request's id.
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.ROUTER)
    server.configure(frontend, backend)
    frontend.bind("inproc://frontend3")
    client = context.socket(zmq.DEALER)
    client.connect("inproc://frontend3")
    core = Broker(CONFIG, 0.0, epoch=100)
    frame = b"x" * (4 * 1024 * 1024)
    header = encode_request(Request(Kind.SET, 42, b"key", b"v"))[0]
    client.send_multipart([header, *[frame] * 15])
    assert frontend.poll(int(DEADLINE_S * 1000))
    tracemalloc.start()
    try:
        server._drain(frontend, core.on_client, 0.0, lambda: None, core, Side.FRONTEND)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(frame)  # the header and one value frame, not 15 of them
    server._flush(core, frontend, backend)
    assert client.poll(int(DEADLINE_S * 1000))
    reply = decode_reply(client.recv_multipart())
    assert (reply.status, reply.request_id) == (Status.ERROR, 42)
    assert b"16 frames" in (reply.body or b"")
    client.send_multipart(encode_request(Request(Kind.PING, 43)))  # and it serves on
    assert frontend.poll(int(DEADLINE_S * 1000))
    server._drain(frontend, core.on_client, 0.0, lambda: None, core, Side.FRONTEND)
    server._flush(core, frontend, backend)
    assert client.poll(int(DEADLINE_S * 1000))
    assert decode_reply(client.recv_multipart()).request_id == 43
    for socket in (client, backend, frontend):
        socket.close(linger=0)


def test_a_worker_message_of_too_many_frames_is_dropped(context: zmq.Context) -> None:
    core = Broker(CONFIG, 0.0, epoch=100)
    core.on_oversized(Side.BACKEND, [b"w0", b"\x01\x10", b"x", b"y"], 5)
    assert core.outbox == []
