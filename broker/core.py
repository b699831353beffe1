"""The broker's logic, apart from any socket: events in, messages out.

The poll loop (broker/server.py) feeds three kinds of event into :class:`Broker` and sends
whatever lands in :attr:`Broker.outbox`:

* ``on_client(frames, now)``: a message on the frontend ROUTER, identity first.
* ``on_worker(frames, now)``: a message on the backend ROUTER, identity first.
* ``on_timer(now)``: every pass of the loop, whether or not anything arrived.

Life of a keyed request (GET, SET, DEL)::

    arrive -> wait for the key's token (FIFO per key) -> wait for the shard's owner (bounded)
           -> at the worker with a fencing token (bounded) -> reply forwarded, token passed on

Each wait is bounded, so no request can hang: a shard with no owner fails its waiting requests
after ``shard_wait_s`` with an UNAVAILABLE reply naming the shard; a worker that does not answer
within ``worker_timeout_s`` fails its request as UNAVAILABLE with "outcome unknown" (the write
may or may not have been applied). Either way the key's token passes on.

When a worker dies, its requests in flight are not failed: they go back to wait for the
shard's next owner (a standby, or the worker restarted by its supervisor), which takes the
shard over from its log, and are dispatched again, still holding their keys' tokens so nothing
overtakes them. That is safe for every command: GET and ALL only read, and a SET or DEL that
the dead worker had applied is in the log with its request id, so the new owner answers the
retry from its memory instead of applying it twice. Only if no owner appears in time does such
a request fail, and then its message says the outcome is unknown.

Retries from clients (Lazy Pirate: a client that got no reply resends the same request, with
the same request id, on a fresh socket) are merged with the original while it is still here:
the reply goes to the newest socket and the request runs once.

ALL scatters one part per shard (parts hold no key token: each worker applies requests in
order, so each part sees a consistent shard) and gathers the bodies, which concatenate by
design of the wire format. The first part that fails fails the whole ALL: never a silent
partial answer.

Values are never decoded here: a request's frames travel to the worker as received, behind a
ten-byte dispatch prefix, and a reply's frames travel back to the client untouched.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from broker.registry import Registry
from broker.tokens import TokenIssuer, TokenTable
from zkv.hashing import key_shard
from zkv.protocol import (
    Assign,
    Disconnect,
    Heartbeat,
    Kind,
    ProtocolError,
    Ready,
    Reply,
    Status,
    decode_from_worker,
    decode_request,
    dispatch_frames,
    encode_control,
    encode_reply,
    error_reply,
)

log = logging.getLogger(__name__)


CLAIM_WINDOW_HEARTBEATS = 1.5  # heartbeat intervals a new broker waits for shard claims


class Side(enum.Enum):
    """Which socket a message in the outbox leaves by."""

    FRONTEND = "frontend"
    BACKEND = "backend"


@dataclass(slots=True)
class Gather:
    """An ALL request collecting one body per shard."""

    client: bytes
    request_id: int
    waiting: set[int]
    bodies: dict[int, bytes] = field(default_factory=dict)
    done: bool = False
    identity: tuple[int, Kind, bytes] | None = None


@dataclass(slots=True)
class Pending:
    """A request the broker holds, from arrival until its reply is forwarded.

    Attributes:
        frames: the request exactly as the client sent it (without identity).
        key: the key whose token it holds; None for the parts of an ALL.
        token: the fencing token of its dispatch, 0 until dispatched.
        worker: the worker it was dispatched to.
        deadline: monotonic seconds; while waiting for an owner, when to give up on the
            shard; once dispatched, when to give up on the worker.
    """

    client: bytes
    request_id: int
    frames: list[bytes]
    shard: int
    key: bytes | None
    gather: Gather | None = None
    token: int = 0
    worker: bytes | None = None
    deadline: float = 0.0
    kind: Kind = Kind.GET
    attempts: int = 0  # dispatches so far; more than one after its worker went away

    @property
    def reached_a_worker(self) -> bool:
        """Whether it was ever dispatched: then its outcome is unknown if it fails later."""
        return self.token != 0


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The broker's tunables, in seconds."""

    shards: int
    shard_wait_s: float
    worker_timeout_s: float
    heartbeat_interval_s: float
    heartbeat_liveness: int


