"""The Python client: talks to the broker's frontend over one ZeroMQ DEALER socket.

A ``Client`` is not thread-safe (ZeroMQ sockets are not): give each thread its own, as the
gateway does.

Retries (the guide's Lazy Pirate). Every request gets a random 64-bit request id, kept across its
retries. If no reply comes within ``attempt_s`` (the broker restarted and lost it, say), the
socket is closed, a fresh one opened, and the same request sent again, until ``timeout_s`` has
passed; then :class:`Timeout`, whose outcome is unknown. Resending is safe for every command: the
broker merges a retry with its original while that is still in flight, and a worker answers a
SET or DEL it already applied from its memory of request ids, so nothing is applied twice.

Failing fast instead of hanging: the socket has ``ZMQ_IMMEDIATE`` set, so a request is never
queued for a broker that is not connected. While the broker is unreachable the client keeps
trying for ``connect_timeout_s`` (long enough to ride through a broker restart), then raises
:class:`Unavailable`, well before the full timeout. When the broker comes back, ZeroMQ
reconnects by itself. Closing the socket after a timeout also discards anything still queued in
it, so a request can never reach a broker minutes later.

Pipelining. One request per round trip leaves the broker and the workers idle most of the
time, and every ZeroMQ message costs the broker about as much as the work it carries. A
pipeline (:meth:`Client.pipeline`, :meth:`Client.get_many`, :meth:`Client.set_many`,
:meth:`Client.delete_many`) packs many operations into BATCH messages of up to
``batch_ops`` operations, keeps up to ``window_ops`` operations in flight, and matches the
replies by request id. Retries follow the same rule as for one request: when no reply at all
has come for ``attempt_s``, the operations still unanswered are sent again, with the same ids,
on a fresh socket; when none has come for ``timeout_s``, they fail with :class:`Timeout`.

Example::

    with Client("tcp://127.0.0.1:5555") as kv:
        kv.set("greeting", "hello", ttl_s=10)
        item = kv.get("greeting")     # Item(value=b'hello', deadline_ms=...)
        kv.delete("greeting")         # True
        kv.set_many({"a": b"1", "b": b"2"}, ttl_s=60)   # [deadline_ms, deadline_ms]
        kv.get_many(["a", "b", "nope"])                  # [Item(...), Item(...), None]
        with kv.pipeline() as pipe:
            pipe.set("c", b"3").get("c").delete("c")
            pipe.execute()                               # [None, Item(b'3', None), True]
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zmq

from zkv import defaults
from zkv.errors import RequestError, Timeout, Unavailable, ZkvError
from zkv.protocol import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPS,
    Entry,
    Kind,
    ProtocolError,
    Reply,
    Request,
    Status,
    batch_frames,
    decode_entries,
    decode_reply,
    encode_request,
    pack_request,
    split_batch_reply,
)

CONNECT_POLL_S = 0.1  # one wait for the connection to the broker, between retries
BATCH_OPS = 1000  # operations per BATCH message a pipeline sends
WINDOW_OPS = 8000  # operations a pipeline keeps in flight (sent, not yet answered)

_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)
_REPLY = int(Kind.REPLY)
_OK = int(Status.OK)
_NOT_FOUND = int(Status.NOT_FOUND)
_ERROR = int(Status.ERROR)

PipelineOp = tuple[int, bytes, bytes | None, int | None]
"""One queued operation: ``(kind, key, value, ttl_ms)``."""


class NotFound(ZkvError, KeyError):
    """The key does not exist or has expired."""


@dataclass(frozen=True, slots=True)
class Item:
    """A stored value and its expiry (Unix milliseconds, None for never)."""

    value: bytes
    deadline_ms: int | None


def _as_bytes(data: bytes | str, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")


class Client:
    """A blocking client of the zkv broker.

    Args:
        endpoint: the broker's frontend; defaults to ``$ZKV_FRONTEND`` or ``tcp://127.0.0.1:5555``.
        timeout_s: the most a request may take, retries included, before :class:`Timeout`.
        attempt_s: how long to wait for a reply before sending the request again.
        connect_timeout_s: how long to keep trying to reach an unreachable broker before
            :class:`Unavailable` (never longer than ``timeout_s``).
        context: the ZeroMQ context; defaults to the process-wide one.
        batch_ops: pipelines: operations per BATCH message (at most MAX_BATCH_OPS).
        window_ops: pipelines: operations in flight at once.

    Attributes:
        retries: how many times this client has sent a request again (for statistics).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        attempt_s: float = defaults.ATTEMPT_TIMEOUT_S,
        connect_timeout_s: float = defaults.CONNECT_TIMEOUT_S,
        context: zmq.Context | None = None,
        batch_ops: int = BATCH_OPS,
        window_ops: int = WINDOW_OPS,
    ) -> None:
        self.endpoint = endpoint or os.environ.get("ZKV_FRONTEND") or defaults.FRONTEND
        self.timeout_s = timeout_s
        self.attempt_s = attempt_s
        self.connect_timeout_s = connect_timeout_s
        if not 1 <= batch_ops <= MAX_BATCH_OPS:
            raise ValueError(f"batch_ops must be between 1 and {MAX_BATCH_OPS}, got {batch_ops}")
        self.batch_ops = batch_ops
        self.window_ops = max(window_ops, batch_ops)
        self.retries = 0
        self._context = context or zmq.Context.instance()
        self._random = random.Random(int.from_bytes(os.urandom(8), "big"))
        self._socket: zmq.Socket | None = None
        self._poller = zmq.Poller()

    # --- commands ---------------------------------------------------------------------------

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> int | None:
        """Store ``value`` under ``key``, expiring ``ttl_s`` seconds from now (None: never).

        Returns:
            The key's deadline in Unix milliseconds, as the worker computed it (None: never).
        """
        ttl_ms = _ttl_ms(ttl_s)
        reply = self.request(
            Request(Kind.SET, 0, _as_bytes(key, "key"), _as_bytes(value, "value"), ttl_ms)
        )
        return reply.deadline_ms

    def get(self, key: bytes | str) -> Item:
        """The value and deadline of ``key``. Raises :class:`NotFound` if missing or expired."""
        key_bytes = _as_bytes(key, "key")
        reply = self.request(Request(Kind.GET, 0, key_bytes))
        if reply.status == Status.NOT_FOUND:
            raise NotFound(key_bytes)
        return Item(reply.body or b"", reply.deadline_ms)

    def delete(self, key: bytes | str) -> bool:
        """Remove ``key``. Returns False if there was no such (live) key."""
        reply = self.request(Request(Kind.DEL, 0, _as_bytes(key, "key")))
        return reply.status == Status.OK

    def all(self, after: bytes | str = b"", limit: int = 0, keys_only: bool = False) -> list[Entry]:
        """Live entries of every shard.

        Args:
            after: only keys greater than this one (bytewise), for paging.
            limit: at most this many keys *per shard*, the smallest ones; 0 for all. With a
                limit the result is sorted by key; take the first ``limit`` for a global page.
            keys_only: leave values out (each entry's value is ``b""``).
        """
        reply = self.request(
            Request(Kind.ALL, 0, _as_bytes(after, "after"), limit=limit, keys_only=keys_only)
        )
        try:
            entries = decode_entries(reply.body or b"")
        except ProtocolError as exc:
            raise ZkvError(f"malformed ALL reply from {self.endpoint}: {exc}") from None
        if limit:
            entries.sort(key=lambda entry: entry.key)
        return entries

    def ping(self) -> dict[str, Any]:
        """The broker's view of the cluster: shards, which have owners, worker count."""
        reply = self.request(Request(Kind.PING, 0))
        try:
            info = json.loads(reply.body or b"{}")
        except ValueError as exc:
            raise ZkvError(f"malformed PING reply from {self.endpoint}: {exc}") from None
        if not isinstance(info, dict):
            raise ZkvError(f"malformed PING reply from {self.endpoint}: not an object")
        return info

    # --- pipelines --------------------------------------------------------------------------

    def pipeline(self) -> Pipeline:
        """A pipeline: queue operations, then send them all with :meth:`Pipeline.execute`."""
        return Pipeline(self)

    def get_many(self, keys: Iterable[bytes | str]) -> list[Item | None]:
        """The items of many keys, in order; None for a key that is missing or expired.

        Raises:
            RequestError, Unavailable, Timeout: as :meth:`get`, for the first key that failed
                (the others were still answered).
        """
        return self.execute([(_GET, _as_bytes(key, "key"), None, None) for key in keys])

    def set_many(
        self,
        items: Mapping[bytes | str, bytes | str] | Iterable[tuple[bytes | str, bytes | str]],
        ttl_s: float | None = None,
    ) -> list[int | None]:
        """Store many values, all with the same time to live; returns their deadlines."""
        pairs = items.items() if isinstance(items, Mapping) else items
        ttl_ms = _ttl_ms(ttl_s)
        return self.execute(
            [(_SET, _as_bytes(k, "key"), _as_bytes(v, "value"), ttl_ms) for k, v in pairs]
        )

    def delete_many(self, keys: Iterable[bytes | str]) -> list[bool]:
        """Remove many keys; for each, whether a live key was removed."""
        return self.execute([(_DEL, _as_bytes(key, "key"), None, None) for key in keys])

    def execute(self, ops: Sequence[PipelineOp], raise_on_error: bool = True) -> list[Any]:
        """Send many operations in BATCH messages and return their results, in order.

        Args:
            ops: ``(kind, key, value, ttl_ms)`` per operation; kind GET, SET or DEL.
            raise_on_error: raise the first failure (after every operation was answered or
                given up); if False, a failure takes its operation's place in the list as an
                exception instance.

        Returns:
            Per operation: GET an :class:`Item` or None (missing), SET its deadline (Unix ms,
            None for never), DEL whether a live key was removed.
        """
        results = self._pipeline(ops)
        if raise_on_error:
            for result in results:
                if isinstance(result, ZkvError):
                    raise result
        return results

    def _pipeline(self, ops: Sequence[PipelineOp]) -> list[Any]:
        """The transport of :meth:`execute`: its results, with a failure as an exception
        instance in its place; never raises for one operation's failure.

        The client's own work overlaps the cluster's: each message's records are packed just
        before it is sent, and each reply is turned into results as it arrives, while the
        broker and the workers serve the messages sent before.
        """
        count = len(ops)
        results: list[Any] = [_PENDING] * count
        records: list[bytes | None] = [None] * count  # packed on first send, kept for resends
        ids = [0] * count
        index_of: dict[int, int] = {}  # request id -> position, while sent and unanswered
        # (each sent position is in index_of once and counted in outstanding once)
        todo: Sequence[int] = range(count)  # positions to send, in order, from todo[sent_upto]
        sent_upto = 0
        in_flight: dict[int, list[int]] = {}  # batch id -> positions (a whole-batch error)
        outstanding = 0
        rand = self._random.getrandbits
        start = last_progress = last_send = time.monotonic()
        unreachable_since: float | None = None
        sent_any = False
        while index_of or sent_upto < len(todo):
            now = time.monotonic()
            while sent_upto < len(todo) and outstanding < self.window_ops:
                end = min(sent_upto + self.batch_ops, len(todo))
                chunk: list[int] = []
                chunk_records: list[bytes] = []
                chunk_at: list[int] = []  # where each of chunk is in todo
                for at in range(sent_upto, end):
                    position = todo[at]
                    record = records[position]
                    if record is None:
                        kind, key, value, ttl_ms = ops[position]
                        request_id = rand(64) or 1
                        try:
                            record = pack_request(kind, request_id, key, value, ttl_ms)
                        except ProtocolError as exc:  # refused here, as the broker would
                            results[position] = RequestError(str(exc))
                            continue
                        records[position] = record
                        ids[position] = request_id
                    chunk.append(position)
                    chunk_records.append(record)
                    chunk_at.append(at)
                if sum(map(len, chunk_records)) > MAX_BATCH_BYTES // 2:
                    cut = _cut(chunk_records, MAX_BATCH_BYTES // 2)
                    if cut < len(chunk):
                        end = chunk_at[cut]
                        del chunk[cut:], chunk_records[cut:]
                if not chunk:  # every one of them refused
                    sent_upto = end
                    continue
                batch_id = rand(64) or 1
                socket = self._connected_socket()
                frames = batch_frames(batch_id, chunk_records)
                if not self._send(socket, frames, now + self.timeout_s):
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since >= self.connect_timeout_s:
                        message = (
                            f"broker at {self.endpoint} is not reachable "
                            f"(tried for {now - start:.1f} s)"
                        )
                        return self._give_up(results, message, sent_any)
                    break
                unreachable_since = None
                sent_any = True
                sent_upto = end
                for position in chunk:  # sent: now a reply can answer it
                    index_of[ids[position]] = position
                in_flight[batch_id] = chunk
                outstanding += len(chunk)
                last_send = time.monotonic()
            if not index_of:
                continue  # nothing sent yet: the broker is unreachable, keep trying
            wait_s = max(last_progress, last_send) + self.attempt_s - time.monotonic()
            answered = self._receive(ops, results, index_of, in_flight, max(0.0, wait_s))
            if answered:
                outstanding -= answered
                last_progress = time.monotonic()
                continue
            now = time.monotonic()
            if now - last_progress >= self.timeout_s:
                message = f"no reply from {self.endpoint} within {self.timeout_s} s"
                return self._give_up(results, message, True)
            if now - max(last_progress, last_send) >= self.attempt_s:
                # Nothing came back for a while: requests or replies may be lost (a broker
                # restart). Send what is unanswered again, same ids, on a fresh socket, then
                # what was never sent.
                self._reset()
                self.retries += 1
                todo = sorted(index_of.values()) + list(todo[sent_upto:])
                sent_upto = 0
                in_flight = {}
                outstanding = 0
                last_send = now
        return results

    def _receive(
        self,
        ops: Sequence[PipelineOp],
        results: list[Any],
        index_of: dict[int, int],
        in_flight: dict[int, list[int]],
        wait_s: float,
    ) -> int:
        """Wait up to ``wait_s`` for replies, take every one already queued, turn them into
        results, and return how many operations they answered."""
        socket = self._socket
        if socket is None or not self._poller.poll(max(0, int(wait_s * 1000))):
            return 0
        answered = 0
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return answered
            try:
                if frames and len(frames[0]) > 1 and frames[0][1] == _REPLY:
                    reply = decode_reply(frames)
                    subs = [(reply.status, reply.request_id, 0, reply.deadline_ms, reply.body)]
                else:
                    _, subs = split_batch_reply(frames)
            except ProtocolError:
                continue  # not ours to fix, and not worth dying for
            for status, request_id, _, deadline_ms, body in subs:
                position = index_of.pop(request_id, None)
                if position is None:
                    if request_id in in_flight and status == _ERROR:
                        # The broker refused a whole batch (its id is the batch id).
                        error = _error(status, body)
                        for refused in in_flight.pop(request_id):
                            if results[refused] is _PENDING:
                                results[refused] = error
                                answered += 1
                        for rid in [r for r, p in index_of.items() if results[p] is not _PENDING]:
                            del index_of[rid]
                    continue  # else: a late reply to an earlier attempt, already answered
                answered += 1
                if status == _OK:
                    kind = ops[position][0]
                    if kind == _GET:
                        results[position] = Item(body or b"", deadline_ms)
                    else:
                        results[position] = deadline_ms if kind == _SET else True
                elif status == _NOT_FOUND:
                    results[position] = None if ops[position][0] == _GET else False
                else:
                    results[position] = _error(status, body)

    def _give_up(self, results: list[Any], message: str, sent: bool) -> list[Any]:
        """Fail every operation still without a result (sent or not) and return the results."""
        self._reset()
        error: ZkvError = Timeout(f"{message}; outcome unknown") if sent else Unavailable(message)
        for position, result in enumerate(results):
            if result is _PENDING:
                results[position] = error
        return results

    # --- transport --------------------------------------------------------------------------

    def request(self, request: Request) -> Reply:
        """Send one request and wait for its reply.

        The request id of ``request`` is replaced by a fresh random one, which its retries keep.

        Raises:
            RequestError: the request was refused as wrong.
            Unavailable: the broker is unreachable, or the cluster could not serve the request.
            Timeout: no reply within ``timeout_s``; the request may or may not have been applied.
        """
        request_id = self._random.getrandbits(64) or 1
        try:
            frames = encode_request(dataclasses.replace(request, request_id=request_id))
        except ProtocolError as exc:  # refused here, as the broker would refuse it
            raise RequestError(str(exc)) from None
        start = time.monotonic()
        deadline = start + self.timeout_s
        unreachable_since: float | None = None
        sent = False
        while True:
            socket = self._connected_socket()
            if not self._send(socket, frames, deadline):
                now = time.monotonic()
                unreachable_since = now if unreachable_since is None else unreachable_since
                if now - unreachable_since >= self.connect_timeout_s or now >= deadline:
                    message = (
                        f"broker at {self.endpoint} is not reachable "
                        f"(tried for {now - start:.1f} s)"
                    )
                    if sent:  # an earlier attempt left: it may have been applied
                        raise Timeout(f"{message}; outcome unknown")
                    raise Unavailable(message)
                continue
            sent = True
            reply = self._wait_reply(
                socket, request_id, min(deadline, time.monotonic() + self.attempt_s)
            )
            if reply is not None:
                return _check(reply)
            # No reply: the request or its reply may be lost (a broker restart). Send it again
            # on a fresh socket, which also drops anything stale still queued in the old one.
            self._reset()
            if time.monotonic() >= deadline:
                raise Timeout(
                    f"no reply from {self.endpoint} within {self.timeout_s} s; outcome unknown"
                )
            self.retries += 1

    def _wait_reply(self, socket: zmq.Socket, request_id: int, until: float) -> Reply | None:
        """The reply to ``request_id`` if it comes before ``until`` (monotonic), else None."""
        while True:
            remaining_ms = int((until - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._poller.poll(remaining_ms):
                return None
            try:
                reply = decode_reply(socket.recv_multipart())
            except ProtocolError:
                continue  # not ours to fix, and not worth dying for
            if reply.request_id == request_id:
                return reply
            # else: a late reply to an earlier request that timed out

    def close(self) -> None:
        """Close the socket; the client can still be used and opens a new one."""
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connected_socket(self) -> zmq.Socket:
        if self._socket is None:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.RECONNECT_IVL, 100)
            socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            socket.connect(self.endpoint)
            self._socket = socket
            self._poller.register(socket, zmq.POLLIN)
        return self._socket

    def _send(self, socket: zmq.Socket, frames: Sequence[bytes], deadline: float) -> bool:
        """Send without ever queueing for an absent broker; False if none connected within a
        short wait (the time a live broker needs to accept the TCP connection)."""
        try:
            socket.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            pass
        wait_s = min(CONNECT_POLL_S, max(0.0, deadline - time.monotonic()))
        if not socket.poll(max(1, int(wait_s * 1000)), zmq.POLLOUT):
            return False
        try:
            socket.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _reset(self) -> None:
        if self._socket is not None:
            self._poller.unregister(self._socket)
            self._socket.close(linger=0)
            self._socket = None


class Pipeline:
    """Operations queued on a :class:`Client`, sent together by :meth:`execute`.

    Each method returns the pipeline, so calls chain. Not thread-safe, like its client.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._ops: list[PipelineOp] = []

    def get(self, key: bytes | str) -> Pipeline:
        """Queue a GET: its result is an :class:`Item`, or None if the key is missing."""
        self._ops.append((_GET, _as_bytes(key, "key"), None, None))
        return self

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> Pipeline:
        """Queue a SET: its result is the key's deadline (Unix ms, None for never)."""
        self._ops.append((_SET, _as_bytes(key, "key"), _as_bytes(value, "value"), _ttl_ms(ttl_s)))
        return self

    def delete(self, key: bytes | str) -> Pipeline:
        """Queue a DEL: its result is whether a live key was removed."""
        self._ops.append((_DEL, _as_bytes(key, "key"), None, None))
        return self

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send everything queued (then forget it) and return the results in order; see
        :meth:`Client.execute`."""
        ops, self._ops = self._ops, []
        return self._client.execute(ops, raise_on_error) if ops else []

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._ops = []  # what was not executed is dropped


_PENDING: Any = object()  # a pipeline result not known yet


def _cut(records: list[bytes], max_bytes: int) -> int:
    """How many of ``records`` (at least one) fit in ``max_bytes``."""
    size = 0
    for index, record in enumerate(records):
        size += len(record)
        if size > max_bytes and index:
            return index
    return len(records)


def _ttl_ms(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, round(ttl_s * 1000))


def _error(status: int, body: bytes | None) -> ZkvError:
    message = (body or b"").decode(errors="replace")
    if status == _ERROR:
        return RequestError(message)
    return Unavailable(message)


def _check(reply: Reply) -> Reply:
    message = (reply.body or b"").decode(errors="replace")
    if reply.status == Status.ERROR:
        raise RequestError(message)
    if reply.status == Status.UNAVAILABLE:
        raise Unavailable(message)
    return reply
