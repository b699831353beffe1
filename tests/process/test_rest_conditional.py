"""Issue 12's REST API through a real gateway, broker and workers, over raw HTTP.

What the in-process tests (tests/unit/test_gateway_conditional.py) cannot show: that the store
checks a condition atomically (two writers racing with one ETag: exactly one wins), that
counters, deadlines and touch really change the stored key, that a lock's wait is the broker's
(a waiter is answered when the holder releases, long before its wait runs out) and that a
fenced write of a lock's previous holder is refused by the cluster. One cluster per worker
class (the event loop's asyncio client and gthread's blocking one are different paths), shared
by the module's tests; every wait polls with a deadline.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.cluster import Cluster, wait_for

pytestmark = [
    pytest.mark.process,
    pytest.mark.parametrize(
        "cluster", [{}, {"ZKV_HTTP_WORKER": "gthread"}], indirect=True, scope="module"
    ),
]

ROUNDS = 10  # races of two writers per test
ANSWER_TIMEOUT_S = 10.0


def raw(cluster: Cluster, method: str, target: str, body: bytes = b"", **headers: str) -> Any:
    """One request as a client writes it on the wire (curl-like), on its own connection:
    ``(status, headers, body)``, headers lower-cased."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", cluster.http_port), ANSWER_TIMEOUT_S) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    found = {}
    for field in fields:
        name, _, value = field.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), found, payload


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on threads released at the same moment; their results, in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait(timeout=ANSWER_TIMEOUT_S)
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * ANSWER_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_two_writers_with_one_etag_exactly_one_wins(cluster: Cluster) -> None:
    for _ in range(ROUNDS):
        key = unique("race")
        status, headers, _ = raw(cluster, "PUT", f"/v1/keys/{key}", b"start")
        assert status == 200
        tag = headers["etag"]
        assert tag == raw(cluster, "GET", f"/v1/keys/{key}")[1]["etag"]
        results = together(
            [
                lambda key=key, tag=tag, who=who: raw(
                    cluster, "PUT", f"/v1/keys/{key}", who, If_Match=tag
                )
                for who in (b"first", b"second")
            ]
        )
        statuses = sorted(result[0] for result in results)
        assert statuses == [200, 412], results
        winner = next(result for result in results if result[0] == 200)
        loser = next(result for result in results if result[0] == 412)
        assert "error" in json.loads(loser[2])
        status, headers, value = raw(cluster, "GET", f"/v1/keys/{key}")
        assert headers["etag"] == winner[1]["etag"] != tag
        assert value in (b"first", b"second")


def test_two_creators_with_if_none_match_exactly_one_wins(cluster: Cluster) -> None:
    for _ in range(ROUNDS):
        key = unique("create")
        results = together(
            [
                lambda key=key, who=who: raw(
                    cluster, "PUT", f"/v1/keys/{key}", who, If_None_Match="*"
                )
                for who in (b"first", b"second")
            ]
        )
        assert sorted(result[0] for result in results) == [200, 412], results


def test_conditional_get_and_delete(cluster: Cluster) -> None:
    key = unique("cond")
    tag = raw(cluster, "PUT", f"/v1/keys/{key}", b"v")[1]["etag"]
    weak = "W/" + tag
    assert raw(cluster, "GET", f"/v1/keys/{key}", If_None_Match=weak)[0] == 304
    assert raw(cluster, "PUT", f"/v1/keys/{key}", b"x", If_Match=weak)[0] == 412
    assert raw(cluster, "DELETE", f"/v1/keys/{key}", If_Match='"1"')[0] == 412
    assert raw(cluster, "DELETE", f"/v1/keys/{key}", If_Match=tag)[0] == 200
    assert raw(cluster, "DELETE", f"/v1/keys/{key}", If_Match="*")[0] == 412


