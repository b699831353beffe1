"""The HTTP gateway: a Bottle app that turns HTTP requests into zkv client requests.

Two APIs share one app:

* the seed API (``/set``, ``/get``, ``/delete``, ``/all``), kept exactly as the original project
  answered it, including its ``200 {"error": "Data not found"}`` for a missing key;
* the REST API under ``/v1`` for programs: values are raw bytes in request and response bodies,
  keys are the rest of the path (``/`` included), and failures have proper status codes.

How a request flows: Bottle matches the route; :class:`ClientPlugin` hands the route this
thread's zkv client; the route validates its input and calls the client; :class:`ErrorPlugin`
turns whatever it raised into an :class:`bottle.HTTPError` through :func:`http_error`, the one
table of exception -> status (:func:`failure`); and :func:`render_error` writes every error
response, Bottle's own 404/405/500 included, as ``{"error": "..."}`` JSON.

The seed routes read their parameters and write their answers through :class:`SeedApi`, which
the gateway's fast lane (gateway/fastlane.py) shares: it answers plain ``/get``, ``/set`` and
``/delete`` without Bottle, and leaves everything else to this app.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from typing import Any, Protocol
from urllib.parse import quote, unquote, unquote_to_bytes

from bottle import (
    Bottle,
    HTTPError,
    HTTPResponse,
    JSONPlugin,
    PluginError,
    Route,
    request,
    response,
)
from gunicorn.http import errors as gunicorn_errors

from gateway import metrics, page
from gateway.auth import (
    AUTH_KEY,
    INCR_RULE,
    KEY_RULE,
    LOCK_REFRESH_RULE,
    LOCK_RULE,
    AuthPlugin,
    Role,
    Tokens,
    is_admin,
    require_role,
)
from gateway.watch import Watches, parse_event_id
from zkv import defaults
from zkv.calls import Lock
from zkv.client import ALL_PAGE_KEYS, Item, NotFound
from zkv.errors import (
    Busy,
    Conflict,
    PreconditionFailed,
    RequestError,
    StorageFull,
    Timeout,
    Unavailable,
    ZkvError,
)
from zkv.logs import LogLimiter
from zkv.protocol import MAX_LOCK_WAIT_MS, MAX_TTL_MS, Entry
from zkv.watch import events_endpoints

log = logging.getLogger(__name__)
# Every line a request can cause goes through this: at most BURST (5) lines of one kind per
# WINDOW_S (10 s) and process, then a count of those suppressed (zkv/logs.py), so a flood of
# failing requests cannot write unbounded logs. Kinds are fixed strings, never request input.
limited = LogLimiter(log)

JSON_TYPE = "application/json"
BODY_CHUNK_BYTES = 64 * 1024  # read request bodies in pieces this big, to stop at the limit
SHOWN_INPUT_CHARS = 40  # at most this much of a bad parameter is echoed in an error message

# Numbers in parameters: whatever Python's float() reads ("1e3", " 5", "1_000", ".5", Unicode
# digits), as the seed's Flask app took them, provided the value is finite and in range. The
# common plain forms take a regex instead of float() + Decimal (the /set hot path).
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_LIMIT = re.compile(r"[0-9]+")

# Sorted keys, as the seed's Flask jsonify wrote them. One encoder for every response: the same
# text as json.dumps(obj, sort_keys=True), without building an encoder per call.
to_json = json.JSONEncoder(sort_keys=True).encode

# GET /all reads the store in pages (per shard call) of at most SEED_ALL_PAGE_KEYS keys: the
# first of SEED_ALL_FIRST_PAGE_KEYS, the next sized to about SEED_ALL_PAGE_BYTES of keys and
# values by what the pages so far weighed. It answers 413 once its JSON passes
# SEED_ALL_MAX_BYTES as rendered (counted while it is built: a byte that is not UTF-8 is the
# 6 bytes of "\ufffd", so raw bytes undercount up to 6x), and a gateway process builds or sends
# at most SEED_ALL_CONCURRENT at once (more: 503, Retry-After). What /all holds per process is
# then about SEED_ALL_CONCURRENT x (2 x SEED_ALL_MAX_BYTES + a page): 2 x 80 MiB.
SEED_ALL_PAGE_KEYS = 1000
SEED_ALL_FIRST_PAGE_KEYS = 16
SEED_ALL_PAGE_BYTES = 4 * 1024 * 1024
SEED_ALL_MAX_BYTES = 32 * 1024 * 1024
SEED_ALL_CONCURRENT = 2

SEED_KEY = "zkv.seed"
"""Where :func:`make_app` leaves its :class:`SeedApi` in the app's config, for the fast lane."""


