"""Watching over real sockets in one process: an XPUB standing in for the broker's events
proxy, the gateway's /v1/watch through the event server (gateway/http11.py) and through plain
WSGI iteration (the gthread worker's way), and the client's Watch and AsyncWatch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from gateway.app import make_app
from gateway.watch import Watches
from tests.cluster import free_port
from tests.integration.test_gateway_http import Reader, Server, request
from tests.integration.test_gateway_http import Response as HttpResponse
from zkv import cli
from zkv.aio import AsyncClient
from zkv.client import Client
from zkv.protocol import Event, EventKind, encode_event
from zkv.watch import Gap

pytestmark = pytest.mark.integration

DEADLINE_S = 5.0


class Publisher:
    """The broker's XPUB, driven by hand: knows when a subscription arrived."""

    def __init__(self, context: zmq.Context) -> None:
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def wait_subscribed(self) -> bytes:
        """The next subscription's prefix (fails the test after DEADLINE_S)."""
        if not self.socket.poll(int(DEADLINE_S * 1000)):
            pytest.fail("no subscription reached the publisher")
        message = self.socket.recv()
        assert message[:1] == b"\x01", message
        return message[1:]

    def send(self, key: bytes, n: int, shard: int = 0, stream: int = 1) -> None:
        event = Event(key, EventKind.SET, shard, stream << 32 | n, 1000 + n, None)
        self.socket.send_multipart(encode_event(event))


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def publisher(context: zmq.Context) -> Iterator[Publisher]:
    publisher = Publisher(context)
    yield publisher
    publisher.socket.close(linger=0)


class NoKv:
    """The watch route needs no zkv client."""


# --- the gateway -------------------------------------------------------------------------------


def read_until(reader: Reader, needle: bytes) -> bytes:
    deadline = time.monotonic() + DEADLINE_S
    while needle not in reader.buffer:
        assert time.monotonic() < deadline, f"{needle!r} never came: {reader.buffer!r}"
        assert reader._fill(), f"closed before {needle!r}: {reader.buffer!r}"
    return reader.buffer


def stream_head(reader: Reader) -> HttpResponse:
    response = reader.response(head_request=True)  # no length: read the head only
    assert response.status == 200, response.body
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in response.headers
    assert response.headers["connection"] == "close"
    return response


@pytest.fixture
def gateway(publisher: Publisher, context: zmq.Context) -> Iterator[tuple[Server, Watches]]:
    watches = Watches([publisher.endpoint], context=context)
    server = Server(make_app(NoKv, watches=watches))  # type: ignore[arg-type]
    yield server, watches
    server.close()
    watches.close()


def test_sse_streams_the_prefixs_events_and_resumes_from_the_history(
    gateway: tuple[Server, Watches], publisher: Publisher
) -> None:
    server, watches = gateway
    with server.connect() as first:
        first.sendall(request("GET", "/v1/watch?prefix=a"))
        reader = Reader(first)
        stream_head(reader)
        assert publisher.wait_subscribed() == b""  # the hub takes everything (its history)
        read_until(reader, b": watching")
        publisher.send(b"a1", 1)
        publisher.send(b"b1", 2)
        publisher.send(b"a2", 3)
        text = read_until(reader, b"a2")
        assert b"b1" not in text
        assert b"event: set\nid: 0:4294967297\ndata: " in text
        first_data = text.split(b"data: ")[1].split(b"\n")[0]
        assert json.loads(first_data) == {"key": "a1", "version": 1001, "expires_at_ms": None}
    # The client left: its watcher is dropped.
    deadline = time.monotonic() + DEADLINE_S
    while watches._hub is not None and watches._hub.state.watchers:
        assert time.monotonic() < deadline, "the watcher outlived its connection"
        time.sleep(0.01)
    with server.connect() as again:
        again.sendall(request("GET", "/v1/watch?prefix=a", "Last-Event-ID: 0:4294967297"))
        reader = Reader(again)
        stream_head(reader)
        text = read_until(reader, b"a2")
        assert b"a1" not in text  # what followed the last id only
    with server.connect() as lost:
        lost.sendall(request("GET", "/v1/watch", "Last-Event-ID: 7:1"))
        reader = Reader(lost)
        stream_head(reader)
        assert b'"reason": "history"' in read_until(reader, b"event: reset")


@pytest.mark.parametrize(
    ("target", "headers", "words"),
    [
        ("/v1/watch?prefix=%00x", (), "NUL"),
        ("/v1/watch?prefix=%FF", (), "UTF-8"),
        ("/v1/watch?prefix=" + "k" * 1025, (), "limit"),
        ("/v1/watch", ("Last-Event-ID: nonsense",), "Last-Event-ID"),
    ],
)
def test_bad_watch_requests_are_400_json(
    gateway: tuple[Server, Watches], target: str, headers: tuple[str, ...], words: str
) -> None:
    server, _ = gateway
    with server.connect() as sock:
        sock.sendall(request("GET", target, *headers))
        response = Reader(sock).response()
    assert response.status == 400
    assert words in response.json()["error"]


