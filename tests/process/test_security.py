"""Issue 10 item 13: only holders of the cluster's keys join the backend (CURVE, zmq.auth)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from tests.cluster import Cluster
from zkv.keys import ensure_keys
from zkv.protocol import Disconnect, Heartbeat, Ready, encode_control

pytestmark = pytest.mark.process

ROGUE_WATCH_S = 1.5  # how long the rogue listens for anything from the broker (5 heartbeats)


def rogue(
    endpoint: str, identity: bytes, own: Path | None = None, keys: Path | None = None
) -> zmq.Socket:
    """A DEALER that claims to be a worker: plain, or with a CURVE key of its own made in
    ``own`` and the broker's public key from ``keys`` (public keys are not secrets)."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTING_ID, identity)
    if own is not None and keys is not None:
        public, secret = zmq.auth.load_certificate(zmq.auth.create_certificates(own, "rogue")[1])
        socket.curve_publickey, socket.curve_secretkey = public, secret
        socket.curve_serverkey = zmq.auth.load_certificate(keys / "broker.key")[0]
    socket.connect(endpoint)
    return socket


def test_a_process_without_the_keys_never_joins_and_cannot_evict_the_owner(tmp_path):
    with Cluster(tmp_path, shards=1) as cluster:
        cluster.start(workers=1, gateway=False)
        client = cluster.client()
        client.set("k", b"real", ttl_s=60)
        own = tmp_path / "rogue-keys"
        own.mkdir()
        sockets = [
            rogue(cluster.backend, b"w-plain"),
            rogue(cluster.backend, b"w-curve", own, tmp_path / "data" / "keys"),
        ]
        for socket in sockets:
            for message in (Ready(None, 0), Heartbeat(), Disconnect(), Ready(0, 0)):
                socket.send_multipart(encode_control(message))
        for socket in sockets:
            # No handshake completes: nothing ever comes back (before: ASSIGN, heartbeats).
            assert not socket.poll(int(ROGUE_WATCH_S * 1000)), socket.recv_multipart()
            socket.close(linger=0)
        info = client.ping()
        assert info["workers"] == 1 and info["standbys"] == 0  # before: the rogues as standbys
        assert client.get("k").value == b"real"  # the owner was not evicted
        client.close()
        assert "rogue" not in cluster.logs()


def test_keys_are_created_once_owner_only_and_agree_between_concurrent_callers(tmp_path):
    directory = tmp_path / "data" / "keys"
    first = ensure_keys(directory)
    second = ensure_keys(directory)  # idempotent: the same key set
    assert first.broker().public == second.broker().public
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert first.worker().secret is not None
    assert [p.name for p in first.authorized.iterdir()] == ["worker.key"]