OPENAPI_PATH = "/v1/openapi.json"
"""Where the app serves gateway/openapi.json, the OpenAPI 3.1 description of every route
(tests/unit/test_openapi.py checks it against the routes both ways)."""

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ClientLike(Protocol):
    """What the gateway needs of a zkv client; :class:`zkv.client.Client` is one."""

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> int | None:
        """Store a value; returns its deadline in Unix milliseconds, None for never."""
        ...

    def get(self, key: bytes | str, touch_s: float | None = None) -> Item:
        """The value, deadline and version of a key; raises NotFound when missing or expired.
        With ``touch_s``, its deadline moves to that many seconds from now, atomically."""
        ...

    def put(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> Item:
        """Store a value under conditions (PreconditionFailed, Conflict); the new item."""
        ...

    def delete(
        self,
        key: bytes | str,
        if_version: int | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> bool:
        """Remove a key; False when there was no live key."""
        ...

    def incr_item(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> tuple[int, int, int | None]:
        """Add ``by`` to a counter: ``(value, version, deadline_ms)``; Conflict if refused."""
        ...

    def expire(self, key: bytes | str, ttl_s: float, fence: tuple[bytes, int] | None = None) -> int:
        """A new deadline ``ttl_s`` from now, returned; NotFound when missing, Conflict when
        the fence is stale."""
        ...

    def persist(self, key: bytes | str, fence: tuple[bytes, int] | None = None) -> int:
        """No deadline any more; the new version. NotFound when missing, Conflict when the
        fence is stale."""
        ...

    def acquire_lock(self, name: bytes | str, ttl_s: float, wait_s: float = 0) -> Lock:
        """Take a lock (``.token``, ``.expires_at_ms``); Conflict when held past the wait."""
        ...

    def refresh_lock(self, name: bytes | str, token: int, ttl_s: float) -> int:
        """Extend a lock held with ``token``: its new expiry; Conflict when not current."""
        ...

    def release_lock(self, name: bytes | str, token: int) -> None:
        """Release a lock held with ``token``; Conflict when not current."""
        ...

    def all(self, after: bytes | str = b"", limit: int = 0, keys_only: bool = False) -> list[Entry]:
        """Live entries after ``after``, sorted; with a limit, the smallest ``limit`` keys."""
        ...

    def pages(
        self,
        after: bytes | str = b"",
        keys_only: bool = False,
        limit: int = 0,
        page_keys: int = ALL_PAGE_KEYS,
    ) -> Iterator[list[Entry]]:
        """The same entries in pages of at most ``page_keys`` (zkv.client.paged)."""
        ...

    def stats(self) -> dict[str, Any]:
        """The cluster's figures (STATS): the broker's and each worker's last report."""
        ...

    def ping(self) -> dict[str, Any]:
        """The broker's view of the cluster."""
        ...


class BadRequest(ValueError):
    """Input the caller has to fix (HTTP 400). The message names the parameter at fault."""


class TooLarge(BadRequest):
    """A key or value over the configured limit (HTTP 413 in the REST API)."""


class LengthRequired(BadRequest):
    """A chunked body this server cannot read without its length (HTTP 411)."""


# The one place where exceptions become statuses; the first matching class wins, so subclasses
# come before their bases. Anything not listed is a bug: 500, logged with its location.
_STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (NotFound, 404),
    # Refused conditions: definite, nothing changed (never a 500).
    (PreconditionFailed, 412),  # If-Match / If-None-Match: * (the store's NX/XX/IF_VERSION)
    (Conflict, 409),  # a stale fence or lock token, a held lock, an INCR of a non-integer
    (TooLarge, 413),
    (LengthRequired, 411),
    (BadRequest, 400),
    (RequestError, 400),
    # A body gunicorn's parser could not read (the gthread worker class: a malformed chunk
    # size or terminator, a client gone mid-body): the client's fault, never a 500.
    (gunicorn_errors.ParseException, 400),
    (gunicorn_errors.NoMoreData, 400),
    (Busy, 503),  # before Unavailable, its base: its own message
    (Unavailable, 503),
    (StorageFull, 507),
    (Timeout, 504),
)
BUSY_RETRY_AFTER_S = 1  # the Retry-After of every 503, a BUSY one included


def http_error(exc: Exception) -> HTTPError:
    """The HTTP error that answers ``exc``, raised while serving the current request."""
    status, message, headers = failure(exc, request.method, request.path)
    return HTTPError(status, message, exc, headers=headers)


def failure(exc: Exception, method: str, path: str) -> tuple[int, str, dict[str, str]]:
    """``(status, message, headers)`` of the error answer to ``exc``; 5xx are logged.

    Shared by :func:`http_error` and the fast lane (gateway/fastlane.py).

    Args:
        exc: what a route raised.
        method, path: the request's, for the log line.
    """
    status = next((status for kind, status in _STATUS_OF if isinstance(exc, kind)), None)
    if status is None:
        # Not a traceback (a multi-line log event), but enough to find the line that failed.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
        limited.error(
            "500",
            "%s %r -> 500: unexpected %s at %s: %s",
            method,
            path,
            type(exc).__name__,
            where,
            exc,
        )
        return 500, "internal server error", {}
    # KeyError's str() is the repr of the key; the message of a missing key is always the same.
    if isinstance(exc, NotFound):
        message = "key not found"
    elif isinstance(exc, Busy):  # shed by the cluster after the client's own retries
        message = f"the cluster is busy, retry later (not applied): {exc}"
    elif isinstance(exc, StorageFull):
        message = f"the shard's disk is full, the write was not applied: {exc}"
    else:
        message = str(exc)
    headers: dict[str, str] = {}
    if status >= 500:
        # One kind per status of _STATUS_OF: a handful, never request input.
        limited.warning(str(status), "%s %r -> %d: %s", method, path, status, message)
        if status == 503:
            headers["Retry-After"] = str(BUSY_RETRY_AFTER_S)
    return status, message, headers


def render_error(error: HTTPError) -> str:
    """Body of every error response: JSON, whatever raised it, never HTML nor a traceback."""
    response.content_type = JSON_TYPE
    message = error.body if isinstance(error.body, str) and error.body else error.status_line
    return to_json({"error": message})


class ErrorPlugin:
    """Maps every exception a route raises to a JSON error response, via :func:`http_error`."""

    name = "zkv_errors"
    api = 2

    def apply(self, callback: Callable[..., Any], route: Route) -> Callable[..., Any]:
        """Wrap ``callback`` so that no exception leaves it except as an HTTP error."""

        @functools.wraps(callback)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except HTTPResponse:
                raise
            except Exception as exc:
                raise http_error(exc) from exc

        return wrapper


class ClientPlugin:
    """Hands each route that takes a ``kv`` argument this thread's zkv client.

    Modelled on bottle_sqlite: routes that do not name the keyword are left untouched. Clients
    are per thread because ZeroMQ sockets are not thread-safe, and created on first use, so
    that each forked server process, and each loop in it, opens its own socket after the fork.

    Args:
        client_factory: makes a new client; called once per thread that serves a request.
        keyword: the route argument that receives the client.
    """

    name = "zkv"
    api = 2

    def __init__(self, client_factory: Callable[[], ClientLike], keyword: str = "kv") -> None:
        self.client_factory = client_factory
        self.keyword = keyword
        self._local = threading.local()

    def setup(self, app: Bottle) -> None:
        """Refuse a second plugin that would fill the same route argument."""
        for other in app.plugins:
            if isinstance(other, ClientPlugin) and other.keyword == self.keyword:
                raise PluginError(f"another zkv plugin already fills {self.keyword!r}")

    def apply(self, callback: Callable[..., Any], route: Route) -> Callable[..., Any]:
        """Pass the client to routes whose signature asks for it."""
        # route.callback is the function as the route was declared; Bottle's
        # get_undecorated_callback() guesses through closures and can pick a captured callable.
        if self.keyword not in inspect.signature(route.callback).parameters:
            return callback

        @functools.wraps(callback)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[self.keyword] = self.client()
            return callback(*args, **kwargs)

        return wrapper

    def current(self) -> ClientLike | None:
        """This thread's client if it has made one (to close it), else None."""
        return getattr(self._local, "client", None)

    def client(self) -> ClientLike:
        """This thread's client, made now if it has none yet."""
        client: ClientLike | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.client_factory()
        return client


# --- input ------------------------------------------------------------------------------------


def _shown(text: str) -> str:
    """``text`` quoted for an error message, cut short: a message must not echo a megabyte."""
    if len(text) > SHOWN_INPUT_CHARS:
        text = text[:SHOWN_INPUT_CHARS] + "..."
    return repr(text)


class Query:
    """A query string's parameters, read exactly as Bottle's ``request.query`` reads them.

    For the fast lane (gateway/fastlane.py), which answers the seed routes without a Bottle
    request: the same split on ``&``, ``+`` as space, %-decoding to latin-1 text (one character
    per byte), empty pairs skipped and a missing ``=`` read as an empty value, so that
    :func:`optional_param` gives the same answer, or the same error, through either path
    (tests/unit/test_fastlane.py compares them on fuzzed query strings).
    """

    __slots__ = ("_values",)

    def __init__(self, query_string: str) -> None:
        values: dict[str, list[str]] = {}
        for pair in query_string.split("&"):
            if not pair:
                continue
            name, _, value = pair.partition("=")
            name = unquote(name.replace("+", " "), encoding="latin-1")
            value = unquote(value.replace("+", " "), encoding="latin-1")
            found = values.get(name)
            if found is None:
                values[name] = [value]
            else:
                found.append(value)
        self._values = values

    def getall(self, name: str) -> list[str]:
        """Every value given for ``name``, in order; empty if none."""
        return self._values.get(name, [])


class _Params(Protocol):
    def getall(self, name: str) -> list[str]: ...


def optional_param(name: str, query: _Params | None = None) -> str | None:
    """The query parameter ``name`` decoded as UTF-8, None if absent; given twice is an error.

    Bottle keeps query strings as latin-1 text (one character per byte, as WSGI hands them
    over), so re-encoding gives back the bytes; decoding strictly refuses invalid UTF-8 instead
    of silently mangling a key.

    Args:
        name: the parameter.
        query: where to read it: Bottle's ``request.query`` when None, else a :class:`Query`.
    """
    values = (request.query if query is None else query).getall(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"parameter {name!r} given {len(values)} times, expected once")
    try:
        return values[0].encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise BadRequest(f"parameter {name!r} is not valid UTF-8") from None


def required_param(name: str, query: _Params | None = None) -> str:
    """The query parameter ``name`` as :func:`optional_param` reads it; missing is an error."""
    value = optional_param(name, query)
    if value is None:
        raise BadRequest(f"missing parameter {name!r}")
    return value


def parse_ttl_ms(name: str, text: str) -> int:
    """A time to live given in seconds, as whole milliseconds (rounded half up).

    Any number Python's ``float()`` reads is accepted; the arithmetic is Decimal, so "0.1" is
    exactly 100 ms and huge inputs cannot overflow a float.

    Raises:
        BadRequest: not a number, not finite, below 1 ms, or above MAX_TTL_MS.
    """
    ttl_ms = _number(name, text, "a positive number of seconds") * 1000
    if ttl_ms > MAX_TTL_MS:
        raise BadRequest(
            f"parameter {name!r} must be at most {MAX_TTL_MS // 1000} seconds, got {_shown(text)}"
        )
    if ttl_ms < 0:
        raise BadRequest(
            f"parameter {name!r} must be a positive number of seconds, got {_shown(text)}"
        )
    rounded = int(ttl_ms.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if rounded < 1:
        raise BadRequest(f"parameter {name!r} must be at least 0.001 seconds, got {_shown(text)}")
    return rounded


def _number(name: str, text: str, expected: str) -> Decimal:
    """``text`` as an exact Decimal, if ``float()`` reads it as a finite number.

    float() decides what is a number (Decimal alone is more liberal: "1__0", "1_"), Decimal
    gives its exact value. A value beyond a float's range ("1e400") is not finite.

    Raises:
        BadRequest: not a number (``expected`` says what was), or NaN or infinite.
    """
    if _SECONDS.fullmatch(text):
        return Decimal(text)
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"parameter {name!r} must be {expected}, got {_shown(text)}") from None
    if not math.isfinite(value):
        raise BadRequest(
            f"parameter {name!r} must be a finite number, got {_shown(text)}"
            + (" (out of range)" if "inf" not in text.lower() and value == value else "")
        )
    return Decimal(text.strip())


def parse_limit(text: str | None) -> int:
    """The page size of a listing: LIST_LIMIT when not given, at most LIST_LIMIT_MAX.

    Written as any number float() reads ("1e2" is 100), but a whole one.
    """
    if text is None:
        return defaults.LIST_LIMIT
    expected = f"an integer from 1 to {defaults.LIST_LIMIT_MAX}"
    if _LIMIT.fullmatch(text) and len(text) < 10:
        limit = Decimal(int(text))
    else:
        limit = _number("limit", text, expected)
    if limit != limit.to_integral_value() or not 1 <= limit <= defaults.LIST_LIMIT_MAX:
        raise BadRequest(f"parameter 'limit' must be {expected}, got {_shown(text)}")
    return int(limit)


# --- the parameters and headers of issue 12 (README.md, REST API) --------------------------------

I64_MIN, I64_MAX = -(2**63), 2**63 - 1  # what ?by= may be: the store's counters are signed 64 bit
U64_MAX = 2**64 - 1  # versions and lock tokens are unsigned 64 bit
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")  # by: decimal, an optional sign, nothing else
_TOKEN_NUMBER = re.compile(r"[0-9]{1,20}")  # token, fence: plain decimal digits
# One entity-tag of RFC 9110 (section 8.8.3): an optional W/ then a quoted opaque-tag, and
# around it the list syntax's optional whitespace and commas (empty list elements allowed).
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*(?:,|$)')
_LIST_GAP = re.compile(r"[ \t,]*")
_CANONICAL_VERSION = re.compile(r"0|[1-9][0-9]{0,19}")  # how our ETags write a version


def parse_by(text: str | None) -> int:
    """The ``by`` of an incr: 1 when not given, else a signed 64-bit decimal integer.

    Only ``[+-]digits`` (at most 20 digits): "1e3", "1.0" and spaces are refused, since an
    increment read loosely would silently count wrong.

    Raises:
        BadRequest: not such an integer, or outside -2**63 .. 2**63-1.
    """
    if text is None:
        return 1
    if not _INTEGER.fullmatch(text) or not I64_MIN <= int(text) <= I64_MAX:
        raise BadRequest(
            f"parameter 'by' must be an integer from {I64_MIN} to {I64_MAX}, got {_shown(text)}"
        )
    return int(text)


def parse_token(name: str, text: str) -> int:
    """A lock token (``token``, the token of a ``fence``): decimal digits, below 2**64.

    Raises:
        BadRequest: naming ``name``.
    """
    if not _TOKEN_NUMBER.fullmatch(text) or int(text) > U64_MAX:
        raise BadRequest(
            f"parameter {name!r} must be a lock token, an integer from 1 to {U64_MAX}, "
            f"got {_shown(text)}"
        )
    return int(text)


def parse_wait_ms(text: str | None) -> int:
    """The ``wait`` of a lock in whole milliseconds: 0 when not given, at most 300 s.

    Seconds as ``ttl`` reads them (any number float() reads), but 0 is allowed.

    Raises:
        BadRequest: not a number, negative, or above MAX_LOCK_WAIT_MS.
    """
    if text is None:
        return 0
    wait = _number("wait", text, "a number of seconds from 0 to 300") * 1000
    if not 0 <= wait <= MAX_LOCK_WAIT_MS:
        raise BadRequest(
            f"parameter 'wait' must be from 0 to {MAX_LOCK_WAIT_MS // 1000} seconds, "
            f"got {_shown(text)}"
        )
    return int(wait.quantize(Decimal(1), rounding=ROUND_HALF_UP))


ANY = "*"
"""What :func:`parse_etags` gives for ``*``."""
_CONDITIONS = (("HTTP_IF_MATCH", "If-Match"), ("HTTP_IF_NONE_MATCH", "If-None-Match"))


def parse_etags(header: str, text: str) -> str | list[tuple[bool, str]]:
    """A conditional header's value: :data:`ANY` for ``*``, else its entity-tags in order,
    each ``(weak, opaque text)``.

    Our ETags are versions, ``"<decimal>"``: a tag whose text is not digits cannot have come
    from this gateway and is refused rather than compared (an If-Match that could never match
    by mistake, e.g. a quoted key, is a client bug worth a 400, not a silent 412).

    Raises:
        BadRequest: naming ``header``: not ``*`` nor a list of quoted numbers (``"5"``,
            ``W/"5"``), or ``*`` inside a list.
    """
    if text.strip(" \t") == "*":
        return ANY
    tags: list[tuple[bool, str]] = []
    at = _gap_end(text, 0)
    while at < len(text):
        match = _ENTITY_TAG.match(text, at)
        if match is None or not match.group(2).isdigit() or not match.group(2).isascii():
            raise BadRequest(
                f"header {header!r} must be * or quoted versions as ETag gives them "
                f'(like "5"; a GET\'s If-None-Match may list several: "5", "7"), got {_shown(text)}'
            )
        tags.append((match.group(1) is not None, match.group(2)))
        at = _gap_end(text, match.end())
    if not tags:
        raise BadRequest(f"header {header!r} is empty: give * or a quoted version")
    return tags


def _gap_end(text: str, at: int) -> int:
    """Where the list syntax's whitespace and commas from ``at`` end."""
    gap = _LIST_GAP.match(text, at)
    return at if gap is None else gap.end()


def strong_versions(tags: list[tuple[bool, str]]) -> set[int]:
    """The versions an If-Match list can match: RFC 9110's strong comparison, under which a
    weak tag (``W/"5"``) matches nothing, nor does a number not written as our ETags write it
    (``"05"``, or one above 2**64 - 1)."""
    return {
        int(opaque)
        for weak, opaque in tags
        if not weak and _CANONICAL_VERSION.fullmatch(opaque) and int(opaque) <= U64_MAX
    }


def weakly_matches(tags: str | list[tuple[bool, str]], version: int) -> bool:
    """Whether If-None-Match's value matches a current version (RFC 9110's weak comparison:
    ``W/"5"`` and ``"5"`` both match version 5; ``*`` matches any)."""
    if isinstance(tags, str):  # ANY
        return True
    text = str(version)
    return any(opaque == text for _, opaque in tags)


def etag(version: int) -> str:
    """The strong ETag of a version: ``"<version>"``."""
    return f'"{version}"'


def parse_fence(text: str | None, max_name_bytes: int) -> tuple[bytes, int] | None:
    """``?fence=<lock>:<token>`` as ``(lock name, token)``; None when not given.

    Split at the last ``:``, so a lock name may hold colons; the token is decimal digits.

    Raises:
        BadRequest: not ``lock:token``, an empty or reserved (NUL-led) or too long name, or a
            token that is not an integer from 0 to 2**64 - 1.
    """
    if text is None:
        return None
    name, colon, token = text.rpartition(":")
    if not colon or not name:
        raise BadRequest(f"parameter 'fence' must be <lock>:<token>, got {_shown(text)}")
    name_bytes = name.encode()
    if name_bytes[:1] == b"\x00":
        raise BadRequest("parameter 'fence' names a reserved lock (starting with NUL)")
    if len(name_bytes) > max_name_bytes:
        raise BadRequest(
            f"parameter 'fence' names a lock of {len(name_bytes)} bytes, more than the limit "
            f"of {max_name_bytes} bytes"
        )
    return name_bytes, parse_token("fence", token)


def read_body(limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length is checked before reading anything. Bodies without one (chunked)
    are read in pieces and refused once past the limit; that needs a server that removes the
    chunk framing and marks the end of the input (``wsgi.input_terminated``), as gunicorn does.
    Bottle's ``request.body`` is not used: it would parse the chunk framing a second time.
    """
    environ = request.environ
    stream = environ["wsgi.input"]
    declared = environ.get("CONTENT_LENGTH", "")
    if declared:
        if not _LIMIT.fullmatch(declared):
            raise BadRequest(f"Content-Length must be a number of bytes, got {_shown(declared)}")
        length = int(declared)
        if length > limit:
            raise TooLarge(f"value is {length} bytes, more than the limit of {limit} bytes")
        return _read_up_to(stream, length)
    if environ.get("wsgi.input_terminated"):
        body = _read_up_to(stream, limit + 1)
        if len(body) > limit:
            raise TooLarge(f"value is more than the limit of {limit} bytes")
        return body
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise LengthRequired("this server cannot read chunked bodies: send a Content-Length")
    return b""


def _read_up_to(stream: Any, size: int) -> bytes:
    """At most ``size`` bytes of ``stream``, fewer only at its end."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        part = stream.read(min(remaining, BODY_CHUNK_BYTES))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


# --- output -----------------------------------------------------------------------------------


def http_date(unix_ms: int | None) -> str | None:
    """``Thu, 11 Jan 2024 21:09:21 GMT`` for a Unix time in milliseconds; None stays None.

    The text of ``email.utils.formatdate(unix_ms / 1000, usegmt=True)``, which drops the
    fraction of the second; made once per second and remembered, since most responses show
    this second (``current_time``) and the deadlines of the keys read most.
    """
    return None if unix_ms is None else _http_date_of_second(unix_ms // 1000)


@functools.lru_cache(maxsize=4096)
def _http_date_of_second(unix_s: int) -> str:
    t = time.gmtime(unix_s)
    return (
        f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _text(data: bytes) -> str:
    """Stored bytes shown as text; values set through the REST API need not be UTF-8."""
    return data.decode("utf-8", errors="replace")


# Keys in JSON (listings, /all). A key that is not valid UTF-8 (only the zkv library can store
# one) is shown with each invalid byte as a lone surrogate, U+DC80..U+DCFF, which the JSON text
# carries as an escape ("\udcff"): no valid UTF-8 key decodes to a lone surrogate, so two keys
# never show alike (U+FFFD, as values are shown, merged them). Python gets the bytes back with
# key.encode("utf-8", "surrogateescape").
_INVALID_BYTE = re.compile("[\udc80-\udcff]")


def _key_text(key: bytes) -> str:
    """A key shown in JSON: its UTF-8 text, invalid bytes as lone surrogates (see above)."""
    return key.decode("utf-8", errors="surrogateescape")


def cursor_of(key: bytes) -> str:
    """The ``next`` cursor of a listing page that ended at ``key``: its exact bytes as text.

    The key's UTF-8 text with ``%`` written ``%25`` and each invalid byte ``%XX``, so a cursor
    is the key itself for every UTF-8 key without ``%``, and :func:`key_of_cursor` inverts it
    exactly for any key (a cursor of U+FFFD for a byte above it made the same page come back
    forever).
    """
    text = _key_text(key).replace("%", "%25")
    return _INVALID_BYTE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}", text)


def key_of_cursor(cursor: str) -> bytes:
    """The key bytes a cursor made by :func:`cursor_of` stands for."""
    return unquote_to_bytes(cursor)


# --- the app ----------------------------------------------------------------------------------


class SeedApi:
    """What the seed routes read and answer, apart from Bottle.

    The Bottle routes of :func:`make_app` and the gateway's fast lane (gateway/fastlane.py)
    both go through this: the same parameters are accepted or refused with the same message,
    and the same outcome is written as the same JSON, whichever path served the request.

    Args:
        max_key_bytes: largest key accepted, in UTF-8 bytes.
        max_value_bytes: largest value accepted, in bytes.
        clock: Unix time in seconds, for ``current_time`` (tests fake it).
    """

    def __init__(
        self,
        max_key_bytes: int = defaults.MAX_KEY_BYTES,
        max_value_bytes: int = defaults.MAX_VALUE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        self.clock = clock

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def checked_key(self, key: str, too_large: type[BadRequest], what: str) -> str:
        """``key`` if it fits ``max_key_bytes``, else ``too_large`` naming ``what``; a key
        starting with NUL is refused (400): the store keeps its own records (locks, fences)
        under such keys (docs/protocol.md)."""
        if key[:1] == "\x00":
            raise BadRequest(f"{what} starts with NUL, which is reserved")
        size = len(key.encode())
        if size > self.max_key_bytes:
            raise too_large(
                f"{what} is {size} bytes, more than the limit of {self.max_key_bytes} bytes"
            )
        return key

    def key(self, query: _Params | None = None) -> str:
        """The ``key`` parameter of /get, /set and /delete.

        Raises:
            BadRequest: missing, given twice, empty, not UTF-8 or too long.
        """
        key = required_param("key", query)
        if not key:
            raise BadRequest("parameter 'key' must not be empty")
        return self.checked_key(key, BadRequest, "parameter 'key'")

    def set_params(self, query: _Params | None = None) -> tuple[str, str, bytes, int]:
        """``(key, value, value as UTF-8, ttl_ms)`` of a /set.

        Raises:
            BadRequest: a parameter missing, given twice, malformed or too large.
        """
        key = self.key(query)
        value = required_param("value", query)
        ttl_ms = parse_ttl_ms("timeout", required_param("timeout", query))
        value_bytes = value.encode()
        if len(value_bytes) > self.max_value_bytes:
            raise BadRequest(
                f"parameter 'value' is {len(value_bytes)} bytes, "
                f"more than the limit of {self.max_value_bytes} bytes"
            )
        return key, value, value_bytes, ttl_ms

    def got(self, item: Item | None) -> dict[str, Any]:
        """The answer of a /get: the item, or the seed's 200 for a missing key."""
        if item is None:
            return {"error": "Data not found"}
        return {
            "current_time": http_date(self.now_ms()),
            "time_out": http_date(item.deadline_ms),
            "value": _text(item.value),
        }

    @staticmethod
    def was_set(key: str, value: str, deadline_ms: int | None) -> dict[str, Any]:
        """The answer of a /set."""
        return {
            "key": key,
            "message": "Value set successfully",
            "timeout": http_date(deadline_ms),
            "value": value,
        }

    @staticmethod
    def deleted(found: bool) -> dict[str, Any]:
        """The answer of a /delete."""
        if found:
            return {"message": "Value deleted successfully"}
        return {"error": "Key not found"}


class _SentRelease:
    """A WSGI response body of one piece whose ``close()`` (called by the server once the
    response is sent) releases what the route held for it: a slot of /all."""

    def __init__(self, body: bytes, release: Callable[[], None]) -> None:
        self._body: bytes | None = body
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        body, self._body = self._body, None  # handed over once, not held here too
        if body is not None:
            yield body

    def close(self) -> None:
        release, self._release = self._release, None
        self._body = None
        if release is not None:
            release()


def _seed_all_json(kv: ClientLike) -> bytes:
    """The JSON of /all, as bytes, rendered an entry at a time and counted as it grows.

    Read in pages by cursor (each costs a shard O(log n + page), see the listing), sized by
    what the pages before weighed so that one holds about SEED_ALL_PAGE_BYTES. The answer is
    exactly ``to_json`` of the dict of entries, keys sorted (as the seed's Flask wrote it), but
    built from bytes: the whole dict, its text and its bytes were three copies (of up to 6x
    the data). Not a snapshot: a key is shown at most once, as it was when its page was read.

    Raises:
        TooLarge: the JSON would pass SEED_ALL_MAX_BYTES (the seed had no limit: 200 MiB of
            data took 722 MB here).
    """
    rendered: list[tuple[str, bytes]] = []
    size = 2  # the braces
    after = b""
    page = min(SEED_ALL_FIRST_PAGE_KEYS, SEED_ALL_PAGE_KEYS)
    raw_bytes = raw_entries = 0
    while True:
        # The store's next ``page`` keys: the first page of the client's pager, which halves
        # a page that a shard finds too large for one reply (zkv.client.paged).
        entries = next(iter(kv.pages(after=after, page_keys=page)), [])
        for entry in entries:
            key = _key_text(entry.key)
            item = (
                to_json(key)
                + ": "
                + to_json({"time_out": http_date(entry.deadline_ms), "value": _text(entry.value)})
            )
            # ASCII (to_json escapes the rest): a char is a byte; ", " before all but the first
            size += len(item) + (2 if rendered else 0)
            if size > SEED_ALL_MAX_BYTES:
                raise TooLarge(
                    f"/all answers at most {SEED_ALL_MAX_BYTES} bytes of JSON; this store "
                    "holds more: list it with GET /v1/keys"
                )
            rendered.append((key, item.encode("ascii")))
            raw_bytes += len(entry.key) + len(entry.value)
            raw_entries += 1
        if not entries:  # past the last key (a short page need not be the last: the pager
            break  # yields fewer keys when a shard found a page too large)
        after = entries[-1].key
        entries = []
        by_size = SEED_ALL_PAGE_BYTES * raw_entries // max(1, raw_bytes)
        page = max(1, min(SEED_ALL_PAGE_KEYS, by_size))
    rendered.sort(key=lambda pair: pair[0])
    body = b"{" + b", ".join(item for _, item in rendered) + b"}"
    return body


def openapi_document() -> bytes:
    """The OpenAPI description (gateway/openapi.json, package data), as served."""
    return resources.files("gateway").joinpath("openapi.json").read_bytes()


def make_app(
    client_factory: Callable[[], ClientLike],
    max_key_bytes: int = defaults.MAX_KEY_BYTES,
    max_value_bytes: int = defaults.MAX_VALUE_BYTES,
    clock: Callable[[], float] = time.time,
    tokens: Tokens | None = None,
    http_stats: metrics.HttpStats | None = None,
    watches: Watches | None = None,
) -> Bottle:
    """The gateway's WSGI app.

    Args:
        client_factory: makes a zkv client; called lazily, once per serving thread.
        max_key_bytes: largest key accepted, in UTF-8 bytes.
        max_value_bytes: largest value accepted, in bytes.
        clock: Unix time in seconds, for ``current_time`` and remaining TTLs (tests fake it).
        tokens: who may do what (gateway/auth.py); None serves everyone.
        http_stats: the gateway's HTTP counts, shared by its processes (gateway/metrics.py);
            a private one if None.
        watches: where /v1/watch gets its events (gateway/watch.py); None: the broker's
            events endpoint from $ZKV_EVENTS (default tcp://127.0.0.1:5557), no CURVE.
    """
    stats = metrics.HttpStats() if http_stats is None else http_stats
    app = Bottle()
    # Plugins apply in reverse order of installation: the client is innermost, the error
    # mapping outermost, so a failing client factory or JSON encoding is mapped too; the
    # check of the token comes before anything else a route does.
    app.uninstall("json")
    app.install(ErrorPlugin())
    app.config[AUTH_KEY] = tokens
    if tokens is not None:
        app.install(AuthPlugin(tokens))
    app.install(JSONPlugin(json_dumps=to_json))
    app.install(ClientPlugin(client_factory))
    for status in range(400, 600):
        app.error(status)(render_error)
    seed = app.config[SEED_KEY] = SeedApi(max_key_bytes, max_value_bytes, clock)
    now_ms = seed.now_ms

    @app.hook("before_request")
    def refuse_undecodable_key() -> None:
        # REST keys are UTF-8 text (they come back as JSON strings). Bottle decodes the path
        # dropping invalid bytes before it routes, so /v1/keys/%FF would be routed as
        # /v1/keys/ and answered 404: refuse it here, naming the key as it was sent.
        raw: str = request.environ["bottle.raw_path"]
        for prefix, what in (("/v1/keys/", "key"), ("/v1/locks/", "lock name")):
            if raw.startswith(prefix):
                try:
                    raw.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    sent = quote(raw[len(prefix) :].encode("latin-1"), safe="/")
                    raise HTTPError(
                        400, f"the {what} in the path is not valid UTF-8: {sent!r}"
                    ) from None

    def path_key(key: str, what: str = "key") -> str:
        # Bottle decodes the path as UTF-8 but drops invalid bytes silently ("a%FFb" would
        # become the key "ab"), so the raw path is checked first.
        try:
            request.environ["bottle.raw_path"].encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise BadRequest(f"the {what} in the path is not valid UTF-8") from None
        return seed.checked_key(key, TooLarge, what)

    def ttl_s(ttl_ms: int | None) -> float | None:
        # The client takes seconds and rounds back to milliseconds; exact for every valid TTL.
        return None if ttl_ms is None else ttl_ms / 1000

    # --- seed API: every answer, even a missing key, is a 200 with these exact strings ---

    @app.get("/set")
    def seed_set(kv: ClientLike) -> dict[str, Any]:
        key, value, value_bytes, ttl_ms = seed.set_params()
        return seed.was_set(key, value, kv.set(key, value_bytes, ttl_s=ttl_s(ttl_ms)))

    @app.get("/get")
    def seed_get(kv: ClientLike) -> dict[str, Any]:
        key = seed.key()
        try:
            item = kv.get(key)
        except NotFound:
            item = None
        return seed.got(item)

    @app.get("/delete")
    def seed_delete(kv: ClientLike) -> dict[str, Any]:
        return seed.deleted(kv.delete(seed.key()))

    all_slots = threading.BoundedSemaphore(SEED_ALL_CONCURRENT)

    @app.get("/all")
    def seed_all(kv: ClientLike) -> Any:
        # A slot per /all being built or sent: its answer is up to SEED_ALL_MAX_BYTES, and
        # clients that never read theirs would otherwise pile them up (8 unread /all took a
        # process to 2.2 GB). The slot is let go when the server has sent the answer (WSGI
        # close(), see _SentRelease), or at once if building it fails.
        if not all_slots.acquire(blocking=False):
            raise HTTPError(
                503,
                f"busy: this gateway process serves at most {SEED_ALL_CONCURRENT} /all at once, "
                "retry later",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
            )
        try:
            body = _seed_all_json(kv)
        except BaseException:
            all_slots.release()
            raise
        response.content_type = JSON_TYPE
        response.content_length = len(body)
        return _SentRelease(body, all_slots.release)

    # --- REST API -----------------------------------------------------------------------

    # Conditional requests (RFC 9110, section 13). A key's ETag is its version, "<n>" (strong:
    # the bytes stored are the bytes sent). The store checks a condition atomically with the
    # write (SET NX/XX/IF_VERSION, DEL IF_VERSION: docs/protocol.md), so a gateway never reads
    # first. What is accepted (README.md, REST API): If-Match: * or a list of quoted versions,
    # of which the store can check ONE (more distinct strong ones: 400); weak tags never match
    # (strong comparison), nor does a number written otherwise than our ETags ("05"). On PUT,
    # If-None-Match: * only (write if absent). GET compares after its read: If-None-Match ->
    # 304, If-Match -> 412. Every other route refuses both headers (400) rather than ignore
    # them, the seed routes excepted (they stay as the seed was).

    def if_match() -> tuple[bool, int | None] | None:
        """None without If-Match; else ``(exists, version)``: ``(True, None)`` for ``*``,
        ``(True, n)`` for one strong version. A list that can match nothing is 412 at once."""
        text = request.environ.get("HTTP_IF_MATCH")
        if text is None:
            return None
        tags = parse_etags("If-Match", text)
        if isinstance(tags, str):  # ANY
            return True, None
        versions = strong_versions(tags)
        if not versions:
            raise PreconditionFailed(
                "If-Match holds no strong version (weak W/ tags never match): nothing changed"
            )
        if len(versions) > 1:
            raise BadRequest(
                "header 'If-Match' lists several versions; the store checks one: send one"
            )
        return True, versions.pop()

    def if_none_match_star(method: str) -> bool:
        """Whether a write has If-None-Match: * (write only if absent); any other value is
        400: the store cannot check 'unless the version is n' atomically."""
        text = request.environ.get("HTTP_IF_NONE_MATCH")
        if text is None:
            return False
        if method == "PUT" and parse_etags("If-None-Match", text) is ANY:
            return True
        raise BadRequest(
            "header 'If-None-Match' is only honoured as If-None-Match: * on PUT"
            if method == "PUT"
            else f"header 'If-None-Match' is not honoured on {method}: leave it out"
        )

    def no_conditions(method: str) -> None:
        """Refuse If-Match / If-None-Match on a route that cannot honour them (400)."""
        for header, name in _CONDITIONS:
            if header in request.environ:
                raise BadRequest(f"header {name!r} is not honoured on {method} here: leave it out")

    def fence_param() -> tuple[bytes, int] | None:
        return parse_fence(optional_param("fence"), max_key_bytes)

    @app.put(KEY_RULE)
    def rest_put(key: str, kv: ClientLike) -> dict[str, Any]:
        key = path_key(key)
        ttl = optional_param("ttl")
        ttl_ms = None if ttl is None else parse_ttl_ms("ttl", ttl)
        fence = fence_param()
        condition = if_match()
        nx = if_none_match_star("PUT")
        if condition is not None and nx:
            raise PreconditionFailed(
                "If-Match and If-None-Match: * can never both hold: nothing changed"
            )
        value = read_body(max_value_bytes)  # parameters first: no body read for a bad request
        item = kv.put(
            key,
            value,
            ttl_s=ttl_s(ttl_ms),
            nx=nx,
            xx=condition is not None and condition[1] is None,
            if_version=None if condition is None else condition[1],
            fence=fence,
        )
        response.set_header("ETag", etag(item.version))
        deadline_ms = item.deadline_ms
        return {"key": key, "expires_at": http_date(deadline_ms), "expires_at_ms": deadline_ms}

    @app.get(KEY_RULE)
    def rest_get(key: str, kv: ClientLike) -> HTTPResponse:
        key = path_key(key)
        touch = optional_param("touch")
        none_match_text = request.environ.get("HTTP_IF_NONE_MATCH")
        none_match = (
            None if none_match_text is None else parse_etags("If-None-Match", none_match_text)
        )
        match_text = request.environ.get("HTTP_IF_MATCH")
        match = None if match_text is None else parse_etags("If-Match", match_text)
        if touch is None:
            item = kv.get(key)
        else:
            touch_ms = parse_ttl_ms("touch", touch)
            if request.method == "HEAD":  # RFC 9110 9.3.2: HEAD is safe, it changes nothing
                raise BadRequest("parameter 'touch' moves the deadline: use GET, not HEAD")
            # A 412 or a 304 must change nothing, and the touch would have: refused, as README
            # says, rather than half honoured. The wire's GET touch takes no fence either.
            if match is not None:
                raise BadRequest("header 'If-Match' is not honoured with ?touch=: leave it out")
            if none_match is not None:
                raise BadRequest(
                    "header 'If-None-Match' is not honoured with ?touch=: leave it out"
                )
            if optional_param("fence") is not None:
                raise BadRequest(
                    "parameter 'fence' is not honoured with ?touch= (a fenced TTL change is "
                    "PATCH ?ttl=&fence=): leave it out"
                )
            require_role(request.environ, Role.WRITE)  # a touch moves the deadline
            item = kv.get(key, touch_s=ttl_s(touch_ms))
        tag = etag(item.version)
        if isinstance(match, list) and item.version not in strong_versions(match):
            raise PreconditionFailed(f"the key's version is {item.version}: If-Match failed")
        if none_match is not None and weakly_matches(none_match, item.version):
            return HTTPResponse(b"", 304, {"ETag": tag})
        headers = {"Content-Type": "application/octet-stream", "ETag": tag}
        if item.deadline_ms is not None:
            headers["X-Zkv-Expires-At"] = str(http_date(item.deadline_ms))
            headers["X-Zkv-Expires-At-Ms"] = str(item.deadline_ms)
            headers["X-Zkv-Ttl-Ms"] = str(max(0, item.deadline_ms - now_ms()))
        return HTTPResponse(item.value, 200, headers)

    @app.delete(KEY_RULE)
    def rest_delete(key: str, kv: ClientLike) -> dict[str, Any]:
        key = path_key(key)
        fence = fence_param()
        condition = if_match()
        if_none_match_star("DELETE")
        version = None if condition is None else condition[1]
        if not kv.delete(key, if_version=version, fence=fence):
            if condition is not None:  # If-Match: * of a missing key
                raise PreconditionFailed("the key does not exist: If-Match failed")
            raise NotFound(key.encode())
        return {"deleted": key}

    @app.post(INCR_RULE)
    def rest_incr(key: str, kv: ClientLike) -> dict[str, Any]:
        key = path_key(key)
        by = parse_by(optional_param("by"))
        ttl = optional_param("ttl")
        ttl_ms = None if ttl is None else parse_ttl_ms("ttl", ttl)
        fence = fence_param()
        no_conditions("POST")
        value, version, deadline_ms = kv.incr_item(key, by=by, ttl_s=ttl_s(ttl_ms), fence=fence)
        response.set_header("ETag", etag(version))
        return {"key": key, "value": value, "expires_at_ms": deadline_ms}

    @app.route(KEY_RULE, method="PATCH")
    def rest_patch(key: str, kv: ClientLike) -> dict[str, Any]:
        key = path_key(key)
        ttl = required_param("ttl")
        ttl_ms = None if ttl == "none" else parse_ttl_ms("ttl", ttl)
        fence = fence_param()
        no_conditions("PATCH")
        if ttl_ms is None:
            kv.persist(key, fence=fence)
            deadline_ms = None
        else:
            deadline_ms = kv.expire(key, ttl_s(ttl_ms), fence=fence)
        return {"key": key, "expires_at": http_date(deadline_ms), "expires_at_ms": deadline_ms}

    # --- locks (README.md, REST API; the refresh route first: see gateway/auth.py) ----------

    def lock_conflict(exc: Conflict) -> HTTPResponse:
        """The 409 of a refused lock call, with the holder's expiry when the store gave it."""
        body = {"error": str(exc), "expires_at_ms": exc.deadline_ms}
        return HTTPResponse(to_json(body), 409, {"Content-Type": JSON_TYPE})

    @app.post(LOCK_REFRESH_RULE)
    def lock_refresh(name: str, kv: ClientLike) -> Any:
        name = path_key(name, "lock name")
        token = parse_token("token", required_param("token"))
        ttl_ms = parse_ttl_ms("ttl", required_param("ttl"))
        no_conditions("POST")
        try:
            expires_at_ms = kv.refresh_lock(name, token, ttl_s(ttl_ms))
        except Conflict as exc:
            return lock_conflict(exc)
        return {"name": name, "token": token, "expires_at_ms": expires_at_ms}

    @app.post(LOCK_RULE)
    def lock_acquire(name: str, kv: ClientLike) -> Any:
        name = path_key(name, "lock name")
        ttl_ms = parse_ttl_ms("ttl", required_param("ttl"))
        wait_ms = parse_wait_ms(optional_param("wait"))
        no_conditions("POST")
        try:
            lock = kv.acquire_lock(name, ttl_s(ttl_ms), wait_s=wait_ms / 1000)
        except Conflict as exc:
            return lock_conflict(exc)
        return {"name": name, "token": lock.token, "expires_at_ms": lock.expires_at_ms}

    @app.delete(LOCK_RULE)
    def lock_release(name: str, kv: ClientLike) -> Any:
        name = path_key(name, "lock name")
        token = parse_token("token", required_param("token"))
        no_conditions("DELETE")
        try:
            kv.release_lock(name, token)
        except Conflict as exc:
            return lock_conflict(exc)
        return {"name": name, "token": token, "released": True}

    @app.get("/v1/keys")
    def rest_list(kv: ClientLike) -> dict[str, Any]:
        limit = parse_limit(optional_param("limit"))
        after = key_of_cursor(optional_param("after") or "")
        # The client's limit is per shard and its result sorted: the first limit + 1 entries
        # of the union are the next limit + 1 keys of the whole store, and the extra one only
        # says whether there is another page.
        entries = kv.all(after=after, limit=limit + 1, keys_only=True)
        page = entries[:limit]
        return {
            "keys": [
                {
                    "key": _key_text(entry.key),
                    "expires_at": http_date(entry.deadline_ms),
                    "expires_at_ms": entry.deadline_ms,
                }
                for entry in page
            ],
            "next": cursor_of(page[-1].key) if len(entries) > limit else None,
        }

    watching = Watches(events_endpoints(None)) if watches is None else watches

    @app.get("/v1/watch")
    def rest_watch() -> Any:
        # Server-Sent Events of the keys under ?prefix= (gateway/watch.py has the format).
        prefix = seed.checked_key(optional_param("prefix") or "", BadRequest, "parameter 'prefix'")
        if prefix.startswith("\0"):
            raise BadRequest("parameter 'prefix' starts with NUL (reserved for internal keys)")
        last = request.get_header("Last-Event-ID")
        try:
            last_id = None if last is None else parse_event_id(last)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        response.content_type = "text/event-stream"
        response.set_header("Cache-Control", "no-cache")
        if request.method == "HEAD":
            return b""
        body = watching.open(request.environ, prefix.encode(), last_id)
        if body is None:
            raise HTTPError(
                503,
                f"too many watchers on this gateway process (at most {watching.max_watchers})",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
            )
        return body

    @app.get("/v1/health")
    def health(kv: ClientLike) -> Any:
        # A readiness check: 200 only when the broker answers, every shard has an owner (and,
        # in cluster mode, the broker reaches etcd), else 503 with a JSON body a monitor can
        # read ("degraded": the broker's view, some shard without a worker or etcd out of
        # reach; "unavailable": no answer from the broker).
        try:
            info = kv.ping()
        except ZkvError as exc:  # for a health check, silence is unavailability
            limited.warning("health", "GET '/v1/health' -> 503: %s", exc)
            body = to_json({"status": "unavailable", "error": str(exc)})
            return HTTPResponse(body, 503, {"Content-Type": JSON_TYPE, "Retry-After": "1"})
        owned = info.get("owned")
        # Cluster mode: a broker that cannot reach etcd keeps routing to the leaders it knows,
        # but no failover can happen meanwhile: degraded (docs/cluster.md).
        coordinator_ok = info.get("coordinator") in (None, "ok")
        healthy = (
            isinstance(owned, list) and owned and all(s is True for s in owned) and coordinator_ok
        )
        if not is_admin(request.environ):  # with tokens, the cluster's layout is admin's
            info = {}
        if healthy:
            return {**info, "status": "ok"}
        body = to_json({**info, "status": "degraded"})
        return HTTPResponse(body, 503, {"Content-Type": JSON_TYPE, "Retry-After": "1"})

    openapi = openapi_document()  # read once per app, not per request

    @app.get(OPENAPI_PATH)
    def openapi_json() -> HTTPResponse:
        return HTTPResponse(openapi, 200, {"Content-Type": JSON_TYPE})

    # --- watching the cluster (gateway/metrics.py, docs/operations.md) -----------------------

    def cluster(kv: ClientLike) -> tuple[dict[str, Any] | None, str | None]:
        """The broker's STATS, checked; (None, why) when it cannot be had."""
        try:
            return metrics.cluster_view(kv.stats()), None
        except ZkvError as exc:
            limited.warning("stats", "STATS for the metrics or status page failed: %s", exc)
            return None, str(exc)
        except metrics.BadStats as exc:
            limited.warning("stats", "malformed STATS from the broker: %s", exc)
            return None, f"malformed STATS from the broker: {exc}"

    @app.get("/metrics")
    def prometheus(kv: ClientLike) -> HTTPResponse:
        view, _ = cluster(kv)
        body = metrics.render(stats, view)
        return HTTPResponse(body, 200, {"Content-Type": metrics.CONTENT_TYPE})

    @app.get("/v1/status")
    def status(kv: ClientLike) -> dict[str, Any]:
        view, error = cluster(kv)
        return metrics.status_document(stats, view, error, clock())

    @app.get("/")
    def status_page() -> HTTPResponse:
        return HTTPResponse(
            page.HTML,
            200,
            {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"},
        )

    return app
