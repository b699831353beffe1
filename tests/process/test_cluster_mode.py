"""Cluster mode on one machine's loopback (docs/cluster.md): etcd, two brokers, workers on
three "hosts" (host ids, each its own data directory). The test hosts made of network
namespaces (tests/process/test_hosts.py) cut links; these tests kill processes.

Leases of 1 s (etcd in tests/etcd.py grants that), heartbeats of 0.2 s.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, free_port, wait_for
from tests.etcd import EtcdServer, etcd_server  # noqa: F401  (a fixture)
from zkv import Client, ZkvError
from zkv.coordination import Coordinator
from zkv.hashing import key_shard
from zkv.keys import create_keys

pytestmark = pytest.mark.process

LEASE_TTL_S = 1
FAILOVER_BOUND_S = LEASE_TTL_S + 2.0  # the bound: the lease time plus 2 s


class Hosts:
    """A cluster-mode cluster: etcd (shared by the module), brokers and workers by host."""

    def __init__(self, cluster: Cluster, etcd: EtcdServer, name: str) -> None:
        self.cluster = cluster
        self.etcd = etcd
        self.name = name
        self.frontends = [cluster.frontend]
        self.brokers = []
        self.workers: dict[str, object] = {}

    def start_broker(self, frontend: str, backend: str):  # type: ignore[no-untyped-def]
        broker = self.cluster.spawn(
            "broker", "broker", "--frontend", frontend, "--backend", backend, *own_events()
        )
        self.brokers.append(broker)
        return broker

    def start_worker(self, host: str):  # type: ignore[no-untyped-def]
        data = self.cluster.tmp_path / f"data-{host}"
        worker = self.cluster.start_worker("--host-id", host, "--data-dir", str(data))
        self.workers[host] = worker
        return worker

    def client(self, frontend: str | None = None, timeout_s: float = 10.0) -> Client:
        client = Client(frontend or self.cluster.frontend, timeout_s=timeout_s)
        self.cluster._clients.append(client)
        return client

    def leader_host(self, shard: int) -> str:
        """The host of ``shard``'s leader, by etcd (a worker id is ``<host>-<member>``)."""
        leader = Coordinator(self.etcd.client(), self.name).leaders()[shard]
        return leader.worker.rsplit("-", 1)[0]


@pytest.fixture
def hosts(tmp_path: Path, etcd_server: EtcdServer) -> Iterator[Hosts]:  # noqa: F811
    name = f"t{time.monotonic_ns() % 10**9}"
    create_keys(tmp_path / "keys")  # cluster mode: made once (docs/cluster.md, step 3)
    with Cluster(
        tmp_path,
        shards=2,
        ZKV_COORDINATOR=etcd_server.url,
        ZKV_CLUSTER_NAME=name,
        ZKV_REPLICAS="1",
        ZKV_LEASE_TTL=str(LEASE_TTL_S),
        ZKV_FSYNC="always",
        ZKV_KEYS=str(tmp_path / "keys"),
    ) as cluster:
        h = Hosts(cluster, etcd_server, name)
        h.start_broker(cluster.frontend, cluster.backend)
        second = f"tcp://127.0.0.1:{free_port()}"
        h.start_broker(second, f"tcp://127.0.0.1:{free_port()}")
        h.frontends.append(second)
        for host in ("h1", "h2", "h3"):
            h.start_worker(host)
        try:
            for frontend in h.frontends:
                kv = h.client(frontend, timeout_s=1.0)
                wait_for(
                    lambda kv=kv: all(kv.ping()["owned"]), "every shard led, seen by " + frontend
                )
        except BaseException:
            print(cluster.logs())
            raise
        yield h


def another_broker(cluster: Cluster):  # type: ignore[no-untyped-def]
    """One more broker of the cluster, on endpoints of its own (the environment's settings)."""
    frontend, backend = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    return cluster.spawn(
        "broker", "broker", "--frontend", frontend, "--backend", backend, *own_events()
    )


def own_events() -> list[str]:
    """A broker's events endpoints of its own (the environment's are the first broker's)."""
    return [
        f"--events=tcp://127.0.0.1:{free_port()}",
        f"--events-backend=tcp://127.0.0.1:{free_port()}",
    ]


def keys_of(shard: int, count: int, prefix: str = "k") -> list[bytes]:
    found = []
    i = 0
    while len(found) < count:
        key = f"{prefix}{i}".encode()
        if key_shard(key, 2) == shard:
            found.append(key)
        i += 1
    return found


def test_two_brokers_serve_one_cluster_and_a_leader_killed_loses_no_acknowledged_write(
    hosts: Hosts,
) -> None:
    kv = hosts.client(hosts.frontends[0])
    other = hosts.client(hosts.frontends[1])
    kv.set(b"hello", b"world")
    assert other.get(b"hello").value == b"world"  # the same cluster through either broker
    victim = hosts.leader_host(0)
    keys = keys_of(0, 2000, "w")
    acked: dict[bytes, bytes] = {}
    failures: list[str] = []
    stop = threading.Event()
    first_after: list[float] = []
    killed_at: list[float] = []

    def write() -> None:
        for i, key in enumerate(keys):
            if stop.is_set():
                return
            value = b"v%d" % i
            try:
                kv.set(key, value)
            except ZkvError as exc:
                failures.append(f"{key!r}: {exc}")
                continue
            acked[key] = value
            if killed_at and not first_after:
                first_after.append(time.monotonic() - killed_at[0])

    writer = threading.Thread(target=write)
    writer.start()
    wait_for(lambda: len(acked) >= 100, "writes before the kill")
    killed_at.append(time.monotonic())
    hosts.cluster.kill(hosts.workers[victim], signal.SIGKILL)
    wait_for(lambda: first_after, "a write acknowledged after the kill", 15.0)
    stop.set()
    writer.join(timeout=30)
    logs = hosts.cluster.logs()
    assert first_after[0] < FAILOVER_BOUND_S, (first_after, logs)
    for key, value in acked.items():  # read through the other broker
        item = other.get(key)
        assert item is not None and item.value == value, (key, logs)
    assert hosts.leader_host(0) != victim
    assert other.get(b"hello").value == b"world"


