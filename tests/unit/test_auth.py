"""Bearer tokens: the tokens file, the role table, and the app and fast lane refusing by role."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bottle import Bottle

from gateway.app import make_app
from gateway.auth import (
    INCR_RULE,
    KEY_RULE,
    LOCK_REFRESH_RULE,
    LOCK_RULE,
    MISSING,
    ROUTE_ROLES,
    Denial,
    Role,
    Tokens,
    TokensFileError,
    load_tokens,
    role_of_route,
)
from gateway.fastlane import FastLane, for_app
from gateway.server import exposure_warning, main
from tests.unit.test_fastlane import AsyncFake, BlockingFake, Store
from tests.unit.test_gateway import FakeClient, FakeClock, call

pytestmark = pytest.mark.unit

READER = "r" * 20
WRITER = "w-w.w_w~w+w/w" + "w" * 10 + "=="
ADMIN = "A" * 43
TOKENS_TEXT = f"""# who may use this gateway
read {READER}

write   {WRITER}
ADMIN\t{ADMIN}   # a trailing comment is not allowed: this line has 4 fields
"""


def tokens_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens([(Role.READ, READER), (Role.WRITE, WRITER), (Role.ADMIN, ADMIN)])


def bearer(token: str) -> dict[str, Any]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


# --- the tokens file ----------------------------------------------------------------------------


def test_a_tokens_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, TOKENS_TEXT.replace("   # a trailing", "\n# a trailing"))
    tokens = load_tokens(path)
    assert len(tokens) == 3
    assert tokens.role(f"Bearer {READER}") == Role.READ
    assert tokens.role(f"bearer  {WRITER}") == Role.WRITE
    assert tokens.role(f"Bearer {ADMIN}") == Role.ADMIN


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        (TOKENS_TEXT, 5, "two fields"),
        (f"read {READER}\nreader {WRITER}\n", 2, "unknown role 'reader'"),
        (f"read {READER}\n{WRITER}\n", 2, "two fields"),
        ("write short\n", 1, "16 to 4096 characters"),
        (f"write {'é' * 20}\n", 1, "16 to 4096 characters"),
        (f"write {'x' * 4097}\n", 1, "16 to 4096 characters"),
        (f"write {READER}=x\n", 1, "16 to 4096 characters"),  # '=' only as padding
        (f"read {READER}\n\nadmin {READER}\n", 3, "the same token as line 1"),
    ],
)
def test_a_malformed_line_is_refused_naming_it(
    tmp_path: Path, text: str, line: int, says: str
) -> None:
    path = tokens_file(tmp_path, text)
    with pytest.raises(TokensFileError) as error:
        load_tokens(path)
    message = str(error.value)
    assert f"tokens file {path}, line {line}: " in message
    assert says in message
    assert READER not in message and WRITER not in message  # never a token in a log line


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660])
def test_a_file_others_may_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = tokens_file(tmp_path, f"read {READER}\n", mode)
    with pytest.raises(TokensFileError, match=f"mode 0{mode:o}.*chmod 600"):
        load_tokens(path)


def test_an_unreadable_missing_or_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokensFileError, match="cannot read it"):
        load_tokens(str(tmp_path / "nope"))
    with pytest.raises(TokensFileError, match="not a regular file"):
        os.chmod(tmp_path, 0o700)
        load_tokens(str(tmp_path))
    with pytest.raises(TokensFileError, match="no tokens"):
        load_tokens(tokens_file(tmp_path, "# nobody\n\n"))
    with pytest.raises(TokensFileError, match="line 2: not UTF-8"):
        (tmp_path / "tokens").write_bytes(b"# x\n\xff\n")
        load_tokens(str(tmp_path / "tokens"))


def test_the_tokens_file_flag_stops_the_gateway_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tokens_file(tmp_path, f"read {READER}\nwrite nope\n")
    with pytest.raises(SystemExit) as stop:
        main(["--tokens", path, "--port", "0"])
    assert stop.value.code == 2
    assert f"argument --tokens: tokens file {path}, line 2: a token is" in capsys.readouterr().err
    monkeypatch.setenv("ZKV_HTTP_TOKENS", tokens_file(tmp_path, f"read {READER}\n", 0o644))
    with pytest.raises(SystemExit):
        main(["--port", "0"])
    assert "chmod 600" in capsys.readouterr().err


def test_a_half_given_or_unloadable_certificate_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--certfile", str(tmp_path / "cert.pem"), "--port", "0"])
    assert stop.value.code == 2
    assert "--certfile and --keyfile: give both or neither" in capsys.readouterr().err
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(SystemExit):
        main(["--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "cert.pem")])
    assert f"cannot load {tmp_path / 'cert.pem'}" in capsys.readouterr().err


def test_listening_beyond_loopback_warns_without_tokens_or_without_tls(tokens: Tokens) -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, None, tls=False) is None
    warning = exposure_warning("0.0.0.0", None, tls=False)
    assert warning is not None and "without tokens" in warning and "ZKV_HTTP_TOKENS" in warning
    warning = exposure_warning("::", tokens, tls=False)
    assert warning is not None and "clear text" in warning
    assert exposure_warning("0.0.0.0", tokens, tls=True) is None


# --- tokens and roles ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", f"Basic {READER}", f"Bearer{READER}", f"Bearer {READER} x", "Bearer "],
)
def test_no_bearer_token_is_401(tokens: Tokens, header: str | None) -> None:
    denial = tokens.role(header)
    assert isinstance(denial, Denial) and denial.status == 401
    assert denial.headers["WWW-Authenticate"].startswith("Bearer ")


@pytest.mark.parametrize("token", [READER[:-1], READER + "r", READER.upper(), "x" * 20, ADMIN[1:]])
def test_a_token_not_in_the_file_is_401_invalid(tokens: Tokens, token: str) -> None:
    denial = tokens.role(f"Bearer {token}")
    assert isinstance(denial, Denial) and denial.status == 401
    assert 'error="invalid_token"' in denial.headers["WWW-Authenticate"]


def test_roles_are_ordered(tokens: Tokens) -> None:
    assert tokens.check(f"Bearer {READER}", Role.READ) == Role.READ
    assert tokens.check(f"Bearer {ADMIN}", Role.WRITE) == Role.ADMIN
    denial = tokens.check(f"Bearer {READER}".encode(), Role.WRITE)
    assert isinstance(denial, Denial) and denial.status == 403
    assert denial.message == "this token's role (read) may not do this: it needs write"
    assert tokens.check(None, Role.READ) is MISSING


def test_tokens_are_kept_only_as_keyed_digests() -> None:
    tokens = Tokens([(Role.READ, READER)], key=b"k" * 32)
    assert READER.encode() not in repr(vars(tokens)).encode()
    other = Tokens([(Role.READ, READER)], key=b"j" * 32)
    assert set(vars(tokens)["_roles"]) != set(vars(other)["_roles"])


def test_every_route_of_the_app_is_in_the_role_table() -> None:
    """A new route must say which role it needs (unlisted routes need admin, silently)."""
    app = make_app(lambda: FakeClient(FakeClock()))
    routes = {(route.method, route.rule) for route in app.routes}
    missing = routes - set(ROUTE_ROLES)
    assert not missing, f"add these to gateway.auth.ROUTE_ROLES: {sorted(missing)}"
    assert role_of_route("GET", "/nope") == Role.ADMIN
    assert role_of_route("HEAD", "/get") == Role.READ
    writes = {rule for (method, rule), role in ROUTE_ROLES.items() if role == Role.WRITE}
    assert writes == {
        "/set",
        "/delete",
        KEY_RULE,
        INCR_RULE,
        LOCK_RULE,
        LOCK_REFRESH_RULE,
    }
    # Every method of the new routes writes: a lock taken or released changes data.
    assert {
        (method, rule)
        for (method, rule), role in ROUTE_ROLES.items()
        if rule in (INCR_RULE, LOCK_RULE, LOCK_REFRESH_RULE) or method == "PATCH"
    } == {
        ("POST", INCR_RULE),
        ("PATCH", KEY_RULE),
        ("POST", LOCK_RULE),
        ("POST", LOCK_REFRESH_RULE),
        ("DELETE", LOCK_RULE),
    }


# --- the app ------------------------------------------------------------------------------------


@pytest.fixture
def app(tokens: Tokens) -> Bottle:
    return make_app(lambda: FakeClient(FakeClock()), tokens=tokens)


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/get?key=k"),
        ("GET", "/set?key=k&value=v&timeout=1"),
        ("GET", "/delete?key=k"),
        ("GET", "/all"),
        ("GET", "/v1/keys"),
        ("GET", "/v1/keys/k"),
        ("PUT", "/v1/keys/k"),
        ("DELETE", "/v1/keys/k"),
        ("GET", "/v1/health"),
    ],
)
def test_the_app_answers_401_json_without_a_valid_token(
    app: Bottle, method: str, target: str
) -> None:
    for extra in ({}, bearer("y" * 20), {"HTTP_AUTHORIZATION": "Basic eDp5"}):
        response = call(app, method, target, body=b"v" if method == "PUT" else None, extra=extra)
        assert response.status == 401, (extra, response.body)
        assert response.headers["www-authenticate"].startswith('Bearer realm="zkv"')
        assert "token" in response.json()["error"]


def test_the_app_answers_403_json_to_a_role_too_low(app: Bottle) -> None:
    for method, target in [
        ("GET", "/set?key=k&value=v&timeout=1"),
        ("GET", "/delete?key=k"),
        ("PUT", "/v1/keys/k"),
        ("DELETE", "/v1/keys/k"),
    ]:
        response = call(app, method, target, body=b"v" if method == "PUT" else None,
                        extra=bearer(READER))  # fmt: skip
        assert response.status == 403, response.body
        assert response.json() == {
            "error": "this token's role (read) may not do this: it needs write"
        }
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


def test_the_app_serves_each_role_what_it_may(app: Bottle) -> None:
    assert call(app, "GET", "/set?key=k&value=v&timeout=9", extra=bearer(WRITER)).status == 200
    assert call(app, "GET", "/get?key=k", extra=bearer(READER)).json()["value"] == "v"
    assert call(app, "PUT", "/v1/keys/k", body=b"x", extra=bearer(ADMIN)).status == 200
    assert call(app, "GET", "/v1/keys/k", extra=bearer(READER)).body == b"x"
    assert call(app, "GET", "/nope", extra=bearer(READER)).status == 404


def test_the_health_detail_is_for_admin(app: Bottle) -> None:
    assert call(app, "GET", "/v1/health", extra=bearer(READER)).json() == {"status": "ok"}
    detail = call(app, "GET", "/v1/health", extra=bearer(ADMIN)).json()
    assert detail["status"] == "ok" and "owned" in detail
    no_tokens = make_app(lambda: FakeClient(FakeClock()))
    assert "owned" in call(no_tokens, "GET", "/v1/health").json()


# --- the fast lane ------------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def lane_of(tokens: Tokens | None, store: Store, loop: asyncio.AbstractEventLoop) -> FastLane:
    app = make_app(lambda: BlockingFake(store), tokens=tokens)
    made = for_app(app)
    assert made is not None
    assert made.tokens is tokens
    client = AsyncFake(store, loop)
    return FastLane(made.seed, lambda: client, made.tokens)  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/get?key=k", []),
        (b"/get?key=k", [(b"Authorization", b"Bearer " + b"y" * 20)]),
        (b"/get?key=k", [(b"authorization", f"Bearer {READER}".encode())] * 2),
        (b"/set?key=k&value=v&timeout=1", [(b"Authorization", f"Bearer {READER}".encode())]),
        (b"/delete?key=k", [(b"AUTHORIZATION", f"Bearer {READER}".encode())]),
    ],
)
def test_the_fast_lane_leaves_refused_requests_to_the_app(
    tokens: Tokens, loop: asyncio.AbstractEventLoop, target: bytes, headers: Any
) -> None:
    store = Store({}, None)
    lane = lane_of(tokens, store, loop)
    assert lane(b"GET", target, headers) is None


@pytest.mark.parametrize(
    ("target", "token"),
    [
        (b"/get?key=k", READER),
        (b"/get?key=k", ADMIN),
        (b"/set?key=k&value=v&timeout=1", WRITER),
        (b"/delete?key=k", ADMIN),
    ],
)
def test_the_fast_lane_serves_a_role_that_may(
    tokens: Tokens, loop: asyncio.AbstractEventLoop, target: bytes, token: str
) -> None:
    lane = lane_of(tokens, Store({}, None), loop)
    headers = [(b"Host", b"x"), (b"authorization", f"Bearer {token}".encode())]
    assert lane(b"GET", target, headers) is not None


def test_without_tokens_the_fast_lane_reads_no_header(loop: asyncio.AbstractEventLoop) -> None:
    lane = lane_of(None, Store({}, None), loop)
    assert lane(b"GET", b"/get?key=k") is not None


def test_the_status_pages_shell_needs_no_token_and_its_figures_need_admin(app: Bottle) -> None:
    # A browser cannot send a bearer token from its address bar: with tokens, the page was a
    # 401 (a newcomer's test). Its shell holds no data; the page sends the token it is given
    # in its URL's fragment (/#token=...) with each /v1/status request.
    page = call(app, "GET", "/")
    assert page.status == 200 and b"zkv-token" in page.body
    assert call(app, "GET", "/v1/status").status == 401
    assert call(app, "GET", "/v1/status", extra=bearer(READER)).status == 403
    assert call(app, "GET", "/v1/status", extra=bearer(ADMIN)).status not in (401, 403)
