"""The worker service: one DEALER socket to the broker's backend, one shard, one loop.

Lifecycle of a worker (the broker decides everything; the worker follows)::

    REGISTERING  READY sent (claiming the shard it holds, if any), no ASSIGN yet
    STANDBY      ASSIGN with no shard: holds nothing, answers dispatches with ERROR
    SERVING      ASSIGN of shard N: applies dispatches to shard N's store
    STOPPING     stop flag set: answers what is already queued, sends DISCONNECT, exits

From any state, silence from the broker for ``liveness * interval`` means the broker is gone or
restarted: the worker drops its socket (and whatever was queued in it), opens a new one and
sends READY again, claiming the shard whose data it still holds, so a restarted broker can give
each shard back to the worker that has its data.

Each pass of the loop: poll with a timeout that ends when the next timer is due, receive what
arrived, decode, dispatch with one ``match``, then always run the timers (expiry, heartbeat,
broker liveness), whatever arrived or not.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import zmq

from workers.shard import Shard
from workers.store import Clock, TTLStore, wall_clock_ms
from zkv import defaults
from zkv.protocol import (
    Assign,
    Disconnect,
    Dispatch,
    Heartbeat,
    ProtocolError,
    Ready,
    Reply,
    Status,
    decode_from_broker,
    encode_control,
    encode_reply,
    error_reply,
)

log = logging.getLogger(__name__)

# One expiry pass removes at most this many keys (and takes at most EXPIRE_BUDGET_S), so a
# request never waits behind a long sweep; a backlog drains over consecutive passes.
EXPIRE_MAX_KEYS_PER_PASS = 1000
# Messages received per pass before the timers run again, so a flood of requests cannot
# starve heartbeats or expiry.
MAX_MESSAGES_PER_PASS = 256
# The longest single poll: bounds how long a stop flag set by a signal handler or another
# thread waits to be seen (pyzmq resumes an interrupted poll after running the handler).
MAX_POLL_S = 0.1
# On stop, how long to keep answering requests already queued before saying goodbye.
DRAIN_MAX_S = 0.2


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker needs to know.

    Attributes:
        backend: the broker's backend endpoint to connect to.
        heartbeat_interval_s: how often to send HEARTBEAT.
        heartbeat_liveness: intervals of silence from the broker before re-registering.
        expire_cycle_s: how often to run an expiry pass when there is no backlog.
        expire_budget_s: the most time one expiry pass may take.
        expire_max_keys: the most keys one expiry pass may remove.
    """

    backend: str = defaults.BACKEND
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS
    expire_cycle_s: float = defaults.EXPIRE_CYCLE_S
    expire_budget_s: float = defaults.EXPIRE_BUDGET_S
    expire_max_keys: int = EXPIRE_MAX_KEYS_PER_PASS


