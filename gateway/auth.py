"""Who may use the gateway: bearer tokens with roles, and the one table of what each route needs.

``--tokens FILE`` (``ZKV_HTTP_TOKENS``) names a file of ``ROLE TOKEN`` lines. Without it the
gateway answers everyone, as before (and binds to loopback unless told otherwise). With it,
every request to a route needs ``Authorization: Bearer <token>``: none, or a token not in the
file, is 401 (with ``WWW-Authenticate: Bearer``); a token whose role is below what the route
needs (:data:`ROUTE_ROLES`) is 403. Both are JSON, as every error of the gateway.

Roles are ordered: ``read`` (the GET routes), ``write`` (reads and everything that changes
data), ``admin`` (everything, with the metrics and the detail of the health check).

How a token is compared, in constant time: the file's tokens are kept only as
HMAC-SHA256 digests under a random key made at start (:class:`Tokens`); a presented token is
digested the same way and looked up in a dict of digests, and the entry found is then checked
with :func:`hmac.compare_digest`. The time of the lookup depends only on the digest, which the
client can neither choose nor see (the key is secret and new at each start), so it tells
nothing about how much of a token was right, nor which of the tokens came closest; and it costs
one HMAC whatever the number of tokens (about 2 us), where comparing with every token in turn
would cost one comparison per token on every request.
"""

from __future__ import annotations

import enum
import functools
import hmac
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bottle import HTTPError, Route, request

MAX_TOKENS = 10_000  # lines of ROLE TOKEN in a tokens file
MAX_TOKENS_FILE_BYTES = 1024 * 1024  # a tokens file larger than this is refused
MIN_TOKEN_CHARS = 16  # a shorter token is refused at start: guessable
MAX_TOKEN_CHARS = 4096  # a longer one too (a header line is at most 8 KiB under gthread)

# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")

AUTH_KEY = "zkv.auth"
"""Where :func:`gateway.app.make_app` leaves its :class:`Tokens` in the app's config (or None),
for the fast lane and the routes that answer by role."""
ROLE_ENVIRON = "zkv.role"
"""The environ key holding the role of a request's token once checked (absent: no tokens)."""


class Role(enum.IntEnum):
    """What a token may do; each role may do all that the roles below it may."""

    PUBLIC = 0  # no token needed: the status page's HTML shell, which holds no data
    READ = 1  # the GET routes
    WRITE = 2  # reads, and everything that changes data
    ADMIN = 3  # everything: metrics, the status API, the detail of the health check


# The REST routes' key: the rest of the path, whatever it holds. Not Bottle's <key:path>: its
# ".+?" stops at a newline (PUT /v1/keys/a%0Ab was a 404) and, the route's pattern ending in
# "$", which matches before a final newline, /v1/keys/a%0A was the key "a" (Schemathesis).
# Here, beside the table of roles keyed by rule; gateway/app.py routes by it.
KEY_RULE = "/v1/keys/<key:re:(?s:.+)>"
INCR_RULE = KEY_RULE + "/incr"  # POST only: no other route takes POST under /v1/keys/
# Locks by name, the same rule as keys. POST .../refresh is always the refresh of the lock
# named by what comes before it (routed first): a lock whose name ends in "/refresh" cannot be
# taken over REST (README, REST API).
LOCK_RULE = "/v1/locks/<name:re:(?s:.+)>"
LOCK_REFRESH_RULE = LOCK_RULE + "/refresh"

