"""The attacks of issue 10 on a real gateway process: memory, connection slots, odd requests.

One gateway alone (no broker: every request here is answered, or refused, before a zkv call),
its worker process's memory read from ``/proc/<pid>/status`` (VmRSS). The bounds are generous
(tens of MB) against what the attacks cost before (hundreds), so that they hold on a busy
machine and still fail on the old code.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.process

PER_CLIENT = 12  # --max-connections-per-client of the gateway here
MB = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path: Path = tmp_path_factory.mktemp("attacks")
    with Cluster(path, ZKV_HTTP_MAX_CONNECTIONS_PER_CLIENT=str(PER_CLIENT)) as cluster:
        cluster.start_gateway()
        try:
            wait_for(lambda: cluster.http("GET", "/nowhere").status == 404, "the gateway")
        except BaseException:
            print(cluster.logs())
            raise
        yield cluster


def worker_pid(cluster: Cluster) -> int:
    """The one gunicorn worker process under the gateway's master."""
    assert cluster.gateway is not None
    master = cluster.gateway.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def unsent(sock: socket.socket) -> int:
    """Bytes of this socket's output not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def connect(cluster: Cluster) -> socket.socket:
    return socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5)


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response read off the socket (status, lowercase headers, body by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed in a body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def test_one_address_cannot_take_every_connection_slot(gateway: Cluster) -> None:
    # First in the module: no connection of another test still counts against the address.
    held = []
    try:
        for _ in range(PER_CLIENT):  # each answered: adopted, and held open (keep-alive)
            sock = connect(gateway)
            held.append(sock)
            sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer(sock)[0] == 404
        with connect(gateway) as extra:
            status, headers, body = answer(extra)
            assert status == 503 and headers["connection"] == "close"
            assert "too many connections from 127.0.0.1" in json.loads(body)["error"]
    finally:
        for sock in held:
            sock.close()


def test_a_key_of_invalid_utf8_is_400_naming_it(gateway: Cluster) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = gateway.http(method, "/v1/keys/%FF", body=b"v")
        assert response.status == 400, response.body
        assert response.json() == {"error": "the key in the path is not valid UTF-8: '%FF'"}


def test_gzip_transfer_coding_is_501(gateway: Cluster) -> None:
    with connect(gateway) as sock:
        sock.sendall(
            b"PUT /v1/keys/z HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        status, _, body = answer(sock)
    assert status == 501 and "'gzip' is not implemented" in json.loads(body)["error"]


def test_a_body_in_two_byte_chunks_costs_about_its_size(gateway: Cluster) -> None:
    # Before: a list of 2-byte pieces, about 28 MB of gateway memory per unfinished MiB.
    pid = worker_pid(gateway)
    before = rss_bytes(pid)
    connections = 10
    body = b"2\r\nab\r\n" * (512 * 1024 // 2)  # 512 KiB of value, never finished
    socks = [connect(gateway) for _ in range(connections)]
    try:
        for sock in socks:
            sock.sendall(b"PUT /v1/keys/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            sock.sendall(body)
        wait_for(lambda: all(unsent(s) == 0 for s in socks) or None, "the bodies delivered", 10)
        grown = peak_growth(pid, before, 40 * MB)
        # about 0.5 MiB each now; about 14 MB each before
        assert grown < 40 * MB, f"{grown / MB:.0f} MB for {connections} x 512 KiB"
    finally:
        for sock in socks:
            sock.close()


def peak_growth(pid: int, before: int, bound: int, window_s: float = 1.0) -> int:
    """The most the worker's memory grew over ``before`` within ``window_s`` (the input is
    delivered, the gateway reads it at once), stopping early once past ``bound``."""
    peak = 0
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline and peak < bound:
        peak = max(peak, rss_bytes(pid) - before)
        time.sleep(0.02)
    return peak


def test_an_unfinished_header_line_is_refused_early_and_costs_little(gateway: Cluster) -> None:
    # Before: buffered without limit (200 MB in 10 s), the head limit checked only at a line's end.
    pid = worker_pid(gateway)
    before = rss_bytes(pid)
    with connect(gateway) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
        sock.settimeout(0.01)
        sent = 0
        received = b""
        while sent < 16 * MB and b"\r\n\r\n" not in received:
            try:
                sock.sendall(b"a" * 65536)
                sent += 65536
                received += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(5)
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
    assert received.startswith(b"HTTP/1.1 431 "), received[:100]
    assert sent < 4 * MB, f"refused only after {sent} bytes"
    assert peak_growth(pid, before, 20 * MB, window_s=0.2) < 20 * MB
