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

import argparse
import dataclasses
import logging
import os
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


# --- the worker ---------------------------------------------------------------------------

import zmq  # noqa: E402

from workers.aof import CorruptLog, DurabilityError  # noqa: E402
from workers.cluster import Link, LinkedWorker  # noqa: E402
from workers.manifest import ManifestError, bind_cluster, open_manifest  # noqa: E402
from workers.ownership import LockTimeout, OwnershipError  # noqa: E402
from workers.persist import ShardMoved  # noqa: E402
from workers.replication import Follower, FollowerSocket, LeaderSocket, Replicator  # noqa: E402
from workers.member import Member, MemberError  # noqa: E402
from workers.roles import next_step  # noqa: E402
from workers.shard import Message, Shard, take_shard, unavailable  # noqa: E402
from workers.worker import (  # noqa: E402
    EXIT_CONFIG,
    EXIT_CORRUPT_LOG,
    EXIT_IO_ERROR,
    WorkerConfig,
    run_until_signalled,
)
from zkv.coordination import ConfigMismatch, ConfigMissing  # noqa: E402
from zkv.etcd import Etcd, EtcdError  # noqa: E402
from zkv.protocol import (  # noqa: E402
    MAX_REPLY_BYTES,
    Heartbeat,
    Reply,
    Status,
    encode_control,
    encode_reply,
)

FIRST_VIEW_WAIT_S = 30.0  # how long a starting worker tries to join etcd before giving up


