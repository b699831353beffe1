"""gunicorn's thread worker (``--worker-class gthread``), answering as the event worker does.

gunicorn's own HTTP/1.1 parser stands in front of the app in this worker class, and left alone
it answered differently from gateway/http11.py: its errors were HTML pages, a raw UTF-8 byte in
a request target (``/get?key=ключ``, which the seed's Flask took) was a 400, and no request
line could pass 8190 bytes, so a seed ``/set`` of a value over about 8 KB was a 414. Here:

* a transfer coding other than ``chunked`` is refused (501), as by the event worker;
* every error gunicorn answers itself is ``{"error": "..."}`` JSON with the status gunicorn
  chose (:meth:`ThreadWorker.handle_error`), its log lines rate-limited (zkv/logs.py);
* the request line is read by :meth:`ZkvRequest.read_line`: bytes above 0x7F are written %XX
  before gunicorn checks the line (the app decodes the same path and query), and the line may
  be as long as a seed ``/set`` needs (``max_set_target_bytes`` of the server's config, the
  bound the event worker applies), every other line 8190 bytes. The line is read into one
  buffer, scanned once (gunicorn's own copies the whole buffer at every read).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import re
import socket
import ssl
import struct
from typing import Any

from gunicorn import util
from gunicorn.http import errors
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.workers import gthread

from gateway.http11 import LIMIT_REQUEST_LINE_BYTES, set_target_limit
from zkv import defaults
from zkv.logs import LogLimiter

log = logging.getLogger(__name__)
limited = LogLimiter(log)

# Room for the method, spaces and version around a /set target: "GET " and " HTTP/1.1".
LINE_OVERHEAD_BYTES = 32
_SEED_SET_LINE = re.compile(rb"[A-Z]{1,16} /set\?")
_HIGH_BYTES = re.compile(rb"[\x80-\xff]+")

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
}


def _escaped(run: re.Match[bytes]) -> bytes:
    return b"%" + run.group().hex("%").upper().encode()


class ZkvRequest(Request):
    """gunicorn's request, its request line read as gateway/http11.py reads it.

    Args:
        max_set_target_bytes: the longest target of a seed ``/set``.
    """

    def __init__(self, *args: Any, max_set_target_bytes: int, **kwargs: Any) -> None:
        self.max_set_target_bytes = max_set_target_bytes
        super().__init__(*args, **kwargs)  # parses the head

    def read_line(self, unreader: Any, buf: bytearray, limit: int = 0) -> tuple[bytes, bytearray]:
        """The request line (its bytes above 0x7F %-escaped) and what follows it.

        Raises:
            errors.InvalidRequestLine: a bare LF before the line's CRLF.
            errors.LimitRequestLine: longer than 8190 bytes, or a seed /set line longer than
                its target's bound (plus LINE_OVERHEAD_BYTES).
        """
        scanned = 0
        while True:
            end = buf.find(b"\r\n", max(0, scanned - 1))
            if buf.find(b"\n", scanned, end if end >= 0 else len(buf)) >= 0:
                raise errors.InvalidRequestLine("bare LF as line terminator")
            length = end if end >= 0 else len(buf)
            if length > LIMIT_REQUEST_LINE_BYTES:
                bound = LIMIT_REQUEST_LINE_BYTES
                if _SEED_SET_LINE.match(buf):
                    bound = self.max_set_target_bytes + LINE_OVERHEAD_BYTES
                if length > bound:
                    raise errors.LimitRequestLine(length, bound)
            if end >= 0:
                break
            scanned = len(buf)
            self.read_into(unreader, buf)
        line = bytes(buf[:end])
        if not line.isascii():
            line = _HIGH_BYTES.sub(_escaped, line)
        return line, buf[end + 2 :]


# A request begun must arrive whole within this long between two reads (the event worker's
# read_timeout_s bounds the whole request): without it a client that stopped half-way held one
# of the worker's threads for ever, and as many such clients as threads locked everyone out (a
# hostile test: 8 connections froze a gateway of 8 threads). Past it the connection closes.
READ_TIMEOUT_S = 10.0


class _TimedSource:
    """The connection's socket as gunicorn's parser reads it: each recv waits at most
    READ_TIMEOUT_S (SO_RCVTIMEO, set on the connection), and a wait that ran out ends the
    request as a client gone away (gunicorn's NoMoreData: the connection closes quietly)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def recv(self, size: int) -> bytes:
        try:
            return self._sock.recv(size)
        except (BlockingIOError, TimeoutError) as exc:  # SO_RCVTIMEO ran out (EAGAIN)
            limited.info("read timeout", "a request did not arrive whole within %.0f s: %s",
                         READ_TIMEOUT_S, exc)  # fmt: skip
            raise errors.NoMoreData(b"") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _bound_reads(sock: Any) -> None:
    """Make a blocking recv on ``sock`` give up after READ_TIMEOUT_S (the kernel's
    SO_RCVTIMEO: it holds whatever Python's setblocking() says later)."""
    seconds = int(READ_TIMEOUT_S)
    micros = int((READ_TIMEOUT_S - seconds) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))