# The one table of what each route needs: (method, Bottle's rule) -> the least role. A route of
# the app that is not listed here needs ADMIN (tests/unit/test_auth.py checks that every route
# of make_app is listed, so a new route is a decision, not an accident). HEAD is GET's.
ROUTE_ROLES: dict[tuple[str, str], Role] = {
    # The status page's shell: a browser cannot send a bearer token from its address bar, and
    # the shell holds no data (its figures come from /v1/status, with the token the page is
    # given in its URL's fragment: docs/operations.md).
    ("GET", "/"): Role.PUBLIC,
    ("GET", "/get"): Role.READ,
    ("GET", "/all"): Role.READ,
    ("GET", "/set"): Role.WRITE,  # a GET that changes data, as the seed's API was
    ("GET", "/delete"): Role.WRITE,
    ("GET", "/v1/keys"): Role.READ,
    ("GET", "/v1/watch"): Role.READ,  # change events, as readable as the keys
    ("GET", KEY_RULE): Role.READ,
    ("PUT", KEY_RULE): Role.WRITE,
    ("DELETE", KEY_RULE): Role.WRITE,
    ("PATCH", KEY_RULE): Role.WRITE,  # a new deadline
    ("POST", INCR_RULE): Role.WRITE,
    # Locks change data (a lock record, its token): all write, taking one included. GET of a
    # key with ?touch= is a write on a read route: the route itself asks for WRITE then
    # (require_role below).
    ("POST", LOCK_RULE): Role.WRITE,
    ("POST", LOCK_REFRESH_RULE): Role.WRITE,
    ("DELETE", LOCK_RULE): Role.WRITE,
    ("GET", "/v1/health"): Role.READ,  # its detail (shards, owners) for admin only
    ("GET", "/v1/openapi.json"): Role.READ,
    ("GET", "/v1/status"): Role.ADMIN,
    ("GET", "/metrics"): Role.ADMIN,
}


def role_of_route(method: str, rule: str) -> Role:
    """The least role a route needs; ADMIN for a route not in :data:`ROUTE_ROLES`."""
    if method == "HEAD":
        method = "GET"
    return ROUTE_ROLES.get((method, rule), Role.ADMIN)


class TokensFileError(ValueError):
    """A tokens file the gateway refuses to start with; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a request is refused: its status, message and headers."""

    status: int
    message: str
    headers: dict[str, str]


_CHALLENGE = 'Bearer realm="zkv"'
MISSING = Denial(
    401,
    "this gateway needs a token: send Authorization: Bearer <token>",
    {"WWW-Authenticate": _CHALLENGE},
)
INVALID = Denial(
    401,
    "the token is not valid here",
    {"WWW-Authenticate": _CHALLENGE + ', error="invalid_token"'},
)


class Tokens:
    """The tokens of a tokens file, kept only as keyed digests (see the module's docstring).

    Args:
        entries: ``(role, token)`` pairs.
        key: the HMAC key; random when not given (tests pass one to be reproducible).
    """

    def __init__(self, entries: Iterable[tuple[Role, str]], key: bytes | None = None) -> None:
        self._key = os.urandom(32) if key is None else key
        self._roles: dict[bytes, tuple[bytes, Role]] = {}
        for role, token in entries:
            digest = self._digest(token.encode("ascii"))
            self._roles[digest] = (digest, role)

    def __len__(self) -> int:
        return len(self._roles)

    def _digest(self, token: bytes) -> bytes:
        return hmac.digest(self._key, token, "sha256")

    def role(self, authorization: str | bytes | None) -> Role | Denial:
        """The role of an ``Authorization`` header's bearer token, or why it has none.

        Args:
            authorization: the header's value (latin-1 text as WSGI gives it, or bytes), None
                when the request has none.
        """
        if authorization is None:
            return MISSING
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        match = _BEARER.fullmatch(authorization)
        if match is None:
            return MISSING if not authorization.strip() else INVALID
        digest = self._digest(match.group(1).encode("ascii"))
        found = self._roles.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return INVALID
        return found[1]

    def check(self, authorization: str | bytes | None, needed: Role) -> Role | Denial:
        """The role of the header's token if it may do what needs ``needed``, else why not."""
        role = self.role(authorization)
        if isinstance(role, Denial) or role >= needed:
            return role
        return Denial(
            403,
            f"this token's role ({role.name.lower()}) may not do this: it needs "
            f"{needed.name.lower()}",
            {"WWW-Authenticate": _CHALLENGE + ', error="insufficient_scope"'},
        )


