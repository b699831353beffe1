"""The worker service: one DEALER socket to the broker's backend, one shard, one loop.

Lifecycle of a worker (the broker decides everything; the worker follows)::

    REGISTERING  READY sent (claiming the shard it holds, if any), no ASSIGN yet
    STANDBY      ASSIGN with no shard: holds nothing, answers dispatches with UNAVAILABLE
    TAKING       ASSIGN of shard N: claims N's owner file with a newer epoch, replays N's log
    SERVING      applies batches of dispatches to shard N, each fenced by the owner file
    STOPPING     stop flag set: answers what is already queued, fsyncs, sends DISCONNECT, exits

From any state, silence from the broker for ``liveness * interval`` means the broker is gone or
restarted: the worker drops its socket (and whatever was queued in it), opens a new one and
sends READY again, claiming the shard whose data it still holds, so a restarted broker can give
each shard back to the worker that has its data. A DISCONNECT from the broker ("I do not know
you": it restarted) makes it send READY at once instead. A batch that finds a newer epoch in the
owner file means the shard moved while this worker was paused: it answers the batch UNAVAILABLE,
drops the shard and registers again as a new worker.

Each pass of the loop: poll with a timeout that ends when the next timer is due, receive up to
MAX_MESSAGES_PER_PASS messages (or MAX_REQUESTS_PER_PASS requests, counting each request of a
BATCH_DISPATCH), gather the dispatches into one batch, serve the batch (one
append and at most one fsync for all of it, then all its replies), then always run the timers
(expiry, fsync, compaction, heartbeat, broker liveness), whatever arrived or not. A control
message that changes what the worker holds (ASSIGN, DISCONNECT) first serves the dispatches
received before it, so every request is served by the shard it was sent to.

Log lines that tools parse (keep them exactly):

    took shard N epoch E (K keys replayed from LOG)     LOG: the log's path, or "memory"
    left shard N epoch E: REASON
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import zmq
from zmq.backend import zmq_poll

from workers.aof import CorruptLog, DurabilityError, FsyncPolicy
from workers.events import EventPublisher
from workers.figures import WorkerCounters, figures
from workers.handshake import HandshakeWatch
from workers.idempotency import RequestMemory, keep_ms
from workers.manifest import Manifest, ManifestError, bind_shards, open_manifest
from workers.ownership import LockTimeout, OwnershipError, reportable
from workers.persist import Durability, ShardMoved
from workers.shard import Message, Shard, take_shard, unavailable
from workers.store import Clock, wall_clock_ms
from zkv import defaults
from zkv.keys import Keys
from zkv.logs import LogLimiter
from zkv.protocol import (
    MAX_REPLY_BYTES,
    Assign,
    Disconnect,
    Dispatch,
    DispatchBatch,
    Heartbeat,
    ProtocolError,
    Ready,
    Reply,
    Status,
    decode_from_broker,
    dispatch_token,
    encode_control,
    encode_reply,
    encode_report,
    peek_keyed_dispatch,
)
from zkv.zmqio import POLLIN, SendLedger, recv_frames, send_counted

log = logging.getLogger(__name__)
peer_log = LogLimiter(log)  # lines the broker's messages can cause, rate-limited
# A failed handshake repeats (ZeroMQ retries within 100 ms, the worker re-registers every
# liveness * interval): one ERROR line per HANDSHAKE_LOG_WINDOW_S, with a count of the rest.
HANDSHAKE_LOG_WINDOW_S = 10.0
handshake_log = LogLimiter(log, window_s=HANDSHAKE_LOG_WINDOW_S, burst=1)

ROUTING_ID_RANDOM_BYTES = 16  # of os.urandom in a worker's routing id
SOCKET_HWM = 100_000  # messages queued to or from the broker before ZeroMQ pushes back
# One expiry pass removes at most this many keys (and takes at most EXPIRE_BUDGET_S), so a
# request never waits behind a long sweep; a backlog drains over consecutive passes.
# bench/expiry_wave.py, 1,000,000 keys due in one second, GET p99 in the wave over baseline: 1000
# keys a pass gave 1.9x, 250 gave 1.4-1.7x (once 2.4x), 100 gave 1.3x and 1.4x; the last key
# went 50-165 ms after its deadline with each (passes run back to back while a backlog remains).
EXPIRE_MAX_KEYS_PER_PASS = 100
# Messages received per pass before the batch is served and the timers run again: the most
# requests that share one fsync, and the bound that keeps a flood from starving heartbeats.
MAX_MESSAGES_PER_PASS = 256
# ... and requests per pass: a BATCH_DISPATCH carries up to thousands, so the pass also ends
# once this many are gathered, keeping a group commit (and the wait for its replies) short.
MAX_REQUESTS_PER_PASS = 8192
# The longest single poll: bounds how long a stop flag set by a signal handler or another
# thread waits to be seen (pyzmq resumes an interrupted poll after running the handler).
MAX_POLL_S = 0.1
# On stop, how long to keep answering requests already queued before saying goodbye.
DRAIN_MAX_S = 0.2

EXIT_OK = 0
EXIT_IO_ERROR = 1  # a write or fsync failed: memory may be ahead of the disk
EXIT_CONFIG = 2  # the data directory is not this cluster's (manifest): restarting cannot help
EXIT_CORRUPT_LOG = 3  # a shard's log or owner file is damaged: a person must repair it


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything a worker needs to know.

    Attributes:
        backend: the broker's backend endpoint to connect to.
        data_dir: where shards are stored (``shard-<n>/`` inside); None keeps them in memory
            only, a pure cache: no files, no locks, nothing survives the process.
        fsync: when appends are forced to disk.
        heartbeat_interval_s: how often to send HEARTBEAT.
        heartbeat_liveness: intervals of silence from the broker before re-registering.
        expire_cycle_s: how often to run an expiry pass when there is no backlog.
        expire_budget_s: the most time one expiry pass may take.
        expire_max_keys: the most keys one expiry pass may remove.
        keys: the cluster's keys (zkv/keys.py): the worker proves it holds the workers' secret
            key and checks the broker's public key; None connects without CURVE.
        idempotency_window_s: how long each shard remembers writes, and how old a stamped
            retry may be (workers/idempotency.py).
        idempotency_max_bytes: the bound of each shard's memory of writes (estimated bytes).
        events_backend: the broker's events backend to publish change events to
            (workers/events.py); None publishes none (the shard keeps no event list).
    """

    backend: str = defaults.BACKEND
    data_dir: Path | None = None
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS
    disk_reserve_bytes: int = defaults.DISK_RESERVE_BYTES
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = defaults.HEARTBEAT_LIVENESS
    expire_cycle_s: float = defaults.EXPIRE_CYCLE_S
    expire_budget_s: float = defaults.EXPIRE_BUDGET_S
    expire_max_keys: int = EXPIRE_MAX_KEYS_PER_PASS
    keys: Keys | None = None  # the cluster's CURVE keys; None: plain TCP (--insecure)
    idempotency_window_s: float = defaults.IDEMPOTENCY_WINDOW_S
    idempotency_max_bytes: int = defaults.IDEMPOTENCY_MAX_BYTES
    events_backend: str | None = None


