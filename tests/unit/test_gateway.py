"""The HTTP gateway, driven in-process through WSGI with an in-memory fake of the zkv client.

Every request goes through ``wsgiref.validate.validator``, so a response that breaks the WSGI
rules fails the test, and WSGI warnings are errors. No sockets: the fake keeps keys in shards the
way the cluster does, so pagination is tested against per-shard limits.
"""

from __future__ import annotations

import calendar
import email.utils
import io
import json
import logging
import os
import random
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest
from bottle import Bottle

import gateway.app as gateway_app
from gateway.app import (
    ClientPlugin,
    cursor_of,
    http_date,
    key_of_cursor,
    make_app,
)
from gateway.bridge import LoopClient
from gateway.server import app_factory, build_parser, gunicorn_options
from zkv import defaults
from zkv.calls import Lock
from zkv.client import ALL_PAGE_KEYS, Client, Item, NotFound, paged
from zkv.errors import (
    Busy,
    Conflict,
    PreconditionFailed,
    RequestError,
    StorageFull,
    Timeout,
    Unavailable,
    ZkvError,
)
from zkv.logs import BURST, WINDOW_S, LogLimiter
from zkv.protocol import MAX_TTL_MS, REPLY_TOO_LARGE, Entry

pytestmark = [
    pytest.mark.unit,
    pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning"),
]

REPO = Path(__file__).resolve().parents[2]
JSON = "application/json"

# The seed README's moment: Thu, 11 Jan 2024 21:09:21 GMT.
SEED_NOW = calendar.timegm((2024, 1, 11, 21, 9, 21))


# --- fakes ------------------------------------------------------------------------------------


