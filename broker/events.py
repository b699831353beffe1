"""The broker's events proxy: workers' change events in, subscribers out (issue 12).

Each shard's worker publishes one message per change (``key | header``, zkv.protocol's EVENT,
docs/protocol.md) on a PUB socket that it *connects* to the broker's events backend, an XSUB
socket the broker binds (``--events-backend``). Subscribers connect a SUB socket to the
broker's events endpoint (``--events``), an XPUB socket, and subscribe to key prefixes: the key
is the first frame, so ZeroMQ's own prefix matching filters by key. Subscriptions travel back
through the XSUB to every worker's PUB, which then sends only what some subscriber wants.

The forwarding is libzmq's own ``zmq_proxy_steerable`` on a thread of its own: it copies
messages in C without the GIL, so neither the broker's loop nor its throughput pays for
events, whatever their rate (only the thread's share of a core). Stopping sends TERMINATE on
an inproc control socket.

Bounds (docs/operations.md, "Change events"):

* EVENTS_HWM (100,000 messages) on the XPUB, per subscriber: a subscriber that does not read
  fast enough loses messages past it (ZeroMQ drops for that subscriber alone; the sequence
  numbers in each event show the gap), so a slow subscriber never slows writers nor grows the
  broker's memory past about EVENTS_HWM x the size of an event (a 32-byte header and the key).
* EVENTS_BACKEND_HWM (100,000 messages) on the XSUB, per worker connection: past it the
  proxy thread is behind and ZeroMQ pushes back on the worker's PUB, which drops (a PUB never
  blocks), so the worker's loop never waits for events either.
* MAXMSGSIZE on both: a frame from a worker is at most an event's key (MAX_KEY_BYTES), a
  frame from a subscriber (a subscription: one byte and a prefix) at most 1 + MAX_KEY_BYTES; a
  larger frame cuts that connection before it is buffered.
* Not bounded by ZeroMQ: how many distinct prefixes one subscriber subscribes to (each kept
  in a trie here and in every worker's PUB). The events endpoint is therefore exposed like
  the frontend: loopback by default, and on another address only with CURVE (authorised
  client keys, --frontend-curve) or --insecure.

Security: the backend is a CURVE server with the broker's keys and the workers' ZAP domain,
exactly like the worker backend, so only holders of an authorised worker key can publish
events; the events endpoint uses the frontend's CURVE (the clients' domain) when the frontend
does.
"""

from __future__ import annotations

import logging
import threading

import zmq

from zkv.keys import CLIENTS_DOMAIN, Keys
from zkv.protocol import MAX_KEY_BYTES

log = logging.getLogger(__name__)

EVENTS_HWM = 100_000  # messages queued per subscriber on the XPUB; more are dropped for it
EVENTS_BACKEND_HWM = 100_000  # messages queued per worker publisher on the XSUB
# The largest frame either side may send (see the module docstring): an event's key frame, or
# a subscription (a 0x01/0x00 byte and a key prefix). Its 32-byte header is smaller.
EVENTS_MAX_FRAME_BYTES = 1 + MAX_KEY_BYTES
EVENTS_OFF = "none"  # --events none: no events proxy
CLOSE_WAIT_S = 2.0  # how long stop() waits for the proxy thread to end


class EventsProxy:
    """The XSUB (backend, workers connect) to XPUB (subscribers connect) proxy on a thread.

    The sockets are bound in the constructor (so a bad or busy endpoint fails the broker's
    start, as the frontend's does), then used by the proxy thread only.

    Args:
        context: the broker's ZeroMQ context (its ZAP authenticator serves CURVE here too).
        events: the endpoint subscribers connect to (XPUB).
        backend: the endpoint workers' PUB sockets connect to (XSUB).
        keys: the cluster's keys: the backend is then a CURVE server for worker keys (the
            authenticator must already serve domain "*" with ``keys.authorized``, as
            broker.server configures it). None: plain (--insecure).
        subscribers_curve: the events endpoint is a CURVE server for the clients' keys (the
            authenticator serves CLIENTS_DOMAIN), as the frontend with --frontend-curve.
    """

    def __init__(
        self,
        context: zmq.Context,
        events: str,
        backend: str,
        keys: Keys | None = None,
        subscribers_curve: bool = False,
    ) -> None:
        self.events = events
        self.backend = backend
        self._xpub = context.socket(zmq.XPUB)
        self._xsub = context.socket(zmq.XSUB)
        self._control = context.socket(zmq.PAIR)
        self._steer = context.socket(zmq.PAIR)
        self._thread: threading.Thread | None = None
        try:
            for socket in (self._xpub, self._xsub, self._control, self._steer):
                socket.setsockopt(zmq.LINGER, 0)
            self._xpub.setsockopt(zmq.SNDHWM, EVENTS_HWM)
            self._xpub.setsockopt(zmq.MAXMSGSIZE, EVENTS_MAX_FRAME_BYTES)
            self._xsub.setsockopt(zmq.RCVHWM, EVENTS_BACKEND_HWM)
            self._xsub.setsockopt(zmq.MAXMSGSIZE, EVENTS_MAX_FRAME_BYTES)
            if keys is not None:
                pair = keys.broker(secret=True)
                self._xsub.curve_secretkey = pair.secret
                self._xsub.curve_publickey = pair.public
                self._xsub.curve_server = True
                if subscribers_curve:
                    self._xpub.zap_domain = CLIENTS_DOMAIN.encode()
                    self._xpub.curve_secretkey = pair.secret
                    self._xpub.curve_publickey = pair.public
                    self._xpub.curve_server = True
            self._xpub.bind(events)
            self._xsub.bind(backend)
            # What was bound (a port given as * is chosen now): for the log and the tests.
            self.events = self._xpub.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.backend = self._xsub.getsockopt(zmq.LAST_ENDPOINT).decode()
            control = f"inproc://zkv-events-{id(self):x}"
            self._control.bind(control)
            self._steer.connect(control)
        except BaseException:
            self._close()
            raise

    def start(self) -> None:
        """Start forwarding on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="zkv-events", daemon=True)
        self._thread.start()
        log.info("events: subscribers on %s, workers publish to %s", self.events, self.backend)

    def _run(self) -> None:
        try:
            zmq.proxy_steerable(self._xpub, self._xsub, None, self._control)
        except zmq.ZMQError as exc:  # the context was terminated under it: nothing to do
            if exc.errno not in (zmq.ETERM, zmq.ENOTSOCK):
                log.error("events proxy stopped: %s", exc)

    def stop(self) -> None:
        """Stop the proxy thread and close the sockets."""
        if self._thread is not None:
            try:
                self._steer.send(b"TERMINATE")
            except zmq.ZMQError:
                pass
            self._thread.join(CLOSE_WAIT_S)
            if self._thread.is_alive():  # never seen; the sockets are then left to the GC
                log.warning("events proxy thread did not stop within %.1f s", CLOSE_WAIT_S)
                return
        self._close()

    def _close(self) -> None:
        for socket in (self._xpub, self._xsub, self._control, self._steer):
            socket.close(linger=0)
