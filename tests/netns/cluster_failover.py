"""Cluster mode on five test hosts: the seed API and the client through either broker, a
leader's host killed under write load, and that host back after writes went on without it.

Hosts: h1 etcd (on its address) and the gateway; h2 and h3 a broker and a worker each; h4 and
h5 a worker each. 2 shards, ZKV_REPLICAS=1: four workers, a leader and a follower per shard,
two copies of a shard never on one host. CURVE on every socket, 1 s leases, 0.2 s heartbeats.

1. The seed API through the gateway (whose broker is h2's) and the client through h2's and
   h3's brokers, each reading what the other wrote.
2. A writer sets new keys of shard 0, one at a time, through a broker on another host than
   shard 0's leader; once it has some acknowledged, the leader's host is killed (SIGKILL of
   everything on it). Measured: the first write acknowledged after the kill.
3. The writes go on for AWAY_S without that host; then it is started again on its disk. The
   returning worker (same id: its data directory's) follows a shard again, catches up from a
   snapshot and the log tail while the writes go on, and is back in that shard's in-sync set.
   Then the writes stop; the follower's log, replayed, must equal its leader's.
4. Everything acknowledged is read back through the other broker.

Prints what it saw as JSON (tests/process/test_cluster_hosts.py judges it).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.cluster import wait_for
from tests.hosts import Hosts, scenario
from tests.netns.cluster_kit import HTTP_PORT, ClusterOnHosts, poll, replay
from zkv.errors import ZkvError
from zkv.hashing import key_shard

SHARDS = 2
AWAY_S = 10.0  # writes go on this long without the killed host (a minute in the long chaos run)
CATCH_UP_TIMEOUT_S = 20.0  # from its restart until the returning worker is in-sync again
FAILOVER_TIMEOUT_S = 15.0  # a write acknowledged after the kill, at most (the test asks less)
BEFORE_KILL = 100  # writes acknowledged before the kill


def seed(host_address: str, path: str, **params: str) -> tuple[int, Any]:
    """GET a seed route of the gateway: (status, JSON body)."""
    connection = http.client.HTTPConnection(host_address, HTTP_PORT, timeout=10)
    try:
        connection.request("GET", f"{path}?{urlencode(params)}")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def shard_keys(shard: int, prefix: str):  # type: ignore[no-untyped-def]
    """Endless keys of ``shard``."""
    i = 0
    while True:
        key = f"{prefix}{i}".encode()
        i += 1
        if key_shard(key, SHARDS) == shard:
            yield key


class Writer(threading.Thread):
    """Sets new keys of one shard one at a time; remembers what was acknowledged and when."""

    def __init__(self, client: Any, shard: int) -> None:
        super().__init__(name="writer", daemon=True)
        self.client = client
        self.keys = shard_keys(shard, "w")
        self.acked: dict[bytes, bytes] = {}
        self.acked_at: list[tuple[float, float]] = []  # (sent, acknowledged), monotonic
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for n, key in enumerate(self.keys):
            if self.stop.is_set():
                return
            value = b"v%d" % n
            sent = time.monotonic()
            try:
                self.client.set(key, value)
            except ZkvError as exc:
                self.failures.append(f"{key!r}: {type(exc).__name__}: {exc}")
                continue
            self.acked[key] = value
            self.acked_at.append((sent, time.monotonic()))

    def first_ack_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first write sent after ``t`` acknowledged (a reply of
        the dead leader's, in flight at ``t``, does not count)."""
        return next((done - t for sent, done in self.acked_at if sent > t), None)


