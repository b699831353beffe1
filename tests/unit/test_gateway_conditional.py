"""The REST API of issue 12 through the app, in-process, with the fake client of test_gateway.

Versions as strong ETags, conditional PUT/GET/DELETE (RFC 9110), counters, new deadlines, touch,
locks with fencing tokens and fenced writes; every new parameter refused with a 400 naming it,
every refused condition a 412 or 409 (never a 500), and the roles of the new routes.
"""

from __future__ import annotations

from typing import Any

import pytest
from bottle import Bottle

from gateway.app import make_app
from gateway.auth import Role, Tokens
from tests.unit.test_gateway import FakeClient, FakeClock, Response, call, error_of

pytestmark = [
    pytest.mark.unit,
    pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning"),
]

U64_MAX = 2**64 - 1


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def kv(clock: FakeClock) -> FakeClient:
    return FakeClient(clock)


@pytest.fixture
def app(kv: FakeClient, clock: FakeClock) -> Bottle:
    return make_app(lambda: kv, max_key_bytes=16, max_value_bytes=32, clock=clock)


def send(
    app: Bottle, method: str, target: str, body: bytes | None = None, **headers: str
) -> Response:
    """A request with header fields given as ``If_Match="..."`` (WSGI's HTTP_IF_MATCH)."""
    extra = {"HTTP_" + name.upper(): value for name, value in headers.items()}
    return call(app, method, target, body, extra)


def version_of(response: Response) -> int:
    tag = response.headers["etag"]
    assert tag.startswith('"') and tag.endswith('"') and tag[1:-1].isdigit(), tag
    return int(tag[1:-1])


# --- versions and conditional writes ----------------------------------------------------------


def test_put_and_get_carry_the_version_as_a_strong_etag(app: Bottle) -> None:
    first = version_of(send(app, "PUT", "/v1/keys/k", b"a"))
    got = send(app, "GET", "/v1/keys/k")
    assert (got.status, got.body, version_of(got)) == (200, b"a", first)
    second = version_of(send(app, "PUT", "/v1/keys/k", b"b"))
    assert second > first
    assert version_of(send(app, "GET", "/v1/keys/k")) == second
    assert send(app, "HEAD", "/v1/keys/k").headers["etag"] == f'"{second}"'


def test_put_if_none_match_star_writes_only_a_missing_key(app: Bottle, kv: FakeClient) -> None:
    assert send(app, "PUT", "/v1/keys/k", b"one", If_None_Match="*").status == 200
    refused = send(app, "PUT", "/v1/keys/k", b"two", If_None_Match=" * ")
    assert "key exists" in error_of(refused, 412)
    assert send(app, "GET", "/v1/keys/k").body == b"one"
    assert kv.calls[-2][4]["nx"] is True  # the store checks it, atomically: no read first


def test_put_if_match_writes_only_that_version(app: Bottle) -> None:
    version = version_of(send(app, "PUT", "/v1/keys/k", b"one"))
    stale = send(app, "PUT", "/v1/keys/k", b"x", If_Match=f'"{version + 1}"')
    error_of(stale, 412)
    done = send(app, "PUT", "/v1/keys/k", b"two", If_Match=f'"{version}"')
    assert done.status == 200 and version_of(done) > version
    # The same tag again is stale now: exactly one of two writers with one ETag wins.
    error_of(send(app, "PUT", "/v1/keys/k", b"three", If_Match=f'"{version}"'), 412)
    assert send(app, "GET", "/v1/keys/k").body == b"two"
    # If-Match: * needs the key to exist (XX).
    error_of(send(app, "PUT", "/v1/keys/new", b"x", If_Match="*"), 412)
    assert send(app, "PUT", "/v1/keys/k", b"four", If_Match="*").status == 200