def test_the_thread_workers_stream_is_a_plain_wsgi_iterator(
    publisher: Publisher, context: zmq.Context
) -> None:
    watches = Watches([publisher.endpoint], context=context, threads=4)
    app = make_app(NoKv, watches=watches)  # type: ignore[arg-type]
    started: list[Any] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/v1/watch",
        "QUERY_STRING": "prefix=k",
        "SERVER_NAME": "test",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
    }
    try:
        result = app(environ, lambda status, headers, *_: started.append((status, headers)))
        body = iter(result)
        assert started[0][0] == "200 OK"
        assert next(body).startswith(b"retry: ")
        publisher.wait_subscribed()
        publisher.send(b"k1", 1)
        assert b"k1" in next(body)
        hub = watches._hub
        assert hub is not None and hub.state.max_watchers == 2  # half of 4 threads
        result.close()  # what gunicorn does when the client has gone
        assert not hub.state.watchers
    finally:
        watches.close()


# --- the client ----------------------------------------------------------------------------------


def test_client_watch_yields_events_and_a_gap_before_the_event_that_shows_it(
    publisher: Publisher,
) -> None:
    with (
        Client("tcp://127.0.0.1:1") as kv,
        kv.watch("", events=publisher.endpoint, timeout_s=DEADLINE_S) as watching,
    ):
        assert publisher.wait_subscribed() == b""  # every key: the numbers are exact
        publisher.send(b"a1", 1)
        publisher.send(b"a1", 1)  # a duplicate (two brokers): dropped
        publisher.send(b"a2", 4)
        publisher.send(b"a3", 1, stream=2)
        items = [next(watching) for _ in range(5)]
    assert [type(item) for item in items] == [Event, Gap, Event, Gap, Event]
    assert isinstance(items[1], Gap) and items[1].missed == 2
    assert isinstance(items[3], Gap) and items[3].new_stream
    assert [item.key for item in items if isinstance(item, Event)] == [b"a1", b"a2", b"a3"]


def test_a_prefix_watch_reports_no_gap_for_the_other_keys_events(publisher: Publisher) -> None:
    # seq counts every key of the shard; the XPUB sends this watcher only user:... keys.
    with (
        Client("tcp://127.0.0.1:1") as kv,
        kv.watch("user:", events=publisher.endpoint, timeout_s=DEADLINE_S) as watching,
    ):
        assert publisher.wait_subscribed() == b"user:"
        publisher.send(b"user:a", 1)
        for n in range(2, 22):
            publisher.send(f"zz:{n}".encode(), n)
        publisher.send(b"user:a", 22)
        publisher.send(b"user:b", 1, stream=7)  # a new owner is still reported
        items = [next(watching) for _ in range(4)]
    assert [type(item) for item in items] == [Event, Event, Gap, Event], items
    assert isinstance(items[2], Gap) and items[2].new_stream


def test_client_watch_ends_after_its_idle_timeout(publisher: Publisher) -> None:
    with Client("tcp://127.0.0.1:1") as kv:
        started = time.monotonic()
        assert list(kv.watch(events=publisher.endpoint, timeout_s=0.2)) == []
        assert time.monotonic() - started < DEADLINE_S


def test_async_watch(publisher: Publisher) -> None:
    async def main() -> list[Event | Gap]:
        kv = AsyncClient("tcp://127.0.0.1:1")
        try:
            async with kv.watch(b"x", events=publisher.endpoint, timeout_s=DEADLINE_S) as w:
                await asyncio.get_running_loop().run_in_executor(None, publisher.wait_subscribed)
                publisher.send(b"x1", 1)
                publisher.send(b"x2", 2)
                return [await w.__anext__(), await w.__anext__()]
        finally:
            await kv.close()

    items = asyncio.run(main())
    assert [item.key for item in items if isinstance(item, Event)] == [b"x1", b"x2"]


def test_a_malformed_event_is_skipped(publisher: Publisher) -> None:
    with Client("tcp://127.0.0.1:1") as kv, kv.watch(events=publisher.endpoint) as watching:
        publisher.wait_subscribed()
        publisher.socket.send_multipart([b"k", b"\x01\x40 short"])
        publisher.send(b"k", 1)
        item = watching.next(DEADLINE_S)
        assert isinstance(item, Event) and item.key == b"k"
        assert watching.malformed == 1


def test_zkv_watch_warns_when_nothing_listens_at_the_events_endpoint(
    publisher: Publisher, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    assert (
        cli.main(["--frontend", "tcp://127.0.0.1:1", "watch", "--events", nowhere, "--idle", "0.3"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out == "" and "no connection to" in err and nowhere in err
    endpoint = publisher.endpoint  # a listener with no events: quiet, nothing is wrong
    assert (
        cli.main(
            ["--frontend", "tcp://127.0.0.1:1", "watch", "--events", endpoint, "--idle", "0.3"]
        )
        == 0
    )
    assert capsys.readouterr() == ("", "")
