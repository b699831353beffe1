"""The cluster-mode worker's control plane: a thread that talks to etcd (docs/cluster.md).

etcd calls block (an HTTP round trip, seconds when etcd is far or down), so none runs on the
worker's loop: :class:`Control` runs them on its own thread. It keeps the worker's lease
alive, reads the cluster's state every ``POLL_S`` into a :class:`workers.roles.View`, and
carries out the steps the loop asks for (campaign, follow, step down, ISR changes), each one
etcd transaction whose outcome the loop picks up on its next pass. The loop never waits for
etcd: while etcd is out of reach it keeps serving for as long as its lease is valid by its
own clock, then stops acknowledging (see :meth:`Control.lease_valid`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass

from workers.roles import Leader, View
from zkv.coordination import (
    BadValue,
    ClusterConfig,
    Coordinator,
    Isr,
    Lease,
    WorkerInfo,
    check_id,
    parse_isr,
    parse_leader,
)

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the cluster's state is read from etcd
MAX_PENDING_STEPS = 64  # steps queued for the control thread; more are dropped (retried later)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A step's result: ``ok`` whether its transaction succeeded, ``epoch`` the shard's epoch
    after a successful campaign, ``error`` why it failed."""

    action: str
    shard: int | None
    ok: bool
    epoch: int = 0
    error: str = ""
    members: frozenset[str] = frozenset()  # an ISR change's followers (the set less the leader)
    reading: int = 0  # Control.readings when it was done


class Control(threading.Thread):
    """etcd on a thread of its own. What the loop reads (:attr:`view`, :attr:`brokers`) is
    replaced whole, never changed in place, so the loop reads it without a lock.

    Args:
        plane: the etcd calls (:class:`EtcdPlane`; a fake in unit tests).
    """

    def __init__(self, plane: EtcdPlane) -> None:
        super().__init__(name="zkv-control", daemon=True)
        self.plane = plane
        self._steps: queue.Queue[tuple[str, int | None, dict]] = queue.Queue(MAX_PENDING_STEPS)
        self._outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.view: View | None = None
        self.brokers: dict[str, str] = {}
        self.events_backends: frozenset[str] = frozenset()  # the brokers' events backends
        self.reachable = True
        # Readings taken so far; an outcome carries the count at its end, so the loop acts
        # only on a reading taken after the step it asked for (not one from before it).
        self.readings = 0
        # Bumped when the lease was lost and a new one taken: whatever this worker held
        # under the old one (a leader key, a follower slot) is gone.
        self.generation = 0
        self._pending: set[tuple[str, int | None]] = set()
        self._lock = threading.Lock()

    def lease_valid(self) -> bool:
        """Whether this worker may still act as what etcd made it: its lease cannot have
        expired in etcd yet (zkv.coordination.Lease says why the deadline is safe)."""
        return self.plane.lease.valid()

    def ask(self, action: str, shard: int | None, **args: object) -> None:
        """Queue a step unless the same one is already queued or running."""
        with self._lock:
            if (action, shard) in self._pending:
                return
            self._pending.add((action, shard))
        try:
            self._steps.put_nowait((action, shard, dict(args)))
        except queue.Full:
            with self._lock:
                self._pending.discard((action, shard))

    def outcomes(self) -> list[Outcome]:
        found = []
        while True:
            try:
                found.append(self._outcomes.get_nowait())
            except queue.Empty:
                return found

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        next_read = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self.plane.lease.lost:
                try:
                    self.plane.renew_membership()
                    self.generation += 1
                except Exception as exc:  # etcd out of reach: try again soon
                    log.warning("cannot take a new lease: %s", exc)
                    self._stop.wait(0.5)
                    continue
            if now >= next_read:
                try:
                    self.view, self.brokers = self.plane.read()
                    self.events_backends = self.plane.events_backends
                    self.readings += 1
                    if not self.reachable:
                        log.info("etcd reachable again")
                    self.reachable = True
                except Exception as exc:
                    if self.reachable:
                        log.warning("etcd out of reach: %s (serving while the lease holds)", exc)
                    self.reachable = False
                next_read = now + POLL_S
            try:
                action, shard, args = self._steps.get(timeout=0.02)
            except queue.Empty:
                continue
            try:
                outcome = self.plane.do(action, shard, args)
            except Exception as exc:
                outcome = Outcome(action, shard, False, error=str(exc))
            with self._lock:
                self._pending.discard((action, shard))
            self._outcomes.put(dataclasses.replace(outcome, reading=self.readings))
            next_read = 0.0  # read again at once: the step changed the state