def test_if_match_lists_weak_tags_and_other_spellings(app: Bottle, kv: FakeClient) -> None:
    version = version_of(send(app, "PUT", "/v1/keys/k", b"one"))
    # Strong comparison: a weak tag never matches, even of the current version; nothing sent.
    before = len(kv.calls)
    error_of(send(app, "PUT", "/v1/keys/k", b"x", If_Match=f'W/"{version}"'), 412)
    error_of(send(app, "PUT", "/v1/keys/k", b"x", If_Match=f'"0{version}"'), 412)
    error_of(send(app, "PUT", "/v1/keys/k", b"x", If_Match=f'"{U64_MAX + 1}"'), 412)
    assert len(kv.calls) == before
    # A list whose one strong version is current: weak ones and empty elements are dropped.
    listed = f' W/"{version}" ,, "{version}",W/"1" '
    assert send(app, "PUT", "/v1/keys/k", b"two", If_Match=listed).status == 200
    # Two distinct strong versions: the store checks one, so this is refused, not guessed.
    message = error_of(send(app, "PUT", "/v1/keys/k", b"x", If_Match='"1", "2"'), 400)
    assert "If-Match" in message
    assert send(app, "GET", "/v1/keys/k").body == b"two"


@pytest.mark.parametrize(
    "value",
    ["5", '"abc"', '"5', '"5" "6"', '"5", *', "*, *", "", '"-1"', '"\u00b2"', "W/5", '"5";x'],
)
def test_if_match_that_is_not_quoted_numbers_is_400(app: Bottle, value: str) -> None:
    send(app, "PUT", "/v1/keys/k", b"one")
    assert "If-Match" in error_of(send(app, "PUT", "/v1/keys/k", b"x", If_Match=value), 400)
    assert "If-Match" in error_of(send(app, "DELETE", "/v1/keys/k", If_Match=value), 400)
    assert "If-Match" in error_of(send(app, "GET", "/v1/keys/k", If_Match=value), 400)
    assert send(app, "GET", "/v1/keys/k").body == b"one"


def test_if_none_match_on_put_is_star_or_400(app: Bottle) -> None:
    for value in ['"5"', 'W/"5"', "5"]:
        message = error_of(send(app, "PUT", "/v1/keys/k", b"x", If_None_Match=value), 400)
        assert "If-None-Match" in message
    both = send(app, "PUT", "/v1/keys/k", b"x", If_None_Match="*", If_Match='"1"')
    error_of(both, 412)  # can never both hold
    assert send(app, "GET", "/v1/keys/k").status == 404


def test_delete_if_match(app: Bottle) -> None:
    version = version_of(send(app, "PUT", "/v1/keys/k", b"one"))
    error_of(send(app, "DELETE", "/v1/keys/k", If_Match=f'"{version + 1}"'), 412)
    assert send(app, "GET", "/v1/keys/k").status == 200
    assert send(app, "DELETE", "/v1/keys/k", If_Match=f'"{version}"').json() == {"deleted": "k"}
    # A missing key fails If-Match (412, as the issue asks), both with a version and with *.
    error_of(send(app, "DELETE", "/v1/keys/k", If_Match=f'"{version}"'), 412)
    error_of(send(app, "DELETE", "/v1/keys/k", If_Match="*"), 412)
    error_of(send(app, "DELETE", "/v1/keys/k"), 404)
    assert "If-None-Match" in error_of(send(app, "DELETE", "/v1/keys/k", If_None_Match="*"), 400)


def test_get_if_none_match_is_304_and_if_match_412(app: Bottle) -> None:
    version = version_of(send(app, "PUT", "/v1/keys/k", b"one"))
    for value in [f'"{version}"', f'W/"{version}"', f'"1", W/"{version}"', "*"]:
        response = send(app, "GET", "/v1/keys/k", If_None_Match=value)
        assert (response.status, response.body) == (304, b""), value
        assert version_of(response) == version
    assert send(app, "GET", "/v1/keys/k", If_None_Match=f'"{version + 1}"').body == b"one"
    assert send(app, "GET", "/v1/keys/k", If_Match=f'"{version}"').body == b"one"
    error_of(send(app, "GET", "/v1/keys/k", If_Match=f'"{version + 1}"'), 412)
    error_of(send(app, "GET", "/v1/keys/k", If_Match=f'W/"{version}"'), 412)
    error_of(send(app, "GET", "/v1/keys/missing", If_Match="*"), 404)  # RFC 9110 13.2.1


