"""The event-loop gateway against a real broker and workers: requests that arrive together
leave in one BATCH message, and each still gets its own answer.

The HTTP server runs in this process (its loop in a thread, as in
tests/integration/test_gateway_http.py) so that its client's counters can be read; the broker
and the workers are real processes.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from gateway.app import make_app
from gateway.bridge import LoopClient
from tests.cluster import Cluster
from tests.integration.test_gateway_http import Reader, Server, request

pytestmark = pytest.mark.process

CONNECTIONS = 40


def block_loop(server: Server, seconds: float) -> threading.Event:
    """Keep the server's loop busy for ``seconds``; the event is set once it is blocked."""
    blocked = threading.Event()

    def hold() -> None:
        blocked.set()
        time.sleep(seconds)  # the loop serves nothing meanwhile: requests pile up in sockets

    server.call(hold)
    return blocked


def test_requests_arriving_together_leave_in_one_batch(cluster: Cluster) -> None:
    made: list[LoopClient] = []

    def factory() -> LoopClient:
        client = LoopClient(cluster.frontend, timeout_s=5.0, connect_timeout_s=3.0)
        made.append(client)
        return client

    kv = cluster.client()
    for n in range(CONNECTIONS):
        kv.set(f"batch:{n}", f"value-{n}", ttl_s=60)
    server = Server(make_app(factory))
    socks = [server.connect() for _ in range(CONNECTIONS)]
    try:
        # A first request makes the client and its socket, and waits for the broker.
        socks[0].sendall(request("GET", "/get?key=batch:0"))
        assert Reader(socks[0]).response().status == 200
        (client,) = made
        before = client.aio.batches
        assert block_loop(server, 0.5).wait(5)
        for n, sock in enumerate(socks):
            sock.sendall(request("GET", f"/get?key=batch:{n}"))
        answers = [json.loads(Reader(sock).response().body) for sock in socks]
        assert [a["value"] for a in answers] == [f"value-{n}" for n in range(CONNECTIONS)]
        sent = client.aio.batches - before
        # One BATCH for the 40 requests (a second one if a request reached the loop late).
        assert 1 <= sent <= 2, f"{CONNECTIONS} requests left in {sent} BATCH messages"
    finally:
        for sock in socks:
            sock.close()
        for client in made:
            server.run(client.close())
        server.close()


def test_mixed_requests_in_one_batch_each_get_their_own_answer(cluster: Cluster) -> None:
    made: list[LoopClient] = []

    def factory() -> LoopClient:
        made.append(LoopClient(cluster.frontend, timeout_s=5.0, connect_timeout_s=3.0))
        return made[-1]

    server = Server(make_app(factory))
    socks = [server.connect() for _ in range(6)]
    paths = [
        "/set?key=mix:a&value=1&timeout=60",
        "/set?key=mix:b&value=2&timeout=60",
        "/get?key=mix:none",
        "/delete?key=mix:none",
        "/get?key=",  # refused by the app before any call
        "/v1/health",
    ]
    try:
        assert block_loop(server, 0.3).wait(5)
        for sock, path in zip(socks, paths, strict=True):
            sock.sendall(request("GET", path))
        got: list[tuple[int, Any]] = []
        for sock in socks:
            response = Reader(sock).response()
            got.append((response.status, json.loads(response.body)))
    finally:
        for sock in socks:
            sock.close()
        for client in made:
            server.run(client.close())
        server.close()
    assert got[0][1]["message"] == "Value set successfully" and got[0][1]["value"] == "1"
    assert got[1][1]["message"] == "Value set successfully" and got[1][1]["value"] == "2"
    assert got[2] == (200, {"error": "Data not found"})
    assert got[3][0] == 200 and "error" in got[3][1]
    assert got[4][0] == 400 and "key" in got[4][1]["error"]
    assert got[5][0] == 200
    kv = cluster.client()
    assert (kv.get("mix:a").value, kv.get("mix:b").value) == (b"1", b"2")