class Worker:
    """A shard worker. Call :meth:`run` from the thread that will own the socket.

    Args:
        config: endpoints and timings.
        context: the ZeroMQ context; a private one (terminated by :meth:`run`) if None.
        clock: the wall clock for key deadlines (Unix ms); injected for tests.
    """

    def __init__(
        self,
        config: WorkerConfig,
        context: zmq.Context | None = None,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.config = config
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._clock = clock
        self._stop = threading.Event()
        self._socket: zmq.Socket | None = None
        self.shard: Shard | None = None
        self.shards = 0
        self.identity = f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        self._silence_limit_s = config.heartbeat_interval_s * config.heartbeat_liveness
        # Timers, in time.monotonic() seconds.
        self._last_heard_s = 0.0
        self._next_heartbeat_s = 0.0
        self._next_expire_s = 0.0

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the loop to finish; safe from a signal handler or another thread."""
        self._stop.set()

    def run(self) -> int:
        """Serve until :meth:`stop`, then send DISCONNECT so the broker frees the shard at once.

        Returns:
            0, the process exit code.

        Raises:
            zmq.ZMQError: the backend endpoint is invalid (raised by the first connect).
        """
        try:
            self._register()
            log.info("registered with the broker at %s, waiting for a shard", self.config.backend)
            while not self._stop.is_set():
                self._pass()
            answered = self._drain()
            self._send(encode_control(Disconnect()))
            log.info(
                "stopped: answered %d queued message(s), sent DISCONNECT%s",
                answered,
                "" if self.shard is None else f" for shard {self.shard.number}",
            )
            return 0
        finally:
            self._close()
            if self._own_context:
                self._context.term()

    # --- the loop ---------------------------------------------------------------------------

    def _pass(self) -> None:
        socket = self._connected()
        now_s = time.monotonic()
        next_due_s = min(
            self._next_heartbeat_s,
            self._next_expire_s,
            self._last_heard_s + self._silence_limit_s,
        )
        timeout_s = min(max(next_due_s - now_s, 0.0), MAX_POLL_S)
        if socket.poll(math.ceil(timeout_s * 1000), zmq.POLLIN):
            for _ in range(MAX_MESSAGES_PER_PASS):
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._last_heard_s = time.monotonic()
                self._on_message(frames)
        self._run_timers()

    def _on_message(self, frames: Sequence[bytes]) -> None:
        try:
            message = decode_from_broker(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            if exc.request_id:
                # A dispatch whose request id was readable: the client is waiting for it.
                self._send(error_reply(exc.request_id, f"malformed request: {exc}"))
            return
        match message:
            case Dispatch():
                self._send(encode_reply(self._handle(message)))
            case Assign(shard=shard, shards=shards):
                self._on_assign(shard, shards)
            case Heartbeat():
                pass  # liveness was noted when the message arrived, whatever it was

    def _handle(self, dispatch: Dispatch) -> Reply:
        request = dispatch.request
        if self.shard is None:
            return Reply(
                Status.UNAVAILABLE, request.request_id, dispatch.token, body=b"no shard assigned"
            )
        try:
            return self.shard.handle(dispatch)
        except Exception:
            # A bug, not bad input (the request was decoded): answer so the client does not
            # wait for a timeout, and keep the shard's data alive rather than crash.
            log.exception("internal error on %s request %d", request.kind.name, request.request_id)
            return Reply(
                Status.ERROR, request.request_id, dispatch.token, body=b"internal worker error"
            )

    def _on_assign(self, number: int | None, shards: int) -> None:
        self.shards = shards
        held = self.shard
        if number is None:
            if held is None:
                log.info("standby: the broker has no shard for this worker yet")
            else:
                # The shard went to another worker; serving our copy later could return
                # data that is no longer current, so it is dropped.
                log.info(
                    "standby: shard %d was given to another worker, dropping its %d key(s)",
                    held.number,
                    len(held.store),
                )
            self.shard = None
            return
        if held is not None and held.number == number:
            log.info(
                "assigned shard %d of %d, keeping its %d key(s)", number, shards, len(held.store)
            )
            return
        self.shard = Shard(number, TTLStore(self._clock))
        if held is None:
            log.info("assigned shard %d of %d", number, shards)
        else:
            log.info(
                "assigned shard %d of %d, dropping the %d key(s) of shard %d",
                number,
                shards,
                len(held.store),
                held.number,
            )

    # --- timers -----------------------------------------------------------------------------

    def _run_timers(self) -> None:
        now_s = time.monotonic()
        if now_s >= self._next_expire_s:
            backlog = self._expire_pass()
            # With a backlog the next pass is due at once: the next poll has timeout 0, so
            # queued requests are served between passes but the backlog drains promptly.
            self._next_expire_s = now_s if backlog else now_s + self.config.expire_cycle_s
        if now_s >= self._next_heartbeat_s:
            self._send(encode_control(Heartbeat()))
            self._next_heartbeat_s = now_s + self.config.heartbeat_interval_s
        silent_s = now_s - self._last_heard_s
        if silent_s >= self._silence_limit_s:
            held = self.shard
            log.warning(
                "no word from the broker at %s for %.2f s: reconnecting, claiming %s",
                self.config.backend,
                silent_s,
                "nothing"
                if held is None
                else f"shard {held.number} ({len(held.store)} keys, last token {held.last_token})",
            )
            self._register()

    def _expire_pass(self) -> bool:
        """One bounded expiry pass. Returns True if expired keys remain (a backlog)."""
        if self.shard is None:
            return False
        store = self.shard.store
        store.expire(self.config.expire_max_keys, self.config.expire_budget_s)
        next_deadline_ms = store.next_deadline_ms()
        return next_deadline_ms is not None and next_deadline_ms <= self._clock()

    # --- socket -----------------------------------------------------------------------------

    def _register(self) -> None:
        """Open a fresh socket and send READY claiming the shard held, if any.

        A fresh socket (the guide's Lazy Pirate) discards whatever was queued for a broker
        that is gone. It keeps this process's routing id: the broker's backend has
        ROUTER_HANDOVER set, so if the broker is in fact alive (the silence was ours, a long
        pause), the new connection takes over the old route and the worker gets its own shard
        back instead of competing with its former self for it.
        """
        self._close()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.identity)
        try:
            socket.connect(self.config.backend)
        except zmq.ZMQError:
            socket.close(linger=0)
            raise
        self._socket = socket
        now_s = time.monotonic()
        self._last_heard_s = now_s
        self._next_heartbeat_s = now_s + self.config.heartbeat_interval_s
        self._next_expire_s = min(self._next_expire_s, now_s + self.config.expire_cycle_s)
        held = self.shard
        ready = Ready() if held is None else Ready(held.number, held.last_token)
        self._send(encode_control(ready))

    def _send(self, frames: Sequence[bytes]) -> None:
        """Send without ever blocking the loop: if the queue to an absent broker is full,
        drop the message (the request times out at the broker, as it would anyway)."""
        socket = self._connected()
        try:
            socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the queue to the broker is full: dropped an outgoing message")

    def _drain(self) -> int:
        """Answer messages already queued, so their clients need not wait for a timeout."""
        socket = self._connected()
        deadline_s = time.monotonic() + DRAIN_MAX_S
        answered = 0
        while time.monotonic() < deadline_s:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_message(frames)
            answered += 1
        return answered

    def _connected(self) -> zmq.Socket:
        if self._socket is None:
            raise RuntimeError("the worker has no socket: run() was not called")
        return self._socket

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


def run(config: WorkerConfig) -> int:
    """Run one worker in this process until SIGTERM or SIGINT; returns the exit code.

    The first signal sets the stop flag: the worker answers what is queued, says DISCONNECT
    and exits 0. A second signal exits at once (status 128 + signal number), for a worker
    that does not stop quickly enough.
    """
    worker = Worker(config)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if worker.stopping:
            log.warning("%s again: exiting at once", name)
            raise SystemExit(128 + signum)
        log.info("%s: stopping", name)
        worker.stop()

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    try:
        return worker.run()
    except zmq.ZMQError as exc:
        log.error("worker failed: %s (backend %s)", exc, config.backend)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
