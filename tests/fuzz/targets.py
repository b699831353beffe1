"""Fuzz targets: functions of one byte string that raise only when they find a bug.

Each target turns its input into something a hostile peer could send and feeds it to the code
that reads it, then checks what that code promises:

* :func:`protocol_target`: frames for every decoder of zkv/protocol.py. Only ProtocolError may
  escape, and the fast paths agree with the general ones they shortcut (``peek_keyed_request`` with
  ``decode_request``, ``peek_reply`` with ``decode_reply``, ``batch_reply_answers`` with
  ``split_batch_reply``, ``split_batch`` with ``decode_batch``, ``peek_keyed_dispatch`` with
  ``decode_from_broker``); a keyed request reads the same alone and as a batch record (and
  reaches a worker as a plain op or EXTENDED_OP with the same fields); what decodes
  re-encodes to the same message (requests, replies, batches, events, the issue-12 reply
  bodies and extension block).
* :func:`http_target`: raw bytes, in pieces, into one connection of gateway/http11.py's server in
  front of the gateway's Bottle app and fast lane (over an in-memory store, no sockets, no
  cluster). Every answer is 2xx or 4xx (501 for a transfer coding), errors are
  ``{"error": "..."}`` JSON, nothing is logged as a failure, and what is written on the wire
  parses as HTTP responses; after the client's EOF the connection closes.
* :func:`wsgi_target`: a WSGI environ built from the input (method, path bytes, query,
  headers, body, a Content-Length that may lie) straight into the Bottle app: the same
  promises, and a REST PUT stores exactly the key of its path, a seed /set what /get of the
  same query string reads back.

They run under atheris (tests/fuzz/__main__.py: ``python -m tests.fuzz``), which gives them
coverage-guided inputs, and as plain functions in tests/unit/test_fuzz.py, which replays the
inputs that once found a bug and each target's seeds (:data:`TARGETS`). Nothing here
imports atheris.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

from gateway.app import SeedApi, make_app
from gateway.fastlane import FastLane
from gateway.http11 import HttpConnection, HttpServer, ServerConfig
from zkv import protocol
from zkv.calls import Lock
from zkv.client import Item, NotFound
from zkv.protocol import (
    Batch,
    BatchReply,
    Dispatch,
    Entry,
    Kind,
    ProtocolError,
    Reply,
    Request,
)

# Small limits, so that short inputs reach the refusals (413, 414, 431) as well as successes.
MAX_KEY_BYTES = 16
MAX_VALUE_BYTES = 64
MAX_INPUT_BYTES = 4096  # libFuzzer's -max_len for every target: inputs past it are cut

Target = Callable[[bytes], None]


class Finding(AssertionError):
    """A broken promise found by a target (an unexpected exception is one too)."""


class Input:
    """Reads typed values off the front of a fuzz input, as atheris's FuzzedDataProvider does,
    but in plain Python so that a found input replays without atheris. Past the end, every
    read gives zeros or empty bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def left(self) -> int:
        return len(self.data) - self.offset

    def byte(self) -> int:
        if self.offset >= len(self.data):
            return 0
        self.offset += 1
        return self.data[self.offset - 1]

    def take(self, size: int) -> bytes:
        piece = self.data[self.offset : self.offset + size]
        self.offset += len(piece)
        return piece

    def sized(self) -> bytes:
        """A piece whose length is the next two bytes (capped by what is left)."""
        size = (self.byte() << 8) | self.byte()
        return self.take(size)

    def rest(self) -> bytes:
        return self.take(self.left())


# --- zkv/protocol.py --------------------------------------------------------------------------


def frames_of(data: bytes) -> list[bytes]:
    """The input as frames: the first byte says how many (0 to 3), each then ``sized()``; the
    last takes the rest."""
    source = Input(data)
    count = source.byte() % 4
    frames = [source.sized() for _ in range(max(0, count - 1))]
    if count:
        frames.append(source.rest())
    return frames


