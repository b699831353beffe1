"""What fuzzing found wrong in the gateway, each a regression test at the lowest tier.

Found by Schemathesis against a live gateway (tests/process/test_openapi_live.py) or by the
atheris targets (tests/fuzz/targets.py, replayed in tests/unit/test_fuzz.py); driven here
in-process through WSGI, with the in-memory client of tests/unit/test_gateway.py.
"""

from __future__ import annotations

import pytest
from bottle import Bottle

from gateway.app import make_app
from tests.unit.test_gateway import FakeClient, FakeClock, call

pytestmark = pytest.mark.unit


@pytest.fixture
def kv() -> FakeClient:
    return FakeClient(FakeClock())


@pytest.fixture
def app(kv: FakeClient) -> Bottle:
    return make_app(lambda: kv)


@pytest.mark.parametrize("key", ["a\nb", "a\n", "\n", "\r\n", "x\ny\nz"])
def test_a_rest_key_with_a_newline_is_a_key_like_any_other(
    app: Bottle, kv: FakeClient, key: str
) -> None:
    # Schemathesis: PUT /v1/keys/a%0Ab was 404 "Not found" (Bottle's path filter, ".+?", does
    # not match a newline), and PUT /v1/keys/a%0A stored the key "a" (its "$" matches before
    # a final newline). Keys may hold any character, as the README says.
    escaped = key.replace("\n", "%0A").replace("\r", "%0D")
    put = call(app, "PUT", f"/v1/keys/{escaped}", b"value")
    assert put.status == 200, put.body
    assert put.json()["key"] == key
    assert kv.get(key).value == b"value"
    assert call(app, "GET", f"/v1/keys/{escaped}").body == b"value"
    listing = call(app, "GET", "/v1/keys").json()
    assert [entry["key"] for entry in listing["keys"]] == [key]
    shorter = key.rstrip("\r\n")
    if shorter != key and shorter:  # the key without its final newline is another key
        assert call(app, "GET", f"/v1/keys/{shorter}").status == 404
    assert call(app, "DELETE", f"/v1/keys/{escaped}").json() == {"deleted": key}
    assert call(app, "GET", f"/v1/keys/{escaped}").status == 404
