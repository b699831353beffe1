"""The event-loop gateway against a real broker and workers: requests that arrive together
leave in one BATCH message, and each still gets its own answer.

The HTTP server runs in this process (its loop in a thread, as in
tests/integration/test_gateway_http.py) so that its client's counters can be read; the broker
and the workers are real processes.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from gateway.app import make_app
from gateway.bridge import LoopClient
from tests.cluster import Cluster
from tests.integration.test_gateway_http import Reader, Server, request

pytestmark = pytest.mark.process

CONNECTIONS = 40


class LoopHold:
    """Holds the server's loop still (it serves nothing) until released: requests sent
    meanwhile wait in their sockets, and the loop finds them all readable at once."""

    def __init__(self, server: Server) -> None:
        self.blocked = threading.Event()
        self.released = threading.Event()
        server.call(self._hold)
        assert self.blocked.wait(5), "the loop did not stop to be held"

    def _hold(self) -> None:
        self.blocked.set()
        self.released.wait(10)

    def release(self) -> None:
        self.released.set()


class Gateway:
    """The gateway's app on an in-process server, its batching clients kept for inspection."""

    def __init__(self, cluster: Cluster, connections: int) -> None:
        self.cluster = cluster
        self.clients: list[LoopClient] = []
        self.server = Server(make_app(self._client))
        self.socks = [self.server.connect() for _ in range(connections)]

    def _client(self) -> LoopClient:
        client = LoopClient(self.cluster.frontend, timeout_s=5.0, connect_timeout_s=3.0)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        for client in self.clients:
            self.server.run(client.close())
        self.server.close()


def test_requests_arriving_together_leave_in_one_batch(cluster: Cluster) -> None:
    kv = cluster.client()
    for n in range(CONNECTIONS):
        kv.set(f"batch:{n}", f"value-{n}", ttl_s=60)
    gateway = Gateway(cluster, CONNECTIONS)
    server, socks, made = gateway.server, gateway.socks, gateway.clients
    try:
        # A first round, one connection at a time, makes the client and its socket and has
        # every connection accepted (the server takes one per wake-up).
        for sock in socks:
            sock.sendall(request("GET", "/get?key=batch:0"))
            assert Reader(sock).response().status == 200
        (client,) = made
        before = client.aio.batches
        hold = LoopHold(server)
        for n, sock in enumerate(socks):
            sock.sendall(request("GET", f"/get?key=batch:{n}"))
        hold.release()
        answers = [json.loads(Reader(sock).response().body) for sock in socks]
        assert [a["value"] for a in answers] == [f"value-{n}" for n in range(CONNECTIONS)]
        sent = client.aio.batches - before
        # One BATCH for the 40 requests; a second only if the broker was silent for a whole
        # attempt (1 s) and they were sent again.
        assert 1 <= sent <= 1 + client.aio.retries, f"{CONNECTIONS} requests in {sent} BATCHes"
    finally:
        gateway.close()


def test_mixed_requests_in_one_batch_each_get_their_own_answer(cluster: Cluster) -> None:
    gateway = Gateway(cluster, 6)
    server, socks = gateway.server, gateway.socks
    paths = [
        "/set?key=mix:a&value=1&timeout=60",
        "/set?key=mix:b&value=2&timeout=60",
        "/get?key=mix:none",
        "/delete?key=mix:none",
        "/get?key=",  # refused by the app before any call
        "/v1/health",
    ]
    try:
        hold = LoopHold(server)
        for sock, path in zip(socks, paths, strict=True):
            sock.sendall(request("GET", path))
        hold.release()
        got: list[tuple[int, Any]] = []
        for sock in socks:
            response = Reader(sock).response()
            got.append((response.status, json.loads(response.body)))
    finally:
        gateway.close()
    assert got[0][1]["message"] == "Value set successfully" and got[0][1]["value"] == "1"
    assert got[1][1]["message"] == "Value set successfully" and got[1][1]["value"] == "2"
    assert got[2] == (200, {"error": "Data not found"})
    assert got[3][0] == 200 and "error" in got[3][1]
    assert got[4][0] == 400 and "key" in got[4][1]["error"]
    assert got[5][0] == 200
    kv = cluster.client()
    assert (kv.get("mix:a").value, kv.get("mix:b").value) == (b"1", b"2")
