"""HTTP/1.1 on an asyncio event loop, each request's WSGI call in its own greenlet.

Why: the gateway's work per request is mostly waiting for the broker. A thread per request
(gunicorn's gthread) pays for that wait with a thread, a ZeroMQ socket and a round trip of
its own; here one loop per process serves every connection, and the zkv calls of all requests
that arrive together leave in one BATCH message (gateway/bridge.py). Parsing is llhttp, the
parser of Node.js, through ``httptools``.

What the server promises beyond plain HTTP/1.1 with keep-alive and pipelining (answered in
order, one request of a connection at a time):

* a declared ``Content-Length`` over ``max_body_bytes`` (or a chunked body once past it) is
  handed to the app at once without its body, so the app's own 413 is the answer, and the
  connection is then closed; ``Expect: 100-continue`` is honoured;
* every error this server answers itself (a malformed request, a head too large, a stalled
  request, an app that raised, too many connections) is ``{"error": "..."}`` JSON, as the app's;
* request targets and heads are bounded (:data:`LIMIT_REQUEST_LINE_BYTES`, but a seed ``/set``
  target up to ``max_set_target_bytes``, grown in one buffer; :data:`MAX_HEAD_BYTES` of header
  fields, :data:`MAX_HEADERS`), and so is any run of input the parser would buffer without a
  callback
  (an unfinished header line or trailer: :data:`MAX_HEAD_BYTES` plus one read); an idle
  keep-alive connection is closed after ``keepalive_s``, a request that does not arrive whole
  within ``read_timeout_s`` gets a 408;
* what a connection holds is bounded: its body in one ``bytearray`` (at most ``max_body_bytes``
  + 1), requests parsed ahead by count (:data:`MAX_QUEUED_REQUESTS`) and by bytes
  (:data:`MAX_QUEUED_INPUT_BYTES`), unsent output by the transport's high-water mark
  (:data:`WRITE_HIGH_WATER_BYTES`) plus the one response in hand. A connection that does not
  read its responses is not read from either, and is aborted when its output has not drained
  for ``write_timeout_s``;
* a transfer coding other than ``chunked`` is answered 501;
* raw bytes above 0x7F in a request head (``/get?key=ключ``, which llhttp refuses) are read as
  their ``%XX`` escapes, bodies untouched (:meth:`HttpConnection._feed_carefully`);
* TLS, when given a context: the handshake is bounded by ``read_timeout_s``;
* a new connection over a limit (``max_connections`` per process, or
  ``max_connections_per_client`` from one client address) first evicts the connection, of that
  address or of any, that has waited longest on an unfinished request or as idle keep-alive, if
  that wait is over ``evict_after_s``; only when none has waited that long is the newcomer
  answered 503 and closed. So connections held open by a slow or idle client (slowloris, even
  from 127.0.0.1 where every local client shares one address) cannot lock others out;
* ``Expect: 100-continue`` is answered when the request's turn comes, never ahead of a response
  still owed to an earlier request of the connection;
* the timeout sweep survives anything one connection does: a failure is logged, the sweep
  always runs again;
* :meth:`HttpServer.stop` stops accepting, closes idle connections, lets the requests in hand
  finish for up to a grace period, and closes each connection after its response.

A streamed response (``GET /v1/watch``, gateway/watch.py): an app that puts a coroutine
function under ``environ[STREAM_KEY]`` (servers that can take one set ``environ[STREAMS_KEY]``)
and answers 200 gets its head written without a length and with ``Connection: close``; the
function is then run on the loop with a :class:`StreamOut` and writes the body until it
returns, the client leaves (it is cancelled) or the server stops (cancelled too). It must write
only while ``writable()``: the transport's high-water mark and ``write_timeout_s`` bound a
stream's output as any response's.

A :data:`Shortcut` may be given: it is offered every request first and may answer it from a
future, on the loop, without a WSGI call (the gateway's fast lane, gateway/fastlane.py); what
it declines goes to the app. Answers keep their order on a connection either way.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

import greenlet
import httptools

from zkv.logs import LogLimiter

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

LIMIT_REQUEST_LINE_BYTES = 8190  # the request target, but for seed /set (below)
# Seed /set carries its value in the URL, and the seed (Flask) took any value up to the limit:
# its target may be 3 bytes per byte of key and value (each %-escaped) plus this much for the
# rest ("/set?key=&value=&timeout=" and the timeout); see set_target_limit().
SET_TARGET_SLACK_BYTES = 1024
MAX_HEAD_BYTES = 64 * 1024  # header (and trailer) fields together; the target has its own limit
MAX_HEADERS = 100  # header (and trailer) fields per request, as gunicorn's limit_request_fields
MAX_QUEUED_REQUESTS = 32  # pipelined requests parsed ahead per connection; reading pauses then
MAX_QUEUED_INPUT_BYTES = 1024 * 1024  # bytes of requests parsed ahead; reading pauses then
WRITE_HIGH_WATER_BYTES = 64 * 1024  # unsent output above which a connection is not read from
MAX_IDLE_RUNNERS = 256  # request greenlets kept for reuse per process
# Parser calls for one read holding bytes above 0x7F: MAX_CAREFUL_PIECES + its size divided by
# CAREFUL_BYTES_PER_PIECE (see HttpConnection._feed_carefully).
MAX_CAREFUL_PIECES = 256
CAREFUL_BYTES_PER_PIECE = 8
SHOWN_TARGET_BYTES = 2048  # at most this much of a target in a log line
SWEEP_S = 0.5  # how often timeouts are checked
# TLS handshakes under way in one process, and from one client address: new connections past
# either are closed at once (each costs about 300 KB until its handshake ends), and a
# handshake ends within HANDSHAKE_TIMEOUT_S (or the read timeout, if shorter).
MAX_PENDING_HANDSHAKES = 256
MAX_CLIENT_HANDSHAKES = 32
HANDSHAKE_TIMEOUT_S = 5.0
ACCEPT_PAUSE_S = 0.5  # after an accept failed for want of resources (file descriptors)
LINGER_S = 2.0  # after a refusal with input maybe unread: how long to discard what still comes

_HIGH_BYTES = re.compile(rb"[\x80-\xff]+")
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Response = tuple[str, list[tuple[str, str]], bytes]  # status line, headers, body
Shortcut = Callable[
    [bytes, bytes, list[tuple[bytes, bytes]]],
    tuple[asyncio.Future[Any], Callable[[asyncio.Future[Any]], Response]] | None,
]
"""Serves some requests without the WSGI app: given the method, the target and the header
fields, None to leave
the request to the app, or a future and what turns it, once done, into the response (see
gateway/fastlane.py). It must not raise; what turns the future into a response may, and is
then answered 500 as an app that raised."""


def set_target_limit(max_key_bytes: int, max_value_bytes: int) -> int:
    """The longest target of a seed ``/set`` accepted: any key and value within their limits
    fit, sent raw or %-escaped (3 bytes each); 3,149,824 bytes with the default limits."""
    return 3 * (max_key_bytes + max_value_bytes) + SET_TARGET_SLACK_BYTES


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What the server needs besides its app.

    Attributes:
        max_body_bytes: bodies larger than this reach the app unread (it answers 413).
        keepalive_s: an idle keep-alive connection is closed after this long.
        read_timeout_s: a request begun must be complete within this long (else 408).
        max_connections: connections beyond this many are answered 503 and closed.
        max_connections_per_client: connections from one client address (IP) beyond this
            many are answered 503 and closed, so that one client cannot take every slot.
        evict_after_s: over a connection limit, a connection that has waited this long on
            an unfinished request (or idle on keep-alive) is closed to make room for the new
            one; legitimate requests arrive whole in milliseconds.
        write_timeout_s: a connection whose unsent output has not drained below the
            high-water mark within this long is aborted (a client that does not read).
        evict_grace_s: an evicted connection still open this long after its close began
            (its client does not read the 408) is aborted.
        access_log: log one line per request to ``gateway.access``.
        max_set_target_bytes: the longest target of a seed ``/set`` (``/set?...``); every
            other target is at most :data:`LIMIT_REQUEST_LINE_BYTES`.
        stats: counts every answer (gateway.metrics.HttpStats.record); None: nothing counted.
    """

    max_body_bytes: int
    keepalive_s: float = 5.0
    read_timeout_s: float = 10.0
    max_connections: int = 1000
    max_connections_per_client: int = 100
    evict_after_s: float = 1.0
    write_timeout_s: float = 10.0
    evict_grace_s: float = 1.0
    access_log: bool = False
    max_set_target_bytes: int = LIMIT_REQUEST_LINE_BYTES
    stats: Any = None


