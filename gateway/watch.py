"""``GET /v1/watch?prefix=P``: change events as Server-Sent Events.

One SUB socket per gateway process (:class:`Hub`) receives every event the broker's XPUB
publishes (docs/protocol.md, "Change events") and fans them out to the process's watchers,
each with its own bounded queue, filtered by its prefix. What a watcher reads::

    event: set                      (set, delete, expire, incr, ttl)
    id: 0:4294967297                <shard>:<seq>
    data: {"key": "a", "version": 1733540000000000, "expires_at_ms": null}

    : keepalive                     every KEEPALIVE_S of silence

    event: reset                    the watcher missed events (below): re-read what it needs
    data: {"reason": "...", "shard": 0}

Resume: a reconnecting client sends ``Last-Event-ID`` (browsers' EventSource do it by
themselves); the events after that id that are still in the process's history ring (the last
:data:`EVENT_HISTORY` events) are sent first, then live ones. An id the ring no longer holds
(or never held: another gateway process, or one restarted) gets ``event: reset`` with reason
``history`` first, then live events. The ring is per process, and each process sees the events
in the broker's order, so a resume is exact within a process; across processes (several
gateway processes behind one port) events of different shards received in the same instant
may come in another order, and a resume may repeat or skip such an event: check ``id``'s
sequence per shard, as zkv.watch does, where that matters.

``event: reset`` also comes when the hub itself saw a gap in a shard's sequence (the broker
restarted, or ZeroMQ's high-water mark dropped events for this gateway: reason ``gap``), when a
shard's stream changed (a new owner: reason ``stream``), and when a watcher's queue overflowed
(reason ``slow``: the stream then ends; the client reconnects and resumes from the history).

Bounds (all per gateway process): :data:`EVENT_HISTORY` events of history,
:data:`MAX_WATCHERS` watchers (more get 503), :data:`WATCHER_QUEUE` events queued per watcher.
Under the gthread worker a watcher holds one of the process's threads for as long as it
watches, so at most half the threads (``--threads``) may watch. Once a process has had a
watcher its SUB socket stays subscribed to every event (the history must hold them all).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from gateway.http11 import STREAM_KEY, STREAMS_KEY, StreamOut
from zkv.keys import ClientCurve
from zkv.logs import LogLimiter
from zkv.protocol import Event, ProtocolError, decode_event
from zkv.watch import EVENTS_MAX_MESSAGE_BYTES, EVENTS_RCVHWM, Gap, SeqTracker

log = logging.getLogger(__name__)
limited = LogLimiter(log)

EVENT_HISTORY = 10_000  # events kept per gateway process for Last-Event-ID resume
MAX_WATCHERS = 100  # watchers per gateway process (gthread: at most half its threads)
WATCHER_QUEUE = 10_000  # events queued for one watcher; past it the watcher gets a reset
KEEPALIVE_S = 15.0  # a comment line after this long without an event (proxies close idle)
RETRY_MS = 1000  # the "retry:" an EventSource waits before reconnecting
THREAD_POLL_MS = 200  # the gthread hub's poll: how soon it sees a stop
RECV_PER_WAKE = 4096  # messages read per wake-up of the loop hub before it yields the loop


# --- formatting (pure) ---------------------------------------------------------------------


def key_text(key: bytes) -> str:
    """A key as JSON text: UTF-8, invalid bytes as lone surrogates (as gateway/app.py)."""
    return key.decode("utf-8", errors="surrogateescape")


def event_id(shard: int, seq: int) -> str:
    return f"{shard}:{seq}"


def parse_event_id(text: str) -> tuple[int, int]:
    """``<shard>:<seq>`` of a Last-Event-ID; raises ValueError naming what is wrong."""
    shard, colon, seq = text.strip().partition(":")
    if not colon or not shard.isdigit() or not seq.isdigit() or len(shard) + len(seq) > 40:
        raise ValueError(f"Last-Event-ID must be <shard>:<seq>, got {text[:64]!r}")
    return int(shard), int(seq)


def format_event(event: Event) -> bytes:
    """One event as an SSE message (ends with the blank line)."""
    data = json.dumps(
        {
            "key": key_text(event.key),
            "version": event.version,
            "expires_at_ms": event.deadline_ms or None,
        },
        ensure_ascii=True,
    )
    name = event.event.name.lower()
    return f"event: {name}\nid: {event_id(event.shard, event.seq)}\ndata: {data}\n\n".encode()


def format_reset(reason: str, shard: int | None = None) -> bytes:
    data = json.dumps({"reason": reason, "shard": shard})
    return f"event: reset\ndata: {data}\n\n".encode()


KEEPALIVE = b": keepalive\n\n"
OPENING = f"retry: {RETRY_MS}\n: watching\n\n".encode()


# --- the hub's state (pure, no sockets: unit tested) ---------------------------------------


@dataclass(slots=True)
class Entry:
    """One message of the history: an event (with its id) or a reset for everyone."""

    number: int  # position in the hub's whole history, 1, 2, ...
    key: bytes | None  # None: a reset, sent to every watcher
    sse: bytes
    ident: tuple[int, int] | None  # (shard, seq) of an event


class Watcher:
    """One subscriber: its prefix and its bounded queue (the transport part is elsewhere)."""

    def __init__(self, prefix: bytes, limit: int = WATCHER_QUEUE) -> None:
        self.prefix = prefix
        self.limit = limit
        self.queue: deque[bytes] = deque()
        self.overflowed = False
        self.wake: Callable[[], None] = _nothing

    def offer(self, key: bytes | None, sse: bytes) -> None:
        if self.overflowed or (key is not None and not key.startswith(self.prefix)):
            return
        if len(self.queue) >= self.limit:
            # Cut off: the queue is dropped (memory back now) and the stream ends with a reset.
            self.overflowed = True
            self.queue.clear()
            self.queue.append(format_reset("slow"))
        else:
            self.queue.append(sse)
        self.wake()


def _nothing() -> None:
    pass


class HubState:
    """The history ring and the watchers; the socket-owning hubs below drive it.

    Args:
        history: events kept for resume.
        max_watchers: watchers at once.
    """

    def __init__(self, history: int = EVENT_HISTORY, max_watchers: int = MAX_WATCHERS) -> None:
        self.ring: deque[Entry] = deque(maxlen=history)
        self.where: dict[tuple[int, int], int] = {}  # (shard, seq) -> Entry.number, in ring
        self.number = 0
        self.watchers: set[Watcher] = set()
        self.max_watchers = max_watchers
        self.tracker = SeqTracker()
        self.received = 0

    def add(self, event: Event) -> None:
        """A received event: checked against its shard's sequence, kept, sent to watchers."""
        self.received += 1
        found = self.tracker.check(event.shard, event.seq)
        if found is False:
            return  # a duplicate (two brokers) or a late event of an old stream
        if isinstance(found, Gap):
            reason = "stream" if found.new_stream else "gap"
            self._keep(None, format_reset(reason, event.shard), None)
        self._keep(event.key, format_event(event), (event.shard, event.seq))

    def _keep(self, key: bytes | None, sse: bytes, ident: tuple[int, int] | None) -> None:
        self.number += 1
        ring = self.ring
        if len(ring) == ring.maxlen:
            old = ring[0]
            if old.ident is not None and self.where.get(old.ident) == old.number:
                del self.where[old.ident]
        ring.append(Entry(self.number, key, sse, ident))
        if ident is not None:
            self.where[ident] = self.number
        for watcher in self.watchers:
            watcher.offer(key, sse)

    def join(self, watcher: Watcher, last_id: tuple[int, int] | None) -> bool:
        """Register ``watcher``, with the history after ``last_id`` queued first (or a reset
        if the ring does not hold it). Returns False when the hub is full."""
        if len(self.watchers) >= self.max_watchers:
            return False
        if last_id is not None:
            number = self.where.get(last_id)
            if number is None:
                watcher.offer(None, format_reset("history", last_id[0]))
            else:
                start = number - self.ring[0].number + 1
                for entry in itertools.islice(self.ring, start, None):
                    watcher.offer(entry.key, entry.sse)
        self.watchers.add(watcher)
        return True

    def leave(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)


