"""The broker's poll loop: sockets in, :class:`broker.core.Broker` events, sockets out.

Each pass reads like the protocol: run the timers if one is due (so heartbeats and expiries
never depend on traffic), poll with a timeout (the next timer), drain each readable socket,
hand every message to the core, then send what the core put in its outbox.

The loop is on the path of every request twice (request in, reply back), so it is written for
that: one zmq_poll on a fixed list, no zmq.Again to learn that a socket is drained when it held one
message (see :func:`_drain`), frames sent one by one with int flags, and the timers not walked
in a pass where none is due.
"""

from __future__ import annotations

import errno
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.backend import zmq_poll
from zmq.utils.monitor import recv_monitor_message

from broker.cluster import LeaderView
from broker.core import MAX_FRAMES, Broker, BrokerConfig, Side, peer_log
from broker.events import EventsProxy
from zkv import protocol
from zkv.keys import CLIENTS_DOMAIN, Keys
from zkv.logs import LogLimiter, peer
from zkv.zmqio import POLLIN, recv_bounded, send_counted, send_frames

log = logging.getLogger(__name__)

BATCH = 256  # messages read from one socket per pass before looking at the other one
# ... or this long, whichever comes first: a message may be a BATCH of thousands of requests,
# and the timers wait for the drain to end.
DRAIN_BUDGET_S = 0.005
DRAIN_S = 2.0  # on stop, how long to keep answering requests already here
MAX_POLL_MS = 100  # the longest single poll
HWM = 100_000  # messages queued per peer before ZeroMQ pushes back
MAX_FRAME_BYTES = protocol.MAX_BATCH_BYTES  # the largest legal frame from a client


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the broker listens, and its routing tunables."""

    frontend: str
    backend: str
    broker: BrokerConfig
    keys: Keys | None = None  # None: no CURVE on the backend (--insecure)
    frontend_curve: bool = False  # CURVE on the frontend too, clients' keys in <keys>/clients
    # The events proxy (broker/events.py): subscribers' XPUB and the workers' XSUB endpoints;
    # None: no events (--events none).
    events: str | None = None
    events_backend: str | None = None


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


def serve(
    config: ServerConfig,
    stopper: Stopper,
    context: zmq.Context | None = None,
    view: LeaderView | None = None,
) -> int:
    """Run the broker until ``stopper.stopping``. Returns the exit code.

    ``view`` (cluster mode) reads the shards' leaders from etcd; the loop routes by it."""
    context = context or zmq.Context.instance()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.ROUTER)
    authenticator: ThreadAuthenticator | None = None
    auth_failures: AuthFailures | None = None
    events: EventsProxy | None = None
    try:
        if config.keys is not None:
            # CURVE on the backend: only holders of an authorised worker key get through the
            # handshake (ZAP, in pyzmq's authenticator thread); nothing else reaches the core.
            authenticator = ThreadAuthenticator(context, log=logging.getLogger("broker.auth"))
            authenticator.start()
            authenticator.configure_curve(domain="*", location=str(config.keys.authorized))
            pair = config.keys.broker(secret=True)
            backend.curve_secretkey = pair.secret
            backend.curve_publickey = pair.public
            backend.curve_server = True
            auth_failures = AuthFailures(backend, config.backend, config.keys.directory)
            if config.frontend_curve:
                # Its own ZAP domain and authorised set: a client key is no worker key.
                authenticator.configure_curve(
                    domain=CLIENTS_DOMAIN, location=str(config.keys.clients)
                )
                frontend.zap_domain = CLIENTS_DOMAIN.encode()
                frontend.curve_secretkey = pair.secret
                frontend.curve_publickey = pair.public
                frontend.curve_server = True
        else:
            log.warning("backend without CURVE (--insecure): any process that reaches it can join")
        configure(frontend, backend)
        frontend.bind(config.frontend)
        backend.bind(config.backend)
        if config.events is not None and config.events_backend is not None:
            events = EventsProxy(
                context,
                config.events,
                config.events_backend,
                config.keys,
                config.frontend_curve and config.keys is not None,
            )
            events.start()
        log.info(
            "broker ready: frontend %s%s, backend %s, %d shards",
            config.frontend,
            " (CURVE)" if config.frontend_curve and config.keys is not None else "",
            config.backend,
            config.broker.shards,
        )
        core = Broker(config.broker, time.monotonic())
        return _loop(core, frontend, backend, stopper, auth_failures, view)
    finally:
        if events is not None:
            events.stop()
        if auth_failures is not None:
            auth_failures.close()
        frontend.close(linger=0)
        backend.close(linger=0)
        if authenticator is not None:
            authenticator.stop()


