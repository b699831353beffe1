"""A worker in cluster mode (``--coordinator``): serves every broker, leads or follows by etcd.

What differs from the single-host worker (workers/worker.py), whose machinery it reuses:

* **Every broker.** Brokers register in etcd; the worker keeps a link to each
  (workers/links.py), answering each broker through its own socket, with the shard's
  "newer token" check per broker (each numbers its dispatches on its own).
* **etcd decides the role** (workers/roles.py): a control thread (workers/control.py) keeps
  the lease and reads the cluster's state; each reading names one step (campaign, follow,
  step down), done there as one etcd transaction.
* **Fencing by lease and epoch.** A leader serves only while its lease is valid by its own
  clock (zkv.coordination.Lease: measured from before the last keepalive was sent, with a
  margin), so it stops acknowledging before etcd can give the shard to anyone else. The
  shard's epoch is its leader key's create revision, taken into the owner file too.
* **Replication** (workers/replication.py): a leader's replies wait until every in-sync
  follower has the pass's records.
* **Its id belongs to its data** (workers/member.py): restarted on its disk, a worker is
  still in its shards' in-sync sets.

Log lines that tools parse (as workers/worker.py's)::

    took shard N epoch E (K keys replayed from LOG)
    no longer ROLE of shard N: REASON
"""

from __future__ import annotations

import argparse
import logging
import time

import zmq

from workers.aof import CorruptLog, DurabilityError
from workers.control import Control, EtcdPlane, Outcome
from workers.events import EventPublisher
from workers.links import Link, LinkedWorker
from workers.manifest import ManifestError, bind_cluster, open_manifest
from workers.member import Member, MemberError
from workers.ownership import LockTimeout, OwnershipError
from workers.persist import ShardMoved
from workers.replication import Follower, FollowerSocket, FollowerState, LeaderSocket, Replicator
from workers.roles import next_step
from workers.shard import Message, Shard, take_shard, unavailable
from workers.worker import (
    EXIT_CONFIG,
    EXIT_CORRUPT_LOG,
    EXIT_IO_ERROR,
    WorkerConfig,
    run_until_signalled,
)
from zkv.coordination import ConfigMismatch, ConfigMissing, Coordinator, WorkerInfo
from zkv.etcd import Etcd, EtcdError
from zkv.protocol import (
    MAX_REPLY_BYTES,
    Heartbeat,
    Reply,
    Status,
    encode_control,
    encode_reply,
)

log = logging.getLogger(__name__)

