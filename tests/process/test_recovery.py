"""Recovery with real processes: standby takeover with the data, a broker restart under load,
and a graceful stop of the whole cluster."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster, wait_for
from zkv import Client, ZkvError

pytestmark = pytest.mark.process


def test_a_standby_takes_over_a_killed_worker_with_its_data(tmp_path: Path):
    with Cluster(tmp_path) as cluster:
        cluster.start(workers=3, gateway=False)
        client = cluster.client()
        wait_for(lambda: client.ping()["standbys"] == 1, "the third worker as a standby")
        written = {f"takeover-{i}": f"value-{i}" for i in range(40)}
        for key, value in written.items():
            client.set(key, value, ttl_s=600)
        cluster.kill(cluster.workers[0])  # SIGKILL: only the heartbeats can tell
        wait_for(lambda: client.ping()["standbys"] == 0, "the standby to take over")
        assert all(client.ping()["owned"])
        for key, value in written.items():
            assert client.get(key).value == value.encode(), key


def test_a_broker_restart_under_load_shows_as_latency_not_errors(tmp_path: Path):
    with Cluster(tmp_path) as cluster:
        cluster.start(gateway=False)
        acknowledged: dict[str, str] = {}
        errors: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()

        def writer(number: int) -> None:
            # A client configured to ride through a broker restart of a second or two.
            client = Client(cluster.frontend, timeout_s=15.0, connect_timeout_s=10.0)
            try:
                i = 0
                while not stop.is_set():
                    key, value = f"restart-{number}-{i % 50}", f"{number}:{i}"
                    try:
                        client.set(key, value, ttl_s=600)
                    except ZkvError as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    with lock:
                        acknowledged[key] = value
                    i += 1
            finally:
                client.close()

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) >= 40, "writes before the restart")
        cluster.kill(cluster.broker)
        time.sleep(0.3)  # the process manager's restart delay, part of the scenario
        cluster.start_broker()
        before = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= before + 40, "writes after the restart")
        stop.set()
        for thread in threads:
            thread.join(30)
        assert errors == []
        client = cluster.client()
        for key, value in acknowledged.items():
            assert client.get(key).value == value.encode(), key


def test_sigterm_stops_the_whole_cluster_cleanly_within_seconds(tmp_path: Path):
    with Cluster(tmp_path) as cluster:
        cluster.start()
        results: list[str] = []
        stop = threading.Event()

        def load() -> None:
            client = Client(cluster.frontend, timeout_s=5.0)
            i = 0
            while not stop.is_set():
                try:
                    client.set(f"stop-{i}", "v", ttl_s=60)
                    results.append("ok")
                except ZkvError as exc:
                    results.append(type(exc).__name__)
                i += 1
            client.close()

        thread = threading.Thread(target=load)
        thread.start()
        wait_for(lambda: len(results) > 50, "requests flowing")
        started = time.monotonic()
        processes = [cluster.gateway, cluster.broker, *cluster.workers]
        for process in processes:  # as honcho does on Ctrl-C
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=10) for process in processes]
        elapsed = time.monotonic() - started
        stop.set()
        thread.join(15)
        assert not thread.is_alive()  # no request hung
        assert codes == [0] * len(processes), cluster.logs()
        assert elapsed < 5.0
        logs = cluster.logs()
        assert "stopped: answered" in logs  # workers flushed and said goodbye
        assert "broker stopped" in logs
