"""Load over ZeroMQ: the zkv client one request at a time, and raw DEALER pipelines.

The client loop measures what an application sees: :class:`zkv.client.Client` with its request
ids, retries and checks, one request at a time, so ops/s is just 1 / latency.

The pipeline is what the client cannot do today (it is strictly one request at a time): each
DEALER socket keeps ``depth`` requests in flight, as docs/protocol.md allows, and replies are
matched by request id. All frames come from ``zkv.protocol.encode_request`` and go back through
``decode_reply``; nothing here packs a frame. Every request gets a fresh request id, unique
across all sockets of the run: the broker merges requests with the same (id, kind, key) as
retries, and durable workers answer a repeated SET id from memory, so reusing ids would measure
less work than a real client causes.

The loop, single-threaded over all sockets:

1. Send ``depth`` requests on every socket.
2. Poll all sockets; drain each readable one without blocking. For each reply, look its id up in
   the table of requests in flight, record the latency, and (until the deadline) send the next
   request on the same socket, so each socket keeps ``depth`` in flight.
3. At the deadline stop sending and wait up to ``DRAIN_S`` for what is still in flight; any
   reply that never comes counts as an error ("lost").

Ops/s is OK replies divided by the time from the first send to the last reply. Latency is the
time from ``send_multipart`` to the reply's ``recv_multipart``, queueing in every hop included.
Bounded in time (deadline + drain) and in count (``max_ops``).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import zmq

from bench.stats import LoadResult, summarize
from zkv.client import Client, NotFound
from zkv.errors import ZkvError
from zkv.protocol import (
    Kind,
    ProtocolError,
    Reply,
    Request,
    Status,
    decode_reply,
    encode_request,
)


class Failed(RuntimeError):
    """A measurement could not be made: no reply in time, a failed request, a dead process."""


def queued_replies(dealer: zmq.Socket, timeout_s: float, what: str) -> Iterator[Reply]:
    """Wait up to ``timeout_s`` for a reply on ``dealer``, then every reply queued there.

    Raises:
        Failed: nothing came within ``timeout_s`` (``what`` names the wait in the message).
    """
    if not dealer.poll(timeout_s * 1000):
        raise Failed(f"no reply within {timeout_s} s ({what})")
    while True:
        try:
            frames = dealer.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        yield decode_reply(frames)


DRAIN_S = 5.0  # after the deadline, how long to wait for replies still in flight
CONNECT_TIMEOUT_S = 5.0  # how long each socket may take to answer its first PING
POLL_MS = 100
HWM = 100_000  # messages queued per socket before ZeroMQ pushes back
TTL_MS = 3_600_000  # written keys live an hour: long enough to outlast any run
MAX_OPS = 50_000_000  # a bound on any single run, whatever the duration


@dataclass(frozen=True, slots=True)
class Workload:
    """What to send.

    Attributes:
        op: ``get`` or ``set``.
        keys: the key space to draw from uniformly (a single key for the hot-key scenarios).
        value: the value written by SETs.
    """

    op: str
    keys: Sequence[bytes]
    value: bytes

    def request(self, request_id: int, rng: random.Random) -> Request:
        """The next request, with a key drawn uniformly from ``keys``."""
        key = self.keys[rng.randrange(len(self.keys))] if len(self.keys) > 1 else self.keys[0]
        if self.op == "get":
            return Request(Kind.GET, request_id, key)
        if self.op == "set":
            return Request(Kind.SET, request_id, key, self.value, TTL_MS)
        raise ValueError(f"unknown operation {self.op!r}")


def call_once(
    client: Client, op: str, key: bytes, value: bytes, ttl_s: float, errors: Counter[str]
) -> None:
    """One GET or SET through ``client``, waiting for its answer; a failure is counted in
    ``errors`` by kind (a GET's missing key as ``not found``), not raised."""
    try:
        if op == "get":
            client.get(key)
        else:
            client.set(key, value, ttl_s=ttl_s)
    except NotFound:
        errors["not found"] += 1
    except ZkvError as exc:
        errors[type(exc).__name__] += 1


def run_client(
    endpoint: str, workload: Workload, duration_s: float, max_ops: int = MAX_OPS
) -> LoadResult:
    """One :class:`zkv.client.Client`, one request at a time, for ``duration_s``."""
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    keys, value = workload.keys, workload.value
    with Client(endpoint, timeout_s=5.0) as client:
        client.ping()  # connect before the clock starts
        start = time.perf_counter_ns()
        deadline = start + int(duration_s * 1e9)
        now = start
        while now < deadline and len(latencies) < max_ops:
            key = keys[rng.randrange(len(keys))]
            call_once(client, workload.op, key, value, TTL_MS / 1000, errors)
            end = time.perf_counter_ns()
            latencies.append(end - now)
            now = end
    error_count = sum(errors.values())
    return summarize(
        "zkv.Client",
        latencies,
        ops=len(latencies) - error_count,
        errors=error_count,
        elapsed_s=(now - start) / 1e9,
        details={"error_kinds": dict(errors)} if errors else {},
    )


def run_pipeline(
    endpoint: str,
    workload: Workload,
    sockets: int,
    depth: int,
    duration_s: float,
    max_ops: int = MAX_OPS,
) -> LoadResult:
    """``sockets`` DEALER sockets with ``depth`` requests in flight each, for ``duration_s``."""
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    # Fresh ids from a random 63-bit base: unique in this run and unlikely to meet another's.
    next_id = rng.getrandbits(63) | 1
    context = zmq.Context()
    dealers: list[zmq.Socket] = []
    try:
        poller = zmq.Poller()
        for _ in range(sockets):
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.SNDHWM, HWM)
            dealer.setsockopt(zmq.RCVHWM, HWM)
            dealer.connect(endpoint)
            dealers.append(dealer)
            poller.register(dealer, zmq.POLLIN)
        next_id = _ping_all(dealers, next_id)

        in_flight: dict[int, int] = {}  # request id -> send time (perf_counter_ns)
        latencies: list[int] = []
        statuses: Counter[str] = Counter()
        sent = 0
        start = time.perf_counter_ns()
        deadline = start + int(duration_s * 1e9)
        for dealer in dealers:
            for _ in range(depth):
                in_flight[next_id] = time.perf_counter_ns()
                dealer.send_multipart(encode_request(workload.request(next_id, rng)))
                next_id += 1
                sent += 1
        last_reply = start
        drain_until = deadline + int(DRAIN_S * 1e9)
        while in_flight:
            now = time.perf_counter_ns()
            if now >= drain_until:
                break
            sending = now < deadline and sent < max_ops
            for dealer, _ in poller.poll(POLL_MS):
                while True:
                    try:
                        frames = dealer.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    received = time.perf_counter_ns()
                    try:
                        reply = decode_reply(frames)
                    except ProtocolError:
                        statuses["malformed"] += 1
                        continue
                    sent_at = in_flight.pop(reply.request_id, None)
                    if sent_at is None:
                        statuses["unexpected id"] += 1
                        continue
                    latencies.append(received - sent_at)
                    statuses[reply.status.name] += 1
                    last_reply = received
                    if sending:
                        in_flight[next_id] = time.perf_counter_ns()
                        dealer.send_multipart(encode_request(workload.request(next_id, rng)))
                        next_id += 1
                        sent += 1
        if in_flight:
            statuses["lost"] += len(in_flight)
    finally:
        for dealer in dealers:
            dealer.close(linger=0)
        context.term()
    ok = statuses.pop("OK", 0)
    return summarize(
        "dealer-pipeline",
        latencies,
        ops=ok,
        errors=sum(statuses.values()),
        elapsed_s=(last_reply - start) / 1e9,
        details={"in_flight": sockets * depth, "error_kinds": dict(statuses)}
        if statuses
        else {"in_flight": sockets * depth},
    )


