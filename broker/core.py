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
within ``worker_timeout_s``, or that dies, fails its requests as UNAVAILABLE with "outcome
unknown" (the write may or may not have been applied). Either way the key's token passes on.

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
        self._next_heartbeat = now + config.heartbeat_interval_s

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
        match request.kind:
            case Kind.GET | Kind.SET | Kind.DEL:
                pending = Pending(
                    client,
                    request.request_id,
                    body,
                    key_shard(request.key, self.config.shards),
                    request.key,
                )
                if self.tokens.acquire(request.key, pending):
                    self._route(pending, now)
            case Kind.ALL:
                gather = Gather(client, request.request_id, set(range(self.config.shards)))
                for shard in range(self.config.shards):
                    self._route(Pending(client, request.request_id, body, shard, None, gather), now)
            case Kind.PING:
                self._to_client(
                    client, encode_reply(Reply(Status.OK, request.request_id, body=self._info()))
                )

    def on_worker(self, frames: list[bytes], now: float) -> None:
        """A worker's message: ``[identity, header, (body)]``."""
        worker, body = frames[0], frames[1:]
        try:
            message = decode_from_worker(body)
        except ProtocolError as exc:
            log.warning("bad message from worker %s dropped: %s", worker.hex(), exc)
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
                self._fail(
                    queue.popleft(),
                    f"shard {shard} has no worker (waited {self.config.shard_wait_s} s)",
                    now,
                )
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

    def next_timer(self, now: float) -> float:
        """Seconds until ``on_timer`` has something to do (the poll timeout)."""
        due = self._next_heartbeat
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
            self._to_client(pending.client, frames)
            self._release(pending, now)

    def _gathered(self, pending: Pending, reply: Reply) -> None:
        gather = pending.gather
        assert gather is not None  # only called for parts of an ALL
        if gather.done:
            return
        if reply.status != Status.OK:
            gather.done = True
            self._to_client(
                gather.client,
                encode_reply(Reply(reply.status, gather.request_id, body=reply.body)),
            )
            return
        gather.bodies[pending.shard] = reply.body or b""
        gather.waiting.discard(pending.shard)
        if not gather.waiting:
            gather.done = True
            body = b"".join(gather.bodies[s] for s in sorted(gather.bodies))
            self._to_client(
                gather.client, encode_reply(Reply(Status.OK, gather.request_id, body=body))
            )

    def _fail(self, pending: Pending, message: str, now: float) -> None:
        """End a request with UNAVAILABLE and let its key's next request go."""
        gather = pending.gather
        if gather is not None:
            if not gather.done:
                gather.done = True
                self._to_client(
                    gather.client, error_reply(gather.request_id, message, Status.UNAVAILABLE)
                )
            return
        self._to_client(
            pending.client, error_reply(pending.request_id, message, Status.UNAVAILABLE)
        )
        self._release(pending, now)

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
        shard = self.registry.register(worker, claimed, now)
        self.outbox.append(
            (Side.BACKEND, [worker, *encode_control(Assign(shard, self.config.shards))])
        )
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
        lost = [p for p in self._inflight.values() if p.worker == worker]
        for pending in lost:
            del self._inflight[pending.token]
        for pending in lost:
            self._fail(pending, f"worker of shard {pending.shard} went away; outcome unknown", now)
        if record.shard is not None:
            successor = self.registry.promote(record.shard)
            if successor is not None:
                log.info("standby %s takes over shard %d", successor.hex(), record.shard)
                self.outbox.append(
                    (
                        Side.BACKEND,
                        [successor, *encode_control(Assign(record.shard, self.config.shards))],
                    )
                )
                self._drain(record.shard, now)

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
