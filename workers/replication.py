"""Replication of a shard's log, leader -> followers, over ZeroMQ (cluster mode).

Independent of etcd: the caller gives the epoch, the in-sync replica set (ISR) and callbacks,
and wires the callbacks to workers/cluster.py's etcd calls. The frames are zkv/protocol.py's
(FOLLOW, SNAPSHOT, RECORDS, ACK, REFUSE); docs/protocol.md section 7 specifies them, the
exchange, the commit rule and every bound.

Integration API (what a cluster worker loop calls)
--------------------------------------------------
Leader of shard ``n`` in epoch ``E`` (``E`` = its etcd leader key's create_revision)::

    link = LeaderSocket(context, "tcp://<advertise>:<port>", keys)    # ROUTER, CURVE server
    rep = Replicator(n, E, followers=isr_without_me, source=lambda: (shard.store, shard.memory),
                     send=link.send, release=send_reply_frames,
                     shrink=lambda m: etcd_shrink_isr(n, E, {me} | m),   # True once etcd agreed
                     expand=lambda m: etcd_expand_isr(n, E, {me} | m),
                     lease_valid=lambda: time.monotonic() < lease.valid_until(),
                     deposed=on_newer_epoch, lag_s=config.replica_lag_s)
    per pass:   if rep.full: answer the pass BUSY, apply nothing      (bounded held replies)
                answers = shard.handle_batch(batch, early=None)        (never early replies)
                rep.ship(records_appended_by_this_pass)                (skip if none)
                rep.hold(answers_frames, nbytes)                       (tagged with the last seq)
    poll:       link.socket (POLLIN) -> link.drain(rep)
    timers:     rep.tick()   (resends, snapshots, lag -> shrink, catch-up -> expand, release)
    ISR read from etcd changed by someone else: rep.set_followers(members_without_me)
    stepping down: rep.drain_held() -> the replies never released (answer them UNAVAILABLE)

``records_appended_by_this_pass`` are the exact bytes ShardFiles.append wrote (one call per
pass that writes: capture them there, as tests/replicas.py ``tap`` does). Better, call
``rep.ship(data)`` from that tap: the records leave before the leader's own fsync, so the
follower's write and fsync overlap it (bench/replication.py does; safe, since the replies
still wait for both, and a leader that dies before its fsync leaves on a follower only a
write it never acknowledged, which may survive or not like any unacknowledged write). Replies are
released, in order, through ``release(item)`` from inside hold(), drain() or tick(), never
while ``lease_valid()`` is False. ``shrink``/``expand`` are called from tick() only,
synchronously (an etcd transaction with its timeout), with the new set of followers (the
leader not included); a False return keeps everything held and is retried (SHRINK_RETRY_S,
EXPAND_RETRY_S). ``source`` is read when a snapshot starts: the shard's store and memory as
they are after the last pass shipped (Shard replaces them after a full disk's undo).

Follower of shard ``n``, its files taken and replayed (``files``, ``store``, ``memory``)::

    link = FollowerSocket(context, my_id, keys); link.connect(leader_endpoint)
    fol = Follower(n, my_id, files, store, memory, send=link.send)
    fol.follow(E)                   the leader's epoch, from etcd (again whenever it changes;
                                    connect the socket to the new endpoint first)
    poll:   link.socket -> link.drain(fol)
    timers: fol.tick()              (FOLLOW retries, fsync per policy, compaction, expiry)
    becoming leader: Shard(n, fol.store, memory=fol.memory, files=fol.files, ...)  (the store
                     and memory objects change at each snapshot: read them then)

Exceptions out of the follower's calls: ShardMoved/LockTimeout (the owner file), and
DurabilityError (a failed write or fsync of its log: fail-stop, as the worker does).
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from workers import aof
from workers.aof import DurabilityError, NoSpace, TimeRecord
from workers.idempotency import RequestMemory
from workers.persist import ShardFiles, apply_record, compacted_log
from workers.store import HighWaterClock, TTLStore
from zkv.keys import Keys
from zkv.logs import LogLimiter
from zkv.protocol import (
    MAX_RECORD_BYTES,
    MAX_RECORDS_BYTES,
    MAX_SNAPSHOT_CHUNK_BYTES,
    Ack,
    Follow,
    ProtocolError,
    Records,
    Refuse,
    SnapshotChunk,
    decode_to_follower,
    decode_to_leader,
    encode_replication,
)
from zkv.zmqio import recv_bounded, send_frames

log = logging.getLogger(__name__)
peer_log = LogLimiter(log)  # lines a peer's messages can cause, rate-limited

# A follower silent or behind (an unacknowledged batch older than this) is removed from the
# ISR (--replica-lag / ZKV_REPLICA_LAG).
REPLICA_LAG_S = 1.0
# What a leader holds for replies waiting for acks: past either bound, ``full`` is True and
# the loop answers new work BUSY (the bound is checked before a pass, so one pass's replies
# may go past it).
MAX_HELD_BYTES = 64 * 1024 * 1024
MAX_HELD_REPLIES = 100_000
# Records a follower may have to receive (shipped, not acked): past either bound its stream
# stops and it starts over from a new SNAPSHOT.
MAX_FOLLOWER_BYTES = 64 * 1024 * 1024
MAX_FOLLOWER_BATCHES = 100_000
MAX_FOLLOWERS = 8  # followers a leader serves at once (FOLLOWs past it are dropped, logged)
SNAPSHOT_WINDOW_CHUNKS = 8  # snapshot chunks sent and not yet acked: 8 MiB in flight
RESEND_S = 0.5  # a stream that got no ack for this long is sent again from its last ack
SNAPSHOT_STALL_S = 2.0  # a snapshot with no chunk acked for this long starts over
# ... but once every chunk is acked the follower is installing it (a replay of the whole shard:
# seconds for a few hundred thousand keys), so the final ack may take this long.
SNAPSHOT_INSTALL_S = 60.0
# A follower outside the in-sync set not heard from for this long is forgotten (its stream or
# snapshot stops), so dead followers never fill the MAX_FOLLOWERS table.
IDLE_FOLLOWER_S = 10.0
SHRINK_RETRY_S = 0.2  # after a failed shrink (etcd unreachable), the next attempt
EXPAND_RETRY_S = 0.2  # after a failed (or not yet confirmed) expand, the next attempt
LEADER_SILENCE_S = 30.0  # a follower says once that its leader has been silent this long
FOLLOW_RETRY_S = 1.0  # a follower waiting for a snapshot sends FOLLOW again after this long
EXPIRE_KEYS_PER_TICK = 1000  # keys a follower's tick may examine for expiry
SNAPSHOT_FILE = "log.snapshot"  # where a follower writes a snapshot before it replaces its log

# Sockets. The leader's ROUTER takes only FOLLOW, ACK and REFUSE (a few hundred bytes, 2
# frames after the identity); the follower's DEALER takes frames up to one largest record.
HWM = 10_000  # messages queued per peer; the byte bounds above keep well below it
MAX_TO_LEADER_BYTES = 4096
MAX_TO_FOLLOWER_BYTES = MAX_RECORD_BYTES
FOLLOWER_RCVHWM = 1000
DRAIN_MESSAGES = 256  # messages one drain() reads before returning to the loop
# ZMTP heartbeats on the replication connections: a dead peer's connection is closed after
# HEARTBEAT_TIMEOUT_MS without traffic, so its id is free for its reconnection.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


# --- leader -----------------------------------------------------------------------------------


class LinkState(enum.Enum):
    """Where the leader is with one follower."""

    WAITING = "waiting"  # no stream: an ISR member not heard from, or one whose stream broke
    SNAPSHOT = "snapshot"  # sending it a snapshot (then the tail, then STREAMING)
    STREAMING = "streaming"  # it holds the state at ``acked``: batches go out as shipped


@dataclass(slots=True)
class _Batch:
    seq: int
    data: bytes
    shipped_s: float
    end_bytes: int  # bytes shipped in this epoch up to and including this batch


class _SnapshotSource:
    """A compacted log of the shard at ``seq``, cut into chunks of at most a MiB, encoded
    lazily as they are sent (persist.compacted_log over a store snapshot: a dict copy of
    references, taken on the loop as compaction takes it)."""

    def __init__(self, store: TTLStore, memory: RequestMemory, seq: int) -> None:
        self.seq = seq
        self._pieces = compacted_log(store.snapshot(), memory.runs(), store.clock, store.clock())
        self._buffer: deque[memoryview] = deque()
        self._buffered = 0
        self._exhausted = False

    def next_chunk(self) -> tuple[bytes, bool]:
        """The next chunk and whether it is the last."""
        while not self._exhausted and self._buffered <= MAX_SNAPSHOT_CHUNK_BYTES:
            piece = next(self._pieces, None)
            if piece is None:
                self._exhausted = True
            elif piece:
                self._buffer.append(memoryview(piece))
                self._buffered += len(piece)
        parts = []
        need = MAX_SNAPSHOT_CHUNK_BYTES
        while need and self._buffer:
            head = self._buffer[0]
            take = head[:need]
            parts.append(take)
            need -= len(take)
            if len(take) == len(head):
                self._buffer.popleft()
            else:
                self._buffer[0] = head[len(take) :]
        chunk = b"".join(parts)
        self._buffered -= len(chunk)
        return chunk, self._exhausted and not self._buffered


@dataclass(slots=True)
class _Link:
    """The leader's view of one follower."""

    follower_id: str
    state: LinkState = LinkState.WAITING
    acked: int = -1  # newest batch it holds (applied and logged) in this epoch; -1: nothing
    sent: int = -1  # newest batch queued to it in this stream (what it may ack)
    cursor: int = -1  # the batch after which the next RECORDS starts (sent, or lower to resend)
    behind_since_s: float | None = None  # since when it lacks a shipped batch (None: it doesn't)
    progress_s: float = 0.0  # its last ack, or when its stream (re)started
    snapshot: _SnapshotSource | None = None
    chunk_next: int = 0  # the next chunk number to send
    chunk_acked: int = -1  # the newest chunk acked
    chunk_pending: tuple[bytes, bool] | None = None  # a chunk a full socket refused
    snapshot_done: bool = False  # every chunk is sent
    heard_s: float = 0.0  # when a message of this follower last came (monotonic)