class Worker:
    """A shard worker. Call :meth:`run` from the thread that will own the socket.

    Args:
        config: endpoints and timings.
        context: the ZeroMQ context; a private one (terminated by :meth:`run`) if None.
        clock: the wall clock for key deadlines (Unix ms); injected for tests.
        durability: overrides the storage built from ``config`` (tests inject fake fsyncs).
    """

    def __init__(
        self,
        config: WorkerConfig,
        context: zmq.Context | None = None,
        clock: Clock = wall_clock_ms,
        durability: Durability | None = None,
    ) -> None:
        self.config = config
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._clock = clock
        if durability is None and config.data_dir is not None:
            durability = Durability(
                config.data_dir, config.fsync, reserve_bytes=config.disk_reserve_bytes
            )
        self._durability = durability
        self._manifest: Manifest | None = None  # the data directory's, read by run()
        self._stop = threading.Event()
        self._socket: zmq.Socket | None = None
        # What this worker sent to the broker that libzmq may still hold (a fresh one with
        # each socket): replies are built while the last ones are still being encrypted and
        # sent, so GETs are given a budget of MAX_REPLY_BYTES less these bytes (see _serve).
        self.ledger = SendLedger()
        self.shard: Shard | None = None
        self.shards = 0
        self.exit_code = EXIT_OK
        # The largest token or epoch of shards this worker let go of, reported in READY so a
        # restarted broker issues numbers above it.
        self._last_token = 0
        # Unguessable (whoever knows a routing id can take over its route) and logged only as
        # a hash (zkv.logs.peer); a leading 0 byte is reserved by ZeroMQ, hence the "w".
        self.identity = b"w" + os.urandom(ROUTING_ID_RANDOM_BYTES)
        self._curve = (
            None if config.keys is None else (config.keys.worker(), config.keys.broker().public)
        )
        # The socket's handshake monitor (workers/handshake.py), what zmq_poll watches (the
        # monitor too until a handshake succeeded), and what the monitor said on this socket.
        self._watch: HandshakeWatch | None = None
        self._polled: list[tuple[zmq.Socket, int]] = []
        self._socket_polled: list[tuple[zmq.Socket, int]] = []
        self._handshake_ok = False
        self._handshake_failed = False
        self._ever_registered = False
        self._silence_limit_s = config.heartbeat_interval_s * config.heartbeat_liveness
        # When the READY that has no ASSIGN yet left, and how long a DISCONNECT is taken as
        # already answered by it (see _on_message).
        self._ready_sent_s: float | None = None
        self._ready_again_s = config.heartbeat_interval_s
        # Timers, in time.monotonic() seconds.
        self._last_heard_s = 0.0
        self._next_heartbeat_s = 0.0
        self._next_expire_s = 0.0
        self.counters = WorkerCounters()  # for the REPORT sent with each heartbeat
        # Change events (workers/events.py): made by run() when config.events_backend is set.
        self.events: EventPublisher | None = None

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the loop to finish; safe from a signal handler or another thread."""
        self._stop.set()

    def run(self) -> int:
        """Serve until :meth:`stop`, then fsync and send DISCONNECT so the broker frees the
        shard at once.

        Returns:
            The process exit code: 0, or EXIT_IO_ERROR / EXIT_CORRUPT_LOG after a failure
            that made the worker stop by itself.

        Raises:
            zmq.ZMQError: the backend endpoint is invalid (raised by the first connect).
        """
        try:
            if self._durability is not None:
                try:
                    self._manifest = open_manifest(
                        self._durability.data_dir, self._durability.fsync
                    )
                except (ManifestError, OSError) as exc:
                    log.error("cannot use data directory %s: %s", self._durability.data_dir, exc)
                    return EXIT_CONFIG
            keys = self.config.keys
            log.info(
                "connecting to the broker at %s (%s)",
                self.config.backend,
                "without CURVE" if keys is None else f"CURVE, keys {keys.directory}",
            )
            self._start_events()
            self._register()
            while not self._stop.is_set():
                self._pass()
            answered = self._drain()
            held = self.shard
            if held is not None:
                self._leave(held, "stopping")
            self._send(encode_control(Disconnect()))
            log.info(
                "stopped: answered %d queued message(s), sent DISCONNECT%s",
                answered,
                "" if held is None else f" for shard {held.number}",
            )
            return self.exit_code
        finally:
            if self.shard is not None:  # an exception escaped: still close the files
                self.shard.close(sync=False)
                self.shard = None
            self._close()
            if self.events is not None:
                self.events.close()
                self.events = None
            if self._own_context:
                self._context.term()

    # --- events -----------------------------------------------------------------------------

    def _start_events(self) -> None:
        """Open the events socket (workers/events.py) if the config names a backend."""
        backend = self.config.events_backend
        if backend is None:
            return
        self.events = EventPublisher(self._context, [backend], self._curve)

    def _arm_events(self, shard: Shard) -> None:
        """Make ``shard`` record its changes (Shard.events) if this worker publishes them."""
        if self.events is not None:
            shard.events = []

    def _publish(self, shard: Shard | None) -> None:
        """Send the changes ``shard`` recorded since the last call (after their replies)."""
        events = self.events
        if events is None or shard is None:
            return
        pending = shard.events
        if pending:
            events.publish(shard.number, shard.epoch, pending)

    def _expire_due_s(self, now_s: float) -> float:
        """When the next expiry pass is due (monotonic s): the cycle's time, or earlier if a
        key's deadline comes first, so that a key is removed (and its expire event sent) at
        its deadline rather than up to a cycle late. Once a pass; store.next_deadline_ms is a
        peek at the index's heap."""
        due_s = self._next_expire_s
        shard = self.shard
        if shard is not None and due_s > now_s:
            deadline_ms = shard.store.next_deadline_ms()
            if deadline_ms is not None:
                due_s = min(due_s, now_s + max(deadline_ms - self._clock(), 0) / 1000)
                self._next_expire_s = due_s
        return due_s

    # --- the loop ---------------------------------------------------------------------------

    def _pass(self) -> None:
        socket = self._connected()
        now_s = time.monotonic()
        next_due_s = min(
            self._next_heartbeat_s,
            self._expire_due_s(now_s),
            self._last_heard_s + self._silence_limit_s,
        )
        timeout_s = min(max(next_due_s - now_s, 0.0), MAX_POLL_S)
        # zmq_poll on a prebuilt list, the socket first: socket.poll builds a zmq.Poller per
        # call. Until the handshake succeeded the list holds the monitor too (_on_handshake).
        ready = zmq_poll(self._polled, math.ceil(timeout_s * 1000))
        if ready and ready[-1][0] is not socket:
            self._on_handshake()
        if ready and ready[0][0] is socket:
            self._serve(self._gather(socket, self._socket_polled))
        self._run_timers()

    def _gather(self, socket: zmq.Socket, polled: list[tuple[zmq.Socket, int]]) -> list[Message]:
        """The dispatches of one pass from ``socket`` (readable): up to MAX_MESSAGES_PER_PASS
        messages or MAX_REQUESTS_PER_PASS requests; notes the broker heard in
        ``_last_heard_s``. Control messages are handled as they come (see _on_message)."""
        batch: list[Message] = []
        requests = 0
        received = 0
        while received < MAX_MESSAGES_PER_PASS:
            # Is another message there? After the first, ask zmq_poll (1 us) before a
            # receive that may raise zmq.Again (5 us of pyzmq exception machinery): one
            # request at a time, every pass would otherwise end with an Again. Once a
            # second message came, the socket is busy and receiving until Again is cheaper.
            if received == 1 and not zmq_poll(polled, 0):
                break
            try:
                frames = recv_frames(socket)
            except zmq.Again:
                break
            received += 1
            self._last_heard_s = time.monotonic()
            self._on_message(frames, batch)
            if batch:
                last = batch[-1]
                requests += len(last.ops) if isinstance(last, DispatchBatch) else 1
                if requests >= MAX_REQUESTS_PER_PASS:
                    break
        return batch

    def _on_message(self, frames: Sequence[bytes], batch: list[Message]) -> None:
        """Decode one message: a dispatch joins ``batch``; anything that changes what the
        worker holds first serves the batch gathered so far."""
        keyed = peek_keyed_dispatch(frames)
        if keyed is not None:  # a lone GET, SET or DEL: the common message, and no objects
            batch.append(keyed)
            return
        try:
            message = decode_from_broker(frames)
        except ProtocolError as exc:
            peer_log.warning("bad message", "dropped a malformed message from the broker: %s", exc)
            token = dispatch_token(frames)
            if exc.request_id or token:
                # A dispatch whose request id or token was readable: the client is waiting for
                # it, and with the token the broker knows at once that nothing was applied
                # (a BATCH_DISPATCH refused whole has no request id to answer by). Replies
                # leave in arrival order, so the batch before it goes first.
                self._serve(batch)
                message = f"malformed request: {exc}".encode()
                self._send(encode_reply(Reply(Status.ERROR, exc.request_id, token, None, message)))
            return
        match message:
            case Dispatch() | DispatchBatch():
                batch.append(message)
            case Assign(shard=shard, shards=shards, epoch=epoch):
                self._serve(batch)
                if self.stopping:
                    # Taking a shard only to leave it would bump its epoch for nothing; the
                    # DISCONNECT about to be sent makes the broker assign it elsewhere.
                    log.info("ignored an ASSIGN of shard %s: stopping", shard)
                    return
                self._on_assign(shard, shards, epoch)
            case Disconnect():
                self._serve(batch)
                # Every message the broker got from us after it forgot us (replies, heartbeats
                # queued behind a large reply) earns a DISCONNECT; one READY answers them all.
                # Sending one each made the broker re-register us as many times, sending our
                # requests round again each time. A READY still unanswered after a heartbeat
                # interval is sent again, in case it was lost.
                sent_s = self._ready_sent_s
                if sent_s is not None and time.monotonic() - sent_s < self._ready_again_s:
                    return
                log.info("the broker does not know this worker (it restarted): sending READY")
                self._send_ready()
            case Heartbeat():
                pass  # liveness was noted when the message arrived, whatever it was

    def _serve(self, batch: list[Message]) -> None:
        """Serve and answer a batch of dispatches (then empty it): a REPLY per DISPATCH, a
        BATCH_REPLY per BATCH_DISPATCH, in the order they came; or, for a shard this worker
        does not hold (any more), hand them back to the broker (:meth:`_reroute`)."""
        if not batch:
            return
        shard = self.shard
        if shard is None and not self.stopping:
            self._reroute(batch, "no shard assigned")
            return
        if shard is None:  # stopping: the DISCONNECT that follows hands the rest back
            replies = [unavailable(d, "no shard assigned") for d in batch]
        else:
            ledger = self.ledger
            if ledger.trackers:
                ledger.settle()
            try:
                replies = shard.handle_batch(batch, self._send, MAX_REPLY_BYTES - ledger.tracked)
            except ShardMoved as exc:
                self._moved(shard, exc)
                self._reroute(batch, f"shard {shard.number} moved to a newer owner")
                return
            except OwnershipError as exc:
                log.warning("shard %d: %s: batch of %d refused", shard.number, exc, len(batch))
                message = f"shard {shard.number}: owner file unusable now; nothing applied"
                replies = [unavailable(d, message) for d in batch]
            except (DurabilityError, OSError) as exc:  # OSError: flock or pread failed
                batch.clear()
                self._fail_stop(shard, exc)
                return
        batch.clear()
        for reply in replies:
            if reply is None:
                continue  # a GET answered before the batch's write and fsync
            self._send(encode_reply(reply) if isinstance(reply, Reply) else reply)
        self._publish(shard)

    def _moved(self, shard: Shard, exc: ShardMoved) -> None:
        """A newer owner has the shard: drop it, write nothing more, register as new."""
        self._leave(shard, f"moved to a newer owner (epoch {exc.found})", sync=False)
        self._send_ready()

    def _reroute(self, batch: list[Message], why: str) -> None:
        """Dispatches for a shard this worker does not hold (the broker's view of it is
        stale): none is applied, and none is answered. An answer (UNAVAILABLE) would fail
        them, as "outcome unknown" if an earlier worker had them; instead the READY that
        tells the broker what this worker holds makes it take back every dispatch it had
        sent here and route them to the shard's owner (a worker registering again loses its
        flights to the shard's queue, protocol.md section 5)."""
        count = len(batch)
        batch.clear()
        peer_log.warning(
            "rerouted",
            "%d dispatch(es) for a shard this worker does not hold (%s): not applied, handed "
            "back to the broker",
            count,
            why,
        )
        sent_s = self._ready_sent_s
        if sent_s is None or time.monotonic() - sent_s >= self._ready_again_s:
            self._send_ready()

    def _fail_stop(self, shard: Shard, exc: Exception) -> None:
        """A write or fsync failed: memory may be ahead of the disk, so serve nothing more.

        The requests of the failed batch get no reply. After DISCONNECT the broker sends them
        to the shard's next owner, which replays the log: a write whose record reached it is
        answered from the idempotency memory, any other is applied then, once.
        """
        self._leave(shard, f"I/O error: {exc}", sync=False)
        log.error("stopping: shard %d can no longer be written safely", shard.number)
        self.exit_code = EXIT_IO_ERROR
        self.stop()

    def _on_assign(self, number: int | None, shards: int, epoch: int) -> None:
        self._ready_sent_s = None
        if not self._shards_match(shards):
            return
        self.shards = shards
        held = self.shard
        if number is None:
            if held is None:
                # ASSIGN carries no reason (the broker logs it): say what the reason can be.
                log.info(
                    "standby: the broker has no shard for this worker yet (%s; the broker's "
                    'log says why, "may own no shard")',
                    "every shard has an owner, or this worker keeps data in memory and the "
                    "cluster's shards are durable"
                    if self._manifest is None
                    else "every shard has an owner, or this worker's data directory is not "
                    "the cluster's",
                )
            else:
                # Serving our copy later could return data that is no longer current.
                self._leave(held, "the broker gave it to another worker")
            return
        if held is not None and held.number != number:
            self._leave(held, f"assigned shard {number} instead")
            held = None
        try:
            takeover = take_shard(
                number,
                epoch,
                held,
                self._durability,
                self._clock,
                self._heartbeat_if_due,
                memory=self._new_memory,
            )
        except CorruptLog as exc:
            log.error("cannot take shard %d: %s", number, exc)
            self._forget(held)
            self.exit_code = EXIT_CORRUPT_LOG
            self.stop()
            return
        except (LockTimeout, ShardMoved) as exc:
            # Passing: a stopped process holds the lock, or a newer owner came during the
            # replay. The broker assigns again; a lock wait of seconds paces the retries.
            log.error("cannot take shard %d now: %s; registering again", number, exc)
            self._forget(held)
            self._send_ready()
            return
        except OwnershipError as exc:
            # A damaged owner file: retrying cannot help, a person must look (see the message).
            log.error("cannot take shard %d: %s", number, exc)
            self._forget(held)
            self.exit_code = EXIT_CORRUPT_LOG
            self.stop()
            return
        except (DurabilityError, OSError) as exc:
            log.error("cannot take shard %d: %s", number, exc)
            self._forget(held)
            self.exit_code = EXIT_IO_ERROR
            self.stop()
            return
        shard = takeover.shard
        shard.shards = shards  # a fenced write checks its own shard's locks exactly
        self.shard = shard
        self._arm_events(shard)
        log.info(
            "took shard %d epoch %d (%d keys replayed from %s)",
            number,
            shard.epoch,
            len(shard.store),
            "memory" if takeover.kept else shard.source,
        )

    def _shards_match(self, shards: int) -> bool:
        """Whether the broker's shard count is the data directory's (recorded the first time).
        If not, serving would look for keys in the wrong shards: stop with EXIT_CONFIG."""
        manifest = self._manifest
        durability = self._durability
        if manifest is None or durability is None:
            return True
        try:
            self._manifest = bind_shards(durability.data_dir, manifest, shards, durability.fsync)
            return True
        except (ManifestError, OSError) as exc:
            log.error("refusing the broker's assignment: %s", exc)
        self.exit_code = EXIT_CONFIG
        self.stop()
        return False

    def _leave(self, shard: Shard, reason: str, sync: bool = True) -> None:
        """Let go of ``shard``: close its files (fsync first unless ``sync`` is False)."""
        self.shard = None
        self._last_token = max(self._last_token, shard.last_token, shard.epoch)
        try:
            shard.close(sync)
        except DurabilityError as exc:
            log.error("shard %d: final fsync failed: %s", shard.number, exc)
            self.exit_code = EXIT_IO_ERROR
        log.info("left shard %d epoch %d: %s", shard.number, shard.epoch, reason)

    def _forget(self, held: Shard | None) -> None:
        """After a failed takeover: the shard held before (if any) is gone too; its files
        are closed without an fsync (its data may be half replaced)."""
        self.shard = None
        if held is not None:
            self._last_token = max(self._last_token, held.last_token, held.epoch)
            try:
                held.close(sync=False)
            except OSError as exc:
                log.warning("shard %d: closing its files: %s", held.number, exc)
            log.info("left shard %d epoch %d: takeover failed", held.number, held.epoch)

    # --- timers -----------------------------------------------------------------------------

    def _run_timers(self) -> None:
        shard = self.shard
        if shard is not None:
            try:
                shard.tick()
                self._publish(shard)  # keys a tick() removed, if it did
            except ShardMoved as exc:
                self._moved(shard, exc)
            except OwnershipError as exc:
                log.warning("shard %d: timers skipped: %s", shard.number, exc)
            except (DurabilityError, OSError) as exc:
                self._fail_stop(shard, exc)
        now_s = time.monotonic()
        if now_s >= self._next_expire_s:
            backlog = self._expire_pass()
            # With a backlog the next pass is due at once: the next poll has timeout 0, so
            # queued requests are served between passes but the backlog drains promptly.
            self._next_expire_s = now_s if backlog else now_s + self.config.expire_cycle_s
        if now_s >= self._next_heartbeat_s:
            if self.events is not None:
                self.events.poll_subscriptions()
            self._send(encode_control(Heartbeat()))
            self._report(now_s)
            self._next_heartbeat_s = now_s + self.config.heartbeat_interval_s
            if self._handshake_ok:
                self._on_handshake()  # a reconnection of this socket handshakes again
        silent_s = now_s - self._last_heard_s
        if silent_s >= self._silence_limit_s and self._input_waiting():
            # Not silence: this loop was busy (an undo replay on a full disk, a long batch)
            # while the broker's messages queued up. Reconnecting would drop them all.
            self._last_heard_s = now_s
            silent_s = 0.0
        if silent_s >= self._silence_limit_s and self._handshake_failed:
            self._register()  # the handshake's ERROR line said why; a new socket tries again
        elif silent_s >= self._silence_limit_s:
            self.counters.broker_silences += 1
            held = self.shard
            log.warning(
                "no word from the broker at %s for %.2f s: reconnecting, claiming %s",
                self.config.backend,
                silent_s,
                "nothing"
                if held is None
                else f"shard {held.number} ({len(held.store)} keys, last token {held.last_token})",
            )
            self._register()

    def _report(self, now_s: float) -> None:
        """Send the REPORT that goes with each heartbeat; a report that cannot be made is
        logged and skipped (it is for watching, never a reason to stop serving)."""
        try:
            frames = encode_report(figures(self.shard, self.counters, now_s))
        except (ProtocolError, ValueError, TypeError) as exc:
            peer_log.warning("report", "no REPORT sent: %s", exc)
            return
        self._send(frames)

    def _new_memory(self) -> RequestMemory:
        """A shard's empty idempotency memory, with this worker's window and bound."""
        config = self.config
        return RequestMemory(keep_ms(config.idempotency_window_s), config.idempotency_max_bytes)

    def _heartbeat_if_due(self) -> None:
        """Heartbeat from inside a long step (a replay), so the broker does not count a
        worker that is busy taking over as dead."""
        now_s = time.monotonic()
        if now_s >= self._next_heartbeat_s:
            self._send(encode_control(Heartbeat()))
            self._next_heartbeat_s = now_s + self.config.heartbeat_interval_s

    def _expire_pass(self) -> bool:
        """One bounded expiry pass. Returns True if expired keys remain (a backlog)."""
        if self.shard is None:
            return False
        store = self.shard.store
        self.shard.expired += store.expire(self.config.expire_max_keys, self.config.expire_budget_s)
        self._publish(self.shard)  # the expire events of this pass
        next_deadline_ms = store.next_deadline_ms()
        return next_deadline_ms is not None and next_deadline_ms <= self._clock()

    # --- socket -----------------------------------------------------------------------------

    def _register(self) -> None:
        """Open a fresh socket and send READY claiming the shard held, if any.

        A fresh socket (the guide's Lazy Pirate) discards whatever was queued for a broker
        that is gone. It keeps this process's routing id: the broker's backend has
        ROUTER_HANDOVER set, so if the broker is in fact alive (the silence was ours, a long
        pause), the new connection takes over the old route and the worker gets its own shard
        back instead of competing with its former self for it.
        """
        self._close()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.identity)
        keys_dir = None if self.config.keys is None else self.config.keys.directory
        watch = HandshakeWatch(socket, self.config.backend, keys_dir)
        if self._curve is not None:
            pair, server_key = self._curve
            socket.curve_secretkey = pair.secret
            socket.curve_publickey = pair.public
            socket.curve_serverkey = server_key
        # As deep as the broker's queues: with ZeroMQ's default of 1,000, replies to a deep
        # pipeline were dropped here and their clients waited for the broker's timeout.
        socket.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        socket.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        try:
            socket.connect(self.config.backend)
        except zmq.ZMQError:
            watch.close()
            socket.close(linger=0)
            raise
        self._socket = socket
        self.ledger = SendLedger()  # the old socket's queue was dropped with it (LINGER 0)
        self._watch = watch
        self._socket_polled = [(socket, POLLIN)]
        self._polled = [(socket, POLLIN), (watch.monitor, POLLIN)]
        self._handshake_ok = False
        self._handshake_failed = False
        now_s = time.monotonic()
        self._last_heard_s = now_s
        self._next_heartbeat_s = now_s + self.config.heartbeat_interval_s
        self._next_expire_s = min(self._next_expire_s, now_s + self.config.expire_cycle_s)
        self._send_ready()

    def _input_waiting(self) -> bool:
        """Whether a message from the broker waits in the socket, unread."""
        socket = self._socket
        if socket is None:
            return False
        try:
            return bool(socket.get(zmq.EVENTS) & zmq.POLLIN)
        except zmq.ZMQError:
            return False

    def _send_ready(self) -> None:
        """READY claiming the shard held, if any. ``last_token`` is the largest token or
        ownership epoch this worker knows of, so a restarted broker issues numbers above both
        (the broker raises its token epoch past it)."""
        held = self.shard
        manifest = self._manifest
        durable = manifest is not None
        cluster = 0 if manifest is None else manifest.cluster
        if held is None:
            ready = Ready(None, reportable(self._last_token), durable, cluster)
        else:
            last_token = max(self._last_token, held.last_token, held.epoch)
            ready = Ready(held.number, reportable(last_token), durable, cluster)
        self._send(encode_control(ready))
        self._ready_sent_s = time.monotonic()

    def _send(self, frames: Sequence[bytes]) -> None:
        """Send without ever blocking the loop: if the queue to an absent broker is full,
        drop the message (the request times out at the broker, as it would anyway).

        Through zkv.zmqio.send_counted: frame by frame with int flags, every byte counted in
        :attr:`ledger` until libzmq is done with it.
        """
        try:
            send_counted(self._connected(), frames, self.ledger)
        except zmq.Again:
            if not self._handshake_failed:  # else the handshake's ERROR line says why
                peer_log.warning(
                    "queue full", "the queue to the broker is full: dropped an outgoing message"
                )

    def _drain(self) -> int:
        """Answer messages already queued, so their clients need not wait for a timeout."""
        socket = self._connected()
        deadline_s = time.monotonic() + DRAIN_MAX_S
        answered = 0
        batch: list[Message] = []
        while time.monotonic() < deadline_s:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_message(frames, batch)
            answered += 1
            if len(batch) >= MAX_MESSAGES_PER_PASS:
                self._serve(batch)
        self._serve(batch)
        return answered

    def _connected(self) -> zmq.Socket:
        if self._socket is None:
            raise RuntimeError("the worker has no socket: run() was not called")
        return self._socket

    def _on_handshake(self) -> None:
        """Read the socket's handshake events: say once that registering worked, or why the
        broker refuses this worker (an ERROR line, at most one per HANDSHAKE_LOG_WINDOW_S).
        After a success the monitor leaves the poll list: it is read on the heartbeat timer."""
        watch, socket = self._watch, self._socket
        if watch is None or socket is None:
            return
        found = watch.check()
        if found.succeeded and not self._handshake_ok:
            if not self._ever_registered or self._handshake_failed:
                log.info(
                    "registered with the broker at %s, waiting for a shard", self.config.backend
                )
            self._ever_registered = True
            self._handshake_ok, self._handshake_failed = True, False
            self._polled = self._socket_polled
        elif found.failure is not None:
            handshake_log.error("handshake refused", "%s", found.failure)
            self._handshake_ok, self._handshake_failed = False, True
            self._polled = [(socket, POLLIN), (watch.monitor, POLLIN)]

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


def run(config: WorkerConfig) -> int:
    """Run one worker in this process until SIGTERM or SIGINT; returns the exit code.

    The first signal sets the stop flag: the worker answers what is queued, says DISCONNECT
    and exits 0. A second signal exits at once (status 128 + signal number), for a worker
    that does not stop quickly enough.
    """
    return run_until_signalled(Worker(config), config)


def run_until_signalled(worker: Worker, config: WorkerConfig) -> int:
    """Run ``worker`` until SIGTERM or SIGINT (see :func:`run`); returns the exit code."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if worker.stopping:
            log.warning("%s again: exiting at once", name)
            raise SystemExit(128 + signum)
        log.info("%s: stopping", name)
        worker.stop()

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    try:
        return worker.run()
    except zmq.ZMQError as exc:
        log.error("worker failed: %s (backend %s)", exc, config.backend)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
