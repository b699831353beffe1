"""zkv.etcd's transport over real sockets against misbehaving servers in this process: a call is
bounded in time and memory whatever the server does, and keep-alive connections are reused (and
replaced when the server closed them while idle)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from zkv import etcd as etcd_module
from zkv.etcd import Etcd, EtcdUnavailable

pytestmark = pytest.mark.integration

OK_BODY = json.dumps({"header": {"revision": "5"}}).encode()
SERVER_LIFETIME_S = 30.0  # a misbehaving server stops after this long: longer than any bound here


def ok_response(body: bytes = OK_BODY) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def read_request(conn: socket.socket) -> bool:
    """Read one small request (headers + Content-Length body); False at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        body += conn.recv(65536)
    return True


class Server:
    """A TCP server on a free loopback port running ``handle(conn)`` per connection on a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.closed = threading.Semaphore(0)  # released once per connection the server closed
        self.handle = handle
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(SERVER_LIFETIME_S)
            try:
                self.handle(conn)
            except OSError:
                pass
        self.closed.release()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], Server]]:
    servers: list[Server] = []

    def start(handle: Callable[[socket.socket], None]) -> Server:
        servers.append(Server(handle))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_a_server_that_never_answers_is_unavailable_within_the_timeout(serve) -> None:
    silent = [serve(lambda conn: time.sleep(SERVER_LIFETIME_S)) for _ in range(2)]
    etcd = Etcd([server.url for server in silent], timeout_s=0.3)
    elapsed, error = timed(lambda: etcd.get("k"))
    assert isinstance(error, EtcdUnavailable), error
    assert "timed out" in str(error)
    assert elapsed < 5.0  # 2 endpoints x 0.3 s; without a timeout: 30 s


def test_a_server_trickling_bytes_cannot_stretch_a_call_past_its_timeout(serve) -> None:
    """One byte every 0.1 s never trips a per-read timeout of 0.3 s: only a deadline for the
    whole answer ends the call (before, it lasted as long as the server kept trickling)."""

    def trickle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(int(SERVER_LIFETIME_S / 0.1)):
            conn.sendall(b"a")
            time.sleep(0.1)

    etcd = Etcd([serve(trickle).url], timeout_s=0.3)
    elapsed, error = timed(lambda: etcd.get("k"))
    assert isinstance(error, EtcdUnavailable), error
    assert elapsed < 5.0


def test_an_oversized_answer_is_refused_without_buffering_it(serve, monkeypatch) -> None:
    monkeypatch.setattr(etcd_module, "MAX_RESPONSE_BYTES", 100_000)

    def flood(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(1000):
            conn.sendall(b"{" * 65536)

    etcd = Etcd([serve(flood).url], timeout_s=2.0)
    with pytest.raises(EtcdUnavailable, match="larger than 100000 bytes"):
        etcd.get("k")


def test_calls_reuse_one_connection(serve) -> None:
    def keep_alive(conn: socket.socket) -> None:
        while read_request(conn):
            conn.sendall(ok_response())

    server = serve(keep_alive)
    etcd = Etcd([server.url], timeout_s=1.0)
    assert [etcd.put("k", "v") for _ in range(5)] == [5] * 5
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_transparently(serve) -> None:
    def one_per_connection(conn: socket.socket) -> None:
        if read_request(conn):
            conn.sendall(ok_response())  # keep-alive by HTTP/1.1 default, yet closed now

    server = serve(one_per_connection)
    etcd = Etcd([server.url], timeout_s=1.0)
    assert etcd.put("k", "v") == 5
    assert server.closed.acquire(timeout=5)
    assert etcd.put("k", "v") == 5
    assert server.connections == 2


def test_a_refused_connection_moves_on_to_the_next_endpoint(serve) -> None:
    def keep_alive(conn: socket.socket) -> None:
        while read_request(conn):
            conn.sendall(ok_response())

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, not listening: refused
        etcd = Etcd([dead, serve(keep_alive).url], timeout_s=1.0)
        assert etcd.put("k", "v") == 5
