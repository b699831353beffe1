"""Hostile input and dead processes: the cluster keeps serving, errors are fast and clear."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq

from tests.cluster import ROOT, Cluster, free_port, wait_for
from zkv import Unavailable
from zkv.hashing import key_shard
from zkv.keys import Keys
from zkv.protocol import Kind, Request, Status, decode_reply, encode_request

pytestmark = pytest.mark.process


def raw_socket(endpoint: str, keys: Keys | None = None) -> zmq.Socket:
    """A DEALER on ``endpoint``; with ``keys``, a CURVE client holding the workers' key (the
    backend lets nothing else in). Sends time out rather than block: a DEALER with no peer
    (a handshake refused) would wait forever."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDTIMEO, 5000)
    if keys is not None:
        pair = keys.worker()
        socket.curve_secretkey = pair.secret
        socket.curve_publickey = pair.public
        socket.curve_serverkey = keys.broker().public
    socket.connect(endpoint)
    return socket


def recv(socket: zmq.Socket, timeout_s: float = 5.0) -> list[bytes]:
    assert socket.poll(int(timeout_s * 1000)), "no reply within the deadline"
    return socket.recv_multipart()


GARBAGE = [
    [b""],
    [b"\x00"],
    [b"\x02\x01" + b"\x00" * 30],  # another protocol version
    [b"\x01\xee" + b"\x00" * 18],  # unknown command
    [struct.pack("!BBBxQQ", 1, Kind.GET, 0, 99, 0) + b"k" * 70_000],  # oversized key
    [struct.pack("!BBBxQQ", 1, Kind.SET, 1, 98, 0) + b"k", b"v"],  # zero TTL
    [struct.pack("!BBBxQQ", 1, Kind.GET, 0, 97, 0) + b"k", b"x", b"y"],  # too many frames
    [os.urandom(64), os.urandom(10)],
]


def test_malformed_frames_at_the_broker_get_errors_and_it_keeps_serving(cluster: Cluster):
    socket = raw_socket(cluster.frontend)
    # A "worker" sending garbage too: one that holds the cluster's keys, since the backend
    # lets nothing else in (tests/process/test_security.py tries those without).
    keys = Keys(Path(cluster.env["ZKV_DATA_DIR"]) / "keys")
    worker_side = raw_socket(cluster.backend, keys)
    try:
        for frames in GARBAGE:
            socket.send_multipart(frames)
            reply = decode_reply(recv(socket))
            assert reply.status == Status.ERROR
            assert reply.body.startswith(b"bad request")
        # Request ids are echoed when readable, so a client can match its errors.
        socket.send_multipart(GARBAGE[4])
        assert decode_reply(recv(socket)).request_id == 99
        for frames in GARBAGE:
            worker_side.send_multipart(frames)
        wait_for(
            lambda: "from worker" in cluster.logs() and "dropped" in cluster.logs(),
            "the broker to drop the garbage of an authenticated worker",
        )
        # Still serving, through the client and the gateway.
        client = cluster.client()
        key = f"after-garbage-{uuid.uuid4().hex[:6]}"
        client.set(key, b"fine", ttl_s=10)
        assert client.get(key).value == b"fine"
        assert cluster.http("GET", f"/get?key={key}").json()["value"] == "fine"
        assert all(client.ping()["owned"])
    finally:
        socket.close(linger=0)
        worker_side.close(linger=0)


def test_broker_down_gives_503_fast_and_the_same_gateway_recovers(fresh_cluster: Cluster):
    cluster = fresh_cluster.start()
    assert cluster.http("GET", "/set?key=survivor&value=kept&timeout=60").status == 200

    cluster.kill(cluster.broker)
    start = time.monotonic()
    response = wait_for(
        lambda: (r := cluster.http("GET", "/get?key=survivor")).status == 503 and r,
        "a 503 from the gateway",
        timeout_s=5,
    )
    assert time.monotonic() - start < 2.5
    assert "error" in response.json()
    for path in ("/v1/health", "/get?key=survivor", "/set?key=k&value=v&timeout=1"):
        started = time.monotonic()
        assert cluster.http("GET", path).status == 503
        # Fails within the client's connect timeout (1.5 s), not its request timeout (5 s).
        assert time.monotonic() - started < 2.5
    client = cluster.client()
    with pytest.raises(Unavailable):
        client.get("survivor")

    gateway_pid = cluster.gateway.pid
    cluster.start_broker()
    cluster.wait_ready()
    assert cluster.gateway.pid == gateway_pid and cluster.gateway.poll() is None
    # The workers kept their shards' data and claimed their shards back.
    assert cluster.http("GET", "/get?key=survivor").json()["value"] == "kept"
    assert cluster.http("GET", "/set?key=new&value=v&timeout=5").status == 200