# --- counters -----------------------------------------------------------------------------------


def test_incr_counts_from_zero_and_keeps_the_deadline(app: Bottle, clock: FakeClock) -> None:
    first = send(app, "POST", "/v1/keys/hits/incr?ttl=60")
    assert first.json() == {"key": "hits", "value": 1, "expires_at_ms": clock.ms() + 60_000}
    later = send(app, "POST", "/v1/keys/hits/incr?by=-5")
    assert later.json() == {"key": "hits", "value": -4, "expires_at_ms": clock.ms() + 60_000}
    assert version_of(later) > version_of(first)
    assert send(app, "GET", "/v1/keys/hits").body == b"-4"
    # A key with a slash in it: the route is the path before the last /incr.
    assert send(app, "POST", "/v1/keys/a/incr/incr?by=%2B2").json()["value"] == 2
    assert send(app, "GET", "/v1/keys/a/incr").body == b"2"
    assert send(app, "POST", "/v1/keys/n/incr").json()["expires_at_ms"] is None


def test_incr_of_a_non_integer_or_past_64_bits_is_409(app: Bottle) -> None:
    send(app, "PUT", "/v1/keys/text", b"abc")
    assert "not an integer" in error_of(send(app, "POST", "/v1/keys/text/incr"), 409)
    send(app, "PUT", "/v1/keys/big", str(2**63 - 1).encode())
    assert "overflow" in error_of(send(app, "POST", "/v1/keys/big/incr"), 409)
    assert send(app, "GET", "/v1/keys/big").body == str(2**63 - 1).encode()


@pytest.mark.parametrize(
    "by",
    ["", "x", "1.0", "1e3", " 1", "1 ", "--1", "0x10", str(2**63), str(-(2**63) - 1), "9" * 21],
)
def test_incr_by_that_is_not_a_64_bit_integer_is_400(app: Bottle, kv: FakeClient, by: str) -> None:
    response = send(app, "POST", f"/v1/keys/n/incr?by={by.replace(' ', '%20')}")
    assert "'by'" in error_of(response, 400)
    assert kv.calls == []


def test_incr_by_the_64_bit_bounds_is_taken(app: Bottle) -> None:
    assert send(app, "POST", f"/v1/keys/a/incr?by={2**63 - 1}").json()["value"] == 2**63 - 1
    assert send(app, "POST", f"/v1/keys/b/incr?by={-(2**63)}").json()["value"] == -(2**63)


# --- deadlines ------------------------------------------------------------------------------


def test_patch_sets_or_removes_the_deadline(app: Bottle, clock: FakeClock) -> None:
    send(app, "PUT", "/v1/keys/k?ttl=5", b"v")
    response = send(app, "PATCH", "/v1/keys/k?ttl=60")
    assert response.json() == {
        "key": "k",
        "expires_at": "Thu, 11 Jan 2024 21:10:21 GMT",
        "expires_at_ms": clock.ms() + 60_000,
    }
    assert send(app, "GET", "/v1/keys/k").headers["x-zkv-expires-at-ms"] == str(clock.ms() + 60_000)
    assert send(app, "PATCH", "/v1/keys/k?ttl=none").json()["expires_at_ms"] is None
    assert "x-zkv-expires-at-ms" not in send(app, "GET", "/v1/keys/k").headers
    error_of(send(app, "PATCH", "/v1/keys/missing?ttl=5"), 404)
    error_of(send(app, "PATCH", "/v1/keys/missing?ttl=none"), 404)