def _refused(call: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, result)``, or ``(False, error)`` for a ProtocolError; anything else escapes."""
    try:
        return True, call()
    except ProtocolError as exc:
        return False, exc


def protocol_frames(frames: list[bytes]) -> None:
    """Every decoder on ``frames``, and the fast paths against the general ones."""
    ok, request = _refused(lambda: protocol.decode_request(frames))
    keyed = protocol.peek_keyed_request(frames)
    if keyed is not None:
        if not ok:
            raise Finding(f"peek_keyed_request accepts what decode_request refuses: {request}")
        kind, request_id, key, ttl_ms, stamp = keyed
        got = (request.kind, request.request_id, request.key, request.ttl_ms, request.stamp)
        if got != (kind, request_id, bytes(key), ttl_ms, stamp):
            raise Finding(f"peek_keyed_request {keyed!r} != decode_request {request!r}")
    if ok:
        again = protocol.decode_request(protocol.encode_request(request))
        if again != _without_stamp_of_reads(request):
            raise Finding(f"request does not survive encode/decode: {request!r} -> {again!r}")
        if request.kind in protocol.KEYED_COMMANDS:
            _same_in_a_batch(frames, request)

    ok, reply = _refused(lambda: protocol.decode_reply(frames))
    peeked = protocol.peek_reply(frames)
    if (peeked is not None) != ok:
        raise Finding(f"peek_reply {peeked!r} disagrees with decode_reply {reply!r}")
    if ok:
        if peeked != (reply.status, reply.token):
            raise Finding(f"peek_reply {peeked!r} != decode_reply {reply!r}")
        if protocol.decode_reply(protocol.encode_reply(reply)) != reply:
            raise Finding(f"reply does not survive encode/decode: {reply!r}")

    ok, batch = _refused(lambda: protocol.decode_batch(frames))
    split_ok, split = _refused(lambda: protocol.split_batch(frames))
    if ok:
        if not split_ok:
            raise Finding(f"split_batch refuses what decode_batch accepts: {split}")
        batch_id, subs = split
        if batch_id != batch.batch_id or [(s[0], s[1]) for s in subs] != [
            (r.kind, r.request_id) for r in batch.requests
        ]:
            raise Finding(f"split_batch {split!r} disagrees with decode_batch {batch!r}")
        if any(sub[0] == 0 for sub in subs):
            raise Finding(f"split_batch marks as malformed a record decode_batch accepts: {subs}")
        if protocol.decode_batch(protocol.encode_batch(batch)) != Batch(
            batch.batch_id, tuple(_without_stamp_of_reads(r) for r in batch.requests)
        ):
            raise Finding(f"batch does not survive encode/decode: {batch!r}")
    elif split_ok:
        _, subs = split
        if all(sub[0] != 0 for sub in subs):
            raise Finding(f"decode_batch refuses ({batch}) a batch split_batch finds whole")

    ok, replies = _refused(lambda: protocol.split_batch_reply(frames))
    answers_ok, answers = _refused(lambda: protocol.batch_reply_answers(frames))
    if ok != answers_ok:
        raise Finding(f"split_batch_reply {replies!r} vs batch_reply_answers {answers!r}")
    if ok:
        token, subs = replies
        if answers != [(s, r, d, b) for s, r, _, d, b in subs]:
            raise Finding(f"batch_reply_answers {answers!r} != split_batch_reply {subs!r}")
        decoded = protocol.decode_batch_reply(frames)
        again = protocol.decode_batch_reply(protocol.encode_batch_reply(decoded))
        if again != decoded:
            raise Finding(f"batch reply does not survive encode/decode: {decoded!r}")
        header_token, count = protocol.batch_reply_header(frames)
        records = protocol.split_reply_records(frames, count)
        if header_token != token or len(records) != len(subs):
            raise Finding("batch_reply_header/split_reply_records disagree with the split")
        for record, sub in zip(records, subs, strict=True):
            if protocol.reply_record_status(record) != sub[0]:
                raise Finding(f"reply_record_status of {bytes(record)!r} is not {sub[0]}")
            one = protocol.decode_reply_record(record)
            if (one.status, one.request_id, one.token, one.deadline_ms, one.body) != sub:
                raise Finding(f"decode_reply_record {one!r} != {sub!r}")
            protocol.decode_reply(protocol.reply_from_record(record))
    else:
        # The header alone may still read: then the records are refused, or all read.
        header_ok, header = _refused(lambda: protocol.batch_reply_header(frames))
        if header_ok:
            _refused(lambda: protocol.split_reply_records(frames, header[1]))

    _refused(lambda: protocol.decode_from_worker(frames))
    ok, message = _refused(lambda: protocol.decode_from_broker(frames))
    keyed_dispatch = protocol.peek_keyed_dispatch(frames)
    if keyed_dispatch is not None:
        if not ok or not isinstance(message, Dispatch):
            raise Finding(f"peek_keyed_dispatch accepts what decode_from_broker refuses: {message}")
        token, kind, request_id, key, value, ttl_ms, stamp = keyed_dispatch
        request = message.request
        got = (message.token, request.kind, request.request_id, request.key, request.value)
        if got != (token, kind, request_id, bytes(key), None if value is None else bytes(value)):
            raise Finding(f"peek_keyed_dispatch {keyed_dispatch!r} != {message!r}")
        if (request.ttl_ms, request.stamp) != (ttl_ms, stamp):
            raise Finding(f"peek_keyed_dispatch {keyed_dispatch!r} != {message!r}")
    protocol.dispatch_token(frames)
    ok, event = _refused(lambda: protocol.decode_event(frames))
    if ok and protocol.decode_event(protocol.encode_event(event)) != event:
        raise Finding(f"event does not survive encode/decode: {event!r}")
    if frames:
        protocol.request_id_of(frames[0])
        protocol.batch_id_of(frames[0])
        ok, entries = _refused(lambda: protocol.decode_entries(frames[-1]))
        if ok and protocol.decode_entries(protocol.encode_entries(entries)) != entries:
            raise Finding(f"entries do not survive encode/decode: {entries!r}")
        _bodies(frames[-1])


def _same_in_a_batch(frames: list[bytes], request: Request) -> None:
    """A keyed request read alone reads the same as a BATCH record (the broker may carry it
    in one) and reaches the worker as the op of the same fields: the fast path's tuple for a
    plain GET, SET or DEL, else EXTENDED_OP with the whole Request."""
    record = protocol.request_record(frames)
    [in_batch] = protocol.decode_batch(protocol.batch_frames(1, [record])).requests
    if in_batch != request:
        raise Finding(f"a lone request {request!r} reads as {in_batch!r} in a batch")
    dispatch = protocol.decode_from_broker(protocol.dispatch_batch_frames(1, [record]))
    [op] = dispatch.ops  # type: ignore[union-attr]
    kind, request_id, key, value, ttl_ms, stamp = op
    if kind == protocol.EXTENDED_OP:
        if value != request or protocol.peek_keyed_request(frames) is not None:
            raise Finding(f"EXTENDED_OP {op!r} for {request!r}")
    elif (kind, request_id, key, value, ttl_ms, stamp) != (
        request.kind,
        request.request_id,
        request.key,
        request.value,
        request.ttl_ms,
        request.stamp,
    ) or protocol.request_extra(request) is not None:
        raise Finding(f"plain op {op!r} for {request!r}")


def _bodies(body: bytes) -> None:
    """The issue-12 reply bodies and extension block: what decodes re-encodes to the same
    bytes (each layout has one encoding)."""
    ok, ext = _refused(lambda: protocol.split_ext(body))
    if ok:
        if_version, fence, rest = ext
        if protocol.encode_ext(if_version, fence) + bytes(rest) != body:
            raise Finding(f"extension block {body!r} re-encodes differently: {ext!r}")
    ok, versioned = _refused(lambda: protocol.split_versioned(body))
    if ok and protocol.versioned_body(*versioned) != body:
        raise Finding(f"versioned body {body!r} re-encodes differently")
    ok, old = _refused(lambda: protocol.decode_old_item(body))
    if ok and protocol.encode_old_item(*old) != body:
        raise Finding(f"RETURN_OLD body {body!r} re-encodes differently: {old!r}")
    ok, incr = _refused(lambda: protocol.split_incr_body(body))
    if ok and protocol.incr_body(*incr) != body:
        raise Finding(f"INCR body {body!r} re-encodes differently: {incr!r}")
    ok, token = _refused(lambda: protocol.split_token_body(body))
    if ok and protocol.token_body(token) != body:
        raise Finding(f"token body {body!r} re-encodes differently")


def _without_stamp_of_reads(request: Request) -> Request:
    """What a request is once encoded: a stamp travels only on a write (a GET with a TTL, a
    touch, is one)."""
    if request.stamp is None or request.kind in protocol._WRITES:
        return request
    if request.kind == Kind.GET and request.ttl_ms is not None:
        return request
    return dataclasses.replace(request, stamp=None)


def protocol_target(data: bytes) -> None:
    """The fuzz target of zkv/protocol.py (see :func:`protocol_frames`)."""
    protocol_frames(frames_of(data))


def protocol_seeds() -> Iterator[bytes]:
    """Inputs that :func:`frames_of` reads as valid messages of every kind."""
    messages: list[list[bytes]] = [
        protocol.encode_request(Request(Kind.GET, 1, b"k")),
        protocol.encode_request(Request(Kind.SET, 2, b"k", b"v", ttl_ms=1000, stamp=77)),
        protocol.encode_request(Request(Kind.DEL, 3, b"k", stamp=5)),
        protocol.encode_request(Request(Kind.ALL, 4, b"a", limit=10, keys_only=True)),
        protocol.encode_request(Request(Kind.PING, 5)),
        protocol.encode_batch(
            Batch(
                9,
                (
                    Request(Kind.GET, 1, b"a"),
                    Request(Kind.SET, 2, b"b", b"v", 5, stamp=1),
                    Request(Kind.DEL, 3, b"c"),
                ),
            )
        ),
        protocol.encode_reply(Reply(protocol.Status.OK, 7, 8, 9, b"body")),
        protocol.encode_batch_reply(
            BatchReply(
                3,
                (
                    Reply(protocol.Status.OK, 1, 3, None, b""),
                    Reply(protocol.Status.NOT_FOUND, 2, 3),
                ),
            )
        ),
        protocol.dispatch_frames(11, protocol.encode_request(Request(Kind.SET, 2, b"k", b"v"))),
        protocol.dispatch_batch_frames(
            12,
            [protocol.pack_request(int(Kind.GET), 1, b"k"), protocol.pack_request(2, 2, b"x", b"")],
        ),
        # Issue 12: the new commands, flags and extension block, alone and in batches.
        protocol.encode_request(Request(Kind.SET, 20, b"k", b"v", nx=True, return_old=True)),
        protocol.encode_request(
            Request(Kind.SET, 21, b"k", b"v", 5, xx=True, if_version=3, fence=(b"l", 4))
        ),
        protocol.encode_request(Request(Kind.DEL, 22, b"k", if_version=1, versioned=True)),
        protocol.encode_request(Request(Kind.GET, 23, b"k", ttl_ms=9, stamp=1, keys_only=True)),
        protocol.encode_request(Request(Kind.INCR, 24, b"c", by=-5, ttl_ms=100, stamp=2)),
        protocol.encode_request(Request(Kind.EXPIRE, 25, b"k", fence=(b"l", 9))),
        protocol.encode_request(Request(Kind.LOCK, 26, b"l", ttl_ms=10, wait_ms=500)),
        protocol.encode_request(Request(Kind.REFRESH, 27, b"l", ttl_ms=10, token=7)),
        protocol.encode_request(Request(Kind.UNLOCK, 28, b"l", token=7, stamp=3)),
        protocol.encode_request(Request(Kind.FENCE_CHECK, 29, b"l", token=7)),
        protocol.encode_batch(
            Batch(
                10,
                (
                    Request(Kind.INCR, 1, b"c", by=1),
                    Request(Kind.SET, 2, b"k", b"v", if_version=0, versioned=True),
                    Request(Kind.LOCK, 3, b"l", ttl_ms=5),
                    Request(Kind.GET, 4, b"k"),
                ),
            )
        ),
        protocol.dispatch_batch_frames(
            13,
            [
                protocol.pack_request(int(Kind.EXPIRE), 1, b"k", None, 5, 1),
                protocol.pack_request(int(Kind.DEL), 2, b"k", extra={"fence": (b"l", 2)}),
            ],
        ),
        protocol.dispatch_frames(
            14, protocol.encode_request(Request(Kind.INCR, 3, b"c", by=2, if_version=4))
        ),
        protocol.encode_event(protocol.Event(b"k", protocol.EventKind.EXPIRE, 1, 2, 3, 4)),
        [protocol.encode_ext(5, (b"lock", 6)) + b"value"],
        [protocol.encode_old_item(7, (6, 5, b"old"))],
        [protocol.incr_body(8, -9)],
        protocol.encode_control(protocol.Ready(1, 2, True, 3)),
        protocol.encode_control(protocol.Assign(0, 2, 5)),
        protocol.encode_control(protocol.Heartbeat()),
        protocol.encode_control(protocol.Disconnect()),
        [protocol.encode_entries([Entry(b"k", b"v", 5), Entry(b"l", b"", None)])],
    ]
    for frames in messages:
        data = bytearray([len(frames)])
        for frame in frames[:-1]:
            data += struct.pack("!H", len(frame)) + frame
        data += frames[-1]
        yield bytes(data)


# --- gateway/http11.py and the app ------------------------------------------------------------


class MemoryKv:
    """The zkv client interface over one dict, for the app (sync) and the fast lane (futures);
    nothing expires. Emptied before each input, so no run depends on the ones before."""

    def __init__(self) -> None:
        self.data: dict[bytes, tuple[bytes, int | None]] = {}

    @staticmethod
    def _b(data: bytes | str) -> bytes:
        return data if isinstance(data, bytes) else data.encode()

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> int | None:
        deadline = None if ttl_s is None else 1_700_000_000_000 + round(ttl_s * 1000)
        self.data[self._b(key)] = (self._b(value), deadline)
        return deadline

    def get(self, key: bytes | str, touch_s: float | None = None) -> Any:
        found = self.data.get(self._b(key))
        if found is None:
            raise NotFound(self._b(key))
        return Item(*found, 1)

    def delete(self, key: bytes | str, if_version: int | None = None, fence: Any = None) -> bool:
        return self.data.pop(self._b(key), None) is not None

    # Issue 12's calls of the REST routes (gateway/app.py): accepted, never refused; the
    # gateway's own checks are what the fuzzing exercises.
    def put(
        self, key: bytes | str, value: bytes | str, ttl_s: float | None = None, **_: Any
    ) -> Any:
        return Item(self._b(value), self.set(key, value, ttl_s), 1)

    def incr_item(self, key: bytes | str, by: int = 1, **_: Any) -> tuple[int, int, None]:
        return by, 1, None

    def expire(self, key: bytes | str, ttl_s: float, fence: Any = None) -> int:
        return 1_700_000_000_000 + round(ttl_s * 1000)

    def persist(self, key: bytes | str, fence: Any = None) -> int:
        return 1

    def acquire_lock(self, name: bytes | str, ttl_s: float, wait_s: float = 0) -> Any:
        return Lock(self._b(name), 1, 1_700_000_000_000 + round(ttl_s * 1000))

    def refresh_lock(self, name: bytes | str, token: int, ttl_s: float) -> int:
        return 1_700_000_000_000 + round(ttl_s * 1000)

    def release_lock(self, name: bytes | str, token: int) -> None:
        return None

    def all(self, after: bytes | str = b"", limit: int = 0, keys_only: bool = False) -> list[Entry]:
        after = self._b(after)
        keys = sorted(k for k in self.data if k > after)
        if limit:
            keys = keys[:limit]
        return [Entry(k, b"" if keys_only else self.data[k][0], self.data[k][1]) for k in keys]

    def pages(
        self,
        after: bytes | str = b"",
        keys_only: bool = False,
        limit: int = 0,
        page_keys: int = 1000,
    ) -> Iterator[list[Entry]]:
        entries = self.all(after, limit, keys_only)
        for start in range(0, len(entries), page_keys):
            yield entries[start : start + page_keys]

    def ping(self) -> dict[str, Any]:
        return {"status": "ok", "shards": 1, "owned": [True], "workers": 1}

    # the fast lane's asyncio client
    def submit(
        self, kind: int, key: bytes, value: bytes | None = None, ttl_ms: int | None = None
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = _LOOP.create_future()
        if kind == Kind.GET:
            found = self.data.get(key)
            future.set_result(None if found is None else Item(*found))
        elif kind == Kind.SET:
            future.set_result(
                self.set(key, value or b"", None if ttl_ms is None else ttl_ms / 1000)
            )
        else:
            future.set_result(self.delete(key))
        return future


class FakeTransport(asyncio.Transport):
    """What a connection writes, kept; every other transport call is a no-op or a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.output = bytearray()
        self.closed = False
        self.eof = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof or self.closed:
            raise Finding("a write after the connection's output was closed")
        self.output += data

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Failures(logging.Handler):
    """Log records at ERROR and above: a server or app failure, whatever the response says."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_LOOP = asyncio.new_event_loop()  # never running but in _run_ready_callbacks; never set as current
_KV = MemoryKv()
_FAILURES = _Failures()
_APP = make_app(lambda: _KV, max_key_bytes=MAX_KEY_BYTES, max_value_bytes=MAX_VALUE_BYTES)
_LANE = FastLane(SeedApi(MAX_KEY_BYTES, MAX_VALUE_BYTES), lambda: _KV)  # type: ignore[arg-type]
_WATCHED = ("gateway", "zkv")  # the loggers whose ERROR lines are findings


@contextlib.contextmanager
def _watching() -> Iterator[None]:
    """Collect the ERROR lines of the gateway and zkv while one input runs, then stop (the
    targets also run inside the test suite, whose logging they must leave as it was)."""
    _FAILURES.records.clear()
    for name in _WATCHED:
        logging.getLogger(name).addHandler(_FAILURES)
    try:
        yield
    finally:
        for name in _WATCHED:
            logging.getLogger(name).removeHandler(_FAILURES)


def quiet_logs() -> None:
    """For a fuzzing process: no flood of the warnings refused input causes on stderr (the
    targets still see the errors, through their own handler)."""
    for name in _WATCHED:
        logging.getLogger(name).propagate = False


class _RecordingConnection(HttpConnection):
    """A connection that keeps every answer it gives, as given, for the checks."""

    answers: list[tuple[bytes, int, list[tuple[str, str]], bytes]]

    def _respond(
        self,
        request: Any,
        started: float,
        status: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        self.answers.append((request.method, int(status[:3]), headers, body))
        super()._respond(request, started, status, headers, body)

    def _refuse(self, status: int, message: str) -> None:
        if not (self.refused or self.linger_until):
            body = json.dumps({"error": message}).encode()
            self.answers.append((b"", status, [("Content-Type", "application/json")], body))
        super()._refuse(status, message)


def _check_answer(method: bytes, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    """A 2xx or a 4xx (501: a transfer coding); an error is ``{"error": "..."}`` JSON."""
    if not (200 <= status < 300 or 400 <= status < 500 or status == 501):
        raise Finding(f"answered {status}: {body[:200]!r}")
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    if status >= 400 or content_type.startswith("application/json"):
        if not content_type.startswith("application/json"):
            raise Finding(f"{status} answered as {content_type!r}, not JSON")
        if method == b"HEAD" and not body:
            return
        document = json.loads(body)
        if status >= 400 and (
            not isinstance(document, dict)
            or list(document) != ["error"]
            or not isinstance(document["error"], str)
        ):
            raise Finding(f"{status} answered {body[:200]!r}, not {{'error': '...'}}")


def _check_wire(output: bytes, answers: int) -> None:
    """The bytes written parse as ``answers`` HTTP responses (each head announces its body's
    length: the server never writes without a Content-Length)."""
    parsed = 0
    view = bytes(output)
    while view:
        head_end = view.find(b"\r\n\r\n")
        if head_end < 0 or not view.startswith(b"HTTP/1.1 "):
            raise Finding(f"not an HTTP response: {view[:200]!r}")
        head = view[:head_end].decode("latin-1")
        if int(head[9:12]) == 100:  # a 100 Continue: no headers, no body
            view = view[head_end + 4 :]
            continue
        lengths = [
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")[1:]
            if line.lower().startswith("content-length:")
        ]
        if len(lengths) != 1 or not lengths[0].isdigit():
            raise Finding(f"a response head without one Content-Length: {head!r}")
        view = view[head_end + 4 + int(lengths[0]) :]
        parsed += 1
    if parsed != answers:
        raise Finding(f"{parsed} responses on the wire for {answers} answers")


last_server: HttpServer | None = None
"""The server of the last :func:`http_target` input, for tests/unit/test_fuzz.py's counts."""