def test_every_worker_restarted_on_its_disk_brings_every_shard_back(hosts: Hosts) -> None:
    kv = hosts.client()
    written = {b"p%d" % i: b"v%d" % i for i in range(200)}
    kv.set_many(written)
    for host in list(hosts.workers):  # a power cut: every worker at once
        hosts.cluster.kill(hosts.workers[host], signal.SIGKILL)
    for host in ("h1", "h2", "h3"):
        hosts.start_worker(host)
    probe = hosts.client(timeout_s=1.0)
    wait_for(lambda: all(probe.ping()["owned"]), "every shard led again", 20.0)
    for key, value in written.items():
        assert kv.get(key).value == value


def test_a_broker_with_another_shard_count_refuses_to_start_and_says_why(hosts: Hosts) -> None:
    cluster = hosts.cluster
    cluster.env = {**cluster.env, "ZKV_SHARDS": "3"}
    broker = another_broker(cluster)
    assert broker.wait(timeout=15) == 2
    assert "ZKV_SHARDS is 3 here but 2 in the cluster" in cluster.logs()


def test_a_worker_whose_data_belongs_to_another_cluster_refuses_to_start(
    hosts: Hosts, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "shard-0").mkdir(parents=True)
    (foreign / "manifest").write_text(
        '{"format": 1, "cluster": "00000000000000ab", "shards": 2, "durable": true}'
    )
    worker = hosts.cluster.start_worker("--host-id", "h9", "--data-dir", str(foreign))
    assert worker.wait(timeout=15) == 2
    assert "holds data of cluster 00000000000000ab" in hosts.cluster.logs()


def test_etcd_out_of_reach_stops_no_acknowledged_write_and_health_says_degraded(
    hosts: Hosts,
) -> None:
    cluster = hosts.cluster
    cluster.start_gateway()
    wait_for(lambda: cluster.http("GET", "/v1/health").status == 200, "the gateway")
    kv = hosts.client(timeout_s=2.0)
    acked: dict[bytes, bytes] = {}
    for i in range(50):
        kv.set(b"e%d" % i, b"before")
        acked[b"e%d" % i] = b"before"
    hosts.etcd.pause()
    try:
        # The brokers notice within their etcd timeout (1 s) and say so; the leaders serve
        # until their 1 s leases run out by their own clocks, then acknowledge nothing.
        wait_for(
            lambda: (
                cluster.http("GET", "/v1/health", timeout_s=3).json()["coordinator"]
                == "unreachable"
            ),
            "health to say etcd is out of reach",
            10.0,
        )
        health = cluster.http("GET", "/v1/health", timeout_s=3)
        assert health.status == 503 and health.json()["status"] == "degraded"
        refused = 0
        hasty = hosts.client(timeout_s=1.0)  # a refused write is retried until its timeout
        for i in range(50, 53):
            try:
                hasty.set(b"e%d" % i, b"during")
                acked[b"e%d" % i] = b"during"
            except ZkvError:
                refused += 1
        assert refused > 0  # past the leases, no leader acknowledges
    finally:
        hosts.etcd.resume()
    probe = hosts.client(timeout_s=1.0)
    wait_for(lambda: all(probe.ping()["owned"]), "every shard led again", 20.0)
    wait_for(lambda: cluster.http("GET", "/v1/health").status == 200, "health back to ok", 20.0)
    kv.set(b"after", b"ok")
    for key, value in acked.items():
        assert kv.get(key).value == value, (key, cluster.logs())


def test_a_broker_killed_costs_clients_latency_not_errors(hosts: Hosts) -> None:
    both = ",".join(hosts.frontends)
    kv = Client(both, timeout_s=10.0, first_broker=0)
    hosts.cluster._clients.append(kv)
    written: dict[bytes, bytes] = {}
    slowest = 0.0
    for i in range(300):
        if i == 100:
            hosts.cluster.kill(hosts.brokers[0], signal.SIGKILL)  # the one this client uses
        started = time.monotonic()
        kv.set(b"b%d" % i, b"v%d" % i)  # raises on an error: none is allowed
        slowest = max(slowest, time.monotonic() - started)
        written[b"b%d" % i] = b"v%d" % i
    for key, value in written.items():
        assert kv.get(key).value == value
    assert kv.brokers.endpoint == hosts.frontends[1]  # it moved to the live broker
    assert slowest < 10.0


def test_a_broker_without_the_clusters_keys_refuses_to_make_its_own(
    hosts: Hosts, tmp_path: Path
) -> None:
    # On one host the first broker makes the keys; across machines a broker given a wrong
    # path made a set of its own, and every worker blamed its own, correct, keys.
    cluster = hosts.cluster
    cluster.env = {**cluster.env, "ZKV_KEYS": str(tmp_path / "no-such-keys")}
    broker = another_broker(cluster)
    assert broker.wait(timeout=15) == 2
    assert "cluster mode needs the cluster's keys" in cluster.logs()
    assert not (tmp_path / "no-such-keys").exists()
