"""The seed's HTTP API over the real cluster: every example, every error string, every 400."""

from __future__ import annotations

import time
import uuid
from email.utils import parsedate_to_datetime
from urllib.parse import quote, urlencode

import pytest

from tests.cluster import Cluster, wait_for
from zkv.hashing import key_shard

pytestmark = [
    pytest.mark.process,
    # Every test both ways: the gateway's fast lane on (the default), and every request
    # through the Bottle app (gateway/fastlane.py).
    pytest.mark.parametrize(
        "cluster",
        [{"ZKV_HTTP_FAST_LANE": "on"}, {"ZKV_HTTP_FAST_LANE": "off"}],
        ids=["fast-lane", "bottle"],
        indirect=True,
        scope="module",
    ),
]


def http_date_s(text: str) -> float:
    """Seconds since the epoch of an HTTP-date like 'Thu, 11 Jan 2024 21:09:21 GMT'."""
    assert text.endswith(" GMT"), text
    return parsedate_to_datetime(text).timestamp()


def unique(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def get(cluster: Cluster, path: str, **params: str):
    query = urlencode(params)
    return cluster.http("GET", f"{path}?{query}" if query else path)


def test_seed_set_get_delete_examples(cluster):
    """The README's curl session, with the seed's exact JSON."""
    before = time.time()
    response = get(cluster, "/set", key="1", value="hello", timeout="10")
    assert response.status == 200
    body = response.json()
    assert set(body) == {"key", "message", "timeout", "value"}
    assert body["key"] == "1"
    assert body["value"] == "hello"
    assert body["message"] == "Value set successfully"
    assert before + 10 - 1 <= http_date_s(body["timeout"]) <= time.time() + 10 + 1

    response = get(cluster, "/get", key="1")
    assert response.status == 200
    body = response.json()
    assert set(body) == {"current_time", "time_out", "value"}
    assert body["value"] == "hello"
    assert abs(http_date_s(body["current_time"]) - time.time()) <= 2
    assert http_date_s(body["time_out"]) - http_date_s(body["current_time"]) in range(8, 12)

    response = get(cluster, "/delete", key="1")
    assert (response.status, response.json()) == (200, {"message": "Value deleted successfully"})
    response = get(cluster, "/delete", key="1")
    assert (response.status, response.json()) == (200, {"error": "Key not found"})
    response = get(cluster, "/get", key="1")
    assert (response.status, response.json()) == (200, {"error": "Data not found"})


def test_all_lists_live_keys_of_every_shard(cluster):
    keys = [unique("all") for _ in range(20)]
    for key in keys:
        assert get(cluster, "/set", key=key, value=f"v-{key}", timeout="30").status == 200
    assert {key_shard(k.encode(), 2) for k in keys} == {0, 1}  # both shards hold some
    listing = get(cluster, "/all").json()
    for key in keys:
        assert listing[key]["value"] == f"v-{key}"
        assert http_date_s(listing[key]["time_out"]) > time.time() + 20


def test_a_key_really_expires(cluster):
    key = unique("expiring")
    response = cluster.http("PUT", f"/v1/keys/{key}?ttl=0.4", body=b"short-lived")
    assert response.status == 200
    deadline_ms = response.json()["expires_at_ms"]

    def gone() -> bool:
        sent_ms = time.time() * 1000
        reply = cluster.http("GET", f"/v1/keys/{key}")
        if reply.status == 200:
            # Served only if the worker's clock (the same as ours) was before the deadline.
            assert sent_ms < deadline_ms, (sent_ms, deadline_ms)
            assert reply.body == b"short-lived"
            return False
        assert reply.status == 404
        return True

    assert not gone()  # live at first
    wait_for(gone, "the key to expire", timeout_s=5)
    assert time.time() * 1000 < deadline_ms + 1500  # gone within the expiry's precision
    assert get(cluster, "/get", key=key).json() == {"error": "Data not found"}
    assert key not in get(cluster, "/all").json()


def test_expired_key_is_removed_without_being_read(cluster):
    key = unique("unread")
    assert get(cluster, "/set", key=key, value="x", timeout="0.2").status == 200
    # Never read it by name: it must leave the listing on its own.
    wait_for(lambda: key not in get(cluster, "/all").json(), "the key to leave /all", 5)


def test_timeout_with_decimals_has_millisecond_precision(cluster):
    key = unique("ms")
    response = cluster.http("PUT", f"/v1/keys/{key}?ttl=2.5", body=b"v")
    set_ms = time.time() * 1000
    deadline_ms = response.json()["expires_at_ms"]
    assert set_ms + 2500 - 1000 < deadline_ms <= set_ms + 2500


def test_values_and_keys_with_any_characters(cluster):
    key = "clé / with spaces & ?=" + unique()
    value = "héllo wörld ✓ & = ?"
    assert get(cluster, "/set", key=key, value=value, timeout="10").status == 200
    assert get(cluster, "/get", key=key).json()["value"] == value
    assert get(cluster, "/all").json()[key]["value"] == value
    # The same key over the REST API, percent-encoded, slash and all.
    assert cluster.http("GET", "/v1/keys/" + quote(key, safe="")).body == value.encode()


BAD_REQUESTS = [
    ("/set", {"value": "v", "timeout": "10"}, "key"),
    ("/set", {"key": "", "value": "v", "timeout": "10"}, "key"),
    ("/set", {"key": "k", "timeout": "10"}, "value"),
    ("/set", {"key": "k", "value": "v"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "abc"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "0"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "-5"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "nan"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "inf"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "-inf"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "0.0001"}, "timeout"),
    ("/set", {"key": "k", "value": "v", "timeout": "99999999999999999999"}, "timeout"),
    ("/set", {"key": "k" * 5000, "value": "v", "timeout": "10"}, "key"),
    ("/get", {}, "key"),
    ("/get", {"key": ""}, "key"),
    ("/delete", {}, "key"),
]


@pytest.mark.parametrize(("path", "params", "parameter"), BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_parameter(cluster, path, params, parameter):
    response = get(cluster, path, **params)
    assert response.status == 400
    error = response.json()["error"]
    assert f"'{parameter}'" in error or parameter in error.split(), error


def test_repeated_parameter_is_refused(cluster):
    response = cluster.http("GET", "/set?key=a&key=b&value=v&timeout=10")
    assert response.status == 400
    assert "key" in response.json()["error"]


def test_unknown_route_and_wrong_method_are_json(cluster):
    response = cluster.http("GET", "/nope")
    assert response.status == 404
    assert "error" in response.json()
    response = cluster.http("POST", "/set?key=1&value=v&timeout=1")
    assert response.status == 405
    assert "error" in response.json()


def test_the_gateway_says_whether_its_fast_lane_is_on(cluster):
    off = cluster.env.get("ZKV_HTTP_FAST_LANE") == "off"
    expected = "fast lane off" if off else "fast lane on"
    wait_for(lambda: expected in cluster.logs() or None, f"the gateway to log {expected!r}")