class FakeClock:
    """Unix time in seconds that moves only when told to."""

    def __init__(self, now: float = SEED_NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def ms(self) -> int:
        return int(self.now * 1000)


class FakeClient:
    """The interface of zkv.client.Client over dicts, one per shard, with expiry by the clock.

    ``all`` behaves like the cluster: with a limit, each shard gives at most that many of its
    smallest keys after the cursor, and the union is sorted. ``failure`` makes every call raise.
    """

    def __init__(self, clock: FakeClock, shards: int = 3) -> None:
        self.clock = clock
        self.shards: list[dict[bytes, tuple[bytes, int | None]]] = [{} for _ in range(shards)]
        self.calls: list[tuple[Any, ...]] = []
        self.failure: BaseException | None = None
        self.ping_info: Any = {"shards": shards, "owned": [True] * shards, "workers": shards}
        self.versions: dict[bytes, int] = {}  # each key's last version, a deleted one's too
        self.last_version = 0
        self.locks: dict[bytes, tuple[int, int, bool]] = {}  # name: (token, expires, held)

    def _shard(self, key: bytes) -> dict[bytes, tuple[bytes, int | None]]:
        return self.shards[zlib.crc32(key) % len(self.shards)]

    def _live(self, shard: dict[bytes, tuple[bytes, int | None]]) -> dict[bytes, Any]:
        now = self.clock.ms()
        return {k: v for k, v in shard.items() if v[1] is None or v[1] > now}

    def _enter(self, *call: Any) -> None:
        self.calls.append(call)
        if self.failure is not None:
            raise self.failure

    # Issue 12: versions, counters, deadlines, locks and fences, as the worker keeps them
    # (design contract, section 4), without the cluster.

    def _version(self) -> int:
        self.last_version += 1
        return self.last_version

    def _store(self, key: bytes, value: bytes, deadline_ms: int | None) -> int:
        self._shard(key)[key] = (value, deadline_ms)
        version = self.versions[key] = self._version()
        return version

    def _found(self, key: bytes) -> tuple[bytes, int | None] | None:
        return self._live(self._shard(key)).get(key)

    def _fenced(self, fence: tuple[bytes, int] | None) -> None:
        """The client's FENCE_CHECK: the token must be the newest issued for its lock."""
        if fence is not None:
            name, token = fence
            newest = self.locks.get(name, (0, 0, False))[0]
            if token != newest:
                raise Conflict(f"fence token {token} is older than {newest}")

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> int | None:
        key, value = _b(key), _b(value)
        ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))  # as Client.set
        self._enter("set", key, value, ttl_ms)
        deadline_ms = None if ttl_ms is None else self.clock.ms() + ttl_ms
        self._store(key, value, deadline_ms)
        return deadline_ms

    def put(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> Item:
        key, value = _b(key), _b(value)
        ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
        conditions = {"nx": nx, "xx": xx, "if_version": if_version, "fence": fence}
        if any(conditions.values()):
            self._enter("set", key, value, ttl_ms, conditions)
        else:
            self._enter("set", key, value, ttl_ms)
        self._fenced(fence)
        found = self._found(key)
        if nx and found is not None:
            raise PreconditionFailed("key exists")
        if (xx or if_version is not None) and found is None:
            raise PreconditionFailed("key does not exist")
        if if_version is not None and self.versions[key] != if_version:
            raise PreconditionFailed(f"version is {self.versions[key]}, not {if_version}")
        deadline_ms = None if ttl_ms is None else self.clock.ms() + ttl_ms
        return Item(value, deadline_ms, self._store(key, value, deadline_ms))

    def get(self, key: bytes | str, touch_s: float | None = None) -> Item:
        key = _b(key)
        if touch_s is None:
            self._enter("get", key)
        else:
            self._enter("get", key, round(touch_s * 1000))
        found = self._found(key)
        if found is None:
            raise NotFound(key)
        if touch_s is not None:
            found = (found[0], self.clock.ms() + round(touch_s * 1000))
            self._store(key, *found)
        return Item(*found, self.versions.get(key, 0))

    def delete(
        self,
        key: bytes | str,
        if_version: int | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> bool:
        key = _b(key)
        if if_version is None and fence is None:
            self._enter("delete", key)
        else:
            self._enter("delete", key, if_version, fence)
        self._fenced(fence)
        live = key in self._live(self._shard(key))
        if if_version is not None and (not live or self.versions[key] != if_version):
            raise PreconditionFailed("version differs" if live else "key does not exist")
        self._shard(key).pop(key, None)
        if live:
            self.versions[key] = self._version()
        return live

    def incr_item(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> tuple[int, int, int | None]:
        key = _b(key)
        ttl_ms = None if ttl_s is None else round(ttl_s * 1000)
        self._enter("incr", key, by, ttl_ms, fence)
        self._fenced(fence)
        value, deadline_ms = self._found(key) or (b"0", None)
        try:
            number = int(value)
        except ValueError:
            raise Conflict("value is not an integer") from None
        number += by
        if not -(2**63) <= number < 2**63:
            raise Conflict("increment would overflow")
        if ttl_ms is not None:
            deadline_ms = self.clock.ms() + ttl_ms
        return number, self._store(key, str(number).encode(), deadline_ms), deadline_ms

    def expire(self, key: bytes | str, ttl_s: float, fence: tuple[bytes, int] | None = None) -> int:
        key = _b(key)
        self._enter("expire", key, round(ttl_s * 1000), *([fence] if fence else []))
        self._fenced(fence)
        found = self._found(key)
        if found is None:
            raise NotFound(key)
        deadline_ms = self.clock.ms() + round(ttl_s * 1000)
        self._store(key, found[0], deadline_ms)
        return deadline_ms

    def persist(self, key: bytes | str, fence: tuple[bytes, int] | None = None) -> int:
        key = _b(key)
        self._enter("persist", key, *([fence] if fence else []))
        self._fenced(fence)
        found = self._found(key)
        if found is None:
            raise NotFound(key)
        return self._store(key, found[0], None)

    def acquire_lock(self, name: bytes | str, ttl_s: float, wait_s: float = 0) -> Lock:
        name = _b(name)
        self._enter("lock", name, round(ttl_s * 1000), round(wait_s * 1000))
        token, expires_at_ms, held = self.locks.get(name, (0, 0, False))
        if held and expires_at_ms > self.clock.ms():
            raise Conflict("lock is held", deadline_ms=expires_at_ms)
        token, expires_at_ms = self._version(), self.clock.ms() + round(ttl_s * 1000)
        self.locks[name] = (token, expires_at_ms, True)
        return Lock(name, token, expires_at_ms)

    def refresh_lock(self, name: bytes | str, token: int, ttl_s: float) -> int:
        name = _b(name)
        self._enter("refresh", name, token, round(ttl_s * 1000))
        current, _, held = self.locks.get(name, (0, 0, False))
        if current != token or not held:
            raise Conflict(f"token {token} is not the lock's")
        expires_at_ms = self.clock.ms() + round(ttl_s * 1000)
        self.locks[name] = (token, expires_at_ms, True)
        return expires_at_ms

    def release_lock(self, name: bytes | str, token: int) -> None:
        name = _b(name)
        self._enter("unlock", name, token)
        current, expires_at_ms, held = self.locks.get(name, (0, 0, False))
        if current != token or not held:
            raise Conflict(f"token {token} is not the lock's")
        self.locks[name] = (token, expires_at_ms, False)

    def all(self, after: bytes | str = b"", limit: int = 0, keys_only: bool = False) -> list[Entry]:
        after = _b(after)
        self._enter("all", after, limit, keys_only)
        entries: list[Entry] = []
        for shard in self.shards:
            keys = sorted(k for k in self._live(shard) if k > after)
            if limit:
                keys = keys[:limit]
            for k in keys:
                value, deadline_ms = shard[k]
                entries.append(Entry(k, b"" if keys_only else value, deadline_ms))
        if limit:
            entries.sort(key=lambda entry: entry.key)
        return entries

    def pages(
        self,
        after: bytes | str = b"",
        keys_only: bool = False,
        limit: int = 0,
        page_keys: int = ALL_PAGE_KEYS,
    ) -> Iterator[list[Entry]]:
        """As Client.pages: ``all`` is this fake's one ALL request (per-shard limits)."""
        return paged(self.all, _b(after), keys_only, limit, page_keys)

    def ping(self) -> Any:
        self._enter("ping")
        return self.ping_info


def _b(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


# --- WSGI driver ------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        assert self.headers["content-type"] == JSON, self.headers
        return json.loads(self.body)


def call(
    app: Callable[..., Any],
    method: str,
    target: str,
    body: bytes | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """One request through wsgiref's validator, environ built like a real server builds it.

    ``target`` is the request target as sent on the wire: percent escapes in the path are
    decoded to bytes and handed over as latin-1 text, the query string is passed as is.
    """
    path, _, query = target.partition("?")
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(
        REQUEST_METHOD=method,
        PATH_INFO=unquote_to_bytes(path).decode("latin-1"),
        QUERY_STRING=query,
    )
    if body is not None:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
    environ.update(extra or {})
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started["status"], started["headers"] = status, headers
        return lambda data: None

    result = validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    header_list = started["headers"]
    return Response(
        int(started["status"].split()[0]),
        {name.lower(): value for name, value in header_list},
        data,
        header_list,
    )


@pytest.fixture(autouse=True)
def fresh_log_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own log rate limits: the app's limiter is per process, and lines an
    earlier test used up would be missing from a later test's log."""
    monkeypatch.setattr(gateway_app, "limited", LogLimiter(gateway_app.log))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kv(clock: FakeClock) -> FakeClient:
    return FakeClient(clock)


@pytest.fixture
def app(kv: FakeClient, clock: FakeClock) -> Bottle:
    return make_app(lambda: kv, max_key_bytes=16, max_value_bytes=32, clock=clock)


def get(app: Bottle, target: str) -> Response:
    return call(app, "GET", target)


def call_unclosed(
    app: Bottle, target: str
) -> tuple[str, list[tuple[str, str]], bytes, Callable[[], None]]:
    """A GET whose WSGI result is read but not closed: a server still sending it. Returns the
    status, headers, body and the result's close()."""
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": target}
    setup_testing_defaults(environ)
    started: list[Any] = []
    result = app(environ, lambda status, headers, exc_info=None: started.extend([status, headers]))
    body = b"".join(result)
    return started[0], started[1], body, getattr(result, "close", lambda: None)


def error_of(response: Response, status: int) -> str:
    """The message of a JSON error response, after checking its status and shape."""
    assert response.status == status, (response.status, response.body)
    payload = response.json()
    assert list(payload) == ["error"], payload
    assert isinstance(payload["error"], str) and payload["error"]
    return payload["error"]


# --- seed API ---------------------------------------------------------------------------------


def test_seed_examples_exactly(app: Bottle, clock: FakeClock) -> None:
    # The seed README's /get: a key set for 5 s, read at once.
    set_response = get(app, "/set?key=1&value=hello&timeout=5")
    assert set_response.status == 200
    assert set_response.headers["content-type"] == JSON
    assert get(app, "/get?key=1").json() == {
        "current_time": "Thu, 11 Jan 2024 21:09:21 GMT",
        "time_out": "Thu, 11 Jan 2024 21:09:26 GMT",
        "value": "hello",
    }

    # Its /set: 10 s from 21:09:27.
    clock.now = SEED_NOW + 6
    response = get(app, "/set?key=1&value=hello&timeout=10")
    assert response.status == 200
    assert response.json() == {
        "key": "1",
        "message": "Value set successfully",
        "timeout": "Thu, 11 Jan 2024 21:09:37 GMT",
        "value": "hello",
    }

    # Its /all, at 21:12:21 with a 10 s key.
    clock.now = SEED_NOW + 180
    get(app, "/set?key=1&value=hello&timeout=10")
    assert get(app, "/all").json() == {
        "1": {"time_out": "Thu, 11 Jan 2024 21:12:31 GMT", "value": "hello"}
    }

    # Its /delete, then the strings of a missing key.
    response = get(app, "/delete?key=1")
    assert (response.status, response.json()) == (200, {"message": "Value deleted successfully"})
    response = get(app, "/delete?key=1")
    assert (response.status, response.json()) == (200, {"error": "Key not found"})
    response = get(app, "/get?key=1")
    assert (response.status, response.json()) == (200, {"error": "Data not found"})


def test_seed_json_keys_are_sorted_like_flask(app: Bottle) -> None:
    for key in ["b", "c", "a", "e", "d"]:
        get(app, f"/set?key={key}&value=v&timeout=10")
    body = get(app, "/all").body.decode()
    positions = [body.index(f'"{key}": {{') for key in "abcde"]
    assert positions == sorted(positions), body


def test_seed_key_expires(app: Bottle, clock: FakeClock) -> None:
    get(app, "/set?key=k&value=v&timeout=2")
    clock.now += 1.999
    assert get(app, "/get?key=k").json()["value"] == "v"
    clock.now += 0.001
    assert get(app, "/get?key=k").json() == {"error": "Data not found"}
    assert get(app, "/all").json() == {}
    assert get(app, "/delete?key=k").json() == {"error": "Key not found"}


def test_seed_all_lists_every_shard(app: Bottle, kv: FakeClient) -> None:
    for i in range(20):
        get(app, f"/set?key=k{i}&value=v{i}&timeout=60")
    assert sum(1 for shard in kv.shards if shard) > 1  # the keys really are spread
    listing = get(app, "/all").json()
    assert listing == {
        f"k{i}": {"time_out": "Thu, 11 Jan 2024 21:10:21 GMT", "value": f"v{i}"} for i in range(20)
    }


@pytest.mark.parametrize(
    ("timeout", "ttl_ms", "expiry"),
    [
        ("1.5", 1500, "Thu, 11 Jan 2024 21:09:22 GMT"),
        ("2", 2000, "Thu, 11 Jan 2024 21:09:23 GMT"),
        ("0.001", 1, "Thu, 11 Jan 2024 21:09:21 GMT"),
        ("0.0005", 1, "Thu, 11 Jan 2024 21:09:21 GMT"),  # rounded half up to 1 ms
        ("0.0015", 2, "Thu, 11 Jan 2024 21:09:21 GMT"),
        ("007", 7000, "Thu, 11 Jan 2024 21:09:28 GMT"),
        ("10.25", 10250, "Thu, 11 Jan 2024 21:09:31 GMT"),
        (str(MAX_TTL_MS // 1000), MAX_TTL_MS, None),
        # Any number Python's float() reads, as the seed's Flask app took them (issue 13):
        ("1e3", 1_000_000, None),
        ("1E-3", 1, None),
        ("2.5e0", 2500, None),
        ("%205", 5000, None),  # " 5"
        ("5%20", 5000, None),  # "5 "
        ("+5", 5000, None),  # "+" is a space in a query string
        ("%2B5", 5000, None),
        ("1.", 1000, None),
        (".5", 500, None),
        ("1_000", 1_000_000, None),
        ("%D9%A1", 1000, None),  # ARABIC-INDIC DIGIT ONE: float() reads Unicode digits
        ("3.1536e8", MAX_TTL_MS, None),
    ],
)
def test_seed_timeout_in_seconds_to_milliseconds(
    app: Bottle, kv: FakeClient, timeout: str, ttl_ms: int, expiry: str | None
) -> None:
    response = get(app, f"/set?key=k&value=v&timeout={timeout}")
    assert response.status == 200, response.body
    assert kv.calls[-1] == ("set", b"k", b"v", ttl_ms)
    if expiry is not None:
        assert response.json()["timeout"] == expiry


@pytest.mark.parametrize(
    "timeout",
    [
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "1e400",  # beyond a float: not finite
        "-1",
        "-1e3",
        "0",
        "0.0",
        "0.0001",
        "1e-400",
        "",
        "abc",
        "1,5",
        "0x10",
        "1__0",  # Decimal would read it, float() does not
        "1_",
        "%005",
        str(MAX_TTL_MS // 1000 + 1),
        str(MAX_TTL_MS // 1000) + ".001",
        "9" * 400,
    ],
)
def test_seed_bad_timeout_is_400_naming_it(app: Bottle, kv: FakeClient, timeout: str) -> None:
    message = error_of(get(app, f"/set?key=k&value=v&timeout={timeout}"), 400)
    assert "'timeout'" in message
    assert len(message) < 200  # a huge input is not echoed whole
    assert kv.calls == []


def test_seed_timeout_messages(app: Bottle) -> None:
    assert error_of(get(app, "/set?key=1&value=hello&timeout=abc"), 400) == (
        "parameter 'timeout' must be a positive number of seconds, got 'abc'"
    )
    assert error_of(get(app, "/set?key=1&value=hello"), 400) == "missing parameter 'timeout'"
    assert "at least 0.001" in error_of(get(app, "/set?key=1&value=v&timeout=0"), 400)
    assert "at most 315360000 seconds" in error_of(
        get(app, "/set?key=1&value=v&timeout=315360001"), 400
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/set?value=v&timeout=1", "missing parameter 'key'"),
        ("/set?key=k&timeout=1", "missing parameter 'value'"),
        ("/set?key=k&value=v", "missing parameter 'timeout'"),
        ("/set?key=&value=v&timeout=1", "parameter 'key' must not be empty"),
        ("/set?key&value=v&timeout=1", "parameter 'key' must not be empty"),
        ("/set?key=a&key=b&value=v&timeout=1", "parameter 'key' given 2 times, expected once"),
        ("/set?key=k&value=a&value=b&timeout=1", "parameter 'value' given 2 times, expected once"),
        (
            "/set?key=k&value=v&timeout=1&timeout=2",
            "parameter 'timeout' given 2 times, expected once",
        ),
        ("/set?key=%FF&value=v&timeout=1", "parameter 'key' is not valid UTF-8"),
        ("/set?key=k&value=%C3%28&timeout=1", "parameter 'value' is not valid UTF-8"),
        ("/get", "missing parameter 'key'"),
        ("/get?key=", "parameter 'key' must not be empty"),
        ("/get?key=a&key=a", "parameter 'key' given 2 times, expected once"),
        ("/get?key=%FE", "parameter 'key' is not valid UTF-8"),
        ("/delete", "missing parameter 'key'"),
        ("/delete?key=", "parameter 'key' must not be empty"),
        ("/delete?key=1&key=2", "parameter 'key' given 2 times, expected once"),
    ],
)
def test_seed_bad_input_is_400_naming_the_parameter(
    app: Bottle, kv: FakeClient, target: str, message: str
) -> None:
    assert error_of(get(app, target), 400) == message
    assert kv.calls == []


def test_seed_size_limits_are_400_in_bytes(app: Bottle, kv: FakeClient) -> None:
    # The fixture's limits: keys of 16 bytes, values of 32. "é" is two bytes in UTF-8.
    assert get(app, f"/set?key={quote('é' * 8)}&value=v&timeout=1").status == 200
    message = error_of(get(app, f"/set?key={quote('é' * 9)}&value=v&timeout=1"), 400)
    assert message == "parameter 'key' is 18 bytes, more than the limit of 16 bytes"
    assert error_of(get(app, f"/get?key={'k' * 17}"), 400).startswith("parameter 'key' is 17")
    assert get(app, f"/set?key=k&value={'v' * 32}&timeout=1").status == 200
    message = error_of(get(app, f"/set?key=k&value={'v' * 33}&timeout=1"), 400)
    assert message == "parameter 'value' is 33 bytes, more than the limit of 32 bytes"
    assert [call[0] for call in kv.calls] == ["set", "set"]


def test_seed_values_and_keys_are_utf8(app: Bottle, kv: FakeClient) -> None:
    response = get(app, f"/set?key={quote('ключ')}&value={quote('héllo wörld+€')}&timeout=5")
    assert response.json()["key"] == "ключ"
    assert response.json()["value"] == "héllo wörld+€"
    assert kv.calls[-1] == ("set", "ключ".encode(), "héllo wörld+€".encode(), 5000)
    assert get(app, f"/get?key={quote('ключ')}").json()["value"] == "héllo wörld+€"
    # In a query string "+" is a space, as every HTML form encodes it.
    get(app, "/set?key=k&value=a+b&timeout=5")
    assert get(app, "/get?key=k").json()["value"] == "a b"


def test_seed_empty_value_is_a_value(app: Bottle) -> None:
    assert get(app, "/set?key=k&value=&timeout=5").json()["value"] == ""
    assert get(app, "/get?key=k").json()["value"] == ""


def test_seed_shows_binary_values_and_keys_without_expiry(app: Bottle) -> None:
    assert call(app, "PUT", "/v1/keys/bin", body=b"ok\xff\xfe").status == 200
    assert get(app, "/get?key=bin").json() == {
        "current_time": "Thu, 11 Jan 2024 21:09:21 GMT",
        "time_out": None,
        "value": "ok\ufffd\ufffd",
    }
    assert get(app, "/all").json() == {"bin": {"time_out": None, "value": "ok\ufffd\ufffd"}}


def test_seed_ignores_unknown_parameters(app: Bottle) -> None:
    assert get(app, "/set?key=k&value=v&timeout=1&_=12345").status == 200


def test_http_date_is_formatdate_to_the_second() -> None:
    # Cached per second, but the very text email.utils.formatdate gives, fraction dropped.
    samples = [0, 999, 1000, 1999, SEED_NOW * 1000, SEED_NOW * 1000 + 999, MAX_TTL_MS, -1500]
    rng = random.Random(7)
    samples += [rng.randrange(0, 4_000_000_000_000) for _ in range(2000)]
    for unix_ms in samples:
        assert http_date(unix_ms) == email.utils.formatdate(unix_ms / 1000, usegmt=True), unix_ms
    assert http_date(None) is None


# --- REST API ---------------------------------------------------------------------------------

ODD_KEYS = ["a/b/c", "with space", "ключ/🔑", "/leading", "trailing/", "semi;colon", "q?mark"]


@pytest.mark.parametrize("key", ODD_KEYS)
def test_rest_round_trip_binary_value(app: Bottle, kv: FakeClient, key: str) -> None:
    value = bytes(range(32))
    target = "/v1/keys/" + quote(key, safe="")
    response = call(app, "PUT", target, body=value)
    assert response.status == 200
    assert response.json() == {"key": key, "expires_at": None, "expires_at_ms": None}
    assert kv.calls[-1] == ("set", key.encode(), value, None)

    response = call(app, "GET", target)
    assert response.status == 200
    assert response.body == value
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(value))
    assert not any(name.startswith("x-zkv") for name in response.headers)

    response = call(app, "DELETE", target)
    assert (response.status, response.json()) == (200, {"deleted": key})
    assert error_of(call(app, "GET", target), 404) == "key not found"
    assert error_of(call(app, "DELETE", target), 404) == "key not found"


def test_rest_slash_in_key_needs_no_escaping(app: Bottle, kv: FakeClient) -> None:
    call(app, "PUT", "/v1/keys/dir/sub%20dir/file", body=b"x")
    assert kv.calls[-1][1] == b"dir/sub dir/file"
    assert call(app, "GET", "/v1/keys/dir%2Fsub dir%2Ffile").body == b"x"


def test_rest_ttl_headers(app: Bottle, kv: FakeClient, clock: FakeClock) -> None:
    response = call(app, "PUT", "/v1/keys/k?ttl=2.5", body=b"v")
    deadline_ms = clock.ms() + 2500
    assert response.json() == {
        "key": "k",
        "expires_at": "Thu, 11 Jan 2024 21:09:23 GMT",
        "expires_at_ms": deadline_ms,
    }
    assert kv.calls[-1] == ("set", b"k", b"v", 2500)
    clock.now += 1
    response = call(app, "GET", "/v1/keys/k")
    assert response.headers["x-zkv-expires-at"] == "Thu, 11 Jan 2024 21:09:23 GMT"
    assert response.headers["x-zkv-expires-at-ms"] == str(deadline_ms)
    assert response.headers["x-zkv-ttl-ms"] == "1500"
    clock.now += 1.5
    assert error_of(call(app, "GET", "/v1/keys/k"), 404) == "key not found"


def test_rest_empty_value(app: Bottle) -> None:
    assert call(app, "PUT", "/v1/keys/k", body=b"").status == 200
    response = call(app, "GET", "/v1/keys/k")
    assert (response.status, response.body) == (200, b"")


@pytest.mark.parametrize(
    "ttl", ["abc", "0", "-1", "nan", "inf", "1e400", "", "0.0001", "999999999999"]
)
def test_rest_bad_ttl_is_400_naming_it(app: Bottle, kv: FakeClient, ttl: str) -> None:
    assert "'ttl'" in error_of(call(app, "PUT", f"/v1/keys/k?ttl={ttl}", body=b"v"), 400)
    assert error_of(call(app, "PUT", "/v1/keys/k?ttl=1&ttl=2", body=b"v"), 400) == (
        "parameter 'ttl' given 2 times, expected once"
    )
    assert kv.calls == []


def test_rest_key_limit_is_413_in_bytes(app: Bottle, kv: FakeClient) -> None:
    assert call(app, "PUT", "/v1/keys/" + quote("é" * 8), body=b"v").status == 200
    for method in ("PUT", "GET", "DELETE"):
        response = call(app, method, "/v1/keys/" + quote("é" * 9), body=b"v")
        assert error_of(response, 413) == "key is 18 bytes, more than the limit of 16 bytes"
    assert len(kv.calls) == 1


class Unreadable(io.RawIOBase):
    """A request body that fails the test if anyone reads it."""

    def read(self, size: int = -1) -> bytes:
        raise AssertionError("the body was read")


def test_rest_declared_length_over_limit_is_413_unread(app: Bottle, kv: FakeClient) -> None:
    response = call(
        app,
        "PUT",
        "/v1/keys/k",
        extra={"wsgi.input": Unreadable(), "CONTENT_LENGTH": "33"},
    )
    assert error_of(response, 413) == "value is 33 bytes, more than the limit of 32 bytes"
    assert call(app, "PUT", "/v1/keys/k", body=b"v" * 32).status == 200
    assert kv.calls == [("set", b"k", b"v" * 32, None)]


def test_rest_chunked_body_limit(app: Bottle, kv: FakeClient) -> None:
    # gunicorn removes the chunk framing and marks the input as terminated; no Content-Length.
    def chunked(body: bytes) -> dict[str, Any]:
        return {
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,
            "HTTP_TRANSFER_ENCODING": "chunked",
        }

    assert call(app, "PUT", "/v1/keys/k", extra=chunked(b"x" * 32)).status == 200
    assert kv.calls[-1] == ("set", b"k", b"x" * 32, None)
    response = call(app, "PUT", "/v1/keys/k", extra=chunked(b"x" * 10_000))
    assert error_of(response, 413) == "value is more than the limit of 32 bytes"
    assert len(kv.calls) == 1


def test_rest_chunked_body_without_terminated_input_is_411(app: Bottle, kv: FakeClient) -> None:
    extra = {"wsgi.input": Unreadable(), "HTTP_TRANSFER_ENCODING": "chunked"}
    assert "Content-Length" in error_of(call(app, "PUT", "/v1/keys/k", extra=extra), 411)
    assert kv.calls == []


def test_rest_key_with_invalid_utf8_is_400_not_mangled(app: Bottle, kv: FakeClient) -> None:
    # Bottle alone would drop the invalid byte and use the key "ab"; a key of invalid bytes
    # only would be routed as /v1/keys/ and answered 404 naming no key.
    for method in ("PUT", "GET", "DELETE"):
        for path, sent in (("/v1/keys/a%FFb", "a%FFb"), ("/v1/keys/%FF", "%FF")):
            response = call(app, method, path, body=b"v")
            assert error_of(response, 400) == f"the key in the path is not valid UTF-8: {sent!r}"
    assert kv.calls == []


# --- listing ----------------------------------------------------------------------------------


def walk(app: Bottle, limit: int | None) -> list[list[str]]:
    """Every page of GET /v1/keys, following ``next`` until it is null."""
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        query = [] if limit is None else [f"limit={limit}"]
        if after is not None:
            query.append("after=" + quote(after, safe=""))
        response = get(app, "/v1/keys?" + "&".join(query))
        assert response.status == 200
        payload = response.json()
        assert set(payload) == {"keys", "next"}
        pages.append([entry["key"] for entry in payload["keys"]])
        after = payload["next"]
        if after is None:
            return pages
        assert after == pages[-1][-1]
        assert len(pages) < 1000, "pagination does not end"


@pytest.mark.parametrize("shards", [1, 3, 7])
@pytest.mark.parametrize("limit", [1, 7, 10, 57, 58])
def test_listing_walks_every_key_once(clock: FakeClock, shards: int, limit: int) -> None:
    kv = FakeClient(clock, shards=shards)
    app = make_app(lambda: kv, clock=clock)
    keys = [f"key/{i:03d}/ключ" for i in range(57)]
    for key in keys:
        call(app, "PUT", "/v1/keys/" + quote(key), body=b"v")
    pages = walk(app, limit)
    assert [key for page in pages for key in page] == sorted(keys, key=str.encode)
    assert all(len(page) == limit for page in pages[:-1])
    assert 1 <= len(pages[-1]) <= limit
    assert all(call[2] == limit + 1 and call[3] is True for call in kv.calls if call[0] == "all")


def test_listing_entries_and_expiry(app: Bottle, clock: FakeClock) -> None:
    call(app, "PUT", "/v1/keys/a?ttl=10", body=b"v")
    call(app, "PUT", "/v1/keys/b", body=b"v")
    call(app, "PUT", "/v1/keys/c?ttl=1", body=b"v")
    clock.now += 1
    assert get(app, "/v1/keys").json() == {
        "keys": [
            {
                "key": "a",
                "expires_at": "Thu, 11 Jan 2024 21:09:31 GMT",
                "expires_at_ms": (SEED_NOW + 10) * 1000,
            },
            {"key": "b", "expires_at": None, "expires_at_ms": None},
        ],
        "next": None,
    }


def test_listing_default_page_size(clock: FakeClock) -> None:
    kv = FakeClient(clock)
    app = make_app(lambda: kv, clock=clock)
    for i in range(defaults.LIST_LIMIT + 5):
        kv.set(f"k{i:04d}", b"v")
    pages = walk(app, None)
    assert [len(page) for page in pages] == [defaults.LIST_LIMIT, 5]


def test_listing_empty_store(app: Bottle) -> None:
    assert get(app, "/v1/keys").json() == {"keys": [], "next": None}


@pytest.mark.parametrize(
    "limit",
    ["0", "-1", "abc", "", "1.5", "nan", "inf", "1e400", str(defaults.LIST_LIMIT_MAX + 1), "9" * 9],
)
def test_listing_bad_limit_is_400_naming_it(app: Bottle, kv: FakeClient, limit: str) -> None:
    assert "'limit'" in error_of(get(app, f"/v1/keys?limit={limit}"), 400)
    assert kv.calls == []


def test_listing_limit_in_any_form_float_reads(app: Bottle, kv: FakeClient) -> None:
    for limit in ("1e1", "10.0", "%2010", "1_0"):
        assert get(app, f"/v1/keys?limit={limit}").status == 200
    assert [call[2] for call in kv.calls if call[0] == "all"] == [11] * 4  # limit + 1


def test_nan_and_inf_are_400_naming_the_parameter(app: Bottle) -> None:
    assert error_of(get(app, "/set?key=k&value=v&timeout=nan"), 400) == (
        "parameter 'timeout' must be a finite number, got 'nan'"
    )
    assert error_of(get(app, "/v1/keys?limit=inf"), 400) == (
        "parameter 'limit' must be a finite number, got 'inf'"
    )


def test_listing_limit_bounds_and_bad_cursor(app: Bottle) -> None:
    assert get(app, f"/v1/keys?limit={defaults.LIST_LIMIT_MAX}").status == 200
    assert get(app, "/v1/keys?limit=1").status == 200
    assert "'after'" in error_of(get(app, "/v1/keys?after=%FF"), 400)
    assert "'after'" in error_of(get(app, "/v1/keys?after=a&after=b"), 400)


# Keys that are not UTF-8 (stored through the library) in listings and /all (issue 10, item 12).
ODD_KEYS = [b"a\xff", b"a\xfe", b"a\xef\xbf\xbd", b"a%FF", b"a%", b"\xc3", b"z", b"a\xff\x00"]


def test_cursors_are_the_exact_key_bytes() -> None:
    for key in [*ODD_KEYS, b"", b"plain/key", "ключ%".encode()]:
        assert key_of_cursor(cursor_of(key)) == key
    assert cursor_of(b"plain/key") == "plain/key"  # a UTF-8 key without % is its own cursor
    assert cursor_of(b"a\xff") == "a%FF" and cursor_of(b"a%FF") == "a%25FF"


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_listing_of_non_utf8_keys_ends_and_shows_each_key_once(
    clock: FakeClock, limit: int
) -> None:
    kv = FakeClient(clock, shards=2)
    app = make_app(lambda: kv, clock=clock)
    for key in ODD_KEYS:
        kv.set(key, b"v")
    shown: list[str] = []
    after: str | None = None
    for _ in range(len(ODD_KEYS) + 1):  # a cursor that does not advance would loop forever
        query = f"limit={limit}" + ("" if after is None else "&after=" + quote(after, safe=""))
        payload = get(app, "/v1/keys?" + query).json()
        shown.extend(entry["key"] for entry in payload["keys"])
        after = payload["next"]
        if after is None:
            break
    assert after is None, "the listing did not end"
    keys = [key.encode("utf-8", "surrogateescape") for key in shown]
    assert keys == sorted(ODD_KEYS)


def test_seed_all_never_merges_distinct_keys(app: Bottle, kv: FakeClient) -> None:
    for i, key in enumerate(ODD_KEYS):
        kv.set(key, b"v%d" % i, ttl_s=60)
    body = get(app, "/all").body
    assert body.isascii()  # invalid bytes travel as \udcXX escapes
    listing = json.loads(body)
    assert len(listing) == len(ODD_KEYS)
    assert {k.encode("utf-8", "surrogateescape"): v["value"] for k, v in listing.items()} == {
        key: f"v{i}" for i, key in enumerate(ODD_KEYS)
    }


def test_seed_all_reads_in_pages_and_answers_413_past_its_bound(
    app: Bottle, kv: FakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_app, "SEED_ALL_PAGE_KEYS", 7)
    for i in range(50):
        kv.set(f"k{i:02d}", b"0123456789", ttl_s=60)
    whole = get(app, "/all").body
    assert len(json.loads(whole)) == 50
    assert {call[2] for call in kv.calls if call[0] == "all"} == {8}  # never without a limit
    # The bound is on the JSON as rendered, not on the data's bytes.
    monkeypatch.setattr(gateway_app, "SEED_ALL_MAX_BYTES", len(whole) - 1)
    assert "GET /v1/keys" in error_of(get(app, "/all"), 413)
    monkeypatch.setattr(gateway_app, "SEED_ALL_MAX_BYTES", len(whole))
    assert get(app, "/all").body == whole


def test_seed_all_bounds_its_json_not_its_raw_bytes(
    app: Bottle, kv: FakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: 30 values of 1 MiB of 0xFF passed a bound on raw bytes and rendered 189 MB of
    # "\ufffd". Here 4 KiB of raw data, 24 KiB of JSON, against a bound of 16 KiB.
    monkeypatch.setattr(gateway_app, "SEED_ALL_MAX_BYTES", 16 * 1024)
    for i in range(4):
        kv.set(f"ff{i}", b"\xff" * 1024, ttl_s=60)
    assert "at most 16384 bytes of JSON" in error_of(get(app, "/all"), 413)
    kv.delete("ff3")
    kv.delete("ff2")
    listing = get(app, "/all")
    assert len(listing.body) <= 16 * 1024
    assert listing.json()["ff0"]["value"] == "\ufffd" * 1024
    assert listing.body == gateway_app.to_json(json.loads(listing.body)).encode()  # as before


def test_seed_all_runs_at_most_its_slots_at_once_and_frees_them_when_sent(
    app: Bottle, kv: FakeClient
) -> None:
    kv.set("k", b"v", ttl_s=60)
    held = []
    for _ in range(gateway_app.SEED_ALL_CONCURRENT):  # answered, not yet sent: slots held
        held.append(call_unclosed(app, "/all"))
        assert held[-1][0].startswith("200")
    status, headers, body, _ = call_unclosed(app, "/all")
    assert status.startswith("503") and ("Retry-After", "1") in headers
    assert "at most 2 /all at once" in json.loads(body)["error"]
    held[0][3]()  # the server has sent one: its slot is free
    assert call_unclosed(app, "/all")[0].startswith("200")


def test_seed_all_asks_fewer_keys_when_a_page_is_too_large(clock: FakeClock) -> None:
    class SmallReplies(FakeClient):
        def all(self, after: bytes | str = b"", limit: int = 0, keys_only: bool = False):  # type: ignore[no-untyped-def]
            if limit > 100:
                self.calls.append(("too large", limit))
                raise RequestError(f"{REPLY_TOO_LARGE}: shard 0: 1000 bytes; ask for fewer keys")
            return super().all(after, limit, keys_only)

    kv = SmallReplies(clock)
    app = make_app(lambda: kv, clock=clock)
    for i in range(300):
        kv.set(f"k{i:03d}", b"v", ttl_s=60)
    assert len(get(app, "/all").json()) == 300
    kv.failure = RequestError("something else")
    assert get(app, "/all").status == 400


# --- errors -----------------------------------------------------------------------------------


def test_a_flood_of_failing_requests_logs_a_bounded_number_of_lines(
    app: Bottle, kv: FakeClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Every 5xx wrote a WARNING: a client repeating a failing request wrote a line each time.
    ticks = FakeClock(0.0)
    monkeypatch.setattr(gateway_app, "limited", LogLimiter(gateway_app.log, clock=ticks))
    caplog.set_level(logging.WARNING, logger="gateway.app")
    kv.failure = Unavailable("no worker owns shard 1")
    for _ in range(200):
        assert get(app, "/v1/keys/k").status == 503
        assert get(app, "/get?key=k").status == 503
    kv.failure = RuntimeError("a bug a request can reach")
    for _ in range(200):
        assert get(app, "/v1/keys/k").status == 500
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.app"]
    assert len(lines) == 2 * BURST  # one budget per kind: 503, 500
    ticks.now += WINDOW_S
    kv.failure = Unavailable("no worker owns shard 1")
    assert get(app, "/v1/keys/k").status == 503
    last = caplog.records[-1].getMessage()
    assert "-> 503" in last and f"({400 - BURST} similar message(s) suppressed" in last


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (Unavailable("no worker owns shard 1"), 503),
        (Timeout("no reply from tcp://127.0.0.1:5555 within 5.0 s"), 504),
        (RequestError("key too long"), 400),
    ],
)
@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/set?key=k&value=v&timeout=1"),
        ("GET", "/get?key=k"),
        ("GET", "/delete?key=k"),
        ("GET", "/all"),
        ("PUT", "/v1/keys/k"),
        ("GET", "/v1/keys/k"),
        ("DELETE", "/v1/keys/k"),
        ("GET", "/v1/keys"),
    ],
)
def test_cluster_errors_map_to_statuses(
    app: Bottle, kv: FakeClient, failure: Exception, status: int, method: str, target: str
) -> None:
    kv.failure = failure
    response = call(app, method, target, body=b"v" if method == "PUT" else None)
    assert error_of(response, status) == str(failure)
    assert ("retry-after" in response.headers) == (status == 503)


@pytest.mark.parametrize(
    ("failure", "status", "says"),
    [
        (Busy("broker over its byte bound"), 503, "the cluster is busy, retry later"),
        (StorageFull("shard 1: no space left on device"), 507, "the shard's disk is full"),
    ],
)
@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/set?key=k&value=v&timeout=1"),
        ("GET", "/get?key=k"),
        ("PUT", "/v1/keys/k"),
        ("DELETE", "/v1/keys/k"),
    ],
)
def test_busy_is_503_with_retry_after_and_a_full_disk_507(
    app: Bottle,
    kv: FakeClient,
    failure: Exception,
    status: int,
    says: str,
    method: str,
    target: str,
) -> None:
    kv.failure = failure
    response = call(app, method, target, body=b"v" if method == "PUT" else None)
    message = error_of(response, status)
    assert message.startswith(says) and str(failure) in message and "not applied" in message
    assert ("retry-after" in response.headers) == (status == 503)
    assert response.headers.get("retry-after", "1") == "1"


def test_unexpected_error_is_500_json_logged_without_traceback(
    app: Bottle, kv: FakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    kv.failure = RuntimeError("secret internals")
    with caplog.at_level(logging.ERROR, logger="gateway.app"):
        response = get(app, "/get?key=k")
    assert error_of(response, 500) == "internal server error"
    assert b"secret" not in response.body and b"Traceback" not in response.body
    [record] = caplog.records
    assert "RuntimeError" in record.getMessage() and "secret internals" in record.getMessage()
    assert "\n" not in record.getMessage() and record.exc_info is None


def test_unserialisable_result_is_500_json(app: Bottle, kv: FakeClient) -> None:
    kv.ping_info = {"odd": {1, 2}}  # json.dumps cannot write a set
    assert error_of(get(app, "/v1/health"), 500) == "internal server error"


def test_failing_client_factory_is_500_json(clock: FakeClock) -> None:
    def factory() -> FakeClient:
        raise OSError("too many open files")

    assert error_of(get(make_app(factory, clock=clock), "/get?key=k"), 500)


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/", 405),  # GET / is the status page
        ("GET", "/v1/keys/", 404),
        ("GET", "/v1", 404),
        ("POST", "/set?key=k&value=v&timeout=1", 405),
        ("PUT", "/get?key=k", 405),
        ("POST", "/v1/keys/k", 405),
        ("DELETE", "/v1/keys", 405),
        ("PATCH", "/v1/health", 405),
    ],
)
def test_bottle_errors_are_json(
    app: Bottle, kv: FakeClient, method: str, target: str, status: int
) -> None:
    response = call(app, method, target, body=b"x" if method in ("POST", "PUT", "PATCH") else None)
    error_of(response, status)
    assert b"<" not in response.body
    if status == 405:
        assert response.headers["allow"]
    assert kv.calls == []


def test_head_is_answered_like_get_without_body(app: Bottle) -> None:
    call(app, "PUT", "/v1/keys/k", body=b"value")
    response = call(app, "HEAD", "/v1/keys/k")
    assert (response.status, response.body) == (200, b"")
    assert response.headers["content-length"] == "5"
    response = call(app, "HEAD", "/v1/keys/missing")
    assert (response.status, response.headers["content-type"]) == (404, JSON)


# --- health -----------------------------------------------------------------------------------


def test_health_ok(app: Bottle, kv: FakeClient) -> None:
    response = get(app, "/v1/health")
    assert response.status == 200
    assert response.json() == {"status": "ok", "shards": 3, "owned": [True] * 3, "workers": 3}


@pytest.mark.parametrize(
    "owned",
    [[True, False], [False, False], [], None, 2],
    ids=["one", "none", "empty", "null", "int"],
)
def test_health_with_a_shard_without_owner_is_503_degraded(
    app: Bottle, kv: FakeClient, owned: Any
) -> None:
    """A readiness check: 200 only when every shard has an owner (it was 200 "ok" with none)."""
    kv.ping_info = {"status": "degraded", "shards": 2, "owned": owned, "workers": 1}
    response = get(app, "/v1/health")
    assert response.status == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {**kv.ping_info, "status": "degraded"}  # checks the content type
    kv.ping_info = {"status": "ok", "shards": 2, "owned": [True, True], "workers": 2}
    assert get(app, "/v1/health").status == 200


@pytest.mark.parametrize(
    "failure", [Unavailable("broker down"), Timeout("no reply"), ZkvError("malformed PING")]
)
def test_health_unavailable_is_503(app: Bottle, kv: FakeClient, failure: Exception) -> None:
    kv.failure = failure
    response = get(app, "/v1/health")
    assert response.status == 503
    assert response.json() == {"status": "unavailable", "error": str(failure)}


# --- clients per thread -----------------------------------------------------------------------


def test_clients_are_lazy_and_per_thread(kv: FakeClient, clock: FakeClock) -> None:
    made: list[tuple[int, FakeClient]] = []

    def factory() -> FakeClient:
        client = FakeClient(clock)
        client.shards = kv.shards  # one store, many clients
        made.append((threading.get_ident(), client))
        return client

    app = make_app(factory, clock=clock)
    assert made == []  # nothing made before a request: gunicorn forks after make_app
    get(app, "/set?key=k&value=v&timeout=5")
    get(app, "/get?key=k")
    assert len(made) == 1
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(get(app, "/get?key=k").json()))
    thread.start()
    thread.join(timeout=10)
    assert answers and answers[0]["value"] == "v"
    assert len(made) == 2 and made[0][0] != made[1][0]
    assert made[0][1] is not made[1][1]
    assert [c[0] for c in made[0][1].calls] == ["set", "get"]
    assert [c[0] for c in made[1][1].calls] == ["get"]


# --- server -----------------------------------------------------------------------------------


def test_server_defaults_listen_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ZKV_HOST",
        "PORT",
        "ZKV_HTTP_PROCESSES",
        "ZKV_HTTP_THREADS",
        "ZKV_HTTP_WORKER",
        "ZKV_ACCESS_LOG",
    ):
        monkeypatch.delenv(name, raising=False)
    options = gunicorn_options(build_parser().parse_args([]))
    assert options["bind"] == ["127.0.0.1:5000"]
    assert options["worker_class"] == "gateway.worker.EventLoopWorker"
    assert options["preload_app"] is False
    assert options["graceful_timeout"] < 5  # honcho kills 5 s after SIGTERM
    assert options["workers"] == 2
    assert options["worker_connections"] == 1000
    assert options["accesslog"] is None