# Failed worker handshakes on the backend, read from a socket monitor on the broker's timer
# (never per message): pyzmq's authenticator logs denials at DEBUG only, and a worker holding
# another cluster's broker.key never reaches it (the broker cannot decrypt its HELLO).
AUTH_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
AUTH_EVENTS_PER_CHECK = 256  # read per timer pass; libzmq drops events past the monitor's HWM
AUTH_LOG_WINDOW_S = 10.0  # one WARNING line per window and kind, with a count of the rest
_AUTH_KINDS = {  # LogLimiter kinds, one per way a handshake fails
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused worker key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused worker protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "refused worker closed",
}


class AuthFailures:
    """A monitor of the backend's failed handshakes: one rate-limited WARNING on broker.auth."""

    def __init__(self, backend: zmq.Socket, endpoint: str, keys: Path) -> None:
        self.monitor = backend.get_monitor_socket(AUTH_EVENTS)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self._backend = backend
        self._endpoint = endpoint
        self._keys = keys
        auth_log = logging.getLogger("broker.auth")
        self._log = LogLimiter(auth_log, window_s=AUTH_LOG_WINDOW_S, burst=1)

    def check(self) -> None:
        """Read the failures waiting (never blocks) and log the last one, rate-limited."""
        for _ in range(AUTH_EVENTS_PER_CHECK):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = int(event["event"])
            self._log.warning(
                _AUTH_KINDS.get(kind, "refused worker"),
                "refused a worker's handshake on %s (%s): it does not hold this cluster's "
                "keys (%s) or runs --insecure; the worker's log says what to do",
                self._endpoint,
                _auth_detail(kind, int(event["value"])),
                self._keys,
            )

    def close(self) -> None:
        try:
            self._backend.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)


def _auth_detail(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"its CURVE key is not in authorized/, ZAP status {value}"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"protocol error {value:#x}: another broker key, or no CURVE"
    return f"closed during the handshake, errno {value}"


def configure(frontend: zmq.Socket, backend: zmq.Socket) -> None:
    """The broker's socket options: queue bounds, the largest frame, routing behaviour."""
    for socket in (frontend, backend):
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, HWM)
        socket.setsockopt(zmq.RCVHWM, HWM)
    # A client frame larger than the largest legal one (a BATCH's records, MAX_BATCH_BYTES;
    # a value is at most MAX_VALUE_BYTES, a header MAX_KEY_BYTES + 20) gets its connection cut
    # as soon as its length is read, before it is buffered. ZeroMQ bounds frames only, and
    # hands over a multipart message once all of it arrived, so what one client message can
    # make libzmq buffer is its frame count times this; _drain drops the frames past the
    # second without copying them, and answers ERROR. The backend has no such bound: a
    # worker's replies may legitimately be larger (an ALL), and workers are authenticated
    # (CURVE) unless the broker runs --insecure.
    frontend.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    # Sending to a worker that is gone raises instead of vanishing, so we notice at once;
    # a worker reconnecting under its stable identity takes over its old routing entry (only
    # an authenticated worker can connect at all, and its routing id is random).
    backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
    backend.setsockopt(zmq.ROUTER_HANDOVER, 1)


def _loop(
    core: Broker,
    frontend: zmq.Socket,
    backend: zmq.Socket,
    stopper: Stopper,
    auth_failures: AuthFailures | None = None,
    view: LeaderView | None = None,
) -> int:
    # zmq_poll on a fixed list, not a zmq.Poller and a dict each pass; the backend first, so
    # replies (which free keys' tokens) are handled before new requests of the same pass.
    items = [(backend, POLLIN), (frontend, POLLIN)]
    handlers = {backend: core.on_worker, frontend: core.on_client}
    sides = {backend: Side.BACKEND, frontend: Side.FRONTEND}

    def flush() -> None:
        _flush(core, frontend, backend)

    drain_deadline: float | None = None
    now = time.monotonic()
    while drain_deadline is None or (now < drain_deadline and not core.idle()):
        if stopper.stopping and drain_deadline is None:
            # Stop taking requests, but answer the ones already here: their workers are up.
            core.begin_shutdown()
            drain_deadline = now + DRAIN_S
            log.info("stopping: answering requests in flight for up to %.1f s", DRAIN_S)
        # Timers run whenever one is due, whatever arrived or not (heartbeats and expiries
        # never depend on traffic); a pass with nothing due does not walk them.
        wait_s = core.next_timer(now)
        if wait_s <= 0.0:
            core.on_timer(now)
            _flush(core, frontend, backend)
            wait_s = core.next_timer(now)
            if auth_failures is not None:
                auth_failures.check()
        if view is not None and view.version != view.taken:
            reading = view.take()
            if reading is not None:
                core.coordinator_ok = reading[1]
                core.set_leaders(reading[0], now)
                _flush(core, frontend, backend)
        if core.held:
            _resend_held(core, frontend, backend)
        # Bounded so a stop signal (its handler runs between polls) is seen promptly.
        timeout_ms = min(int(wait_s * 1000) + 1, MAX_POLL_MS if drain_deadline is None else 20)
        try:
            ready = zmq_poll(items, timeout_ms)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:
                now = time.monotonic()
                continue
            raise
        now = time.monotonic()
        for socket, _ in ready:
            _drain(socket, handlers[socket], now, flush, core, sides[socket])
        now = time.monotonic()
    log.info("broker stopped")
    return 0


