"""Watching change events: ``for item in kv.watch(prefix)`` (sync) and ``async for`` (asyncio).

A watch is a ZeroMQ SUB socket connected to the broker's events endpoint (``ZKV_EVENTS``,
default tcp://127.0.0.1:5557; in cluster mode every broker's, comma-separated), subscribed to
the key prefix, so the broker's XPUB filters by prefix and sends only what matches. Each
message is one change, decoded by zkv.protocol.decode_event into a :class:`zkv.protocol.Event`
(key, event, shard, seq, version, deadline_ms).

Gaps. Every shard numbers its events ``seq = stream << 32 | n`` (docs/protocol.md): within one
stream, consecutive ``n`` means nothing was missed. The iterator checks that per shard and,
when something was missed, yields a :class:`Gap` *before* the event that revealed it:

* ``Gap(new_stream=False, missed=k)``: k events of that shard were lost (a high-water mark
  dropped them because this watcher or the gateway was slow). Only a watch of every key (an
  empty prefix) reports these: ``n`` counts all the shard's keys, and a prefix watcher gets
  only its own (ZeroMQ filters at the publisher), so for it a jump is normal, not a loss;
* ``Gap(new_stream=True)``: the shard has a new owner (a failover, a worker restart, a broker
  restart); what the old owner published after the last event received is unknown.

After a Gap, re-read what you need (a GET, or a listing) before trusting your view. The first
event of each shard starts its tracking (no Gap: nothing was expected yet). Streams are not
ordered: one not seen before for the shard is a new stream, whatever its number. Events
received twice (several brokers, cluster mode) or late from a stream since replaced (the
last REPLACED_STREAMS of each shard are remembered) are dropped.

Bounds: the socket queues at most :data:`EVENTS_RCVHWM` messages (ZeroMQ drops past it: a
Gap), and refuses a message over :data:`EVENTS_MAX_MESSAGE_BYTES`; a malformed message is
skipped (counted in ``Watch.malformed``). Nothing else is buffered beyond one Gap and its event.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import zmq

from zkv import defaults
from zkv.keys import ClientCurve
from zkv.protocol import MAX_KEY_BYTES, Event, ProtocolError, decode_event

EVENTS_RCVHWM = 100_000  # messages a watcher's socket queues before ZeroMQ drops (a Gap)
EVENTS_MAX_MESSAGE_BYTES = MAX_KEY_BYTES + 1024  # the longest key plus the 32-byte header
SEQ_N_BITS = 32
SEQ_N_MASK = (1 << SEQ_N_BITS) - 1
REPLACED_STREAMS = 4  # per shard: replaced streams whose late events are recognised and dropped
WAIT_SLICE_S = 0.5
MONITOR_READS = 16  # monitor messages read per look at Watch.connected (only connects queue)
_CONNECTED = {
    zmq.EVENT_CONNECTED
}  # the longest single wait: Ctrl-C and a missed edge are seen this soon


@dataclass(frozen=True, slots=True)
class Gap:
    """Events of ``shard`` were missed before the next event (see the module docstring).

    Attributes:
        shard: the shard whose events were missed.
        expected: the seq that was due.
        got: the seq that came instead.
        new_stream: the shard's stream changed (a new owner): how much was missed is unknown.
    """

    shard: int
    expected: int
    got: int
    new_stream: bool

    @property
    def missed(self) -> int | None:
        """How many events were lost, None when unknown (a new stream)."""
        if self.new_stream:
            return None
        return ((self.got & SEQ_N_MASK) - (self.expected & SEQ_N_MASK)) % SEQ_N_MASK


class SeqTracker:
    """The last seq of each shard seen, and what a new one means (pure: unit tested).

    Streams are never compared as numbers (a restarted broker's owners may have smaller ones):
    a stream not seen before for a shard is a new one; the streams it replaced are remembered,
    at most :data:`REPLACED_STREAMS` per shard, and their late events dropped.

    Args:
        exact: a jump of ``n`` within a stream is a loss (a Gap). True when every event of
            the shard is received (an empty prefix); a prefix watcher gets only its keys'
            events, so for it a jump is normal and only a new stream is reported.
    """

    __slots__ = ("exact", "last", "replaced")

    def __init__(self, exact: bool = True) -> None:
        self.last: dict[int, int] = {}
        self.replaced: dict[int, deque[int]] = {}  # shard -> its replaced streams, newest last
        self.exact = exact

    def check(self, shard: int, seq: int) -> Gap | Literal[False] | None:
        """None: in order (or the shard's first); a Gap: events were missed (the event still
        counts); False: a duplicate or a replaced stream's late event, to be dropped."""
        last = self.last.get(shard)
        if last is None:
            self.last[shard] = seq
            return None
        stream, n = seq >> SEQ_N_BITS, seq & SEQ_N_MASK
        last_stream, last_n = last >> SEQ_N_BITS, last & SEQ_N_MASK
        expected_n = last_n % SEQ_N_MASK + 1
        expected = last_stream << SEQ_N_BITS | expected_n
        if stream == last_stream:
            if n == expected_n:
                self.last[shard] = seq
                return None
            if n <= last_n:  # seen (several brokers), or far behind: not news
                return False
            self.last[shard] = seq
            return Gap(shard, expected, seq, False) if self.exact else None
        replaced = self.replaced.get(shard)
        if replaced is None:
            replaced = self.replaced[shard] = deque(maxlen=REPLACED_STREAMS)
        elif stream in replaced:
            return False
        replaced.append(last_stream)
        self.last[shard] = seq
        return Gap(shard, expected, seq, True)


def events_endpoints(events: str | Sequence[str] | None) -> list[str]:
    """The events endpoints: ``events`` if given (a list, or comma-separated), else
    ``$ZKV_EVENTS``, else zkv.defaults.EVENTS."""
    if events is None:
        events = os.environ.get("ZKV_EVENTS") or defaults.EVENTS
    if isinstance(events, str):
        events = [part.strip() for part in events.split(",")]
    found = [endpoint for endpoint in events if endpoint]
    if not found:
        raise ValueError("no events endpoint given")
    return found


def _subscriber(
    context: zmq.Context,
    endpoints: list[str],
    prefix: bytes,
    curve: ClientCurve | None,
    on_socket: Callable[[zmq.Socket], None] | None = None,
) -> zmq.Socket:
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, EVENTS_RCVHWM)
    socket.setsockopt(zmq.MAXMSGSIZE, EVENTS_MAX_MESSAGE_BYTES)
    if curve is not None:
        curve.apply(socket)
    try:
        if on_socket is not None:
            on_socket(socket)
        for endpoint in endpoints:
            socket.connect(endpoint)
        socket.setsockopt(zmq.SUBSCRIBE, prefix)
    except zmq.ZMQError:
        socket.close(linger=0)
        raise
    return socket


