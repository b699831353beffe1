"""The Python client: talks to the broker's frontend over one ZeroMQ DEALER socket.

A ``Client`` is not thread-safe (ZeroMQ sockets are not): give each thread its own, as the
gateway does. Every request carries a fresh request id, so replies are matched by id and a late
reply to a request that already timed out is recognised and dropped.

Failing fast instead of hanging: the socket has ``ZMQ_IMMEDIATE`` set, so a request is never
queued for a broker that is not connected. When the broker is down, a request fails with
:class:`Unavailable` after at most ``connect_wait_s`` (the time a live broker needs to accept the
TCP connection), not after the full timeout; and when the broker comes back, ZeroMQ reconnects
by itself. After a timeout the socket is closed and opened again (the guide's Lazy Pirate), so a
request that never left cannot be delivered to a broker that restarts minutes later.

Example::

    with Client("tcp://127.0.0.1:5555") as kv:
        kv.set("greeting", "hello", ttl_s=10)
        item = kv.get("greeting")     # Item(value=b'hello', deadline_ms=...)
        kv.delete("greeting")         # True
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
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
        timeout_s: how long to wait for each reply before raising :class:`Timeout`.
        connect_wait_s: how long a request may wait for the connection to the broker to exist
            before raising :class:`Unavailable`.
        context: the ZeroMQ context; defaults to the process-wide one.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        connect_wait_s: float = 0.5,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint or os.environ.get("ZKV_FRONTEND") or defaults.FRONTEND
        self.timeout_s = timeout_s
        self.connect_wait_s = connect_wait_s
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
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

        The request id of ``request`` is replaced by a fresh one.

        Raises:
            RequestError: the request was refused as wrong.
            Unavailable: the broker is unreachable or the shard has no worker.
            Timeout: no reply within ``timeout_s``.
        """
        request_id = next(self._ids)
        try:
            frames = encode_request(dataclasses.replace(request, request_id=request_id))
        except ProtocolError as exc:  # refused here, as the broker would refuse it
            raise RequestError(str(exc)) from None
        socket = self._connected_socket()
        if not self._send(socket, frames):
            raise Unavailable(f"broker at {self.endpoint} is not reachable")
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._poller.poll(remaining_ms):
                self._reset()
                raise Timeout(f"no reply from {self.endpoint} within {self.timeout_s} s")
            try:
                reply = decode_reply(socket.recv_multipart())
            except ProtocolError:
                continue  # not ours to fix, and not worth dying for
            if reply.request_id != request_id:
                continue  # a late reply to an earlier request that timed out
            return _check(reply)

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

    def _send(self, socket: zmq.Socket, frames: Sequence[bytes]) -> bool:
        """Send without ever queueing for an absent broker; False if none is connected."""
        try:
            socket.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            pass
        if not socket.poll(int(self.connect_wait_s * 1000), zmq.POLLOUT):
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
