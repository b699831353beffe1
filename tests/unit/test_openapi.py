"""The OpenAPI description (gateway/openapi.json) against the app it describes, in-process.

Three things keep the description honest: every route of the Bottle app is described and every
described path and method is routed (a new route fails here until it is described: add its
path to gateway/openapi.json, with its content type, text/plain or text/html as well as JSON);
the document is valid OpenAPI 3.1 (openapi-spec-validator); and the app's answers, errors
included, match the schemas it declares. The same description is then checked against a live
gateway by Schemathesis (tests/process/test_openapi_live.py).
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from bottle import Bottle
from openapi_spec_validator import OpenAPIV31SpecValidator

import gateway.app as gateway_app
from gateway import fastlane, http11
from gateway.app import OPENAPI_PATH, make_app, openapi_document
from tests.unit.test_gateway import FakeClient, FakeClock, Response, call
from zkv.errors import Busy, StorageFull, Timeout, Unavailable

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

# What the HTTP server (gateway/http11.py) answers itself, before or instead of any route: every
# operation may get these, so every operation declares them. 500 is never declared: a bug.
SERVER_STATUSES = {status for status in http11._REASONS if status != 500} - {413}


def description() -> dict[str, Any]:
    return json.loads(openapi_document())


def openapi_path(rule: str) -> str:
    """A Bottle route rule as an OpenAPI path: ``/v1/keys/<key:path>`` is ``/v1/keys/{key}``."""
    return re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", rule)


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every operation the description has."""
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kv(clock: FakeClock) -> FakeClient:
    return FakeClient(clock)


@pytest.fixture
def app(kv: FakeClient, clock: FakeClock) -> Bottle:
    return make_app(lambda: kv, clock=clock)


def test_every_route_is_described_and_every_described_operation_is_routed(app: Bottle) -> None:
    routed = {(route.method, openapi_path(route.rule)) for route in app.routes}
    described = operations(description())
    assert routed - described == set(), "routes missing from gateway/openapi.json"
    assert described - routed == set(), "described in gateway/openapi.json but not routed"


def test_the_fast_lane_serves_only_described_routes() -> None:
    described = operations(description())
    for path in fastlane._ROUTES:
        assert ("GET", path.decode()) in described


