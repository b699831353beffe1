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

Issue 12's commands (conditional and fenced writes, versions, INCR, EXPIRE/persist/TTL, locks)
are methods of the same names on :class:`Client`, :class:`Pipeline` and
:class:`zkv.aio.AsyncClient`, built and read by zkv/calls.py ("extended operations", "locks"):
every write among them is stamped and resent with its request id as SET is, so it is applied
once. A fenced write is preceded by a FENCE_CHECK at the lock's shard; a LOCK that waits in
the broker's line gets its wait added to its deadline and to the silence allowed before a
resend.

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
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import zmq

from zkv import defaults
from zkv.calls import (
    EXTENDED,
    Brokers,
    Calls,
    Item,
    Lock,
    NotFound,
    Op,
    Refresher,
    as_bytes,
    busy_backoff_s,
    busy_gave_up,
    check,
    checked_batch_ops,
    delete_op,
    expire_op,
    fence_check_op,
    fence_of_op,
    frontends,
    gave_up,
    get_op,
    incr_op,
    lock_name,
    lock_op,
    meta_op,
    new_id,
    new_ids,
    new_versioned_item,
    op_wait_s,
    outcome,
    persist_op,
    refresh_op,
    remaining_ms,
    request_of,
    set_op,
    stale_fence,
    ttl_to_ms,
    unlock_op,
)
from zkv.errors import Conflict, LockLost, RequestError, Timeout, ZkvError
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

log = logging.getLogger(__name__)

