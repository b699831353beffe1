"""The REST API and the Python client against the real cluster."""

from __future__ import annotations

import os
import time
import uuid
from urllib.parse import quote

import pytest
import zmq

from tests.cluster import Cluster
from zkv import NotFound, RequestError
from zkv.protocol import Kind, Request, Status, decode_reply, encode_request

pytestmark = pytest.mark.process


def unique(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_put_get_delete_binary_value(cluster: Cluster):
    key = "dir/sub dir/" + unique()
    value = os.urandom(4096) + b"\x00\xff"
    path = "/v1/keys/" + quote(key, safe="")
    response = cluster.http("PUT", path + "?ttl=30", body=value)
    assert response.status == 200
    assert response.json()["key"] == key
    response = cluster.http("GET", path)
    assert response.status == 200
    assert response.body == value
    assert response.headers["content-type"] == "application/octet-stream"
    deadline_ms = int(response.headers["x-zkv-expires-at-ms"])
    assert 0 < deadline_ms - time.time() * 1000 <= 30_000
    assert 0 < int(response.headers["x-zkv-ttl-ms"]) <= 30_000
    assert response.headers["x-zkv-expires-at"].endswith("GMT")
    assert cluster.http("DELETE", path).status == 200
    assert cluster.http("GET", path).status == 404
    assert cluster.http("DELETE", path).status == 404


def test_put_without_ttl_never_expires(cluster: Cluster):
    key = unique()
    assert cluster.http("PUT", f"/v1/keys/{key}", body=b"forever").status == 200
    response = cluster.http("GET", f"/v1/keys/{key}")
    assert response.body == b"forever"
    assert "x-zkv-expires-at-ms" not in response.headers
    assert cluster.http("GET", f"/get?key={key}").json()["time_out"] is None


def test_rest_errors(cluster: Cluster):
    response = cluster.http("GET", "/v1/keys/" + unique())
    assert response.status == 404 and "error" in response.json()
    response = cluster.http("PUT", "/v1/keys/k?ttl=-1", body=b"v")
    assert response.status == 400 and "ttl" in response.json()["error"]
    response = cluster.http("PUT", "/v1/keys/k", body=b"v" * (1024 * 1024 + 1))
    assert response.status == 413 and "error" in response.json()
    response = cluster.http("PUT", "/v1/keys/" + "k" * 2000, body=b"v")
    assert response.status == 413 and "error" in response.json()


def test_listing_pages_through_every_key_once(cluster: Cluster):
    prefix = unique("page")
    keys = {f"{prefix}-{i:03d}" for i in range(45)}
    client = cluster.client()
    for key in keys:
        client.set(key, b"v", ttl_s=60)
    seen: list[str] = []
    after = prefix
    for _ in range(100):
        response = cluster.http("GET", f"/v1/keys?limit=10&after={quote(after)}")
        assert response.status == 200
        page = response.json()
        seen += [item["key"] for item in page["keys"] if item["key"].startswith(prefix)]
        assert len(page["keys"]) <= 10
        if page["next"] is None or not page["keys"][-1]["key"].startswith(prefix):
            break
        after = page["next"]
    assert sorted(seen) == sorted(keys)
    assert len(seen) == len(set(seen))


def test_health(cluster: Cluster):
    response = cluster.http("GET", "/v1/health")
    assert response.status == 200
    assert response.json()["status"] == "ok"


def test_client_round_trip(cluster: Cluster):
    client = cluster.client()
    key = unique().encode() + b"\x00\xff"
    deadline = client.set(key, b"\x00value", ttl_s=5)
    assert deadline is not None and 0 < deadline - time.time() * 1000 <= 5000
    item = client.get(key)
    assert item.value == b"\x00value" and item.deadline_ms == deadline
    assert any(entry.key == key for entry in client.all())
    assert client.delete(key) is True
    assert client.delete(key) is False
    with pytest.raises(NotFound):
        client.get(key)
    assert client.ping()["owned"] == [True, True]


def test_client_refuses_bad_requests_before_sending(cluster: Cluster):
    client = cluster.client()
    with pytest.raises(RequestError):
        client.get(b"k" * 70_000)
    with pytest.raises(TypeError):
        client.get(123)  # type: ignore[arg-type]


def test_pipelined_requests_on_one_socket_are_matched_by_id(cluster: Cluster):
    """Many requests in flight on one DEALER socket, replies matched by request id."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(cluster.frontend)
    try:
        prefix = unique("pipe").encode()
        for i in range(200):
            request = Request(Kind.SET, i + 1, prefix + b"%d" % i, b"%d" % i, ttl_ms=60_000)
            socket.send_multipart(encode_request(request))
        ids = set()
        for _ in range(200):
            assert socket.poll(5000), "reply missing"
            reply = decode_reply(socket.recv_multipart())
            assert reply.status == Status.OK
            ids.add(reply.request_id)
        assert ids == set(range(1, 201))
    finally:
        socket.close(linger=0)
