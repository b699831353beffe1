"""The asyncio client: many concurrent ``await kv.get(...)`` travel together in BATCH messages.

Example::

    async with AsyncClient("tcp://127.0.0.1:5555") as kv:
        await kv.set("greeting", "hello", ttl_s=10)
        items = await asyncio.gather(*(kv.get(f"user:{n}") for n in range(1000)))

How operations are coalesced. A call packs its request, registers a future under a random
request id and puts the id in the send queue. The first call that finds the queue empty
schedules a flush with ``loop.call_soon``: the flush runs once every task that was ready in the
same turn of the event loop has had its go, so whatever they asked for leaves in one BATCH
(or a few: a queue of ``batch_ops`` operations is flushed at once). Replies are read when the
socket's descriptor signals (below) and matched to the futures by request id; BATCH_REPLY and
REPLY messages are both accepted, in any grouping and order.

A BUSY answer (load shed, not applied) parks the call for a backoff and sends it again with
the same request id, until ``timeout_s`` after the call (zkv/calls.py); the timer is armed for
the end of each backoff.

Several brokers, as for the blocking client: one at a time, and everything unanswered goes
again, with the same request ids, through the next one when the current one stays silent for the
resend interval or cannot be reached (zkv/calls.py, :class:`zkv.calls.Brokers`).

Retries and failures, as for the blocking client (zkv/client.py): a socket with
``ZMQ_IMMEDIATE``, so nothing is queued for an absent broker; when no reply at all has come
for ``attempt_s`` while operations are outstanding, everything unanswered is sent again, with
the same request ids, on a fresh socket; an operation not answered within ``timeout_s`` of its
call fails with :class:`Timeout` (outcome unknown), or with :class:`Unavailable` if it never
left because the broker stayed unreachable for ``connect_timeout_s``.

The socket is a plain (blocking-API) ZeroMQ socket used only with ``NOBLOCK``, and the loop
watches its file descriptor (``loop.add_reader``), not a ``zmq.asyncio`` socket: that one makes
futures and poll registrations for every send, receive and wait, which cost the gateway about
a fifth of its CPU per request (docs/performance.md). ZeroMQ's descriptor is edge-triggered
(it signals "something changed", not "a message waits"), so the rules are those of the ZeroMQ
guide: on a wake-up, receive until ``zmq.Again``; after every send attempt and every look at
``zmq.EVENTS``, read if a reply waits, since those calls can take in replies that then raise no
new edge. A timer, armed while calls are outstanding, does the retries and the timeouts, and
reads what the descriptor did not announce (counted in ``late_reads``). A socket that could
not be made (no file descriptors left) or failed is made again at the next flush or tick.

One ``AsyncClient`` belongs to the event loop of its first call. It is not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import zmq

from zkv import defaults
from zkv.calls import (
    Brokers,
    Calls,
    Item,
    Lock,
    NotFound,
    Op,
    Refresher,
    Settled,
    as_bytes,
    checked_batch_ops,
    delete_op,
    expire_op,
    fence_check_op,
    fence_of_op,
    frontends,
    get_op,
    incr_op,
    lock_name,
    lock_op,
    meta_op,
    new_ids,
    new_versioned_item,
    persist_op,
    refresh_op,
    remaining_ms,
    set_op,
    stale_fence,
    ttl_to_ms,
    unlock_op,
)
from zkv.client import BATCH_OPS, CONNECT_POLL_S, dealer
from zkv.errors import Conflict, LockLost, ProtocolError, Unavailable, ZkvError
from zkv.keys import frontend_curve
from zkv.protocol import Kind
from zkv.watch import AsyncWatch, events_endpoints

log = logging.getLogger(__name__)

_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)


class AsyncClient:
    """An asyncio client of the zkv broker (see the module docstring).

    Args:
        endpoint: the broker's frontend, or several brokers' (comma-separated, or a sequence),
            as for :class:`zkv.client.Client`; defaults to ``$ZKV_FRONTEND`` or
            ``tcp://127.0.0.1:5555``.
        timeout_s: the most one operation may take, retries included, before :class:`Timeout`.
        attempt_s: how long without any reply before everything unanswered is sent again
            (with several brokers, through the next one: :class:`zkv.calls.Brokers`).
        connect_timeout_s: how long an operation may wait for an unreachable broker before
            :class:`Unavailable`.
        batch_ops: operations per BATCH message at most.
        context: the ZeroMQ context (a ``zmq.asyncio.Context`` will do); defaults to the
            process-wide one.
        keys: CURVE keys for the frontend, as for :class:`zkv.client.Client`.
        first_broker: as for :class:`zkv.client.Client`.

    Attributes:
        retries: how many times unanswered operations were sent again (for statistics).
        batches: how many BATCH messages were sent (for statistics).
        late_reads: how many times the timer found replies the descriptor had not announced
            (the loop was too busy to read them, or an edge was missed: a bug).
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        attempt_s: float = defaults.ATTEMPT_TIMEOUT_S,
        connect_timeout_s: float = defaults.CONNECT_TIMEOUT_S,
        batch_ops: int = BATCH_OPS,
        context: zmq.Context | None = None,
        keys: str | os.PathLike[str] | None = None,
        first_broker: int | None = None,
    ) -> None:
        self.brokers = Brokers(frontends(endpoint), attempt_s, timeout_s, first_broker)
        self.endpoint = self.brokers.description
        self.curve = frontend_curve(keys)
        self.batch_ops = checked_batch_ops(batch_ops)
        self.timeout_s = timeout_s
        self.attempt_s = attempt_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = 0
        self.batches = 0
        self.late_reads = 0
        self._context = _plain(context or zmq.Context.instance())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: zmq.Socket | None = None
        self._calls: Calls | None = None  # made at the first call, on the loop's clock
        self._flush_handle: asyncio.Handle | None = None
        self._read_handle: asyncio.Handle | None = None  # a read after a send, see _flush
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # --- commands ---------------------------------------------------------------------------

    async def get(self, key: bytes | str, touch_s: float | None = None) -> Item:
        """The value, deadline and version of ``key`` (with ``touch_s``: its deadline moved
        to ``touch_s`` seconds from now, atomically). Raises :class:`NotFound` if missing."""
        op = get_op(key, touch_s)
        item = await self._call_op(op)
        if item is None:
            raise NotFound(op[1])
        return item

    async def set(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        get: bool = False,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Any:
        """Store ``value`` under ``key``; returns its deadline in Unix ms (None: never), or
        with ``get`` the previous Item or None. Options and errors as
        :meth:`zkv.client.Client.set`."""
        op = set_op(key, value, ttl_s, nx, xx, if_version, get, fence)
        return await self._call_op(op)

    async def put(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Item:
        """:meth:`set`, returning the new :class:`Item` with its version."""
        op = set_op(key, value, ttl_s, nx, xx, if_version, False, fence, versioned=True)
        version, deadline_ms = await self._call_op(op)
        return new_versioned_item(op[2][1], deadline_ms, version)

    async def delete(
        self,
        key: bytes | str,
        if_version: int | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> bool:
        """Remove ``key``. Returns False if there was no such (live) key."""
        return await self._call_op(delete_op(key, if_version, fence))

    async def incr(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> int:
        """Add ``by`` to the key's integer value; returns the new value (see
        :meth:`zkv.client.Client.incr`)."""
        return await self._call_op(incr_op(key, by, ttl_s, fence))

    async def incr_item(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> tuple[int, int, int | None]:
        """:meth:`incr`, returning ``(value, version, deadline_ms)``."""
        return await self._call_op(incr_op(key, by, ttl_s, fence, item=True))

    async def expire(
        self,
        key: bytes | str,
        ttl_s: float,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> int:
        """A new deadline ``ttl_s`` from now; returns it. NotFound if missing, Conflict if
        ``fence`` is stale (see :meth:`zkv.client.Client.expire`)."""
        op = expire_op(key, ttl_s, fence)
        deadline_ms = await self._call_op(op)
        if deadline_ms is None:
            raise NotFound(op[1])
        return deadline_ms

    async def persist(
        self, key: bytes | str, fence: Lock | tuple[bytes | str, int] | None = None
    ) -> int:
        """No deadline any more; returns the key's new version. NotFound if missing, Conflict
        if ``fence`` is stale (see :meth:`zkv.client.Client.persist`)."""
        op = persist_op(key, fence)
        version = await self._call_op(op)
        if version is None:
            raise NotFound(op[1])
        return version

    async def ttl_ms(self, key: bytes | str) -> int | None:
        """Milliseconds left (None: no deadline). NotFound if missing."""
        op = meta_op(key)
        item = await self._call_op(op)
        if item is None:
            raise NotFound(op[1])
        return remaining_ms(item.deadline_ms)

    async def acquire_lock(self, name: bytes | str, ttl_s: float, wait_s: float = 0) -> Lock:
        """Take lock ``name`` (see :meth:`zkv.client.Client.acquire_lock`)."""
        op = lock_op(name, ttl_s, wait_s)
        token, expires_at_ms = await self._call_op(op)
        return Lock(op[1], token, expires_at_ms)

    async def refresh_lock(self, name: bytes | str, token: int, ttl_s: float) -> int:
        """Extend the hold; returns the new expiry. Conflict if ``token`` is stale."""
        return await self._call_op(refresh_op(name, token, ttl_s))

    async def release_lock(self, name: bytes | str, token: int) -> None:
        """Release the lock. Conflict if ``token`` is stale."""
        await self._call_op(unlock_op(name, token))

    async def check_fence(self, name: bytes | str, token: int) -> bool:
        """Whether ``token`` is still the newest issued for lock ``name``."""
        return await self._call_op(fence_check_op(name, token))

    def lock(
        self, name: bytes | str, ttl_s: float = 10, wait_s: float = 0, refresh: bool = False
    ) -> AsyncHeldLock:
        """``async with kv.lock(name, ttl_s=10) as lock:``, as :meth:`zkv.client.Client.lock`,
        the refresh done by a task on this client's loop."""
        lock_name(name)
        ttl_to_ms(ttl_s)
        return AsyncHeldLock(self, name, ttl_s, wait_s, refresh)

    async def get_many(self, keys: Iterable[bytes | str]) -> list[Item | None]:
        """The items of many keys, in order; None for a missing key. Plain GETs, as
        :meth:`zkv.client.Client.get_many`: each Item's version is 0 (:meth:`get` reads it)."""
        calls = (self._call(_GET, as_bytes(key, "key"), None, None) for key in keys)
        return list(await asyncio.gather(*calls))

    async def _call_op(self, op: Op) -> Any:
        """One operation (after its fence's pre-check): its outcome, or its error raised."""
        fence = fence_of_op(op)
        if fence is not None and not await self.check_fence(*fence):
            raise stale_fence(fence)
        return await self._call(op[0], op[1], op[2], op[3])

    def watch(
        self,
        prefix: bytes | str = b"",
        events: str | Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncWatch:
        """``async for item in kv.watch(prefix)``: as :meth:`zkv.client.Client.watch`."""
        return AsyncWatch(
            self._context,
            events_endpoints(events),
            as_bytes(prefix, "prefix"),
            self.curve,
            timeout_s,
        )

    async def close(self) -> None:
        """Stop the reader, close the socket, fail what is unanswered (:class:`Unavailable`)."""
        self._closed = True
        for handle in (self._flush_handle, self._read_handle, self._timer):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._read_handle = self._timer = None
        self._reset_socket(open_new=False)  # first: failing the futures may raise (loop closed)
        if self._calls is not None:
            _settle(self._calls.fail(None, Unavailable("the client was closed")))

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

    def submit(
        self, kind: int, key: bytes, value: Any = None, ttl_ms: int | None = None
    ) -> asyncio.Future[Any]:
        """Queue one operation for the next flush; returns the future of its outcome.

        For code on the loop that chains callbacks instead of awaiting (the gateway's fast
        lane, gateway/fastlane.py): no coroutine or task is made. ``kind`` is ``Kind.GET``,
        ``SET`` or ``DEL``; ``key`` and ``value`` are bytes, ``ttl_ms`` whole milliseconds.
        The future gets what :func:`zkv.calls.outcome` gives (for a GET an :class:`Item` or
        None, for a SET the deadline, for a DEL a bool) or the error the call failed with.
        An issue-12 operation goes the same way as the op that zkv.calls builds for it
        (``submit(*zkv.calls.get_op(key))``: a GET with its version; see RESULTS there for
        what each code's future gets; a fenced op is sent without its FENCE_CHECK).
        Call it from the loop's thread, inside the running loop. Cancelling the future does
        not withdraw the operation: once queued it is sent, and may be applied.

        Raises:
            RequestError: the operation breaks the protocol's limits (nothing is queued).
            Unavailable: the client was closed.
        """
        return self._queue(kind, key, value, ttl_ms)[1]

    async def _call(self, kind: int, key: bytes, value: Any, ttl_ms: int | None) -> Any:
        """Queue one operation for the next flush and wait for its result
        (:func:`zkv.calls.outcome`), raising the error it failed with."""
        request_id, future = self._queue(kind, key, value, ttl_ms)
        try:
            return await future
        except asyncio.CancelledError:
            assert self._calls is not None
            self._calls.forget(request_id)  # the caller went away: do not send it again
            raise

    def _queue(
        self, kind: int, key: bytes, value: Any, ttl_ms: int | None
    ) -> tuple[int, asyncio.Future[Any]]:
        if self._closed:
            raise Unavailable("the client was closed")
        loop, calls = self._start()
        future: asyncio.Future = loop.create_future()
        request_id = calls.add((kind, key, value, ttl_ms), future, loop.time())
        if calls.queued >= self.batch_ops:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = loop.call_later(CONNECT_POLL_S, self._on_timer)
        return request_id, future

    def _start(self) -> tuple[asyncio.AbstractEventLoop, Calls]:
        if self._loop is None or self._calls is None:
            self._loop = loop = asyncio.get_running_loop()
            self._calls = Calls(self.brokers, self.timeout_s, self.attempt_s, new_ids, loop.time())
            self._reset_socket(open_new=True)
        return self._loop, self._calls

    def _flush(self) -> None:
        """Send what is queued, in BATCH messages; what cannot leave (no broker connected, or
        no socket) stays queued for the timer's next try. Never raises: a caller's operation
        is queued once it is added, so an error here must not look like a refusal."""
        self._flush_handle = None
        calls = self._calls
        if calls is None or self._closed or self._loop is None:
            return
        socket = self._socket
        if socket is None and (socket := self._reset_socket(open_new=True)) is None:
            return
        while (batch := calls.next_batch(self.batch_ops)) is not None:
            try:
                socket.send_multipart(batch.frames, flags=zmq.NOBLOCK)
            except zmq.Again:  # no broker connected (IMMEDIATE): the timer tries again,
                if calls.unsendable(self._loop.time()):  # through the next broker if several
                    self.retries += 1
                    self._reset_socket(open_new=True)
                break
            except zmq.ZMQError as exc:
                log.warning("sending to %s failed (%s): a new socket next", self.endpoint, exc)
                self._reset_socket(open_new=False)
                return
            calls.sent(batch, self._loop.time())
            self.batches += 1
        self._readable()  # the edge rule (module docstring)

    def _readable(self) -> bool:
        """Whether replies wait to be read; if so, a read is scheduled. Looking at
        ``zmq.EVENTS`` takes in what the descriptor would have announced (the edge rule)."""
        socket = self._socket
        if socket is None or self._loop is None:
            return False
        try:
            waiting = bool(socket.get(zmq.EVENTS) & zmq.POLLIN)
        except zmq.ZMQError:
            return False
        if waiting and self._read_handle is None:
            self._read_handle = self._loop.call_soon(self._on_readable)
        return waiting

    # --- the reader -------------------------------------------------------------------------

    def _on_readable(self) -> int:
        """The socket's descriptor signalled (or a send took replies in): read what is there.
        Returns how many messages were read."""
        self._read_handle = None
        socket = self._socket
        calls = self._calls
        if socket is None or calls is None or self._loop is None:
            return 0
        loop_time = self._loop.time
        recv = socket.recv_multipart
        read = 0
        while True:
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:  # nothing more: the descriptor's edge is re-armed
                return read
            read += 1
            try:
                answered = calls.receive(frames, loop_time())
            except ProtocolError as exc:
                log.warning("malformed reply from %s ignored: %s", self.endpoint, exc)
                continue
            _settle(answered)
            if calls.parked:  # answered BUSY: the timer must fire when a backoff ends
                self._arm(calls.next_resend_at())

    def _arm(self, at: float) -> None:
        """Make sure the timer fires by ``at`` (loop time)."""
        timer = self._timer
        if timer is not None and timer.when() <= at:
            return
        if timer is not None:
            timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        """Every CONNECT_POLL_S while calls are outstanding: time out, retry, resend."""
        self._timer = None
        calls = self._calls
        loop = self._loop
        if self._closed or calls is None or loop is None:
            return
        try:
            if self._on_readable():  # a busy loop may not have read what came yet
                self.late_reads += 1
            self._timers(calls, loop.time())
        finally:  # whatever failed, the calls still need their timeouts
            due_s = calls.due_in(loop.time())
            if due_s is not None and not self._closed:  # capped: failed sends retry promptly
                # Through _arm: a read above may have armed the timer already (one timer only).
                self._arm(loop.time() + min(due_s, CONNECT_POLL_S))

    def _timers(self, calls: Calls, now: float) -> None:
        _settle(calls.expire(now))
        _settle(calls.stuck(now, self.connect_timeout_s))
        _settle(calls.unpark(now))  # calls answered BUSY whose backoff is over
        if calls.queued:
            self._flush()  # the broker may be reachable now
        if not calls.queued and calls.resend_due(now) and not self._readable():
            # Nothing came back for a while: requests or replies may be lost (a broker
            # restart). Send everything unanswered again, same ids, on a fresh socket (to the
            # next broker if there are several: zkv.calls.Brokers).
            self.retries += 1
            calls.resend(now)
            self._reset_socket(open_new=True)
            self._flush()

    def _reset_socket(self, open_new: bool) -> zmq.Socket | None:
        """Close the socket; with ``open_new``, make and watch a new one. Returns the new
        socket, None if there is none (``open_new`` False, or it could not be made: logged,
        and tried again at the next flush)."""
        old = self._socket
        self._socket = None
        if old is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(old.FD)
            old.close(linger=0)
        if not open_new or self._loop is None:
            return None
        endpoint = self.brokers.endpoint
        try:
            socket = dealer(self._context, endpoint, self.curve)
        except zmq.ZMQError as exc:  # EMFILE: out of file descriptors, for now
            log.warning("no socket to %s (%s): trying again at the next send", endpoint, exc)
            return None
        self.brokers.opened(self._loop.time())
        self._loop.add_reader(socket.FD, self._on_readable)
        self._socket = socket
        return socket


class AsyncHeldLock:
    """The async context manager of :meth:`AsyncClient.lock`: takes the lock on entry,
    releases it on exit, and with ``refresh`` keeps it from a task meanwhile (zkv/calls.py,
    "locks", says how a failed refresh surfaces)."""

    def __init__(
        self, client: AsyncClient, name: bytes | str, ttl_s: float, wait_s: float, refresh: bool
    ) -> None:
        self._client = client
        self._name = name
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        self._refresh = refresh
        self._task: asyncio.Task[None] | None = None
        self.lock: Lock | None = None

    async def __aenter__(self) -> Lock:
        self.lock = lock = await self._client.acquire_lock(self._name, self._ttl_s, self._wait_s)
        if self._refresh:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._keep(Refresher(lock, self._ttl_s, loop.time())))
        return lock

    async def _keep(self, refresher: Refresher) -> None:
        """The refresh task: REFRESH every ttl / 3 until cancelled or the lock is lost."""
        loop = asyncio.get_running_loop()
        lock = refresher.lock
        try:
            while True:
                await asyncio.sleep(max(0.0, refresher.due_in(loop.time())))
                try:
                    expires_at_ms = await self._client.refresh_lock(
                        lock.name, lock.token, self._ttl_s
                    )
                except ZkvError as exc:
                    if not refresher.failed(exc, loop.time(), int(time.time() * 1000)):
                        log.warning("%s", lock.error)
                        return
                else:
                    refresher.refreshed(expires_at_ms, loop.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not die silently in a task: the lock is lost
            lock.error = LockLost(f"lock refresh failed: {exc!r}")
            log.exception("lock refresh task failed")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lock = self.lock
        if lock is None:
            return
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this task itself is being cancelled, not only the refresher
        if lock.error is not None:  # lost: the token is stale, nothing to release
            if exc_type is None:
                raise lock.error
            return
        try:
            await self._client.release_lock(lock.name, lock.token)
        except ZkvError as err:
            if exc_type is not None:  # never mask the block's own exception
                log.warning("releasing lock %r after an error failed: %s", lock.name, err)
                return
            if isinstance(err, Conflict):
                raise LockLost(
                    f"lock {lock.name.decode(errors='replace')!r} was lost while held "
                    f"(token {lock.token} is no longer the lock's): {err}"
                ) from None
            raise


def _plain(context: zmq.Context) -> zmq.Context:
    """``context`` as a plain ZeroMQ context (a ``zmq.asyncio.Context`` makes asyncio sockets;
    its shadow, the same underlying context, makes plain ones)."""
    if type(context) is zmq.Context:
        return context
    return zmq.Context.shadow(context.underlying)


def _settle(outcomes: list[Settled]) -> None:
    """Hand each call's result, or the error it failed with, to its waiting future (the
    call's handle)."""
    future: asyncio.Future
    for future, result in outcomes:
        if future.done():  # cancelled by its caller
            continue
        if isinstance(result, ZkvError):
            future.set_exception(result)
        else:
            future.set_result(result)