@pytest.mark.parametrize("target", ["/v1/keys/k", "/v1/keys/k?ttl=0", "/v1/keys/k?ttl=None"])
def test_patch_without_a_valid_ttl_is_400(app: Bottle, kv: FakeClient, target: str) -> None:
    assert "'ttl'" in error_of(send(app, "PATCH", target), 400)
    assert kv.calls == []


def test_get_touch_moves_the_deadline_as_it_reads(app: Bottle, clock: FakeClock) -> None:
    send(app, "PUT", "/v1/keys/session?ttl=5", b"v")
    clock.now += 4
    response = send(app, "GET", "/v1/keys/session?touch=10")
    assert response.body == b"v"
    assert response.headers["x-zkv-expires-at-ms"] == str(clock.ms() + 10_000)
    clock.now += 9
    assert send(app, "GET", "/v1/keys/session").status == 200
    assert "'touch'" in error_of(send(app, "GET", "/v1/keys/session?touch=-1"), 400)
    message = error_of(send(app, "GET", "/v1/keys/session?touch=5", If_Match="*"), 400)
    assert "If-Match" in message  # a 412 could not undo the touch: refused instead
    before = send(app, "GET", "/v1/keys/session").headers
    tag = before["etag"]
    message = error_of(send(app, "GET", "/v1/keys/session?touch=5", If_None_Match=tag), 400)
    assert "If-None-Match" in message  # a 304 could not undo it either (README: 400)
    message = error_of(send(app, "GET", "/v1/keys/session?touch=5&fence=job:1"), 400)
    assert "'fence'" in message  # the wire's touch takes no fence: refused, not ignored
    after = send(app, "GET", "/v1/keys/session").headers  # nothing touched meanwhile
    assert after["x-zkv-expires-at-ms"] == before["x-zkv-expires-at-ms"]


def test_head_with_touch_is_400_and_moves_nothing(app: Bottle, clock: FakeClock) -> None:
    send(app, "PUT", "/v1/keys/session?ttl=5", b"v")
    deadline = send(app, "GET", "/v1/keys/session").headers["x-zkv-expires-at-ms"]
    assert send(app, "HEAD", "/v1/keys/session?touch=60").status == 400  # HEAD: no body
    assert send(app, "GET", "/v1/keys/session").headers["x-zkv-expires-at-ms"] == deadline


# --- locks ----------------------------------------------------------------------------------


def test_locks_take_refresh_release_with_growing_tokens(app: Bottle, clock: FakeClock) -> None:
    taken = send(app, "POST", "/v1/locks/jobs/nightly?ttl=10").json()
    assert taken["name"] == "jobs/nightly" and taken["expires_at_ms"] == clock.ms() + 10_000
    token = taken["token"]
    held = send(app, "POST", "/v1/locks/jobs/nightly?ttl=10&wait=0")
    assert held.status == 409
    assert held.json()["expires_at_ms"] == clock.ms() + 10_000  # the holder's expiry
    refreshed = send(app, "POST", f"/v1/locks/jobs/nightly/refresh?token={token}&ttl=30")
    assert refreshed.json() == {
        "name": "jobs/nightly",
        "token": token,
        "expires_at_ms": clock.ms() + 30_000,
    }
    released = send(app, "DELETE", f"/v1/locks/jobs/nightly?token={token}")
    assert released.json() == {"name": "jobs/nightly", "token": token, "released": True}
    again = send(app, "POST", "/v1/locks/jobs/nightly?ttl=10").json()
    assert again["token"] > token
    # The old token is not the lock's any more: refresh and release are 409, with JSON.
    stale = send(app, "POST", f"/v1/locks/jobs/nightly/refresh?token={token}&ttl=30")
    assert stale.status == 409 and stale.json()["expires_at_ms"] is None
    assert send(app, "DELETE", f"/v1/locks/jobs/nightly?token={token}").status == 409