@scenario
def main(workdir: Path) -> dict[str, Any]:
    """Five hosts: serve, kill a leader's host under writes, bring it back, read back."""
    result: dict[str, Any] = {}
    with Hosts(5, workdir, operator=True) as hosts:
        h1, h2, h3, h4, h5 = hosts
        cluster = ClusterOnHosts(
            hosts,
            etcd=h1,
            brokers=[h2, h3],
            workers=[h2, h3, h4, h5],
            gateway=h1,
            shards=SHARDS,
        )
        try:
            started = time.monotonic()
            cluster.start()
            wait_for(lambda: seed(h1.address, "/get", key="none")[0] == 200, "the gateway")
            result["ready_s"] = round(time.monotonic() - started, 2)

            # 1. The seed API, the client through either broker.
            a, b = (cluster.client(f) for f in cluster.frontends)
            seen: dict[str, Any] = {}
            seen["set"] = seed(h1.address, "/set", key="s", value="1", timeout="60")
            seen["get"] = seed(h1.address, "/get", key="s")
            a.set("via-a", "A")
            b.set("via-b", "B")
            seen["b_reads_a"] = b.get("via-a").value.decode()
            seen["a_reads_b"] = a.get("via-b").value.decode()
            seen["b_reads_seed"] = b.get("s").value.decode()
            seen["all"] = sorted(e.key.decode() for e in a.all())
            seen["delete"] = seed(h1.address, "/delete", key="s")
            seen["get_deleted"] = seed(h1.address, "/get", key="s")
            result["seen"] = seen

            # 2. Kill shard 0's leader's host under writes.
            leaders = cluster.leaders()
            victim_id = leaders[0].worker
            victim = cluster.host_of(victim_id)
            result["victim"] = [victim.name, victim_id, leaders[0].epoch]
            via = cluster.frontend_off(victim)
            writer = Writer(cluster.client(via), 0)
            writer.start()
            wait_for(lambda: len(writer.acked) >= BEFORE_KILL, "writes before the kill")
            cluster.kill_host(victim)
            killed = time.monotonic()  # every process of it gone: nothing it sends after
            wait_for(
                lambda: writer.first_ack_after(killed) is not None,
                "a write acknowledged after the kill",
                FAILOVER_TIMEOUT_S,
            )
            result["first_write_after_kill_s"] = round(writer.first_ack_after(killed), 3)
            after = poll(
                lambda: (new := cluster.leaders().get(0)) and new.worker != victim_id and new,
                "etcd to name the new leader",
                FAILOVER_TIMEOUT_S,
            )
            result["new_leader"] = [after.worker, after.epoch]

            # 3. Writes go on without it; then it comes back and catches up.
            wait_for(lambda: time.monotonic() - killed >= AWAY_S, "writes without it", AWAY_S + 1)
            acked_while_away = len(writer.acked)
            back = time.monotonic()
            cluster.restart(victim)

            def rejoined() -> tuple[int] | None:  # a tuple: shard 0 is a result too
                for n in range(SHARDS):
                    isr = cluster.isr(n)
                    if victim_id in isr.members and cluster.leaders()[n].worker != victim_id:
                        return (n,)
                return None

            (followed,) = poll(
                rejoined, "the returning worker in an in-sync set", CATCH_UP_TIMEOUT_S
            )
            result["rejoined_isr_s"] = round(time.monotonic() - back, 2)
            result["writes_while_catching_up"] = len(writer.acked) - acked_while_away
            writer.stop.set()
            writer.join(timeout=10)
            result["writer_stuck"] = writer.is_alive()
            leader_host = cluster.leader_host(followed)
            leader_log = leader_host.disk / f"shard-{followed}" / "log"
            follower_log = victim.disk / f"shard-{followed}" / "log"

            def same() -> bool:
                return replay(follower_log) == replay(leader_log)

            # The last acknowledged records reach the follower within a tick or two.
            try:
                wait_for(same, "the follower's log to equal its leader's", 5.0)
            except AssertionError:
                pass
            leader_state, follower_state = replay(leader_log), replay(follower_log)
            result["catch_up"] = {
                "shard": followed,
                "isr": list(cluster.isr(followed).members),
                "victim_id": victim_id,
                "leader_keys": len(leader_state),
                "follower_keys": len(follower_state),
                "equal": leader_state == follower_state,
                "only_leader": len(set(leader_state) - set(follower_state)),
                "only_follower": len(set(follower_state) - set(leader_state)),
            }

            # 4. Everything acknowledged, read back through the other broker.
            reader = cluster.client(cluster.frontend_off(cluster.leader_host(0)))
            missing = []
            items = list(writer.acked.items())
            for start in range(0, len(items), 500):
                chunk = items[start : start + 500]
                got = reader.get_many([k for k, _ in chunk])
                for (key, value), item in zip(chunk, got, strict=True):
                    if item is None or item.value != value:
                        missing.append(key.decode())
            result["acked"] = len(writer.acked)
            result["failures"] = writer.failures[:20]
            result["failure_count"] = len(writer.failures)
            result["lost"] = missing[:20]
            result["lost_count"] = len(missing)
            result["killed_log_kept"] = any(
                "took shard 0 epoch" in text
                for name, text in cluster.worker_logs().items()
                if name.startswith(victim.name)
            )
        finally:
            cluster.close()
    return result


if __name__ == "__main__":
    main()