def test_server_worker_class_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZKV_HTTP_WORKER", "gthread")
    args = build_parser().parse_args([])
    assert gunicorn_options(args)["worker_class"] == "gateway.gthread.ThreadWorker"
    (plugin,) = [p for p in app_factory(args)().plugins if isinstance(p, ClientPlugin)]
    assert plugin.client_factory.func is Client  # a blocking client per thread
    args = build_parser().parse_args(["--worker-class", "event"])
    assert gunicorn_options(args)["worker_class"] == "gateway.worker.EventLoopWorker"
    (plugin,) = [p for p in app_factory(args)().plugins if isinstance(p, ClientPlugin)]
    assert plugin.client_factory.func is LoopClient  # one batching client per process
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--worker-class", "sync"])


def test_server_flags_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "5123")
    monkeypatch.setenv("ZKV_HOST", "::1")
    monkeypatch.setenv("ZKV_HTTP_THREADS", "3")
    monkeypatch.setenv("ZKV_ACCESS_LOG", "yes")
    args = build_parser().parse_args(["--threads", "4"])  # a flag beats its variable
    options = gunicorn_options(args)
    assert options["bind"] == ["[::1]:5123"]
    assert options["threads"] == 4
    assert options["accesslog"] == "-"


def test_server_app_factory_builds_a_lazy_app(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["--frontend", "tcp://127.0.0.1:1", "--timeout", "0.25", "--max-key-bytes", "4"]
    )
    app = app_factory(args)()  # what each gunicorn worker does after the fork
    assert isinstance(app, Bottle)
    # The key limit came through; the 400 is raised before any client is made.
    assert error_of(get(app, "/get?key=12345"), 400).startswith("parameter 'key' is 5 bytes")


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_help() -> None:
    result = run_gateway("--help")
    assert result.returncode == 0, result.stderr
    for flag, variable in [
        ("--host", "ZKV_HOST"),
        ("--port", "PORT"),
        ("--frontend", "ZKV_FRONTEND"),
        ("--processes", "ZKV_HTTP_PROCESSES"),
        ("--threads", "ZKV_HTTP_THREADS"),
        ("--timeout", "ZKV_TIMEOUT"),
        ("--max-key-bytes", "ZKV_MAX_KEY_BYTES"),
        ("--max-value-bytes", "ZKV_MAX_VALUE_BYTES"),
        ("--access-log", "ZKV_ACCESS_LOG"),
    ]:
        assert flag in result.stdout and variable in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "http"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        (["--threads", "0"], {}, "--threads"),
        (["--timeout", "nan"], {}, "--timeout"),
        (["--frontend", "localhost:5555"], {}, "--frontend"),
        (["--max-key-bytes", "70000"], {}, "--max-key-bytes"),
        (["--host", "no such host"], {}, "--host"),
        ([], {"ZKV_HTTP_PROCESSES": "many"}, "ZKV_HTTP_PROCESSES"),
        ([], {"PORT": "-1"}, "PORT"),
    ],
)
def test_cli_bad_configuration_exits_nonzero(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_gateway(*args, env=env)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr
