"""Reply bytes queued in libzmq are bounded (issue 10, items 6 and 7).

ZeroMQ's high-water marks count messages, not bytes: a worker that builds its next replies
while libzmq still encrypts and sends the last ones, or a broker holding replies for a client
that does not read, grew without bound. Both now count what they queued (zkv.zmqio.SendLedger):
the worker's GETs are BUSY while MAX_REPLY_BYTES of replies are still queued, and the broker
answers a client that does not read BUSY once its replies reach the per-client limit.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.cluster import Cluster
from zkv.protocol import MAX_REPLY_BYTES, Kind, Request, Status, decode_reply, encode_request

VALUE_BYTES = 1024 * 1024
# Distinct keys: GETs of one key wait for its token and go as one batch per round trip, which
# bounds the worker already. 6 sockets x 160 keys: 960 lone GETs of a 1 MiB value at once.
KEYS = [b"big:%03d" % i for i in range(160)]
SOCKETS = 6
DEADLINE_S = 60.0
# Values read for one pass (MAX_REPLY_BYTES), replies still queued (MAX_REPLY_BYTES), the one
# message CURVE is encrypting: about 3 x MAX_REPLY_BYTES at worst (measured: 34 MiB).
WORKER_GROWTH_MAX_BYTES = 3 * MAX_REPLY_BYTES


def status_kb(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status, in bytes (VmHWM: peak resident memory, VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def owners(cluster: Cluster) -> list[int]:
    """The indexes of the workers that took shard 0 at some point, by their logs."""
    found = []
    for worker in cluster.workers:
        log = cluster.tmp_path / f"worker-{cluster._all.index(worker)}.log"
        if "took shard 0" in log.read_text(errors="replace"):
            found.append(cluster.workers.index(worker))
    return found


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """One shard, an owner and a standby, default heartbeats (CURVE on the backend)."""
    with Cluster(tmp_path, shards=1, ZKV_FSYNC="no", ZKV_HEARTBEAT_INTERVAL="1.0") as cluster:
        cluster.start(workers=2, gateway=False)
        yield cluster


def raw_socket(context: zmq.Context, endpoint: str, rcvhwm: int = 1000) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, rcvhwm)
    socket.connect(endpoint)
    return socket


def test_a_flood_of_big_gets_leaves_the_worker_bounded(cluster: Cluster) -> None:
    kv = cluster.client(timeout_s=20.0)
    for start in range(0, len(KEYS), 16):
        kv.set_many({key: b"x" * VALUE_BYTES for key in KEYS[start : start + 16]})
    [owner] = owners(cluster)
    pid = cluster.workers[owner].pid
    before = status_kb(pid, "VmHWM")
    context = zmq.Context()
    sockets = [raw_socket(context, cluster.frontend) for _ in range(SOCKETS)]
    try:
        pending: dict[int, bytes] = {}
        for socket in sockets:
            for key in KEYS:
                request_id = random.getrandbits(63) + 1
                socket.send_multipart(encode_request(Request(Kind.GET, request_id, key)))
                pending[request_id] = key
        # Read everything; a BUSY is sent again (a client's backoff, shortened).
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + DEADLINE_S
        poller = zmq.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        while pending and time.monotonic() < deadline:
            for socket, _ in poller.poll(100):
                reply = decode_reply(socket.recv_multipart())
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
                if reply.status == Status.BUSY:
                    request = Request(Kind.GET, reply.request_id, pending[reply.request_id])
                    socket.send_multipart(encode_request(request))
                    continue
                assert reply.status == Status.OK, reply
                assert len(reply.body or b"") == VALUE_BYTES
                pending.pop(reply.request_id, None)
        assert not pending, f"{len(pending)} GETs unanswered; statuses {statuses}"
    finally:
        for socket in sockets:
            socket.close(linger=0)
        context.term()
    grown = status_kb(pid, "VmHWM") - before
    assert grown < WORKER_GROWTH_MAX_BYTES, f"the worker's peak grew by {grown} bytes"
    assert owners(cluster) == [owner], cluster.logs()  # no failover


CLIENT_LIMIT_BYTES = 32 * 1024 * 1024
# The client's limit of queued replies, and worker replies being received, decrypted and cut
# (measured: 9 to 141 MiB; 123 MiB before replies were counted, but 157 values queued).
BROKER_GROWTH_MAX_BYTES = CLIENT_LIMIT_BYTES + 3 * MAX_REPLY_BYTES
VALUES_MAX_BYTES = CLIENT_LIMIT_BYTES + MAX_REPLY_BYTES
ROUNDS = 10  # GETs of every key, never read: 1,600 replies of 1 MiB


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Cluster]:
    """One shard, one worker, a per-client limit of 32 MiB."""
    env = {"ZKV_FSYNC": "no", "ZKV_MAX_CLIENT_BYTES": str(CLIENT_LIMIT_BYTES)}
    with Cluster(tmp_path, shards=1, **env) as cluster:
        cluster.start(workers=1, gateway=False)
        yield cluster


def test_a_client_that_does_not_read_leaves_the_broker_bounded(limited: Cluster) -> None:
    kv = limited.client(timeout_s=20.0)
    for start in range(0, len(KEYS), 16):
        kv.set_many({key: b"x" * VALUE_BYTES for key in KEYS[start : start + 16]})
    assert limited.broker is not None
    pid = limited.broker.pid
    before = status_kb(pid, "VmHWM")
    context = zmq.Context()
    # RCVHWM 1: libzmq in this process takes little off the connection, so what is not read
    # waits in the kernel's buffers and in the broker.
    socket = raw_socket(context, limited.frontend, rcvhwm=1)
    socket.setsockopt(zmq.RCVBUF, 65536)
    try:
        ids = []
        for _ in range(ROUNDS):
            for key in KEYS:
                request_id = random.getrandbits(63) + 1
                socket.send_multipart(encode_request(Request(Kind.GET, request_id, key)))
                ids.append(request_id)
        # Not read: wait until the broker answered everything (it holds no request), by ping.
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if kv.ping().get("keys_in_flight") == 0 == kv.ping().get("keys_in_flight"):
                break
        grown = status_kb(pid, "VmHWM") - before
        # Now read: every GET was answered, the excess BUSY (not read, retry).
        statuses: dict[int, int] = {}
        for _ in ids:
            if not socket.poll(int(DEADLINE_S * 1000)):
                break
            reply = decode_reply(socket.recv_multipart())
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
    finally:
        socket.close(linger=0)
        context.term()
    assert statuses.get(Status.BUSY, 0) > 0, statuses
    assert sum(statuses.values()) == len(ids), statuses
    assert grown < BROKER_GROWTH_MAX_BYTES, f"the broker's peak grew by {grown} bytes"
    # Values queued to it: its limit, and what was on its way when it was reached (157 before).
    assert statuses.get(Status.OK, 0) * VALUE_BYTES <= VALUES_MAX_BYTES, statuses
