"""The fast lane (gateway/fastlane.py) against the Bottle app it stands in for.

Every request is served both ways from the same data and clock: when the fast lane takes a
request, its status, headers and body must be the app's, byte for byte; when it declines one,
the app must be refusing it (a 4xx), never serving it, so the fast lane never slows a valid
request down for nothing. Query strings are fuzzed: escapes, ``+``, repeated and empty
parameters, invalid UTF-8, oversized keys and values, malformed timeouts.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Iterator
from typing import Any

import bottle
import pytest

from gateway.app import Query, make_app
from gateway.bridge import LoopClient
from gateway.fastlane import FastLane, Response, for_app
from zkv.client import Item, NotFound
from zkv.errors import Busy, RequestError, StorageFull, Timeout, Unavailable
from zkv.protocol import Kind

NOW_S = 1_700_000_000.25
MAX_KEY = 64
MAX_VALUE = 100


class Store:
    """Keys with deadlines, as a cluster would hold them at ``NOW_S``."""

    def __init__(self, data: dict[bytes, tuple[bytes, int | None]], fail: Exception | None):
        self.data = dict(data)
        self.fail = fail

    def apply(self, kind: int, key: bytes, value: bytes | None, ttl_ms: int | None) -> Any:
        if self.fail is not None:
            raise self.fail
        if kind == Kind.GET:
            found = self.data.get(key)
            return None if found is None else Item(found[0], found[1])
        if kind == Kind.SET:
            assert value is not None
            deadline = None if ttl_ms is None else int(NOW_S * 1000) + ttl_ms
            self.data[key] = (value, deadline)
            return deadline
        return self.data.pop(key, None) is not None


class BlockingFake:
    """The app's client (what gateway.app.ClientLike asks for) over a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, key: bytes | str) -> Item:
        key = key.encode() if isinstance(key, str) else key
        item = self.store.apply(Kind.GET, key, None, None)
        if item is None:
            raise NotFound(key)
        return item

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> Any:
        key = key.encode() if isinstance(key, str) else key
        value = value.encode() if isinstance(value, str) else value
        ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
        return self.store.apply(Kind.SET, key, value, ttl_ms)

    def delete(self, key: bytes | str) -> bool:
        key = key.encode() if isinstance(key, str) else key
        return bool(self.store.apply(Kind.DEL, key, None, None))


class AsyncFake:
    """What the fast lane asks of :class:`zkv.aio.AsyncClient`: ``submit``, over a Store."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.submitted = 0

    def submit(
        self, kind: int, key: bytes, value: bytes | None = None, ttl_ms: int | None = None
    ) -> asyncio.Future[Any]:
        self.submitted += 1
        future = self.loop.create_future()
        try:
            future.set_result(self.store.apply(kind, key, value, ttl_ms))
        except Exception as exc:
            future.set_exception(exc)
        return future


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def through_app(target: bytes, store: Store) -> Response:
    """The Bottle app's answer, given the environ gateway/http11.py builds for ``target``."""
    app = make_app(lambda: BlockingFake(store), MAX_KEY, MAX_VALUE, clock=lambda: NOW_S)
    path, _, query = target.partition(b"?")
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path.decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "5000",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
    }
    started: list[Any] = []
    body = b"".join(
        app(environ, lambda status, headers, exc_info=None: started.extend([status, headers]))
    )
    return started[0], list(started[1]), body


def through_lane(
    target: bytes, store: Store, loop: asyncio.AbstractEventLoop, method: bytes = b"GET"
) -> Response | None:
    """The fast lane's answer, None if it declines."""
    app = make_app(lambda: BlockingFake(store), MAX_KEY, MAX_VALUE, clock=lambda: NOW_S)
    lane = for_app(app)
    assert lane is not None
    client = AsyncFake(store, loop)
    lane = FastLane(lane.seed, lambda: client)  # type: ignore[arg-type, return-value]
    taken = lane(method, target)
    if taken is None:
        assert client.submitted == 0, f"{target!r}: declined after sending a call"
        return None
    assert client.submitted == 1
    future, finish = taken
    assert future.done()
    return finish(future)


