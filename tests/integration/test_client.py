"""The client's retries and failures against a fake broker: a ROUTER socket driven by hand."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from tests.cluster import free_port
from zkv import Client, Timeout, Unavailable
from zkv.protocol import Reply, Status, decode_request, encode_reply, versioned_body

pytestmark = pytest.mark.integration


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def broker(context: zmq.Context) -> Iterator[tuple[zmq.Socket, str]]:
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close(linger=0)


def serve(socket: zmq.Socket, answer_from: int, seen: list, stop: threading.Event) -> None:
    """Answer GETs with b"v", ignoring the first ``answer_from`` copies received."""
    while not stop.is_set():
        if not socket.poll(20):
            continue
        identity, *frames = socket.recv_multipart()
        request = decode_request(frames)
        seen.append((identity, request.request_id))
        if len(seen) > answer_from:
            body = versioned_body(1, b"v") if request.versioned else b"v"  # Client.get: versioned
            reply = Reply(Status.OK, request.request_id, body=body)
            socket.send_multipart([identity, *encode_reply(reply)])


def run_broker(
    socket: zmq.Socket, answer_from: int
) -> tuple[list, threading.Event, threading.Thread]:
    seen: list = []
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(socket, answer_from, seen, stop), daemon=True)
    thread.start()
    return seen, stop, thread


def test_a_lost_request_is_sent_again_with_the_same_id_on_a_fresh_socket(context, broker):
    socket, endpoint = broker
    seen, stop, thread = run_broker(socket, answer_from=1)
    try:
        client = Client(endpoint, timeout_s=3, attempt_s=0.2, context=context)
        assert client.get("k").value == b"v"
        assert client.retries == 1
        (first_socket, first_id), (second_socket, second_id) = seen
        assert first_id == second_id  # the broker and worker can tell it is a retry
        assert first_socket != second_socket  # a fresh socket: nothing stale queued
        client.close()
    finally:
        stop.set()
        thread.join(5)


def test_no_reply_at_all_is_a_timeout_with_outcome_unknown(context, broker):
    socket, endpoint = broker
    seen, stop, thread = run_broker(socket, answer_from=10**9)
    try:
        client = Client(endpoint, timeout_s=0.6, attempt_s=0.2, context=context)
        started = time.monotonic()
        with pytest.raises(Timeout, match="outcome unknown"):
            client.get("k")
        assert 0.6 <= time.monotonic() - started < 1.5
        assert len(seen) >= 2 and len({request_id for _, request_id in seen}) == 1
        client.close()
    finally:
        stop.set()
        thread.join(5)


def test_unreachable_broker_is_unavailable_after_the_connect_timeout(context):
    client = Client(
        f"tcp://127.0.0.1:{free_port()}", timeout_s=5, connect_timeout_s=0.3, context=context
    )
    started = time.monotonic()
    with pytest.raises(Unavailable, match="not reachable"):
        client.get("k")
    assert 0.3 <= time.monotonic() - started < 1.0
    client.close()


def test_a_broker_that_appears_within_the_connect_timeout_is_used(context):
    port = free_port()
    client = Client(f"tcp://127.0.0.1:{port}", timeout_s=5, connect_timeout_s=3, context=context)
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    seen: list = []
    stop = threading.Event()

    def late_broker() -> None:
        time.sleep(0.3)  # the broker starts late, as after a restart
        socket.bind(f"tcp://127.0.0.1:{port}")
        serve(socket, 0, seen, stop)

    thread = threading.Thread(target=late_broker, daemon=True)
    thread.start()
    try:
        assert client.get("k").value == b"v"
    finally:
        stop.set()
        thread.join(5)
        socket.close(linger=0)
        client.close()


def test_request_ids_are_random_64_bit(context, broker):
    socket, endpoint = broker
    seen, stop, thread = run_broker(socket, answer_from=0)
    try:
        client = Client(endpoint, context=context)
        for _ in range(5):
            client.get("k")
        ids = [request_id for _, request_id in seen]
        assert len(set(ids)) == 5
        assert max(ids) > 2**32  # not a counter from 1
        client.close()
    finally:
        stop.set()
        thread.join(5)


def test_an_answer_sent_to_the_socket_the_client_just_left_still_reaches_it(context, broker):
    # The broker fails a request at --shard-wait (a whole number of resend intervals) and
    # answers the socket it last heard the request on, just as the client resends on a fresh
    # one: that answer must not be lost (it was, and the client waited out its timeout: 504
    # for what was a 503).
    socket, endpoint = broker

    def answer_the_old_socket() -> None:
        first, *frames = socket.recv_multipart()
        request_id = decode_request(frames).request_id
        second, *_ = socket.recv_multipart()  # the resend, on a fresh socket
        assert second != first
        failure = Reply(Status.UNAVAILABLE, request_id, body=b"shard 0 has no worker")
        socket.send_multipart([first, *encode_reply(failure)])

    thread = threading.Thread(target=answer_the_old_socket, daemon=True)
    thread.start()
    client = Client(endpoint, timeout_s=5, attempt_s=0.3, context=context)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no worker"):
        client.get("k")
    assert time.monotonic() - started < 2.0  # not the 5 s timeout
    thread.join(5)
    client.close()