def http_target(data: bytes) -> None:
    """The fuzz target of gateway/http11.py: the first byte chooses the fast lane (odd) or
    the app alone (even), and an EOF at the end (bit 1); the second how the rest is cut into
    reads (pieces of 1 to 256 bytes)."""
    with _watching():
        _http(data)


def _http(data: bytes) -> None:
    global last_server
    source = Input(data)
    control = source.byte()
    piece = 1 + source.byte()
    payload = source.rest()
    _KV.data.clear()
    server = HttpServer(
        _APP,
        ServerConfig(max_body_bytes=MAX_VALUE_BYTES),
        _LOOP,
        shortcut=_LANE if control & 1 else None,
    )
    last_server = server
    connection = _RecordingConnection(server)
    connection.answers = []
    transport = FakeTransport()
    connection.connection_made(transport)
    for start in range(0, len(payload), piece):
        if transport.closed:
            break
        connection.data_received(payload[start : start + piece])
        _run_ready_callbacks()
    if not transport.closed:
        if control & 2:
            connection.eof_received()
        _run_ready_callbacks()
        if control & 2 and not (transport.closed or transport.eof):
            # The client is done and everything ran: what it asked is answered, so the
            # connection must be closing; open, it would wait for the keep-alive sweep at best.
            raise Finding("the connection stays open after the client's EOF and every answer")
    if _FAILURES.records:
        record = _FAILURES.records[0]
        raise Finding(f"logged {record.levelname}: {record.getMessage()}") from (
            record.exc_info[1] if record.exc_info else None
        )
    for method, status, headers, body in connection.answers:
        _check_answer(method, status, headers, body)
    if not any(method == b"HEAD" for method, *_ in connection.answers):
        _check_wire(bytes(transport.output), len(connection.answers))
    connection.connection_lost(None)