class ClusterWorker(LinkedWorker):
    """A worker whose role etcd decides (see the module docstring and workers/roles.py).

    Replication (workers/replication.py): the worker binds one ROUTER for its followers at
    start (its endpoint is in its etcd registration). Leading, it ships every batch of records
    its shard appends (ShardFiles.tap) and holds the batch's replies until every in-sync
    follower has them (Replicator); following, it installs the leader's snapshot and appends
    and applies its records (Follower). Stepping down drops the held replies unanswered: the
    brokers send those requests to the next leader when etcd names it, and its idempotency
    memory (replicated with the log) answers any that were applied.

    Args:
        config: as the single-host worker's.
        worker_id: this worker's id in etcd and its routing identity at brokers and leaders.
        control: the etcd thread (not started yet).
        replication_endpoint: where to bind the followers' ROUTER (port 0: any free port).
        replica_lag_s: how long a follower may lag before it leaves the in-sync set.
    """

    def __init__(  # type: ignore[no-untyped-def]
        self,
        config: WorkerConfig,
        worker_id: str,
        control: Control,
        replication_endpoint: str = "tcp://127.0.0.1:0",
        replica_lag_s: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(config, worker_id, **kwargs)
        self.worker_id = worker_id
        self.control = control
        self.role = "standby"
        self.role_shard: int | None = None
        self._replication_endpoint = replication_endpoint
        self._replica_lag_s = replica_lag_s
        self._leader_socket: LeaderSocket | None = None
        self.replicator: Replicator | None = None
        self.follower: Follower | None = None
        self._follower_socket: FollowerSocket | None = None
        self._followed: tuple[int, str] | None = None  # (epoch, endpoint) being followed
        self._isr_done: dict[str, frozenset[str]] = {}  # ISR changes etcd confirmed
        self._stale_before = 0  # readings numbered below this predate our last step

    def run(self) -> int:
        """Join the cluster (lease, registration, the data directory bound to the cluster),
        then serve until :meth:`stop`; on stop, revoke the lease so etcd frees whatever this
        worker held at once rather than after the lease's TTL."""
        plane = self.control.plane
        try:
            durability = self._durability
            if durability is None:
                log.error("cluster mode needs a data directory (--in-memory is one host only)")
                return EXIT_CONFIG
            try:
                manifest = open_manifest(durability.data_dir, durability.fsync)
                self._manifest = bind_cluster(
                    durability.data_dir,
                    manifest,
                    int(plane.config.cluster_id, 16),
                    plane.config.shards,
                    durability.fsync,
                )
            except (ManifestError, OSError) as exc:
                log.error("cannot use data directory %s: %s", durability.data_dir, exc)
                return EXIT_CONFIG
            self.shards = plane.config.shards
            self._leader_socket = LeaderSocket(
                self._context, self._replication_endpoint, self.config.keys
            )
            plane.info = WorkerInfo(plane.info.host, self._leader_socket.endpoint, True)
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
                self._replication_pass()
            self._step_down("stopping")
            return self.exit_code
        finally:
            self.control.stop()
            try:
                plane.leave()
            except Exception as exc:  # leaving is a courtesy: the lease lapses anyway
                log.warning("could not revoke the lease: %s", exc)
            self._drop_follower()
            if self.shard is not None:
                self.shard.close(sync=False)
                self.shard = None
            if self._leader_socket is not None:
                self._leader_socket.close()
            self.close_links()
            if self._own_context:
                self._context.term()

    # --- roles ------------------------------------------------------------------------------

    def _control_pass(self) -> None:
        control = self.control
        self.set_brokers(control.brokers)
        for outcome in control.outcomes():
            if outcome.ok and outcome.action in ("campaign", "follow", "release"):
                self._stale_before = outcome.reading + 1
            self._on_outcome(outcome)
        if self.role == "leader" and not control.lease_valid():
            self._step_down("its lease is no longer valid by this worker's clock")
        view = control.view
        if view is None or not control.reachable or control.readings < self._stale_before:
            # No step on a stale reading: etcd decides, and it is out of reach, or this
            # reading was taken before a step of ours that changed what it shows.
            return
        if self.role == "follower" and self.role_shard is not None:
            leader = view.leaders.get(self.role_shard)
            if leader is not None and leader.worker != self.worker_id:
                self._follow_leader(leader.epoch, leader.replication)
        if self.role == "leader" and self.replicator is not None and self.role_shard is not None:
            members = view.isr.get(self.role_shard, ())
            followers = frozenset(m for m in members if m != self.worker_id)
            if self.worker_id in members and followers != self.replicator.isr:
                self.replicator.set_followers(sorted(followers))
        step = next_step(view, self.worker_id, self.role, self.role_shard)
        if step.action == "step_down":
            self._step_down(step.why)
        elif step.action in ("campaign", "follow"):
            control.ask(step.action, step.shard)

    def _on_outcome(self, outcome: Outcome) -> None:
        if outcome.action in ("shrink", "expand"):
            if outcome.ok and self.role == "leader" and outcome.epoch == self.led_epoch:
                self._isr_done[outcome.action] = outcome.members
            return
        if not outcome.ok:
            if outcome.error:
                log.info("%s shard %s failed: %s", outcome.action, outcome.shard, outcome.error)
            return
        if outcome.action == "campaign" and outcome.shard is not None:
            if self.role == "follower" and self.role_shard != outcome.shard:
                return  # a stale campaign: this worker follows another shard now
            self._lead(outcome.shard, outcome.epoch)
        elif outcome.action == "follow" and outcome.shard is not None:
            if self.role != "standby":
                self.control.ask("release", outcome.shard)
                return
            self.role, self.role_shard = "follower", outcome.shard
            log.info("following shard %d", outcome.shard)
            view = self.control.view
            leader = None if view is None else view.leaders.get(outcome.shard)
            if leader is not None:
                self._follow_leader(leader.epoch, leader.replication)

    # --- leading ----------------------------------------------------------------------------

    def _lead(self, number: int, epoch: int) -> None:
        """Won shard ``number``'s leader key at ``epoch``: take the shard (replaying the log
        this host holds), start shipping it, then tell every broker."""
        was_follower = self.role == "follower"
        self._drop_follower()
        if self.shard is not None and self.shard.number != number:
            self._leave(self.shard, f"leading shard {number} instead")
        if was_follower:  # its follower slot would count as one of its own followers
            self.control.ask("release", number)
        shard = self._take(number, epoch)
        if shard is None:
            return
        self.shard = shard
        self.role, self.role_shard, self.led_epoch = "leader", number, epoch
        self._isr_done.clear()
        view = self.control.view
        members = () if view is None else view.isr.get(number, ())
        self.replicator = Replicator(
            number,
            epoch,
            followers=sorted(m for m in members if m != self.worker_id),
            source=lambda: (shard.store, shard.memory),
            send=self._leader_socket.send if self._leader_socket is not None else _nowhere,
            release=self._release,
            shrink=lambda followers: self._change_isr("shrink", followers),
            expand=lambda followers: self._change_isr("expand", followers),
            lease_valid=self.control.lease_valid,
            deposed=lambda newer: self._step_down(f"a follower knows a newer epoch {newer}"),
            lag_s=self._replica_lag_s,
        )
        if shard.files is not None:
            shard.files.tap = self.replicator.ship
        for link in self.links.values():
            link.last_token = 0
        log.info(
            "took shard %d epoch %d (%d keys replayed from %s)",
            number,
            epoch,
            len(shard.store),
            shard.source,
        )
        self.announce()

    def _take(self, number: int, epoch: int) -> Shard | None:
        try:
            return take_shard(
                number,
                epoch,
                None,
                self._durability,
                self._clock,
                self._heartbeat_if_due,
                memory=self._new_memory,
            ).shard
        except (CorruptLog, OwnershipError) as exc:
            log.error("cannot take shard %d: %s", number, exc)
            self.exit_code = EXIT_CORRUPT_LOG
        except (LockTimeout, ShardMoved) as exc:
            log.error("cannot take shard %d now: %s", number, exc)
            return None
        except (DurabilityError, OSError) as exc:
            log.error("cannot take shard %d: %s", number, exc)
            self.exit_code = EXIT_IO_ERROR
        self.stop()
        return None

    def _change_isr(self, action: str, followers: frozenset[str]) -> bool:
        """The Replicator's shrink/expand: asynchronous on the control thread. False (keep
        waiting, ask again later) until etcd confirmed exactly this change."""
        if self._isr_done.get(action) == followers:
            del self._isr_done[action]
            return True
        members = sorted(followers | {self.worker_id})
        self.control.ask(action, self.role_shard, epoch=self.led_epoch, members=members)
        return False

    def _release(self, item: tuple[Link, list[list[bytes]]]) -> None:
        """A held pass's replies, now that the in-sync followers have its records."""
        link, replies = item
        if link.broker not in self.links:
            return  # that broker is gone; its client resends through another
        current = self._socket, self.ledger, self._watch
        self._use(link)
        for frames in replies:
            self._send(frames)
        self._socket, self.ledger, self._watch = current

    def _step_down(self, why: str) -> None:
        if self.role == "standby":
            return
        log.info("no longer %s of shard %s: %s", self.role, self.role_shard, why)
        was_leader = self.role == "leader"
        if self.replicator is not None:
            dropped = self.replicator.drain_held()
            if dropped:
                log.info("%d held replies dropped (the next leader answers)", len(dropped))
            self.replicator = None
        self._drop_follower()
        if self.shard is not None:
            if self.shard.files is not None:
                self.shard.files.tap = None
            self._leave(self.shard, why)
        if self.role == "follower" and self.role_shard is not None:
            self.control.ask("release", self.role_shard)
        self.role, self.role_shard, self.led_epoch = "standby", None, 0
        if was_leader:
            self.announce()

    # --- following --------------------------------------------------------------------------

    def _follow_leader(self, epoch: int, endpoint: str) -> None:
        """Follow the shard's leader at ``endpoint`` in ``epoch`` (again when either changes)."""
        if self._followed == (epoch, endpoint) or self.role_shard is None:
            return
        number = self.role_shard
        if self.follower is None:
            shard = self._take(number, epoch)
            if shard is None or shard.files is None:
                self._step_down("cannot take the shard's files")
                return
            self._follower_socket = FollowerSocket(self._context, self.worker_id, self.config.keys)
            socket = self._follower_socket
            self.follower = Follower(
                number, self.worker_id, shard.files, shard.store, shard.memory, send=socket.send
            )
        assert self._follower_socket is not None
        self._follower_socket.connect(endpoint)
        self.follower.follow(epoch)
        self._followed = (epoch, endpoint)
        log.info("shard %d: following the leader at %s in epoch %d", number, endpoint, epoch)

    def _drop_follower(self) -> None:
        follower, self.follower = self.follower, None
        if follower is not None:
            try:
                follower.close()
            except (DurabilityError, OSError) as exc:
                log.warning("closing the follower's files: %s", exc)
        if self._follower_socket is not None:
            self._follower_socket.socket.close(linger=0)
            self._follower_socket = None
        self._followed = None

    # --- the loop ---------------------------------------------------------------------------

    def _replication_pass(self) -> None:
        extra = []
        if self._leader_socket is not None:
            extra.append(self._leader_socket.socket)
        if self._follower_socket is not None:
            extra.append(self._follower_socket.socket)
        readable = self.links_pass(extra)
        try:
            if self._leader_socket is not None and self._leader_socket.socket in readable:
                if self.replicator is not None:
                    self._leader_socket.drain(self.replicator)
                else:
                    _discard(self._leader_socket.socket)
            if self.replicator is not None:
                self.replicator.tick()
            follower = self.follower
            if follower is not None and self._follower_socket is not None:
                if self._follower_socket.socket in readable:
                    self._follower_socket.drain(follower)
                follower.tick()
        except (ShardMoved, LockTimeout) as exc:
            self._step_down(f"the shard's files: {exc}")
        except DurabilityError as exc:
            log.error("shard %s: %s: stopping", self.role_shard, exc)
            self.exit_code = EXIT_IO_ERROR
            self._step_down(str(exc))
            self.stop()

    def _heartbeat_if_due(self) -> None:
        """During a long replay: heartbeat every broker."""
        now_s = time.monotonic()
        current = self._socket, self.ledger, self._watch
        for link in self.links.values():
            if now_s >= link.next_heartbeat_s:
                self._use(link)
                self._send(encode_control(Heartbeat()))
                link.next_heartbeat_s = now_s + self.config.heartbeat_interval_s
        self._socket, self.ledger, self._watch = current

    def _serve(self, batch: list[Message]) -> None:
        """Serve as the single-host worker does, but only as the leader with a valid lease
        (anything else is answered UNAVAILABLE, not applied: a worker whose lease may have
        lapsed in etcd acknowledges nothing), and with the replies held until the in-sync
        followers have the pass's records."""
        if not batch:
            return
        replicator = self.replicator
        if self.role == "leader" and not self.control.lease_valid():
            self._answer_all(batch, Status.UNAVAILABLE, "this worker's lease lapsed: not applied")
            return
        shard = self.shard
        if replicator is None or shard is None:
            super()._serve(batch)
            return
        if replicator.full:
            self._answer_all(batch, Status.BUSY, "replies wait for the followers: not applied")
            return
        ledger = self.ledger
        if ledger.trackers:
            ledger.settle()
        try:
            answers = shard.handle_batch(batch, None, MAX_REPLY_BYTES - ledger.tracked)
        except ShardMoved as exc:
            batch.clear()
            self._step_down(f"the owner file moved to epoch {exc.found}")
            return
        except OwnershipError as exc:
            log.warning("shard %d: %s: batch of %d refused", shard.number, exc, len(batch))
            self._answer_all(batch, Status.UNAVAILABLE, "owner file unusable now; not applied")
            return
        except (DurabilityError, OSError) as exc:
            batch.clear()
            self._fail_stop(shard, exc)
            return
        batch.clear()
        replies = [
            encode_reply(answer) if isinstance(answer, Reply) else answer
            for answer in answers
            if answer is not None
        ]
        nbytes = sum(len(frame) for frames in replies for frame in frames)
        link = self._current_link()
        if link is not None:
            replicator.hold((link, replies), nbytes)

    def _answer_all(self, batch: list[Message], status: Status, message: str) -> None:
        for dispatch in batch:
            reply = unavailable(dispatch, message)
            if status is not Status.UNAVAILABLE and isinstance(reply, Reply):
                reply = Reply(status, reply.request_id, reply.token, None, reply.body)
            self._send(encode_reply(reply) if isinstance(reply, Reply) else reply)
        batch.clear()

    def _current_link(self) -> Link | None:
        for link in self.links.values():
            if link.socket is self._socket:
                return link
        return None


def _nowhere(follower_id: str, frames: list[bytes]) -> bool:
    return False


def _discard(socket: zmq.Socket) -> None:
    """Messages from followers while this worker leads nothing: read and dropped."""
    for _ in range(256):
        try:
            socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


# --- the entry point ----------------------------------------------------------------------

CONFIG_WAIT_S = 30.0  # how long a worker waits for a broker to write the cluster's config


def cluster_argv(args: argparse.Namespace) -> list[str]:
    """The cluster flags a supervisor passes on to its children (empty on one host)."""
    if not args.coordinator:
        return []
    return [
        "--coordinator",
        ",".join(args.coordinator),
        "--cluster-name",
        args.cluster_name,
        "--replicas",
        str(args.replicas),
        "--host-id",
        args.host_id,
        "--lease-ttl",
        str(args.lease_ttl),
        "--replica-lag",
        repr(args.replica_lag),
        "--advertise",
        args.advertise,
    ]


def run_cluster(config: WorkerConfig, args: argparse.Namespace) -> int:
    """Run one cluster-mode worker in this process until SIGTERM or SIGINT."""
    etcd = Etcd(args.coordinator)
    coordinator = Coordinator(etcd, args.cluster_name)
    try:
        cluster = coordinator.read_config(CONFIG_WAIT_S)
        cluster.check(cluster.shards, args.replicas)
    except (ConfigMissing, ConfigMismatch, EtcdError) as exc:
        log.error("cannot join the cluster: %s", exc)
        return EXIT_CONFIG
    if config.data_dir is None:
        log.error("cluster mode needs a data directory (--in-memory is for one host only)")
        return EXIT_CONFIG
    try:
        member = Member(config.data_dir)
    except (MemberError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    worker_id = f"{args.host_id}-{member.id}"
    info = WorkerInfo(args.host_id, "", True)
    plane = EtcdPlane(coordinator, worker_id, info, cluster, args.lease_ttl)
    worker = ClusterWorker(
        config,
        worker_id,
        Control(plane),
        replication_endpoint=f"tcp://{args.advertise}:0",
        replica_lag_s=args.replica_lag,
    )
    try:
        return run_until_signalled(worker, config)
    finally:
        member.close()
