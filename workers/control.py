"""The cluster-mode worker's control plane: a thread that talks to etcd, and the worker that
acts on what it reads (docs/cluster.md).

etcd calls block (an HTTP round trip, seconds when etcd is far or down), so none runs on the
worker's loop: :class:`Control` runs them on its own thread. It keeps the worker's lease
alive, reads the cluster's state every ``POLL_S`` into a :class:`workers.roles.View`, and
carries out the steps the loop asks for (campaign, follow, step down, ISR changes), each one
etcd transaction whose outcome the loop picks up on its next pass. The loop never waits for
etcd: while etcd is out of reach it keeps serving for as long as its lease is valid by its
own clock, then stops acknowledging (see :meth:`Control.lease_valid`).
"""

from __future__ import annotations

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
        self.reachable = True
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
            self._outcomes.put(outcome)
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
        brokers = {name: info.backend for name, info in coordinator.brokers().items()}
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
            members = [str(m) for m in args["members"]]
            change = coordinator.shrink_isr if action == "shrink" else coordinator.expand_isr
            epoch = int(args["epoch"])
            if action == "shrink":
                members = [m for m in seen.members if m in members]
            else:
                members = list(seen.members) + [m for m in members if m not in seen.members]
            done = change(shard, epoch, seen, members)
            return Outcome(action, shard, done is not None, epoch)
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


# --- the worker ---------------------------------------------------------------------------

from workers.aof import CorruptLog, DurabilityError  # noqa: E402
from workers.cluster import LinkedWorker  # noqa: E402
from workers.manifest import ManifestError, bind_cluster, open_manifest  # noqa: E402
from workers.ownership import OwnershipError  # noqa: E402
from workers.persist import ShardMoved  # noqa: E402
from workers.roles import next_step  # noqa: E402
from workers.shard import Message, take_shard, unavailable  # noqa: E402
from workers.worker import EXIT_CONFIG, EXIT_CORRUPT_LOG, EXIT_IO_ERROR  # noqa: E402
from zkv.etcd import EtcdError  # noqa: E402
from zkv.protocol import Heartbeat, Reply, encode_control, encode_reply  # noqa: E402

FIRST_VIEW_WAIT_S = 30.0  # how long a starting worker waits for etcd before giving up


