"""The gateway's HTTP server (gateway/http11.py), in one process: its loop in a thread, real
sockets, raw HTTP bytes.

What the server promises beyond plain HTTP/1.1: oversized bodies reach the app unread (so its
413 comes first), chunked bodies arrive decoded, its own errors are JSON, heads are bounded,
stalled clients time out, a graceful stop finishes what it has, and requests whose app waits on
the broker do not hold up the others, nor see each other's Bottle request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import bottle
import pytest

from gateway import http11
from gateway.app import make_app
from gateway.bridge import wait
from gateway.http11 import HttpServer, ServerConfig
from tests.cluster import wait_for
from zkv.client import Item, NotFound
from zkv.logs import BURST, WINDOW_S

pytestmark = pytest.mark.integration

LIMIT = 1000  # max_body_bytes of every server here
FLOOD = 40  # malformed requests that must not write as many log lines


class Server:
    """An :class:`HttpServer` serving ``app`` on a free loopback port, its loop in a thread."""

    def __init__(
        self,
        app: Callable[..., Any],
        shortcut: http11.Shortcut | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.http = HttpServer(
            app,
            ServerConfig(max_body_bytes=LIMIT, **options),
            self.loop,
            shortcut=shortcut,
            clock=clock,
        )
        self._done = threading.Event()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.http.start([self.listener]))
            started.set()
            self.loop.run_forever()
            self._done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(5), "the server did not start"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def call(self, function: Callable[[], Any]) -> None:
        """Run ``function`` on the server's loop."""
        self.loop.call_soon_threadsafe(function)

    def run(self, coroutine: Any, timeout_s: float = 10.0) -> Any:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self, grace_s: float) -> Any:
        """Start a graceful stop; the returned future ends with it."""
        return asyncio.run_coroutine_threadsafe(self.http.stop(grace_s), self.loop)

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop(0.0).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            assert not self.thread.is_alive(), "the loop did not stop"
            self.loop.close()
        self.listener.close()


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json", self.headers
        return json.loads(self.body)


class Reader:
    """Reads responses off a raw socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self, head_request: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed before a response: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_request else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert self._fill(), "connection closed in a body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(int(status_line.split()[1]), headers, body)

    def closed(self) -> bool:
        """Whether the server closed the connection (after anything still buffered)."""
        try:
            return not self._fill() and not self.buffer
        except ConnectionResetError:
            return True


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answers with what it was given, as JSON."""
    body = environ["wsgi.input"].read()
    shown = {
        key: value
        for key, value in environ.items()
        if isinstance(value, str | bool) and not key.startswith("wsgi.errors")
    }
    payload = json.dumps({"environ": shown, "body": body.decode("latin-1")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [payload]


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server(echo)
    yield running
    running.close()


def request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: test", *headers]
    if body and not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- plain HTTP/1.1 ---------------------------------------------------------------------------


def test_keep_alive_answers_many_requests_on_one_connection(server: Server) -> None:
    with server.connect() as sock:
        reader = Reader(sock)
        for i in range(3):
            sock.sendall(request("GET", f"/n/{i}"))
            response = reader.response()
            assert response.status == 200
            assert response.json()["environ"]["PATH_INFO"] == f"/n/{i}"
            assert "connection" not in response.headers
            assert response.headers["date"].endswith(" GMT")


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"".join(request("GET", f"/p/{i}") for i in range(5)))
        reader = Reader(sock)
        paths = [reader.response().json()["environ"]["PATH_INFO"] for _ in range(5)]
    assert paths == [f"/p/{i}" for i in range(5)]


def test_environ_follows_wsgi(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(
            request(
                "PUT",
                "/v1/keys/a%2Fb%20c%FF?x=%20y&z",
                "X-Thing: one",
                "X-Thing: two",
                "X_Forged: no",
                "Content-Type: text/plain",
                body=b"payload",
            )
        )
        got = Reader(sock).response().json()
    environ = got["environ"]
    assert got["body"] == "payload"
    assert environ["REQUEST_METHOD"] == "PUT"
    assert environ["PATH_INFO"] == "/v1/keys/a/b c\xff"  # decoded bytes as latin-1, like gunicorn
    assert environ["QUERY_STRING"] == "x=%20y&z"  # as sent
    assert environ["RAW_URI"] == "/v1/keys/a%2Fb%20c%FF?x=%20y&z"
    assert environ["CONTENT_LENGTH"] == "7"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert environ["HTTP_X_THING"] == "one,two"
    assert "HTTP_X_FORGED" not in environ  # underscores would let "X_Forged" pass as "X-Forged"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["wsgi.input_terminated"] is True


def test_absolute_form_target(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "http://test/abs/path?q=1"))
        environ = Reader(sock).response().json()["environ"]
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/abs/path", "q=1")


def test_head_gets_headers_without_body() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "5")])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [b"hello"]

    running = Server(app)
    try:
        with running.connect() as sock:
            sock.sendall(request("HEAD", "/x") + request("GET", "/x"))
            reader = Reader(sock)
            head = reader.response(head_request=True)
            assert (head.status, head.headers["content-length"], head.body) == (200, "5", b"")
            assert reader.response().body == b"hello"
    finally:
        running.close()


