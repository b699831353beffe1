"""The seed's /get, /set and /delete as a WSGI app for gunicorn's gevent worker, with the
batching bridge ported to gevent, to measure that server against gateway/http11.py.

Issue 10 item 20 asks whether gunicorn's gevent worker, with the gateway's batching bridge on
gevent, carries the gateway as fast as gateway/http11.py. The bridge (gateway/bridge.py,
zkv/aio.py) is asyncio, so this module carries a small gevent twin of zkv/aio.py,
:class:`GeventClient`, driving the same I/O-free core (zkv/calls.py :class:`Calls`) the same
way: a greenlet's call packs its operation into the core and waits on a
:class:`gevent.event.AsyncResult`; the first call that finds nothing queued schedules a flush
with the hub's ``run_callback``, which runs once every greenlet woken in the same turn of the
loop has had its go, so their operations leave in one BATCH; replies are read when the socket's
descriptor signals (a hub ``io`` watcher, no greenlet) and set the results; a hub timer,
armed while calls are outstanding, does the timeouts, the BUSY backoffs and the resends as
:class:`Calls` decides. The ZeroMQ edge rules are those of zkv/aio.py (its docstring): a
plain socket used only with NOBLOCK, read until ``zmq.Again``, and ``zmq.EVENTS`` looked at
after every send. The answers are the fast lane's own (gateway/fastlane.py :class:`FastLane`,
through gateway.app.SeedApi), as in bench/asgi_candidate.py, so only the HTTP server and the
event loop differ. Not used in production, and gevent is not in requirements.txt
(``pip install gevent``); run as, e.g.::

    ZKV_FRONTEND=tcp://127.0.0.1:5555 gunicorn -k gevent -w 2 --worker-connections 1000 \
        -b 127.0.0.1:5002 bench.gevent_candidate:app
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import zmq
from gevent.event import AsyncResult

from gateway.app import SeedApi
from gateway.fastlane import FastLane
from zkv import defaults
from zkv.calls import Calls, Settled, frontend, new_ids
from zkv.client import BATCH_OPS, CONNECT_POLL_S, dealer
from zkv.errors import ProtocolError, ZkvError

log = logging.getLogger(__name__)

_READ = 1  # libev's EV_READ, for the hub's io watcher


class GeventClient:
    """zkv/aio.py's AsyncClient on gevent's hub: the calls of concurrent greenlets in BATCHes.

    Only :meth:`submit` (the fast lane's entry point) is offered. One per process, made after
    gunicorn's fork (at the first request); not thread-safe.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        attempt_s: float = defaults.ATTEMPT_TIMEOUT_S,
        connect_timeout_s: float = defaults.CONNECT_TIMEOUT_S,
        batch_ops: int = BATCH_OPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = frontend(endpoint)
        self.connect_timeout_s = connect_timeout_s
        self.batch_ops = batch_ops
        self.batches = 0
        self.retries = 0
        self._clock = clock
        self._loop = gevent.get_hub().loop
        self._context = zmq.Context.instance()
        self._calls = Calls(self.endpoint, timeout_s, attempt_s, new_ids, clock())
        self._socket: zmq.Socket | None = None
        self._watcher: Any = None  # the hub's io watcher of the socket's descriptor
        self._flush_pending: Any = None  # the run_callback of the next flush
        self._read_pending: Any = None  # a read scheduled after a send took replies in
        self._timer: Any = None
        self._timer_at = float("inf")
        self._reset_socket(open_new=True)

    def submit(
        self, kind: int, key: bytes, value: bytes | None = None, ttl_ms: int | None = None
    ) -> AsyncResult:
        """Queue one operation for this loop turn's flush; its result comes in the AsyncResult
        (``.result()`` raises the error it failed with), as zkv/aio.py's ``submit`` future.

        Raises:
            RequestError: the operation breaks the protocol's limits (nothing is queued).
        """
        result = AsyncResult()
        calls = self._calls
        calls.add((kind, key, value, ttl_ms), result, self._clock())
        if calls.queued >= self.batch_ops:
            self._flush()
        elif self._flush_pending is None:
            self._flush_pending = self._loop.run_callback(self._flush)
        if self._timer is None:
            self._arm(self._clock() + CONNECT_POLL_S)
        return result

    # --- sending ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what is queued, in BATCH messages; what cannot leave (no broker connected, no
        socket) stays queued for the timer. Never raises (it runs in the hub)."""
        self._flush_pending = None
        calls = self._calls
        socket = self._socket
        if socket is None and (socket := self._reset_socket(open_new=True)) is None:
            return
        while (batch := calls.next_batch(self.batch_ops)) is not None:
            try:
                socket.send_multipart(batch.frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                break  # no broker connected (IMMEDIATE): the timer tries again
            except zmq.ZMQError as exc:
                log.warning("sending to %s failed (%s): a new socket next", self.endpoint, exc)
                self._reset_socket(open_new=False)
                return
            calls.sent(batch, self._clock())
            self.batches += 1
        self._readable()

    def _readable(self) -> bool:
        """Whether replies wait (a look at zmq.EVENTS, which takes in what the descriptor
        would have announced); if so, a read is scheduled."""
        socket = self._socket
        if socket is None:
            return False
        try:
            waiting = bool(socket.get(zmq.EVENTS) & zmq.POLLIN)
        except zmq.ZMQError:
            return False
        if waiting and self._read_pending is None:
            self._read_pending = self._loop.run_callback(self._on_readable)
        return waiting

    # --- receiving -------------------------------------------------------------------------

    def _on_readable(self) -> int:
        """Read every reply there is and settle its calls; how many messages were read."""
        self._read_pending = None
        socket = self._socket
        if socket is None:
            return 0
        calls = self._calls
        read = 0
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return read
            except zmq.ZMQError as exc:
                log.warning("receiving from %s failed (%s)", self.endpoint, exc)
                return read
            read += 1
            try:
                _settle(calls.receive(frames, self._clock()))
            except ProtocolError as exc:
                log.warning("malformed reply from %s ignored: %s", self.endpoint, exc)
                continue
            if calls.parked:
                self._arm(calls.next_resend_at())

    # --- the timer -------------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        """Make sure the timer fires by ``at`` (clock time)."""
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.stop()
            self._timer.close()
        self._timer = timer = self._loop.timer(max(0.0, at - self._clock()))
        self._timer_at = at
        timer.start(self._on_timer)

    def _on_timer(self) -> None:
        """Every CONNECT_POLL_S at most while calls are outstanding: time out, retry, resend."""
        self._timer.close()
        self._timer = None
        self._timer_at = float("inf")
        calls = self._calls
        try:
            self._on_readable()  # a busy loop may not have read what came yet
            now = self._clock()
            _settle(calls.expire(now))
            _settle(calls.stuck(now, self.connect_timeout_s))
            _settle(calls.unpark(now))
            if calls.queued:
                self._flush()
            if not calls.queued and calls.resend_due(now) and not self._readable():
                self.retries += 1
                self._reset_socket(open_new=True)
                calls.resend(now)
                self._flush()
        finally:
            due_s = calls.due_in(self._clock())
            if due_s is not None:
                self._arm(self._clock() + min(due_s, CONNECT_POLL_S))

    def _reset_socket(self, open_new: bool) -> zmq.Socket | None:
        """Close the socket; with ``open_new``, make and watch a new one (None if it could not
        be made: logged, tried again at the next flush)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if not open_new:
            return None
        try:
            socket = dealer(self._context, self.endpoint)
        except zmq.ZMQError as exc:
            log.warning("no socket to %s (%s): trying again at the next send", self.endpoint, exc)
            return None
        self._watcher = self._loop.io(socket.FD, _READ)
        self._watcher.start(self._on_readable)
        self._socket = socket
        return socket


