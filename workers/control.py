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
from collections.abc import Callable
from dataclasses import dataclass

from workers.roles import View

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
    """etcd on a thread of its own. Everything the loop reads is replaced whole (a snapshot),
    so the loop reads it without a lock.

    Args:
        read_view: reads the cluster's state (raises on failure).
        do: carries out one named step; returns its Outcome.
        keepalive: renews the lease; returns the monotonic deadline until which it is valid.
    """

    def __init__(
        self,
        read_view: Callable[[], tuple[View, dict[str, str]]],
        do: Callable[[str, int | None, dict], Outcome],
        keepalive: Callable[[], float],
        lease_interval_s: float,
    ) -> None:
        super().__init__(name="zkv-control", daemon=True)
        self._read_view = read_view
        self._do = do
        self._keepalive = keepalive
        self._lease_interval_s = lease_interval_s
        self._steps: queue.Queue[tuple[str, int | None, dict]] = queue.Queue(MAX_PENDING_STEPS)
        self._outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.view: View | None = None
        self.brokers: dict[str, str] = {}
        self.reachable = True
        self._valid_until = 0.0
        self._pending: set[tuple[str, int | None]] = set()
        self._lock = threading.Lock()

    def lease_valid(self, now_s: float | None = None) -> bool:
        """Whether this worker may still act as what etcd made it: its lease cannot have
        expired in etcd yet (see zkv.coordination.Lease for why the deadline is safe)."""
        return (time.monotonic() if now_s is None else now_s) < self._valid_until

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
        next_lease = 0.0
        next_read = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_lease:
                try:
                    self._valid_until = self._keepalive()
                    next_lease = now + self._lease_interval_s
                except Exception as exc:  # any failure is "not renewed"
                    log.warning("lease keepalive failed: %s", exc)
                    next_lease = now + min(0.5, self._lease_interval_s)
            if now >= next_read:
                try:
                    self.view, self.brokers = self._read_view()
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
                outcome = self._do(action, shard, args)
            except Exception as exc:
                outcome = Outcome(action, shard, False, error=str(exc))
            with self._lock:
                self._pending.discard((action, shard))
            self._outcomes.put(outcome)
            next_read = 0.0  # read again at once: the step changed the state


# --- the worker ---------------------------------------------------------------------------

from workers.aof import CorruptLog, DurabilityError  # noqa: E402
from workers.cluster import LinkedWorker  # noqa: E402
from workers.ownership import OwnershipError  # noqa: E402
from workers.persist import ShardMoved  # noqa: E402
from workers.roles import next_step  # noqa: E402
from workers.shard import Message, take_shard, unavailable  # noqa: E402
from workers.worker import EXIT_CONFIG, EXIT_CORRUPT_LOG, EXIT_IO_ERROR  # noqa: E402
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
        self.control.start()
        try:
            deadline = time.monotonic() + FIRST_VIEW_WAIT_S
            while self.control.view is None and not self.stopping:
                if time.monotonic() > deadline:
                    log.error("no answer from etcd in %.0f s: giving up", FIRST_VIEW_WAIT_S)
                    return EXIT_CONFIG
                time.sleep(0.05)
            while not self.stopping:
                self._control_pass()
                self.links_pass()
            self._step_down("stopping")
            return self.exit_code
        finally:
            self.control.stop()
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