FIRST_VIEW_WAIT_S = 30.0  # how long a starting worker tries to join etcd before giving up
STEP_RETRY_S = 1.0  # a step etcd refused is asked again after this long
FOLLOWER_FAILURES_MAX = 3  # failed writes of a copy (full disk) before a follower gives up
FOLLOW_AGAIN_S = 30.0  # ... and the time before it offers to follow that shard again


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
        self._retry_at: dict[tuple[str, int | None], float] = {}  # failed steps wait

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
            self._start_events()
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
            if self.events is not None:
                self.events.close()
                self.events = None
            if self._own_context:
                self._context.term()

    # --- roles ------------------------------------------------------------------------------

    def _control_pass(self) -> None:
        control = self.control
        self.set_brokers(control.brokers)
        if self.events is not None and control.events_backends != self.events.endpoints:
            self.events.connect(control.events_backends)
        for outcome in control.outcomes():
            if outcome.ok and outcome.action in ("campaign", "follow", "release", "resign"):
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
        elif step.action == "resign" and step.shard is not None:
            epoch = view.leaders[step.shard].epoch
            if self._may_ask(step.action, step.shard):
                log.info("shard %d: resigning epoch %d: %s", step.shard, epoch, step.why)
                control.ask("resign", step.shard, epoch=epoch)
        elif step.action in ("campaign", "follow") and self._may_ask(step.action, step.shard):
            control.ask(step.action, step.shard)

    def _may_ask(self, action: str, shard: int | None) -> bool:
        """Whether a step may be asked of etcd now: one that failed is asked again only after
        STEP_RETRY_S (a refused campaign was retried 30 to 50 times a second)."""
        return time.monotonic() >= self._retry_at.get((action, shard), 0.0)

    def _on_outcome(self, outcome: Outcome) -> None:
        if not outcome.ok:
            self._retry_at[(outcome.action, outcome.shard)] = time.monotonic() + STEP_RETRY_S
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
        promoted = self._promote(number, epoch) if was_follower else None
        self._drop_follower(close_files=promoted is None)
        if self.shard is not None and self.shard.number != number:
            self._leave(self.shard, f"leading shard {number} instead")
        if was_follower:  # its follower slot would count as one of its own followers
            self.control.ask("release", number)
        shard = promoted if promoted is not None else self._take(number, epoch)
        if shard is None:
            return
        shard.shards = self.shards  # a fenced write checks its own shard's locks exactly
        self.shard = shard
        self._arm_events(shard)
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
            "memory" if promoted is not None else shard.source,
        )
        self.announce()

    def _promote(self, number: int, epoch: int) -> Shard | None:
        """A follower in sync becomes the leader of its shard with what it holds: its store,
        memory and open log, the owner file taken with the new epoch. No replay: a failover
        under load took a replay of the whole shard longer than requests wait (a hostile
        test, 282,000 keys: 5 to 6 s). None if it holds no synced copy of ``number``."""
        follower = self.follower
        if (
            follower is None
            or follower.shard != number
            or follower.state is not FollowerState.SYNCED
        ):
            return None
        files = follower.files
        try:
            files.take(epoch)
        except (LockTimeout, OwnershipError, OSError) as exc:
            log.warning("shard %d: cannot promote the follower's copy (%s): replaying", number, exc)
            return None
        shard = Shard(
            number, follower.store, 0, memory=follower.memory, files=files, epoch=files.epoch
        )
        shard.progress = self._heartbeat_if_due
        return shard

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
        link, replies, events = item
        if events:  # the records are on the in-sync followers: the changes are durable
            self._publish_held(events)
        if self.links.get(link.broker) is not link:
            return  # that broker (or that connection to it) is gone; the client resends
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
        if was_leader and self.role_shard is not None:
            # Its key lives on while its lease does (a stall, a restart of etcd): delete it,
            # fenced by the epoch, so the shard gets a leader now, not when the process dies.
            self.control.ask("resign", self.role_shard, epoch=self.led_epoch)
        if self.replicator is not None:
            dropped = self.replicator.drain_held()
            if dropped:
                log.info("%d held replies dropped (the next leader answers)", len(dropped))
                # Their changes may or may not survive: a gap in the stream says so.
                self._skip_events(sum(len(events or ()) for _, _, events in dropped))
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
                number,
                self.worker_id,
                shard.files,
                shard.store,
                shard.memory,
                send=socket.send,
                progress=self._heartbeat_if_due,  # a snapshot's install replays the shard
            )
        assert self._follower_socket is not None
        self._follower_socket.connect(endpoint)
        self.follower.follow(epoch)
        self._followed = (epoch, endpoint)
        log.info("shard %d: following the leader at %s in epoch %d", number, endpoint, epoch)

    def _drop_follower(self, close_files: bool = True) -> None:
        """Stop following: the follower's socket, and its files unless they were promoted."""
        follower, self.follower = self.follower, None
        if follower is not None:
            try:
                follower.close()
                if close_files:
                    follower.files.close(sync=False)
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
                if follower.failures >= FOLLOWER_FAILURES_MAX:
                    # A full or failing disk: give the slot to a standby that can hold a copy,
                    # rather than keep it and retry for ever (a hostile test, 2026-12-07).
                    shard = follower.shard
                    self._step_down(f"{follower.failures} failed writes of the shard's copy")
                    self._retry_at[("follow", shard)] = time.monotonic() + FOLLOW_AGAIN_S
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
        # The pass's events wait with its replies (published by _release), so that neither an
        # expiry pass nor a later batch sends them before the followers have the records.
        events = shard.events if self.events is not None else None
        if events:
            shard.events = []
        replies = [
            encode_reply(answer) if isinstance(answer, Reply) else answer
            for answer in answers
            if answer is not None
        ]
        nbytes = sum(len(frame) for frames in replies for frame in frames)
        link = self._current_link()
        if link is not None:
            replicator.hold((link, replies, events or None), nbytes)
        elif events:
            self._skip_events(len(events))

    def _start_events(self) -> None:
        """The events socket, connected to no broker yet: _control_pass connects it to the
        events backends the brokers registered in etcd (the flag only turns events on)."""
        if self.config.events_backend is not None:
            self.events = EventPublisher(self._context, [], self._curve)

    def _publish_held(self, events: list[tuple[int, bytes, int, int]]) -> None:
        """Publish a released pass's events (taken from the shard when it was held)."""
        shard = self.shard
        if self.events is not None and shard is not None:
            self.events.publish(shard.number, shard.epoch, events)

    def _skip_events(self, count: int) -> None:
        """Number ``count`` events that will never be sent, so subscribers see the gap."""
        shard = self.shard
        if self.events is not None and shard is not None and count:
            self.events.sequencer.take(shard.number, shard.epoch, count)

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
        member = Member(config.data_dir, args.host_id)
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
