"""The broker's events proxy (broker/events.py) on real sockets: a worker's PUB connected to
the events backend reaches a subscriber of the events endpoint, filtered by key prefix; with
CURVE, only authorised keys publish and (with --frontend-curve) subscribe."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from broker.events import EVENTS_HWM, EventsProxy
from zkv.keys import CLIENTS_DOMAIN, Keys, create_keys, ensure_client_keys

pytestmark = pytest.mark.integration

DEADLINE_S = 5.0
PUBLISH_EVERY_S = 0.01
HEADER = bytes(32)  # the proxy never reads a frame: any header will do


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _socket(
    context: zmq.Context, kind: int, keys: Keys | None = None, pair: str = ""
) -> zmq.Socket:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:  # a CURVE client with the worker's or the clients' keypair
        own = keys.worker() if pair == "worker" else keys.client()
        socket.curve_secretkey = own.secret
        socket.curve_publickey = own.public
        socket.curve_serverkey = keys.broker().public
    return socket


def _publish_until(
    publishers: list[tuple[zmq.Socket, bytes]], subscriber: zmq.Socket, want: bytes
) -> list[bytes]:
    """Publish each publisher's key every PUBLISH_EVERY_S (a new connection misses what was
    sent before its subscriptions arrived) until ``subscriber`` got ``want``, then a few more
    rounds; returns every key it received."""
    received: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    rounds_after = None
    while time.monotonic() < deadline and (rounds_after is None or rounds_after > 0):
        for publisher, key in publishers:
            publisher.send_multipart([key, HEADER])
        while subscriber.poll(PUBLISH_EVERY_S * 1000):
            key, header = subscriber.recv_multipart()
            assert header == HEADER
            received.append(key)
        if rounds_after is not None:
            rounds_after -= 1
        elif want in received:
            rounds_after = 20
    assert want in received, f"no event {want!r} within {DEADLINE_S} s"
    return received


def test_an_event_published_to_the_backend_reaches_a_prefix_subscriber(
    context: zmq.Context,
) -> None:
    proxy = EventsProxy(context, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    proxy.start()
    try:
        subscriber = _socket(context, zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"user:")
        subscriber.connect(proxy.events)
        publisher = _socket(context, zmq.PUB)
        publisher.connect(proxy.backend)
        received = _publish_until(
            [(publisher, b"user:1"), (publisher, b"order:1")], subscriber, b"user:1"
        )
        assert set(received) == {b"user:1"}  # the prefix filters: no order:1
        assert proxy._xpub.getsockopt(zmq.SNDHWM) == EVENTS_HWM
    finally:
        proxy.stop()


def test_with_curve_only_authorised_keys_publish_and_subscribe(
    context: zmq.Context, tmp_path: Path
) -> None:
    """A PUB without the workers' key is refused by the backend's handshake, and a SUB
    without the clients' key by the events endpoint's (--frontend-curve), as the broker's
    own backend and frontend refuse them."""
    create_keys(tmp_path / "keys")
    keys = ensure_client_keys(Keys(tmp_path / "keys"))
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(keys.authorized))
    authenticator.configure_curve(domain=CLIENTS_DOMAIN, location=str(keys.clients))
    proxy = EventsProxy(context, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", keys, True)
    proxy.start()
    try:
        subscriber = _socket(context, zmq.SUB, keys, "client")
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(proxy.events)
        plain_subscriber = _socket(context, zmq.SUB)
        plain_subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        plain_subscriber.connect(proxy.events)
        worker = _socket(context, zmq.PUB, keys, "worker")
        worker.connect(proxy.backend)
        intruder = _socket(context, zmq.PUB)
        intruder.connect(proxy.backend)
        received = _publish_until([(intruder, b"forged"), (worker, b"real")], subscriber, b"real")
        assert set(received) == {b"real"}
        assert not plain_subscriber.poll(0)  # refused: got nothing while the other got events
    finally:
        proxy.stop()
        authenticator.stop()


def test_the_broker_serves_events_when_configured_and_stops_them_with_itself(
    context: zmq.Context, tmp_path: Path
) -> None:
    """broker.server.serve starts the proxy beside its frontend and backend (--events), and
    stops it when it stops."""
    import threading

    from broker.core import BrokerConfig
    from broker.server import ServerConfig, Stopper, serve

    config = ServerConfig(
        frontend=f"ipc://{tmp_path}/frontend",
        backend=f"ipc://{tmp_path}/backend",
        events=f"ipc://{tmp_path}/events",
        events_backend=f"ipc://{tmp_path}/events-backend",
        broker=BrokerConfig(1, 3.0, 4.0, 1.0, 3),
    )
    stopper = Stopper()
    thread = threading.Thread(target=serve, args=(config, stopper, context), daemon=True)
    thread.start()
    try:
        subscriber = _socket(context, zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"k")
        subscriber.connect(config.events)
        publisher = _socket(context, zmq.PUB)
        publisher.connect(config.events_backend)
        assert set(_publish_until([(publisher, b"k1")], subscriber, b"k1")) == {b"k1"}
    finally:
        stopper.stopping = True
        thread.join(DEADLINE_S)
    assert not thread.is_alive()  # serve returned: the proxy thread was stopped and joined