def initial() -> dict[bytes, tuple[bytes, int | None]]:
    return {
        b"k1": (b"hello", int(NOW_S * 1000) + 10_000),
        "ключ".encode(): ("значение".encode(), int(NOW_S * 1000) + 1),
        b"bin": (b"\xff\xfe raw", None),
        b"a b+c": (b"spaced", int(NOW_S * 1000) + 3_600_000),
    }


def compare(target: bytes, loop: asyncio.AbstractEventLoop, fail: Exception | None = None) -> str:
    """Serve ``target`` both ways; returns "taken" or "declined" after checking the rule."""
    app_store, lane_store = Store(initial(), fail), Store(initial(), fail)
    expected = through_app(target, app_store)
    got = through_lane(target, lane_store, loop)
    if got is None:
        assert expected[0][:1] == "4", f"{target!r}: declined, but the app answers {expected}"
        return "declined"
    assert got == expected, target
    assert lane_store.data == app_store.data, target
    return "taken"


@pytest.mark.parametrize(
    "target",
    [
        b"/get?key=k1",
        b"/get?key=missing",
        b"/get?key=%D0%BA%D0%BB%D1%8E%D1%87",
        b"/get?key=bin",
        b"/get?key=a+b%2Bc",
        b"/get?key=k1&other=1&&x",
        b"/set?key=1&value=hello&timeout=10",
        b"/set?key=new&value=&timeout=0.001",
        b"/set?key=k1&value=%E2%82%AC&timeout=1.5",
        b"/set?timeout=2&value=v&key=k",
        b"/delete?key=k1",
        b"/delete?key=missing",
    ],
)
def test_valid_requests_are_taken_and_answered_as_the_app_does(loop, target):
    assert compare(target, loop) == "taken"


@pytest.mark.parametrize(
    "target",
    [
        b"/get",
        b"/get?key=",
        b"/get?key=k1&key=k2",
        b"/get?key=%FF",
        b"/get?key=" + b"x" * (MAX_KEY + 1),
        b"/set?key=k&value=v",
        b"/set?key=k&value=v&timeout=-1",
        b"/set?key=k&value=v&timeout=nan",
        b"/set?key=k&value=v&timeout=0.0001",
        b"/set?key=k&value=" + b"v" * (MAX_VALUE + 1) + b"&timeout=1",
        b"/delete?key",
    ],
)
def test_refused_requests_are_left_to_the_app(loop, target):
    assert compare(target, loop) == "declined"


@pytest.mark.parametrize(
    "method, target",
    [
        (b"HEAD", b"/get?key=k1"),
        (b"POST", b"/set?key=k&value=v&timeout=1"),
        (b"GET", b"/all"),
        (b"GET", b"/g%65t?key=k1"),
        (b"GET", b"/get/?key=k1"),
        (b"GET", b"/get?key=k1#fragment"),
        (b"GET", b"/v1/keys/k1"),
        (b"GET", b"http://host/get?key=k1"),
    ],
)
def test_anything_but_the_plain_routes_is_left_to_the_app(loop, method, target):
    assert through_lane(target, Store(initial(), None), loop, method) is None


@pytest.mark.parametrize(
    "error",
    [
        Timeout("no reply within 5.0 s"),
        Unavailable("the broker at tcp://127.0.0.1:5555 is unreachable"),
        RequestError("shard 1: value too large"),
        Busy("broker over its byte bound"),
        StorageFull("shard 1: no space left on device"),
        RuntimeError("a bug"),
    ],
)
@pytest.mark.parametrize(
    "target", [b"/get?key=k1", b"/set?key=k&value=v&timeout=1", b"/delete?key=k1"]
)
def test_a_failed_call_is_answered_as_the_app_answers_it(loop, target, error):
    assert compare(target, loop, fail=error) == "taken"