class Replicator:
    """The leader's side: numbers shipped batches, streams them to followers, holds replies
    until the ISR has the batches they depend on, and asks to shrink or expand the ISR.

    The commit rule: a reply tagged with batch ``S`` (the last batch shipped when it was held)
    is released once every follower in the ISR has acked ``S`` or later; with no follower in
    the ISR, at once. Batch 0 is the state the leader started the epoch with: a follower holds
    it once its first snapshot is installed, so a read in a new epoch waits for that too (the
    leader's start state may hold writes the previous leader never acknowledged). Replies go
    out in the order they were held, and only while ``lease_valid()``.

    Lag: an ISR follower that lacks a batch shipped more than ``lag_s`` ago (or has no state of
    this epoch for that long) is removed by ``shrink`` FIRST; only when it returned True does
    the commit rule stop waiting for it. A follower outside the ISR that streams without
    lagging joins the commit rule locally, then is proposed to ``expand`` once it holds every
    batch a released reply depended on (see _check_caught_up). An idle shard asks nothing of
    its followers: a dead follower is noticed at the first write it leaves unacked.

    Args:
        shard: the shard number.
        epoch: this leader's epoch (>= 1).
        followers: the ISR without this leader.
        source: the shard's current store and memory (a snapshot is built from them).
        send: queues frames to a follower by id; False if they could not be queued.
        release: takes one held reply out (the loop sends it).
        shrink: given the ISR's new followers (fewer), True once etcd has them.
        expand: given the ISR's new followers (one more), True once etcd has them.
        lease_valid: whether this leader may still acknowledge (its etcd lease holds).
        deposed: called once with a newer epoch a follower reported (a hint from a peer:
            the caller may check etcd; nothing is released or sent any more either way).
        lag_s: see REPLICA_LAG_S.
        monotonic: seconds; tests pass a fake clock.
    """

    def __init__(
        self,
        shard: int,
        epoch: int,
        followers: Sequence[str],
        source: Callable[[], tuple[TTLStore, RequestMemory]],
        send: Callable[[str, list[bytes]], bool],
        release: Callable[[Any], None],
        shrink: Callable[[frozenset[str]], bool],
        expand: Callable[[frozenset[str]], bool],
        lease_valid: Callable[[], bool] = lambda: True,
        deposed: Callable[[int], None] | None = None,
        lag_s: float = REPLICA_LAG_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if epoch < 1:
            raise ValueError(f"epoch {epoch}: epochs start at 1")
        self.shard = shard
        self.epoch = epoch
        self._source = source
        self._send = send
        self._release = release
        self._shrink = shrink
        self._expand = expand
        self._lease_valid = lease_valid
        self._deposed = deposed
        self.lag_s = lag_s
        self._monotonic = monotonic
        self.head = 0  # the last batch shipped
        self._window: deque[_Batch] = deque()  # shipped batches some follower may still need
        self._shipped_bytes = 0
        self._links: dict[str, _Link] = {}
        self._held: deque[tuple[int, Any, int]] = deque()  # (batch, reply, bytes), in order
        self.held_bytes = 0
        self.newer_epoch = 0  # a newer epoch a follower reported (0: none): deposed
        self._next_shrink_s = 0.0
        self._next_expand_s = 0.0
        self._joining: set[str] = set()  # followers catching up, see _check_caught_up
        self._released_seq = -1  # the tag of the newest reply released
        self.isr: set[str] = set()
        self.set_followers(followers)

    # --- the loop's calls -------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """Whether held replies reached a bound: the loop answers new work BUSY."""
        return self.held_bytes >= MAX_HELD_BYTES or len(self._held) >= MAX_HELD_REPLIES

    @property
    def held(self) -> int:
        return len(self._held)

    def commit_seq(self) -> int:
        """The newest batch every ISR (and joining) follower holds (-1: not even the epoch's
        start)."""
        links = self._links
        commit = self.head
        for members in (self.isr, self._joining):
            for member in members:
                link = links.get(member)
                acked = -1 if link is None else link.acked
                if acked < commit:
                    commit = acked
        return commit

    def ship(self, data: bytes) -> int:
        """Number one pass's appended records as the next batch(es) and stream them.

        Records over MAX_RECORDS_BYTES are cut at record boundaries into several batches
        (each at most that, or one larger record). Returns the last batch's number."""
        now = self._monotonic()
        pieces = [data] if len(data) <= MAX_RECORDS_BYTES else _cut(data)
        for piece in pieces:
            self.head += 1
            self._shipped_bytes += len(piece)
            self._window.append(_Batch(self.head, piece, now, self._shipped_bytes))
        for link in self._links.values():
            if link.behind_since_s is None:
                link.behind_since_s = now
            if link.state is LinkState.STREAMING:
                self._pump(link)
            elif link.state is LinkState.SNAPSHOT and link.snapshot is not None:
                self._check_tail(link)
        self._trim()
        return self.head

    def hold(self, item: Any, nbytes: int) -> None:
        """Hold a pass's replies until the ISR has the last batch shipped (released in order
        through ``release``, maybe at once)."""
        self._held.append((self.head, item, nbytes))
        self.held_bytes += nbytes
        self._release_committed()

    def on_message(self, identity: bytes, frames: Sequence[bytes]) -> None:
        """A message from a follower (``identity``: its routing id, its worker id)."""
        try:
            message = decode_to_leader(frames)
        except ProtocolError as exc:
            peer_log.warning("bad follower message", "follower %r: dropped: %s", identity, exc)
            return
        if message.shard != self.shard:
            peer_log.warning(
                "wrong shard", "follower %r speaks of shard %d", identity, message.shard
            )
            return
        if message.epoch > self.epoch:
            self._newer(message.epoch, identity)
            return
        match message:
            case Follow():
                self._on_follow(identity, message)
            case Ack():
                if message.epoch == self.epoch:
                    self._on_ack(identity, message)
            case Refuse():
                peer_log.warning(
                    "refuse", "follower %r refused epoch %d: %s", identity, self.epoch, message
                )

    def tick(self) -> None:
        """Timers: resend stalled streams, restart stalled snapshots, remove laggards from
        the ISR (shrink first), propose caught-up followers (expand), release replies."""
        now = self._monotonic()
        for name in [
            name
            for name, link in self._links.items()
            if name not in self.isr and now - link.heard_s >= _idle_limit_s(link)
        ]:
            log.info("shard %d: %s silent for %.0f s: forgotten", self.shard, name, IDLE_FOLLOWER_S)
            del self._links[name]
        for link in self._links.values():
            if link.state is LinkState.STREAMING:
                if link.sent > link.acked and now - link.progress_s >= RESEND_S:
                    # Nothing acked for a while: maybe lost (a reconnection drops a pipe).
                    # The follower takes batches it already has as duplicates.
                    link.cursor = link.acked
                    link.progress_s = now
                self._pump(link)
            elif link.state is LinkState.SNAPSHOT:
                stall_s = SNAPSHOT_INSTALL_S if _installing(link) else SNAPSHOT_STALL_S
                if now - link.progress_s >= stall_s:
                    log.warning(
                        "shard %d: snapshot to %s stalled: starting over",
                        self.shard,
                        link.follower_id,
                    )
                    self._start_snapshot(link)
                else:
                    self._pump_snapshot(link)
        if self.newer_epoch:
            return
        self._check_lag(now)
        self._check_caught_up(now)
        self._release_committed()

    def set_followers(self, followers: Sequence[str]) -> None:
        """The ISR (without this leader) as etcd now says."""
        now = self._monotonic()
        self.isr = set(followers)
        self._joining -= self.isr
        for member in self.isr:
            if member not in self._links:
                self._links[member] = _Link(member, behind_since_s=now, progress_s=now)
        self._release_committed()

    def drain_held(self) -> list[Any]:
        """Every reply still held, oldest first, removed: a leader stepping down answers them
        UNAVAILABLE (outcome unknown: their writes may or may not survive)."""
        items = [item for _, item, _ in self._held]
        self._held.clear()
        self.held_bytes = 0
        return items

    def link_state(self, follower_id: str) -> tuple[LinkState, int] | None:
        """A follower's state and acked batch (tests, status)."""
        link = self._links.get(follower_id)
        return None if link is None else (link.state, link.acked)

    # --- messages ---------------------------------------------------------------------------

    def _on_follow(self, identity: bytes, follow: Follow) -> None:
        name = follow.follower_id
        if name.encode() != identity:
            peer_log.warning(
                "follow id", "FOLLOW from %r names another follower %r: dropped", identity, name
            )
            return
        link = self._links.get(name)
        if link is None:
            if len(self._links) >= MAX_FOLLOWERS:
                peer_log.warning(
                    "too many followers",
                    "shard %d: FOLLOW from %s dropped: %d followers already",
                    self.shard,
                    name,
                    MAX_FOLLOWERS,
                )
                return
            now = self._monotonic()
            link = self._links[name] = _Link(name, behind_since_s=now, progress_s=now)
        link.heard_s = self._monotonic()
        have = follow.have_seq
        if (
            have is not None
            and follow.epoch == self.epoch
            and have <= self.head
            and self._has_after(have)
        ):
            log.info("shard %d: %s resumes after batch %d", self.shard, name, have)
            link.state = LinkState.STREAMING
            link.acked = have  # what it holds now (maybe less than it acked: its fsync policy)
            link.sent = link.cursor = have
            link.snapshot = None
            link.progress_s = self._monotonic()
            self._pump(link)
            self._trim()
            return
        link.acked = -1  # it holds nothing of this epoch until the snapshot is installed
        self._start_snapshot(link)

    def _on_ack(self, identity: bytes, ack: Ack) -> None:
        link = self._links.get(identity.decode("utf-8", "replace"))
        if link is None:
            return
        now = self._monotonic()
        link.heard_s = now
        if ack.chunk is not None:
            if (
                link.state is LinkState.SNAPSHOT
                and link.snapshot is not None
                and ack.seq == link.snapshot.seq
                and link.chunk_acked < ack.chunk < link.chunk_next
            ):
                link.chunk_acked = ack.chunk
                link.progress_s = now
                self._pump_snapshot(link)
            return
        if link.state is LinkState.SNAPSHOT:
            snapshot = link.snapshot
            if snapshot is None or ack.seq != snapshot.seq or not link.snapshot_done:
                return  # an ack of an abandoned stream or snapshot
            log.info(
                "shard %d: %s installed the snapshot of batch %d (%d chunks)",
                self.shard,
                link.follower_id,
                ack.seq,
                link.chunk_next,
            )
            link.state = LinkState.STREAMING
            link.snapshot = None
            link.acked = link.sent = link.cursor = ack.seq
        elif link.state is LinkState.STREAMING:
            if ack.seq > link.sent:
                peer_log.warning(
                    "ack ahead",
                    "shard %d: %s acked batch %d, only %d sent: dropped",
                    self.shard,
                    link.follower_id,
                    ack.seq,
                    link.sent,
                )
                return
            if ack.seq <= link.acked:
                return
            link.acked = ack.seq
        else:
            return
        link.progress_s = now
        link.behind_since_s = self._shipped_at(link.acked + 1)
        self._pump(link)
        self._trim()
        self._release_committed()

    def _newer(self, epoch: int, identity: bytes) -> None:
        if self.newer_epoch:
            self.newer_epoch = max(self.newer_epoch, epoch)
            return
        self.newer_epoch = epoch
        log.warning(
            "shard %d: follower %r follows epoch %d, newer than ours (%d): deposed, "
            "acknowledging nothing more",
            self.shard,
            identity,
            epoch,
            self.epoch,
        )
        if self._deposed is not None:
            self._deposed(epoch)

    # --- streams ----------------------------------------------------------------------------

    def _first_seq(self) -> int:
        """The oldest batch in the window (head + 1 if it is empty)."""
        return self._window[0].seq if self._window else self.head + 1

    def _has_after(self, seq: int) -> bool:
        """Whether the window holds every batch after ``seq`` (so a stream can resume)."""
        return seq + 1 >= self._first_seq()

    def _shipped_at(self, seq: int) -> float | None:
        """When batch ``seq`` was shipped (None: not shipped yet, nobody lacks it)."""
        if seq > self.head:
            return None
        first = self._first_seq()
        if seq < first:
            return self._window[0].shipped_s if self._window else self._monotonic()
        return self._window[seq - first].shipped_s

    def _bytes_after(self, seq: int) -> int:
        """Bytes shipped after batch ``seq`` (which must be in the window or just before)."""
        first = self._first_seq()
        if seq >= self.head:
            return 0
        if seq < first - 1:
            return MAX_FOLLOWER_BYTES + 1  # fell out of the window: more than any bound
        if seq == first - 1:
            batch = self._window[0]
            return self._shipped_bytes - (batch.end_bytes - len(batch.data))
        return self._shipped_bytes - self._window[seq - first].end_bytes

    def _over_bound(self, base: int) -> bool:
        return (
            self.head - base > MAX_FOLLOWER_BATCHES or self._bytes_after(base) > MAX_FOLLOWER_BYTES
        )

    def _pump(self, link: _Link) -> None:
        """Send a STREAMING follower what it lacks, in RECORDS of at most MAX_RECORDS_BYTES."""
        if link.cursor >= self.head or self.newer_epoch:
            return
        if not self._has_after(link.cursor) or self._over_bound(link.acked):
            log.warning(
                "shard %d: %s is %d batches behind (past %d MiB or %d batches): restarting "
                "it from a snapshot",
                self.shard,
                link.follower_id,
                self.head - link.acked,
                MAX_FOLLOWER_BYTES >> 20,
                MAX_FOLLOWER_BATCHES,
            )
            self._start_snapshot(link)
            return
        window = self._window
        first = self._first_seq()
        index = link.cursor + 1 - first
        while index < len(window):
            start = window[index]
            parts = [start.data]
            size = len(start.data)
            index += 1
            while index < len(window) and size + len(window[index].data) <= MAX_RECORDS_BYTES:
                parts.append(window[index].data)
                size += len(window[index].data)
                index += 1
            count = len(parts)
            body = parts[0] if count == 1 else b"".join(parts)
            message = Records(self.shard, self.epoch, start.seq, count, body)
            if not self._send(link.follower_id, encode_replication(message)):
                return  # the socket is full or the follower gone: tick() tries again
            link.cursor = start.seq + count - 1
            if link.cursor > link.sent:
                link.sent = link.cursor

    def _start_snapshot(self, link: _Link) -> None:
        """(Re)start a follower from a snapshot of the shard at the last batch shipped."""
        store, memory = self._source()
        link.state = LinkState.SNAPSHOT
        link.snapshot = _SnapshotSource(store, memory, self.head)
        link.sent = link.cursor = self.head
        link.chunk_next = 0
        link.chunk_acked = -1
        link.chunk_pending = None
        link.snapshot_done = False
        link.progress_s = self._monotonic()
        log.info(
            "shard %d: sending %s a snapshot at batch %d (%d keys)",
            self.shard,
            link.follower_id,
            self.head,
            len(store),
        )
        self._pump_snapshot(link)

    def _pump_snapshot(self, link: _Link) -> None:
        snapshot = link.snapshot
        if snapshot is None or self.newer_epoch:
            return
        while not link.snapshot_done and link.chunk_next - link.chunk_acked <= (
            SNAPSHOT_WINDOW_CHUNKS
        ):
            chunk = link.chunk_pending or snapshot.next_chunk()
            body, last = chunk
            message = SnapshotChunk(
                self.shard, self.epoch, snapshot.seq, link.chunk_next, last, body
            )
            if not self._send(link.follower_id, encode_replication(message)):
                link.chunk_pending = chunk
                return
            link.chunk_pending = None
            link.chunk_next += 1
            link.snapshot_done = last

    def _check_tail(self, link: _Link) -> None:
        """A follower receiving a snapshot needs every batch after it: past the bounds, the
        snapshot starts over from now."""
        snapshot = link.snapshot
        if snapshot is not None and self._over_bound(snapshot.seq):
            log.warning(
                "shard %d: %s's snapshot is older than %d MiB of batches: starting over",
                self.shard,
                link.follower_id,
                MAX_FOLLOWER_BYTES >> 20,
            )
            self._start_snapshot(link)

    def _trim(self) -> None:
        """Forget the batches no follower can still use (each follower needs those after
        its ack, or after its snapshot's batch; bounded by MAX_FOLLOWER_BYTES each)."""
        need = self.head
        for link in self._links.values():
            if link.state is LinkState.STREAMING:
                base = link.acked
            elif link.state is LinkState.SNAPSHOT and link.snapshot is not None:
                base = link.snapshot.seq
            elif link.acked >= 0:
                base = link.acked  # waiting, may resume (while within the bounds)
            else:
                continue
            if base < need and not self._over_bound(base):
                need = base
        window = self._window
        while window and window[0].seq <= need:
            window.popleft()

    # --- the ISR ----------------------------------------------------------------------------

    def _check_lag(self, now: float) -> None:
        if now < self._next_shrink_s or not self.isr:
            return
        laggards = set()
        for member in self.isr:
            link = self._links[member]
            since = link.behind_since_s
            if link.acked < self.head and since is not None and now - since > self.lag_s:
                laggards.add(member)
        if not laggards:
            return
        remaining = frozenset(self.isr - laggards)
        if not self._shrink(remaining):
            self._next_shrink_s = now + SHRINK_RETRY_S
            # Not an event: the change is asked of etcd asynchronously (cluster mode's control
            # thread), so the first calls say "not yet"; the success is logged below.
            log.debug(
                "shard %d: could not remove %s from the in-sync set: holding replies, next "
                "attempt in %.1f s",
                self.shard,
                ", ".join(sorted(laggards)),
                SHRINK_RETRY_S,
            )
            return
        self.isr = set(remaining)
        log.warning(
            "shard %d: removed %s from the in-sync set (behind more than %.1f s); in sync: %s",
            self.shard,
            ", ".join(sorted(laggards)),
            self.lag_s,
            ", ".join(sorted(remaining)) or "the leader alone",
        )

    # Rejoining the ISR. A follower outside it that streams without lagging first JOINS
    # locally: the commit rule waits for its acks too (waiting for more copies is always
    # safe), so it cannot fall behind what is released, even under a steady stream of writes
    # (waiting for it to ack the very last batch at a timer tick might never happen while
    # the broker keeps the pipeline full). Once it holds every batch any released reply
    # depended on (acked >= the newest released tag), it is proposed to ``expand``: from
    # then on it may be elected, and it holds everything ever acknowledged. A joining
    # follower that lags, or whose stream breaks, leaves the joining set (no etcd call: etcd
    # never listed it).
    def _check_caught_up(self, now: float) -> None:
        joining = self._joining
        for name, link in self._links.items():
            if name in self.isr:
                continue
            since = link.behind_since_s
            lagging = since is not None and now - since > self.lag_s
            if link.state is not LinkState.STREAMING or lagging:
                if name in joining:
                    joining.discard(name)
                    log.info("shard %d: %s stopped catching up", self.shard, name)
                continue
            if name not in joining:
                joining.add(name)
                log.info("shard %d: %s is catching up: replies wait for it", self.shard, name)
            if link.acked < self._released_seq or now < self._next_expand_s:
                continue
            if not self._expand(frozenset(self.isr | {name})):
                self._next_expand_s = now + EXPAND_RETRY_S
                log.debug("shard %d: could not add %s to the in-sync set yet", self.shard, name)
                continue
            self.isr.add(name)
            joining.discard(name)
            log.info("shard %d: %s caught up: back in the in-sync set", self.shard, name)

    def _release_committed(self) -> None:
        held = self._held
        if not held or self.newer_epoch:
            return
        commit = self.commit_seq()
        if held[0][0] > commit or not self._lease_valid():
            return
        release = self._release
        while held and held[0][0] <= commit:
            seq, item, nbytes = held.popleft()
            self.held_bytes -= nbytes
            self._released_seq = seq
            release(item)


def _installing(link: _Link) -> bool:
    """Whether the follower holds every chunk of its snapshot and is installing it (a replay
    of the whole shard) before it acks."""
    return (
        link.state is LinkState.SNAPSHOT
        and link.snapshot_done
        and link.chunk_acked >= link.chunk_next - 1
    )


def _idle_limit_s(link: _Link) -> float:
    """How long a follower outside the ISR may be silent before it is forgotten."""
    return SNAPSHOT_INSTALL_S if _installing(link) else IDLE_FOLLOWER_S


def _cut(data: bytes) -> list[bytes]:
    """Cut a pass's records into pieces of at most MAX_RECORDS_BYTES at record boundaries (a
    record larger than that is a piece alone). Only passes over 16 MiB come here."""
    view = memoryview(data)
    pieces: list[bytes] = []
    start = offset = 0
    size = len(data)
    while offset < size:
        length = int.from_bytes(view[offset : offset + 4], "big")
        end = offset + aof.PREFIX_BYTES + length
        if end - start > MAX_RECORDS_BYTES and offset > start:
            pieces.append(bytes(view[start:offset]))
            start = offset
        offset = end
    pieces.append(bytes(view[start:]))
    return pieces


# --- follower ---------------------------------------------------------------------------------


class FollowerState(enum.Enum):
    """Where a follower is."""

    IDLE = "idle"  # no leader epoch known yet
    AWAITING = "awaiting"  # FOLLOW sent, no state of the current epoch: waits for a snapshot
    RECEIVING = "receiving"  # writing a snapshot's chunks to SNAPSHOT_FILE
    SYNCED = "synced"  # holds the state of ``epoch`` at ``seq``; applies RECORDS


class Follower:
    """A follower's side: installs snapshots, appends and applies the leader's records, acks.

    Fencing: it takes SNAPSHOT and RECORDS only for the newest epoch it knows (from etcd via
    :meth:`follow`, or from a message); an older epoch gets REFUSE, so a deposed leader can
    never collect its acks. A gap in the batches (lost messages) sends FOLLOW again, asking
    to resume after the last batch held (the leader sends a snapshot if it cannot).

    Records are checked whole (every record parses, workers/aof.py) before any is used, then
    appended to the follower's own log (ShardFiles: its fsync policy, its compactions) and
    applied with the replay's own decoding (persist.apply_record), then acked.

    Args:
        shard: the shard.
        follower_id: this worker's id (the leader routes to it by that).
        files: the shard's files, taken and replayed into ``store`` and ``memory``.
        store: the store.
        memory: the idempotency memory.
        send: queues frames to the leader; False if they could not be queued.
        monotonic: seconds; tests pass a fake clock.
    """

    def __init__(
        self,
        shard: int,
        follower_id: str,
        files: ShardFiles,
        store: TTLStore,
        memory: RequestMemory,
        send: Callable[[list[bytes]], bool],
        monotonic: Callable[[], float] = time.monotonic,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.shard = shard
        self.follower_id = follower_id
        self._progress = progress  # called now and then while a snapshot is installed
        self._heard_s = monotonic()  # when the leader's last message came
        self._silence_logged = False
        self.failures = 0  # writes of the copy that failed in a row (a full disk)
        self.files = files
        self.store = store
        self.memory = memory
        self._send = send
        self._monotonic = monotonic
        self.state = FollowerState.IDLE
        self.epoch = 0  # the newest epoch known
        self.seq = -1  # the batch held, in ``epoch`` (SYNCED only)
        self._snapshot_path = files.dir / SNAPSHOT_FILE
        self._snapshot_fd: int | None = None
        self._snapshot_seq = 0
        self._chunk_next = 0
        self._next_follow_s = 0.0
        self._next_resume_s = 0.0  # a gap asks to resume at most once per FOLLOW_RETRY_S

    def follow(self, epoch: int) -> None:
        """The shard's leader is in ``epoch`` (from etcd): ask it for the shard, once per
        epoch. Calling it again with the epoch it follows changes nothing (the caller may pass
        every etcd reading; lost messages are made up by tick()'s retries and the leader's
        resends, and one epoch has one leader, at one endpoint); an older epoch is ignored."""
        if epoch < self.epoch or (epoch == self.epoch and self.state is not FollowerState.IDLE):
            return
        if epoch > self.epoch:
            self._new_epoch(epoch)
        self._send_follow(resume=False)

    def on_message(self, frames: Sequence[bytes]) -> None:
        """A message from the leader."""
        try:
            message = decode_to_follower(frames)
        except ProtocolError as exc:
            peer_log.warning("bad leader message", "leader message dropped: %s", exc)
            return
        self._heard_s = self._monotonic()
        if self._silence_logged:
            self._silence_logged = False
            log.info("shard %d: the leader is heard again", self.shard)
        if message.shard != self.shard:
            peer_log.warning("wrong shard", "leader speaks of shard %d: dropped", message.shard)
            return
        if message.epoch < self.epoch:
            self._send_message(
                Refuse(self.shard, self.epoch, f"{self.follower_id} follows epoch {self.epoch}")
            )
            return
        if message.epoch > self.epoch:
            self._new_epoch(message.epoch)  # learnt from the leader itself: newer than etcd's
        if type(message) is SnapshotChunk:
            self._on_chunk(message)
        elif type(message) is Records:
            self._on_records(message)

    def tick(self) -> None:
        """Timers: FOLLOW again if no snapshot comes, fsync per policy, compaction, expiry;
        say once when the leader has been silent for LEADER_SILENCE_S (it sends nothing while
        no write comes, so silence alone is no fault, but a follower whose place another
        connection took hears nothing either: the log line tells an operator where to look)."""
        now = self._monotonic()
        if not self._silence_logged and now - self._heard_s >= LEADER_SILENCE_S:
            self._silence_logged = True
            log.warning(
                "shard %d: nothing from the leader for %.0f s (epoch %d, %s)",
                self.shard,
                now - self._heard_s,
                self.epoch,
                self.state.name.lower(),
            )
        if (
            self.state in (FollowerState.AWAITING, FollowerState.RECEIVING)
            and self._monotonic() >= self._next_follow_s
        ):
            if self.state is FollowerState.RECEIVING:
                log.warning("shard %d: the snapshot stalled: asking again", self.shard)
                self._drop_snapshot()
            self._send_follow(resume=False)
        if self.files.log is not None:
            self.files.tick(self.store, self.memory)
        self.store.expire(EXPIRE_KEYS_PER_TICK)

    def close(self) -> None:
        """Drop a snapshot being received (the files are the caller's to close)."""
        self._drop_snapshot()

    # --- messages ---------------------------------------------------------------------------

    def _new_epoch(self, epoch: int) -> None:
        log.info("shard %d: following epoch %d", self.shard, epoch)
        self.epoch = epoch
        self.seq = -1
        self._drop_snapshot()
        self.state = FollowerState.AWAITING
        self._next_follow_s = 0.0

    def _on_chunk(self, chunk: SnapshotChunk) -> None:
        if chunk.chunk_no == 0:
            self._drop_snapshot()
            try:
                self._snapshot_fd = os.open(
                    self._snapshot_path,
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                    0o644,
                )
            except OSError as exc:
                log.error("shard %d: cannot write a snapshot: %s", self.shard, exc)
                self._wait_for_snapshot()
                return
            self.state = FollowerState.RECEIVING
            self._snapshot_seq = chunk.seq
            self._chunk_next = 0
        elif (
            self.state is not FollowerState.RECEIVING
            or chunk.seq != self._snapshot_seq
            or chunk.chunk_no != self._chunk_next
        ):
            if self.state is FollowerState.RECEIVING:
                log.warning(
                    "shard %d: snapshot chunk %d came, %d expected: asking again",
                    self.shard,
                    chunk.chunk_no,
                    self._chunk_next,
                )
                self._drop_snapshot()
                self._send_follow(resume=False)
            return
        fd = self._snapshot_fd
        assert fd is not None  # RECEIVING
        try:
            aof.write_all(fd, chunk.body, self.files.durability.write)
            if chunk.last:
                self.files.durability.fsync(fd)
        except (DurabilityError, OSError) as exc:
            log.error("shard %d: writing the snapshot failed: %s", self.shard, exc)
            self.failures += 1
            self._drop_snapshot()
            self._wait_for_snapshot()
            return
        self._chunk_next += 1
        self._next_follow_s = self._monotonic() + FOLLOW_RETRY_S
        self._send_message(Ack(self.shard, self.epoch, chunk.seq, chunk.chunk_no))
        if chunk.last:
            self._install(chunk.seq)

    def _install(self, seq: int) -> None:
        fd = self._snapshot_fd
        self._snapshot_fd = None
        if fd is not None:
            os.close(fd)
        store = TTLStore(self.store.clock)
        memory = RequestMemory(self.memory.keep_ms, self.memory.max_bytes)
        try:
            records = self.files.install(self._snapshot_path, store, memory, self._progress)
        except aof.CorruptLog as exc:
            log.error("shard %d: the snapshot is damaged (%s): asking again", self.shard, exc)
            self._wait_for_snapshot()
            return
        self.store = store
        self.memory = memory
        self.seq = seq
        self.state = FollowerState.SYNCED
        self.failures = 0
        log.info(
            "shard %d: installed the snapshot of epoch %d at batch %d: %d keys, %d records",
            self.shard,
            self.epoch,
            seq,
            len(store),
            records,
        )
        self._send_message(Ack(self.shard, self.epoch, seq))

    def _on_records(self, records: Records) -> None:
        if self.state is not FollowerState.SYNCED:
            if self.state is FollowerState.AWAITING and self._monotonic() >= self._next_follow_s:
                self._send_follow(resume=False)  # a stream without our snapshot: ask for one
            return
        if records.last_seq <= self.seq:
            self._send_message(Ack(self.shard, self.epoch, self.seq))  # a resend: ack again
            return
        if records.first_seq != self.seq + 1:
            # A gap: messages were lost (a reconnection drops what a pipe held). Ask once to
            # resume after what we hold; the rest of the stream sent before the leader heard
            # us has the same gap, and asking at each would restart its resend each time.
            now = self._monotonic()
            if now >= self._next_resume_s:
                self._next_resume_s = now + FOLLOW_RETRY_S
                log.warning(
                    "shard %d: batch %d came after %d: a gap, asking to resume",
                    self.shard,
                    records.first_seq,
                    self.seq,
                )
                self._send_follow(resume=True)
            return
        parsed = _parse(records.body)
        if isinstance(parsed, str):
            peer_log.warning(
                "bad records",
                "shard %d: batches %d..%d from the leader do not parse (%s): asking for a snapshot",
                self.shard,
                records.first_seq,
                records.last_seq,
                parsed,
            )
            self._wait_for_snapshot()
            self._send_follow(resume=False)
            return
        files = self.files
        if files.tight or files.no_space is not None:
            # A copy keeps the disk's reserve as the leader does (ZKV_DISK_RESERVE: room for
            # deletes and compaction): it stops taking records before the disk is full.
            refused = files.refusal(len(records.body), 0)
            if refused is not None:
                self.failures += 1
                log.error("shard %d: %s: not following until there is room", self.shard, refused[0])
                self._wait_for_snapshot()
                return
        files.fence()
        try:
            files.append(records.body)
        except NoSpace as exc:
            files.unfence()
            self.failures += 1
            log.error("shard %d: %s: not following until there is room", self.shard, exc)
            self._wait_for_snapshot()
            return
        except BaseException:
            files.unfence()
            raise
        files.unfence()
        files.commit()
        store = self.store
        memory = self.memory
        clock = store.clock
        floor = clock.raise_to if isinstance(clock, HighWaterClock) else None
        for record in parsed:
            if type(record) is TimeRecord:
                if record.now_ms > files.time_ms:
                    files.time_ms = record.now_ms
                if floor is not None:
                    floor(record.now_ms)
            apply_record(record, store, memory)
        self.seq = records.last_seq
        self._send_message(Ack(self.shard, self.epoch, self.seq))

    # --- helpers ----------------------------------------------------------------------------

    def _send_follow(self, resume: bool) -> None:
        if self.epoch < 1:
            return
        have = self.seq if resume and self.state is FollowerState.SYNCED else None
        self._send_message(Follow(self.shard, self.epoch, self.follower_id, have))
        self._next_follow_s = self._monotonic() + FOLLOW_RETRY_S

    def _send_message(self, message: Follow | Ack | Refuse) -> None:
        self._send(encode_replication(message))  # a lost one is made up by resends

    def _wait_for_snapshot(self) -> None:
        """Hold no state of this epoch: the next FOLLOW (now or at its retry) asks for one."""
        self._drop_snapshot()
        self.state = FollowerState.AWAITING
        self.seq = -1
        self._next_follow_s = self._monotonic() + FOLLOW_RETRY_S

    def _drop_snapshot(self) -> None:
        fd = self._snapshot_fd
        self._snapshot_fd = None
        if fd is not None:
            os.close(fd)
            Path(self._snapshot_path).unlink(missing_ok=True)
        if self.state is FollowerState.RECEIVING:
            self.state = FollowerState.AWAITING


def _parse(body: bytes) -> list[aof.Record] | str:
    """Every record of a RECORDS body, or why it is not a sequence of whole records."""
    view = memoryview(body)
    records: list[aof.Record] = []
    offset = 0
    size = len(view)
    while offset < size:
        parsed = aof.parse_at(view, offset)
        if isinstance(parsed, str):
            return f"at byte {offset}: {parsed}"
        records.append(parsed[0])
        offset = parsed[1]
    return records


# --- sockets ----------------------------------------------------------------------------------


class LeaderSocket:
    """The leader's ROUTER: bound where followers connect, a CURVE server with the cluster's
    worker keypair when ``keys`` are given (followers must hold the workers' keypair: the
    only client key let in is the worker public key). One per ZeroMQ context:
    it starts the context's ZAP authenticator.

    Args:
        context: the ZeroMQ context.
        endpoint: where to bind, e.g. ``tcp://10.0.0.2:5570`` (port 0 or ``*``: any).
        keys: the cluster's keys; None: plain (--insecure).
    """

    def __init__(self, context: zmq.Context, endpoint: str, keys: Keys | None) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self._authenticator: ThreadAuthenticator | None = None
        try:
            socket = self.socket
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, HWM)
            socket.setsockopt(zmq.RCVHWM, HWM)
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_TO_LEADER_BYTES)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone follower: a failed send
            # A second connection claiming a connected follower's id is refused, not handed
            # the follower's stream (a peer holding the worker keys could otherwise take a
            # live follower's place and acknowledge what it never wrote). A follower that
            # really reconnects finds its old connection gone: ZMTP heartbeats close a dead
            # one within HEARTBEAT_TIMEOUT_MS.
            socket.setsockopt(zmq.ROUTER_HANDOVER, 0)
            socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            if keys is not None:
                self._authenticator = ThreadAuthenticator(
                    context, log=logging.getLogger("workers.replication.auth")
                )
                self._authenticator.start()
                pair = keys.worker()
                # Followers are workers: they prove they hold the workers' secret key. Only
                # that key is let in, compared here rather than read from <keys>/authorized,
                # which holds the broker's list and is not copied to worker hosts.
                self._authenticator.configure_curve_callback(
                    domain="*", credentials_provider=_OnlyKey(pair.public)
                )
                socket.curve_secretkey = pair.secret
                socket.curve_publickey = pair.public
                socket.curve_server = True
            if endpoint.endswith(":0"):
                port = socket.bind_to_random_port(endpoint[: -len(":0")])
                endpoint = f"{endpoint[: -len(':0')]}:{port}"
            else:
                socket.bind(endpoint)
            self.endpoint = endpoint
        except BaseException:
            self.close()
            raise

    def send(self, follower_id: str, frames: list[bytes]) -> bool:
        """Queue a message to a follower; False if it is not connected or its queue is full."""
        try:
            send_frames(self.socket, [follower_id.encode(), *frames])
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise
        return True

    def drain(self, replicator: Replicator, budget: int = DRAIN_MESSAGES) -> int:
        """Hand up to ``budget`` waiting messages to ``replicator``; returns how many."""
        count = 0
        while count < budget:
            try:
                frames, extra = recv_bounded(self.socket, 4)
            except zmq.Again:
                break
            count += 1
            if extra or len(frames) < 2:
                peer_log.warning(
                    "follower frames", "a follower message of %d frames dropped", 4 + extra
                )
                continue
            replicator.on_message(frames[0], frames[1:])
        return count

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