def _drain(
    socket: zmq.Socket,
    handle: Callable[[list[bytes], float], None],
    now: float,
    flush: Callable[[], None],
    core: Broker,
    side: Side,
) -> None:
    """Receive and handle up to BATCH messages (the poll said one is there), or for up to
    DRAIN_BUDGET_S, sending what each one produced before looking for the next.

    After the first message, a zmq_poll with timeout 0 (1 us) asks whether another is there,
    rather than a receive that raises zmq.Again (5 us of pyzmq exception machinery): one
    request at a time, every drain would otherwise end with an Again, twice per request. Once a
    second message came the socket is busy, and receiving until Again is the cheaper way.
    Sending first keeps even that poll off the request's path: the core's output for a message
    is complete when its handler returns (each event dispatches its own flights), so nothing
    is gained by holding it until the drain ends.
    """
    until = now + DRAIN_BUDGET_S
    polled = [(socket, POLLIN)]
    for count in range(BATCH):
        if count == 1 and not zmq_poll(polled, 0):
            return
        try:
            frames, extra = recv_bounded(socket, MAX_FRAMES + 1)  # + the identity
        except zmq.Again:
            return
        if extra:
            core.on_oversized(side, frames, extra)
        else:
            handle(frames, now)
        flush()
        if time.monotonic() >= until:
            return


def _flush(core: Broker, frontend: zmq.Socket, backend: zmq.Socket) -> None:
    """Send the outbox; a send that fails may add to it (a dead worker's requests fail).

    A worker whose queue is full (EAGAIN: ROUTER_MANDATORY reports a peer at its high-water
    mark so, and ZeroMQ refuses a message whole at its first frame) is slow, not gone: the
    message is held by the core, with everything after it for that worker, and resent by
    :func:`_resend_held`. Only EHOSTUNREACH (no such peer connected) removes the worker.
    A reply to a client is counted in its ledger (zkv.zmqio.send_counted) until sent.
    """
    held = core.held
    sending = core.sending
    while core.outbox:
        outbox, core.outbox = core.outbox, []
        for side, frames in outbox:
            if side is Side.FRONTEND:
                # Counted by client until libzmq is done with it (see Broker.sending).
                ledger = sending.get(frames[0]) or core.ledger(frames[0])
                try:
                    core.queued_bytes += send_counted(frontend, frames, ledger)
                except zmq.Again:
                    peer_log.warning(
                        "client not reading",
                        "client %s is not reading; reply dropped",
                        peer(frames[0]),
                    )
                continue
            if held and frames[0] in held:
                core.on_backpressure(frames)  # behind what is held already: order matters
                continue
            try:
                send_frames(backend, frames)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EAGAIN:
                    core.on_backpressure(frames)
                elif exc.errno == errno.EHOSTUNREACH:
                    core.on_unroutable(frames[0], time.monotonic())
                else:
                    raise


def _resend_held(core: Broker, frontend: zmq.Socket, backend: zmq.Socket) -> None:
    """Send what is held for workers whose queue was full, oldest first, until one is full
    again; a dispatch whose flight expired meanwhile is dropped, not sent late."""
    for worker, queue in list(core.held.items()):
        while queue:
            frames = queue[0]
            if core.expired_dispatch(frames):
                queue.popleft()
                continue
            try:
                send_frames(backend, frames)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EAGAIN:
                    break
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                core.on_unroutable(worker, time.monotonic())  # drops what is held for it
                break
            queue.popleft()
        else:
            if core.held.get(worker) is queue:
                del core.held[worker]
                log.info("worker %s caught up: its held messages are sent", peer(worker))
    _flush(core, frontend, backend)