CONNECT_POLL_S = 0.1  # one wait for the connection to the broker, between retries
# How long leaving a ``with kv.lock(..., refresh=True)`` block waits for its refresh thread
# (which may be inside a REFRESH call) before releasing the lock without it.
REFRESH_JOIN_S = 1.0
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
        self._keys = keys
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

    def set(
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
        """Store ``value`` under ``key``, expiring ``ttl_s`` seconds from now (None: never).

        Args:
            nx: only if the key does not exist (live); xx: only if it does.
            if_version: only if the key exists with this version (:attr:`Item.version`).
            get: return the item the key had before (None if it had none).
            fence: a :class:`Lock` (or ``(name, token)``): only if its token is still the
                newest issued for that lock (checked first with :meth:`check_fence`, then by
                the key's shard).

        Returns:
            The key's deadline in Unix milliseconds, as the worker computed it (None: never);
            with ``get``, the previous :class:`Item` or None.

        Raises:
            PreconditionFailed: nx, xx or if_version refused the write (nothing changed).
            Conflict: the fence token is not the newest (nothing changed).
            InvalidArgument, TypeError: a wrong argument (nx with xx, a TTL that is not
                positive, ...), named in the message; nothing was sent.
        """
        op = set_op(key, value, ttl_s, nx, xx, if_version, get, fence)
        if op[0] < EXTENDED:
            return self.request(Request(Kind.SET, 0, op[1], op[2], op[3])).deadline_ms
        return self._call(op)

    def put(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Item:
        """:meth:`set`, returning the new :class:`Item` with its version (REST's ETag)."""
        op = set_op(key, value, ttl_s, nx, xx, if_version, False, fence, versioned=True)
        version, deadline_ms = self._call(op)
        return new_versioned_item(op[2][1], deadline_ms, version)

    def get(self, key: bytes | str, touch_s: float | None = None) -> Item:
        """The value, deadline and version of ``key``; with ``touch_s``, its deadline moves to
        ``touch_s`` seconds from now in the same step (a sliding session). Raises
        :class:`NotFound` if missing or expired."""
        op = get_op(key, touch_s)
        item = self._call(op)
        if item is None:
            raise NotFound(op[1])
        return item

    def delete(
        self,
        key: bytes | str,
        if_version: int | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> bool:
        """Remove ``key``. Returns False if there was no such (live) key.

        Raises:
            PreconditionFailed: ``if_version`` given and the key has another version or none.
            Conflict: the fence token is not the newest.
        """
        op = delete_op(key, if_version, fence)
        if op[0] < EXTENDED:
            return self.request(Request(Kind.DEL, 0, op[1])).status == Status.OK
        return self._call(op)

    def incr(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> int:
        """Add ``by`` (may be negative) to the key's value read as a signed 64-bit decimal;
        an absent key counts as 0 and is created with ``ttl_s`` (None: no deadline); an
        existing one keeps its deadline unless ``ttl_s`` is given. Returns the new value.

        Raises:
            Conflict: the value is not an integer, or the result would leave 64 bits
                (nothing changed); or the fence token is not the newest.
        """
        return self._call(incr_op(key, by, ttl_s, fence))

    def incr_item(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> tuple[int, int, int | None]:
        """:meth:`incr`, returning ``(value, version, deadline_ms)``."""
        return self._call(incr_op(key, by, ttl_s, fence, item=True))

    def expire(
        self,
        key: bytes | str,
        ttl_s: float,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> int:
        """Give ``key`` a new deadline ``ttl_s`` seconds from now; returns it (Unix ms).
        Raises :class:`NotFound` if missing or expired; :class:`Conflict` if ``fence`` (as
        for :meth:`set`) is not the newest token (nothing changed)."""
        op = expire_op(key, ttl_s, fence)
        deadline_ms = self._call(op)
        if deadline_ms is None:
            raise NotFound(op[1])
        return deadline_ms

    def persist(self, key: bytes | str, fence: Lock | tuple[bytes | str, int] | None = None) -> int:
        """Remove the deadline of ``key``; returns its new version. Raises :class:`NotFound`
        if missing or expired; :class:`Conflict` if ``fence`` (as for :meth:`set`) is not the
        newest token (nothing changed)."""
        op = persist_op(key, fence)
        version = self._call(op)
        if version is None:
            raise NotFound(op[1])
        return version

    def ttl_ms(self, key: bytes | str) -> int | None:
        """Milliseconds ``key`` has left (None: no deadline), from its deadline and this
        machine's clock. Raises :class:`NotFound` if missing or expired."""
        op = meta_op(key)
        item = self._call(op)
        if item is None:
            raise NotFound(op[1])
        return remaining_ms(item.deadline_ms)

    # --- locks ------------------------------------------------------------------------------

    def acquire_lock(self, name: bytes | str, ttl_s: float, wait_s: float = 0) -> Lock:
        """Take the lock ``name`` for ``ttl_s`` seconds; if it is held, wait up to ``wait_s``
        seconds in line (FIFO, in the broker). The lock's token grows with every acquisition:
        pass the Lock as ``fence=`` to writes that must not land after it is lost.

        Raises:
            Conflict: still held by another when the wait ran out; ``deadline_ms`` is when
                that hold expires.
        """
        op = lock_op(name, ttl_s, wait_s)
        token, expires_at_ms = self._call(op)
        return Lock(op[1], token, expires_at_ms)

    def refresh_lock(self, name: bytes | str, token: int, ttl_s: float) -> int:
        """Extend the hold of ``name`` taken with ``token`` to ``ttl_s`` seconds from now;
        returns the new expiry (Unix ms). Raises :class:`Conflict` if ``token`` is no longer
        the lock's (it lapsed and someone else took it)."""
        return self._call(refresh_op(name, token, ttl_s))

    def release_lock(self, name: bytes | str, token: int) -> None:
        """Release ``name`` held with ``token``. Raises :class:`Conflict` if ``token`` is no
        longer the lock's."""
        self._call(unlock_op(name, token))

    def check_fence(self, name: bytes | str, token: int) -> bool:
        """Whether ``token`` is still the newest token issued for lock ``name``."""
        return self._call(fence_check_op(name, token))

    def lock(
        self, name: bytes | str, ttl_s: float = 10, wait_s: float = 0, refresh: bool = False
    ) -> HeldLock:
        """A context manager holding lock ``name``: ``with kv.lock("job", ttl_s=10) as lock:``.

        Taken on entry (:meth:`acquire_lock`: Conflict if still held after ``wait_s``),
        released on exit, also when the block raises. With ``refresh``, a background thread
        (its own client and socket) refreshes the hold every ``ttl_s / 3``; if that fails
        (refused, or not done before the hold expired) the lock is lost: ``lock.lost`` turns
        True, ``lock.check()`` raises :class:`LockLost`, and so does the end of the block
        (unless the block raised something else). See zkv/calls.py, "locks".
        """
        lock_name(name)  # refused here, not at the with statement's entry
        ttl_to_ms(ttl_s)
        return HeldLock(self, name, ttl_s, wait_s, refresh)

    def _call(self, op: Op) -> Any:
        """Send one operation (after its fence's pre-check) and return its
        :func:`zkv.calls.outcome`, raising the error it failed with."""
        fence = fence_of_op(op)
        if fence is not None and not self.check_fence(*fence):
            raise stale_fence(fence)
        reply = self.request(request_of(op), wait_s=op_wait_s(op), checked=False)
        result = outcome(op[0], reply.status, reply.deadline_ms, reply.body)
        if isinstance(result, ZkvError):
            raise result
        return result

    def clone(self) -> Client:
        """A new client of the same brokers with the same settings (its own socket: for
        another thread)."""
        return Client(
            self.brokers.endpoints,
            self.timeout_s,
            self.attempt_s,
            self.connect_timeout_s,
            self._context,
            self.batch_ops,
            self.window_ops,
            self._keys,
            self.brokers.current,
        )

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

        The plain GETs of the hot path: values and deadlines, each Item's version 0 (not
        asked for; a versioned GET is packed by zkv.protocol's general path, several times
        slower). For versions, ``pipeline().get(key)`` each, or :meth:`get`.

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
        return self._execute(ops, raise_on_error)

    def _execute(
        self,
        ops: Sequence[PipelineOp],
        raise_on_error: bool,
        plain: bool = True,
        patience_s: float = 0.0,
    ) -> list[Any]:
        """:meth:`execute`; ``plain``: every op is a plain GET, SET or DEL (the hot path),
        ``patience_s``: the broker may hold an op that long before answering (a lock's wait),
        added to the pipeline's silence timeout."""
        results = self._pipeline(ops, plain, patience_s)
        # Which types the results have is found in C; only if an error is among them are the
        # results walked to raise the first (an isinstance per result cost 0.05 us each).
        if raise_on_error and any(issubclass(kind, ZkvError) for kind in set(map(type, results))):
            raise next(result for result in results if isinstance(result, ZkvError))
        return results

    def _pipeline(
        self, ops: Sequence[PipelineOp], plain: bool = True, patience_s: float = 0.0
    ) -> list[Any]:
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
                    for position, refused in calls.add_many(ops, added, limit, now, plain):
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
            if calls.silent_s(now) >= self.timeout_s + patience_s:
                message = f"no reply from {self.endpoint} within {self.timeout_s + patience_s} s"
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

    def request(self, request: Request, wait_s: float = 0.0, checked: bool = True) -> Reply:
        """Send one request and wait for its reply.

        The request id of ``request`` is replaced by a fresh random one, which its retries keep.
        ``wait_s``: the broker may hold it that long before answering (a LOCK's wait): the
        deadline and the first resend come that much later. ``checked`` False: a reply of any
        status but BUSY is returned, not raised.

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
        deadline = start + self.timeout_s + wait_s
        # A LOCK's wait in the broker is no failure of it: its silences until then are resent
        # to the same broker (a restarted one lost its queue of waiters), stamped anew (a wait
        # outlasts the workers' idempotency window; docs/protocol.md says why that is safe).
        patient_until = start + wait_s
        restamp = request.kind == Kind.LOCK and wait_s > 0
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
            now = time.monotonic()
            resend_at = now + brokers.resend_s
            if restamp and resend_at > patient_until - brokers.resend_s:
                # No resend within an attempt of the wait's end: the broker answers then, and a
                # resend racing that answer would start a fresh wait (as zkv.calls.Calls).
                resend_at = max(resend_at, patient_until + brokers.resend_s)
            reply = self._wait_reply(socket, request_id, min(deadline, resend_at))
            if reply is not None:
                brokers.answered()
                if reply.status != Status.BUSY:
                    return check(reply) if checked else reply
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
            if time.monotonic() >= patient_until:
                brokers.failed(time.monotonic())
            if restamp:
                frames = encode_request(
                    dataclasses.replace(request, request_id=request_id, stamp=stamp_of(time.time()))
                )
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

    Each method returns the pipeline, so calls chain; the results come from :meth:`execute`,
    in order, each as the :class:`Client` method of the same name returns it, except that a
    missing key is None (get, expire, persist) instead of NotFound (ttl_ms, whose None means
    "no deadline", keeps NotFound), and a failure is raised after every operation was
    answered (or, with ``raise_on_error`` False, is the exception in its place). Not
    thread-safe, like its client.

    Fenced writes (``fence=``): :meth:`execute` first checks every distinct fence in one
    BATCH (FENCE_CHECK), then sends the operations; a write whose fence failed the check is
    not sent and has a :class:`Conflict` as its result.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._ops: list[PipelineOp] = []
        self._plain = True  # every op queued is a plain GET, SET or DEL (the hot path)
        self._patience_s = 0.0  # the longest lock wait queued
        # (position, function): turns an op's raw outcome into what the method promises.
        self._fixups: list[tuple[int, Callable[[Any], Any]]] = []
        self._fences: list[tuple[int, tuple[bytes, int]]] = []  # (position, fence)

    def _add(self, op: PipelineOp, fixup: Callable[[Any], Any] | None = None) -> Pipeline:
        if op[0] >= EXTENDED:
            self._plain = False
            fence = fence_of_op(op)
            if fence is not None:
                self._fences.append((len(self._ops), fence))
            wait_s = op_wait_s(op)
            if wait_s > self._patience_s:
                self._patience_s = wait_s
        if fixup is not None:
            self._fixups.append((len(self._ops), fixup))
        self._ops.append(op)
        return self

    def get(self, key: bytes | str, touch_s: float | None = None) -> Pipeline:
        """Queue a GET (with ``touch_s``: and move the deadline): its result is an
        :class:`Item` with its version, or None if the key is missing."""
        return self._add(get_op(key, touch_s))

    def set(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        get: bool = False,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Pipeline:
        """Queue a SET (options as :meth:`Client.set`): its result is the key's deadline
        (Unix ms, None for never), or with ``get`` the previous Item or None."""
        return self._add(set_op(key, value, ttl_s, nx, xx, if_version, get, fence))

    def put(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Pipeline:
        """Queue a SET whose result is the new :class:`Item` with its version."""
        op = set_op(key, value, ttl_s, nx, xx, if_version, False, fence, versioned=True)
        value_bytes = op[2][1]
        return self._add(op, lambda result: new_versioned_item(value_bytes, result[1], result[0]))

    def delete(
        self,
        key: bytes | str,
        if_version: int | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Pipeline:
        """Queue a DEL: its result is whether a live key was removed."""
        return self._add(delete_op(key, if_version, fence))

    def incr(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Pipeline:
        """Queue an INCR: its result is the new value."""
        return self._add(incr_op(key, by, ttl_s, fence))

    def incr_item(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Pipeline:
        """Queue an INCR: its result is ``(value, version, deadline_ms)``."""
        return self._add(incr_op(key, by, ttl_s, fence, item=True))

    def expire(
        self,
        key: bytes | str,
        ttl_s: float,
        fence: Lock | tuple[bytes | str, int] | None = None,
    ) -> Pipeline:
        """Queue an EXPIRE: its result is the new deadline, None if the key is missing (a
        Conflict if its fence is stale)."""
        return self._add(expire_op(key, ttl_s, fence))

    def persist(
        self, key: bytes | str, fence: Lock | tuple[bytes | str, int] | None = None
    ) -> Pipeline:
        """Queue a persist: its result is the key's new version, None if it is missing (a
        Conflict if its fence is stale)."""
        return self._add(persist_op(key, fence))

    def ttl_ms(self, key: bytes | str) -> Pipeline:
        """Queue a TTL read: its result is the milliseconds left (None: no deadline); a
        missing key has a :class:`NotFound` in its place (None means "no deadline" here)."""
        op = meta_op(key)
        return self._add(op, lambda item: _ttl_or_missing(op[1], item))

    def acquire_lock(self, name: bytes | str, ttl_s: float, wait_s: float = 0) -> Pipeline:
        """Queue a LOCK: its result is a :class:`Lock` (or :class:`Conflict`)."""
        op = lock_op(name, ttl_s, wait_s)
        lock_key = op[1]
        return self._add(op, lambda result: Lock(lock_key, result[0], result[1]))

    def refresh_lock(self, name: bytes | str, token: int, ttl_s: float) -> Pipeline:
        """Queue a REFRESH: its result is the new expiry (Unix ms)."""
        return self._add(refresh_op(name, token, ttl_s))

    def release_lock(self, name: bytes | str, token: int) -> Pipeline:
        """Queue an UNLOCK: its result is None."""
        return self._add(unlock_op(name, token))

    def check_fence(self, name: bytes | str, token: int) -> Pipeline:
        """Queue a FENCE_CHECK: its result is whether ``token`` is the lock's newest."""
        return self._add(fence_check_op(name, token))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send everything queued (then forget it) and return the results in order; see
        :meth:`Client.execute` and the class docstring (fences)."""
        ops, self._ops = self._ops, []
        plain, self._plain = self._plain, True
        patience_s, self._patience_s = self._patience_s, 0.0
        fixups, self._fixups = self._fixups, []
        fences, self._fences = self._fences, []
        if not ops:
            return []
        client = self._client
        if plain:
            return client._execute(ops, raise_on_error)
        refused: dict[int, ZkvError] = {}
        if fences:
            refused = self._check_fences(fences)
        if refused:
            keep = [position for position in range(len(ops)) if position not in refused]
            sent = client._execute([ops[p] for p in keep], False, False, patience_s)
            results: list[Any] = [None] * len(ops)
            for position, result in zip(keep, sent, strict=True):
                results[position] = result
            for position, err in refused.items():
                results[position] = err
        else:
            results = client._execute(ops, False, False, patience_s)
        for position, fixup in fixups:
            result = results[position]
            if not isinstance(result, ZkvError):
                results[position] = fixup(result)
        if raise_on_error:
            for result in results:
                if isinstance(result, ZkvError):
                    raise result
        return results

    def _check_fences(self, fences: list[tuple[int, tuple[bytes, int]]]) -> dict[int, ZkvError]:
        """FENCE_CHECK each distinct fence (one BATCH); the positions whose fence failed,
        each with its error (Conflict, or the check's own failure)."""
        distinct = list(dict.fromkeys(fence for _, fence in fences))
        checks = self._client._execute(
            [fence_check_op(name, token) for name, token in distinct], False, False
        )
        failed: dict[tuple[bytes, int], ZkvError] = {}
        for fence, result in zip(distinct, checks, strict=True):
            if isinstance(result, ZkvError):
                failed[fence] = result
            elif result is not True:
                failed[fence] = stale_fence(fence)
        return {position: failed[fence] for position, fence in fences if fence in failed}

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
        self._plain = True
        self._patience_s = 0.0
        self._fixups = []
        self._fences = []


def _ttl_or_missing(key: bytes, item: Item | None) -> int | NotFound | None:
    """A pipelined ttl_ms's result: the milliseconds left, None for no deadline, NotFound
    (as an error in the op's place) for a missing key."""
    if item is None:
        return NotFound(key)
    return remaining_ms(item.deadline_ms)


class HeldLock:
    """The context manager of :meth:`Client.lock`: takes the lock on entry, releases it on
    exit, and with ``refresh`` keeps it in a background thread meanwhile (zkv/calls.py,
    "locks", says how a failed refresh surfaces)."""

    def __init__(
        self, client: Client, name: bytes | str, ttl_s: float, wait_s: float, refresh: bool
    ) -> None:
        self._client = client
        self._name = name
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        self._refresh = refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock: Lock | None = None

    def __enter__(self) -> Lock:
        self.lock = lock = self._client.acquire_lock(self._name, self._ttl_s, self._wait_s)
        if self._refresh:
            refresher = Refresher(lock, self._ttl_s, time.monotonic())
            self._thread = threading.Thread(
                target=self._keep,
                args=(refresher,),
                name=f"zkv-lock-{lock.name.decode(errors='replace')}",
                daemon=True,  # never keeps the interpreter alive
            )
            self._thread.start()
        return lock

    def _keep(self, refresher: Refresher) -> None:
        """The refresh thread: REFRESH every ttl / 3 on a client of its own, until stopped or
        the lock is lost."""
        lock = refresher.lock
        try:
            with self._client.clone() as kv:
                while not self._stop.wait(max(0.0, refresher.due_in(time.monotonic()))):
                    try:
                        expires_at_ms = kv.refresh_lock(lock.name, lock.token, self._ttl_s)
                    except ZkvError as exc:
                        if not refresher.failed(exc, time.monotonic(), int(time.time() * 1000)):
                            log.warning("%s", lock.error)
                            return
                    else:
                        refresher.refreshed(expires_at_ms, time.monotonic())
        except Exception as exc:  # a bug must not die silently in a thread: the lock is lost
            lock.error = LockLost(f"lock refresh failed: {exc!r}")
            log.exception("lock refresh thread failed")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lock = self.lock
        if lock is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(REFRESH_JOIN_S)
        if lock.error is not None:  # lost: the token is stale, nothing to release
            if exc_type is None:
                raise lock.error
            return
        try:
            self._client.release_lock(lock.name, lock.token)
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


_PENDING: Any = object()  # a pipeline result not known yet
