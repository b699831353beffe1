"""Recovery paths of a shard's log with real processes: a torn tail, corruption in the middle,
and a compaction killed at each of its steps.

Each test has its own data directory and its own broker (``shards=1``) on free loopback ports.
Workers are ``python -m workers --processes 1`` and are killed with SIGKILL, as a crash would;
the damage is then made to the files on disk, and a new worker process takes the shard from
them. Every wait polls with a deadline; the Cluster helper leaves no process behind, and the
crashing child of the compaction tests is reaped by ``subprocess.run`` (killed on its timeout).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.cluster import ROOT, Cluster
from workers import aof
from workers.aof import LogReader, MemosRecord, SetRecord, TimeRecord, VersionRecord
from workers.persist import RewriteStep
from workers.worker import EXIT_CORRUPT_LOG
from zkv.client import Client, NotFound
from zkv.protocol import Kind, Reply, Request, Status, decode_reply, encode_request

pytestmark = pytest.mark.process

KEYS = 20  # acknowledged writes before the damage
TTL_S = 600.0  # every other key has a deadline, which must survive exactly
CORRUPT_INDEX = 12  # the write whose record is damaged in the middle of the log
TORN_KEY = b"torn"
TAKE_TIMEOUT_S = 10.0  # a new worker takes the shard within about a second
EXIT_TIMEOUT_S = 10.0  # a worker refusing a corrupt log exits within about a second
POLL_S = 0.02
CHILD_TIMEOUT_S = 30.0  # the crashing child needs well under a second
REPLY_TIMEOUT_S = 10.0

# --- helpers ----------------------------------------------------------------------------------


def durable_cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path, shards=1, ZKV_DATA_DIR=str(tmp_path / "data"), ZKV_FSYNC="always")


def shard_log(tmp_path: Path) -> Path:
    return tmp_path / "data" / "shard-0" / "log"


def output_of(cluster: Cluster, process: subprocess.Popen[bytes]) -> str:
    """What a worker started by the cluster has logged (its file is named by start order)."""
    path = cluster.tmp_path / f"worker-{cluster._all.index(process)}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_took_shard(cluster: Cluster, worker: subprocess.Popen[bytes]) -> re.Match[str]:
    """Wait for ``worker`` to take shard 0; the match holds the epoch, keys and log path.

    Fails at once if the worker exits first, rather than at the deadline."""
    deadline = time.monotonic() + TAKE_TIMEOUT_S
    while True:
        took = re.search(
            r"took shard 0 epoch (\d+) \((\d+) keys replayed from (\S+)\)",
            output_of(cluster, worker),
        )
        if took is not None:
            return took
        assert worker.poll() is None, f"the worker exited with {worker.returncode} first"
        assert time.monotonic() < deadline, f"no takeover of shard 0 within {TAKE_TIMEOUT_S} s"
        time.sleep(POLL_S)


def write_then_kill(cluster: Cluster) -> dict[bytes, tuple[bytes, int | None]]:
    """Start a broker and a worker, write KEYS acknowledged keys in order (one record each),
    then SIGKILL the worker. Returns key -> (value, deadline_ms) as the replies said."""
    cluster.start_broker()
    worker = cluster.start_worker()
    cluster.wait_ready(gateway=False)
    client = cluster.client(timeout_s=REPLY_TIMEOUT_S)
    acknowledged: dict[bytes, tuple[bytes, int | None]] = {}
    for i in range(KEYS):
        key, value = b"key-%02d" % i, b"value %d" % i
        acknowledged[key] = (value, client.set(key, value, ttl_s=TTL_S if i % 2 else None))
    cluster.kill(worker)
    return acknowledged


def assert_serves(client: Client, expected: dict[bytes, tuple[bytes, int | None]]) -> None:
    """Each key reads back with exactly its value and deadline, and nothing else is stored."""
    for key, (value, deadline_ms) in expected.items():
        item = client.get(key)
        assert (item.value, item.deadline_ms) == (value, deadline_ms), key
    stored = {entry.key: (entry.value, entry.deadline_ms) for entry in client.all()}
    assert stored == expected


def resend(endpoint: str, requests: list[Request]) -> dict[int, Reply]:
    """Send requests with the ids they already have (as a client's retry does) on a raw DEALER
    socket, all at once; returns the replies by request id."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        for request in requests:
            socket.send_multipart(encode_request(request))
        replies: dict[int, Reply] = {}
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while len(replies) < len(requests):
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            assert remaining_ms > 0 and socket.poll(remaining_ms), (
                f"{len(requests) - len(replies)} of {len(requests)} resent requests unanswered"
            )
            reply = decode_reply(socket.recv_multipart())
            replies[reply.request_id] = reply
        return replies
    finally:
        socket.close(linger=0)


# --- torn tail and corruption -----------------------------------------------------------------

_TORN_RECORD = aof.encode_set(7, TORN_KEY, b"x" * 100, None)  # 8 + 125 bytes
TORN_TAILS = [
    pytest.param(
        _TORN_RECORD[:40],
        "incomplete record: 125 body bytes declared, 32 present",
        id="cut-short",
    ),
    pytest.param(_TORN_RECORD[:-1] + b"y", "checksum mismatch", id="bad-crc"),
]


@pytest.mark.parametrize(("tail", "reason"), TORN_TAILS)
def test_a_torn_last_record_is_cut_off_and_every_acknowledged_write_served(
    tmp_path: Path, tail: bytes, reason: str
) -> None:
    with durable_cluster(tmp_path) as cluster:
        try:
            acknowledged = write_then_kill(cluster)
            log = shard_log(tmp_path)
            sound = log.read_bytes()
            with open(log, "ab") as file:  # the crash left part of one more write
                file.write(tail)

            successor = cluster.start_worker()
            took = wait_took_shard(cluster, successor)
            assert int(took[2]) == KEYS and took[3] == str(log)
            warning = (
                f"log {log}: the last record, at byte {len(sound)}, is torn ({reason}): "
                f"truncated {len(tail)} byte(s) left by a write cut short"
            )
            assert warning in output_of(cluster, successor)
            assert_serves(cluster.client(timeout_s=REPLY_TIMEOUT_S), acknowledged)
            with pytest.raises(NotFound):
                cluster.client().get(TORN_KEY)
            assert log.read_bytes() == sound  # the torn bytes are gone, nothing else changed
        except BaseException:
            print(cluster.logs())
            raise


def test_corruption_in_the_middle_refuses_the_shard_until_repaired(tmp_path: Path) -> None:
    with durable_cluster(tmp_path) as cluster:
        try:
            acknowledged = write_then_kill(cluster)
            log = shard_log(tmp_path)
            with LogReader(log) as reader:
                every = list(reader.records())
            records = [(o, r) for o, r in every if not isinstance(r, TimeRecord)]
            keys = [record.key for _, record in records]  # type: ignore[union-attr]
            assert keys == list(acknowledged)  # one SET record per write, in order
            damaged_at = records[CORRUPT_INDEX][0]
            # The record after it, TIME records included: the damage is in its value.
            record_end = next(o for o, _ in every if o > damaged_at)
            corrupted = bytearray(log.read_bytes())
            corrupted[record_end - 1] ^= 0xFF  # the last byte of its value
            log.write_bytes(corrupted)

            refused = cluster.start_worker()
            assert refused.wait(timeout=EXIT_TIMEOUT_S) == EXIT_CORRUPT_LOG
            output = output_of(cluster, refused)
            assert (
                f"cannot take shard 0: log {log} is damaged at byte {damaged_at} "
                "(checksum mismatch) with valid records after it" in output
            ), output
            assert f"run `python -m workers.repair {log}`" in output
            assert log.read_bytes() == corrupted  # refused: not a byte cut

            repair = subprocess.run(
                [sys.executable, "-m", "workers.repair", str(log)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=EXIT_TIMEOUT_S,
            )
            assert repair.returncode == 0, repair.stdout + repair.stderr
            assert f"corruption with valid records after it at byte {damaged_at}" in repair.stdout
            assert f"truncated to {damaged_at} bytes" in repair.stdout
            assert f"SET {keys[CORRUPT_INDEX + 1]!r}" in repair.stdout  # what was dropped
            (backup,) = log.parent.glob("log.corrupt-*")
            assert backup.read_bytes() == corrupted
            assert log.read_bytes() == corrupted[:damaged_at]

            successor = cluster.start_worker()
            took = wait_took_shard(cluster, successor)
            assert int(took[2]) == CORRUPT_INDEX
            kept = dict(list(acknowledged.items())[:CORRUPT_INDEX])
            assert_serves(cluster.client(timeout_s=REPLY_TIMEOUT_S), kept)  # the rest: dropped
        except BaseException:
            print(cluster.logs())
            raise


# --- compaction killed at each step -----------------------------------------------------------


def run_crashing_child(cluster: Cluster, data_dir: Path, step: RewriteStep) -> list[dict[str, Any]]:
    """Run tests/crashpoint.py until it kills itself at ``step``; its acknowledged requests."""
    child = subprocess.run(
        [sys.executable, "-u", "-m", "tests.crashpoint", str(data_dir), step.name],
        cwd=ROOT,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    lines = [json.loads(line) for line in child.stdout.splitlines()]
    assert lines[-1] == {"reached": step.name}
    return lines[:-1]


def last_state(history: list[dict[str, Any]], now_ms: int) -> dict[bytes, tuple[bytes, int | None]]:
    """Each key's last acknowledged value and deadline, without the keys deleted or expired."""
    state: dict[bytes, tuple[bytes, int | None]] = {}
    for op in history:
        key = op["key"].encode()
        if op["kind"] == "SET":
            state[key] = (op["value"].encode(), op["deadline_ms"])
        else:
            del state[key]
    return {k: v for k, v in state.items() if v[1] is None or v[1] > now_ms}


@pytest.mark.parametrize("step", list(RewriteStep), ids=lambda step: step.name)
def test_a_worker_takes_over_from_a_compaction_killed_at_each_step(
    tmp_path: Path, step: RewriteStep
) -> None:
    data_dir = tmp_path / "data"
    shard_dir = data_dir / "shard-0"
    with durable_cluster(tmp_path) as cluster:
        try:
            cluster.start_broker()  # starts up while the child runs
            history = run_crashing_child(cluster, data_dir, step)

            # Where it died, as the files show it.
            assert (shard_dir / "log.rewrite").exists() == (step.value < RewriteStep.RENAMED.value)
            with LogReader(shard_dir / "log") as reader:
                first = next(
                    r for _, r in reader.records() if not isinstance(r, TimeRecord | VersionRecord)
                )
            assert isinstance(
                first, MemosRecord if step.value >= RewriteStep.RENAMED.value else SetRecord
            )

            worker = cluster.start_worker()
            took = wait_took_shard(cluster, worker)
            expected = last_state(history, int(time.time() * 1000))
            assert b"expired" not in expected
            assert int(took[2]) == len(expected)
            assert not (shard_dir / "log.rewrite").exists()  # the scratch file was removed

            client = cluster.client(timeout_s=REPLY_TIMEOUT_S)
            assert_serves(client, expected)
            for key in {op["key"].encode() for op in history} - expected.keys():
                with pytest.raises(NotFound):
                    client.get(key)

            # Every acknowledged write again, same request id, newest first: re-applied, the
            # SETs would get new deadlines and roll each key back to its first value, and the
            # DELs (of keys now absent) would answer NOT_FOUND. Answered from the idempotency
            # memory, each gets its original reply and nothing changes.
            requests = [
                Request(
                    Kind[op["kind"]],
                    op["id"],
                    op["key"].encode(),
                    None if op["value"] is None else op["value"].encode(),
                    op["ttl_ms"],
                )
                for op in reversed(history)
            ]
            replies = resend(cluster.frontend, requests)
            for op in history:
                reply = replies[op["id"]]
                assert (reply.status, reply.deadline_ms) == (Status.OK, op["deadline_ms"]), op
            assert_serves(client, expected)
        except BaseException:
            print(cluster.logs())
            raise