class _DateCache:
    """The ``Date`` header's value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            # formatdate, not strftime: its day and month names do not follow the locale
            self._value = formatdate(second, usegmt=True).encode()
            self._second = second
        return self._value


STREAM_KEY = "zkv.stream"  # environ: the coroutine function of a streamed response
STREAMS_KEY = "zkv.streams"  # environ: this server takes streamed responses


class StreamOut:
    """Where a streamed response writes (see the module docstring).

    Attributes:
        write: writes bytes; False once the connection is gone (the stream should end).
        writable: False while the client does not read (the output is above high water).
        wake: set by the stream; called when the output drained again.
    """

    def __init__(self, write: Callable[[bytes], bool], writable: Callable[[], bool]) -> None:
        self.write = write
        self.writable = writable
        self.wake: Callable[[], None] = _nothing


def _nothing() -> None:
    pass


class _Request:
    """One request as the parser delivers it."""

    __slots__ = (
        "body",
        "body_bytes",
        "body_left",
        "content_length",
        "early",
        "expect_continue",
        "headers",
        "in_body",
        "keep_alive",
        "method",
        "target",
        "target_buffer",
        "version",
    )

    def __init__(self) -> None:
        self.target = b""  # set from target_buffer once the head is complete
        # Appended to as the parser hands the target over, piece by piece: a bytes object
        # grown by += would copy it whole for every piece (a /set target of megabytes, sent a
        # few bytes at a time, would cost the square of its size).
        self.target_buffer: bytearray | None = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        # One buffer, not a list of pieces: a chunked body in 2-byte chunks would otherwise
        # cost a bytes object (about 35 bytes) and a list slot per chunk, some 20x its size.
        self.body = bytearray()
        self.body_bytes = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.content_length: int | None = None
        self.in_body = False  # the head is parsed: what comes is its body (see _feed_carefully)
        self.body_left: int | None = None  # of a Content-Length body, bytes still to come
        self.early = False  # handed to the app before its body: too large, closed after
        self.expect_continue = False  # a 100 Continue is owed when its turn comes


def _call_app(
    app: WsgiApp, environ: dict[str, Any]
) -> tuple[str, list[tuple[str, str]], bytes, Callable[[], None] | None]:
    """The body of a request greenlet: the whole WSGI call, its response collected.

    The result's ``close()`` is handed back, not called: WSGI calls it once the response is
    sent, and the app may hold something until then (seed ``/all`` holds one of its few slots
    until its answer has left, so that unread answers cannot pile up: gateway/app.py).
    """
    response: list[Any] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and response:
            raise exc_info[1].with_traceback(exc_info[2])
        response[:] = [status, headers]
        return _no_write

    result = app(environ, start_response)
    closer: Callable[[], None] | None = getattr(result, "close", None)
    try:
        body = b"".join(result)
        if not response:
            raise RuntimeError("the app returned without calling start_response")
    except BaseException:
        if closer is not None:
            closer()
        raise
    return response[0], response[1], body, closer


def _no_write(data: bytes) -> None:
    raise NotImplementedError("the write() callable of start_response is not supported")


class _Failed:
    """What a runner greenlet hands back when the app raised (the greenlet itself lives on)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _runner(work: tuple[WsgiApp, dict[str, Any]]) -> None:
    """The body of a pooled request greenlet: one app call after another.

    Pooled because a new greenlet costs about 30 us to create and start, against 3 us for a
    switch into one that exists (measured here): more than the rest of a cheap request.
    """
    hub = greenlet.getcurrent().parent
    while True:
        app, environ = work
        work = None
        out: list[Any]  # emptied by the hub (_step): a parked runner holds no response
        try:
            out = [_call_app(app, environ)]
        except (Exception, asyncio.CancelledError) as exc:  # the greenlet must live on
            out = [_Failed(exc)]
        del app, environ  # nor the last request's environ (its body)
        work = hub.switch(out)


