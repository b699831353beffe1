"""A gateway under load from a hostile local client: slow connections and big listings.

One cluster (broker, workers, one gateway process) for the module. The gateway binds loopback,
so the attacker and every legitimate client share the address 127.0.0.1.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.cluster import Cluster, wait_for
from zkv import defaults

pytestmark = pytest.mark.process

SLOW_CONNECTIONS = 250  # more than the per-address limit (100 per process)
LEGIT_REQUESTS = 50


def test_slow_local_connections_do_not_lock_out_other_local_clients(cluster: Cluster) -> None:
    # Before: the slow connections took the address's 100 slots, and every other local
    # request was answered 503 until the attacker let go.
    cluster.client().set("k", "v", ttl_s=60)
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5)
            sock.sendall(b"GET /get?key=k HTTP/1.1\r\nX: ")  # a head that never ends
            slow.append(sock)
        # Held, not yet evictable: a legitimate newcomer may evict only a connection that has
        # waited longer than any request of a working client takes.
        evictable_at = time.monotonic() + defaults.HTTP_EVICT_AFTER_S
        wait_for(lambda: time.monotonic() > evictable_at or None, "the eviction grace", 5)
        for sock in slow:  # and still trickling, as a slowloris does
            try:
                sock.sendall(b"a")
            except OSError:
                pass  # refused or evicted already
        started = time.monotonic()
        statuses = [
            cluster.http("GET", "/get?key=k", timeout_s=5).status for _ in range(LEGIT_REQUESTS)
        ]
        assert statuses == [200] * LEGIT_REQUESTS, {s: statuses.count(s) for s in statuses}
        assert time.monotonic() - started < 30  # a bound against hangs, not a speed claim
    finally:
        for sock in slow:
            sock.close()