# --- the SUB socket ------------------------------------------------------------------------


def open_sub(context: zmq.Context, endpoints: list[str], curve: ClientCurve | None) -> zmq.Socket:
    """The hub's SUB socket, subscribed to everything, bounded (RCVHWM, MAXMSGSIZE)."""
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, EVENTS_RCVHWM)
    socket.setsockopt(zmq.MAXMSGSIZE, EVENTS_MAX_MESSAGE_BYTES)
    if curve is not None:
        curve.apply(socket)
    for endpoint in endpoints:
        socket.connect(endpoint)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    return socket


def _receive(socket: zmq.Socket, state: HubState, most: int) -> int:
    """Read up to ``most`` messages into ``state``; returns how many were read."""
    count = 0
    while count < most:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        count += 1
        try:
            event = decode_event(frames)
        except ProtocolError as exc:
            limited.warning("bad event", "dropped a malformed event: %s", exc)
            continue
        state.add(event)
    return count


class LoopHub:
    """The event worker's hub: the SUB socket read on the process's asyncio loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: zmq.Context,
        endpoints: list[str],
        curve: ClientCurve | None,
        max_watchers: int = MAX_WATCHERS,
    ) -> None:
        self.loop = loop
        self.state = HubState(max_watchers=max_watchers)
        self.socket = open_sub(context, endpoints, curve)
        loop.add_reader(self.socket.FD, self._readable)
        self._timer = loop.call_later(0.1, self._tick)

    def _readable(self) -> None:
        # ZeroMQ's descriptor is edge-triggered: read until Again (or a bounded batch, then
        # come back at once, so one flood cannot hold the loop).
        if _receive(self.socket, self.state, RECV_PER_WAKE) == RECV_PER_WAKE:
            self.loop.call_soon(self._readable)
        elif self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self._readable)

    def _tick(self) -> None:
        # Reads what an edge did not announce (a look at EVENTS elsewhere can eat an edge).
        self._readable()
        self._timer = self.loop.call_later(0.1, self._tick)

    def close(self) -> None:
        self._timer.cancel()
        self.loop.remove_reader(self.socket.FD)
        self.socket.close(linger=0)

    async def stream(self, watcher: Watcher, out: StreamOut) -> None:
        """Write ``watcher``'s queue to ``out`` until the client leaves or is cut off."""
        waiter: asyncio.Future[None] | None = None

        def wake() -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        watcher.wake = wake
        out.wake = wake
        try:
            if not out.write(OPENING):
                return
            while True:
                queue = watcher.queue
                if queue and out.writable():
                    chunk = b"".join(queue)
                    queue.clear()
                    if not out.write(chunk) or watcher.overflowed:
                        return
                    continue
                waiter = self.loop.create_future()
                try:
                    await asyncio.wait_for(waiter, KEEPALIVE_S)
                except TimeoutError:
                    if out.writable() and not queue and not out.write(KEEPALIVE):
                        return
                waiter = None
        finally:
            self.state.leave(watcher)
            watcher.wake = _nothing