class HttpConnection(asyncio.Protocol):
    """One client connection: its parser, its queued requests, the one being answered."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.current: _Request | None = None  # being parsed
        self.ready: deque[_Request] = deque()  # parsed, not yet answered
        self.busy = False  # a request of this connection is in the app
        self.closing = False  # close after the response in hand; nothing more is answered
        self.input_ended = False  # EOF or Upgrade: answer what is parsed, then close
        self.lingering = False  # closing with input maybe unread: discard it for a while
        self.closed = False
        self.reading = True
        self.writable = True
        self.url_too_long = False
        self.head_too_large = False
        self.coding_refused: bytes | None = None  # a transfer coding we do not implement
        self.coding_unframed = False  # a Transfer-Encoding that does not end with chunked
        self.refused = False  # an answer of our own (_refuse) was written: nothing more is
        self.head_bytes = 0
        self.headers_count = 0
        self.progress = False  # the parser called back during the current feed
        self.quiet_bytes = 0  # input fed since the parser last called back (see data_received)
        self.queued_bytes = 0  # bytes (heads and bodies) of the requests in ``ready``
        self.write_blocked_since = 0.0  # loop time output went above the high-water mark
        self.client = ""  # the peer's address, for the per-client connection limit
        self.linger_until = 0.0
        self.started = 0.0  # loop time the request being parsed began
        self.last_active = server.loop.time()
        self.after_sent: list[Callable[[], None]] = []  # WSGI close() of responses in the buffer
        self.advancing = False  # in _next: a call from within only asks for another round
        self.advance_again = False
        self.stream_task: asyncio.Task[None] | None = None  # a streamed response being sent
        self.stream_out: StreamOut | None = None

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            self.client = str(peer[0])
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)  # type: ignore[attr-defined]
        refusal = self.server.adopt(self)
        if refusal is not None:
            # Not adopted, so no sweep would ever end a linger: answer and close at once.
            self._refuse(503, refusal)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ready.clear()
        if self.stream_task is not None:
            self.stream_task.cancel()
        self.server.forget(self)
        self._sent()

    def _sent(self) -> None:
        """The responses written are out of the transport's buffer (or will never be): close
        their WSGI results. A close that fails is logged; the others still run."""
        closers, self.after_sent = self.after_sent, []
        for closer in closers:
            try:
                closer()
            except Exception:
                log.exception("closing a response of %s failed", self.peer)

    def pause_writing(self) -> None:
        self.writable = False
        self.write_blocked_since = self.server.loop.time()
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writable = True
        self.write_blocked_since = 0.0
        if self.stream_out is not None:
            self.stream_out.wake()
        self._sent()
        self._next()
        self._maybe_resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.input_ended:
            return  # answering the last request, or lingering: what else comes is not read
        self.last_active = self.server.loop.time()
        self.progress = False
        try:
            if data.isascii():  # nearly always: a C scan, no copy
                self.parser.feed_data(data)
            else:
                self._feed_carefully(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (websocket, h2c) is not supported: the request is answered as plain
            # HTTP, and the connection closed after it.
            self.input_ended = True
        except httptools.HttpParserError as exc:
            if not self.input_ended:
                self._bad_input(exc)
                return
            # Bytes after a request that closes the connection (llhttp refuses them): they
            # are not read, as RFC 9112 says, and that request is still answered.
        # httptools hands over a header line (or trailer) only once it ends, and keeps the
        # unfinished one meanwhile; a client that never ends it would grow that without limit.
        # Input fed with no callback at all belongs to such a line (or a chunk extension,
        # which no client makes this long): past MAX_HEAD_BYTES of it, the head is refused.
        # Checked per read, so what the parser holds is at most the limit plus one read.
        if self.progress:
            self.quiet_bytes = 0
        else:
            self.quiet_bytes += len(data)
            if self.quiet_bytes > MAX_HEAD_BYTES and not self.closing and not self.input_ended:
                self.head_too_large = True
                self._bad_input(ValueError("request head too large"))
                return
        if len(self.ready) >= MAX_QUEUED_REQUESTS or self.queued_bytes >= MAX_QUEUED_INPUT_BYTES:
            self._pause_reading()
        self._next()
        self._close_if_done()

    def _feed_carefully(self, data: bytes) -> None:
        """Feed input holding bytes above 0x7F, %-escaping those of request heads.

        llhttp refuses any byte above 0x7F in a request target ("Invalid char in url query"),
        where the seed's Flask app took raw UTF-8 (``/get?key=ключ``) as it came. So those
        bytes of a request head are written %XX, as a browser would have sent them, before
        the parser sees them: the app reads the same path and query either way (what it
        decodes of ``%D0%BA`` and of the raw bytes is the same). Header fields are part of the
        head and escaped too (zkv reads no header where that matters: a token is ASCII).
        Bodies must pass untouched, so the input is fed in pieces that never straddle the end
        of a head or of a body: a head line at a time (a head ends with a line, as a chunked
        body does), a Content-Length body exactly to its end. Only reads holding such bytes
        come here; every other read is fed whole.

        The pieces of one read are at most MAX_CAREFUL_PIECES plus one per
        CAREFUL_BYTES_PER_PIECE of the read (a head line is longer than that; empty lines
        between requests, which llhttp skips, go in one piece); past them the rest of the read
        is fed whole, as it came. Else a chunked body of short lines would cost a parser call
        per 2 bytes (256 KiB of empty lines held the loop some 150 ms that way; llhttp's own
        callbacks for chunks of 1 byte cost about as much as these calls). The price: a
        request with raw UTF-8 in its target pipelined in the same read behind a chunked body
        of very short lines is refused 400, as it was before.
        """
        parser = self.parser
        size = len(data)
        start = 0
        pieces = MAX_CAREFUL_PIECES + size // CAREFUL_BYTES_PER_PIECE
        while start < size and not self.input_ended:
            pieces -= 1
            if pieces < 0:
                parser.feed_data(data[start:])
                return
            request = self.current
            if request is not None and request.in_body and request.body_left:
                end = start + request.body_left
            elif request is None and data[start] in b"\r\n":  # empty lines between requests
                end = size - len(data[start:].lstrip(b"\r\n"))
            else:
                newline = data.find(b"\n", start)
                end = size if newline < 0 else newline + 1
            piece = data[start:end]
            if (request is None or not request.in_body) and not piece.isascii():
                piece = _HIGH_BYTES.sub(_escaped, piece)
            parser.feed_data(piece)
            start = end

    def eof_received(self) -> bool | None:
        # The client is done sending; what it asked for is still answered, then the connection
        # is closed. True keeps the transport open for those answers; under TLS the transport
        # closes anyway (a TLS close is both ways: asyncio warns of a True, per connection).
        self.input_ended = True
        if self.stream_task is not None:
            # A stream's client that stops sending has left (an EventSource never half-closes):
            # end the stream now rather than at its next write, up to a keepalive later.
            self.stream_task.cancel()
        if self.linger_until:
            self.close()  # lingering after a refusal: the client has stopped sending
        else:
            self._close_if_done()
        return True if self.server.tls is None else None

    # --- parser callbacks (httptools calls these from feed_data) ------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.started = self.server.loop.time()
        self.head_bytes = 0
        self.headers_count = 0
        self.progress = True

    def on_url(self, url: bytes) -> None:
        self.progress = True
        request = self.current
        if request is not None and request.target_buffer is not None:
            target = request.target_buffer
            target += url
            if len(target) > LIMIT_REQUEST_LINE_BYTES and (
                len(target) > self.server.config.max_set_target_bytes
                or not target.startswith(b"/set?")
            ):
                self.url_too_long = True
                raise ValueError("request line too long")  # feed_data raises a parser error

    def on_header(self, name: bytes, value: bytes) -> None:
        self.progress = True
        if self.current is not None:
            self.current.headers.append((name, value))
            self.head_bytes += len(name) + len(value) + 4
            self.headers_count += 1
            if self.head_bytes > MAX_HEAD_BYTES or self.headers_count > MAX_HEADERS:
                self.head_too_large = True
                raise ValueError("request head too large")  # feed_data raises a parser error

    def on_headers_complete(self) -> None:
        self.progress = True
        request = self.current
        if request is None:
            return
        parser = self.parser
        if request.target_buffer is not None:
            request.target = bytes(request.target_buffer)
            request.target_buffer = None
        request.in_body = True
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        expect_continue = chunked = False
        for name, value in request.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                request.content_length = int(value)  # llhttp has checked: digits, not repeated
            elif lowered == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
            elif lowered == b"transfer-encoding":
                chunked = True
                # A coding list that does not end with chunked leaves the body's length unknown:
                # 400 (RFC 9112 6.3, as gunicorn's parser answers under gthread). Any other
                # coding (gzip, chunked) would be passed on still encoded: 501 (RFC 9112 6.1).
                codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
                if not codings or codings[-1] != b"chunked":
                    self.coding_unframed = True
                    raise ValueError("transfer coding does not end with chunked")
                for coding in codings:
                    if coding != b"chunked":
                        self.coding_refused = coding
                        raise ValueError("transfer coding not implemented")  # a parser error
        if not chunked:
            request.body_left = request.content_length or 0  # what _feed_carefully feeds
        if request.content_length is not None and request.content_length > (
            self.server.config.max_body_bytes
        ):
            request.early = True
            self._queue(request)
        elif expect_continue and request.version == "1.1":
            # Owed when this request's turn comes (_next), never ahead of the answer to an
            # earlier request of the connection: that would be read as this one's answer.
            request.expect_continue = True
            self._continue_if_due()

    def on_chunk_header(self) -> None:
        self.progress = True

    def on_chunk_complete(self) -> None:
        self.progress = True

    def on_body(self, body: bytes) -> None:
        self.progress = True
        request = self.current
        if request is not None and request.body_left is not None:
            request.body_left -= len(body)
        if request is None or request.early:
            return  # too large: the app answers without it, and the connection closes
        limit = self.server.config.max_body_bytes
        if request.body_bytes + len(body) > limit:
            # Only a chunked body gets here (llhttp enforces a Content-Length): keep one byte
            # more than the limit, enough for the app to know, and answer now.
            body = body[: limit + 1 - request.body_bytes]
            request.early = True
            self._queue(request)
        request.body += body
        request.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.progress = True
        request = self.current
        self.current = None
        if request is None or request.early:
            return
        request.keep_alive = self.parser.should_keep_alive()
        self._queue(request)
        if not request.keep_alive:
            self.input_ended = True  # the last request of the connection: nothing after it

    # --- answering ----------------------------------------------------------------------------

    def _queue(self, request: _Request) -> None:
        """A request parsed (or handed over early): it waits in ``ready`` for its turn."""
        self.ready.append(request)
        self.queued_bytes += len(request.target) + request.body_bytes

    def _continue_if_due(self) -> None:
        """Send the 100 Continue owed to the request being parsed once all before it are
        answered (nothing in hand, nothing parsed ahead of it)."""
        request = self.current
        if (
            request is not None
            and request.expect_continue
            and not self.busy
            and not self.ready
            and not self.closing
            and self.transport is not None
            and not self.closed
        ):
            request.expect_continue = False
            self.transport.write(_CONTINUE)

    def _next(self) -> None:
        """Start the app on the oldest parsed request, unless one is in hand already.

        A loop, not a recursion: a request answered at once (a 400 that needs no broker)
        calls this again from its answer, and one read of a few hundred pipelined such
        requests went that many calls deep, to a RecursionError that killed the connection
        with a traceback in the log. A call made while this runs only asks it to go round
        once more.
        """
        if self.advancing:
            self.advance_again = True
            return
        self.advancing = True
        try:
            self.advance_again = True
            while self.advance_again:
                self.advance_again = False
                self._start_next()
        finally:
            self.advancing = False

    def _start_next(self) -> None:
        if self.busy or not self.writable or self.closed or self.closing:
            return
        if not self.ready:
            self._continue_if_due()
            return
        request = self.ready.popleft()
        self.queued_bytes = max(0, self.queued_bytes - len(request.target) - request.body_bytes)
        if not self.ready:
            self.queued_bytes = 0  # an early request's body grows after it is queued: no drift
        if request.early:  # its body is unread: nothing after it can be parsed
            self.closing = True
            self.lingering = True
            self.ready.clear()
        self.busy = True
        self._maybe_resume_reading()
        server = self.server
        started = server.loop.time()
        if server.shortcut is not None and not request.early:
            try:
                taken = server.shortcut(request.method, request.target, request.headers)
            except Exception:  # a bug: not the app's to answer, something may have been sent
                server.logs.error(
                    "shortcut failed",
                    "the shortcut failed on %r",
                    request.target[:SHOWN_TARGET_BYTES],
                    exc_info=True,
                )
                self.busy = False
                self._refuse(500, "internal server error")
                return
            if taken is not None:
                server.shortcut_requests += 1
                future, finish = taken
                future.add_done_callback(lambda done: self._finish(request, started, done, finish))
                return
        server.app_requests += 1
        environ = server.environ(self, request)
        runners = server.runners
        glet = runners.pop() if runners else greenlet.greenlet(_runner)
        self._step(request, environ, started, glet, ((server.app, environ),))

    def _finish(
        self,
        request: _Request,
        started: float,
        done: asyncio.Future[Any],
        finish: Callable[[asyncio.Future[Any]], Response],
    ) -> None:
        """Answer a request the shortcut took, now that its future is done."""
        self.busy = False
        try:
            status, headers, body = finish(done)
        except (Exception, asyncio.CancelledError):  # the connection must not stay busy
            self.server.logs.error(
                "shortcut failed",
                "the shortcut failed on %r",
                request.target[:SHOWN_TARGET_BYTES],
                exc_info=True,
            )
            self._refuse(500, "internal server error")
            return
        self._respond(request, started, status, headers, body)
        self._next()
        self._close_if_done()

    def _step(
        self,
        request: _Request,
        environ: dict[str, Any],
        started: float,
        glet: greenlet.greenlet,
        args: tuple[Any, ...],
    ) -> None:
        """Run the request's greenlet until it parks on a future or finishes."""
        result = glet.switch(*args)
        if isinstance(result, list):  # the runner's answer (see _runner), taken out of it
            result = result.pop()
        if isinstance(result, asyncio.Future):
            result.add_done_callback(lambda _: self._step(request, environ, started, glet, ()))
            return
        self.busy = False
        runners = self.server.runners
        if len(runners) < MAX_IDLE_RUNNERS:
            runners.append(glet)
        if isinstance(result, _Failed):
            self.server.logs.error(
                "app failed",
                "the app failed on %s %r",
                environ["REQUEST_METHOD"],
                request.target[:SHOWN_TARGET_BYTES],
                exc_info=result.error,
            )
            self._refuse(500, "internal server error")
            return
        status, headers, body, closer = result
        del result
        stream = environ.pop(STREAM_KEY, None)
        if stream is not None and status[:3] == "200":
            self._respond(request, started, status, headers, b"", streaming=True)
            if closer is not None:
                self.after_sent.append(closer)
            self.busy = True  # nothing more is answered on this connection
            self.stream_task = self.server.loop.create_task(self._stream(stream))
            return
        self._respond(request, started, status, headers, body)
        del body
        if closer is not None:
            self.after_sent.append(closer)
            if self.writable or self.closed:
                self._sent()  # out of the buffer already (or going nowhere)
        self._next()
        self._close_if_done()

    async def _stream(self, run: Callable[[StreamOut], Any]) -> None:
        """Send a streamed response's body (see the module docstring), then close."""
        out = self.stream_out = StreamOut(self._stream_write, self._stream_writable)
        try:
            await run(out)
        except asyncio.CancelledError:
            pass  # the client left, or the server stops
        except Exception:
            self.server.logs.error("stream failed", "a streamed response failed", exc_info=True)
        finally:
            self.stream_out = None
            self.stream_task = None
            self.busy = False
            self._close_if_done()

    def _stream_write(self, data: bytes) -> bool:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    def _stream_writable(self) -> bool:
        return self.writable and not self.closed

    def _respond(
        self,
        request: _Request,
        started: float,
        status: str,
        headers: list[tuple[str, str]],
        body: bytes,
        streaming: bool = False,
    ) -> None:
        if self.closed or self.transport is None:
            return  # the client left; its answer goes nowhere
        self.last_active = self.server.loop.time()
        close = (
            streaming  # its end is the end of the connection
            or request.early
            or not request.keep_alive
            or self.closing
            or (self.input_ended and not self.ready)  # the last answer before closing
            or self.server.stopping
        )
        code = int(status[:3])
        head = bytearray(b"HTTP/1.1 " + status.encode("latin-1") + b"\r\n")
        has_length = has_date = False
        for name, value in headers:
            raw_name = name.encode("latin-1")
            lowered = raw_name.lower()
            if lowered in _HOP_BY_HOP:
                continue
            if lowered == b"content-length":
                if streaming:
                    continue  # the app's own (of its empty body) would end the stream at once
                has_length = True
            elif lowered == b"date":
                has_date = True
            head += raw_name + b": " + value.encode("latin-1") + b"\r\n"
        if request.method == b"HEAD" or code < 200 or code in (204, 304):
            body = b""
        elif not has_length and not streaming:
            head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        if not has_date:
            head += b"Date: " + self.server.dates.get() + b"\r\n"
        if close:
            head += b"Connection: close\r\n"
            self.closing = True
        elif request.version == "1.0":
            head += b"Connection: keep-alive\r\n"
        head += b"\r\n"
        self.transport.write(bytes(head + body) if len(body) < 65536 else bytes(head))
        if len(body) >= 65536:
            # A view: what the socket does not take at once is copied into the transport's
            # buffer from it, without a slice of the body first (one copy of a large answer,
            # not two, once the caller lets go of the body).
            self.transport.write(memoryview(body))
        stats = self.server.config.stats
        if stats is not None:
            stats.record(request.method, request.target, code, self.server.loop.time() - started)
        if self.server.config.access_log:
            access_log.info(
                '%s "%s %s HTTP/%s" %d %d %.1fms',
                self.peer,
                request.method.decode("latin-1"),
                request.target[:SHOWN_TARGET_BYTES].decode("latin-1"),
                request.version,
                code,
                len(body),
                (self.server.loop.time() - started) * 1000,
            )

    def _bad_input(self, exc: Exception) -> None:
        if self.coding_unframed:
            self._refuse(400, "Transfer-Encoding must end with chunked (the body's length)")
        elif self.coding_refused is not None:
            coding = self.coding_refused.decode("latin-1")
            self._refuse(501, f"transfer coding {coding!r} is not implemented; only chunked is")
        elif self.head_too_large:
            self._refuse(
                431, f"request head larger than {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields"
            )
        elif self.url_too_long:
            limit = self.server.config.max_set_target_bytes
            self._refuse(
                414,
                f"request target longer than {LIMIT_REQUEST_LINE_BYTES} bytes (seed /set: "
                f"{limit} bytes)",
            )
        else:
            self._refuse(400, f"malformed HTTP request: {exc}")

    def _refuse(self, status: int, message: str) -> None:
        """Answer an error of this server's own as JSON, then close (after the answer in hand).

        At most once per connection: after it, the connection is closing (or lingering, its
        output shut down), and a second answer would be a write after ``write_eof()``.
        """
        self.ready.clear()
        self.queued_bytes = 0
        self.closing = True
        self.lingering = True
        if self.refused or self.linger_until:
            return
        if self.busy or self.transport is None or self.closed or self.transport.is_closing():
            return  # a request in hand is answered first, and the connection closed after it
        self.refused = True
        body = json.dumps({"error": message}).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode()
        self.transport.write(
            head + b"Date: " + self.server.dates.get() + b"\r\nConnection: close\r\n\r\n" + body
        )
        if self.server.config.stats is not None:  # counted as route "other", without a time
            self.server.config.stats.record(b"", b"", status, 0.0)
        if self.server.config.access_log:
            # A refusal costs its peer nothing (no app, no cluster): rate-limited, unlike the
            # access lines of requests served.
            self.server.access_logs.info(
                f"refused {status}",
                "%s %d %d (refused: %s)",
                self.peer,
                status,
                len(body),
                message,
            )
        self._close_if_done()

    # --- lifecycle ----------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self.reading and self.transport is not None and not self.closed:
            self.reading = False
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (
            not self.reading
            and self.writable
            and len(self.ready) < MAX_QUEUED_REQUESTS
            and self.queued_bytes < MAX_QUEUED_INPUT_BYTES
            and self.transport is not None
            and not self.closed
        ):
            self.reading = True
            self.transport.resume_reading()

    def _close_if_done(self) -> None:
        """Close when closing (or out of input) and nothing is left to answer."""
        if self.busy or self.closed or self.transport is None or self.linger_until:
            return  # answering, gone, or lingering (ended by the client's EOF or the sweep)
        if self.closing or (self.input_ended and not self.ready):
            if self.lingering and not self.input_ended and self.transport.can_write_eof():
                # Input may still be on its way (an unread body): closing now could make the
                # kernel reset the connection and lose the answer. Send it, shut down our
                # side, and discard what comes until the client closes or LINGER_S passes.
                self.transport.write_eof()
                self.linger_until = self.server.loop.time() + LINGER_S
                self.input_ended = True
                return
            self.close()

    def close(self) -> None:
        """Close once what is written has gone (asyncio flushes before it closes)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def idle(self) -> bool:
        """Nothing in hand, nothing parsed or half-parsed."""
        return not self.busy and not self.ready and self.current is None

    def waiting_since(self) -> float | None:
        """Since when this connection has waited on its client (a request begun and not
        finished, or idle on keep-alive), None when the server owes it something: it may then
        be evicted to make room for another (see :meth:`HttpServer.adopt`)."""
        if self.busy or self.ready or self.closing or self.closed or self.linger_until:
            return None
        if self.current is not None:
            return self.started
        return self.last_active

    def evict(self) -> None:
        """Close this waiting connection for a newcomer; a request begun gets a 408 first.

        An evicted connection leaves the server's tables at once (its slot is the newcomer's),
        so no sweep watches its output any more: a client that has not read what it was sent
        is aborted now, and the rest are aborted ``evict_grace_s`` later if their close has
        not finished (asyncio's close() waits for the output to drain, forever). Evicting
        slow readers that way once pinned 6 MiB answers per connection for good.
        """
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size():
            self.closing = True
            transport.abort()
            return
        if self.current is not None:
            self._refuse(408, "request not received whole; its connection was needed by another")
        self.closing = True
        self.close()  # once the 408 has gone
        if transport is not None:
            self.server.loop.call_later(self.server.config.evict_grace_s, self._abort_unless_closed)

    def _abort_unless_closed(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def check_timeouts(self, now: float) -> None:
        """Close an idle connection past its keep-alive, answer 408 to a stalled request,
        abort one whose output has not drained within ``write_timeout_s``."""
        config = self.server.config
        if self.write_blocked_since and now - self.write_blocked_since > config.write_timeout_s:
            # Also when closing: asyncio's close() waits for the output to drain, forever.
            self.server.logs.info(
                "write timeout",
                "%s: output not read for %.1f s, aborting",
                self.peer,
                config.write_timeout_s,
            )
            if self.transport is not None:
                self.transport.abort()  # its buffered output goes with it
        elif self.linger_until:
            if now > self.linger_until:
                self.close()
        elif self.closing or self.busy or self.ready:
            return  # answering, or refused already: the answer's end or the linger closes it
        elif self.current is not None:
            if now - self.started > config.read_timeout_s:
                self._refuse(408, f"request not received whole within {config.read_timeout_s} s")
        elif now - self.last_active > config.keepalive_s:
            self.close()


class HttpServer:
    """One process's HTTP server: the listeners, the connections, their timeouts, the stop.

    Args:
        app: the WSGI app; each call runs in a greenlet of its own.
        config: limits and timeouts.
        loop: the event loop this server runs on.
        server_name, server_port: ``SERVER_NAME`` and ``SERVER_PORT`` of every environ.
        shortcut: offered every request first (see :data:`Shortcut`); None: the app serves all.
        clock: monotonic seconds for the rate limits of log lines (tests inject a fake).
        tls: serve HTTPS with this context (its handshake within ``read_timeout_s``); None:
            plain HTTP.
    """

    def __init__(
        self,
        app: WsgiApp,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        server_name: str = "127.0.0.1",
        server_port: int = 0,
        shortcut: Shortcut | None = None,
        clock: Callable[[], float] = time.monotonic,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.app = app
        self.tls = tls
        # Every line a peer can cause (a refusal, a parse error, a stalled reader, a bug it
        # triggers) is rate-limited: at most BURST (5) of a kind per WINDOW_S (10 s), then a
        # count of those suppressed (zkv/logs.py). Kinds are fixed strings, never peer input.
        self.logs = LogLimiter(log, clock=clock)
        self.access_logs = LogLimiter(access_log, clock=clock)
        self.shortcut = shortcut
        self.shortcut_requests = 0  # requests the shortcut took, for the log
        self.app_requests = 0  # requests the app was called for
        self.config = config
        self.loop = loop
        self.dates = _DateCache()
        self.stopping = False
        self.connections: set[HttpConnection] = set()
        self.handshakes = 0  # TLS handshakes under way, and by client address (see _accept)
        self.handshaking: dict[str, int] = {}
        self.per_client: dict[str, set[HttpConnection]] = {}  # adopted connections by address
        self.runners: list[greenlet.greenlet] = []  # idle request greenlets (see _runner)
        self.limited_log = LogLimiter(log)  # evictions: one line each, rate-limited
        self._listeners: list[socket.socket] = []
        self._accept_paused_until = 0.0
        self._sweeper: asyncio.TimerHandle | None = None
        self._swept_last = False  # stopped: the sweep is not scheduled again
        self._base_environ: dict[str, Any] = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": server_name,
            "SERVER_PORT": str(server_port),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http" if tls is None else "https",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            STREAMS_KEY: True,
        }

    async def start(self, sockets: Iterable[socket.socket]) -> None:
        """Serve on these listening sockets (already bound and listening)."""
        for sock in sockets:
            sock.setblocking(False)
            self._listeners.append(sock)
            self.loop.add_reader(sock.fileno(), self._accept, sock)
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def _accept(self, listener: socket.socket) -> None:
        """Take one new connection.

        One per wake-up, on purpose: the processes of a gunicorn master share one listening
        socket and all wake for a new connection. asyncio's own server accepts up to its
        backlog at once, so the first process to wake took most of a burst (seen: 45 of 64
        connections, that process saturated while the other idled). One at a time, the
        processes take turns.
        """
        if self.loop.time() < self._accept_paused_until:
            return
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another process took it
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: out of resources; try again soon
            self.logs.warning(
                "accept failed",
                "accept failed: %s; pausing accepts for %.1f s",
                exc,
                ACCEPT_PAUSE_S,
            )
            self._accept_paused_until = self.loop.time() + ACCEPT_PAUSE_S
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            made = self.loop.connect_accepted_socket(lambda: HttpConnection(self), sock)
            self.loop.create_task(self._connected(made, sock, None))
            return
        # A TLS connection costs its buffers (about 300 KB in asyncio) from the accept on, but
        # counts against the connection limits only once its handshake is done: connections
        # that never finished one took 1.6 GB (a hostile test). So pending handshakes have
        # limits of their own; past them the connection is closed at once, before any TLS.
        client = str(address[0]) if isinstance(address, tuple) and address else "-"
        pending = self.handshaking.get(client, 0)
        if self.handshakes >= MAX_PENDING_HANDSHAKES or pending >= MAX_CLIENT_HANDSHAKES:
            self.logs.warning(
                "handshakes",
                "closed a new TLS connection from %s: %d handshakes pending (%d from it; "
                "at most %d, %d from one address)",
                client,
                self.handshakes,
                pending,
                MAX_PENDING_HANDSHAKES,
                MAX_CLIENT_HANDSHAKES,
            )
            sock.close()
            return
        self.handshakes += 1
        self.handshaking[client] = pending + 1
        made = self.loop.connect_accepted_socket(
            lambda: HttpConnection(self),
            sock,
            ssl=self.tls,
            ssl_handshake_timeout=min(self.config.read_timeout_s, HANDSHAKE_TIMEOUT_S),
        )
        self.loop.create_task(self._connected(made, sock, client))

    async def _connected(self, made: Any, sock: socket.socket, client: str | None) -> None:
        """Await a new connection's setup; a failed TLS handshake (a plain HTTP client on the
        HTTPS port, a scanner) closes it with one rate-limited line, not a task error.
        ``client``: a TLS connection's address, whose pending handshake ends here."""
        try:
            await made
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.logs.info("setup failed", "a new connection failed to set up: %s", exc)
            sock.close()
        finally:
            if client is not None:
                self.handshakes -= 1
                left = self.handshaking.pop(client, 1) - 1
                if left > 0:
                    self.handshaking[client] = left

    def adopt(self, connection: HttpConnection) -> str | None:
        """Take a new connection; else why not (stopping, or over a limit with no connection
        to evict: see :meth:`_evict_for`)."""
        if self.stopping:
            return "the server is stopping"
        client = connection.client
        mine = self.per_client.get(client)
        limit = self.config.max_connections_per_client
        if mine is not None and len(mine) >= limit and not self._evict_for(mine):
            return f"too many connections from {client} (at most {limit} per gateway process)"
        if len(self.connections) >= self.config.max_connections and not self._evict_for(
            self.connections
        ):
            return "too many connections"
        if mine is None:
            mine = self.per_client[client] = set()
        mine.add(connection)
        self.connections.add(connection)
        return None

    def _evict_for(self, candidates: set[HttpConnection]) -> bool:
        """Make room for a new connection: close the one of ``candidates`` that has waited
        longest on its client, if that is over ``evict_after_s``; whether one was closed.

        A limit that refuses newcomers lets whoever holds the slots keep everyone else out: a
        slowloris from 127.0.0.1, where every local client shares one address, took the 100
        slots of the address and 95 of 100 other local requests got 503. A connection waiting
        on an unfinished request or idle on keep-alive is the cheapest to lose (its client
        sent a request that was slow to arrive, or nothing), and one that has waited over a
        second is no request arriving at the pace of a working client. A scan of the
        candidates, only when a limit is reached: at most ``max_connections`` steps.
        """
        deadline = self.loop.time() - self.config.evict_after_s
        victim: HttpConnection | None = None
        oldest = deadline
        for candidate in candidates:
            since = candidate.waiting_since()
            if since is not None and since <= oldest:
                victim, oldest = candidate, since
        if victim is None:
            return False
        self.limited_log.info(
            "evict",
            "%s: closed after waiting %.1f s on its client, for a new connection over a limit",
            victim.peer,
            self.loop.time() - oldest,
        )
        victim.evict()
        self.forget(victim)
        return True

    def forget(self, connection: HttpConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            mine = self.per_client.get(connection.client)
            if mine is not None:
                mine.discard(connection)
                if not mine:
                    del self.per_client[connection.client]

    def _sweep(self) -> None:
        """Every SWEEP_S: the timeouts of every connection. One connection's failure is
        logged and the connection aborted; the sweep always runs again, or no timeout of this
        process would ever fire after it."""
        try:
            now = self.loop.time()
            for connection in list(self.connections):
                try:
                    connection.check_timeouts(now)
                except Exception:
                    self.logs.error(
                        "timeout check failed",
                        "timeout check failed on %s; aborting it",
                        connection.peer,
                        exc_info=True,
                    )
                    if connection.transport is not None:
                        connection.transport.abort()
        finally:
            if self.config.stats is not None:
                self.config.stats.flush()  # publish this process's HTTP counts
            if not self._swept_last:
                self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, give the others ``grace_s`` to finish."""
        self.stopping = True
        for listener in self._listeners:
            self.loop.remove_reader(listener.fileno())
            listener.close()  # this process's copy: the kernel queues nothing more for it
        self._listeners.clear()
        deadline = self.loop.time() + grace_s
        for connection in list(self.connections):
            if connection.stream_task is not None:
                connection.stream_task.cancel()  # a stream has no end of its own
        while True:
            for connection in list(self.connections):
                if connection.idle():
                    connection.close()
                else:
                    connection.closing = True
            if not self.connections or self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        self._swept_last = True
        if self._sweeper is not None:
            self._sweeper.cancel()

    def environ(self, connection: HttpConnection, request: _Request) -> dict[str, Any]:
        """The WSGI environ of one request."""
        environ = self._base_environ.copy()
        target = request.target
        if target[:1] != b"/" and target != b"*":
            target = _origin_form(target)
        path, _, query = target.partition(b"?")
        path = path.partition(b"#")[0]
        query = query.partition(b"#")[0]
        environ["REQUEST_METHOD"] = request.method.decode("latin-1")
        environ["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
        environ["QUERY_STRING"] = query.decode("latin-1")
        environ["RAW_URI"] = request.target.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/" + request.version
        host, _, port = connection.peer.rpartition(":")
        environ["REMOTE_ADDR"] = host
        environ["REMOTE_PORT"] = port
        for name, value in request.headers:
            if b"_" in name:
                continue  # HTTP_X_FOO must not be forgeable as "X_Foo" (gunicorn drops them too)
            key = name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                environ[key] = text
                continue
            key = "HTTP_" + key
            previous = environ.get(key)
            environ[key] = text if previous is None else previous + "," + text
        environ["wsgi.input"] = io.BytesIO(request.body)
        return environ


def _escaped(run: re.Match[bytes]) -> bytes:
    """A run of bytes above 0x7F, each as %XX (one C call for the run, not one per byte)."""
    return b"%" + run.group().hex("%").upper().encode()


def _origin_form(target: bytes) -> bytes:
    """The path and query of an absolute-form target (``http://host/path?q``)."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return target
    path = url.path or b"/"
    return path + b"?" + url.query if url.query else path