def _run_ready_callbacks() -> None:
    """Run what the loop has due now (the fast lane's done callbacks, and what they schedule
    in turn), nothing later: one pass of the loop per round, only while something is ready."""
    while _LOOP._ready:  # type: ignore[attr-defined]  # asyncio's own queue of due callbacks
        _LOOP.call_soon(_LOOP.stop)
        _LOOP.run_forever()


def http_seeds() -> Iterator[bytes]:
    """Requests of every route, seed and REST, plain and pipelined, for both paths."""
    requests = [
        b"GET /set?key=a&value=hello&timeout=10 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /get?key=a HTTP/1.1\r\n\r\nGET /delete?key=a HTTP/1.1\r\n\r\n",
        b"GET /all HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /v1/keys/a/b?ttl=1.5 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        b"PUT /v1/keys/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"PUT /v1/keys/c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
        b"GET /v1/keys/a/b HTTP/1.1\r\n\r\nDELETE /v1/keys/a/b HTTP/1.1\r\n\r\n",
        b"GET /v1/keys?limit=2&after=a HTTP/1.1\r\n\r\n",
        b"GET /v1/health HTTP/1.0\r\n\r\n",
        b"HEAD /v1/openapi.json HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /get?key=%FF HTTP/1.1\r\n\r\n",
        b"POST /set HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ]
    for request in requests:
        for control in (0, 1, 3):
            yield bytes([control, 255]) + request
    yield bytes([1, 0]) + requests[0] + requests[1]


# --- the Bottle app through WSGI --------------------------------------------------------------

_METHODS = (b"GET", b"PUT", b"DELETE", b"HEAD", b"POST", b"OPTIONS", b"PATCH")
_PATHS = (b"/set", b"/get", b"/delete", b"/all", b"/v1/keys/", b"/v1/keys", b"/v1/health", b"/")


def wsgi_target(data: bytes) -> None:
    """The fuzz target of the Bottle app: a method, a path (one of the routes' or not) with
    fuzzed bytes after it, a query string, up to 4 headers, a body and a Content-Length that
    may not be its length."""
    with _watching():
        _wsgi(data)


def _wsgi(data: bytes) -> None:
    source = Input(data)
    method_byte = source.byte()
    method = _METHODS[method_byte % len(_METHODS)] if method_byte < 224 else source.sized()
    path = _PATHS[source.byte() % len(_PATHS)] + source.sized()
    query = source.sized()
    headers = {}
    for _ in range(source.byte() % 5):
        name = source.sized().decode("latin-1").upper().replace("-", "_")
        value = source.sized().decode("latin-1")
        headers[name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name] = value
    body = source.rest()
    _KV.data.clear()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method.decode("latin-1"),
        "SCRIPT_NAME": "",
        "PATH_INFO": path.decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "5000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": bool(method_byte & 1),
        **headers,
    }
    code, _, answer = _call(environ)
    if method == b"PUT" and path.startswith(b"/v1/keys/") and len(path) > len(b"/v1/keys/"):
        # A REST key is the rest of the path, whatever it holds: stored under exactly that.
        key = path[len(b"/v1/keys/") :]
        if code in (404, 405):
            raise Finding(f"PUT of the key {key!r} answered {code}: {answer[:200]!r}")
        if code == 200 and json.loads(answer)["key"].encode("utf-8", "surrogatepass") != key:
            raise Finding(f"PUT of the key {key!r} stored {json.loads(answer)['key']!r}")
    if method == b"GET" and path == b"/set" and code == 200:
        # What /set stored, /get of the same query string reads back (its other parameters
        # are ignored): the two routes read a query string alike.
        stored = json.loads(answer)
        code, _, again = _call({**environ, "PATH_INFO": "/get", "wsgi.input": io.BytesIO()})
        got = json.loads(again) if code == 200 else None
        if not got or got.get("value") != stored["value"]:
            raise Finding(f"/set stored {stored!r}, /get of the same query read {again[:200]!r}")