class _Base:
    monitored = False  # a socket monitor records whether a connection was made
    _monitor: zmq.Socket | None = None

    def __init__(
        self,
        context: zmq.Context,
        endpoints: list[str],
        prefix: bytes,
        curve: ClientCurve | None,
    ) -> None:
        self.prefix = prefix
        self.endpoints = endpoints
        try:
            self.socket = _subscriber(context, endpoints, prefix, curve, self._before_connect)
        except zmq.ZMQError:
            if self._monitor is not None:
                self._monitor.close(linger=0)
            raise
        self.tracker = SeqTracker(exact=not prefix)
        self.pending: deque[Event | Gap] = deque()
        self.malformed = 0
        self.received = 0

    def _before_connect(self, socket: zmq.Socket) -> None:
        """Called with the new socket before its connects: a monitor made later could miss a
        fast connection (Watch only: :attr:`Watch.connected`)."""
        if self.monitored:
            self._monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED)

    def _take(self) -> Event | Gap | None:
        """The next item from what the socket holds now, without waiting."""
        if self.pending:
            return self.pending.popleft()
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                event = decode_event(frames)
            except ProtocolError:
                self.malformed += 1
                continue
            if not event.key.startswith(self.prefix):
                continue  # ZeroMQ filters already; a hostile publisher is checked anyway
            found = self.tracker.check(event.shard, event.seq)
            if found is False:
                continue
            self.received += 1
            if found is None:
                return event
            self.pending.append(event)
            return found

    def close(self) -> None:
        self.socket.close(linger=0)


class Watch(_Base):
    """A blocking iterator of :class:`Event` and :class:`Gap` (see the module docstring).

    Made by :meth:`zkv.client.Client.watch`. ``timeout_s``: iteration ends after this long
    without an event (None: waits for ever). Close it (or use ``with``) to let go of the socket.
    :attr:`connected` says whether a connection to an events endpoint was ever made (so that
    ``zkv watch`` can tell "nothing happened" from "nothing listens there").
    """

    monitored = True

    def __init__(
        self,
        context: zmq.Context,
        endpoints: list[str],
        prefix: bytes,
        curve: ClientCurve | None,
        timeout_s: float | None = None,
    ) -> None:
        self._connected = False
        super().__init__(context, endpoints, prefix, curve)
        self.timeout_s = timeout_s
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)

    @property
    def connected(self) -> bool:
        """True once a TCP (or IPC) connection to one of the endpoints was made."""
        monitor = self._monitor
        if self._connected or monitor is None:
            return self._connected
        for _ in range(MONITOR_READS):
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames[0]) >= 2 and int.from_bytes(frames[0][:2], "little") in _CONNECTED:
                self._connected = True
                break
        return self._connected

    def close(self) -> None:
        if self._monitor is not None:
            try:
                self.socket.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        super().close()

    def next(self, timeout_s: float | None) -> Event | Gap | None:
        """The next item, waiting up to ``timeout_s`` (None: for ever); None if none came."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            item = self._take()
            if item is not None:
                return item
            wait_s = WAIT_SLICE_S
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    return None
            self._poller.poll(max(1, int(wait_s * 1000)))

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event | Gap:
        item = self.next(self.timeout_s)
        if item is None:
            raise StopIteration
        return item

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class AsyncWatch(_Base):
    """The asyncio iterator of :class:`Event` and :class:`Gap` (:meth:`AsyncClient.watch`).

    The socket is a plain one whose descriptor the loop watches (``loop.add_reader``), as the
    asyncio client's (zkv/aio.py): edge-triggered, so it reads until ``zmq.Again`` and looks
    again every WAIT_SLICE_S in case an edge was eaten.
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoints: list[str],
        prefix: bytes,
        curve: ClientCurve | None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(context, endpoints, prefix, curve)
        self.timeout_s = timeout_s

    async def next(self, timeout_s: float | None) -> Event | Gap | None:
        """The next item, waiting up to ``timeout_s`` (None: for ever); None if none came."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        fd = self.socket.FD
        while True:
            item = self._take()
            if item is not None:
                return item
            wait_s = WAIT_SLICE_S
            if deadline is not None:
                wait_s = min(wait_s, deadline - loop.time())
                if wait_s <= 0:
                    return None
            if self.socket.get(zmq.EVENTS) & zmq.POLLIN:
                continue  # that look may have taken in a message without an edge
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _settle, ready)
            try:
                await asyncio.wait_for(ready, wait_s)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(fd)

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> Event | Gap:
        item = await self.next(self.timeout_s)
        if item is None:
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