def test_http_1_0_closes_unless_kept_alive(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        reader = Reader(sock)
        assert reader.response().headers["connection"] == "close"
        assert reader.closed()
    with server.connect() as sock:
        sock.sendall(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reader = Reader(sock)
        assert reader.response().headers["connection"] == "keep-alive"
        sock.sendall(b"GET /again HTTP/1.0\r\n\r\n")
        assert reader.response().status == 200


def test_connection_close_is_honoured(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/a", "Connection: close") + request("GET", "/b"))
        reader = Reader(sock)
        response = reader.response()
        # /a answered (llhttp refuses the bytes after it, which must not turn into a 400)
        assert response.status == 200 and response.json()["environ"]["PATH_INFO"] == "/a"
        assert response.headers["connection"] == "close"
        assert reader.closed()  # the pipelined /b is not answered


def test_upgrade_is_answered_as_plain_http_then_closed(server: Server) -> None:
    with server.connect() as sock:
        upgrade = request("GET", "/ws", "Connection: Upgrade", "Upgrade: websocket")
        sock.sendall(upgrade + b"\x81\x05hello")  # a websocket frame, not HTTP
        reader = Reader(sock)
        response = reader.response()
        assert response.json()["environ"]["PATH_INFO"] == "/ws"
        assert response.headers["connection"] == "close"
        assert reader.closed()


def test_large_response_is_sent_whole(server: Server) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: more than one send takes

    def big(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [])
        return [body]

    app_server = Server(big)
    try:
        # A small receive buffer, so that the server's socket fills and it must wait for
        # EPOLLOUT, whatever the kernel's defaults.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", app_server.port))
        with sock:
            sock.sendall(request("GET", "/big"))
            response = Reader(sock).response()
        assert response.body == body
        assert response.headers["content-length"] == str(len(body))
    finally:
        app_server.close()


# --- bodies -----------------------------------------------------------------------------------


class FakeKv:
    """Just enough of the zkv client for the app's PUT and GET."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> None:
        key = key.encode() if isinstance(key, str) else key
        self.data[key] = value if isinstance(value, bytes) else value.encode()

    def put(
        self, key: bytes | str, value: bytes | str, ttl_s: float | None = None, **_: Any
    ) -> Any:
        """PUT /v1/keys/... stores through put() (issue 12): the new item with its version."""
        self.set(key, value, ttl_s)
        return Item(value if isinstance(value, bytes) else value.encode(), None, 1)

    def get(self, key: bytes | str) -> Any:
        key = key.encode() if isinstance(key, str) else key
        if key not in self.data:
            raise NotFound(key)
        return Item(self.data[key], None, 1)


@pytest.fixture
def gateway() -> Iterator[tuple[Server, FakeKv]]:
    kv = FakeKv()
    running = Server(make_app(lambda: kv, max_value_bytes=LIMIT))
    yield running, kv
    running.close()


def test_declared_body_over_limit_is_refused_before_it_is_sent(
    gateway: tuple[Server, FakeKv],
) -> None:
    running, kv = gateway
    with running.connect() as sock:
        # Only the head: the answer must come without the body.
        sock.sendall(request("PUT", "/v1/keys/k", f"Content-Length: {LIMIT + 1}"))
        reader = Reader(sock)
        response = reader.response()
        assert response.status == 413
        assert response.json() == {
            "error": f"value is {LIMIT + 1} bytes, more than the limit of {LIMIT} bytes"
        }
        assert response.headers["connection"] == "close"
        sock.sendall(b"x" * (LIMIT + 1))  # a client that sends it anyway is not reset
        assert reader.closed()
    assert kv.data == {}


def test_a_large_body_sent_after_its_413_is_read_and_discarded_not_reset(
    gateway: tuple[Server, FakeKv],
) -> None:
    running, kv = gateway
    size = 3_000_000  # far more than the socket buffers hold: the server must keep reading
    with running.connect() as sock:
        sock.sendall(request("PUT", "/v1/keys/k", f"Content-Length: {size}"))
        for _ in range(size // 65536 + 1):  # a BrokenPipeError here is the failure
            sock.sendall(b"x" * 65536)
        reader = Reader(sock)
        assert reader.response().status == 413
        sock.shutdown(socket.SHUT_WR)
        assert reader.closed()
    assert kv.data == {}


def test_body_at_the_limit_is_stored(gateway: tuple[Server, FakeKv]) -> None:
    running, kv = gateway
    with running.connect() as sock:
        sock.sendall(request("PUT", "/v1/keys/k", body=b"v" * LIMIT))
        assert Reader(sock).response().status == 200
    assert kv.data == {b"k": b"v" * LIMIT}


def chunked(body: bytes, size: int = 100) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def test_chunked_body_arrives_decoded(gateway: tuple[Server, FakeKv]) -> None:
    running, kv = gateway
    value = bytes(range(256)) * 3
    with running.connect() as sock:
        sock.sendall(
            request("PUT", "/v1/keys/c", "Transfer-Encoding: chunked", body=chunked(value))
        )
        reader = Reader(sock)
        assert reader.response().status == 200
        sock.sendall(request("GET", "/v1/keys/c"))  # and the connection is still usable
        assert reader.response().body == value
    assert kv.data == {b"c": value}


def test_chunked_body_over_limit_is_413_and_closed(gateway: tuple[Server, FakeKv]) -> None:
    running, kv = gateway
    with running.connect() as sock:
        sock.sendall(request("PUT", "/v1/keys/c", "Transfer-Encoding: chunked"))
        sock.sendall(chunked(b"x" * (LIMIT * 3))[:-5])  # never finished
        reader = Reader(sock)
        response = reader.response()
        assert response.status == 413
        assert response.json() == {"error": f"value is more than the limit of {LIMIT} bytes"}
        assert reader.closed()
    assert kv.data == {}


def test_expect_100_continue(gateway: tuple[Server, FakeKv]) -> None:
    running, _ = gateway
    with running.connect() as sock:
        sock.sendall(request("PUT", "/v1/keys/e", "Content-Length: 5", "Expect: 100-continue"))
        reader = Reader(sock)
        assert reader.response().status == 100
        sock.sendall(b"hello")
        assert reader.response().status == 200
    with running.connect() as sock:  # too large: the final answer at once, no 100
        sock.sendall(request("PUT", "/v1/keys/e", "Content-Length: 5000", "Expect: 100-continue"))
        assert Reader(sock).response().status == 413


# --- the server's own errors: JSON, then closed -------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, "malformed"),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "malformed",
        ),
        (request("GET", "/" + "a" * 9000), 414, "request target longer than 8190 bytes"),
        (
            request("GET", "/", *[f"X-H{i}: {'v' * 1000}" for i in range(140)]),
            431,
            "request head larger than",
        ),
    ],
    ids=["garbage", "two-lengths", "length-and-chunked", "long-target", "large-head"],
)
def test_bad_requests_get_json_errors(server: Server, data: bytes, status: int, words: str) -> None:
    with server.connect() as sock:
        sock.sendall(data)
        reader = Reader(sock)
        response = reader.response()
        assert response.status == status
        assert words in response.json()["error"]
        assert response.headers["connection"] == "close"
        assert reader.closed()


def test_app_that_raises_gets_json_500(caplog: pytest.LogCaptureFixture) -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        raise RuntimeError("bug")

    running = Server(broken)
    try:
        with running.connect() as sock:
            sock.sendall(request("GET", "/"))
            response = Reader(sock).response()
        assert (response.status, response.json()) == (500, {"error": "internal server error"})
    finally:
        running.close()
    assert any("RuntimeError" in (r.exc_text or "") for r in caplog.records)


def test_a_flood_of_refused_requests_writes_a_bounded_number_of_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A refusal costs its peer nothing: one access-log line each let a client write lines
    # without bound. Now at most BURST a window per kind, then a count of those suppressed.
    caplog.set_level(logging.INFO, logger="gateway.access")
    now = [0.0]
    running = Server(echo, clock=lambda: now[0], access_log=True, max_connections=1000)

    def refused() -> list[str]:
        return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]

    def send_garbage() -> None:
        with running.connect() as sock:
            sock.sendall(b"\x00\x01 nonsense\r\n\r\n")
            reader = Reader(sock)
            assert reader.response().status == 400
            assert reader.closed()  # the server logs (or not) before it shuts its side

    try:
        for _ in range(FLOOD):
            send_garbage()
        wait_for(lambda: len(refused()) >= BURST or None, "the first refusals logged", 5)
        now[0] += WINDOW_S  # the next window: one line, with the count of the rest
        send_garbage()
        wait_for(lambda: len(refused()) > BURST or None, "the next window's line", 5)
    finally:
        running.close()
    lines = refused()
    assert len(lines) == BURST + 1
    assert f"({FLOOD - BURST} similar message(s) suppressed" in lines[-1]


def test_connections_over_the_limit_get_503_and_are_closed() -> None:
    running = Server(echo, max_connections=2)
    try:
        first, second = running.connect(), running.connect()
        for sock in (first, second):  # answered: both adopted
            sock.sendall(request("GET", "/"))
            assert Reader(sock).response().status == 200
        with running.connect() as third:
            reader = Reader(third)
            response = reader.response()
            assert (response.status, response.json()) == (503, {"error": "too many connections"})
            assert reader.closed()
        first.close()

        def served_again() -> bool:  # once the server has seen the close, a place is free
            with running.connect() as fourth:
                fourth.sendall(request("GET", "/again"))
                return Reader(fourth).response().status == 200

        wait_for(lambda: served_again() or None, "a freed connection slot", 5)
        second.close()
    finally:
        running.close()


# --- time limits and stopping -------------------------------------------------------------------


def test_stalled_request_gets_408_and_idle_connection_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http11, "LINGER_S", 0.3)
    monkeypatch.setattr(http11, "SWEEP_S", 0.05)
    running = Server(echo, read_timeout_s=0.3, keepalive_s=0.3)
    try:
        with running.connect() as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # and nothing more
            reader = Reader(sock)
            started = time.monotonic()
            response = reader.response()
            assert response.status == 408 and "error" in response.json()
            assert reader.closed()
            assert time.monotonic() - started < 3
        with running.connect() as sock:
            sock.sendall(request("GET", "/"))
            reader = Reader(sock)
            assert reader.response().status == 200
            assert reader.closed()  # idle after its answer: closed after keepalive_s
    finally:
        running.close()


class Pending:
    """Futures on the server's loop that the test resolves: a broker that answers on cue."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.futures: dict[str, asyncio.Future[str]] = {}
        self.entered = threading.Event()

    def wait_for(self, name: str) -> str:
        """Called by the app, in its request greenlet: park until the test answers ``name``."""
        future = self.server.loop.create_future()
        self.futures[name] = future
        self.entered.set()
        return wait(future)

    def answer(self, name: str, value: str) -> None:
        self.server.call(lambda: self.futures[name].set_result(value))


def test_graceful_stop_finishes_requests_in_hand_and_closes_idle_connections() -> None:
    pending: Pending

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["PATH_INFO"]
        if body == "/slow":
            body += pending.wait_for("slow")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body.encode()]

    running = Server(slow)
    pending = Pending(running)
    idle = running.connect()
    busy = running.connect()
    try:
        idle.sendall(request("GET", "/first"))
        idle_reader = Reader(idle)
        assert idle_reader.response().body == b"/first"
        busy.sendall(request("GET", "/slow"))
        assert pending.entered.wait(5)
        stopped = running.stop(5.0)
        assert idle_reader.closed()  # idle: closed at once
        with pytest.raises(ConnectionRefusedError):  # no new connections
            running.connect()
        assert not stopped.done()  # the request in hand is still being waited for
        pending.answer("slow", "+done")
        response = Reader(busy).response()
        assert (response.status, response.body) == (200, b"/slow+done")
        assert response.headers["connection"] == "close"
        stopped.result(5)
    finally:
        idle.close()
        busy.close()
        running.close()


# --- requests that wait on the broker -------------------------------------------------------------


def test_a_waiting_request_does_not_hold_up_others_nor_see_their_bottle_request() -> None:
    app = bottle.Bottle()
    running: Server
    pending: Pending

    @app.get("/wait/<name>")
    def waiting(name: str) -> dict[str, Any]:
        bottle.response.set_header("X-Name", name)
        answer = pending.wait_for(name)
        # After the switch back: Bottle's thread-local request and response must be this
        # request's again, although others were bound meanwhile on the same thread.
        return {"name": name, "query": bottle.request.query.get("q"), "answer": answer}

    running = Server(app)
    pending = Pending(running)
    socks = [running.connect() for _ in range(3)]
    try:
        for n, sock in enumerate(socks):
            pending.entered.clear()
            sock.sendall(request("GET", f"/wait/r{n}?q=q{n}"))
            assert pending.entered.wait(5)
        assert sorted(pending.futures) == ["r0", "r1", "r2"]  # all three in the app at once
        for n in (2, 0, 1):  # answered out of order
            pending.answer(f"r{n}", f"a{n}")
        for n, sock in enumerate(socks):
            response = Reader(sock).response()
            assert response.json() == {"name": f"r{n}", "query": f"q{n}", "answer": f"a{n}"}
            assert response.headers["x-name"] == f"r{n}"
    finally:
        for sock in socks:
            sock.close()
        running.close()


def test_app_outside_a_request_greenlet_is_refused() -> None:
    with pytest.raises(RuntimeError, match="request greenlet"):
        wait(asyncio.Future(loop=asyncio.new_event_loop()))


# --- fuzz -----------------------------------------------------------------------------------------


def mutations(rng: random.Random, count: int) -> Iterator[bytes]:
    """Valid requests cut, spliced and sprinkled with random bytes, and plain noise."""
    seeds = [
        request("GET", "/get?key=1"),
        request("PUT", "/v1/keys/k", body=b"value"),
        request("PUT", "/v1/keys/c", "Transfer-Encoding: chunked", body=chunked(b"x" * 300)),
        request("GET", "/", "Expect: 100-continue", "Content-Length: 3") + b"abc",
    ]
    for _ in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            roll = rng.random()
            at = rng.randrange(len(data) + 1)
            if roll < 0.4:
                data[at:at] = rng.randbytes(rng.randrange(1, 8))
            elif roll < 0.7:
                del data[at : at + rng.randrange(1, 8)]
            elif roll < 0.9 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            else:
                data = bytearray(rng.randbytes(rng.randrange(1, 200)))
        yield bytes(data)


def test_fuzzed_requests_get_an_http_answer_or_a_close_and_the_server_lives_on(
    gateway: tuple[Server, FakeKv],
) -> None:
    running, _ = gateway
    rng = random.Random(20261127)
    statuses: set[int] = set()
    for data in mutations(rng, 300):
        with running.connect() as sock:
            sock.settimeout(3)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # no more input: whatever was sent must be answered
            received = b""
            while chunk := sock.recv(65536):  # the server closes; a hang times out (an error)
                received += chunk
        if received:
            assert received.startswith(b"HTTP/1.1 "), (data, received[:200])
            status = int(received[9:12])
            statuses.add(status)
            body = received.partition(b"\r\n\r\n")[2]
            if status >= 400:
                assert json.loads(body.split(b"HTTP/1.1 ")[0])["error"], (data, received)
    assert {200, 400} <= statuses, statuses  # both paths were exercised
    with running.connect() as sock:  # and it still serves
        sock.sendall(request("PUT", "/v1/keys/after", body=b"ok"))
        assert Reader(sock).response().status == 200


def test_an_app_whose_call_is_cancelled_or_awaits_no_future_gets_500_not_a_stuck_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running: Server

    async def sleeps() -> None:
        await asyncio.sleep(0)  # a bare yield: the bridge only knows futures

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/cancelled":
            future = running.loop.create_future()
            running.loop.call_soon(future.cancel)
            wait(future)
        else:
            wait(sleeps())
        start_response("200 OK", [])
        return [b"unreachable"]

    running = Server(app)
    try:
        for path in ("/cancelled", "/bare-yield"):
            with running.connect() as sock:
                sock.sendall(request("GET", path))
                response = Reader(sock).response()
                assert response.status == 500
                assert response.json() == {"error": "internal server error"}
        with running.connect() as sock:  # the pooled greenlets still serve
            sock.sendall(request("GET", "/cancelled"))
            assert Reader(sock).response().status == 500
    finally:
        running.close()
    assert "CancelledError" in caplog.text and "awaited None" in caplog.text


# --- the shortcut (the gateway's fast lane) ---------------------------------------------------


def test_a_shortcut_answers_what_it_takes_in_order_and_leaves_the_rest_to_the_app() -> None:
    running: Server
    offered: list[tuple[bytes, bytes]] = []

    def shortcut(method: bytes, target: bytes, headers: Any) -> Any:
        offered.append((method, target))
        if not target.startswith(b"/fast/"):
            return None
        future = running.loop.create_future()
        # Answered a little later, so the app's request behind it is already waiting.
        running.loop.call_later(0.02, future.set_result, target[6:])
        return future, lambda done: (
            "201 Created",
            [("Content-Type", "text/plain")],
            b"fast " + done.result(),
        )

    running = Server(echo, shortcut=shortcut)
    try:
        with running.connect() as sock:
            sock.sendall(
                request("GET", "/fast/1") + request("GET", "/app/2") + request("GET", "/fast/3")
            )
            reader = Reader(sock)
            first, second, third = (reader.response() for _ in range(3))
    finally:
        running.close()
    assert (first.status, first.body, first.headers["content-length"]) == (201, b"fast 1", "6")
    assert first.headers["date"].endswith(" GMT")
    assert second.status == 200 and second.json()["environ"]["PATH_INFO"] == "/app/2"
    assert (third.status, third.body) == (201, b"fast 3")
    assert offered == [(b"GET", b"/fast/1"), (b"GET", b"/app/2"), (b"GET", b"/fast/3")]


def test_a_shortcut_is_not_offered_a_request_whose_body_is_too_large() -> None:
    offered: list[bytes] = []

    def shortcut(method: bytes, target: bytes, headers: Any) -> Any:
        offered.append(target)
        return None

    running = Server(echo, shortcut=shortcut)
    try:
        with running.connect() as sock:
            sock.sendall(request("GET", "/big", f"Content-Length: {LIMIT + 1}"))
            assert Reader(sock).response().status == 200  # echo: the app got it, unread
    finally:
        running.close()
    assert offered == []


def test_a_shortcut_whose_answer_fails_gets_json_500_and_the_server_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running: Server

    def finish(done: asyncio.Future[Any]) -> Any:
        raise RuntimeError("a bug in the shortcut")

    def shortcut(method: bytes, target: bytes, headers: Any) -> Any:
        if target == b"/broken":
            future = running.loop.create_future()
            future.set_result(None)
            return future, finish
        if target == b"/cancelled":
            future = running.loop.create_future()
            running.loop.call_soon(future.cancel)
            return future, lambda done: done.result()
        return None

    running = Server(echo, shortcut=shortcut)
    try:
        for target in ("/broken", "/cancelled"):
            with running.connect() as sock:
                sock.sendall(request("GET", target))
                reader = Reader(sock)
                response = reader.response()
                assert response.status == 500, target
                assert response.json() == {"error": "internal server error"}
                assert reader.closed()
        with running.connect() as sock:
            sock.sendall(request("GET", "/fine"))
            assert Reader(sock).response().status == 200
    finally:
        running.close()
    assert "a bug in the shortcut" in caplog.text


# --- attacks (issue 10): each bounded, none stops the server's timeouts -------------------------


def test_a_refused_client_that_stays_does_not_stop_the_timeouts_of_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After its 408 the connection lingers (input maybe unread) with the client's socket still
    # open; a sweep that answered it again wrote after write_eof(), raised, and was never
    # scheduled again: no later 408 nor keep-alive close ever fired in the process.
    monkeypatch.setattr(http11, "LINGER_S", 1.0)
    monkeypatch.setattr(http11, "SWEEP_S", 0.05)
    running = Server(echo, read_timeout_s=0.2, keepalive_s=0.2)
    try:
        with running.connect() as stays:
            stays.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # and nothing more, ever
            assert Reader(stays).response().status == 408
            with running.connect() as later:  # sweeps ran while the first one lingers
                later.sendall(b"GET /slow-too HTTP/1.1\r\nHost: x\r\n")
                reader = Reader(later)
                assert reader.response().status == 408
                assert reader.closed()
            with running.connect() as idle:
                idle.sendall(request("GET", "/"))
                reader = Reader(idle)
                assert reader.response().status == 200
                assert reader.closed()  # closed after keepalive_s
    finally:
        running.close()


def test_a_sweep_survives_a_connection_whose_check_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(http11, "SWEEP_S", 0.05)
    running = Server(echo, read_timeout_s=0.2)
    try:
        broken = running.connect()

        def fail(now: float) -> None:
            raise RuntimeError("a bug in one connection's timeout check")

        def break_one() -> None:
            for connection in running.http.connections:
                connection.check_timeouts = fail  # type: ignore[method-assign]

        wait_for(lambda: running.http.connections or None, "the connection adopted", 5)
        running.call(break_one)
        with running.connect() as sock:  # its sweep goes on: the stalled one gets its 408
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            assert Reader(sock).response().status == 408
        assert Reader(broken).closed()  # the failing one was aborted
        broken.close()
    finally:
        running.close()
    assert "a bug in one connection's timeout check" in caplog.text


def test_an_unfinished_header_line_is_refused_before_it_grows() -> None:
    # httptools keeps an unfinished header line until it ends: unbounded without a check on
    # the bytes as they arrive (the head limit used to be checked only when a line ended).
    running = Server(echo)
    try:
        with running.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nX-Long: ")
            sent = 0
            received = b""
            sock.settimeout(0.01)
            while sent < 4 * 1024 * 1024 and b"\r\n\r\n" not in received:
                try:
                    sock.sendall(b"a" * 16384)
                    sent += 16384
                    received += sock.recv(65536)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            sock.settimeout(5)
            reader = Reader(sock)
            reader.buffer = received
            response = reader.response()
        assert response.status == 431 and "request head larger than" in response.json()["error"]
        # answered within the limit plus a read or two, not after megabytes
        assert sent <= http11.MAX_HEAD_BYTES + 1024 * 1024, sent
    finally:
        running.close()


def test_too_many_header_fields_get_431(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(request("GET", "/", *[f"X-{i}: v" for i in range(http11.MAX_HEADERS + 1)]))
        reader = Reader(sock)
        assert reader.response().status == 431
        assert reader.closed()


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "GZIP , chunked"])
def test_a_transfer_coding_other_than_chunked_gets_501(server: Server, coding: str) -> None:
    with server.connect() as sock:
        body = chunked(b"\x1f\x8b compressed")
        sock.sendall(request("PUT", "/v1/keys/z", f"Transfer-Encoding: {coding}", body=body))
        reader = Reader(sock)
        response = reader.response()
        assert response.status == 501
        first = coding.split(",")[0].strip().lower()
        assert response.json() == {
            "error": f"transfer coding {first!r} is not implemented; only chunked is"
        }
        assert reader.closed()


def test_connections_from_one_address_over_its_limit_get_503() -> None:
    running = Server(echo, max_connections_per_client=2)
    try:
        first, second = running.connect(), running.connect()
        for sock in (first, second):
            sock.sendall(request("GET", "/"))
            assert Reader(sock).response().status == 200
        with running.connect() as third:
            reader = Reader(third)
            response = reader.response()
            assert response.status == 503
            assert response.json() == {
                "error": "too many connections from 127.0.0.1 (at most 2 per gateway process)"
            }
            assert reader.closed()
        first.close()

        def served_again() -> bool:
            with running.connect() as fourth:
                fourth.sendall(request("GET", "/again"))
                return Reader(fourth).response().status == 200

        wait_for(lambda: served_again() or None, "a freed slot for the address", 5)
        second.close()
    finally:
        running.close()


def test_a_client_that_never_reads_is_disconnected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http11, "SWEEP_S", 0.05)
    body = b"x" * (4 * 1024 * 1024)  # far more than the socket buffers take

    def big(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [])
        return [body]

    running = Server(big, write_timeout_s=0.3)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", running.port))
        with sock:
            sock.sendall(request("GET", "/big") * 10)  # pipelined, and no response read
            wait_for(lambda: running.http.connections or None, "the connection adopted", 5)
            wait_for(lambda: not running.http.connections or None, "the non-reader disconnected", 5)
            received = 0
            try:  # aborted: what it had not read is thrown away, and it sees the end
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
            except ConnectionResetError:
                pass
            assert received < len(body)
    finally:
        running.close()


