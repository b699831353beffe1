"""Many threads at once, on one key and on many keys, over HTTP and the client."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.process

THREADS = 8


@dataclass(frozen=True)
class Write:
    value: str
    start: float
    end: float


def test_many_threads_on_one_key_end_in_a_linearizable_state(cluster: Cluster):
    """The final value is that of a write no other write started after (a register's rule)."""
    key = f"hot-{uuid.uuid4().hex[:8]}"
    writes: list[Write] = []
    lock = threading.Lock()

    def writer(thread: int) -> None:
        client = cluster.client() if thread % 2 else None
        for i in range(40):
            value = f"t{thread}-{i}"
            start = time.monotonic()
            if client is not None:
                client.set(key, value, ttl_s=60)
            else:
                response = cluster.http("GET", f"/set?key={key}&value={value}&timeout=60")
                assert response.status == 200, response.body
            end = time.monotonic()
            with lock:
                writes.append(Write(value, start, end))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(writer, range(THREADS)))

    final = cluster.http("GET", f"/get?key={key}").json()["value"]
    [last] = [w for w in writes if w.value == final]
    later = [w for w in writes if w.start > last.end]
    assert not later, f"{final!r} was overwritten by writes that started after it: {later[:3]}"
    assert len(writes) == THREADS * 40


def test_every_acknowledged_write_on_many_keys_is_visible(cluster: Cluster):
    prefix = f"many-{uuid.uuid4().hex[:8]}"
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()

    def writer(thread: int) -> None:
        client = cluster.client()
        for i in range(60):
            key = f"{prefix}-{thread}-{i % 20}"  # each key written three times
            value = f"{thread}:{i}"
            if i % 3 == 0:
                response = cluster.http("GET", f"/set?key={key}&value={value}&timeout=60")
                assert response.status == 200
            else:
                client.set(key, value, ttl_s=60)
            with lock:
                acknowledged[key] = value  # the thread's own later write wins: same writer

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(writer, range(THREADS)))

    client = cluster.client()
    assert len(acknowledged) == THREADS * 20
    for key, value in acknowledged.items():
        assert client.get(key).value == value.encode(), key
    listing = cluster.http("GET", "/all").json()
    assert {k: v["value"] for k, v in listing.items() if k.startswith(prefix)} == acknowledged


def test_readers_and_deleters_racing_never_see_a_value_that_was_not_written(cluster: Cluster):
    key = f"race-{uuid.uuid4().hex[:8]}"
    written = {f"v{i}" for i in range(100)}
    errors: list[str] = []

    def churn(thread: int) -> None:
        client = cluster.client()
        for i in range(50):
            match (thread + i) % 3:
                case 0:
                    client.set(key, f"v{(thread * 50 + i) % 100}", ttl_s=30)
                case 1:
                    client.delete(key)
                case _:
                    body = cluster.http("GET", f"/get?key={key}").json()
                    if "value" in body and body["value"] not in written:
                        errors.append(body["value"])
                    elif "value" not in body and body != {"error": "Data not found"}:
                        errors.append(repr(body))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(churn, range(THREADS)))
    assert errors == []
