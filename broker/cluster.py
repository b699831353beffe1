"""The broker's view of etcd in cluster mode (docs/cluster.md): who leads each shard.

etcd calls block, so they run on a thread of their own (:class:`LeaderView`), never on the
broker's loop. The thread keeps the broker's registration (its endpoints under a lease, so
workers find it and a dead broker vanishes from etcd within the lease time) and reads the
shards' leader keys every ``POLL_S``. The loop picks a changed reading up in its next pass
(:meth:`LeaderView.take`, one integer comparison when nothing changed) and hands it to
:meth:`broker.core.Broker.set_leaders`.

While etcd is out of reach the last reading stays in force: the broker keeps routing to the
leaders it knows, which keep serving for as long as their leases hold by their own clocks;
no failover can happen meanwhile (nobody can win a leader key), and /v1/health says degraded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from zkv.coordination import BrokerInfo, Coordinator, Lease
from zkv.etcd import Etcd

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the leader keys are read


class LeaderView(threading.Thread):
    """Reads the shards' leaders from etcd on a thread.

    Args:
        read_leaders: one reading: shard -> the leader's routing identity (its worker id).
        keepalive: renews the broker's registration lease (raises on failure).
        keepalive_every_s: how often to renew it.
    """

    def __init__(
        self,
        read_leaders: Callable[[], dict[int, bytes]],
        keepalive: Callable[[], object],
        keepalive_every_s: float,
    ) -> None:
        super().__init__(name="zkv-leaders", daemon=True)
        self._read = read_leaders
        self._keepalive = keepalive
        self._keepalive_every_s = keepalive_every_s
        self._stop = threading.Event()
        self._leaders: dict[int, bytes] = {}
        self.version = 0  # bumped whenever the reading or reachability changes
        self.taken = 0
        self.reachable = True

    def take(self) -> tuple[dict[int, bytes], bool] | None:
        """The reading and whether etcd answered, if either changed since the last take."""
        version = self.version
        if version == self.taken:
            return None
        self.taken = version
        return self._leaders, self.reachable

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        next_keepalive = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_keepalive:
                try:
                    self._keepalive()
                    next_keepalive = now + self._keepalive_every_s
                except Exception as exc:  # any failure: try again soon, the lease may lapse
                    log.warning("broker registration keepalive failed: %s", exc)
                    next_keepalive = now + min(0.5, self._keepalive_every_s)
            try:
                leaders = self._read()
                changed = leaders != self._leaders or not self.reachable
                if not self.reachable:
                    log.info("etcd reachable again: %d shard leaders known", len(leaders))
                self._leaders, self.reachable = leaders, True
            except Exception as exc:
                changed = self.reachable
                if self.reachable:
                    log.warning(
                        "etcd out of reach: %s; routing to the %d leaders known, no failover "
                        "until it answers",
                        exc,
                        len(self._leaders),
                    )
                self.reachable = False
            if changed:
                self.version += 1
            self._stop.wait(POLL_S)


class Membership:
    """The broker's registration in etcd under a lease of its own, taken again (and the
    broker registered again) if etcd ever reports the lease gone, so workers always find it.
    """

    def __init__(
        self, coordinator: Coordinator, broker_id: str, info: BrokerInfo, ttl_s: int
    ) -> None:
        self.coordinator = coordinator
        self.broker_id = broker_id
        self.info = info
        self.ttl_s = ttl_s
        self.lease = Lease(coordinator.etcd, ttl_s)

    def join(self) -> None:
        self.lease.start()
        self.coordinator.register_broker(self.broker_id, self.info, self.lease)

    def keep(self) -> None:
        """On the view's thread: a lost lease is replaced and the broker registered again."""
        if self.lease.lost:
            self.lease.close(revoke=False)
            self.lease = Lease(self.coordinator.etcd, self.ttl_s)
            self.join()
            log.info("broker %s registered again under a new lease", self.broker_id)

    def leave(self) -> None:
        self.lease.close(revoke=True)

    def leaders(self) -> dict[int, bytes]:
        return {
            shard: leader.worker.encode() for shard, leader in self.coordinator.leaders().items()
        }


def join_cluster(
    urls: list[str],
    cluster_name: str,
    shards: int,
    replicas: int,
    host_id: str,
    lease_ttl_s: int,
    info: BrokerInfo,
) -> tuple[Membership, LeaderView]:
    """Cluster mode's start for a broker: write the cluster's shape into etcd, or check it
    against this broker's (ConfigMismatch), register, and start the leader view.

    Raises:
        ConfigMismatch: another shard count or replica count than the cluster's.
        EtcdError: etcd could not be reached.
    """
    coordinator = Coordinator(Etcd(urls), cluster_name)
    config = coordinator.bootstrap(shards, replicas)
    broker_id = f"{host_id}-{os.urandom(BROKER_ID_RANDOM_BYTES).hex()}"
    membership = Membership(coordinator, broker_id, info, lease_ttl_s)
    membership.join()
    log.info(
        "broker %s joined cluster %s (%d shards, %d replicas) at %s",
        broker_id,
        config.cluster_id,
        config.shards,
        config.replicas,
        ",".join(urls),
    )
    view = LeaderView(membership.leaders, membership.keep, KEEP_EVERY_S)
    view.start()
    return membership, view


BROKER_ID_RANDOM_BYTES = 6
KEEP_EVERY_S = 0.5  # how often the view's thread checks that the broker's lease still stands
