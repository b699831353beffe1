"""The Python client: talks to the broker's frontend over one ZeroMQ DEALER socket.

A ``Client`` is not thread-safe (ZeroMQ sockets are not): give each thread its own, as the
gateway does.

Retries (the guide's Lazy Pirate). Every request gets a random 64-bit request id from the kernel
(never shared with a forked process: see zkv/calls.py), kept across its retries. If no reply
comes within ``attempt_s`` (the broker restarted and lost it, say), the socket is closed, a
fresh one opened, and the same request sent again, until ``timeout_s`` has passed; then
:class:`Timeout`, whose outcome is unknown. Resending is safe for every command: the broker
merges a retry with its original while that is still in flight, and a worker answers a
SET or DEL it already applied from its memory of request ids, so nothing is applied twice.

Several brokers (``Client("tcp://a:5555,tcp://b:5555")``, or ``ZKV_FRONTEND`` so): the client
talks to one at a time, and a request without answer is sent again, with the same id, through
the next one, while the silent broker is avoided for a back-off (:class:`zkv.calls.Brokers`).

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import zmq

from zkv import defaults
from zkv.calls import (
    Brokers,
    Calls,
    Item,
    NotFound,
    Op,
    as_bytes,
    busy_backoff_s,
    busy_gave_up,
    check,
    checked_batch_ops,
    frontends,
    gave_up,
    new_id,
    new_ids,
    ttl_to_ms,
)
from zkv.errors import RequestError, Timeout, ZkvError
from zkv.keys import ClientCurve, frontend_curve
from zkv.protocol import (
    MAX_LIST_KEYS,
    REPLY_TOO_LARGE,
    Entry,
    Kind,
    ProtocolError,
    Reply,
    Request,
    Status,
    decode_entries,
    decode_reply,
    encode_request,
    stamp_of,
)
from zkv.watch import Watch, events_endpoints

CONNECT_POLL_S = 0.1  # one wait for the connection to the broker, between retries
BATCH_OPS = 1000  # operations per BATCH message a pipeline sends
WINDOW_OPS = 8000  # operations a pipeline keeps in flight (sent, not yet answered)
# Keys per page of Client.all and pages (asked of every shard at once): under MAX_LIST_KEYS,
# a shard's bound per ALL; a page of larger values is halved until it fits MAX_REPLY_BYTES.
ALL_PAGE_KEYS = 1000

_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)

PipelineOp = Op
"""One queued operation: ``(kind, key, value, ttl_ms)``."""


class Client:
    """A blocking client of the zkv broker.

    Args:
        endpoint: the broker's frontend, or several brokers' (comma-separated, or a sequence):
            see :class:`zkv.calls.Brokers`; defaults to ``$ZKV_FRONTEND`` or
            ``tcp://127.0.0.1:5555``. ValueError if an entry is malformed.
        timeout_s: the most a request may take, retries included, before :class:`Timeout`.
        attempt_s: how long to wait for a reply before sending the request again (with
            several brokers, through the next one, after at most ``timeout_s / 3``).
        connect_timeout_s: how long to keep trying to reach an unreachable broker before
            :class:`Unavailable` (never longer than ``timeout_s``).
        context: the ZeroMQ context; defaults to the process-wide one.
        batch_ops: pipelines: operations per BATCH message (at most MAX_BATCH_OPS).
        window_ops: pipelines: operations in flight at once.
        keys: a keys directory holding ``broker.key``, ``client.key`` and
            ``client.key_secret``: talk CURVE to a broker started with ``--frontend-curve``.
            None: CURVE only if ``$ZKV_FRONTEND_CURVE`` is on, with ``$ZKV_KEYS``
            (:func:`zkv.keys.frontend_curve`). Raises KeysError if they cannot be loaded.
            With several brokers, the same keys serve for each (they share the cluster's).
        first_broker: with several brokers, the index of the one to use first; None: one
            at random, so that clients spread over the brokers.

    Attributes:
        retries: how many times this client has sent a request again (for statistics).
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        attempt_s: float = defaults.ATTEMPT_TIMEOUT_S,
        connect_timeout_s: float = defaults.CONNECT_TIMEOUT_S,
        context: zmq.Context | None = None,
        batch_ops: int = BATCH_OPS,
        window_ops: int = WINDOW_OPS,
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
        self.window_ops = max(window_ops, batch_ops)
        self.retries = 0
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        # The socket a single request left before it was resent on a fresh one, kept for one
        # more resend interval: an answer the broker sent it just as the client moved on (a
        # "no worker" failure at --shard-wait, a whole number of resend intervals) still
        # arrives, instead of the resend waiting out the client's timeout (504 for a 503).
        self._previous: zmq.Socket | None = None
        self._poller = zmq.Poller()

    # --- commands ---------------------------------------------------------------------------

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> int | None:
        """Store ``value`` under ``key``, expiring ``ttl_s`` seconds from now (None: never).

        Returns:
            The key's deadline in Unix milliseconds, as the worker computed it (None: never).
        """
        ttl_ms = ttl_to_ms(ttl_s)
        reply = self.request(
            Request(Kind.SET, 0, as_bytes(key, "key"), as_bytes(value, "value"), ttl_ms)
        )
        return reply.deadline_ms

    def get(self, key: bytes | str) -> Item:
        """The value and deadline of ``key``. Raises :class:`NotFound` if missing or expired."""
        key_bytes = as_bytes(key, "key")
        reply = self.request(Request(Kind.GET, 0, key_bytes))
        if reply.status == Status.NOT_FOUND:
            raise NotFound(key_bytes)
        return Item(reply.body or b"", reply.deadline_ms)

    def delete(self, key: bytes | str) -> bool:
        """Remove ``key``. Returns False if there was no such (live) key."""
        reply = self.request(Request(Kind.DEL, 0, as_bytes(key, "key")))
        return reply.status == Status.OK

    def all(self, after: bytes | str = b"", limit: int = 0, keys_only: bool = False) -> list[Entry]:
        """Live entries of every shard, sorted by key, read in pages (:meth:`pages`).

        Not a point-in-time snapshot: each page is read as it was when it was asked for, so a
        key written or expired meanwhile may be missing or present; no key comes twice.

        Args:
            after: only keys greater than this one (bytewise), for paging.
            limit: at most this many keys in all, the smallest ones; 0 for every key.
            keys_only: leave values out (each entry's value is ``b""``).
        """
        return [entry for page in self.pages(after, keys_only, limit) for entry in page]

    def pages(
        self,
        after: bytes | str = b"",
        keys_only: bool = False,
        limit: int = 0,
        page_keys: int = ALL_PAGE_KEYS,
    ) -> Iterator[list[Entry]]:
        """The live entries after ``after`` in pages, in key order (see :func:`paged`): what
        one page costs the client, the broker and each shard is bounded, whatever the store's
        size. Not a snapshot (see :meth:`all`)."""
        return paged(self.all_once, as_bytes(after, "after"), keys_only, limit, page_keys)

    def all_once(self, after: bytes, limit: int, keys_only: bool = False) -> list[Entry]:
        """One ALL request: each shard's ``limit`` smallest keys after ``after`` (0: all of
        them), the union sorted by key.

        Raises:
            RequestError: with ``REPLY_TOO_LARGE`` in its message if a shard's answer would
                be over MAX_LIST_KEYS keys or MAX_REPLY_BYTES (ask for fewer keys).
        """
        reply = self.request(Request(Kind.ALL, 0, after, limit=limit, keys_only=keys_only))
        try:
            entries = decode_entries(reply.body or b"")
        except ProtocolError as exc:
            raise ZkvError(f"malformed ALL reply from {self.endpoint}: {exc}") from None
        entries.sort(key=_entry_key)
        return entries

    def watch(
        self,
        prefix: bytes | str = b"",
        events: str | Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> Watch:
        """Change events of the keys starting with ``prefix``: an iterator of
        :class:`zkv.protocol.Event`, with a :class:`zkv.watch.Gap` before an event when some
        were missed (zkv/watch.py). ``events``: the broker's events endpoint(s), default
        ``$ZKV_EVENTS`` or tcp://127.0.0.1:5557; CURVE as this client's frontend.
        ``timeout_s``: the iteration ends after this long without an event (None: never)."""
        return Watch(
            self._context,
            events_endpoints(events),
            as_bytes(prefix, "prefix"),
            self.curve,
            timeout_s,
        )

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

    def stats(self) -> dict[str, Any]:
        """The cluster's figures (STATS): the broker's and each worker's last report, as
        docs/protocol.md section 4 describes; what the gateway's /metrics is made of."""
        reply = self.request(Request(Kind.STATS, 0))
        try:
            info = json.loads(reply.body or b"{}")
        except ValueError as exc:
            raise ZkvError(f"malformed STATS reply from {self.endpoint}: {exc}") from None
        if not isinstance(info, dict):
            raise ZkvError(f"malformed STATS reply from {self.endpoint}: not an object")
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
        return self.execute([(_GET, as_bytes(key, "key"), None, None) for key in keys])

    def set_many(
        self,
        items: Mapping[bytes | str, bytes | str] | Iterable[tuple[bytes | str, bytes | str]],
        ttl_s: float | None = None,
    ) -> list[int | None]:
        """Store many values, all with the same time to live; returns their deadlines."""
        pairs = items.items() if isinstance(items, Mapping) else items
        ttl_ms = ttl_to_ms(ttl_s)
        return self.execute(
            [(_SET, as_bytes(k, "key"), as_bytes(v, "value"), ttl_ms) for k, v in pairs]
        )

    def delete_many(self, keys: Iterable[bytes | str]) -> list[bool]:
        """Remove many keys; for each, whether a live key was removed."""
        return self.execute([(_DEL, as_bytes(key, "key"), None, None) for key in keys])

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
        # Which types the results have is found in C; only if an error is among them are the
        # results walked to raise the first (an isinstance per result cost 0.05 us each).
        if raise_on_error and any(issubclass(kind, ZkvError) for kind in set(map(type, results))):
            raise next(result for result in results if isinstance(result, ZkvError))
        return results

    def _pipeline(self, ops: Sequence[PipelineOp]) -> list[Any]:
        """The transport of :meth:`execute`: its results, with a failure as an exception
        instance in its place; never raises for one operation's failure.

        The client's own work overlaps the cluster's: operations are packed just before their
        message leaves (up to ``window_ops`` unanswered), and each reply is turned into results
        as it arrives, while the broker and the workers serve the messages sent before. The
        rules (which message next, what a reply answers, when to resend or give up) are
        :class:`zkv.calls.Calls`'; this method only moves frames and waits.
        """
        count = len(ops)
        results: list[Any] = [_PENDING] * count
        self._drop_previous()  # read by single requests only (see _previous)
        start = time.monotonic()
        # A pipeline fails as a whole, after timeout_s without any reply (see zkv.calls).
        calls = Calls(
            self.brokers,
            self.timeout_s,
            self.attempt_s,
            new_ids,
            start,
            recent_batches=None,
            per_call_deadline=False,
        )
        added = 0  # ops[:added] are answered, refused or in calls
        while added < count or calls:
            now = time.monotonic()
            if calls.parked:  # answered BUSY: back in the queue once their backoff is over
                for position, result in calls.unpark(now):
                    results[position] = result
            while True:
                limit = min(count, added + self.batch_ops - calls.queued)
                limit = min(limit, added + self.window_ops - len(calls))
                if limit > added:
                    # What is refused here, as the broker would, has its error as result.
                    for position, refused in calls.add_many(ops, added, limit, now):
                        results[position] = refused
                    added = limit
                batch = calls.next_batch(self.batch_ops)
                if batch is None:
                    break
                if not self._send(self._connected_socket(), batch.frames, now + self.timeout_s):
                    now = time.monotonic()
                    if calls.unreachable_s(now) >= self.connect_timeout_s:
                        message = (
                            f"broker at {self.endpoint} is not reachable "
                            f"(tried for {now - start:.1f} s)"
                        )
                        return self._give_up(results, calls, gave_up(message, calls.sent_any))
                    if calls.unsendable(now):  # several brokers: on to the next, same ids
                        self._reset()
                        self.retries += 1
                    break
                calls.sent(batch, time.monotonic())
            if not calls.in_flight:
                if calls.parked and not calls.queued:  # all that is left waits for a backoff
                    time.sleep(max(0.0, calls.next_resend_at() - time.monotonic()))
                continue  # else nothing sent yet: the broker is unreachable, keep trying
            wait_s = calls.resend_in(time.monotonic())
            if calls.parked:
                wait_s = min(wait_s, calls.next_resend_at() - time.monotonic())
            if self._receive(calls, results, max(0.0, wait_s)):
                continue
            now = time.monotonic()
            if calls.silent_s(now) >= self.timeout_s:
                message = f"no reply from {self.endpoint} within {self.timeout_s} s"
                return self._give_up(results, calls, gave_up(message, True))
            if calls.resend_due(now):
                # Nothing came back for a while: requests or replies may be lost (a broker
                # restart). Send what is unanswered again, same ids, on a fresh socket (to the
                # next broker if there are several: zkv.calls.Brokers).
                self._reset()
                self.retries += 1
                calls.resend(now)
        return results

    def _receive(self, calls: Calls, results: list[Any], wait_s: float) -> bool:
        """Wait up to ``wait_s`` for replies, take every one already queued and put what they
        answer in ``results``; whether any message came."""
        socket = self._socket
        if socket is None or not self._poller.poll(max(0, int(wait_s * 1000))):
            return False
        came = False
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return came
            try:
                answered = calls.receive(frames, time.monotonic())
            except ProtocolError:
                continue  # not ours to fix, and not worth dying for
            came = True
            for position, result in answered:
                results[position] = result

    def _give_up(self, results: list[Any], calls: Calls, error: ZkvError) -> list[Any]:
        """Fail every operation still without a result (sent or not) and return the results."""
        self._reset()
        calls.fail(None, error)
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
            Busy: answered BUSY (shed to protect the cluster) until ``timeout_s``; resent with
                backoff meanwhile, and not applied.
            StorageFull: the shard's disk is full; the write was not applied.
            Unavailable: the broker is unreachable, or the cluster could not serve the request.
            Timeout: no reply within ``timeout_s``; the request may or may not have been applied.
        """
        request_id = new_id()
        # A SET or DEL is stamped now, once: every resend carries the same first-send time.
        stamp = stamp_of(time.time())
        try:
            frames = encode_request(
                dataclasses.replace(request, request_id=request_id, stamp=stamp)
            )
        except ProtocolError as exc:  # refused here, as the broker would refuse it
            raise RequestError(str(exc)) from None
        start = time.monotonic()
        deadline = start + self.timeout_s
        unreachable_since: float | None = None
        maybe_applied = False  # an attempt left and got no answer
        busy = 0  # BUSY answers in a row
        brokers = self.brokers  # which broker, and when to move on: zkv.calls.Brokers
        while True:
            socket = self._connected_socket()
            if not self._send(socket, frames, deadline):
                now = time.monotonic()
                unreachable_since = now if unreachable_since is None else unreachable_since
                if now >= deadline and maybe_applied:  # a broker took it, none answered
                    raise Timeout(
                        f"no reply from {self.endpoint} within {self.timeout_s} s; outcome unknown"
                    )
                if now - unreachable_since >= self.connect_timeout_s or now >= deadline:
                    message = (
                        f"broker at {self.endpoint} is not reachable "
                        f"(tried for {now - start:.1f} s)"
                    )
                    raise gave_up(message, maybe_applied)
                if brokers.unsendable(now):  # several brokers: on to the next, same frames
                    self._reset()
                continue
            unreachable_since = None  # sends failed in a row only, as in zkv.calls.Calls
            reply = self._wait_reply(
                socket, request_id, min(deadline, time.monotonic() + brokers.resend_s)
            )
            if reply is not None:
                brokers.answered()
                if reply.status != Status.BUSY:
                    return check(reply)
                # Shed, not applied: wait a backoff, then send it again with the same id
                # (zkv.calls.busy_backoff_s), unless that would come after the deadline.
                busy += 1
                now = time.monotonic()
                wait_s = busy_backoff_s(busy, random.random())
                if now + wait_s >= deadline:
                    raise busy_gave_up(reply.body, busy, now - start, maybe_applied)
                time.sleep(wait_s)
                continue
            # No reply: the request or its reply may be lost (a broker restart), or it may have
            # been applied. Send it again (the same frames: the same id and stamp) on a fresh
            # socket, which also drops anything stale still queued in the old one, to the next
            # broker if there are several; the old one is still read for one more interval.
            maybe_applied = True
            self._reset(keep_previous=True)
            brokers.failed(time.monotonic())
            if time.monotonic() >= deadline:
                raise Timeout(
                    f"no reply from {self.endpoint} within {self.timeout_s} s; outcome unknown"
                )
            self.retries += 1

    def _wait_reply(self, socket: zmq.Socket, request_id: int, until: float) -> Reply | None:
        """The reply to ``request_id`` if it comes before ``until`` (monotonic), else None:
        on ``socket`` or on the socket the request left before (see ``_previous``)."""
        while True:
            remaining_ms = int((until - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return None
            ready = dict(self._poller.poll(remaining_ms))
            if not ready:
                return None
            for readable in (socket, self._previous):
                if readable is None or readable not in ready:
                    continue
                try:
                    reply = decode_reply(readable.recv_multipart())
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
            socket = dealer(self._context, self.brokers.endpoint, self.curve)
            self.brokers.opened(time.monotonic())
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

    def _reset(self, keep_previous: bool = False) -> None:
        """Drop the socket (a fresh one is opened when next needed); with ``keep_previous``
        it is read for one more resend interval (see ``_previous``), at most one such."""
        self._drop_previous()
        if self._socket is not None:
            if keep_previous:
                self._previous = self._socket
            else:
                self._poller.unregister(self._socket)
                self._socket.close(linger=0)
            self._socket = None

    def _drop_previous(self) -> None:
        if self._previous is not None:
            self._poller.unregister(self._previous)
            self._previous.close(linger=0)
            self._previous = None


AllOnce = Callable[[bytes, int, bool], list[Entry]]
"""One ALL request: ``(after, limit per shard, keys_only)`` -> the union, sorted by key."""


def _entry_key(entry: Entry) -> bytes:
    return entry.key


def paged(
    all_once: AllOnce,
    after: bytes = b"",
    keys_only: bool = False,
    limit: int = 0,
    page_keys: int = ALL_PAGE_KEYS,
) -> Iterator[list[Entry]]:
    """The entries after ``after`` in pages of at most ``page_keys``, in key order, up to
    ``limit`` in all (0: every one), by the cursor of docs/protocol.md.

    Each page asks every shard for its ``page + 1`` smallest keys after the cursor: the sorted
    union's first ``page`` are the store's next ``page`` keys, and an extra one says another
    page follows (its last key is the next cursor). A page a shard refuses as too large (over
    MAX_REPLY_BYTES of values) is asked again with half as many keys, down to one key; the
    smaller page size is kept for the rest of the listing. Shared by :class:`Client`, the
    gateway's event-loop client and its seed ``/all`` (gateway/bridge.py, gateway/app.py).

    Args:
        all_once: makes one ALL request (:meth:`Client.all_once`).
        page_keys: keys per page at most; capped below MAX_LIST_KEYS, a shard's bound.
    """
    if limit < 0:
        raise RequestError(f"limit must be 0 (every key) or a positive number, got {limit}")
    page = max(1, min(page_keys, MAX_LIST_KEYS - 1))
    remaining = limit
    while True:
        want = min(page, remaining) if limit else page
        try:
            entries = all_once(after, want + 1, keys_only)
        except RequestError as exc:
            if REPLY_TOO_LARGE in str(exc) and want > 1:
                page = want // 2
                continue
            raise
        chunk = entries[:want]
        if chunk:
            yield chunk
        if len(entries) <= want:
            return
        if limit:
            remaining -= len(chunk)
            if remaining <= 0:
                return
        after = chunk[-1].key


def dealer(context: zmq.Context, endpoint: str, curve: ClientCurve | None = None) -> zmq.Socket:
    """A DEALER connected to the broker as both clients want it: IMMEDIATE, so nothing is
    queued for a broker that is not connected (a send fails at once instead: also while a
    CURVE handshake has not succeeded, so a refused key means Unavailable, not a hang);
    LINGER 0, so closing it drops what is stale; reconnecting within a second of a broker
    restart. With ``curve``, a CURVE client of the broker's frontend (zkv/keys.py)."""
    socket = context.socket(zmq.DEALER)
    if curve is not None:
        curve.apply(socket)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.setsockopt(zmq.RECONNECT_IVL, 100)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    socket.connect(endpoint)
    return socket


class Pipeline:
    """Operations queued on a :class:`Client`, sent together by :meth:`execute`.

    Each method returns the pipeline, so calls chain. Not thread-safe, like its client.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._ops: list[PipelineOp] = []

    def get(self, key: bytes | str) -> Pipeline:
        """Queue a GET: its result is an :class:`Item`, or None if the key is missing."""
        self._ops.append((_GET, as_bytes(key, "key"), None, None))
        return self

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> Pipeline:
        """Queue a SET: its result is the key's deadline (Unix ms, None for never)."""
        self._ops.append((_SET, as_bytes(key, "key"), as_bytes(value, "value"), ttl_to_ms(ttl_s)))
        return self

    def delete(self, key: bytes | str) -> Pipeline:
        """Queue a DEL: its result is whether a live key was removed."""
        self._ops.append((_DEL, as_bytes(key, "key"), None, None))
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
