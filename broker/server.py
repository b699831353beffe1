"""The broker's poll loop: sockets in, :class:`broker.core.Broker` events, sockets out.

Each pass reads like the protocol: poll with a timeout (the next timer), drain each readable
socket in a batch, hand every message to the core, then always run the timers (so heartbeats
and expiries never depend on traffic), then send what the core put in its outbox.
"""

from __future__ import annotations

import errno
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import zmq

from broker.core import Broker, BrokerConfig, Side
from zkv import protocol

log = logging.getLogger(__name__)

BATCH = 256  # messages read from one socket per pass before looking at the other one
# ... or this long, whichever comes first: a message may be a BATCH of thousands of requests,
# and what a pass produced is sent only at its end (dispatches start work at the workers).
DRAIN_BUDGET_S = 0.005
DRAIN_S = 2.0  # on stop, how long to keep answering requests already here
MAX_POLL_MS = 100  # the longest single poll
HWM = 100_000  # messages queued per peer before ZeroMQ pushes back


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the broker listens, and its routing tunables."""

    frontend: str
    backend: str
    broker: BrokerConfig


class Stopper:
    """SIGTERM/SIGINT set a stop flag; a second signal stops at once."""

    def __init__(self) -> None:
        self.stopping = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            raise SystemExit(1)
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True


def serve(config: ServerConfig, stopper: Stopper, context: zmq.Context | None = None) -> int:
    """Run the broker until ``stopper.stopping``. Returns the exit code."""
    context = context or zmq.Context.instance()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.ROUTER)
    try:
        for socket in (frontend, backend):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, HWM)
            socket.setsockopt(zmq.RCVHWM, HWM)
        # A peer sending more than the largest legal message is cut off, not buffered.
        frontend.setsockopt(
            zmq.MAXMSGSIZE, protocol.MAX_VALUE_BYTES + protocol.MAX_KEY_BYTES + 1024
        )
        # Sending to a worker that is gone raises instead of vanishing, so we notice at once;
        # a worker reconnecting under its stable identity takes over its old routing entry.
        backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        frontend.bind(config.frontend)
        backend.bind(config.backend)
        log.info(
            "broker ready: frontend %s, backend %s, %d shards",
            config.frontend,
            config.backend,
            config.broker.shards,
        )
        return _loop(Broker(config.broker, time.monotonic()), frontend, backend, stopper)
    finally:
        frontend.close(linger=0)
        backend.close(linger=0)


def _loop(core: Broker, frontend: zmq.Socket, backend: zmq.Socket, stopper: Stopper) -> int:
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    drain_deadline: float | None = None
    while drain_deadline is None or (time.monotonic() < drain_deadline and not core.idle()):
        if stopper.stopping and drain_deadline is None:
            # Stop taking requests, but answer the ones already here: their workers are up.
            core.begin_shutdown()
            drain_deadline = time.monotonic() + DRAIN_S
            log.info("stopping: answering requests in flight for up to %.1f s", DRAIN_S)
        timeout_ms = max(1, int(core.next_timer(time.monotonic()) * 1000) + 1)
        # Bounded so a stop signal (its handler runs between polls) is seen promptly.
        timeout_ms = min(timeout_ms, MAX_POLL_MS if drain_deadline is None else 20)
        try:
            ready = dict(poller.poll(timeout_ms))
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        now = time.monotonic()
        if backend in ready:
            _drain(backend, core.on_worker, now)
        if frontend in ready:
            _drain(frontend, core.on_client, now)
        core.on_timer(time.monotonic())
        _flush(core, frontend, backend)
    log.info("broker stopped")
    return 0


def _drain(socket: zmq.Socket, handle: Callable[[list[bytes], float], None], now: float) -> None:
    until = time.monotonic() + DRAIN_BUDGET_S
    for _ in range(BATCH):
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(frames, now)
        if time.monotonic() >= until:
            return


def _flush(core: Broker, frontend: zmq.Socket, backend: zmq.Socket) -> None:
    """Send the outbox; a send that fails may add to it (a dead worker's requests fail)."""
    while core.outbox:
        outbox, core.outbox = core.outbox, []
        for side, frames in outbox:
            if side is Side.FRONTEND:
                try:
                    frontend.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("client %s is not reading; reply dropped", frames[0].hex())
                continue
            try:
                backend.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                    raise
                core.on_unroutable(frames[0], time.monotonic())