def test_incr_counts_and_refuses_what_is_not_an_integer(cluster: Cluster) -> None:
    key = unique("hits")
    results = together(
        [lambda: raw(cluster, "POST", f"/v1/keys/{key}/incr?by=3&ttl=60") for _ in range(4)]
    )
    assert sorted(json.loads(result[2])["value"] for result in results) == [3, 6, 9, 12]
    first = json.loads(results[0][2])
    assert first["key"] == key and first["expires_at_ms"] > time.time() * 1000
    status, _, body = raw(cluster, "POST", f"/v1/keys/{key}/incr?by=-20")
    assert (status, json.loads(body)["value"]) == (200, -8)
    assert raw(cluster, "GET", f"/v1/keys/{key}")[2] == b"-8"
    raw(cluster, "PUT", f"/v1/keys/{key}", b"text")
    status, _, body = raw(cluster, "POST", f"/v1/keys/{key}/incr")
    assert status == 409 and "integer" in json.loads(body)["error"]
    status, _, body = raw(cluster, "POST", f"/v1/keys/{key}/incr?by=1e3")
    assert status == 400 and "'by'" in json.loads(body)["error"]
    raw(cluster, "PUT", f"/v1/keys/{key}", str(2**63 - 1).encode())
    assert raw(cluster, "POST", f"/v1/keys/{key}/incr")[0] == 409
    assert raw(cluster, "GET", f"/v1/keys/{key}")[2] == str(2**63 - 1).encode()


def test_patch_and_touch_move_the_deadline(cluster: Cluster) -> None:
    key = unique("session")
    raw(cluster, "PUT", f"/v1/keys/{key}?ttl=0.5", b"v")
    status, _, body = raw(cluster, "PATCH", f"/v1/keys/{key}?ttl=none")
    assert (status, json.loads(body)["expires_at_ms"]) == (200, None)
    headers = raw(cluster, "GET", f"/v1/keys/{key}")[1]
    assert "x-zkv-expires-at-ms" not in headers
    status, _, body = raw(cluster, "PATCH", f"/v1/keys/{key}?ttl=60")
    deadline = json.loads(body)["expires_at_ms"]
    assert status == 200 and deadline > time.time() * 1000 + 50_000
    status, headers, value = raw(cluster, "GET", f"/v1/keys/{key}?touch=0.3")
    assert (status, value) == (200, b"v")
    assert int(headers["x-zkv-expires-at-ms"]) < deadline - 50_000
    # Touched to 0.3 s: the key expires on its own (polled with a deadline, no fixed sleep).
    give_up = time.monotonic() + ANSWER_TIMEOUT_S
    while raw(cluster, "GET", f"/v1/keys/{key}")[0] != 404:
        assert time.monotonic() < give_up, "the touched key did not expire"
        time.sleep(0.05)
    assert raw(cluster, "PATCH", f"/v1/keys/{key}?ttl=5")[0] == 404
    assert raw(cluster, "GET", f"/v1/keys/{key}?touch=5")[0] == 404


def test_a_lock_waiter_is_answered_when_the_holder_releases(cluster: Cluster) -> None:
    name = unique("jobs") + "/nightly"
    status, _, body = raw(cluster, "POST", f"/v1/locks/{name}?ttl=30")
    assert status == 200
    holder = json.loads(body)
    assert holder["name"] == name
    # Held: without a wait, 409 at once with the holder's expiry; a short wait runs out.
    status, _, body = raw(cluster, "POST", f"/v1/locks/{name}?ttl=30&wait=0.2")
    assert (status, json.loads(body)["expires_at_ms"]) == (409, holder["expires_at_ms"])
    waited: list[Any] = []
    waiter = threading.Thread(
        target=lambda: waited.append(raw(cluster, "POST", f"/v1/locks/{name}?ttl=30&wait=20"))
    )
    started = time.monotonic()
    waiter.start()
    try:
        # The waiter is parked at the broker (its STATS count it), nothing answered it ...
        with cluster.client() as kv:
            wait_for(
                lambda: kv.stats()["broker"]["lock_waiters"] >= 1 or None,
                "the waiter parked at the broker",
                ANSWER_TIMEOUT_S,
            )
        assert not waited
        status, _, body = raw(cluster, "DELETE", f"/v1/locks/{name}?token={holder['token']}")
        assert (status, json.loads(body)["released"]) == (200, True)
    finally:
        waiter.join(timeout=ANSWER_TIMEOUT_S)
    # ... and answered by the release, long before its 20 s wait ran out.
    assert waited and waited[0][0] == 200, waited
    assert time.monotonic() - started < ANSWER_TIMEOUT_S
    second = json.loads(waited[0][2])
    assert second["token"] > holder["token"]  # a fencing token: it grows
    # The old token is not the lock's: refresh and release refused, the new one works.
    old = holder["token"]
    assert raw(cluster, "POST", f"/v1/locks/{name}/refresh?token={old}&ttl=5")[0] == 409
    assert raw(cluster, "DELETE", f"/v1/locks/{name}?token={old}")[0] == 409
    refreshed = raw(cluster, "POST", f"/v1/locks/{name}/refresh?token={second['token']}&ttl=60")
    assert refreshed[0] == 200
    assert json.loads(refreshed[2])["expires_at_ms"] > second["expires_at_ms"]