class _OnlyKey:
    """A ZAP credentials provider that lets in one CURVE public key (z85)."""

    def __init__(self, public: bytes) -> None:
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self._public)


class FollowerSocket:
    """The follower's DEALER, routed by the follower's id; a CURVE client with the cluster's
    worker keypair when ``keys`` are given (the leader's public key is the worker key).

    Args:
        context: the ZeroMQ context.
        follower_id: this worker's id (its routing id at the leader).
        keys: the cluster's keys; None: plain (--insecure).
    """

    def __init__(self, context: zmq.Context, follower_id: str, keys: Keys | None) -> None:
        self._context = context
        self._follower_id = follower_id
        self._keys = keys
        self.endpoint: str | None = None
        self.socket = self._open()

    def _open(self) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, HWM)
        socket.setsockopt(zmq.RCVHWM, FOLLOWER_RCVHWM)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_TO_FOLLOWER_BYTES)
        socket.setsockopt(zmq.ROUTING_ID, self._follower_id.encode())
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self._keys is not None:
            pair = self._keys.worker()
            socket.curve_secretkey = pair.secret
            socket.curve_publickey = pair.public
            socket.curve_serverkey = pair.public
        return socket

    def connect(self, endpoint: str) -> None:
        """Follow the leader at ``endpoint`` (a new socket: nothing queued for the old one
        reaches the new leader)."""
        if self.endpoint == endpoint:
            return
        if self.endpoint is not None:
            self.socket.close(linger=0)
            self.socket = self._open()
        self.socket.connect(endpoint)
        self.endpoint = endpoint

    def send(self, frames: list[bytes]) -> bool:
        try:
            send_frames(self.socket, frames)
        except zmq.Again:
            return False
        return True

    def drain(self, follower: Follower, budget: int = DRAIN_MESSAGES) -> int:
        """Hand up to ``budget`` waiting messages to ``follower``; returns how many."""
        count = 0
        while count < budget:
            try:
                frames, extra = recv_bounded(self.socket, 2)
            except zmq.Again:
                break
            count += 1
            if extra:
                peer_log.warning("leader frames", "a leader message of %d frames", 2 + extra)
                continue
            follower.on_message(frames)
        return count

    def close(self) -> None:
        self.socket.close(linger=0)
