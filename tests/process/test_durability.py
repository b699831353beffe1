"""Durable shards with real processes: a killed worker loses no acknowledged write, and a
paused one (SIGSTOP) that wakes up after its shard moved applies and writes nothing.

A real broker and ``python -m workers --processes 1`` workers, each test with its own data
directory under tmp_path. Every wait has a deadline; the Cluster helper leaves no process.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster, wait_for
from zkv import Unavailable
from zkv.errors import Timeout

pytestmark = pytest.mark.process

WRITERS = 4  # client threads writing at once, so requests are in flight when the worker dies
WRITES_PER_WRITER = 60
TTL_S = 600.0
STOP_EXIT_S = 1.5  # a stopped worker fsyncs, sends DISCONNECT and exits within about 1 s


def durable_cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path, shards=1, ZKV_DATA_DIR=str(tmp_path / "data"), ZKV_FSYNC="always")


def log_of(cluster: Cluster, process_index: int) -> str:
    path = cluster.tmp_path / f"worker-{process_index}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def worker_log(cluster: Cluster, worker: object) -> str:
    """The log file of a process started by the cluster (its index in start order)."""
    return log_of(cluster, cluster._all.index(worker))  # type: ignore[arg-type]


def wait_standby(cluster: Cluster, standbys: int) -> None:
    client = cluster.client(timeout_s=1.0)
    wait_for(lambda: client.ping()["standbys"] == standbys, f"{standbys} standby worker(s)")


def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    with durable_cluster(tmp_path) as cluster:
        try:
            cluster.start_broker()
            first = cluster.start_worker()
            cluster.wait_ready(gateway=False)
            second = cluster.start_worker()
            wait_standby(cluster, 1)

            acknowledged: dict[str, str] = {}
            lock = threading.Lock()
            half_done = threading.Barrier(WRITERS + 1, timeout=30)

            def writer(number: int) -> None:
                client = cluster.client(timeout_s=10.0)
                for i in range(WRITES_PER_WRITER):
                    if i == WRITES_PER_WRITER // 2:
                        half_done.wait()
                    key, value = f"w{number}-k{i}", f"value {i} of writer {number}"
                    try:
                        client.set(key, value, ttl_s=TTL_S)
                    except (Unavailable, Timeout):
                        continue  # outcome unknown: not acknowledged, so not checked
                    with lock:
                        acknowledged[key] = value

            threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
            for thread in threads:
                thread.start()
            half_done.wait()
            cluster.kill(first)  # SIGKILL, with writes in flight
            for thread in threads:
                thread.join(60)
                assert not thread.is_alive()

            assert len(acknowledged) >= WRITERS * WRITES_PER_WRITER // 2
            reader = cluster.client(timeout_s=10.0)
            missing = {
                key: value
                for key, value in acknowledged.items()
                if reader.get(key).value != value.encode()
            }
            assert not missing, f"acknowledged writes lost: {sorted(missing)[:10]}"
            took = re.search(
                r"took shard 0 epoch \d+ \((\d+) keys replayed from (\S+)\)",
                worker_log(cluster, second),
            )
            assert took is not None, worker_log(cluster, second)
            assert int(took[1]) >= WRITERS * WRITES_PER_WRITER // 2
            assert took[2] == str(tmp_path / "data" / "shard-0" / "log")
        except BaseException:
            print(cluster.logs())
            raise


def test_a_paused_owner_applies_and_writes_nothing_after_its_shard_moved(
    tmp_path: Path,
) -> None:
    with durable_cluster(tmp_path) as cluster:
        try:
            cluster.start_broker()
            zombie = cluster.start_worker()
            cluster.wait_ready(gateway=False)
            client = cluster.client(timeout_s=10.0)
            client.set("k", "before the pause")
            successor = cluster.start_worker()
            wait_standby(cluster, 1)

            os.killpg(zombie.pid, signal.SIGSTOP)
            try:
                # Dispatched to the paused owner first; when the broker gives up on it, sent
                # again to the successor. The paused owner still has it queued.
                client.set("k", "after the move")
                wait_for(lambda: "took shard 0" in worker_log(cluster, successor), "the successor")
                shard_dir = tmp_path / "data" / "shard-0"
                files_before = {p.name: p.read_bytes() for p in shard_dir.iterdir()}
            finally:
                os.killpg(zombie.pid, signal.SIGCONT)

            wait_for(
                lambda: re.search(r"left shard 0 epoch \d+: ", worker_log(cluster, zombie)),
                "the former owner to give the shard up",
            )
            files_after = {p.name: p.read_bytes() for p in shard_dir.iterdir()}
            assert files_after == files_before  # not a byte written by the former owner
            assert client.get("k").value == b"after the move"

            # A clean stop: fsync, DISCONNECT, exit 0, promptly.
            stopped_at = time.monotonic()
            os.killpg(successor.pid, signal.SIGTERM)
            assert successor.wait(timeout=10) == 0
            assert time.monotonic() - stopped_at < STOP_EXIT_S
            assert re.search(r"left shard 0 epoch \d+: stopping", worker_log(cluster, successor))
        except BaseException:
            print(cluster.logs())
            raise
