"""The broker's logic, apart from any socket: events in, messages out.

The poll loop (broker/server.py) feeds three kinds of event into :class:`Broker` and sends
whatever lands in :attr:`Broker.outbox`:

* ``on_client(frames, now)``: a message on the frontend ROUTER, identity first.
* ``on_worker(frames, now)``: a message on the backend ROUTER, identity first.
* ``on_timer(now)``: every pass of the loop, whether or not anything arrived.

Two records carry the state. An op (:data:`Op`) is one keyed request (GET, SET, DEL, and the
issue-12 commands), whether
it came alone or as one sub-request of a client's BATCH; its :class:`Origin` says whom to
answer and how. A :class:`Flight` is one message to a worker: one or many ops of one shard,
fenced by one token, applied by the worker in order and answered in one message. Life of an
op::

    arrive -> wait for the key's token (FIFO per key) -> join a flight of its shard
           -> the flight waits for the shard's owner (bounded)
           -> the flight is at the worker with one fencing token (bounded)
           -> the reply goes to each op's client; each key's token passes on

Batches (the algorithm, in one place). A client's BATCH is cut by shard as it is read: a
sub-request whose key's token is free takes it and joins its shard's *open* flight (the one
being filled while this event is handled); one whose key's token is held by that same open
flight joins it too, after the holder (the worker applies a flight in order, so both see the
key one after the other, which is exactly what waiting would have given); one whose key's
token is out with an earlier flight waits behind it in the token table. At the end of the
event every open flight is closed and dispatched: ONE message per shard per client batch, with
ONE token, whose sub-requests are slices of the client's frame joined once (the broker never
decodes a value). When a flight's BATCH_REPLY comes back, its sub-replies are in the order of
its ops: if every op belongs to the same client, as it does for a pipelining client, the reply
is forwarded as received without being read; otherwise it is cut into records and regrouped,
one BATCH_REPLY per client (and a plain REPLY for any op that came as a single request). Then
each key of the flight gives its token back: if requests wait for it, the whole run of them
(up to the batch limits) takes it together and joins an open flight, so a hot key moves a
run of requests per round trip instead of one; the runs freed by one reply are dispatched
together, one message per shard. A flight of a single request that came alone is sent as a
plain DISPATCH, so the one-request path is what it always was.

Each wait is bounded, so no request can hang: a request not dispatched within
``shard_wait_s`` of its arrival (it waited for its key's token, for an owner of its shard, or
both) fails UNAVAILABLE, not applied (waiters expire from a heap of their keys, see
``_expire_waiters``; a flight waits for an owner until ``shard_wait_s`` after its oldest op
came); a worker that does not answer within ``worker_timeout_s`` fails its flight's ops as
UNAVAILABLE with "outcome unknown" (the write may or may not have been applied). Either way
the keys' tokens pass on. What the broker holds is bounded too (``_charge``): request bytes
and requests, per client socket and in total; a message over a limit is answered BUSY whole.

When a worker dies, its flights are not failed: each goes back, whole, to wait for the
shard's next owner (a standby, or the worker restarted by its supervisor), which takes the
shard over from its log, and is dispatched again with a new token, its ops still holding their
keys' tokens so nothing overtakes them. That is safe for every command: GET and ALL only read,
and a SET or DEL that the dead worker had applied is in the log with its request id, so the
new owner answers the retry from its memory instead of applying it twice. Only if no owner
appears in time does such a request fail, and then its message says the outcome is unknown.

Retries from clients (Lazy Pirate: a client that got no reply resends the same requests, with
the same request ids, on a fresh socket) are merged with the originals while those are still
here: the reply goes to the newest socket and the request runs once. A retry is recognised by
what a worker's idempotency memory compares (workers/idempotency.py): the same request id, kind
and key, and for a SET the same value (its CRC-32, the memory's fingerprint). A request that
reuses an id with other content is another request, here as at the worker: both are applied,
in order, and neither is answered with the other's reply.

ALL scatters one part per shard (parts hold no key token: each worker applies requests in
order, so each part sees a consistent shard) and gathers the bodies, which concatenate by
design of the wire format. The first part that fails fails the whole ALL: never a silent
partial answer. ALLs are bounded apart from other requests, because a 20-byte ALL costs every
worker a listing of up to MAX_REPLY_BYTES and the broker the gathered parts: at most
``max_client_alls`` unanswered ALLs per client socket and ``max_pending_alls`` in total (more
is answered BUSY at once), each charged to its client's account like any request, and its
gathered parts charged too as they arrive (so the broker refuses other work while it holds
them), until it is answered. The broker thus gathers at most
``max_pending_alls x shards x MAX_REPLY_BYTES`` (the workers refuse larger parts).

The issue-12 commands are keyed requests like GET, SET and DEL, routed the same way (their
conditions, fences and amounts are in flags and value frames the broker never reads). The lock
commands (LOCK, REFRESH, UNLOCK, FENCE_CHECK: the kinds from 0x0A up, one comparison in the
batch loop) are taken aside by ``_admit_lock``: a flight holding one is marked, and its reply
is read op by op instead of being forwarded whole, because a LOCK with a wait answered
CONFLICT is parked here and an UNLOCK answered OK wakes the oldest LOCK parked for its name
(broker/locks.py has that algorithm and its bounds).

Limits: a flight holds at most MAX_BATCH_OPS ops and MAX_BATCH_BYTES bytes of sub-requests
(a full open flight is closed and a new one opened); a run passed on by a key is cut to the
same limits, and the rest of its waiters wait for the run's answer.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from binascii import crc_hqx
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from heapq import heappop, heappush
from operator import itemgetter
from zlib import crc32

from broker.locks import LockWaits, Waiter
from broker.registry import Registry
from broker.tokens import TokenIssuer, TokenTable
from zkv import defaults
from zkv.hashing import SLOTS, key_shard
from zkv.logs import LogLimiter, peer
from zkv.protocol import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPS,
    MAX_REPORTED_TOKEN,
    REQUEST_HEADER_BYTES,
    SUB_REQUEST_BYTES,
    VERSION,
    Assign,
    Batch,
    Disconnect,
    Heartbeat,
    Kind,
    ProtocolError,
    Ready,
    Reply,
    Report,
    Request,
    Status,
    batch_frames,
    batch_reply_frames,
    batch_reply_header,
    decode_batch,
    decode_from_worker,
    decode_reply_record,
    decode_request,
    dispatch_batch_frames,
    dispatch_frames,
    dispatch_token,
    encode_batch,
    encode_control,
    encode_reply,
    encode_request,
    error_reply,
    pack_reply,
    peek_keyed_request,
    peek_reply,
    reply_from_record,
    reply_record_status,
    request_id_of,
    request_record,
    split_batch,
    split_reply_records,
    stamp_of,
)
from zkv.zmqio import SendLedger

log = logging.getLogger(__name__)

# What a parked LOCK's objects take beyond its bytes (its op tuple, origin, waiter, heap and
# dict entries), charged with them while it is parked.
WAITER_OVERHEAD_BYTES = 512
peer_log = LogLimiter(log)  # every line a peer's input can cause goes through this


CLAIM_WINDOW_HEARTBEATS = 1.5  # heartbeat intervals a new broker waits for shard claims
MAX_FRAMES = 2  # frames of the longest legal message from a client or a worker (no identity)
# How often messages held for a worker whose queue is full are tried again. A ROUTER socket
# polls as always writable (it cannot say which peer has room), so this is a timer.
HELD_RETRY_S = 0.002
# How often the ledgers of replies still queued to clients are settled while any are (they are
# settled too when their client's next request is admitted).
SETTLE_S = 0.01
# Ledgers of clients with nothing tracked kept at most: past this, those are dropped, and the
# untracked bytes they counted (under zkv.zmqio.TRACK_EVERY_BYTES each) are no longer counted.
MAX_IDLE_LEDGERS = 4096
# A STATS answer lists at most this many workers' reports (owners first): with reports of at
# most MAX_REPORT_BYTES, the answer stays under about 1.2 MiB whatever joins the backend.
MAX_STATS_WORKERS = 256
_GET = int(Kind.GET)
_DEL = int(Kind.DEL)
_OK = int(Status.OK)

_BATCH = int(Kind.BATCH)
_BATCH_REPLY = int(Kind.BATCH_REPLY)
_UNAVAILABLE = int(Status.UNAVAILABLE)
_BUSY = int(Status.BUSY)
_ERROR = int(Status.ERROR)
_SET = int(Kind.SET)
_ALL = int(Kind.ALL)
_LOCK = int(Kind.LOCK)
_UNLOCK = int(Kind.UNLOCK)
_REFRESH = int(Kind.REFRESH)
_CONFLICT = int(Status.CONFLICT)
# The lock commands (LOCK, REFRESH, UNLOCK, FENCE_CHECK) are the kinds from here up: one
# integer comparison per request tells the batch loop to take them aside (see _admit_lock).
_LOCK_KINDS = min(int(Kind.LOCK), int(Kind.REFRESH), int(Kind.UNLOCK), int(Kind.FENCE_CHECK))
_SLOT_MASK = SLOTS - 1
# "{" as an int: ``_LBRACE in key`` is a memchr, where ``b"{" in key`` first tries the needle
# as an int, fails and clears a TypeError (0.3 us a key against 0.03 in Python 3.11).
_LBRACE = ord("{")
# A request that came alone weighs what it adds to a BATCH_DISPATCH: its record, whose fixed
# part is this much longer than the REQUEST header it came with (value_len:u32). Weighing it by
# its header undercounts 4 bytes a request, and a run cut at MAX_BATCH_BYTES by that weight
# went over the limit, so the worker refused the whole dispatch.
_RECORD_OVER_HEADER = SUB_REQUEST_BYTES - REQUEST_HEADER_BYTES


class Side(enum.Enum):
    """Which socket a message in the outbox leaves by."""

    FRONTEND = "frontend"
    BACKEND = "backend"


@dataclass(slots=True)
class Gather:
    """An ALL request collecting one body per shard.

    Attributes:
        client: the socket to answer (a retry moves it to the retry's socket).
        admitted_by: the socket it was admitted from, whose count of ALLs it holds.
        account: what it is charged to: its request, and the bytes of the parts gathered so
            far (``nbytes``); None once answered (released).
    """

    client: bytes
    request_id: int
    waiting: set[int]
    bodies: dict[int, bytes] = field(default_factory=dict)
    done: bool = False
    identity: Entry | None = None
    admitted_by: bytes = b""
    account: Account | None = None
    nbytes: int = 0


class Account:
    """What one client socket has the broker hold: requests admitted and not yet answered.

    Shared by every :class:`Origin` of that client; admission control (``Broker._charge``)
    compares it with the per-client limits, and it is dropped when it holds nothing.
    """

    __slots__ = ("client", "nbytes", "ops")

    def __init__(self, client: bytes) -> None:
        self.client = client
        self.nbytes = 0
        self.ops = 0


class Origin:
    """Whom to answer, and in which form: shared by every op of one client message.

    Attributes:
        client: the identity of the socket to answer. A retry (same request id, kind and key)
            sets it to the socket the retry came from, for every op of the message: a client
            resends everything unanswered on its fresh socket, and the old one is closed.
        frames: the request as the client sent it alone (without identity), answered with a
            REPLY; None for the sub-requests of a BATCH, answered in BATCH_REPLY messages.
            A retry is answered in the form of the original (clients of batches accept both).
        gather: the ALL this is a part of, if it is one.
        arrived: monotonic seconds when the message came: a request not dispatched within
            ``shard_wait_s`` of it fails (it waited for its key's token, its shard, or both).
        account: the client's :class:`Account` its ops are charged to (None: not charged,
            an ALL's parts).
    """

    __slots__ = ("account", "arrived", "client", "frames", "gather")

    def __init__(
        self,
        client: bytes,
        frames: list[bytes] | None,
        arrived: float,
        account: Account | None = None,
        gather: Gather | None = None,
    ) -> None:
        self.client = client
        self.frames = frames
        self.arrived = arrived
        self.account = account
        self.gather = gather


class LockOrigin(Origin):
    """The origin of a LOCK the broker parked (broker/locks.py) and dispatches again: its own
    (a batch's other requests keep theirs), with ``arrived`` the time of this dispatch (its
    waits for a token or an owner count from there) and ``give_up`` when its wait runs out
    (monotonic seconds: the first arrival plus its wait_ms)."""

    __slots__ = ("give_up",)

    def __init__(
        self,
        client: bytes,
        frames: list[bytes] | None,
        arrived: float,
        account: Account | None,
        give_up: float,
    ) -> None:
        super().__init__(client, frames, arrived, account)
        self.give_up = give_up


Op = tuple[Origin, int, int, bytes, "bytes | memoryview | None", int]
"""One request the broker holds: ``(origin, kind, request_id, key, record, size)``.

``record`` is the sub-request's wire record, a slice of the client's BATCH (None for a request
that came alone: :attr:`Origin.frames` has it); ``size`` is the bytes it adds to a dispatch.
A plain tuple, not an object: the broker makes one per operation, tens of thousands a second,
and a tuple costs a tenth of a class instance. The parts of an ALL are ops with kind ALL and
an empty key, which hold no token.
"""

Entry = tuple["Origin | Gather", int, int, bytes, "bytes | memoryview | None", int]
"""What the broker remembers of a request under its id, to merge a retry with it: its op (or,
for an ALL, the same shape with the :class:`Gather` first and an empty key)."""


class Flight:
    """One message to a worker: ops of one shard under one fencing token.

    States: OPEN (being filled while one event is handled: in ``Broker._open``), READY (closed,
    dispatched at the end of the event), WAITING (in its shard's queue for an owner; ``token``
    0 unless it went to a worker that died), AT_WORKER (in ``Broker._inflight`` under
    ``token``). A flight keeps its ops together for good: a flight whose worker died goes back
    to WAITING whole, and is answered whole.

    Attributes:
        keys: the keys whose tokens its ops hold (each once); empty for an ALL part.
        nbytes: the sum of its ops' sizes.
        attempts: dispatches so far; more than one after its worker went away.
        deadline: monotonic seconds; while WAITING, when to give up on the shard; while
            AT_WORKER, when to give up on the worker.
        born: when its oldest op arrived, if that was before this event (runs of waiters);
            None: now. Its first wait for an owner ends ``shard_wait_s`` after that.
        locks: it holds a LOCK, REFRESH, UNLOCK or FENCE_CHECK: its reply is never forwarded
            whole, but read op by op (a LOCK may be parked, an UNLOCK wakes a waiter).
        account: the one :class:`Account` every op is charged to, so an answer releases the
            charge in one step; None: look at each op's (runs of waiters, mixed clients).
    """

    __slots__ = (
        "account",
        "attempts",
        "born",
        "deadline",
        "keys",
        "locks",
        "nbytes",
        "ops",
        "shard",
        "token",
        "worker",
    )

    def __init__(self, shard: int, account: Account | None = None) -> None:
        self.shard = shard
        self.ops: list[Op] = []
        self.keys: set[bytes] = set()
        self.nbytes = 0
        self.token = 0
        self.worker: bytes | None = None
        self.deadline = 0.0
        self.attempts = 0
        self.born: float | None = None
        self.account = account
        # Holds a lock command: its reply is read op by op (lock waits, see _lock_replies).
        self.locks = False


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The broker's tunables: seconds, and the admission limits (request bytes as dispatched,
    and requests) on what it holds in total and for one client socket."""

    shards: int
    shard_wait_s: float
    worker_timeout_s: float
    heartbeat_interval_s: float
    heartbeat_liveness: int
    max_pending_bytes: int = defaults.MAX_PENDING_BYTES
    max_client_bytes: int = defaults.MAX_CLIENT_BYTES
    max_pending_ops: int = defaults.MAX_PENDING_OPS
    max_client_ops: int = defaults.MAX_CLIENT_OPS
    max_pending_alls: int = defaults.MAX_PENDING_ALLS
    max_client_alls: int = defaults.MAX_CLIENT_ALLS
    # Cluster mode (docs/cluster.md): etcd says which worker leads each shard, through
    # :meth:`Broker.set_leaders`; the broker sends no ASSIGN and promotes no standby.
    cluster_mode: bool = False


class BrokerCounters:
    """What the broker counts for STATS (docs/operations.md lists the metrics made of them).

    Counted per client message, never per request of a batch (a batch adds its size once),
    so the hot loops pay one list increment a message. Counters only grow.

    Attributes:
        started: monotonic seconds when the broker started (for its uptime).
        messages: client messages by kind byte (0: malformed, refused before its kind mattered).
        batched: requests carried in BATCH messages.
        answered: requests the broker answered itself, by status (BUSY when over a limit,
            UNAVAILABLE when no owner came or a worker did not answer, ERROR when malformed).
        owner_losses: per shard, times its owner was removed (a failover begins).
        failovers: per shard, times it got an owner again after losing one (a standby took
            it over, or a worker claimed it), not its first owner.
        removed: workers removed, by reason ("missed heartbeats", "disconnected", ...).
    """

    __slots__ = (
        "answered",
        "batched",
        "failovers",
        "messages",
        "orphaned",
        "owner_losses",
        "removed",
        "started",
    )

    def __init__(self, shards: int, now: float) -> None:
        self.started = now
        self.messages = [0] * 256
        self.batched = 0
        self.answered = [0] * 256
        self.owner_losses = [0] * shards
        self.failovers = [0] * shards
        self.orphaned: set[int] = set()  # shards that lost their owner and have none yet
        self.removed: dict[str, int] = {}

    def owned(self, shard: int) -> None:
        """``shard`` got an owner: a failover if it had lost one."""
        if shard in self.orphaned:
            self.orphaned.discard(shard)
            self.failovers[shard] += 1


class Broker:
    """Routing state: tokens, workers, requests in flight. Drive it with the ``on_*`` methods."""

    def __init__(
        self,
        config: BrokerConfig,
        now: float,
        epoch: int | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        # Unix seconds: lock deadlines in replies are wall-clock ms (tests inject a fake).
        self._wall = wall
        # LOCKs parked until their lock is released or their wait runs out (broker/locks.py).
        self.locks: LockWaits[Op] = LockWaits()
        self.registry = Registry(config.shards)
        self.tokens: TokenTable[Op] = TokenTable()
        self.issuer = TokenIssuer(int(time.time()) if epoch is None else epoch)
        self.outbox: list[tuple[Side, list[bytes]]] = []
        self._inflight: dict[int, Flight] = {}
        # Dispatch order is deadline order (one timeout for all), so expiry checks the front.
        self._inflight_deadlines: deque[tuple[float, int]] = deque()
        self._shard_queues: list[deque[Flight]] = [deque() for _ in range(config.shards)]
        # The flights being filled while one event is handled, by shard, and those already
        # closed (full); both are dispatched by _flush at the end of the event.
        self._open: dict[int, Flight] = {}
        self._ready: list[Flight] = []
        # Requests here, by request id, so a client's retry (same id, kind, key and value)
        # joins its original. Ids are random 64-bit numbers, so the id alone almost always
        # tells; a request whose id is taken by one of another kind, key or value waits in
        # _by_identity, under the whole (id, kind, key, fingerprint); see _fingerprint.
        self._by_request: dict[int, Entry] = {}
        self._by_identity: dict[tuple[int, int, bytes, int], Entry] = {}
        self._next_heartbeat = now + config.heartbeat_interval_s
        # Claims first: a broker that starts (or restarts) while workers already hold shards
        # must give each shard back to the worker holding it, not to whichever worker says
        # READY first. Live workers hear of the restart within one heartbeat interval (their
        # heartbeat gets a DISCONNECT back) and claim at once; until then, unclaimed READYs
        # wait as standbys and unowned shards are handed out only when the window closes.
        self._claims_until: float | None = (
            None
            if config.cluster_mode
            else now + CLAIM_WINDOW_HEARTBEATS * config.heartbeat_interval_s
        )
        # Cluster mode: the leader of each shard by etcd (routing identity = worker id), and
        # whether etcd answered the last time it was asked (broker/cluster.py).
        self.leaders: dict[int, bytes] = {}
        self._claims: dict[bytes, int | None] = {}  # what each worker's last READY claimed
        self.coordinator_ok = True
        self.closing = False
        # Messages for workers whose queue is full (the backend's send raised EAGAIN: the
        # worker is slow, behind on an fsync, a compaction or a replay, not dead), in order:
        # everything later for that worker waits behind them, since a dispatch sent ahead of
        # an older one would make the worker refuse the older one's token as stale. The poll
        # loop resends them (see :meth:`take_held`); each held dispatch's flight keeps its
        # deadline, and a dispatch whose flight expired is dropped, never sent late.
        self.held: dict[bytes, deque[list[bytes]]] = {}
        self._prune_held = False
        # Admission control: what is held, in total and by client (see _charge).
        self.held_bytes = 0
        self.held_ops = 0
        self._accounts: dict[bytes, Account] = {}
        # ALLs admitted and not yet answered, in total and by the socket that sent them.
        self.held_alls = 0
        self._alls_by_client: dict[bytes, int] = {}
        # Reply bytes handed to the frontend that libzmq may still hold, by client (the poll
        # loop sends through them, zkv.zmqio.send_counted): they count against the client's
        # limit and, once tracked, the total (queued_bytes), so a client that does not read
        # is answered BUSY instead of the broker holding its replies without bound.
        self.sending: dict[bytes, SendLedger] = {}
        self.queued_bytes = 0
        self._next_settle = now
        # Keys whose token has waiters, by when the oldest of them must give up: a heap with
        # one entry per such key (its due time in _wait_due), so waiters expire on time
        # without any pass looking at every waiter (see _expire_waiters).
        self._waits: list[tuple[float, bytes]] = []
        self._wait_due: dict[bytes, float] = {}
        self.counters = BrokerCounters(config.shards, now)
        # The last REPORT of each registered worker (checked by zkv.protocol.check_report)
        # and when it came: what STATS answers with, so a scrape asks no worker anything.
        self.reports: dict[bytes, tuple[float, dict[str, object]]] = {}

    # --- events -----------------------------------------------------------------------------

    def on_client(self, frames: list[bytes], now: float) -> None:
        """A client's message: ``[identity, header, (value or batch body)]``."""
        client, body = frames[0], frames[1:]
        if body and len(body[0]) >= 2 and body[0][1] == _BATCH and body[0][0] == VERSION:
            self.counters.messages[_BATCH] += 1
            self._on_batch(client, body, now)
            self._flush(now)
            return
        keyed = peek_keyed_request(body)
        if keyed is not None and not self.closing:
            self.counters.messages[keyed[0]] += 1
            self._on_keyed(client, body, keyed, now)
            return
        try:
            request = decode_request(body)
        except ProtocolError as exc:
            peer_log.warning("bad request", "bad request from client %s: %s", peer(client), exc)
            self.counters.messages[0] += 1  # malformed
            self.counters.answered[_ERROR] += 1
            self._to_client(client, error_reply(exc.request_id, f"bad request: {exc}"))
            return
        self.counters.messages[request.kind] += 1
        if request.kind == Kind.STATS:
            self._to_client(
                client, encode_reply(Reply(Status.OK, request.request_id, body=self.stats(now)))
            )
            return
        if request.kind == Kind.PING:
            self._to_client(
                client, encode_reply(Reply(Status.OK, request.request_id, body=self._info()))
            )
            return
        if self.closing:
            self.counters.answered[_UNAVAILABLE] += 1
            message = "broker is shutting down; retry on its successor"
            self._to_client(client, error_reply(request.request_id, message, Status.UNAVAILABLE))
            return
        if request.kind == Kind.ALL:
            gather = Gather(client, request.request_id, set(range(self.config.shards)))
            entry: Entry = (gather, Kind.ALL, request.request_id, b"", None, 0)
            original = self._remember(entry)
            if original is not entry:
                original[0].client = client  # a retry: answer it on the socket it came from
                return
            if not self._admit_all(gather, sum(map(len, body))):
                self.counters.answered[_BUSY] += 1
                self._forget(entry)
                self._to_client(
                    client, error_reply(request.request_id, self._busy_all(), Status.BUSY)
                )
                return
            gather.identity = entry
            part = Origin(client, body, now, None, gather)
            for shard in range(self.config.shards):
                flight = Flight(shard)
                flight.ops.append((part, Kind.ALL, request.request_id, b"", None, 0))
                self._ready.append(flight)
        else:
            origin = Origin(client, body, now)
            size = len(body[0]) + _RECORD_OVER_HEADER + (len(body[1]) if len(body) > 1 else 0)
            op = (origin, request.kind, request.request_id, request.key, None, size)
            original = self._remember(op)
            if original is not op:
                original[0].client = client  # a retry: answer it on the socket it came from
                return
            origin.account = self._charge(client, size, 1)
            if origin.account is None:
                self.counters.answered[_BUSY] += 1
                self._forget(op)
                self._to_client(client, error_reply(request.request_id, self._busy(), Status.BUSY))
                return
            if request.kind >= _LOCK_KINDS:
                self._admit_lock(op, now)
            else:
                self._admit(op, key_shard(request.key, self.config.shards), now)
        self._flush(now)

    def _on_keyed(
        self,
        client: bytes,
        body: list[bytes],
        keyed: tuple[int, int, bytes, int | None, int | None],
        now: float,
    ) -> None:
        """A GET, SET or DEL that came alone (the one-request-at-a-time path): what
        :meth:`on_client` does for it, without a Request object, and dispatched at once
        when its key's token is free (nothing else is open during this event)."""
        kind, request_id, key, _, _ = keyed
        size = len(body[0]) + _RECORD_OVER_HEADER + (len(body[1]) if len(body) > 1 else 0)
        origin = Origin(client, body, now)
        op = (origin, kind, request_id, key, None, size)
        original = self._remember(op)
        if original is not op:
            original[0].client = client  # a retry: answer it on the socket the client now uses
            return
        account = origin.account = self._charge(client, size, 1)
        if account is None:
            self.counters.answered[_BUSY] += 1
            self._forget(op)
            self._to_client(client, error_reply(request_id, self._busy(), Status.BUSY))
            return
        if kind >= _LOCK_KINDS:
            self._admit_lock(op, now)
            self._flush(now)
            return
        if _LBRACE in key:
            shard = key_shard(key, self.config.shards)
        else:
            shard = (crc_hqx(key, 0) & _SLOT_MASK) * self.config.shards // SLOTS
        if not self.tokens.acquire(key, op):
            self._schedule_wait(key, now)
            return  # waits behind the holder; dispatched when the token comes back
        flight = Flight(shard, account)
        flight.ops.append(op)
        flight.keys.add(key)
        flight.nbytes = size
        self._route(flight, now)

    def on_worker(self, frames: list[bytes], now: float) -> None:
        """A worker's message: ``[identity, header, (body)]``."""
        worker, body = frames[0], frames[1:]
        peeked = peek_reply(body)
        if peeked is not None and self._forward_reply(worker, *peeked, body, now):
            return
        if body and len(body[0]) >= 2 and body[0][1] == _BATCH_REPLY and body[0][0] == VERSION:
            # The hot path: the header is all the broker reads of a batch reply, usually.
            if self.registry.get(worker) is None:
                self._unknown_worker(worker)
                return
            self.registry.seen(worker, now)
            try:
                token, count = batch_reply_header(body)
            except ProtocolError as exc:
                peer_log.warning(
                    "bad batch reply",
                    "bad batch reply from worker %s dropped: %s",
                    peer(worker),
                    exc,
                )
                return
            self._on_batch_reply(worker, token, count, body, now)
            self._flush(now)
            return
        try:
            message = decode_from_worker(body)
        except ProtocolError as exc:
            peer_log.warning(
                "bad worker message", "bad message from worker %s dropped: %s", peer(worker), exc
            )
            return
        if self.registry.get(worker) is None and not isinstance(message, Ready | Disconnect):
            self._unknown_worker(worker)
            return
        self.registry.seen(worker, now)
        match message:
            case Reply():
                self._on_reply(worker, message, body, now)
            case Ready(claimed, last_token):
                self._on_ready(worker, claimed, last_token, now, message)
            case Heartbeat():
                pass
            case Report(figures):
                self.reports[worker] = (now, figures)
            case Disconnect():
                self._remove_worker(worker, "disconnected", now)
        self._flush(now)

    def on_timer(self, now: float) -> None:
        """Run every pass: expire waits that ran out, send and check heartbeats."""
        if self._claims_until is not None and now >= self._claims_until:
            self._claims_until = None
            for shard in self.registry.unowned():
                self._promote(shard, now)
        if self._waits and self._waits[0][0] <= now:  # first: a waiter due now is not sent
            self._expire_waiters(now)
        lock_due = self.locks.next_due()
        if lock_due is not None and lock_due <= now:
            self._lock_timers(now)
        while self._inflight_deadlines and self._inflight_deadlines[0][0] <= now:
            _, token = self._inflight_deadlines.popleft()
            flight = self._inflight.pop(token, None)
            if flight is not None:
                if flight.worker in self.held:
                    self._prune_held = True
                self._fail(
                    flight,
                    f"worker of shard {flight.shard} did not answer within "
                    f"{self.config.worker_timeout_s} s; outcome unknown",
                )
        for shard, queue in enumerate(self._shard_queues):
            while queue and queue[0].deadline <= now:
                flight = queue.popleft()
                message = f"shard {shard} has no worker (waited {self.config.shard_wait_s} s)"
                if flight.attempts:
                    message += "; outcome unknown: the worker it reached went away"
                self._fail(flight, message)
        if self.queued_bytes and now >= self._next_settle:
            self._next_settle = now + SETTLE_S
            self.settle()
        if self._prune_held:
            self._prune_held = False
            for worker, queue in self.held.items():
                self.held[worker] = deque(f for f in queue if not self.expired_dispatch(f))
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            heartbeat = encode_control(Heartbeat())
            for identity in self.registry.identities():
                if identity not in self.held:  # its queue is full of messages already
                    self.outbox.append((Side.BACKEND, [identity, *heartbeat]))
            cutoff = now - self.config.heartbeat_interval_s * self.config.heartbeat_liveness
            for identity in self.registry.silent_since(cutoff):
                self._remove_worker(identity, "missed heartbeats", now)
        self._flush(now)

    def on_oversized(self, side: Side, frames: list[bytes], extra: int) -> None:
        """A message of more frames than any legal one (``frames`` are its first ones,
        identity first; ``extra`` more were dropped unread): a client gets an ERROR naming
        its request (id read from the header, if it holds one); a worker's is dropped."""
        total = len(frames) - 1 + extra
        if side is Side.BACKEND:
            peer_log.warning(
                "oversized worker message",
                "message of %d frames from worker %s dropped",
                total,
                peer(frames[0]),
            )
            return
        client = frames[0]
        peer_log.warning(
            "oversized client message",
            "message of %d frames from client %s refused",
            total,
            peer(client),
        )
        request_id = request_id_of(frames[1]) if len(frames) > 1 else 0
        message = f"bad request: a message of {total} frames (at most {MAX_FRAMES})"
        self._to_client(client, error_reply(request_id, message))

    def on_unroutable(self, worker: bytes, now: float) -> None:
        """The backend could not deliver to ``worker``: its connection is gone."""
        self._remove_worker(worker, "unreachable", now)
        self._flush(now)

    def on_backpressure(self, frames: list[bytes]) -> None:
        """The backend could not queue ``frames`` (``[worker, ...]``): the worker's queue is at
        its high-water mark. A full queue is backpressure, not death: hold the message, and
        everything after it for that worker, until the poll loop can send them."""
        queue = self.held.get(frames[0])
        if queue is None:
            peer_log.warning(
                "worker not keeping up",
                "worker %s is not keeping up (its queue is full): holding its messages",
                peer(frames[0]),
            )
            queue = self.held[frames[0]] = deque()
        queue.append(frames)

    def expired_dispatch(self, frames: list[bytes]) -> bool:
        """Whether held ``frames`` are a dispatch whose flight is no longer waiting for it
        (timed out, or sent elsewhere): it must not be sent late."""
        token = dispatch_token(frames[1:])
        return token != 0 and token not in self._inflight

    def begin_shutdown(self) -> None:
        """Stop taking requests; what is already here is still answered (see :meth:`idle`).
        Parked LOCKs are answered at once, UNAVAILABLE and not applied: their clients retry
        on the next broker, which dispatches them again (a wait would outlast the drain)."""
        self.closing = True
        for waiter in self.locks.drain():
            self._unpark(waiter)
            op = waiter.item
            self._forget(op)
            self._refund_ops([op])
            self.counters.answered[_UNAVAILABLE] += 1
            self._answer([op], None, _CLOSING_LOCK.decode())

    def idle(self) -> bool:
        """Whether no request is waiting or in flight."""
        return not self._by_request

    def next_timer(self, now: float) -> float:
        """Seconds until ``on_timer`` has something to do (the poll timeout)."""
        due = self._next_heartbeat
        if self.held:
            due = min(due, now + HELD_RETRY_S)
        if self.queued_bytes:
            due = min(due, self._next_settle)
        if self._claims_until is not None:
            due = min(due, self._claims_until)
        if self._inflight_deadlines:
            due = min(due, self._inflight_deadlines[0][0])
        if self._waits:
            due = min(due, self._waits[0][0])
        lock_due = self.locks.next_due()
        if lock_due is not None:
            due = min(due, lock_due)
        for queue in self._shard_queues:
            if queue:
                due = min(due, queue[0].deadline)
        return max(0.0, due - now)

    # --- batches ----------------------------------------------------------------------------

    def _on_batch(self, client: bytes, body: list[bytes], now: float) -> None:
        """A client's BATCH: each sub-request is admitted as if it came alone (see the module
        docstring); malformed ones are answered at once, the rest as their flights return."""
        try:
            _, subs = split_batch(body)
        except ProtocolError as exc:
            self.counters.answered[_ERROR] += 1
            peer_log.warning("bad batch", "bad batch from client %s: %s", peer(client), exc)
            self._to_client(client, error_reply(exc.request_id, f"bad request: {exc}"))
            return
        if self.closing:
            self.counters.answered[_UNAVAILABLE] += len(subs)
            message = b"broker is shutting down; retry on its successor"
            records = [pack_reply(_UNAVAILABLE, sub[1], 0, None, message) for sub in subs]
            self._to_client(client, batch_reply_frames(0, records))
            return
        # Charged whole (the records are the batch's second frame, byte for byte), and the
        # part that is not held (malformed, or retries merged) refunded after the loop.
        self.counters.batched += len(subs)
        account = self._charge(client, len(body[1]), len(subs))
        if account is None:
            self.counters.answered[_BUSY] += len(subs)
            busy = self._busy().encode()
            records = [pack_reply(_BUSY, sub[1], 0, None, busy) for sub in subs]
            self._to_client(client, batch_reply_frames(0, records))
            return
        unheld_bytes = unheld_ops = 0
        due = now + self.config.shard_wait_s
        wait_due = self._wait_due
        # The hot loop of the broker: per sub-request a few dict operations and one tuple. It
        # is _admit written out, with key_shard inlined for keys without a hash tag.
        by_request = self._by_request
        by_identity = self._by_identity
        shards = self.config.shards
        open_flights = self._open
        held = self.tokens._queues  # for the hot loop's own TokenTable.acquire, inline
        lock_kinds = _LOCK_KINDS
        origin = Origin(client, None, now, account)
        refused: list[bytes] = []
        # A flight holds no more than the limits allow. When no flight was open before this
        # batch (always, between events) and the batch itself is within them, no flight it
        # fills can outgrow them: its ops and bytes are some of the batch's. Then the checks
        # are skipped (about 0.1 us a sub-request).
        limited = bool(open_flights) or len(subs) > MAX_BATCH_OPS or len(body[1]) > MAX_BATCH_BYTES
        if open_flights:  # not this batch's alone: their charges are released op by op
            for flight in open_flights.values():
                flight.account = None
        for kind, request_id, key, record in subs:
            if not kind:  # malformed: key holds the message (its bytes: after the loop)
                refused.append(pack_reply(_ERROR, request_id, 0, None, b"bad request: " + key))
                unheld_ops += 1
                continue
            size = len(record)
            op = (origin, kind, request_id, key, record, size)
            original = by_request.setdefault(request_id, op)
            if original is not op or by_identity:
                original = self._remembered(op, original)
                if original is not op:
                    original[0].client = client  # a retry: answer on the socket it came from
                    unheld_bytes += size
                    unheld_ops += 1
                    continue
            if kind >= lock_kinds:  # LOCK, REFRESH, UNLOCK, FENCE_CHECK: see _admit_lock
                self._admit_lock(op, now)
                continue
            if _LBRACE in key:  # a hash tag, maybe
                shard = key_shard(key, shards)
            else:
                shard = (crc_hqx(key, 0) & _SLOT_MASK) * shards // SLOTS
            flight = open_flights.get(shard)
            waiters = held.get(key)
            if waiters is not None:  # the token is out
                if flight is not None and key in flight.keys:
                    # Held by this very flight: follow the holder in it.
                    if not limited or (
                        len(flight.ops) < MAX_BATCH_OPS and flight.nbytes + size <= MAX_BATCH_BYTES
                    ):
                        flight.ops.append(op)
                        flight.nbytes += size
                        continue
                    self._close(shard)
                # Wait behind the holder (dispatched when it comes back): TokenTable.acquire.
                if waiters:
                    waiters.append(op)
                else:
                    held[key] = [op]
                    if key not in wait_due:  # _schedule_wait, inline
                        wait_due[key] = due
                        heappush(self._waits, (due, key))
                continue
            held[key] = ()  # the token was free: TokenTable.acquire, inline
            if flight is None or (
                limited
                and (len(flight.ops) >= MAX_BATCH_OPS or flight.nbytes + size > MAX_BATCH_BYTES)
            ):
                flight = self._new_open(shard, account)
            flight.ops.append(op)
            flight.keys.add(key)
            flight.nbytes += size
        if refused:
            # A malformed sub-request comes without its record (split_batch cannot always
            # tell where it ends), yet the batch was charged whole: refund what no well-formed
            # one holds. Counting them as 0 bytes leaked their bytes from held_bytes for good,
            # and a client sending such batches could push it to --max-pending-bytes, after
            # which every request that met another in flight was answered BUSY.
            unheld_bytes += len(body[1]) - sum(len(sub[3]) for sub in subs if sub[0])
        if unheld_ops:
            self._refund(account, unheld_bytes, unheld_ops)
        if refused:
            self.counters.answered[_ERROR] += len(refused)
            peer_log.warning(
                "bad sub-requests",
                "client %s: %d malformed sub-request(s) refused",
                peer(client),
                len(refused),
            )
            self._to_client(client, batch_reply_frames(0, refused))

    def _admit(self, op: Op, shard: int, now: float) -> None:
        """A new keyed op (one that came alone): join the shard's open flight, or wait for
        its key's token. The same rules as the loop of :meth:`_on_batch`."""
        key = op[3]
        size = op[5]
        account = op[0].account
        flight = self._open.get(shard)
        if flight is not None and key in flight.keys:
            if len(flight.ops) < MAX_BATCH_OPS and flight.nbytes + size <= MAX_BATCH_BYTES:
                if flight.account is not account:
                    flight.account = None
                flight.ops.append(op)
                flight.nbytes += size
                return
            self._close(shard)
            self.tokens.acquire(key, op)
            self._schedule_wait(key, now)
            return
        if not self.tokens.acquire(key, op):
            self._schedule_wait(key, now)
            return
        if flight is None or (
            len(flight.ops) >= MAX_BATCH_OPS or flight.nbytes + size > MAX_BATCH_BYTES
        ):
            flight = self._new_open(shard, account)
        elif flight.account is not account:
            flight.account = None
        flight.ops.append(op)
        flight.keys.add(key)
        flight.nbytes += size

    def _stage_runs(self, shard: int, runs: list[tuple[bytes, Sequence[Op]]]) -> None:
        """Runs of waiters that took their key's token, each together, join the shard's open
        flight, each whole (a full flight is closed and another opened)."""
        flight = self._open.get(shard)
        for key, run in runs:
            size = run[0][5] if len(run) == 1 else sum(map(_size, run))
            if flight is None or (
                len(flight.ops) + len(run) > MAX_BATCH_OPS or flight.nbytes + size > MAX_BATCH_BYTES
            ):
                flight = self._new_open(shard)
            flight.account = None  # waiters of any clients: released op by op
            born = run[0][0].arrived  # the oldest of the run, which waited longest
            if flight.born is None or born < flight.born:
                flight.born = born
            flight.ops.extend(run)
            flight.keys.add(key)
            flight.nbytes += size
            if run[0][1] >= _LOCK_KINDS or (len(run) > 1 and max(map(_kind, run)) >= _LOCK_KINDS):
                flight.locks = True

    def _new_open(self, shard: int, account: Account | None = None) -> Flight:
        self._close(shard)
        flight = self._open[shard] = Flight(shard, account)
        return flight

    def _close(self, shard: int) -> None:
        flight = self._open.pop(shard, None)
        if flight is not None:
            self._ready.append(flight)

    def _flush(self, now: float) -> None:
        """End of an event: dispatch every flight filled during it (or queue it for an owner)."""
        if self._open:
            self._ready.extend(self._open.values())
            self._open.clear()
        while self._ready:
            ready, self._ready = self._ready, []
            for flight in ready:
                self._route(flight, now)

    def _on_batch_reply(
        self, worker: bytes, token: int, count: int, body: list[bytes], now: float
    ) -> None:
        flight = self._inflight.get(token)
        if flight is None or flight.worker != worker:
            peer_log.info(
                "late reply",
                "late or unexpected reply (token %d) from %s dropped",
                token,
                peer(worker),
            )
            return
        ops = flight.ops
        if count != len(ops):
            peer_log.warning(
                "bad batch reply",
                "batch reply of %d sub-replies to a dispatch of %d from %s dropped",
                count,
                len(ops),
                peer(worker),
            )
            return  # the flight times out like any unanswered one
        del self._inflight[token]
        forget = self._by_request.pop
        first = ops[0][0]
        client = first.client
        # Forwarded as is if every op goes to one client that sent it in a batch, and no
        # refusal needs rewriting (a retried flight's, see _regroup).
        whole = first.frames is None and flight.attempts == 1 and not flight.locks
        for op in ops:
            found = forget(op[2], None)
            if found is not op:
                self._unforget(op, found)
            origin = op[0]
            if origin is not first and whole and (origin.client != client or origin.frames):
                whole = False
        if whole and not self._not_reading(client):
            # Every sub-reply goes to one client that sent them in batches: forward as is.
            self.outbox.append((Side.FRONTEND, [client, *body]))
        else:
            self._regroup(flight, body, count, now)
        self._release(flight)

    def _regroup(self, flight: Flight, body: list[bytes], count: int, now: float) -> None:
        """Cut a batch reply into its records and send each to its op's client."""
        try:
            records = split_reply_records(body, count)
        except ProtocolError as exc:
            peer_log.warning(
                "bad batch reply", "bad batch reply (token %d) dropped: %s", flight.token, exc
            )
            self._answer(flight.ops, None, "malformed reply from the worker; outcome unknown")
            return
        for index, op in enumerate(flight.ops if self.queued_bytes else ()):
            # A GET's value for a client whose queue is full is not sent: BUSY, not read.
            if op[1] == _GET and reply_record_status(records[index]) == _OK:
                if self._not_reading(op[0].client) and not _is_touch(op):
                    records[index] = pack_reply(_BUSY, op[2], flight.token, None, _NOT_READING_B)
        if flight.attempts > 1:
            for index, record in enumerate(records):
                if reply_record_status(record) == _UNAVAILABLE:
                    # Refused by this worker, but an earlier worker may have applied it.
                    reply = decode_reply_record(record)
                    message = (reply.body or b"") + b"; outcome unknown"
                    records[index] = pack_reply(
                        _UNAVAILABLE, reply.request_id, reply.token, None, message
                    )
        if flight.locks:
            ops, records = self._lock_replies(flight.ops, records, now)
            self._answer(ops, records, "")
            return
        self._answer(flight.ops, records, "")

    def _answer(
        self,
        ops: Sequence[Op],
        records: list[bytes | memoryview] | None,
        message: str,
        status: int = _UNAVAILABLE,
    ) -> None:
        """Send each op its sub-reply record (or, with ``records`` None, ``status`` with
        ``message``): one BATCH_REPLY per client for ops that came in batches, a REPLY each
        for ops that came alone."""
        by_client: dict[bytes, list[bytes | memoryview]] = {}
        failure = message.encode()
        for index, (origin, _, request_id, _, _, _) in enumerate(ops):
            if records is None:
                record: bytes | memoryview = pack_reply(status, request_id, 0, None, failure)
            else:
                record = records[index]
            if origin.frames is not None:
                self._to_client(origin.client, reply_from_record(record))
            else:
                by_client.setdefault(origin.client, []).append(record)
        for client, client_records in by_client.items():
            self._to_client(client, batch_reply_frames(0, client_records))

    # --- routing ----------------------------------------------------------------------------

    def _route(self, flight: Flight, now: float) -> None:
        """Dispatch to the shard's owner, or wait (bounded) for the shard to get one."""
        owner = self.registry.owner(flight.shard)
        if owner is None:
            # Counted from the arrival of its oldest op: the wait for a key's token and the
            # wait for an owner are one wait, bounded by shard_wait_s together.
            born = flight.born
            flight.deadline = (now if born is None else born) + self.config.shard_wait_s
            self._shard_queues[flight.shard].append(flight)
            return
        token = self.issuer.issue()
        flight.token = token
        flight.attempts += 1
        flight.worker = owner
        flight.deadline = now + self.config.worker_timeout_s
        self._inflight[token] = flight
        self._inflight_deadlines.append((flight.deadline, token))
        ops = flight.ops
        single = ops[0][0].frames
        if len(ops) == 1 and single is not None:
            # One request that came alone: the plain DISPATCH, value frame passed through.
            frames = dispatch_frames(token, single)
        else:
            frames = dispatch_batch_frames(
                token,
                [op[4] if op[4] is not None else request_record(op[0].frames or []) for op in ops],
            )
        self.outbox.append((Side.BACKEND, [owner, *frames]))

    def _forward_reply(
        self, worker: bytes, status: int, token: int, body: list[bytes], now: float
    ) -> bool:
        """The REPLY to a lone request, forwarded to its client without being decoded (the
        one-request-at-a-time path). False if it needs more than that (an ALL part, a retried
        flight's refusal, an unknown worker or token): then :meth:`on_worker` decodes it."""
        flight = self._inflight.get(token)
        if flight is None or flight.worker != worker or len(flight.ops) != 1 or flight.locks:
            return False
        record = self.registry.get(worker)
        if record is None:
            return False
        op = flight.ops[0]
        origin = op[0]
        if (
            origin.gather is not None
            or origin.frames is None  # a REPLY to a BATCH_DISPATCH: the worker refused it
            or (status == _UNAVAILABLE and flight.attempts > 1)
        ):
            return False
        record.last_seen = now
        del self._inflight[token]
        if (
            len(body) > 1
            and op[1] == _GET
            and status == _OK
            and self._not_reading(origin.client)
            and not _is_touch(op)
        ):
            body = self._not_read(op[2])
        self.outbox.append((Side.FRONTEND, [origin.client, *body]))
        self._forget(op)
        self._release(flight)
        if self._open or self._ready:  # waiters took the key's token: dispatch them
            self._flush(now)
        return True

    def _on_reply(self, worker: bytes, reply: Reply, frames: list[bytes], now: float) -> None:
        flight = self._inflight.get(reply.token)
        if flight is None or flight.worker != worker:
            peer_log.info(
                "late reply",
                "late or unexpected reply (token %d) from %s dropped",
                reply.token,
                peer(worker),
            )
            return
        del self._inflight[reply.token]
        op = flight.ops[0]
        origin = op[0]
        if len(flight.ops) != 1 or reply.request_id != op[2] or origin.frames is None:
            # A REPLY by the dispatch's token alone: the worker refused the whole dispatch
            # (malformed or over a limit) and applied none of it.
            self._refused(flight, reply)
            return
        if origin.gather is not None:
            self._gathered(origin.gather, flight.shard, reply)
            return
        if reply.status == Status.UNAVAILABLE and flight.attempts > 1:
            # Refused by this worker, but an earlier worker may have applied it.
            message = (reply.body or b"").decode(errors="replace")
            frames = error_reply(
                reply.request_id, f"{message}; outcome unknown", Status.UNAVAILABLE
            )
        elif (
            op[1] == _GET
            and reply.status == Status.OK
            and self._not_reading(origin.client)
            and not _is_touch(op)
        ):
            frames = self._not_read(reply.request_id)
        elif flight.locks:
            record = pack_reply(
                reply.status, reply.request_id, reply.token, reply.deadline_ms, reply.body
            )
            self._forget(op)
            answered, records = self._lock_replies(flight.ops, [record], now)
            if answered:  # else parked, answered later
                self._to_client(origin.client, reply_from_record(records[0]))
            self._release(flight)
            return
        self._to_client(origin.client, frames)
        self._forget(op)
        self._release(flight)

    def _refused(self, flight: Flight, reply: Reply) -> None:
        """The worker refused a whole dispatch: answer each of its requests with the reason.
        Nothing was applied by this worker, so the status is the worker's (ERROR: not
        applied); only a flight that an earlier worker may have applied is "outcome unknown"."""
        reason = (reply.body or b"").decode(errors="replace")
        log.warning(
            "worker %s refused a dispatch of %d request(s) (token %d): %s",
            peer(flight.worker or b""),
            len(flight.ops),
            flight.token,
            reason,
        )
        if flight.attempts > 1:
            self._fail(flight, f"refused by the worker: {reason}; outcome unknown")
        else:
            status = int(reply.status) if reply.status != Status.OK else _ERROR
            self._fail(flight, f"refused by the worker, not applied: {reason}", status)

    def _gathered(self, gather: Gather, shard: int, reply: Reply) -> None:
        if gather.done:
            return
        if reply.status != Status.OK:
            self._finish(
                gather, encode_reply(Reply(reply.status, gather.request_id, body=reply.body))
            )
            return
        part = reply.body or b""
        account = gather.account
        if account is not None:  # charged as gathered: see _admit_all
            account.nbytes += len(part)
            self.held_bytes += len(part)
            gather.nbytes += len(part)
        gather.bodies[shard] = part
        gather.waiting.discard(shard)
        if not gather.waiting:
            body = b"".join(gather.bodies[s] for s in sorted(gather.bodies))
            self._finish(gather, encode_reply(Reply(Status.OK, gather.request_id, body=body)))

    def _fail(self, flight: Flight, message: str, status: int = _UNAVAILABLE) -> None:
        """End a flight's ops with ``status`` (UNAVAILABLE: retry) and let their keys' next
        requests go."""
        gather = flight.ops[0][0].gather
        if gather is not None:
            if not gather.done:
                self._finish(gather, error_reply(gather.request_id, message, Status(status)))
            return
        for op in flight.ops:
            self._forget(op)
        self.counters.answered[status] += len(flight.ops)
        self._answer(flight.ops, None, message, status)
        self._release(flight)

    def _finish(self, gather: Gather, frames: list[bytes]) -> None:
        """Answer an ALL once; parts still out are ignored when they come back."""
        gather.done = True
        gather.bodies = {}  # parts still out are dropped when they come: nothing stays held
        self._to_client(gather.client, frames)
        if gather.identity is not None:
            self._forget(gather.identity)
        account = gather.account
        if account is not None:
            gather.account = None
            self._refund(account, gather.nbytes, 1)
            self.held_alls -= 1
            by_client = self._alls_by_client
            left = by_client[gather.admitted_by] - 1
            if left:
                by_client[gather.admitted_by] = left
            else:
                del by_client[gather.admitted_by]

    def _release(self, flight: Flight) -> None:
        """Pass on the tokens of an answered flight's keys: to the run of requests waiting for
        each, which joins an open flight (dispatched when the event ends); and release what
        its ops were charged."""
        account = flight.account
        if account is not None:
            self._refund(account, flight.nbytes, len(flight.ops))
        else:
            self._refund_ops(flight.ops)
        runs = self.tokens.release_many(flight.keys, MAX_BATCH_OPS, MAX_BATCH_BYTES, _size)
        if runs:
            self._stage_runs(flight.shard, runs)

    # --- lock waits (broker/locks.py has the algorithm) -------------------------------------

    def _admit_lock(self, op: Op, now: float) -> None:
        """A lock command (LOCK, REFRESH, UNLOCK, FENCE_CHECK) joins a flight as any keyed
        request, and marks it so that its reply is read op by op; except a LOCK with a wait
        for a name others already wait for: it is parked behind them (FIFO), not sent."""
        key = op[3]
        if op[1] == _LOCK and self.locks.waiting(key):
            wait_ms = _request_of(op).wait_ms
            if wait_ms:
                if not self._park(op, op[0].arrived + wait_ms / 1000, now):
                    self._forget(op)
                    self._refund_ops([op])
                    self.counters.answered[_BUSY] += 1
                    self._answer([op], None, self._busy_locks(), _BUSY)
                return
        shard = key_shard(key, self.config.shards)
        self._admit(op, shard, now)
        flight = self._open.get(shard)
        if flight is not None and flight.ops[-1] is op:
            flight.locks = True
        # else it waits for its key's token, and _stage_runs marks the flight it joins

    def _lock_replies(
        self, ops: Sequence[Op], records: list[bytes | memoryview], now: float
    ) -> tuple[list[Op], list[bytes | memoryview]]:
        """The replies of a flight holding lock commands, read op by op: a LOCK with a wait
        answered CONFLICT is parked (not answered), a LOCK or REFRESH answered OK tells the
        waiters of its name when the holder's lease ends, an UNLOCK answered OK dispatches
        the oldest waiter of its name. Returns the ops to answer now and their records."""
        answer_ops: list[Op] = []
        answer_records: list[bytes | memoryview] = []
        for op, record in zip(ops, records, strict=True):
            kind = op[1]
            if kind == _LOCK or kind == _UNLOCK or kind == _REFRESH:
                status = reply_record_status(record)
                if status == _OK and kind == _UNLOCK:
                    waiter = self.locks.released(op[3], now)
                    if waiter is not None:
                        self._redispatch(waiter, now)
                elif status == _OK:  # taken or refreshed: the waiters wait for its new expiry
                    deadline_ms = decode_reply_record(record).deadline_ms
                    self.locks.held(op[3], now, self._expiry_of(deadline_ms, now))
                elif status == _CONFLICT and kind == _LOCK:
                    kept = self._conflicted(op, record, now)
                    if kept is None:
                        continue  # parked
                    record = kept
            answer_ops.append(op)
            answer_records.append(record)
        return answer_ops, answer_records

    def _conflicted(
        self, op: Op, record: bytes | memoryview, now: float
    ) -> bytes | memoryview | None:
        """A LOCK answered CONFLICT: park it if it may still wait (None), else the record to
        answer it with (the CONFLICT, or BUSY when MAX_LOCK_WAITERS wait already)."""
        origin = op[0]
        if isinstance(origin, LockOrigin):
            give_up = origin.give_up
        else:
            wait_ms = _request_of(op).wait_ms
            if not wait_ms:
                return record
            give_up = origin.arrived + wait_ms / 1000
        if now >= give_up:
            return record
        if self.closing:  # not parked any more: its client retries on the next broker
            return pack_reply(_UNAVAILABLE, op[2], 0, None, _CLOSING_LOCK)
        reply = decode_reply_record(record)
        conflict = bytes(record)
        front = isinstance(origin, LockOrigin)  # woken and refused again: keeps its place
        if self._park(op, give_up, now, conflict, reply.deadline_ms or 0, reply.body, front):
            return None
        return pack_reply(_BUSY, op[2], 0, None, self._busy_locks().encode())

    def _park(
        self,
        op: Op,
        give_up: float,
        now: float,
        conflict: bytes | None = None,
        deadline_ms: int = 0,
        reason: bytes | None = None,
        front: bool = False,
    ) -> bool:
        """Park a LOCK in its name's FIFO (False: MAX_LOCK_WAITERS are parked). It stays
        remembered under its request id, so a client's retry merges with it, and charged to
        its client. ``conflict`` None: parked on arrival (still held and charged as admitted);
        else it was just answered, its flight's answer refunds it, so it is charged again."""
        origin = op[0]
        record = op[4]
        if record is not None and not isinstance(record, bytes):
            record = bytes(record)  # not a view: the rest of its client's batch may go
        parked_origin = LockOrigin(
            origin.client, origin.frames, origin.arrived, origin.account, give_up
        )
        parked: Op = (parked_origin, op[1], op[2], op[3], record, op[5])
        # What it keeps while parked, beyond the op[5] it was charged as admitted: its frames
        # or record, its name (a copy of the key in them), its last CONFLICT, and the objects
        # that hold them. A waiter with a 60 KB name keeps twice that (issue 12, hostile test).
        kept = len(op[3]) + (len(conflict) if conflict is not None else 0) + WAITER_OVERHEAD_BYTES
        kept += sum(map(len, origin.frames)) if origin.frames is not None else 0
        kept += len(record) if record is not None else 0
        held = max(kept - op[5], 0)
        account = origin.account
        charge = held if conflict is None else held + op[5]  # else its answer refunds op[5]
        config = self.config
        if account is not None and (
            self.held_bytes + charge > config.max_pending_bytes
            or account.nbytes + charge > config.max_client_bytes
        ):
            return False
        client = account.client if account is not None else origin.client
        holder = self._expiry_of(deadline_ms, now)
        if not self.locks.park(
            parked,
            op[3],
            give_up,
            now,
            conflict,
            holder,
            deadline_ms,
            reason or b"",
            front,
            client,
            held,
        ):
            return False
        if conflict is None:
            self._swap(op, parked)
        else:
            self._remember(parked)
        if account is not None:
            account.nbytes += charge
            self.held_bytes += charge
            if conflict is not None:
                account.ops += 1
                self.held_ops += 1
        return True

    def _unpark(self, waiter: Waiter[Op]) -> None:
        """A waiter left the parked ones: refund the bytes it was charged for being parked
        (what it was charged as admitted stays until it is answered)."""
        account = waiter.item[0].account
        if account is not None and waiter.held:
            account.nbytes -= waiter.held
            self.held_bytes -= waiter.held

    def _redispatch(self, waiter: Waiter[Op], now: float) -> None:
        """Send a parked LOCK again (its name's lock may be free), as a new arrival that keeps
        its wait's end, its request id and its charge. A stamped one is stamped anew: its
        earlier attempts were all refused (CONFLICT: nothing applied), and a worker refuses
        a stamped write first sent longer ago than its idempotency window (waits reach 300 s)."""
        self._unpark(waiter)
        op = waiter.item
        origin = op[0]
        frames, record = origin.frames, op[4]
        request = _request_of(op)
        if request.stamp is not None:
            renewed = replace(request, stamp=stamp_of(self._wall()))
            if frames is not None:
                frames = encode_request(renewed)
            else:
                record = encode_batch(Batch(0, (renewed,)))[1]
        assert isinstance(origin, LockOrigin)
        fresh_origin = LockOrigin(origin.client, frames, now, origin.account, origin.give_up)
        fresh: Op = (fresh_origin, op[1], op[2], op[3], record, op[5])
        self._swap(op, fresh)
        shard = key_shard(op[3], self.config.shards)
        self._admit(fresh, shard, now)
        flight = self._open.get(shard)
        if flight is not None and flight.ops[-1] is fresh:
            flight.locks = True

    def _lock_timers(self, now: float) -> None:
        """Dispatch the waiters whose name's holder expired (or is due a recheck), and answer
        those whose wait ran out with the last CONFLICT."""
        woken, expired = self.locks.due(now)
        for waiter in expired:
            self._unpark(waiter)
            op = waiter.item
            record: bytes | None = waiter.conflict
            if record is None:  # parked on arrival: its name's last CONFLICT, under its id
                deadline_ms, reason = self.locks.last_conflict(waiter.name)
                record = pack_reply(_CONFLICT, op[2], 0, deadline_ms or None, reason)
            self._forget(op)
            self._refund_ops([op])
            self._answer([op], [record], "")
        for waiter in woken:
            self._redispatch(waiter, now)

    def _expiry_of(self, deadline_ms: int | None, now: float) -> float | None:
        """The monotonic instant of a wall-clock deadline in ms (None: none given)."""
        if not deadline_ms:
            return None
        return now + (deadline_ms - self._wall() * 1000) / 1000

    def _swap(self, old: Op, new: Op) -> None:
        """Remember ``new`` where ``old`` was remembered (a parked or woken LOCK is a new op
        tuple, with its own origin; a client's retry must find that one)."""
        request_id = old[2]
        if self._by_request.get(request_id) is old:
            self._by_request[request_id] = new
            return
        identity = (request_id, old[1], old[3], _fingerprint(old))
        if self._by_identity.get(identity) is old:
            self._by_identity[identity] = new
        else:
            self._remember(new)

    def _busy_locks(self) -> str:
        return (
            f"broker busy: {self.locks.count} LOCK requests wait for their lock (limits:"
            f" {self.locks.limit}, per client {self.locks.client_limit}), or"
            f" {self.held_bytes} bytes held (limit {self.config.max_pending_bytes});"
            " not applied, retry later"
        )

    # --- admission and waiting -------------------------------------------------------------

    def _charge(self, client: bytes, nbytes: int, ops: int) -> Account | None:
        """Admit a message of ``ops`` requests, ``nbytes`` as dispatched, from ``client``, and
        charge it; None: over a limit, refuse it (BUSY). A message that exceeds a limit on its
        own is still admitted when nothing is held against that limit (so the largest legal
        message always gets through, one at a time)."""
        config = self.config
        queued = tracked = 0
        ledger = self.sending.get(client)
        if ledger is not None:  # replies to it may still be queued: they count too
            if ledger.trackers:
                self.queued_bytes -= ledger.settle()
            tracked = ledger.tracked
            queued = tracked + ledger.untracked
        account = self._accounts.get(client)
        if account is None:
            if tracked and queued + nbytes > config.max_client_bytes:
                return None
            account = self._accounts[client] = Account(client)
        elif (account.ops or tracked) and (
            account.nbytes + queued + nbytes > config.max_client_bytes
            or account.ops + ops > config.max_client_ops
        ):
            return None
        if (self.held_ops or self.queued_bytes) and (
            self.held_bytes + self.queued_bytes + nbytes > config.max_pending_bytes
            or self.held_ops + ops > config.max_pending_ops
        ):
            if not account.ops:
                del self._accounts[client]
            return None
        account.nbytes += nbytes
        account.ops += ops
        self.held_bytes += nbytes
        self.held_ops += ops
        return account

    def _admit_all(self, gather: Gather, nbytes: int) -> bool:
        """Admit an ALL of ``nbytes`` from ``gather.client`` and charge it, or refuse it
        (False: answer BUSY). An ALL is a 20-byte request that makes every worker list up to
        MAX_REPLY_BYTES on its only loop and the broker gather the parts, so its count is
        bounded per client socket and in total (a flood of them took every shard's heartbeats
        down), and it is charged like any request, its gathered parts included (see
        :meth:`_gathered`), until :meth:`_finish` releases it."""
        config = self.config
        client = gather.client
        held = self._alls_by_client.get(client, 0)
        if self.held_alls >= config.max_pending_alls or held >= config.max_client_alls:
            return False
        account = self._charge(client, nbytes, 1)
        if account is None:
            return False
        gather.account = account
        gather.admitted_by = client
        gather.nbytes = nbytes
        self.held_alls += 1
        self._alls_by_client[client] = held + 1
        return True

    def _busy_all(self) -> str:
        config = self.config
        return (
            f"broker busy: {self.held_alls} ALL request(s) unanswered (limits:"
            f" {config.max_pending_alls}, per client {config.max_client_alls}), or"
            f" {self.held_bytes} bytes held (limit {config.max_pending_bytes}); retry later"
        )

    def ledger(self, client: bytes) -> SendLedger:
        """The ledger of replies to ``client`` (made if it has none): the poll loop sends
        through it. Past MAX_IDLE_LEDGERS ledgers, those with nothing tracked are dropped."""
        sending = self.sending
        if len(sending) >= MAX_IDLE_LEDGERS:
            self.settle()
            for other in [c for c, led in sending.items() if not led.trackers]:
                del sending[other]
        ledger = sending[client] = SendLedger()
        return ledger

    def settle(self) -> None:
        """Settle every client's ledger that has trackers (see SendLedger.settle)."""
        for ledger in self.sending.values():
            if ledger.trackers:
                self.queued_bytes -= ledger.settle()

    def _not_reading(self, client: bytes) -> bool:
        """Whether replies queued to ``client`` reached its byte limit (or all clients' reached
        the total): then the values of its GET replies are not sent, the GETs are BUSY."""
        ledger = self.sending.get(client)
        if ledger is None or not self.queued_bytes:
            return False  # nothing tracked anywhere: nothing it holds can be over a limit
        if ledger.trackers:
            self.queued_bytes -= ledger.settle()
        return (
            ledger.tracked + ledger.untracked >= self.config.max_client_bytes
            or self.queued_bytes >= self.config.max_pending_bytes
        )

    def _not_read(self, request_id: int) -> list[bytes]:
        return error_reply(request_id, _NOT_READING, Status.BUSY)

    def _refund(self, account: Account, nbytes: int, ops: int) -> None:
        """Release what ``ops`` requests of ``account`` held (answered, or never held)."""
        account.nbytes -= nbytes
        account.ops -= ops
        self.held_bytes -= nbytes
        self.held_ops -= ops
        if not account.ops and self._accounts.get(account.client) is account:
            del self._accounts[account.client]

    def _refund_ops(self, ops: Sequence[Op]) -> None:
        """:meth:`_refund` op by op, for ops of several clients."""
        for op in ops:
            account = op[0].account
            if account is not None:
                self._refund(account, op[5], 1)

    def _busy(self) -> str:
        config = self.config
        return (
            f"broker busy: it holds {self.held_ops} request(s), {self.held_bytes} bytes (limits:"
            f" {config.max_pending_ops}, {config.max_pending_bytes} bytes; per client"
            f" {config.max_client_ops}, {config.max_client_bytes} bytes); retry later"
        )

    def _schedule_wait(self, key: bytes, now: float) -> None:
        """A request now waits for ``key``'s token: make sure the key's waiters expire."""
        if key not in self._wait_due:
            due = now + self.config.shard_wait_s
            self._wait_due[key] = due
            heappush(self._waits, (due, key))

    def _expire_waiters(self, now: float) -> None:
        """Fail the requests that waited ``shard_wait_s`` for their key's token and never got
        it (the requests ahead of them are slow, or wait for an owner): never applied, so
        UNAVAILABLE, and the client may retry. Waiters of a key are in arrival order, so the
        expired ones are a prefix; each key with waiters is looked at when its oldest is due."""
        waits = self._waits
        queues = self.tokens._queues
        wait_s = self.config.shard_wait_s
        while waits and waits[0][0] <= now:
            _, key = heappop(waits)
            self._wait_due.pop(key, None)
            queue = queues.get(key)
            if not queue:
                continue  # the waiters all took the token meanwhile
            cut = 0
            while cut < len(queue) and queue[cut][0].arrived + wait_s <= now:
                cut += 1
            if cut:
                expired = queue[:cut]
                del queue[:cut]  # type: ignore[union-attr]  # non-empty: a list
                if not queue:
                    queues[key] = ()
                for op in expired:
                    self._forget(op)
                self._refund_ops(expired)
                self._answer(
                    expired,
                    None,
                    f"waited {wait_s} s for the requests before it on its key; not applied",
                )
            if queue:
                due = queue[0][0].arrived + wait_s
                self._wait_due[key] = due
                heappush(waits, (due, key))

    # --- workers ----------------------------------------------------------------------------

    def _unknown_worker(self, worker: bytes) -> None:
        # A worker registered with a broker before this one (we restarted): have it
        # register again now rather than after its heartbeat liveness runs out.
        peer_log.info("unknown worker", "unknown worker %s: asking it to register", peer(worker))
        self.outbox.append((Side.BACKEND, [worker, *encode_control(Disconnect())]))

    def _on_ready(
        self, worker: bytes, claimed: int | None, last_token: int, now: float, ready: Ready
    ) -> None:
        if last_token >= MAX_REPORTED_TOKEN:
            # Following it would push the issuer's epoch to where the u64 of the wire format
            # runs out (a token of 2**64 crashed the broker). No legal worker reports one.
            peer_log.warning(
                "bad ready",
                "READY from worker %s refused: last_token %d is beyond the limit %d",
                peer(worker),
                last_token,
                MAX_REPORTED_TOKEN - 1,
            )
            return
        if claimed is not None and claimed >= self.config.shards:
            peer_log.warning(
                "bad ready",
                "worker %s claims shard %d of %d: taken as a claim of none",
                peer(worker),
                claimed,
                self.config.shards,
            )
            claimed = None
        self.issuer.advance_past(last_token)
        if self.config.cluster_mode:
            self._on_cluster_ready(worker, claimed, now)
            return
        if self.registry.get(worker) is not None:
            self._remove_worker(worker, "registered again", now)
        shard = self.registry.register(
            worker,
            claimed,
            now,
            hand_out=self._claims_until is None,
            durable=ready.durable,
            cluster=ready.cluster,
        )
        self._assign(worker, shard)
        record = self.registry.get(worker)
        if record is not None and record.refused is not None:
            log.warning("worker %s may own no shard: %s", peer(worker), record.refused)
        elif shard is None:
            log.info("worker %s registered as standby", peer(worker))
        else:
            self.counters.owned(shard)
            log.info("worker %s owns shard %d of %d", peer(worker), shard, self.config.shards)
            self._drain(shard, now)

    def _remove_worker(self, worker: bytes, why: str, now: float) -> None:
        record = self.registry.remove(worker)
        self.held.pop(worker, None)  # its flights are dispatched again to the next owner
        self.reports.pop(worker, None)
        if record is None:
            return
        self.counters.removed[why] = self.counters.removed.get(why, 0) + 1
        if record.shard is not None:
            self.counters.owner_losses[record.shard] += 1
            self.counters.orphaned.add(record.shard)
        log.warning("worker %s (shard %s) removed: %s", peer(worker), record.shard, why)
        self._claims.pop(worker, None)
        self._requeue(worker, now)
        if record.shard is not None and self._claims_until is None and not self.config.cluster_mode:
            self._promote(record.shard, now)

    def _requeue(self, worker: bytes, now: float) -> None:
        """The flights out at ``worker`` wait for their shard's next owner."""
        # Oldest first, so each shard's queue keeps dispatch order; each key is in at most one
        # flight, so flights of different keys may be reordered freely anyway.
        orphans = sorted((f for f in self._inflight.values() if f.worker == worker), key=_token)
        for flight in orphans:
            del self._inflight[flight.token]
            flight.worker = None
            flight.deadline = now + self.config.shard_wait_s
            self._shard_queues[flight.shard].append(flight)
        if orphans:
            log.info(
                "%d request(s) of worker %s wait for the next owner",
                sum(len(f.ops) for f in orphans),
                peer(worker),
            )

    # --- cluster mode (docs/cluster.md) -----------------------------------------------------

    def set_leaders(self, leaders: dict[int, bytes], now: float) -> None:
        """etcd's view of who leads each shard changed (broker/cluster.py polls it)."""
        self.leaders = {s: w for s, w in leaders.items() if 0 <= s < self.config.shards}
        self._apply_leaders(now)

    def _apply_leaders(self, now: float) -> None:
        """Route each shard to its leader when etcd names it AND the worker itself, in its
        last READY, claims to lead it (a leader that stepped down says so before etcd's
        reading reaches the broker; a new one may be named before it has taken the shard
        over); else hold the shard's requests (for up to --shard-wait) until both agree. A
        leader that lost its shard keeps nothing: what it had in flight goes to the next
        leader, whose idempotency memory (replicated with the log) answers a request the old
        one had applied."""
        for shard in range(self.config.shards):
            want = self.leaders.get(shard)
            if want is not None and (
                self.registry.get(want) is None or self._claims.get(want) != shard
            ):
                want = None
            have = self.registry.owner(shard)
            if want == have:
                continue
            if have is not None:
                self.registry.set_owner(shard, None)
                self._requeue(have, now)
                log.info("shard %d: worker %s no longer leads it", shard, peer(have))
            if want is not None:
                self.registry.set_owner(shard, want)
                log.info("shard %d: routed to its leader, worker %s", shard, peer(want))
                self._drain(shard, now)
        self._flush(now)

    def _on_cluster_ready(self, worker: bytes, claimed: int | None, now: float) -> None:
        """Cluster mode: a READY registers a worker, or updates what it claims to lead."""
        if self.registry.get(worker) is None:
            self.registry.register(worker, None, now, hand_out=False)
            log.info(
                "worker %s registered%s",
                peer(worker),
                "" if claimed is None else f", claiming shard {claimed}",
            )
        self._claims[worker] = claimed
        self._apply_leaders(now)

    def _promote(self, shard: int, now: float) -> None:
        """Give an unowned shard to the oldest standby, if any, and send it what waited."""
        successor = self.registry.promote(shard)
        if successor is not None:
            self.counters.owned(shard)
            log.info("standby %s takes over shard %d", peer(successor), shard)
            self._assign(successor, shard)
            self._drain(shard, now)

    def _assign(self, worker: bytes, shard: int | None) -> None:
        """Tell a worker its shard, under a new ownership epoch (a fencing number)."""
        epoch = 0 if shard is None else self.issuer.issue()
        assign = Assign(shard, self.config.shards, epoch)
        self.outbox.append((Side.BACKEND, [worker, *encode_control(assign)]))

    def _drain(self, shard: int, now: float) -> None:
        """Send a newly owned shard the flights that waited for it, oldest first."""
        queue = self._shard_queues[shard]
        while queue and self.registry.owner(shard) is not None:
            flight = queue.popleft()
            gather = flight.ops[0][0].gather
            if gather is not None and gather.done:
                continue
            self._route(flight, now)

    # --- helpers ----------------------------------------------------------------------------

    def _remember(self, entry: Entry) -> Entry:
        """Record a request under its id, unless it retries one the broker holds.

        Returns:
            ``entry`` if it is new (now remembered), else the entry of the request it retries
            (same request id, kind and key).
        """
        return self._remembered(entry, self._by_request.setdefault(entry[2], entry))

    def _remembered(self, entry: Entry, original: Entry) -> Entry:
        """The rest of :meth:`_remember` once ``original = _by_request.setdefault(id, entry)``
        ran: the cases where the id alone does not tell (inlined away in the batch loop)."""
        request_id, kind, key = entry[2], entry[1], entry[3]
        if original is entry:
            if self._by_identity:
                found = self._by_identity.get((request_id, kind, key, _fingerprint(entry)))
                if found is not None:  # a retry of one whose id was taken when it came
                    del self._by_request[request_id]
                    return found
            return entry
        fingerprint = _fingerprint(entry)
        if original[1] == kind and original[3] == key and _fingerprint(original) == fingerprint:
            return original
        # The id is taken by another request (kind, key or value): remember this one in full.
        return self._by_identity.setdefault((request_id, kind, key, fingerprint), entry)

    def _forget(self, entry: Entry) -> None:
        """Forget an answered request (retries of it are new requests from now on)."""
        found = self._by_request.pop(entry[2], None)
        if found is not entry:
            self._unforget(entry, found)

    def _unforget(self, entry: Entry, found: Entry | None) -> None:
        """The rest of :meth:`_forget` when ``_by_request`` popped ``found``, not ``entry``:
        put that back, and forget ``entry`` where it is, in ``_by_identity``."""
        if found is not None:
            self._by_request[entry[2]] = found
        self._by_identity.pop((entry[2], entry[1], entry[3], _fingerprint(entry)), None)

    def _to_client(self, client: bytes, frames: list[bytes]) -> None:
        self.outbox.append((Side.FRONTEND, [client, *frames]))

    def stats(self, now: float) -> bytes:
        """The body of a STATS reply: the broker's figures and each worker's last report
        (docs/protocol.md, section 4). Costs one pass over the flights and the workers, once a
        scrape; nothing on the request path."""
        counters = self.counters
        registry = self.registry
        at_workers = sum(len(flight.ops) for flight in self._inflight.values())
        shards = range(self.config.shards)
        owners = {registry.owner(shard): shard for shard in shards}
        workers = []
        # Owners first, then standbys: the bound never drops a shard's owner.
        listed = sorted(self.reports.items(), key=lambda item: item[0] not in owners)
        for identity, (received, figures) in listed[:MAX_STATS_WORKERS]:
            record = registry.get(identity)
            workers.append(
                {
                    **figures,
                    "worker": peer(identity),
                    "age_s": round(now - received, 3),
                    "assigned": None if record is None else record.shard,
                }
            )
        kinds = {kind.name: counters.messages[kind] for kind in Kind if kind < Kind.REPLY}
        kinds["malformed"] = counters.messages[0]
        return json.dumps(
            {
                "broker": {
                    "uptime_s": round(now - counters.started, 3),
                    "shards": self.config.shards,
                    "epoch": self.issuer.epoch,
                    "owned": registry.owned(),
                    "owners": [None if o is None else peer(o) for o in map(registry.owner, shards)],
                    "workers": len(registry.identities()),
                    "standbys": registry.standbys(),
                    "messages": kinds,
                    "batched_requests": counters.batched,
                    "answered": {s.name: counters.answered[s] for s in Status},
                    "held_requests": self.held_ops,
                    "held_bytes": self.held_bytes,
                    "requests_at_workers": at_workers,
                    "dispatches_at_workers": len(self._inflight),
                    "keys_in_flight": len(self.tokens),
                    "lock_waiters": self.locks.count,
                    # map(len) in C: about 30 ns a key whose token is out, once a scrape.
                    "requests_waiting_for_token": sum(map(len, self.tokens._queues.values())),
                    "waiting_for_owner": [
                        sum(len(flight.ops) for flight in queue) for queue in self._shard_queues
                    ],
                    "owner_losses": list(counters.owner_losses),
                    "failovers": list(counters.failovers),
                    "workers_removed": dict(counters.removed),
                },
                "workers": workers,
            },
            separators=(",", ":"),
        ).encode()

    def _info(self) -> bytes:
        owned = self.registry.owned()
        info: dict[str, object] = {
            "status": "ok" if all(owned) and self.coordinator_ok else "degraded",
            "shards": self.config.shards,
            "owned": owned,
            "workers": len(self.registry.identities()),
            "standbys": self.registry.standbys(),
            "epoch": self.issuer.epoch,
            "keys_in_flight": len(self.tokens),
        }
        if self.config.cluster_mode:  # whether this broker reaches etcd (docs/cluster.md)
            info["coordinator"] = "ok" if self.coordinator_ok else "unreachable"
        return json.dumps(info).encode()


def _fingerprint(entry: Entry) -> int:
    """What a worker's idempotency memory compares besides request id, kind and key, so that
    the broker merges a retry exactly when the worker would answer it from memory (one rule,
    tests/unit/test_retry_rule.py): the CRC-32 of a SET's value (not its TTL, condition or
    fence: a retry never changes them), 0 for a DEL, and for the issue-12 commands their
    amount, token and TTL mixed as workers/shard.py's ``_fingerprint`` mixes them (a GET's
    touch TTL too: the worker remembers no GET, so telling a touch from a read is only
    stricter). Computed only while some request's id is taken by another (rare: ids are
    random), never on the broker's common path: it decodes the request."""
    kind = entry[1]
    if kind == _ALL or kind == _DEL:  # an ALL is a Gather, with no frames
        return 0
    request = _request_of(entry)  # type: ignore[arg-type]
    if kind == _SET:
        return crc32(request.value or b"")
    mixed = request.by * 1_000_003 + request.token * 8_191 + (request.ttl_ms or 0)
    return (mixed ^ (mixed >> 32)) & 0xFFFF_FFFF


def _token(flight: Flight) -> int:
    return flight.token


def _request_of(op: Op) -> Request:
    """The request of an op, decoded (a lock command's wait, a GET's touch: rare paths; the
    broker never decodes a request on its common path). The op was validated when it came."""
    record = op[4]
    if record is None:
        return decode_request(op[0].frames or [])
    return decode_batch(batch_frames(0, [bytes(record)])).requests[0]


def _is_touch(op: Op) -> bool:
    """Whether a GET moves its key's deadline (flag TTL): a write, whose reply must not be
    replaced by BUSY ("not applied") for a client that does not read."""
    return _request_of(op).ttl_ms is not None


_kind: Callable[[Op], int] = itemgetter(1)


_NOT_READING = (
    "client not reading its replies: those queued to it reached the broker's limit;"
    " GET not answered, retry after reading"
)
_NOT_READING_B = _NOT_READING.encode()
_CLOSING_LOCK = b"broker is shutting down while the LOCK waited; not applied, retry"

_size: Callable[[Op], int] = itemgetter(5)
"""An op's size (a C call: the token table weighs every waiter of a run by it)."""