def _call(environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    """The app's answer to one environ: its status, headers and body; an ERROR line logged
    meanwhile is a finding, and so is an answer that is not 2xx or 4xx JSON."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda _: None

    result = _APP(environ, start_response)
    try:
        answer = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if _FAILURES.records:
        record = _FAILURES.records[0]
        raise Finding(f"logged {record.levelname}: {record.getMessage()}")
    code = int(started[0][:3])
    _check_answer(environ["REQUEST_METHOD"].encode("latin-1"), code, started[1], answer)
    return code, started[1], answer


def wsgi_seeds() -> Iterator[bytes]:
    def build(method: int, path: int, rest: bytes, query: bytes, body: bytes = b"") -> bytes:
        sized = struct.pack("!H", len(rest)) + rest + struct.pack("!H", len(query)) + query
        return bytes([method, path]) + sized + b"\x00" + body

    yield build(0, 0, b"", b"key=a&value=b&timeout=1")
    yield build(0, 1, b"", b"key=a")
    yield build(0, 2, b"", b"key=%FF")
    yield build(0, 3, b"", b"")
    yield build(1, 4, b"a/b", b"ttl=2", b"value")
    yield build(0, 4, b"a%2Fb", b"")
    yield build(2, 4, b"x", b"")
    yield build(0, 5, b"", b"limit=3&after=a")
    yield build(0, 6, b"", b"")
    yield build(4, 0, b"", b"")


# --- the registry -----------------------------------------------------------------------------

TARGETS: dict[str, tuple[Target, Callable[[], Iterator[bytes]]]] = {
    "protocol": (protocol_target, protocol_seeds),
    "http": (http_target, http_seeds),
    "wsgi": (wsgi_target, wsgi_seeds),
}
"""Each target by name, with its seed inputs (written into the corpus before a run)."""
