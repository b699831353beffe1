"""Telling a person why the broker does not answer: the worker's view of its ZeroMQ handshake.

A worker started with keys that are not the cluster's (another ``ZKV_DATA_DIR``, so another
``<data-dir>/keys``) used to fail silently: ZeroMQ retries a failed CURVE handshake by itself,
the worker saw only silence ("no word from the broker ... reconnecting") and the broker logged
nothing. ZeroMQ does report each handshake on a socket monitor, so the worker watches it
(:class:`HandshakeWatch`) and :func:`explain` turns a failure into one line naming the keys and
what to do. What each failure means, measured with libzmq 4.3 (both sides see an event)::

    worker's keys                    worker sees                broker sees
    another cluster's (broker.key)   FAILED_NO_DETAIL, ~7 a s   FAILED_PROTOCOL (cryptographic)
    right broker.key, unknown key    FAILED_AUTH 400, once      FAILED_AUTH 400 (ZAP)
    --insecure on one side only      FAILED_PROTOCOL            FAILED_PROTOCOL (mechanism)

The watch costs nothing on the hot path once the handshake succeeded: the worker polls the
monitor together with its socket only until then, and on its heartbeat timer afterwards (a
reconnection of the same socket handshakes again). Events are drained at most
``MAX_EVENTS_PER_CHECK`` at a time; libzmq drops events past the monitor's high-water mark
(1,000), so a monitor nobody reads holds a bounded amount.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

# The handshake events the worker asks its monitor for (nothing per message or per byte).
EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
MAX_EVENTS_PER_CHECK = 64  # monitor events read per check; the rest wait for the next one
PROTOCOL_ERROR_MECHANISM_MISMATCH = 0x11000002  # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
PROTOCOL_ERROR_CRYPTOGRAPHIC = 0x11000001  # ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC

WHAT_TO_DO = (
    "start it with the cluster's keys (--keys/ZKV_KEYS, default <data-dir>/keys: give every "
    "process of the cluster the same ZKV_DATA_DIR or ZKV_KEYS; on another host copy the "
    "broker's keys directory with cp -rp, or write one set for all with python -m zkv keygen)"
)


def explain(event: int, value: int, backend: str, keys_dir: Path | None) -> str | None:
    """The line to log for one handshake event, or None for a success.

    Args:
        event: the monitor event (one of :data:`EVENTS`).
        value: its value: the ZAP status code, the protocol error, or an errno.
        backend: the broker's endpoint, for the message.
        keys_dir: the worker's keys directory; None if it runs without CURVE (--insecure).
    """
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return None
    if keys_dir is None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (
                f"the broker at {backend} refused this worker's handshake: the broker requires "
                f"CURVE and this worker runs --insecure; drop --insecure (ZKV_INSECURE) and "
                f"{WHAT_TO_DO}"
            )
        return f"the handshake with the broker at {backend} failed ({_detail(event, value)})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == PROTOCOL_ERROR_MECHANISM_MISMATCH:
        return (
            f"the broker at {backend} refused this worker's handshake: it runs without CURVE "
            f"(--insecure) and this worker with keys {keys_dir}; start both with or both "
            f"without --insecure (ZKV_INSECURE)"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        whose = "this worker's CURVE key"
    else:
        # The broker closes a handshake it cannot decrypt: our broker.key is not its key.
        whose = "this worker's CURVE handshake (its broker.key is not the broker's key)"
    return (
        f"the broker at {backend} refused {whose}: the keys in {keys_dir} are not the "
        f"cluster's ({_detail(event, value)}); {WHAT_TO_DO}"
    )


def _detail(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"ZAP status {value}"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"protocol error {value:#x}"
    return f"connection closed during the handshake, errno {value}"


@dataclass(slots=True)
class Check:
    """What one look at the monitor found."""

    succeeded: bool = False  # a handshake succeeded (the last event, if several)
    failure: str | None = None  # the explanation of the last failure, if the last was one


class HandshakeWatch:
    """The monitor of one worker socket (closed with it: make a new one per socket).

    Args:
        socket: the worker's DEALER, before it connects.
        backend: the broker's endpoint, for messages.
        keys_dir: the worker's keys directory, None without CURVE.
    """

    def __init__(self, socket: zmq.Socket, backend: str, keys_dir: Path | None) -> None:
        self.monitor: zmq.Socket = socket.get_monitor_socket(EVENTS)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self._socket = socket
        self._backend = backend
        self._keys_dir = keys_dir

    def check(self) -> Check:
        """Read the events waiting (never blocks): the latest success or failure wins."""
        found = Check()
        for _ in range(MAX_EVENTS_PER_CHECK):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = int(event["event"])
            explanation = explain(kind, int(event["value"]), self._backend, self._keys_dir)
            found.succeeded = explanation is None
            found.failure = explanation
        return found

    def close(self) -> None:
        """Stop monitoring; call before closing the socket."""
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