def _settle(outcomes: list[Settled]) -> None:
    """Hand each call's result, or its error, to the greenlet waiting on its AsyncResult."""
    result: AsyncResult
    for result, outcome in outcomes:
        if isinstance(outcome, ZkvError):
            result.set_exception(outcome)
        else:
            result.set(outcome)


# --- the WSGI app ------------------------------------------------------------------------------

_client: GeventClient | None = None


def _get_client() -> Any:
    global _client  # one per process, made after the fork, at the first request
    if _client is None:
        _client = GeventClient(os.environ.get("ZKV_FRONTEND"))
    return _client  # duck-types zkv.aio.AsyncClient.submit for the fast lane


_lane = FastLane(SeedApi(defaults.MAX_KEY_BYTES, defaults.MAX_VALUE_BYTES, time.time), _get_client)
_NOT_FOUND = b'{"error": "not served by this benchmark app"}'


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """WSGI: the fast lane's answer (the greenlet waits for its zkv call), or 404."""
    target = environ.get("RAW_URI")
    if target is None:
        query = environ.get("QUERY_STRING", "")
        target = environ.get("PATH_INFO", "") + ("?" + query if query else "")
    taken = _lane(environ["REQUEST_METHOD"].encode(), target.encode("latin-1"))
    if taken is None:
        status, headers, body = "404 Not Found", [("Content-Type", "application/json")], _NOT_FOUND
    else:
        result, finish = taken
        result.wait()  # finish() reads its outcome, error or not
        status, headers, body = finish(result)
    start_response(status, headers)
    return [body]
