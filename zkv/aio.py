"""The asyncio client: many concurrent ``await kv.get(...)`` travel together in BATCH messages.

Example::

    async with AsyncClient("tcp://127.0.0.1:5555") as kv:
        await kv.set("greeting", "hello", ttl_s=10)
        items = await asyncio.gather(*(kv.get(f"user:{n}") for n in range(1000)))

How operations are coalesced. A call packs its request, registers a future under a random
request id and puts the id in the send queue. The first call that finds the queue empty
schedules a flush with ``loop.call_soon``: the flush runs once every task that was ready in the
same turn of the event loop has had its go, so whatever they asked for leaves in one BATCH
(or a few: a queue of ``batch_ops`` operations is flushed at once). Replies are read by one
background task and matched to the futures by request id; BATCH_REPLY and REPLY messages are
both accepted, in any grouping and order.

Retries and failures, as for the blocking client (zkv/client.py): a socket with
``ZMQ_IMMEDIATE``, so nothing is queued for an absent broker; when no reply at all has come
for ``attempt_s`` while operations are outstanding, everything unanswered is sent again, with
the same request ids, on a fresh socket; an operation not answered within ``timeout_s`` of its
call fails with :class:`Timeout` (outcome unknown), or with :class:`Unavailable` if it never
left because the broker stayed unreachable for ``connect_timeout_s``.

One ``AsyncClient`` belongs to the event loop of its first call. It is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Iterable
from types import TracebackType

import zmq
import zmq.asyncio

from zkv import defaults
from zkv.client import BATCH_OPS, CONNECT_POLL_S, Item, NotFound, _as_bytes, _error, _ttl_ms
from zkv.errors import RequestError, Timeout, Unavailable, ZkvError
from zkv.protocol import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPS,
    Kind,
    ProtocolError,
    batch_frames,
    decode_reply,
    pack_request,
    split_batch_reply,
)

log = logging.getLogger(__name__)

_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)
_REPLY = int(Kind.REPLY)
_OK = 0
_NOT_FOUND = 1
_ERROR = 2
RECENT_BATCHES = 4096  # batch ids remembered, to fail a whole batch the broker refused


class _Call:
    """One operation waiting for its reply."""

    __slots__ = ("deadline", "future", "record", "sent", "started")

    def __init__(self, future: asyncio.Future, record: bytes, started: float, deadline: float):
        self.future = future
        self.record = record
        self.started = started
        self.deadline = deadline
        self.sent = False  # left in a message at least once: its outcome may be unknown


class AsyncClient:
    """An asyncio client of the zkv broker (see the module docstring).

    Args:
        endpoint: the broker's frontend; defaults to ``$ZKV_FRONTEND`` or ``tcp://127.0.0.1:5555``.
        timeout_s: the most one operation may take, retries included, before :class:`Timeout`.
        attempt_s: how long without any reply before everything unanswered is sent again.
        connect_timeout_s: how long an operation may wait for an unreachable broker before
            :class:`Unavailable`.
        batch_ops: operations per BATCH message at most.
        context: the asyncio ZeroMQ context; defaults to the process-wide one.

    Attributes:
        retries: how many times unanswered operations were sent again (for statistics).
        batches: how many BATCH messages were sent (for statistics).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        attempt_s: float = defaults.ATTEMPT_TIMEOUT_S,
        connect_timeout_s: float = defaults.CONNECT_TIMEOUT_S,
        batch_ops: int = BATCH_OPS,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint or os.environ.get("ZKV_FRONTEND") or defaults.FRONTEND
        self.timeout_s = timeout_s
        self.attempt_s = attempt_s
        self.connect_timeout_s = connect_timeout_s
        if not 1 <= batch_ops <= MAX_BATCH_OPS:
            raise ValueError(f"batch_ops must be between 1 and {MAX_BATCH_OPS}, got {batch_ops}")
        self.batch_ops = batch_ops
        self.retries = 0
        self.batches = 0
        self._context = context or zmq.asyncio.Context.instance()
        self._random = random.Random(int.from_bytes(os.urandom(8), "big"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._calls: dict[int, _Call] = {}  # request id -> call, until answered or failed
        self._queue: list[int] = []  # request ids to send at the next flush
        self._flush_handle: asyncio.Handle | None = None
        self._pump: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._recent: OrderedDict[int, list[int]] = OrderedDict()  # batch id -> request ids
        # When a reply last came, and when a message last left (monotonic loop time): resend
        # only after attempt_s of silence since both (a busy loop may read replies late).
        self._last_progress = 0.0
        self._last_send = 0.0
        self._closed = False

    # --- commands ---------------------------------------------------------------------------

    async def get(self, key: bytes | str) -> Item:
        """The value and deadline of ``key``. Raises :class:`NotFound` if missing or expired."""
        key_bytes = _as_bytes(key, "key")
        status, deadline_ms, body = await self._call(_GET, key_bytes, None, None)
        if status == _NOT_FOUND:
            raise NotFound(key_bytes)
        return Item(body or b"", deadline_ms)

    async def set(
        self, key: bytes | str, value: bytes | str, ttl_s: float | None = None
    ) -> int | None:
        """Store ``value`` under ``key``; returns its deadline in Unix ms (None: never)."""
        _, deadline_ms, _ = await self._call(
            _SET, _as_bytes(key, "key"), _as_bytes(value, "value"), _ttl_ms(ttl_s)
        )
        return deadline_ms

    async def delete(self, key: bytes | str) -> bool:
        """Remove ``key``. Returns False if there was no such (live) key."""
        status, _, _ = await self._call(_DEL, _as_bytes(key, "key"), None, None)
        return status == _OK

    async def get_many(self, keys: Iterable[bytes | str]) -> list[Item | None]:
        """The items of many keys, in order; None for a missing key."""
        return list(await asyncio.gather(*(self._get_or_none(key) for key in keys)))

    async def _get_or_none(self, key: bytes | str) -> Item | None:
        try:
            return await self.get(key)
        except NotFound:
            return None

    async def close(self) -> None:
        """Stop the reader, fail what is unanswered (:class:`Unavailable`), close the socket."""
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        self._fail(list(self._calls), Unavailable("the client was closed"))
        self._reset_socket(open_new=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- queueing and sending ---------------------------------------------------------------

    async def _call(
        self, kind: int, key: bytes, value: bytes | None, ttl_ms: int | None
    ) -> tuple[int, int | None, bytes | None]:
        if self._closed:
            raise Unavailable("the client was closed")
        loop = self._start()
        request_id = self._random.getrandbits(64) or 1
        try:
            record = pack_request(kind, request_id, key, value, ttl_ms)
        except ProtocolError as exc:  # refused here, as the broker would refuse it
            raise RequestError(str(exc)) from None
        now = loop.time()
        future: asyncio.Future = loop.create_future()
        self._calls[request_id] = _Call(future, record, now, now + self.timeout_s)
        self._queue.append(request_id)
        if len(self._queue) >= self.batch_ops:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        status, deadline_ms, body = await future
        if status == _OK or status == _NOT_FOUND:
            return status, deadline_ms, body
        raise _error(status, body)

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._reset_socket(open_new=True)
            self._last_progress = self._loop.time()
            self._pump = self._loop.create_task(self._read(), name="zkv-aio-reader")
        return self._loop

    def _flush(self) -> None:
        """Send what is queued, in BATCH messages; what cannot leave (no broker connected)
        stays queued for the reader's next look."""
        self._flush_handle = None
        queue, self._queue = self._queue, []
        calls = self._calls
        ids = [rid for rid in queue if rid in calls and not calls[rid].future.done()]
        start = 0
        while start < len(ids):
            end = start
            size = 0
            while end < len(ids) and end - start < self.batch_ops:
                record_size = len(calls[ids[end]].record)
                if end > start and size + record_size > MAX_BATCH_BYTES // 2:
                    break
                size += record_size
                end += 1
            chunk = ids[start:end]
            if not self._send(chunk):
                self._queue[:0] = ids[start:]  # not connected: keep them, oldest first
                self._wake.set()
                return
            start = end

    def _send(self, chunk: list[int]) -> bool:
        socket = self._socket
        if socket is None:
            return False
        calls = self._calls
        batch_id = self._random.getrandbits(64) or 1
        frames = batch_frames(batch_id, [calls[rid].record for rid in chunk])
        # Non-blocking through the asyncio socket itself (a future that is already done), so
        # pyzmq keeps track of the socket's edge-triggered events for the reader's poll.
        sent = socket.send_multipart(frames, flags=zmq.NOBLOCK)
        if sent.exception() is not None:  # zmq.Again: no broker connected (IMMEDIATE)
            return False
        for rid in chunk:
            calls[rid].sent = True
        self.batches += 1
        assert self._loop is not None
        self._last_send = self._loop.time()
        self._recent[batch_id] = chunk
        if len(self._recent) > RECENT_BATCHES:
            self._recent.popitem(last=False)
        self._wake.set()
        return True

    # --- the reader -------------------------------------------------------------------------

    async def _read(self) -> None:
        """The background task: receive and match replies; resend, time out."""
        assert self._loop is not None
        loop = self._loop
        while not self._closed:
            socket = self._socket
            if socket is None:
                return
            timeout_s = self._next_due(loop.time())
            if timeout_s is None:  # nothing outstanding: sleep until something is sent
                self._wake.clear()
                poll = asyncio.ensure_future(socket.poll(None, zmq.POLLIN))
                wake = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait({poll, wake}, return_when=asyncio.FIRST_COMPLETED)
                for task in (poll, wake):
                    if task not in done:
                        task.cancel()
                ready = poll in done and bool(poll.result())
            else:
                ready = bool(await socket.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN))
            if ready:
                self._receive()
            self._timers(loop.time())

    def _next_due(self, now: float) -> float | None:
        """Seconds until the reader has something to check, None if nothing is outstanding."""
        if not self._calls:
            return None
        # Calls are in creation order, which is deadline order (one timeout for all). The
        # wait is capped so that sends that failed (no broker yet) are retried promptly.
        earliest = next(iter(self._calls.values())).deadline
        due = min(max(self._last_progress, self._last_send) + self.attempt_s, earliest)
        return max(0.0, min(due - now, CONNECT_POLL_S))

    def _receive(self) -> None:
        socket = self._socket
        if socket is None:
            return
        calls = self._calls
        while True:
            received = socket.recv_multipart(flags=zmq.NOBLOCK)  # done at once, see _send
            if received.exception() is not None:  # zmq.Again: nothing more queued
                return
            frames = received.result()
            try:
                if frames and len(frames[0]) > 1 and frames[0][1] == _REPLY:
                    reply = decode_reply(frames)
                    subs = [(reply.status, reply.request_id, 0, reply.deadline_ms, reply.body)]
                else:
                    _, subs = split_batch_reply(frames)
            except ProtocolError as exc:
                log.warning("malformed reply from %s ignored: %s", self.endpoint, exc)
                continue
            assert self._loop is not None
            self._last_progress = self._loop.time()
            for status, request_id, _, deadline_ms, body in subs:
                call = calls.pop(request_id, None)
                if call is not None:
                    if not call.future.done():
                        call.future.set_result((status, deadline_ms, body))
                elif status == _ERROR and request_id in self._recent:
                    # The broker refused a whole batch: its ids are this client's bug.
                    error = RequestError((body or b"").decode(errors="replace"))
                    self._fail(self._recent.pop(request_id), error)

    def _timers(self, now: float) -> None:
        calls = self._calls
        expired = []
        for rid, call in calls.items():  # creation order is deadline order
            if call.deadline > now:
                break
            expired.append(rid)
        for rid in expired:
            call = calls.pop(rid)
            if call.sent:
                error: ZkvError = Timeout(
                    f"no reply from {self.endpoint} within {self.timeout_s} s; outcome unknown"
                )
            else:
                error = Unavailable(f"broker at {self.endpoint} is not reachable")
            if not call.future.done():
                call.future.set_exception(error)
        self._queue = [rid for rid in self._queue if rid in calls]
        unsent = [rid for rid in self._queue if now - calls[rid].started >= self.connect_timeout_s]
        if unsent:
            message = f"broker at {self.endpoint} is not reachable (tried for "
            self._fail(unsent, Unavailable(f"{message}{self.connect_timeout_s} s)"))
            self._queue = [rid for rid in self._queue if rid in calls]
        if self._queue:
            self._flush()  # the broker may be reachable now
        quiet_s = now - max(self._last_progress, self._last_send)
        if calls and not self._queue and quiet_s >= self.attempt_s and not self._readable():
            # Nothing came back for a while: requests or replies may be lost (a broker
            # restart). Send everything unanswered again, same ids, on a fresh socket.
            self.retries += 1
            self._reset_socket(open_new=True)
            self._last_progress = now
            self._queue = [rid for rid, call in calls.items() if not call.future.done()]
            self._flush()

    def _readable(self) -> bool:
        """Whether replies wait to be read (the loop was too busy to read them in time)."""
        return self._socket is not None and bool(self._socket.get(zmq.EVENTS) & zmq.POLLIN)

    def _fail(self, request_ids: list[int], error: ZkvError) -> None:
        for rid in request_ids:
            call = self._calls.pop(rid, None)
            if call is not None and not call.future.done():
                call.future.set_exception(error)

    def _reset_socket(self, open_new: bool) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if not open_new:
            return
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        socket.connect(self.endpoint)
        self._socket = socket
