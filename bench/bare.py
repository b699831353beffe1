"""A bare pyzmq chain, the floor under zkv's latency: client -> ROUTER/ROUTER broker -> worker.

Same shape and hops as zkv (a DEALER client, a Python broker with a ROUTER on each side, a
Python worker on a DEALER), the same codec (``zkv.protocol``), and nothing else: no hash slots,
no per-key tokens, no fencing, no heartbeats, no durability, one worker holding a plain dict.
Whatever zkv's p50 costs above this chain's p50 is zkv's own logic; this chain's p50 itself is
two Python processes and three ZeroMQ hops.

The broker routes by prefixing the client's identity: ``[client, *request]`` goes to the worker,
``[client, *reply]`` comes back. The worker announces itself with a one-frame hello; until then
the broker does not read its frontend, so early requests wait in ZeroMQ's queues.

With ``--log PATH`` the worker also appends each SET to a file and fsyncs it before replying,
one write and one fsync per SET: the disk's own price of one durable write at a time, the floor
under zkv's SET with ``fsync always`` as the plain chain is the floor under its GET.

Run as ``python -m bench.bare broker --frontend EP --backend EP`` and ``python -m bench.bare
worker --backend EP [--log PATH]``; both exit after ``--max-seconds`` (default 900) whatever
happens, and at once on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence

import zmq

from zkv.protocol import (
    Kind,
    ProtocolError,
    Reply,
    Status,
    decode_request,
    encode_reply,
    error_reply,
    versioned_body,
)

HELLO = b"hello"
POLL_MS = 100
BATCH = 256  # messages read from one socket before polling again
MAX_SECONDS = 900.0  # neither process outlives this, even if nobody stops it


def run_broker(frontend_endpoint: str, backend_endpoint: str, max_seconds: float) -> None:
    """Forward requests to the one worker and its replies back, until ``max_seconds``."""
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.ROUTER)
    try:
        for socket in (frontend, backend):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 100_000)
            socket.setsockopt(zmq.RCVHWM, 100_000)
        frontend.bind(frontend_endpoint)
        backend.bind(backend_endpoint)
        worker: bytes | None = None
        poller = zmq.Poller()
        poller.register(backend, zmq.POLLIN)
        stop_at = time.monotonic() + max_seconds
        while time.monotonic() < stop_at:
            for socket, _ in poller.poll(POLL_MS):
                # Drain each readable socket (up to BATCH messages) before polling again, as
                # zkv's broker does: one poll per message would cost more than the forwarding.
                for _ in range(BATCH):
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if socket is frontend:
                        if worker is not None:  # always: the frontend is polled once it is known
                            backend.send_multipart([worker, *frames])
                    elif len(frames) == 2 and frames[1] == HELLO:
                        if worker is None:
                            poller.register(frontend, zmq.POLLIN)
                        worker = frames[0]
                    elif len(frames) >= 3:
                        frontend.send_multipart(frames[1:])  # [client, *reply]
    finally:
        frontend.close(linger=0)
        backend.close(linger=0)
        context.term()


_LOG_HEAD = struct.Struct("!IIQ")  # key length, value length, deadline_ms (0: never)

Durable = Callable[[bytes, bytes, int | None], None]
"""What makes one SET durable before its reply (the worker's ``--log``), or nothing."""


def log_writer(
    path: str,
    write: Callable[[int, bytes], int] = os.write,
    fsync: Callable[[int], None] = os.fsync,
) -> Durable:
    """Append each SET (lengths, deadline, key, value) to ``path`` and fsync it: a log with no
    checksum, replay or compaction, only the write and the fsync that zkv's ``always`` pays
    (``write`` and ``fsync``: tests pass recorders)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def durable(key: bytes, value: bytes, deadline_ms: int | None) -> None:
        write(fd, _LOG_HEAD.pack(len(key), len(value), deadline_ms or 0) + key + value)
        fsync(fd)

    return durable


def handle(
    store: dict[bytes, tuple[bytes, int | None]],
    frames: Sequence[bytes],
    durable: Durable | None = None,
) -> list[bytes]:
    """The worker's answer to one request's frames: a dict with deadlines, nothing more (and,
    with ``durable``, each SET on disk before its reply)."""
    try:
        request = decode_request(frames)
    except ProtocolError as exc:
        return error_reply(exc.request_id, f"bad request: {exc}")
    now_ms = int(time.time() * 1000)
    match request.kind:
        case Kind.GET:
            found = store.get(request.key)
            if found is None or (found[1] is not None and found[1] <= now_ms):
                return encode_reply(Reply(Status.NOT_FOUND, request.request_id))
            # zkv.Client.get asks for the version (issue 12): the bare worker has none, 0.
            body = versioned_body(0, found[0]) if request.versioned else found[0]
            return encode_reply(Reply(Status.OK, request.request_id, 0, found[1], body))
        case Kind.SET:
            deadline_ms = None if request.ttl_ms is None else now_ms + request.ttl_ms
            store[request.key] = (request.value or b"", deadline_ms)
            if durable is not None:
                durable(request.key, request.value or b"", deadline_ms)
            return encode_reply(Reply(Status.OK, request.request_id, 0, deadline_ms))
        case Kind.PING:
            body = json.dumps({"status": "ok", "bare": True}).encode()
            return encode_reply(Reply(Status.OK, request.request_id, body=body))
    return error_reply(request.request_id, f"bare worker does not do {request.kind.name}")


def run_worker(backend_endpoint: str, max_seconds: float, log_path: str | None = None) -> None:
    """Answer requests from the broker out of a dict, until ``max_seconds``; with
    ``log_path``, each SET is appended and fsynced there before its reply."""
    durable = None if log_path is None else log_writer(log_path)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    try:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(backend_endpoint)
        dealer.send(HELLO)
        store: dict[bytes, tuple[bytes, int | None]] = {}
        stop_at = time.monotonic() + max_seconds
        while time.monotonic() < stop_at:
            if not dealer.poll(POLL_MS):
                continue
            for _ in range(BATCH):
                try:
                    client, *frames = dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                dealer.send_multipart([client, *handle(store, frames, durable)])
    finally:
        dealer.close(linger=0)
        context.term()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.bare broker|worker``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("role", choices=("broker", "worker"))
    parser.add_argument("--frontend", help="broker: endpoint to bind for clients")
    parser.add_argument("--backend", required=True, help="endpoint of the worker side")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="exit after this")
    parser.add_argument("--log", help="worker: append and fsync each SET to this file")
    args = parser.parse_args(argv)
    try:
        if args.role == "broker":
            if not args.frontend:
                parser.error("the broker needs --frontend")
            run_broker(args.frontend, args.backend, args.max_seconds)
        else:
            run_worker(args.backend, args.max_seconds, args.log)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