class EtcdPlane:
    """The worker's etcd calls, on the control thread: its lease and registration, one
    reading of the cluster (three range requests), and the steps.

    Args:
        coordinator: the cluster's schema in etcd.
        worker_id: this worker's id (also its routing identity at the brokers).
        info: what others need to know of it (host, replication endpoint, durability).
        config: the cluster's shape (read once at start).
        ttl_s: the lease's TTL.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        worker_id: str,
        info: WorkerInfo,
        config: ClusterConfig,
        ttl_s: int,
    ) -> None:
        self.coordinator = coordinator
        self.worker_id = worker_id
        self.info = info
        self.config = config
        self.ttl_s = ttl_s
        self.lease = Lease(coordinator.etcd, ttl_s)
        self.events_backends: frozenset[str] = frozenset()  # set by read()

    def join(self) -> None:
        """Take the lease and register (raises EtcdError)."""
        self.lease.start()
        self.coordinator.register_worker(self.worker_id, self.info, self.lease)

    def renew_membership(self) -> None:
        """After the lease was lost: a new lease, registered again."""
        self.lease.close(revoke=False)
        self.lease = Lease(self.coordinator.etcd, self.ttl_s)
        self.join()
        log.info("took a new lease after losing the old one; registered again")

    def leave(self) -> None:
        """Revoke the lease: etcd deletes this worker's keys at once (a clean stop)."""
        self.lease.close(revoke=True)

    def read(self) -> tuple[View, dict[str, str]]:
        coordinator = self.coordinator
        workers = coordinator.workers()
        live = coordinator.live_brokers()
        brokers = {name: info.backend for name, info in live.items()}
        # Where each broker's events proxy takes the workers' PUB (workers/events.py); a broker
        # started with --events none, or by an older version, has none.
        self.events_backends = frozenset(
            info.events_backend for info in live.values() if info.events_backend
        )
        leaders, isr, followers = read_shards(coordinator)
        view = View(
            shards=self.config.shards,
            replicas=self.config.replicas,
            hosts={name: info.host for name, info in workers.items()},
            leaders=leaders,
            isr={shard: found.members for shard, found in isr.items()},
            followers=followers,
        )
        return view, brokers

    def do(self, action: str, shard: int | None, args: dict) -> Outcome:
        coordinator = self.coordinator
        if shard is None:
            return Outcome(action, shard, False, error="no shard")
        if action == "campaign":
            epoch = coordinator.campaign(shard, self.worker_id, self.info.replication, self.lease)
            return Outcome(action, shard, epoch is not None, epoch or 0)
        if action == "follow":
            ok = coordinator.claim_replica(shard, self.worker_id, self.lease, self.config.replicas)
            return Outcome(action, shard, ok)
        if action == "release":
            coordinator.release_replica(shard, self.worker_id)
            return Outcome(action, shard, True)
        if action == "resign":
            return Outcome(action, shard, coordinator.resign(shard, int(args["epoch"])))
        if action in ("shrink", "expand"):
            seen = coordinator.read_isr(shard)
            if seen is None:
                return Outcome(action, shard, False, error="no in-sync set")
            followers = frozenset(str(m) for m in args["members"]) - {self.worker_id}
            wanted = [self.worker_id, *sorted(followers)]
            epoch = int(args["epoch"])
            if action == "shrink" and set(wanted) <= set(seen.members):
                done = coordinator.shrink_isr(shard, epoch, seen, wanted)
            elif action == "expand" and set(seen.members) <= set(wanted):
                done = coordinator.expand_isr(shard, epoch, seen, wanted)
            else:
                return Outcome(action, shard, False, error="the in-sync set changed meanwhile")
            return Outcome(action, shard, done is not None, epoch, members=followers)
        return Outcome(action, shard, False, error=f"unknown step {action}")


def read_shards(
    coordinator: Coordinator,
) -> tuple[dict[int, Leader], dict[int, Isr], dict[int, frozenset[str]]]:
    """Every shard's leader, in-sync set and follower slots, in one range request (malformed
    keys left out and logged once, as the coordinator's listings do)."""
    prefix = coordinator.key("shards") + "/"
    leaders: dict[int, Leader] = {}
    isr: dict[int, Isr] = {}
    followers: dict[int, set[str]] = {}
    for kv in coordinator.etcd.range_prefix(prefix):
        shard_text, _, rest = kv.key[len(prefix) :].partition(b"/")
        if not (shard_text.isdigit() and len(shard_text) <= 6):
            continue
        shard = int(shard_text)
        try:
            if rest == b"leader":
                found = parse_leader(kv)
                leaders[shard] = Leader(found.worker, found.epoch, found.endpoint)
            elif rest == b"isr":
                isr[shard] = parse_isr(kv)
            elif rest.startswith(b"replica/"):
                name = rest[len(b"replica/") :].decode("utf-8", "replace")
                followers.setdefault(shard, set()).add(check_id(name, "worker id"))
        except (BadValue, ValueError) as exc:
            coordinator._report(kv, exc)
    return leaders, isr, {shard: frozenset(names) for shard, names in followers.items()}