def test_shard_without_worker_fails_with_its_name_then_recovers(fresh_cluster: Cluster):
    cluster = fresh_cluster
    cluster.env["ZKV_SHARD_WAIT"] = "0.5"
    cluster.start()
    client = cluster.client()
    keys = {key_shard(f"k{i}".encode(), 2): f"k{i}" for i in range(50)}  # one key per shard
    for key in keys.values():
        client.set(key, b"v", ttl_s=60)
    cluster.kill(cluster.workers[0], signal.SIGTERM)  # a clean exit says DISCONNECT
    ping = wait_for(lambda: (p := client.ping())["status"] == "degraded" and p, "shard freed")
    dead_shard = ping["owned"].index(False)
    live_shard = 1 - dead_shard
    assert client.get(keys[live_shard]).value == b"v"  # the other shard is untouched
    response = cluster.http("GET", f"/get?key={keys[dead_shard]}")
    assert response.status == 503
    assert f"shard {dead_shard}" in response.json()["error"]
    response = cluster.http("GET", "/all")
    assert response.status == 503 and f"shard {dead_shard}" in response.json()["error"]

    cluster.start_worker()
    cluster.wait_ready()
    client.set(keys[dead_shard], b"again", ttl_s=60)
    assert client.get(keys[dead_shard]).value == b"again"


def test_honcho_start_runs_the_procfile_and_ctrl_c_stops_everything(tmp_path):
    """The README's way to run it: honcho with the Procfile, then Ctrl-C."""
    port = free_port()
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "ZKV_FRONTEND": f"tcp://127.0.0.1:{free_port()}",
        "ZKV_BACKEND": f"tcp://127.0.0.1:{free_port()}",
        "ZKV_EVENTS": f"tcp://127.0.0.1:{free_port()}",
        "ZKV_EVENTS_BACKEND": f"tcp://127.0.0.1:{free_port()}",
        "ZKV_HTTP_PROCESSES": "1",
        "ZKV_HTTP_THREADS": "4",
        "ZKV_DATA_DIR": str(tmp_path / "data"),  # not ./data in the repository
    }
    honcho = [sys.executable, "-m", "honcho", "start", "-p", str(port)]
    log = open(tmp_path / "honcho.log", "wb")
    process = subprocess.Popen(
        honcho, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    cluster = Cluster(tmp_path)
    cluster.http_port = port
    try:
        wait_for(lambda: cluster.http("GET", "/v1/health").status == 200, "honcho's cluster")
        response = cluster.http("GET", "/set?key=1&value=hello&timeout=10")
        assert response.json()["message"] == "Value set successfully"
        assert cluster.http("GET", "/get?key=1").json()["value"] == "hello"
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        process.wait(timeout=8)
        wait_for(lambda: session_gone(process.pid), "every process of the session to exit", 5)
    finally:
        log.close()
        if not session_gone(process.pid):  # honcho or any of its children: none may outlive us
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        print((tmp_path / "honcho.log").read_text(errors="replace")[-3000:])


def session_gone(session_id: int) -> bool:
    """Whether no process is left in the process group ``session_id``."""
    try:
        os.killpg(session_id, 0)
    except ProcessLookupError:
        return True
    return False


def test_ping_and_requests_use_the_documented_frames(cluster: Cluster):
    socket = raw_socket(cluster.frontend)
    try:
        socket.send_multipart(encode_request(Request(Kind.PING, 4242)))
        reply = decode_reply(recv(socket))
        assert (reply.status, reply.request_id) == (Status.OK, 4242)
    finally:
        socket.close(linger=0)