def test_lock_wait_is_passed_in_milliseconds(app: Bottle, kv: FakeClient) -> None:
    send(app, "POST", "/v1/locks/a?ttl=1&wait=2.5")
    assert kv.calls[-1] == ("lock", b"a", 1000, 2500)
    send(app, "POST", "/v1/locks/b?ttl=1&wait=300")
    assert kv.calls[-1] == ("lock", b"b", 1000, 300_000)


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("/v1/locks/a", "ttl"),
        ("/v1/locks/a?ttl=0", "ttl"),
        ("/v1/locks/a?ttl=x", "ttl"),
        ("/v1/locks/a?ttl=1&wait=-1", "wait"),
        ("/v1/locks/a?ttl=1&wait=300.001", "wait"),
        ("/v1/locks/a?ttl=1&wait=nan", "wait"),
        ("/v1/locks/a?ttl=1&wait=1&wait=2", "wait"),
        ("/v1/locks/a/refresh?ttl=1", "token"),
        ("/v1/locks/a/refresh?token=1", "ttl"),
        ("/v1/locks/a/refresh?token=-1&ttl=1", "token"),
        (f"/v1/locks/a/refresh?token={2**64}&ttl=1", "token"),
        ("/v1/locks/a/refresh?token=1.0&ttl=1", "token"),
    ],
)
def test_lock_parameters_are_checked(app: Bottle, kv: FakeClient, target: str, name: str) -> None:
    assert f"'{name}'" in error_of(send(app, "POST", target), 400)
    assert kv.calls == []


@pytest.mark.parametrize("token", ["", "a", "1e3", " 1", str(2**64)])
def test_release_token_is_checked(app: Bottle, kv: FakeClient, token: str) -> None:
    target = f"/v1/locks/a?token={token.replace(' ', '%20')}"
    assert "'token'" in error_of(send(app, "DELETE", target), 400)
    assert kv.calls == []


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/v1/locks/a?ttl=1"),
        ("POST", "/v1/locks/a/refresh?token=1&ttl=1"),
        ("DELETE", "/v1/locks/a?token=1"),
        ("POST", "/v1/keys/a/incr"),
        ("PATCH", "/v1/keys/a?ttl=1"),
    ],
)
@pytest.mark.parametrize("header", ["If_Match", "If_None_Match"])
def test_conditional_headers_are_refused_where_not_honoured(
    app: Bottle, kv: FakeClient, method: str, target: str, header: str
) -> None:
    """Never silently ignored: a client that sent one expects it to hold."""
    response = send(app, method, target, **{header: "*"})
    assert header.replace("_", "-") in error_of(response, 400)
    assert kv.calls == []


# --- fenced writes -----------------------------------------------------------------------------


def test_fenced_writes_pass_with_the_newest_token_only(app: Bottle, kv: FakeClient) -> None:
    old = send(app, "POST", "/v1/locks/job?ttl=10").json()["token"]
    assert send(app, "PUT", f"/v1/keys/out?fence=job:{old}", b"v1").status == 200
    assert kv.calls[-1][4]["fence"] == (b"job", old)
    assert send(app, "DELETE", f"/v1/locks/job?token={old}").status == 200
    new = send(app, "POST", "/v1/locks/job?ttl=10").json()["token"]
    # The paused old holder wakes up: every fenced write of it is refused, nothing changes.
    assert "older" in error_of(send(app, "PUT", f"/v1/keys/out?fence=job:{old}", b"x"), 409)
    error_of(send(app, "DELETE", f"/v1/keys/out?fence=job:{old}"), 409)
    error_of(send(app, "POST", f"/v1/keys/n/incr?fence=job:{old}"), 409)
    error_of(send(app, "PATCH", f"/v1/keys/out?ttl=60&fence=job:{old}"), 409)
    error_of(send(app, "PATCH", f"/v1/keys/out?ttl=none&fence=job:{old}"), 409)
    assert send(app, "GET", "/v1/keys/out").body == b"v1"
    assert "X-Zkv-Expires-At-Ms" not in send(app, "GET", "/v1/keys/out").headers
    assert send(app, "PUT", f"/v1/keys/out?fence=job:{new}", b"v2").status == 200
    assert send(app, "POST", f"/v1/keys/n/incr?fence=job:{new}").json()["value"] == 1
    assert send(app, "PATCH", f"/v1/keys/out?ttl=60&fence=job:{new}").status == 200
    assert kv.calls[-1] == ("expire", b"out", 60_000, (b"job", new))
    assert send(app, "PATCH", f"/v1/keys/out?ttl=none&fence=job:{new}").status == 200
    assert kv.calls[-1] == ("persist", b"out", (b"job", new))
    assert send(app, "DELETE", f"/v1/keys/out?fence=job:{new}").status == 200
    # A lock name may hold colons: the token is after the last one.
    send(app, "POST", "/v1/locks/a:b?ttl=10")
    token = kv.locks[b"a:b"][0]
    assert send(app, "PUT", f"/v1/keys/c?fence=a:b:{token}", b"v").status == 200


