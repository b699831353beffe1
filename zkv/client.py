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

Example::

    with Client("tcp://127.0.0.1:5555") as kv:
        kv.set("greeting", "hello", ttl_s=10)
        item = kv.get("greeting")     # Item(value=b'hello', deadline_ms=...)
        kv.delete("greeting")         # True
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zmq

from zkv import defaults
from zkv.errors import RequestError, Timeout, Unavailable, ZkvError
from zkv.protocol import (
    Entry,
    Kind,
    ProtocolError,
    Reply,
    Request,
    Status,
    decode_entries,
    decode_reply,
    encode_request,
)

CONNECT_POLL_S = 0.1  # one wait for the connection to the broker, between retries


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
    ) -> None:
        self.endpoint = endpoint or os.environ.get("ZKV_FRONTEND") or defaults.FRONTEND
        self.timeout_s = timeout_s
        self.attempt_s = attempt_s
        self.connect_timeout_s = connect_timeout_s
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
        ttl_ms = None if ttl_s is None else max(1, round(ttl_s * 1000))
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


def _check(reply: Reply) -> Reply:
    message = (reply.body or b"").decode(errors="replace")
    if reply.status == Status.ERROR:
        raise RequestError(message)
    if reply.status == Status.UNAVAILABLE:
        raise Unavailable(message)
    return reply