def preload(endpoint: str, keys: Sequence[bytes], value: bytes, depth: int = 64) -> int:
    """SET every key once (pipelined on one socket, ``depth`` in flight). Returns the failures.

    Raises:
        TimeoutError: a reply did not come within ``DRAIN_S``.
    """
    rng = random.Random()
    next_id = rng.getrandbits(63) | 1
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    failures = 0
    try:
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        next_id = _ping_all([dealer], next_id)
        pending: set[int] = set()
        position = 0
        while position < len(keys) or pending:
            while position < len(keys) and len(pending) < depth:
                request = Request(Kind.SET, next_id, keys[position], value, TTL_MS)
                dealer.send_multipart(encode_request(request))
                pending.add(next_id)
                next_id += 1
                position += 1
            if not dealer.poll(int(DRAIN_S * 1000)):
                raise TimeoutError(f"no reply within {DRAIN_S} s while preloading {endpoint}")
            reply = decode_reply(dealer.recv_multipart())
            pending.discard(reply.request_id)
            failures += reply.status != Status.OK
    finally:
        dealer.close(linger=0)
        context.term()
    return failures


def _ping_all(dealers: list[zmq.Socket], next_id: int) -> int:
    """Wait until every socket has a PING answered, so connecting is not measured."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    for dealer in dealers:
        dealer.send_multipart(encode_request(Request(Kind.PING, next_id)))
        next_id += 1
    for dealer in dealers:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not dealer.poll(remaining_ms):
            raise TimeoutError(f"no answer to PING within {CONNECT_TIMEOUT_S} s")
        dealer.recv_multipart()
    return next_id