def test_100_continue_of_a_pipelined_request_waits_for_its_turn() -> None:
    pending: Pending

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        answer = environ["PATH_INFO"]
        if answer == "/slow":
            answer += pending.wait_for("slow")
        else:
            answer += ":" + environ["wsgi.input"].read().decode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [answer.encode()]

    running = Server(app)
    pending = Pending(running)
    try:
        with running.connect() as sock:
            sock.sendall(
                request("GET", "/slow")
                + request("PUT", "/later", "Content-Length: 5", "Expect: 100-continue")
            )
            assert pending.entered.wait(5)

            def head_parsed() -> bool | None:  # the second request's head, not its body
                return any(c.current is not None for c in running.http.connections) or None

            wait_for(head_parsed, "the pipelined head parsed", 5)
            pending.answer("slow", "+done")
            reader = Reader(sock)
            first = reader.response()  # the earlier request's answer, not the 100
            assert (first.status, first.body) == (200, b"/slow+done")
            assert reader.response().status == 100
            sock.sendall(b"hello")
            last = reader.response()
            assert (last.status, last.body) == (200, b"/later:hello")
    finally:
        running.close()


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_client"])
def test_over_a_limit_the_longest_waiting_connection_is_evicted_not_the_newcomer(
    limit: str,
) -> None:
    running = Server(echo, **{limit: 2}, evict_after_s=0.2)
    try:
        stalled = running.connect()
        stalled.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        wait_for(lambda: running.http.connections or None, "the stalled connection adopted", 5)
        idle = running.connect()
        idle.sendall(request("GET", "/"))
        idle_reader = Reader(idle)
        assert idle_reader.response().status == 200  # now idle on keep-alive
        with running.connect() as early:  # neither has waited evict_after_s yet: refused
            assert Reader(early).response().status == 503
        evictable_at = time.monotonic() + 0.2
        wait_for(lambda: time.monotonic() > evictable_at or None, "the eviction grace", 5)
        newcomer = running.connect()  # the stalled one waited longest: it goes
        newcomer.sendall(request("GET", "/new"))
        assert Reader(newcomer).response().status == 200
        stalled_reader = Reader(stalled)
        response = stalled_reader.response()
        assert response.status == 408 and "needed by another" in response.json()["error"]
        assert stalled_reader.closed()
        with running.connect() as another:  # then the idle keep-alive one, not the newcomer
            another.sendall(request("GET", "/another"))
            assert Reader(another).response().status == 200
        assert idle_reader.closed()
        for sock in (stalled, idle, newcomer):
            sock.close()
    finally:
        running.close()