def load_tokens(path: str) -> Tokens:
    """Read a tokens file: one ``ROLE TOKEN`` per line, blank lines and ``#`` comments allowed.

    Raises:
        TokensFileError: unreadable, accessible to anyone but its owner (its group or others:
            ``chmod 600``), too large, empty of tokens, or a line that is not ``ROLE TOKEN``
            with a known role and a token of 16 to 4096 characters of RFC 6750's alphabet
            (``A-Z a-z 0-9 - . _ ~ + /``, then ``=`` padding), or a token given twice. The
            message names the file and the line (by number, never its token).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
            raise TokensFileError(f"tokens file {path}: not a regular file")
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_mode & 0o077:
                raise TokensFileError(
                    f"tokens file {path}: its mode {stat.S_IMODE(info.st_mode):04o} lets its "
                    "group or others read or change it; make it private to the gateway's user "
                    f"(chmod 600 {path})"
                )
            data = file.read(MAX_TOKENS_FILE_BYTES + 1)
    except OSError as exc:
        raise TokensFileError(f"tokens file {path}: cannot read it: {exc.strerror}") from None
    if len(data) > MAX_TOKENS_FILE_BYTES:
        raise TokensFileError(f"tokens file {path}: larger than {MAX_TOKENS_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TokensFileError(f"tokens file {path}, line {line}: not UTF-8 text") from None
    entries: list[tuple[Role, str]] = []
    seen: dict[str, int] = {}
    roles = {role.name.lower(): role for role in Role}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"tokens file {path}, line {number}"
        if len(fields) != 2:
            raise TokensFileError(
                f"{where}: expected 'ROLE TOKEN' (two fields), got {len(fields)} fields"
            )
        name, token = fields
        role = roles.get(name.lower())
        if role is None:
            raise TokensFileError(
                f"{where}: unknown role {name[:20]!r}; roles are {', '.join(roles)}"
            )
        if not _TOKEN.fullmatch(token) or not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise TokensFileError(
                f"{where}: a token is {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters of "
                "A-Z a-z 0-9 - . _ ~ + / (then = padding), as RFC 6750 allows in a header; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if token in seen:
            raise TokensFileError(f"{where}: the same token as line {seen[token]}")
        seen[token] = number
        entries.append((role, token))
        if len(entries) > MAX_TOKENS:
            raise TokensFileError(f"{where}: more than {MAX_TOKENS} tokens")
    if not entries:
        raise TokensFileError(f"tokens file {path}: no tokens in it (every request would be 401)")
    return Tokens(entries)


class AuthPlugin:
    """Checks each route's request against :data:`ROUTE_ROLES` before the route runs.

    Installed outside the zkv client plugin and inside the error mapping, so a refused request
    never makes a client nor reads its body, and its 401/403 is written as every error is
    (JSON, gateway/app.py). The role found is left in the environ (:data:`ROLE_ENVIRON`) for
    routes that answer by role (the health check's detail).
    """

    name = "zkv_auth"
    api = 2

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def apply(self, callback: Callable[..., Any], route: Route) -> Callable[..., Any]:
        """Wrap the route's callback in the check of the role its rule and method need."""
        needed = role_of_route(route.method, route.rule)
        tokens = self.tokens
        if needed is Role.PUBLIC:
            return callback

        @functools.wraps(callback)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            environ = request.environ
            role = tokens.check(environ.get("HTTP_AUTHORIZATION"), needed)
            if isinstance(role, Denial):
                raise HTTPError(role.status, role.message, headers=role.headers)
            environ[ROLE_ENVIRON] = role
            return callback(*args, **kwargs)

        return wrapper


def require_role(environ: dict[str, Any], needed: Role) -> None:
    """Refuse (403) a request whose token's role, checked by :class:`AuthPlugin` against its
    route's, is below ``needed``: for what one route does only with some parameters (GET of a
    key with ``?touch=`` moves its deadline: a write). Without tokens, everyone may.

    Raises:
        HTTPError: 403, as :meth:`Tokens.check` words it.
    """
    role = environ.get(ROLE_ENVIRON)
    if role is None or role >= needed:
        return
    raise HTTPError(
        403,
        f"this token's role ({role.name.lower()}) may not do this: it needs {needed.name.lower()}",
        headers={"WWW-Authenticate": _CHALLENGE + ', error="insufficient_scope"'},
    )


def is_admin(environ: dict[str, Any]) -> bool:
    """Whether the request may see everything: its token is admin, or there are no tokens."""
    role = environ.get(ROLE_ENVIRON)
    return role is None or role >= Role.ADMIN