class ThreadHub:
    """The gthread worker's hub: a thread reads the SUB socket; watchers wait on a condition."""

    def __init__(
        self,
        context: zmq.Context,
        endpoints: list[str],
        curve: ClientCurve | None,
        max_watchers: int = MAX_WATCHERS,
    ) -> None:
        self.state = HubState(max_watchers=max_watchers)
        self.lock = threading.Condition()
        self.socket = open_sub(context, endpoints, curve)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zkv-watch-hub", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(THREAD_POLL_MS):
                    continue
                with self.lock:
                    if _receive(self.socket, self.state, RECV_PER_WAKE):
                        self.lock.notify_all()
        except zmq.ZMQError as exc:  # the context was terminated under it: the process ends
            log.info("watch hub stopped: %s", exc)
        finally:
            self.socket.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * THREAD_POLL_MS / 1000)

    def stream(self, watcher: Watcher) -> Iterator[bytes]:
        """The blocking body of one watcher's response (gunicorn sends each chunk)."""
        try:
            yield OPENING
            while True:
                with self.lock:
                    # Woken by every event (of any prefix): wait on until one of ours came.
                    deadline_s = time.monotonic() + KEEPALIVE_S
                    while not watcher.queue and (left_s := deadline_s - time.monotonic()) > 0:
                        self.lock.wait(left_s)
                    chunk = b"".join(watcher.queue)
                    watcher.queue.clear()
                    overflowed = watcher.overflowed
                yield chunk or KEEPALIVE
                if overflowed:
                    return
        finally:
            with self.lock:
                self.state.leave(watcher)


# --- the route's side ----------------------------------------------------------------------


class Watches:
    """The process's hub, made on the first watch (after the fork), and the route's logic.

    Args:
        endpoints: the broker's events endpoint(s) (XPUB), ``--events``.
        curve: the frontend's CURVE keys when the broker uses them.
        max_watchers: watchers per process.
        threads: gthread's threads per process (bounds watchers to half of them).
    """

    def __init__(
        self,
        endpoints: list[str],
        curve: ClientCurve | None = None,
        max_watchers: int = MAX_WATCHERS,
        threads: int | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.curve = curve
        self.max_watchers = max_watchers
        self.threads = threads
        self._context = context
        self._hub: LoopHub | ThreadHub | None = None
        self._lock = threading.Lock()

    def _context_of(self) -> zmq.Context:
        return self._context if self._context is not None else zmq.Context.instance()

    def loop_hub(self, loop: asyncio.AbstractEventLoop) -> LoopHub:
        hub = self._hub
        if not isinstance(hub, LoopHub) or hub.loop is not loop:
            hub = self._hub = LoopHub(
                loop, self._context_of(), self.endpoints, self.curve, self.max_watchers
            )
        return hub

    def thread_hub(self) -> ThreadHub:
        with self._lock:
            hub = self._hub
            if not isinstance(hub, ThreadHub):
                most = self.max_watchers
                if self.threads is not None:
                    most = max(1, min(most, self.threads // 2))
                hub = self._hub = ThreadHub(self._context_of(), self.endpoints, self.curve, most)
            return hub

    def open(self, environ: dict[str, Any], prefix: bytes, last_id: tuple[int, int] | None) -> Any:
        """Start one watch. Returns the body for Bottle (gthread: a blocking iterator; the
        event server: b"" with the stream left in environ[STREAM_KEY]), or None when full."""
        watcher = Watcher(prefix)
        if environ.get(STREAMS_KEY):
            loop = asyncio.get_running_loop()
            hub = self.loop_hub(loop)
            if not hub.state.join(watcher, last_id):
                return None

            def run(out: StreamOut) -> Awaitable[None]:
                return hub.stream(watcher, out)

            environ[STREAM_KEY] = run
            return b""
        thread_hub = self.thread_hub()
        with thread_hub.lock:
            if not thread_hub.state.join(watcher, last_id):
                return None
        return thread_hub.stream(watcher)

    def close(self) -> None:
        if self._hub is not None:
            self._hub.close()
            self._hub = None