def test_an_evicted_connection_that_does_not_read_is_aborted_not_left_open() -> None:
    # An evicted connection leaves the server's tables (its slot is the newcomer's): no sweep
    # watched its output any more, and asyncio's close() waits for a client that never reads.
    # 400 evicted slow readers held 6 MiB answers each for as long as they stayed connected.
    body = b"x" * (8 << 20)

    def big(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [])
        return [body]

    running = Server(big, max_connections_per_client=1, evict_after_s=0.2, write_timeout_s=60.0)
    try:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.settimeout(5)
        reader.connect(("127.0.0.1", running.port))
        reader.sendall(request("GET", "/big"))  # and never reads the answer
        [held] = wait_for(lambda: list(running.http.connections) or None, "adopted", 5)
        wait_for(lambda: not held.busy or None, "the answer handed to the transport", 5)
        evictable_at = time.monotonic() + 0.3
        wait_for(lambda: time.monotonic() > evictable_at or None, "the eviction grace", 5)
        with running.connect() as newcomer:
            newcomer.sendall(request("GET", "/new"))
            assert Reader(newcomer).response().status == 200
        # Aborted at once, not after the 60 s write timeout nor never.
        wait_for(lambda: held.closed or None, "the evicted slow reader aborted", 2)
        reader.close()
    finally:
        running.close()