def test_a_lock_wait_is_the_one_asked_for(cluster: Cluster) -> None:
    """The gateway's client (asyncio or blocking) waits as long as ``wait`` asks, no less and
    no more: no resend as the wait runs out (it would restart the wait at the broker and lose
    its answer), and a wait longer than the client's timeout (5 s) is allowed in full."""
    held, later = unique("long"), unique("short")
    assert raw(cluster, "POST", f"/v1/locks/{held}?ttl=120")[0] == 200
    started = time.monotonic()
    status, _, body = raw(cluster, "POST", f"/v1/locks/{held}?ttl=5&wait=1")
    assert status == 409, body
    assert 1.0 <= time.monotonic() - started < 5.0  # the wait, not a resend's nor the timeout
    # A holder whose lease ends in 2 s: a 10 s wait gets the lock when it does.
    assert raw(cluster, "POST", f"/v1/locks/{later}?ttl=2")[0] == 200
    status, _, body = raw(cluster, "POST", f"/v1/locks/{later}?ttl=5&wait=10")
    assert status == 200, body


def test_a_fenced_write_of_the_previous_holder_is_refused(cluster: Cluster) -> None:
    lock, key = unique("fence"), unique("out")
    first = json.loads(raw(cluster, "POST", f"/v1/locks/{lock}?ttl=0.2")[2])["token"]
    assert raw(cluster, "PUT", f"/v1/keys/{key}?fence={lock}:{first}", b"one")[0] == 200
    # The holder pauses past its lock's expiry; another takes it (polled: a wait of 5 s).
    status, _, body = raw(cluster, "POST", f"/v1/locks/{lock}?ttl=30&wait=5")
    assert status == 200
    second = json.loads(body)["token"]
    assert second > first
    # The old holder wakes up: PUT, DELETE and incr with its token change nothing.
    for method, target in [
        ("PUT", f"/v1/keys/{key}?fence={lock}:{first}"),
        ("DELETE", f"/v1/keys/{key}?fence={lock}:{first}"),
        ("POST", f"/v1/keys/{key}/incr?fence={lock}:{first}"),
        ("PATCH", f"/v1/keys/{key}?ttl=0.5&fence={lock}:{first}"),
        ("PATCH", f"/v1/keys/{key}?ttl=none&fence={lock}:{first}"),
    ]:
        status, _, body = raw(cluster, method, target, b"stale" if method == "PUT" else b"")
        assert status == 409, (method, body)
        assert json.loads(body)["error"]
    status, headers, value = raw(cluster, "GET", f"/v1/keys/{key}")
    assert (value, "x-zkv-expires-at-ms" in headers) == (b"one", False)  # no TTL set either
    assert raw(cluster, "PATCH", f"/v1/keys/{key}?ttl=60&fence={lock}:{second}")[0] == 200
    assert "x-zkv-expires-at-ms" in raw(cluster, "GET", f"/v1/keys/{key}")[1]
    assert raw(cluster, "PUT", f"/v1/keys/{key}?fence={lock}:{second}", b"two")[0] == 200
    assert raw(cluster, "GET", f"/v1/keys/{key}")[2] == b"two"


def test_bad_parameters_are_400_naming_them(cluster: Cluster) -> None:
    for method, target, headers, name in [
        ("POST", "/v1/keys/k/incr?by=x", {}, "'by'"),
        ("PUT", "/v1/keys/k?fence=nolock", {}, "'fence'"),
        ("PUT", "/v1/keys/k", {"If_Match": "5"}, "If-Match"),
        ("POST", "/v1/locks/l?ttl=0", {}, "'ttl'"),
        ("POST", "/v1/locks/l?ttl=1&wait=301", {}, "'wait'"),
        ("DELETE", "/v1/locks/l?token=-1", {}, "'token'"),
        ("GET", "/v1/keys/%00k", {}, "NUL"),
        ("GET", "/v1/keys/k?touch=5&fence=l:1", {}, "'fence'"),
        ("GET", "/v1/keys/k?touch=5", {"If_None_Match": '"1"'}, "If-None-Match"),
    ]:
        status, _, body = raw(cluster, method, target, **headers)
        assert status == 400, (method, target, body)
        assert name in json.loads(body)["error"], (method, target, body)