class ClusterWorker(LinkedWorker):
    """A worker whose role etcd decides (see the module docstring and workers/roles.py).

    Args:
        control: the etcd thread (not started yet).
        replication: makes the leader's and the follower's replication objects; None for a
            cluster without followers.
    """

    def __init__(self, config, worker_id: str, control: Control, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, worker_id, **kwargs)
        self.worker_id = worker_id
        self.control = control
        self.role = "standby"
        self.role_shard: int | None = None

    def run(self) -> int:
        """Join the cluster (lease, registration, the data directory bound to the cluster),
        then serve until :meth:`stop`; on stop, revoke the lease so etcd frees whatever this
        worker held at once rather than after the lease's TTL."""
        plane = self.control.plane
        try:
            if self._durability is not None:
                try:
                    manifest = open_manifest(self._durability.data_dir, self._durability.fsync)
                    self._manifest = bind_cluster(
                        self._durability.data_dir,
                        manifest,
                        int(plane.config.cluster_id, 16),
                        plane.config.shards,
                        self._durability.fsync,
                    )
                except (ManifestError, OSError) as exc:
                    log.error("cannot use data directory %s: %s", self._durability.data_dir, exc)
                    return EXIT_CONFIG
            self.shards = plane.config.shards
            deadline = time.monotonic() + FIRST_VIEW_WAIT_S
            while True:
                try:
                    plane.join()
                    break
                except EtcdError as exc:
                    if time.monotonic() > deadline or self.stopping:
                        log.error("cannot join the cluster in etcd: %s", exc)
                        return EXIT_CONFIG
                    time.sleep(0.2)
            log.info(
                "worker %s joined cluster %s (host %s, replication %s)",
                self.worker_id,
                plane.config.cluster_id,
                plane.info.host,
                plane.info.replication,
            )
            self.control.start()
            generation = self.control.generation
            while not self.stopping:
                if self.control.generation != generation:
                    generation = self.control.generation
                    self._step_down("the lease was lost: etcd dropped what it held")
                self._control_pass()
                self.links_pass()
            self._step_down("stopping")
            return self.exit_code
        finally:
            self.control.stop()
            try:
                plane.leave()
            except Exception as exc:  # leaving is a courtesy: the lease lapses anyway
                log.warning("could not revoke the lease: %s", exc)
            if self.shard is not None:
                self.shard.close(sync=False)
                self.shard = None
            self.close_links()
            if self._own_context:
                self._context.term()

    # --- roles ------------------------------------------------------------------------------

    def _control_pass(self) -> None:
        control = self.control
        self.set_brokers(control.brokers)
        for outcome in control.outcomes():
            self._on_outcome(outcome)
        if self.role == "leader" and not control.lease_valid():
            self._step_down("its lease is no longer valid by this worker's clock")
        view = control.view
        if view is None or not control.reachable:
            return  # no step on a stale reading: etcd decides, and it is out of reach
        step = next_step(view, self.worker_id, self.role, self.role_shard)
        if step.action == "step_down":
            self._step_down(step.why)
        elif step.action in ("campaign", "follow"):
            control.ask(step.action, step.shard)

    def _on_outcome(self, outcome: Outcome) -> None:
        if not outcome.ok:
            if outcome.error:
                log.info("%s shard %s failed: %s", outcome.action, outcome.shard, outcome.error)
            return
        if outcome.action == "campaign" and outcome.shard is not None:
            self._lead(outcome.shard, outcome.epoch)
        elif outcome.action == "follow" and outcome.shard is not None:
            self.role, self.role_shard = "follower", outcome.shard
            log.info("following shard %d", outcome.shard)

    def _lead(self, number: int, epoch: int) -> None:
        """Won shard ``number``'s leader key at ``epoch``: take the shard (replaying the log
        this host holds), then tell every broker."""
        if self.shard is not None and self.shard.number != number:
            self._leave(self.shard, f"leading shard {number} instead")
        try:
            takeover = take_shard(
                number,
                epoch,
                self.shard,
                self._durability,
                self._clock,
                self._heartbeat_if_due,
                memory=self._new_memory,
            )
        except (CorruptLog, OwnershipError) as exc:
            log.error("cannot take shard %d: %s", number, exc)
            self.exit_code = EXIT_CORRUPT_LOG
            self.stop()
            return
        except (DurabilityError, OSError, ShardMoved) as exc:
            log.error("cannot take shard %d: %s", number, exc)
            self.exit_code = EXIT_IO_ERROR
            self.stop()
            return
        self.shard = takeover.shard
        self.role, self.role_shard, self.led_epoch = "leader", number, epoch
        for link in self.links.values():
            link.last_token = 0
        log.info(
            "took shard %d epoch %d (%d keys replayed from %s)",
            number,
            epoch,
            len(self.shard.store),
            "memory" if takeover.kept else self.shard.source,
        )
        self.announce()

    def _step_down(self, why: str) -> None:
        if self.role == "standby":
            return
        log.info("no longer %s of shard %s: %s", self.role, self.role_shard, why)
        if self.shard is not None:
            self._leave(self.shard, why)
        was_leader = self.role == "leader"
        self.role, self.role_shard, self.led_epoch = "standby", None, 0
        if was_leader:
            self.announce()

    def _heartbeat_if_due(self) -> None:
        """During a long replay: heartbeat every broker."""
        now_s = time.monotonic()
        for link in self.links.values():
            if now_s >= link.next_heartbeat_s:
                self._use(link)
                self._send(encode_control(Heartbeat()))
                link.next_heartbeat_s = now_s + self.config.heartbeat_interval_s

    # --- serving ----------------------------------------------------------------------------

    def _serve(self, batch: list[Message]) -> None:
        """Serve as the single-host worker does, but only as the leader with a valid lease:
        anything else is answered UNAVAILABLE (not applied), so a worker whose lease may have
        lapsed in etcd acknowledges nothing."""
        if batch and self.role == "leader" and not self.control.lease_valid():
            for dispatch in batch:
                reply = unavailable(dispatch, "this worker's lease lapsed: not applied")
                self._send(encode_reply(reply) if isinstance(reply, Reply) else reply)
            batch.clear()
            return
        super()._serve(batch)