@pytest.mark.parametrize(
    "fence", ["", "job", "job:", ":5", "job:x", "job:-1", "job:1.5", f"job:{2**64}", "%00j:1"]
)
@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("PUT", "/v1/keys/k"),
        ("DELETE", "/v1/keys/k"),
        ("POST", "/v1/keys/k/incr"),
        ("PATCH", "/v1/keys/k?ttl=5&"),
    ],
)
def test_a_fence_that_is_not_lock_colon_token_is_400(
    app: Bottle, kv: FakeClient, fence: str, method: str, target: str
) -> None:
    target += "" if target.endswith("&") else "?"
    response = send(app, method, f"{target}fence={fence}", b"x" if method == "PUT" else None)
    assert "'fence'" in error_of(response, 400)
    assert kv.calls == []


# --- reserved keys, roles --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("PUT", "/v1/keys/%00lock%00a"),
        ("GET", "/v1/keys/%00x"),
        ("DELETE", "/v1/keys/%00x"),
        ("PATCH", "/v1/keys/%00x?ttl=1"),
        ("POST", "/v1/keys/%00x/incr"),
        ("POST", "/v1/locks/%00x?ttl=1"),
        ("GET", "/get?key=%00x"),
        ("GET", "/set?key=%00x&value=v&timeout=1"),
    ],
)
def test_keys_starting_with_nul_are_reserved(
    app: Bottle, kv: FakeClient, method: str, target: str
) -> None:
    assert "NUL" in error_of(send(app, method, target, b"v" if method == "PUT" else None), 400)
    assert kv.calls == []


READER, WRITER = "r" * 20, "w" * 20


@pytest.mark.parametrize(
    ("method", "target", "needed"),
    [
        ("POST", "/v1/keys/n/incr", Role.WRITE),
        ("PATCH", "/v1/keys/k?ttl=5", Role.WRITE),
        ("GET", "/v1/keys/k?touch=5", Role.WRITE),
        ("GET", "/v1/keys/k", Role.READ),
        ("POST", "/v1/locks/l?ttl=5", Role.WRITE),
        ("POST", "/v1/locks/l/refresh?token=1&ttl=5", Role.WRITE),
        ("DELETE", "/v1/locks/l?token=1", Role.WRITE),
    ],
)
def test_roles_of_the_new_routes(
    kv: FakeClient, clock: FakeClock, method: str, target: str, needed: Role
) -> None:
    tokens = Tokens([(Role.READ, READER), (Role.WRITE, WRITER)])
    app = make_app(lambda: kv, clock=clock, tokens=tokens)
    kv.set("k", b"v")

    def with_token(token: str) -> Any:
        return call(app, method, target, None, {"HTTP_AUTHORIZATION": f"Bearer {token}"})

    reader = with_token(READER)
    assert reader.status == (403 if needed is Role.WRITE else 200), reader.body
    assert with_token(WRITER).status in (200, 409), target