def test_fuzzed_query_strings_are_answered_alike(loop):
    rng = random.Random(20261127)
    # Pieces of parameter values: plain text, escapes (valid and not), "+", separators.
    pieces = [
        "k1",
        "bin",
        "a",
        "b",
        "x",
        "é",
        "+",
        "%2B",
        "%20",
        "%3D",
        "%26",
        "%C3%A9",
        "%FF",
        "%",
        "%2",
        "=",
        ";",
        "0",
        "1",
        "5",
        ".",
        "-",
        "e3",
        "  ",
    ]
    names = {b"/get": ["key"], b"/delete": ["key"], b"/set": ["key", "value", "timeout"]}
    taken = declined = 0
    for _ in range(1200):  # 3,000 cost 13 s of the suite's budget and found nothing more
        path = rng.choice(list(names))
        pairs = []
        for name in names[path] + rng.choice([[], [], ["other"], ["", "key"]]):
            for _ in range(rng.choice([1, 1, 1, 1, 1, 1, 1, 1, 0, 2])):
                value = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
                if name == "timeout" and rng.random() < 0.7:
                    value = rng.choice(["1", "0.5", "10", "0.001", "3600"])
                pairs.append(f"{name}={value}" if rng.random() < 0.95 else name)
        rng.shuffle(pairs)
        target = path + b"?" + "&".join(pairs).encode()
        if compare(target, loop) == "taken":
            taken += 1
        else:
            declined += 1
    # Both outcomes must really occur, or the fuzzing tests nothing.
    assert taken > 120 and declined > 120, (taken, declined)


@pytest.mark.parametrize(
    "query",
    ["", "a", "a=1&b=2&a=3", "&&a=&=b&c", "a+b=c+d", "%41=%42%FF", "x=%2", "é=ü", "a=b=c", ";a=1"],
)
def test_query_reads_parameters_as_bottle_does(query):
    environ = {"QUERY_STRING": query}
    expected = bottle.BaseRequest(environ).query
    ours = Query(query)
    for name in set(expected.keys()) | {"a", "b", "x", "A"}:
        assert ours.getall(name) == expected.getall(name), (query, name)


def test_query_matches_bottle_on_fuzzed_strings():
    rng = random.Random(7)
    alphabet = "ab=&+%2F41;é "
    for _ in range(2000):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        expected = bottle.BaseRequest({"QUERY_STRING": query}).query
        ours = Query(query)
        for name in set(expected.keys()):
            assert ours.getall(name) == expected.getall(name), (query, name)
        assert not ours.getall("never-there")


def test_a_key_is_sent_as_its_utf8_bytes(loop):
    store = Store({}, None)
    lane = for_app(make_app(lambda: BlockingFake(store), MAX_KEY, MAX_VALUE))
    assert lane is not None
    seen: list[tuple[Any, ...]] = []

    class Recorder(AsyncFake):
        def submit(self, kind, key, value=None, ttl_ms=None):  # type: ignore[no-untyped-def]
            seen.append((kind, key, value, ttl_ms))
            return super().submit(kind, key, value, ttl_ms)

    lane = FastLane(lane.seed, lambda: Recorder(store, loop))  # type: ignore[arg-type, return-value]
    lane(b"GET", "/set?key=é+x&value=€&timeout=0.0015".encode())
    assert seen == [(Kind.SET, "é x".encode(), "€".encode(), 2)]


def test_without_an_event_loop_client_the_app_serves(loop):
    lane = for_app(make_app(lambda: BlockingFake(Store({}, None)), MAX_KEY, MAX_VALUE))
    assert lane is not None
    assert lane(b"GET", b"/get?key=k1") is None  # the app's client is not a LoopClient


def test_an_app_not_made_by_make_app_has_no_fast_lane():
    assert for_app(bottle.Bottle()) is None


def test_with_an_event_loop_client_the_lane_uses_its_asyncio_client():
    made: list[LoopClient] = []

    def factory() -> LoopClient:
        made.append(LoopClient("tcp://127.0.0.1:1", timeout_s=1.0, connect_timeout_s=1.0))
        return made[0]

    lane = for_app(make_app(factory))
    assert lane is not None
    assert lane.client() is made[0].aio
    assert lane.client() is made[0].aio and len(made) == 1  # one client per thread, reused