class Broker:
    """Routing state: tokens, workers, requests in flight. Drive it with the ``on_*`` methods."""

    def __init__(self, config: BrokerConfig, now: float, epoch: int | None = None) -> None:
        self.config = config
        self.registry = Registry(config.shards)
        self.tokens: TokenTable[Pending] = TokenTable()
        self.issuer = TokenIssuer(int(time.time()) if epoch is None else epoch)
        self.outbox: list[tuple[Side, list[bytes]]] = []
        self._inflight: dict[int, Pending] = {}
        # Dispatch order is deadline order (one timeout for all), so expiry checks the front.
        self._inflight_deadlines: deque[tuple[float, int]] = deque()
        self._shard_queues: list[deque[Pending]] = [deque() for _ in range(config.shards)]
        # Requests here, by (request id, kind, key), so a client's retry joins its original.
        self._by_request: dict[tuple[int, Kind, bytes], Pending | Gather] = {}
        self._next_heartbeat = now + config.heartbeat_interval_s
        # Claims first: a broker that starts (or restarts) while workers already hold shards
        # must give each shard back to the worker holding it, not to whichever worker says
        # READY first. Live workers hear of the restart within one heartbeat interval (their
        # heartbeat gets a DISCONNECT back) and claim at once; until then, unclaimed READYs
        # wait as standbys and unowned shards are handed out only when the window closes.
        self._claims_until: float | None = (
            now + CLAIM_WINDOW_HEARTBEATS * config.heartbeat_interval_s
        )
        self.closing = False

    # --- events -----------------------------------------------------------------------------

    def on_client(self, frames: list[bytes], now: float) -> None:
        """A client's message: ``[identity, header, (value)]``."""
        client, body = frames[0], frames[1:]
        try:
            request = decode_request(body)
        except ProtocolError as exc:
            log.warning("bad request from client %s: %s", client.hex(), exc)
            self._to_client(client, error_reply(exc.request_id, f"bad request: {exc}"))
            return
        if request.kind == Kind.PING:
            self._to_client(
                client, encode_reply(Reply(Status.OK, request.request_id, body=self._info()))
            )
            return
        if self.closing:
            message = "broker is shutting down; retry on its successor"
            self._to_client(client, error_reply(request.request_id, message, Status.UNAVAILABLE))
            return
        identity = (request.request_id, request.kind, request.key)
        original = self._by_request.get(identity)
        if original is not None:
            original.client = client  # a retry: answer it on the socket the client now uses
            return
        match request.kind:
            case Kind.GET | Kind.SET | Kind.DEL:
                pending = Pending(
                    client,
                    request.request_id,
                    body,
                    key_shard(request.key, self.config.shards),
                    request.key,
                    kind=request.kind,
                )
                self._by_request[identity] = pending
                if self.tokens.acquire(request.key, pending):
                    self._route(pending, now)
            case Kind.ALL:
                gather = Gather(client, request.request_id, set(range(self.config.shards)))
                gather.identity = identity
                self._by_request[identity] = gather
                for shard in range(self.config.shards):
                    part = Pending(
                        client, request.request_id, body, shard, None, gather, kind=Kind.ALL
                    )
                    self._route(part, now)

    def on_worker(self, frames: list[bytes], now: float) -> None:
        """A worker's message: ``[identity, header, (body)]``."""
        worker, body = frames[0], frames[1:]
        try:
            message = decode_from_worker(body)
        except ProtocolError as exc:
            log.warning("bad message from worker %s dropped: %s", worker.hex(), exc)
            return
        if self.registry.get(worker) is None and not isinstance(message, Ready | Disconnect):
            # A worker registered with a broker before this one (we restarted): have it
            # register again now rather than after its heartbeat liveness runs out.
            log.info("unknown worker %s: asking it to register", worker.hex())
            self.outbox.append((Side.BACKEND, [worker, *encode_control(Disconnect())]))
            return
        self.registry.seen(worker, now)
        match message:
            case Reply():
                self._on_reply(worker, message, body, now)
            case Ready(claimed, last_token):
                self._on_ready(worker, claimed, last_token, now)
            case Heartbeat():
                pass
            case Disconnect():
                self._remove_worker(worker, "disconnected", now)

    def on_timer(self, now: float) -> None:
        """Run every pass: expire waits that ran out, send and check heartbeats."""
        if self._claims_until is not None and now >= self._claims_until:
            self._claims_until = None
            for shard in self.registry.unowned():
                self._promote(shard, now)
        while self._inflight_deadlines and self._inflight_deadlines[0][0] <= now:
            _, token = self._inflight_deadlines.popleft()
            pending = self._inflight.pop(token, None)
            if pending is not None:
                self._fail(
                    pending,
                    f"worker of shard {pending.shard} did not answer within "
                    f"{self.config.worker_timeout_s} s; outcome unknown",
                    now,
                )
        for shard, queue in enumerate(self._shard_queues):
            while queue and queue[0].deadline <= now:
                pending = queue.popleft()
                message = f"shard {shard} has no worker (waited {self.config.shard_wait_s} s)"
                if pending.reached_a_worker:
                    message += "; outcome unknown: the worker it reached went away"
                self._fail(pending, message, now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            heartbeat = encode_control(Heartbeat())
            for identity in self.registry.identities():
                self.outbox.append((Side.BACKEND, [identity, *heartbeat]))
            cutoff = now - self.config.heartbeat_interval_s * self.config.heartbeat_liveness
            for identity in self.registry.silent_since(cutoff):
                self._remove_worker(identity, "missed heartbeats", now)

    def on_unroutable(self, worker: bytes, now: float) -> None:
        """The backend could not deliver to ``worker``: its connection is gone."""
        self._remove_worker(worker, "unreachable", now)

    def begin_shutdown(self) -> None:
        """Stop taking requests; what is already here is still answered (see :meth:`idle`)."""
        self.closing = True

    def idle(self) -> bool:
        """Whether no request is waiting or in flight."""
        return not self._by_request

    def next_timer(self, now: float) -> float:
        """Seconds until ``on_timer`` has something to do (the poll timeout)."""
        due = self._next_heartbeat
        if self._claims_until is not None:
            due = min(due, self._claims_until)
        if self._inflight_deadlines:
            due = min(due, self._inflight_deadlines[0][0])
        for queue in self._shard_queues:
            if queue:
                due = min(due, queue[0].deadline)
        return max(0.0, due - now)

    # --- routing ----------------------------------------------------------------------------

    def _route(self, pending: Pending, now: float) -> None:
        """Dispatch to the shard's owner, or wait (bounded) for the shard to get one."""
        owner = self.registry.owner(pending.shard)
        if owner is None:
            pending.deadline = now + self.config.shard_wait_s
            self._shard_queues[pending.shard].append(pending)
            return
        token = self.issuer.issue()
        pending.token = token
        pending.attempts += 1
        pending.worker = owner
        pending.deadline = now + self.config.worker_timeout_s
        self._inflight[token] = pending
        self._inflight_deadlines.append((pending.deadline, token))
        self.outbox.append((Side.BACKEND, [owner, *dispatch_frames(token, pending.frames)]))

    def _on_reply(self, worker: bytes, reply: Reply, frames: list[bytes], now: float) -> None:
        pending = self._inflight.get(reply.token)
        if pending is None or pending.worker != worker:
            log.info(
                "late or unexpected reply (token %d) from %s dropped", reply.token, worker.hex()
            )
            return
        del self._inflight[reply.token]
        if pending.gather is not None:
            self._gathered(pending, reply)
        else:
            if reply.status == Status.UNAVAILABLE and pending.attempts > 1:
                # Refused by this worker, but an earlier worker may have applied it.
                message = (reply.body or b"").decode(errors="replace")
                frames = error_reply(
                    reply.request_id, f"{message}; outcome unknown", Status.UNAVAILABLE
                )
            self._to_client(pending.client, frames)
            self._forget(pending)
            self._release(pending, now)

    def _gathered(self, pending: Pending, reply: Reply) -> None:
        gather = pending.gather
        assert gather is not None  # only called for parts of an ALL
        if gather.done:
            return
        if reply.status != Status.OK:
            self._finish(
                gather, encode_reply(Reply(reply.status, gather.request_id, body=reply.body))
            )
            return
        gather.bodies[pending.shard] = reply.body or b""
        gather.waiting.discard(pending.shard)
        if not gather.waiting:
            body = b"".join(gather.bodies[s] for s in sorted(gather.bodies))
            self._finish(gather, encode_reply(Reply(Status.OK, gather.request_id, body=body)))

    def _fail(self, pending: Pending, message: str, now: float) -> None:
        """End a request with UNAVAILABLE and let its key's next request go."""
        gather = pending.gather
        if gather is not None:
            if not gather.done:
                self._finish(gather, error_reply(gather.request_id, message, Status.UNAVAILABLE))
            return
        self._to_client(
            pending.client, error_reply(pending.request_id, message, Status.UNAVAILABLE)
        )
        self._forget(pending)
        self._release(pending, now)

    def _finish(self, gather: Gather, frames: list[bytes]) -> None:
        """Answer an ALL once; parts still out are ignored when they come back."""
        gather.done = True
        self._to_client(gather.client, frames)
        if gather.identity is not None:
            self._by_request.pop(gather.identity, None)

    def _forget(self, pending: Pending) -> None:
        """The request is answered: from now on the same id is a new request."""
        self._by_request.pop((pending.request_id, pending.kind, pending.key or b""), None)

    def _release(self, pending: Pending, now: float) -> None:
        assert pending.key is not None  # only keyed requests hold a token
        successor = self.tokens.release(pending.key)
        if successor is not None:
            self._route(successor, now)

    # --- workers ----------------------------------------------------------------------------

    def _on_ready(self, worker: bytes, claimed: int | None, last_token: int, now: float) -> None:
        self.issuer.advance_past(last_token)
        if self.registry.get(worker) is not None:
            self._remove_worker(worker, "registered again", now)
        shard = self.registry.register(worker, claimed, now, hand_out=self._claims_until is None)
        self._assign(worker, shard)
        if shard is None:
            log.info("worker %s registered as standby", worker.hex())
        else:
            log.info("worker %s owns shard %d of %d", worker.hex(), shard, self.config.shards)
            self._drain(shard, now)

    def _remove_worker(self, worker: bytes, why: str, now: float) -> None:
        record = self.registry.remove(worker)
        if record is None:
            return
        log.warning("worker %s (shard %s) removed: %s", worker.hex(), record.shard, why)
        # Oldest first, so each shard's queue keeps dispatch order; each key has at most one
        # request out, so requests of different keys may be reordered freely anyway.
        orphans = sorted((p for p in self._inflight.values() if p.worker == worker), key=_token)
        for pending in orphans:
            del self._inflight[pending.token]
            pending.worker = None
            pending.deadline = now + self.config.shard_wait_s
            self._shard_queues[pending.shard].append(pending)
        if orphans:
            log.info(
                "%d request(s) of worker %s wait for the next owner", len(orphans), worker.hex()
            )
        if record.shard is not None and self._claims_until is None:
            self._promote(record.shard, now)

    def _promote(self, shard: int, now: float) -> None:
        """Give an unowned shard to the oldest standby, if any, and send it what waited."""
        successor = self.registry.promote(shard)
        if successor is not None:
            log.info("standby %s takes over shard %d", successor.hex(), shard)
            self._assign(successor, shard)
            self._drain(shard, now)

    def _assign(self, worker: bytes, shard: int | None) -> None:
        """Tell a worker its shard, under a new ownership epoch (a fencing number)."""
        epoch = 0 if shard is None else self.issuer.issue()
        assign = Assign(shard, self.config.shards, epoch)
        self.outbox.append((Side.BACKEND, [worker, *encode_control(assign)]))

    def _drain(self, shard: int, now: float) -> None:
        """Send a newly owned shard the requests that waited for it, oldest first."""
        queue = self._shard_queues[shard]
        while queue and self.registry.owner(shard) is not None:
            pending = queue.popleft()
            if pending.gather is not None and pending.gather.done:
                continue
            self._route(pending, now)

    # --- helpers ----------------------------------------------------------------------------

    def _to_client(self, client: bytes, frames: list[bytes]) -> None:
        self.outbox.append((Side.FRONTEND, [client, *frames]))

    def _info(self) -> bytes:
        owned = self.registry.owned()
        return json.dumps(
            {
                "status": "ok" if all(owned) else "degraded",
                "shards": self.config.shards,
                "owned": owned,
                "workers": len(self.registry.identities()),
                "standbys": self.registry.standbys(),
                "epoch": self.issuer.epoch,
                "keys_in_flight": len(self.tokens),
            }
        ).encode()


def _token(pending: Pending) -> int:
    return pending.token