def test_the_description_is_valid_openapi_3_1() -> None:
    doc = description()
    assert doc["openapi"].startswith("3.1.")
    errors = [error.message for error in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []


def test_the_description_is_served_as_json(app: Bottle) -> None:
    response = call(app, "GET", OPENAPI_PATH)
    assert response.status == 200
    assert response.body == (REPO / "gateway" / "openapi.json").read_bytes()
    assert response.json()["paths"]


def test_the_description_is_package_data() -> None:
    # A wheel holds only the package data it is told of: without this line, pip install .
    # gives a gateway that cannot start (make_app reads the file).
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    patterns = [*data.get("gateway", []), *data.get("*", [])]
    assert any(fnmatch.fnmatch("openapi.json", p.removeprefix("**/")) for p in patterns), data


def test_every_operation_declares_the_servers_own_errors_and_every_error_is_json() -> None:
    doc = description()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            statuses = {int(status) for status in operation["responses"]}
            where = f"{method.upper()} {path}"
            assert SERVER_STATUSES <= statuses, (where, SERVER_STATUSES - statuses)
            assert 500 not in statuses, where
            for status, declared in operation["responses"].items():
                if int(status) >= 400:
                    assert list(_deref(doc, declared)["content"]) == ["application/json"], (
                        where,
                        status,
                    )


def test_every_status_of_the_apps_exception_table_is_declared() -> None:
    declared = {
        int(status)
        for _, path, operation in _operations(description())
        for status in operation["responses"]
    }
    assert {status for _, status in gateway_app._STATUS_OF} <= declared


# --- the app's answers against the schemas ----------------------------------------------------


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def conforms(doc: dict[str, Any], method: str, route: str, response: Response) -> None:
    """Assert that ``response`` is one the description declares for the operation: its status,
    its content type and, for JSON, its schema."""
    operation = doc["paths"][route][method.lower()]
    declared = operation["responses"].get(str(response.status))
    assert declared is not None, (method, route, response.status, response.body[:200])
    declared = _deref(doc, declared)
    for name, header in declared.get("headers", {}).items():
        if _deref(doc, header).get("required"):
            assert name.lower() in response.headers, (method, route, response.status, name)
    if "content" not in declared:  # 304
        assert response.body == b"", (method, route, response.status)
        return
    content_type = response.headers["content-type"].split(";")[0]
    assert content_type in declared["content"], (method, route, response.status, content_type)
    if content_type == "application/json":
        schema = declared["content"][content_type]["schema"]
        # The schema's $refs point into the description: validate against a root that holds
        # it (the description's own fields are no JSON Schema keywords, and are ignored).
        jsonschema.Draft202012Validator({**doc, **schema}).validate(json.loads(response.body))


def _deref(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node``, or what its ``$ref`` (a pointer into the description) points at."""
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


# (method, target, body, route as described), in order: a /set first, then what reads it
EXAMPLES: list[tuple[str, str, bytes | None, str]] = [
    ("GET", "/set?key=k&value=v&timeout=10", None, "/set"),
    ("GET", "/set?key=k&value=v&timeout=abc", None, "/set"),
    ("GET", "/set?key=&value=v&timeout=1", None, "/set"),
    ("GET", "/get?key=k", None, "/get"),
    ("GET", "/get?key=missing", None, "/get"),
    ("GET", "/get?key=%FF", None, "/get"),
    ("GET", "/get", None, "/get"),
    ("GET", "/delete?key=k", None, "/delete"),
    ("GET", "/delete?key=k&key=k", None, "/delete"),
    ("GET", "/all", None, "/all"),
    ("PUT", "/v1/keys/a/b?ttl=1.5", b"\x00\xff", "/v1/keys/{key}"),
    ("PUT", "/v1/keys/forever", b"", "/v1/keys/{key}"),
    ("PUT", "/v1/keys/a?ttl=-1", b"x", "/v1/keys/{key}"),
    ("PUT", "/v1/keys/" + "k" * 1025, b"x", "/v1/keys/{key}"),
    ("PUT", "/v1/keys/big", b"x" * (1024 * 1024 + 1), "/v1/keys/{key}"),
    ("GET", "/v1/keys/a/b", None, "/v1/keys/{key}"),
    ("GET", "/v1/keys/forever", None, "/v1/keys/{key}"),
    ("GET", "/v1/keys/nope", None, "/v1/keys/{key}"),
    ("GET", "/v1/keys/%FF", None, "/v1/keys/{key}"),
    ("DELETE", "/v1/keys/forever", None, "/v1/keys/{key}"),
    ("DELETE", "/v1/keys/nope", None, "/v1/keys/{key}"),
    ("GET", "/v1/keys?limit=1", None, "/v1/keys"),
    ("GET", "/v1/keys?limit=0", None, "/v1/keys"),
    ("GET", "/v1/keys?after=a", None, "/v1/keys"),
    ("GET", "/v1/health", None, "/v1/health"),
    ("GET", OPENAPI_PATH, None, OPENAPI_PATH),
]


def test_the_apps_answers_conform(app: Bottle) -> None:
    doc = description()
    seen: set[tuple[str, str, int]] = set()
    for method, target, body, route in EXAMPLES:
        response = call(app, method, target, body)
        conforms(doc, method, route, response)
        seen.add((method, route, response.status))
    # The examples reach what they are meant to: each success and each kind of refusal.
    assert {
        ("GET", "/set", 200),
        ("GET", "/set", 400),
        ("GET", "/get", 200),
        ("PUT", "/v1/keys/{key}", 413),
        ("GET", "/v1/keys/{key}", 404),
        ("DELETE", "/v1/keys/{key}", 404),
        ("GET", "/v1/keys", 400),
    } <= seen


# Issue 12's routes, with header fields: (method, target, body, headers, route as described).
KEYS, INCR, LOCK, REFRESH = (
    "/v1/keys/{key}",
    "/v1/keys/{key}/incr",
    "/v1/locks/{name}",
    "/v1/locks/{name}/refresh",
)
CONDITIONAL: list[tuple[str, str, bytes | None, dict[str, str], str]] = [
    ("PUT", "/v1/keys/c", b"v", {"HTTP_IF_NONE_MATCH": "*"}, KEYS),
    ("PUT", "/v1/keys/c", b"v", {"HTTP_IF_NONE_MATCH": "*"}, KEYS),  # 412
    ("PUT", "/v1/keys/c", b"v", {"HTTP_IF_MATCH": '"abc"'}, KEYS),  # 400
    ("PUT", "/v1/keys/c", b"v", {"HTTP_IF_MATCH": "*"}, KEYS),
    ("GET", "/v1/keys/c", None, {"HTTP_IF_NONE_MATCH": "*"}, KEYS),  # 304
    ("GET", "/v1/keys/c?touch=5", None, {}, KEYS),
    ("GET", "/v1/keys/c", None, {"HTTP_IF_MATCH": 'W/"1"'}, KEYS),  # 412
    ("PATCH", "/v1/keys/c?ttl=none", None, {}, KEYS),
    ("PATCH", "/v1/keys/nope?ttl=1", None, {}, KEYS),  # 404
    ("POST", "/v1/keys/c/incr", None, {}, INCR),  # 409: not an integer
    ("POST", "/v1/keys/n/incr?by=-2&ttl=1", None, {}, INCR),
    ("POST", "/v1/keys/n/incr?by=1.5", None, {}, INCR),  # 400
    ("POST", "/v1/locks/l?ttl=5&wait=0", None, {}, LOCK),
    ("POST", "/v1/locks/l?ttl=5", None, {}, LOCK),  # 409 with the holder's expiry
    ("POST", "/v1/locks/l/refresh?token=1&ttl=5", None, {}, REFRESH),  # 409
    ("DELETE", "/v1/locks/l?token=x", None, {}, LOCK),  # 400
    ("DELETE", "/v1/locks/l?token=1", None, {}, LOCK),  # 409
    ("PUT", "/v1/keys/c?fence=l:1", b"v", {}, KEYS),  # 409: not the newest token
    ("DELETE", "/v1/keys/c", None, {"HTTP_IF_MATCH": '"1", "2"'}, KEYS),  # 400
    ("DELETE", "/v1/keys/c", None, {"HTTP_IF_MATCH": "*"}, KEYS),
    ("DELETE", "/v1/keys/c", None, {"HTTP_IF_MATCH": "*"}, KEYS),  # 412
]


def test_the_answers_of_issue_12_conform(app: Bottle, kv: FakeClient) -> None:
    doc = description()
    seen: set[tuple[str, str, int]] = set()
    for method, target, body, headers, route in CONDITIONAL:
        response = call(app, method, target, body, headers)
        conforms(doc, method, route, response)
        seen.add((method, route, response.status))
    token = kv.locks[b"l"][0]
    for method, target, route in [
        ("POST", f"/v1/locks/l/refresh?token={token}&ttl=5", REFRESH),
        ("DELETE", f"/v1/locks/l?token={token}", LOCK),
    ]:
        response = call(app, method, target)
        conforms(doc, method, route, response)
        seen.add((method, route, response.status))
    assert {
        ("PUT", KEYS, 200),
        ("PUT", KEYS, 412),
        ("PUT", KEYS, 409),
        ("GET", KEYS, 304),
        ("GET", KEYS, 412),
        ("PATCH", KEYS, 200),
        ("PATCH", KEYS, 404),
        ("POST", INCR, 200),
        ("POST", INCR, 409),
        ("POST", INCR, 400),
        ("POST", LOCK, 200),
        ("POST", LOCK, 409),
        ("POST", REFRESH, 200),
        ("POST", REFRESH, 409),
        ("DELETE", LOCK, 200),
        ("DELETE", LOCK, 409),
        ("DELETE", KEYS, 412),
    } <= seen


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (Unavailable("no broker"), 503),
        (Busy("shed"), 503),
        (Timeout("late"), 504),
        (StorageFull("full"), 507),
    ],
)
def test_the_apps_failures_conform(
    app: Bottle, kv: FakeClient, failure: Exception, status: int
) -> None:
    doc = description()
    kv.failure = failure
    for method, target, body, route in [
        ("GET", "/set?key=k&value=v&timeout=1", None, "/set"),
        ("PUT", "/v1/keys/k", b"v", "/v1/keys/{key}"),
    ]:
        response = call(app, method, target, body)
        assert response.status == status
        conforms(doc, method, route, response)
    if status != 507:  # reads and deletes never meet a full disk
        for method, target, route in [
            ("GET", "/get?key=k", "/get"),
            ("GET", "/delete?key=k", "/delete"),
            ("GET", "/all", "/all"),
            ("GET", "/v1/keys/k", "/v1/keys/{key}"),
            ("DELETE", "/v1/keys/k", "/v1/keys/{key}"),
            ("GET", "/v1/keys", "/v1/keys"),
        ]:
            response = call(app, method, target)
            assert response.status == status
            conforms(doc, method, route, response)


@pytest.mark.parametrize(
    ("ping", "status"),
    [
        ({"status": "ok", "shards": 2, "owned": [True, True], "workers": 2}, 200),
        ({"status": "degraded", "shards": 2, "owned": [True, False], "workers": 1}, 503),
        (Unavailable("no answer"), 503),
    ],
)
def test_health_answers_conform(app: Bottle, kv: FakeClient, ping: Any, status: int) -> None:
    if isinstance(ping, Exception):
        kv.failure = ping
    else:
        kv.ping_info = ping
    response = call(app, "GET", "/v1/health")
    assert response.status == status
    conforms(description(), "GET", "/v1/health", response)


def test_a_wrong_answer_does_not_conform(app: Bottle) -> None:
    # The check itself can fail: an answer the description does not allow is caught.
    doc = description()
    wrong = Response(200, {"content-type": "application/json"}, b'{"deleted": 1}')
    with pytest.raises(jsonschema.ValidationError):
        conforms(doc, "DELETE", "/v1/keys/{key}", wrong)
    with pytest.raises(AssertionError):
        conforms(doc, "GET", "/get", Response(500, {"content-type": "application/json"}, b"{}"))
