"""The seed's ``/get``, ``/set`` and ``/delete`` answered on the event loop, without a WSGI call.

Why: these three routes are nearly all of the gateway's traffic, and on the WSGI path most of
a request's CPU is the machinery around the route rather than the route: Bottle binding its
request and response, three plugin wrappers, the environ, the greenlet switches and the
save and restore of Bottle's thread-locals around them. Measured with wrk (64 connections,
``/get`` of 16-byte values, 2 gateway processes on the 2 cores of the project's machine, the
same cluster behind both): 140-160 us of gateway CPU per request through Bottle against 65-95
us here, 8,200-8,400 against 11,000-13,900 requests per second (docs/performance.md).

What makes it safe to have two paths:

* It serves only the plain case: ``GET`` of exactly ``/get``, ``/set`` or ``/delete`` (no
  %-escapes in the path, no fragment) whose parameters are all valid. Everything else, and
  every request whose parameters would be refused, is declined (:meth:`FastLane.__call__`
  returns None) and goes to the Bottle app, so every 4xx answer and its wording come from one
  place.
* What it does read and answer goes through the app's own :class:`gateway.app.SeedApi` and
  :class:`gateway.app.Query` (Bottle's reading of a query string), and an error from the zkv
  call through :func:`gateway.app.failure`, the app's one exception table. The tests serve
  fuzzed requests both ways and compare status, headers and body, and check that a declined
  request sent nothing (tests/unit/test_fastlane.py); real gateways with the lane on and off
  answer the same raw request sequences with the same bytes (tests/process/test_fast_lane.py).
* It is one flag away: ``--fast-lane off`` (``ZKV_HTTP_FAST_LANE``) sends everything through
  Bottle.
* With tokens (gateway/auth.py), it checks the request's ``Authorization`` against the role
  :data:`gateway.auth.ROUTE_ROLES` gives its route, as the app does, and declines a request
  that fails, so that the app answers its 401 or 403.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from bottle import HTTP_CODES, Bottle

from gateway.app import (
    JSON_TYPE,
    SEED_KEY,
    BadRequest,
    ClientPlugin,
    Query,
    SeedApi,
    failure,
    to_json,
)
from gateway.auth import AUTH_KEY, Role, Tokens, role_of_route
from gateway.bridge import LoopClient
from gateway.http11 import Response
from zkv.aio import AsyncClient
from zkv.errors import ZkvError
from zkv.protocol import Kind

Finish = Callable[[asyncio.Future[Any]], Response]
"""Turns the done future of a zkv call into the response."""

_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)
_ROUTES = {b"/get": _GET, b"/set": _SET, b"/delete": _DEL}


class FastLane:
    """The server's shortcut (see gateway/http11.py) for the seed's three keyed routes.

    Args:
        seed: the app's reading and writing of the seed routes.
        client: gives the process's asyncio zkv client, None to decline (no client of the
            event-loop kind: the app path knows what to do).
    """

    def __init__(
        self,
        seed: SeedApi,
        client: Callable[[], AsyncClient | None],
        tokens: Tokens | None = None,
    ) -> None:
        self.seed = seed
        self.client = client
        self.tokens = tokens
        self._needed: dict[int, Role] = {
            kind: role_of_route("GET", path.decode()) for path, kind in _ROUTES.items()
        }

    def __call__(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> tuple[asyncio.Future[Any], Finish] | None:
        """Start serving the request, or decline it (None) for the app to serve.

        Args:
            method, target: the request's.
            headers: the request's header fields, as parsed (only read with tokens).

        Returns:
            The zkv call's future and what turns it, once done, into the response.
        """
        if method != b"GET":
            return None
        path, _, query_string = target.partition(b"?")
        kind = _ROUTES.get(path)
        if kind is None or b"#" in query_string:
            return None
        tokens = self.tokens
        if tokens is not None and not self._allowed(tokens, kind, headers):
            return None  # the app answers 401 or 403, in its words
        seed = self.seed
        query = Query(query_string.decode("latin-1"))
        try:
            client = self.client()
            if client is None:
                return None
            if kind == _GET:
                key = seed.key(query)
                return client.submit(_GET, key.encode()), self._got
            if kind == _SET:
                key, value, value_bytes, ttl_ms = seed.set_params(query)
                future = client.submit(_SET, key.encode(), value_bytes, ttl_ms)
                return future, lambda done: self._answer(
                    done, "/set", lambda deadline_ms: seed.was_set(key, value, deadline_ms)
                )
            key = seed.key(query)
            return client.submit(_DEL, key.encode()), self._deleted
        except (BadRequest, ZkvError):  # refused input, or a closed client: nothing was queued,
            return None  # and the app answers it, in its words

    def _allowed(self, tokens: Tokens, kind: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether the request's one Authorization header gives a role its route allows."""
        authorization: bytes | None = None
        for name, value in headers:
            if len(name) == 13 and name.lower() == b"authorization":
                if authorization is not None:
                    return False  # two: the app refuses them (joined, they are no token)
                authorization = value
        return isinstance(tokens.check(authorization, self._needed[kind]), Role)

    def _got(self, done: asyncio.Future[Any]) -> Response:
        return self._answer(done, "/get", self.seed.got)

    def _deleted(self, done: asyncio.Future[Any]) -> Response:
        return self._answer(done, "/delete", self.seed.deleted)

    @staticmethod
    def _answer(done: asyncio.Future[Any], path: str, render: Callable[[Any], Any]) -> Response:
        """The response to a finished call: ``render`` of its outcome, or the app's error."""
        try:
            outcome = done.result()
        except (Exception, asyncio.CancelledError) as exc:  # cancelled: a 500, as for a bug
            status, message, headers = failure(exc, "GET", path)
            return _json(status, {"error": message}, list(headers.items()))
        return _json(200, render(outcome), [])


def _json(status: int, document: Any, headers: list[tuple[str, str]]) -> Response:
    """A JSON response with the headers, in the order, the Bottle app gives them."""
    body = to_json(document).encode()
    headers.append(("Content-Type", JSON_TYPE))
    headers.append(("Content-Length", str(len(body))))
    return f"{status} {HTTP_CODES.get(status, 'Unknown')}", headers, body


def for_app(app: Bottle) -> FastLane | None:
    """The fast lane of an app made by :func:`gateway.app.make_app`, None for any other app."""
    seed = app.config.get(SEED_KEY)
    plugin = next((p for p in app.plugins if isinstance(p, ClientPlugin)), None)
    if not isinstance(seed, SeedApi) or plugin is None:
        return None

    def client() -> AsyncClient | None:
        made = plugin.client()
        return made.aio if isinstance(made, LoopClient) else None

    return FastLane(seed, client, app.config.get(AUTH_KEY))
