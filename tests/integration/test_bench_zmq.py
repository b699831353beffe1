"""bench.zmq_load's reply helper and bench.interleaved's turns on real (in-process) ZeroMQ
sockets."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zmq

from bench import bare, interleaved, zmq_load
from zkv.client import Client
from zkv.protocol import Kind, Reply, Request, Status, decode_reply, encode_reply, encode_request

pytestmark = pytest.mark.integration


def test_queued_replies_waits_for_one_then_takes_every_queued_reply() -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    try:
        router.bind("inproc://queued-replies")
        dealer.connect("inproc://queued-replies")
        with pytest.raises(zmq_load.Failed, match=r"no reply within 0.01 s \(GET\)"):
            list(zmq_load.queued_replies(dealer, 0.01, "GET"))
        dealer.send(b"hello")
        identity, _ = router.recv_multipart()
        for request_id in (7, 8):
            router.send_multipart([identity, *encode_reply(Reply(Status.OK, request_id))])
        got = list(zmq_load.queued_replies(dealer, 5.0, "GET"))
        assert [reply.request_id for reply in got] == [7, 8]
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()


def test_interleaved_turns_cover_every_chain_and_operation(tmp_path: Path) -> None:
    """bench.interleaved on three real (bare) chains, in threads: every (chain, operation) gets
    its turns, the same number of blocks each or one fewer, whatever the chains are named."""
    names = ("zkv-tcp", "zkv-tcp-fsync-no", "bare-ipc")
    threads = []
    endpoints = {}
    for name in names:
        frontend, backend = f"ipc://{tmp_path}/{name}-f.ipc", f"ipc://{tmp_path}/{name}-b.ipc"
        threads.append(threading.Thread(target=bare.run_broker, args=(frontend, backend, 2.0)))
        threads.append(threading.Thread(target=bare.run_worker, args=(backend, 2.0)))
        endpoints[name] = frontend
    for thread in threads:
        thread.start()
    try:
        keys = [b"k1", b"k2"]
        for frontend in endpoints.values():
            with Client(frontend, timeout_s=2.0) as client:
                for key in keys:
                    client.set(key, b"v")
        found = interleaved.run_interleaved(endpoints, keys, b"v" * 16, 0.3)
    finally:
        for thread in threads:
            thread.join()
    assert set(found) == {(name, op) for name in names for op in interleaved.OPS}
    counts = [result.count for result in found.values()]
    assert all(count % interleaved.BLOCK == 0 for count in counts)
    assert max(counts) - min(counts) <= interleaved.BLOCK
    assert all(result.errors == 0 for result in found.values())


def test_the_bare_worker_with_a_log_puts_each_set_on_disk_before_its_reply(
    tmp_path: Path,
) -> None:
    """bare.py --log: a SET is written and fsynced, in that order, before handle() returns;
    a GET writes nothing. What the fsync'd chain of the interleaved target measures."""
    events: list[str] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        events.append("write")
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    durable = bare.log_writer(str(tmp_path / "sets.log"), write, fsync)
    store: dict[bytes, tuple[bytes, int | None]] = {}
    set_frames = encode_request(Request(Kind.SET, 5, b"key", b"value", ttl_ms=1000))
    reply = decode_reply(bare.handle(store, set_frames, durable))
    assert reply.status == Status.OK and events == ["write", "fsync"]
    data = (tmp_path / "sets.log").read_bytes()
    assert data.endswith(b"keyvalue") and len(data) == 16 + len(b"keyvalue")
    bare.handle(store, encode_request(Request(Kind.GET, 6, b"key")), durable)
    assert events == ["write", "fsync"]  # reads are not logged