class ZkvRequestParser(RequestParser):
    """gunicorn's HTTP/1.x parser making :class:`ZkvRequest` objects."""

    def __init__(self, cfg: Any, source: Any, source_addr: Any, max_set_target_bytes: int):
        super().__init__(cfg, _TimedSource(source), source_addr)
        self.mesg_class = functools.partial(ZkvRequest, max_set_target_bytes=max_set_target_bytes)


class ZkvConn(gthread.TConn):
    """gunicorn's connection of the thread worker, with :class:`ZkvRequestParser`."""

    def __init__(self, *args: Any, max_set_target_bytes: int) -> None:
        super().__init__(*args)
        self.max_set_target_bytes = max_set_target_bytes

    def init(self) -> None:
        fresh = not self.initialized
        super().init()  # wraps TLS, makes gunicorn's parser
        if fresh:
            _bound_reads(self.sock)
        if fresh and type(self.parser) is RequestParser:  # not HTTP/2, nothing read yet
            self.parser = ZkvRequestParser(
                self.cfg, self.sock, self.client, self.max_set_target_bytes
            )


class ThreadWorker(gthread.ThreadWorker):
    """gunicorn's ``gthread`` worker with zkv's request line and JSON errors."""

    def max_set_target_bytes(self) -> int:
        """The server config's bound (gateway/server.py), else the one of the default limits."""
        config = getattr(self.app, "http_config", None)
        if config is not None:
            return int(config.max_set_target_bytes)
        return set_target_limit(defaults.MAX_KEY_BYTES, defaults.MAX_VALUE_BYTES)

    def accept(self, listener: Any) -> None:
        """gunicorn's accept, making a :class:`ZkvConn`."""
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = ZkvConn(
                self.cfg,
                client_sock,
                client_addr,
                listener.getsockname(),
                max_set_target_bytes=self.max_set_target_bytes(),
            )
            self.enqueue_req(conn)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise

    def handle_request(self, req: Any, conn: Any) -> bool:
        """gunicorn's, after refusing a transfer coding other than chunked as the event worker
        does (gunicorn passes ``gzip, chunked`` bodies on still compressed)."""
        for name, value in req.headers:
            if name == "TRANSFER-ENCODING" and any(
                coding.strip(" \t").lower() not in ("chunked", "") for coding in value.split(",")
            ):
                raise errors.UnsupportedTransferCoding(value)
        return bool(super().handle_request(req, conn))

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer an error of gunicorn's own as JSON (it wrote an HTML page), then close."""
        status, message = error_answer(exc, self.max_set_target_bytes())
        peer = addr[0] if isinstance(addr, tuple) and addr else "-"
        if status >= 500:
            limited.error("500", "error handling a request from %s: %r", peer, exc, exc_info=exc)
        else:
            # Kinds are fixed strings, never input: a flood of bad requests is a few lines.
            limited.info(f"refused {status}", "refused a request from %s: %d %s", peer, status,
                         message)  # fmt: skip
        body = json.dumps({"error": message}).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            util.write_nonblock(client, head + body)
        except Exception:
            log.debug("could not send the error answer to %s", peer)


def error_answer(exc: BaseException, max_set_target_bytes: int) -> tuple[int, str]:
    """The status and message that answer a request gunicorn failed to read or serve."""
    if isinstance(exc, errors.LimitRequestLine):
        return 414, (
            f"request target longer than {LIMIT_REQUEST_LINE_BYTES} bytes (seed /set: "
            f"{max_set_target_bytes} bytes)"
        )
    if isinstance(exc, errors.LimitRequestHeaders):
        return 431, f"request head too large: {exc}"
    if isinstance(exc, errors.UnsupportedTransferCoding):
        return 501, f"transfer coding not implemented; only chunked is: {exc}"
    if isinstance(exc, errors.ExpectationFailed):
        return 417, str(exc)
    if isinstance(exc, errors.ForbiddenProxyRequest):
        return 403, "request forbidden"
    if isinstance(exc, errors.InvalidResponseHeader | errors.InvalidResponseHeaderName):
        return 500, "internal server error"  # the app's fault, not the client's
    if isinstance(exc, errors.ConfigurationProblem):
        return 500, "internal server error"
    if isinstance(exc, errors.ParseException | errors.NoMoreData):
        return 400, f"malformed HTTP request: {str(exc)[:200]}"
    if isinstance(exc, ssl.SSLError):
        return 400, "malformed TLS connection"
    return 500, "internal server error"
