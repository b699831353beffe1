"""The gateway's fast lane against its Bottle app, byte for byte on the wire, in real processes.

One cluster, two gateways: the default (fast lane on) and ``--fast-lane off``. The same raw
request sequences go to each (pipelined, HTTP/1.0, ``Connection: close``, HEAD, a GET with a
body, refused input, the broker gone), and what comes back must be the same bytes once the
times in it are masked. Each sequence puts back the keys it changes, so both gateways see the
same data. The gateways' stop lines then show that the fast lane really served.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.process

_DATES = re.compile(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT")


def request(
    target: bytes, *headers: bytes, method: bytes = b"GET", version: bytes = b"1.1"
) -> bytes:
    return b"%s %s HTTP/%s\r\nHost: zkv\r\n%s\r\n" % (
        method,
        target,
        version,
        b"".join(header + b"\r\n" for header in headers),
    )


SEQUENCES = {
    "pipelined": [
        request(b"/set?key=fl-1&value=hello&timeout=60"),
        request(b"/get?key=fl-1"),
        request(b"/get?key=fl-missing"),
        request(b"/set?key=fl-%E2%82%AC+x&value=%D0%B4&timeout=30.5"),
        request(b"/get?key=fl-%E2%82%AC+x&other=1"),
        request(b"/delete?key=fl-%E2%82%AC+x"),
        request(b"/delete?key=fl-%E2%82%AC+x"),
        request(b"/get?key=fl-1&key=fl-2"),
        request(b"/get?key=%FF"),
        request(b"/set?key=fl-1&value=v&timeout=-1"),
        request(b"/get?key=fl-1#fragment"),
        request(b"/g%65t?key=fl-1"),
        request(b"/get?key=fl-1", method=b"HEAD"),
        request(b"/get?key=fl-1", b"Content-Length: 3") + b"abc",
        request(b"/delete?key=fl-1"),
    ],
    "http-1.0": [request(b"/get?key=fl-none", version=b"1.0")],
    "http-1.0-keep-alive": [
        request(b"/get?key=fl-none", b"Connection: keep-alive", version=b"1.0"),
        request(b"/get?key=fl-none", version=b"1.0"),
    ],
    "close": [
        request(b"/get?key=fl-none", b"Connection: close"),
        request(b"/get?key=fl-none"),
    ],
}


def exchange(port: int, data: bytes, close: bool = True) -> bytes:
    """Send ``data`` on one connection (and a last request asking to close it, unless it
    closes by itself); everything the gateway sends back, with the times masked."""
    if close:
        data += request(b"/get?key=fl-last", b"Connection: close")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return _DATES.sub(b"<date>", received)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, int, int]]:
    """A cluster with its gateway (fast lane on), and a second gateway with it off."""
    path: Path = tmp_path_factory.mktemp("fast-lane")
    # The fast lane set on explicitly: the environment of the test run must not turn it off.
    with Cluster(path, ZKV_HTTP_FAST_LANE="on", ZKV_CONNECT_TIMEOUT="0.5") as cluster:
        cluster.start()
        off_port = free_port()
        cluster.spawn(
            "gateway-off",
            "gateway",
            "--port",
            str(off_port),
            "--processes",
            "1",
            "--fast-lane",
            "off",
        )
        wait_for(
            lambda: exchange(off_port, request(b"/get?key=fl-ready")).startswith(b"HTTP/1.1 200"),
            "the second gateway",
        )
        yield cluster, cluster.http_port, off_port


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_both_paths_send_the_same_bytes(gateways, name):
    _, on_port, off_port = gateways
    data = b"".join(SEQUENCES[name])
    close = name not in ("http-1.0", "close")
    fast, bottle = exchange(on_port, data, close), exchange(off_port, data, close)
    # Every request is answered up to the one that closes the connection.
    answers = {"pipelined": len(SEQUENCES[name]) + 1, "http-1.0-keep-alive": 2}.get(name, 1)
    assert fast.count(b"HTTP/1.1 ") == answers, fast
    assert fast == bottle


def test_with_the_broker_gone_both_paths_answer_the_same_503(gateways):
    cluster, on_port, off_port = gateways
    cluster.kill(cluster.broker)
    try:
        data = request(b"/get?key=fl-1", b"Connection: close")
        fast, bottle = exchange(on_port, data, close=False), exchange(off_port, data, close=False)
    finally:
        cluster.start_broker()  # for the tests after this one
        cluster.wait_ready(gateway=False)
        for port in (on_port, off_port):  # each gateway's socket finds the new broker
            wait_for(
                lambda port=port: exchange(port, request(b"/get?key=fl-ready")).startswith(
                    b"HTTP/1.1 200"
                ),
                f"the gateway on port {port} after the broker's restart",
            )
    assert fast.startswith(b"HTTP/1.1 503"), fast
    assert fast == bottle


def test_the_fast_lane_served_and_the_bottle_gateway_did_not(gateways):
    cluster, on_port, off_port = gateways
    # Last in this module: it stops both gateways.
    data = b"".join(SEQUENCES["pipelined"])
    assert exchange(on_port, data) == exchange(off_port, data)
    gateway_processes = [p for p in cluster._all if "gateway" in p.args]
    for process in gateway_processes:
        process.send_signal(signal.SIGTERM)
    for process in gateway_processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    stops = re.findall(
        rb"stopped after (\d+) requests, (\d+) of them in the fast lane", cluster.logs().encode()
    )
    counts = sorted((int(total), int(fast)) for total, fast in stops)
    assert len(counts) == 2, cluster.logs()
    (off_total, off_fast), (on_total, on_fast) = sorted(counts, key=lambda c: c[1])
    assert off_fast == 0 and off_total > 10
    # The pipelined sequence alone has 10 requests the lane takes (the last one included);
    # the refused ones, HEAD, the escaped path and the fragment went to the app.
    assert on_fast >= 10 and on_total > on_fast
