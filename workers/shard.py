"""One shard as a worker holds it: the store, the idempotency memory, the fencing state, and
(unless the worker runs in memory) the shard's files.

Pure logic with no sockets, so every reply, both fencing rules and the group commit are tested
without ZeroMQ; the worker loop only gathers dispatches into a batch, calls
:meth:`Shard.handle_batch` and sends what it returns.

How one batch is served (durable shards)::

    lock the owner file, check the epoch is ours      else ShardMoved: nothing applied
    apply every request in memory, in order           replies built, records collected
    append all the batch's records with one write
    unlock
    fsync per policy (ALWAYS: one fsync per batch)    group commit
    -> the worker sends the replies, reads included   no reply shows data not yet on disk
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from workers import aof
from workers.idempotency import Memo, RequestMemory
from workers.persist import Durability, ShardFiles
from workers.store import Clock, Missing, TTLStore
from zkv.protocol import Dispatch, Kind, Reply, Request, Status, encode_entries

log = logging.getLogger(__name__)


class Shard:
    """The data of one shard and what fences it.

    Fencing by token: the broker stamps every dispatch with a token larger than any it issued
    before. A shard accepts a dispatch only if its token is larger than the last one it
    accepted, so a request delayed in a queue, or sent by a broker that no longer owns the
    cluster (an old instance still running after a restart), cannot overwrite newer writes.
    Refused requests change nothing, not even ``last_token``.

    Fencing by epoch (durable shards): see :meth:`handle_batch` and docs/persistence.md.

    Args:
        number: the shard number, 0-based.
        store: the shard's data; a new empty store if None.
        last_token: the newest token already accepted, e.g. the one this worker reported in
            READY when it re-registered.
        memory: the idempotency memory; a new empty one if None.
        files: the shard's files, None for a shard kept only in memory.
        epoch: the ownership epoch this shard was taken with.
    """

    def __init__(
        self,
        number: int,
        store: TTLStore | None = None,
        last_token: int = 0,
        *,
        memory: RequestMemory | None = None,
        files: ShardFiles | None = None,
        epoch: int = 0,
    ) -> None:
        self.number = number
        self.store = store if store is not None else TTLStore()
        self.last_token = last_token
        self.memory = memory if memory is not None else RequestMemory()
        self.files = files
        self.epoch = epoch

    def handle(self, dispatch: Dispatch) -> Reply:
        """One request as a batch of one (see :meth:`handle_batch`)."""
        return self.handle_batch([dispatch])[0]

    def handle_batch(self, dispatches: Sequence[Dispatch]) -> list[Reply]:
        """Apply a batch of dispatched requests and build their replies, in order.

        For a durable shard the whole batch runs under the owner lock with the epoch checked,
        its records are appended with one write, and they are fsynced per policy before this
        returns (see the module docstring). Reads take the same path: a former owner that
        was paused must not answer even a GET from a copy that may be stale, and the check
        costs about 3 microseconds a batch (flock, pread, unlock).

        Returns:
            One reply per dispatch; each echoes the request id (so the client matches it) and
            the dispatch token (so the broker knows which dispatch it answers).

        Raises:
            ShardMoved: a newer owner holds the shard; nothing was applied or written.
            LockTimeout: the owner file stayed locked; nothing was applied or written.
            DurabilityError: a write or fsync failed; the batch is applied in memory but may
                not be on disk, so the caller must stop serving without replying.
        """
        files = self.files
        if files is None:
            return [self._handle_one(dispatch, None) for dispatch in dispatches]
        records: list[bytes] = []
        with files.fenced():
            replies = [self._handle_one(dispatch, records) for dispatch in dispatches]
            if records:
                files.append(b"".join(records))
        files.commit()
        return replies

    def tick(self) -> None:
        """The worker's timers: EVERYSEC fsync and compaction (durable shards only).

        Raises:
            ShardMoved: found while compacting.
            DurabilityError: an fsync failed.
        """
        if self.files is not None:
            self.files.tick(self.store, self.memory)

    def close(self, sync: bool = True) -> None:
        """Let go of the files: fsync (unless ``sync`` is False) and close them."""
        if self.files is not None:
            self.files.close(sync)

    @property
    def source(self) -> str:
        """Where the data lives, for log lines: the log's path, or ``memory``."""
        return "memory" if self.files is None else str(self.files.log_path)

    def _handle_one(self, dispatch: Dispatch, records: list[bytes] | None) -> Reply:
        request = dispatch.request
        token = dispatch.token
        if token <= self.last_token:
            log.warning(
                "shard %d refused %s request %d: stale token %d, already accepted %d",
                self.number,
                request.kind.name,
                request.request_id,
                token,
                self.last_token,
            )
            message = f"stale token {token}: this shard already accepted {self.last_token}"
            # UNAVAILABLE, not ERROR: nothing is wrong with the request, only with its route.
            return Reply(Status.UNAVAILABLE, request.request_id, token, body=message.encode())
        self.last_token = token
        try:
            return self._apply(request, token, records)
        except Exception:
            # A bug, not bad input (the request was decoded): answer so the client does not
            # wait for a timeout, and keep the shard's data alive rather than crash. Memory
            # and log stay in step: store.set and store.delete raise before changing anything,
            # and nothing after them can fail on a decoded request.
            log.exception("internal error on %s request %d", request.kind.name, request.request_id)
            return Reply(Status.ERROR, request.request_id, token, body=b"internal worker error")

    def _apply(self, request: Request, token: int, records: list[bytes] | None) -> Reply:
        request_id = request.request_id
        store = self.store
        match request.kind:
            case Kind.GET:
                try:
                    value, deadline_ms = store.get(request.key)
                except Missing:
                    return Reply(Status.NOT_FOUND, request_id, token)
                return Reply(Status.OK, request_id, token, deadline_ms, value)
            case Kind.SET:
                value = request.value
                if value is None:  # decode_request never produces this; a caller bug
                    return Reply(Status.ERROR, request_id, token, body=b"SET needs a value")
                fingerprint = zlib.crc32(value)
                memo = self.memory.recall(request_id, Kind.SET, request.key, fingerprint)
                if memo is not None:
                    return self._from_memory(request, token, memo)
                deadline_ms = store.set(request.key, value, request.ttl_ms)
                self.memory.remember(
                    request_id, Memo(Kind.SET, request.key, fingerprint, Status.OK, deadline_ms)
                )
                if records is not None:
                    records.append(aof.encode_set(request_id, request.key, value, deadline_ms))
                return Reply(Status.OK, request_id, token, deadline_ms)
            case Kind.DEL:
                memo = self.memory.recall(request_id, Kind.DEL, request.key, 0)
                if memo is not None:
                    return self._from_memory(request, token, memo)
                if not store.delete(request.key):
                    return Reply(Status.NOT_FOUND, request_id, token)
                self.memory.remember(request_id, Memo(Kind.DEL, request.key, 0, Status.OK, None))
                if records is not None:
                    records.append(aof.encode_del(request_id, request.key))
                return Reply(Status.OK, request_id, token)
            case Kind.ALL:
                entries = store.entries(request.key, request.limit, request.keys_only)
                return Reply(Status.OK, request_id, token, body=encode_entries(entries))
            case Kind.PING:
                return Reply(Status.OK, request_id, token)
        message = f"{request.kind.name} is not a request a shard serves"
        return Reply(Status.ERROR, request_id, token, body=message.encode())

    def _from_memory(self, request: Request, token: int, memo: Memo) -> Reply:
        log.debug(
            "shard %d: %s request %d is a retry, answered from memory",
            self.number,
            request.kind.name,
            request.request_id,
        )
        return Reply(Status(memo.status), request.request_id, token, memo.deadline_ms)


@dataclass(frozen=True, slots=True)
class Takeover:
    """The outcome of :func:`take_shard`.

    Attributes:
        shard: the shard now held.
        stored_epoch: the epoch the owner file held before (0 for a shard in memory).
        kept: True if the data already in this process's memory was kept (no replay).
    """

    shard: Shard
    stored_epoch: int
    kept: bool


def take_shard(
    number: int,
    assigned_epoch: int,
    held: Shard | None,
    durability: Durability | None,
    clock: Clock,
    progress: Callable[[], None] | None = None,
) -> Takeover:
    """Take shard ``number``, as ASSIGN says, with ownership epoch ``assigned_epoch``.

    A shard kept in memory only (``durability`` None) starts empty unless this process holds
    it already. A durable shard is claimed in its owner file (see ShardFiles.take), then its
    log is replayed, unless this process already holds it and the stored epoch is still its
    own: then nobody wrote to it since, and the memory is exactly the log.

    Args:
        number: the shard.
        assigned_epoch: the epoch in the ASSIGN.
        held: the shard this process holds, if any; it must be ``number`` or None (the caller
            lets go of another shard first).
        durability: where shards are stored; None for a worker kept in memory.
        clock: the wall clock of the new store (Unix ms).
        progress: called now and then during a long replay (the worker heartbeats).

    Raises:
        aof.CorruptLog: the log is damaged before its end.
        LockTimeout, OwnershipError: the owner file cannot be used now.
        ShardMoved: a newer owner took it during the replay.
        DurabilityError: a write or fsync failed.
    """
    if held is not None and held.number != number:
        raise ValueError(f"take_shard({number}) while holding shard {held.number}: a caller bug")
    if durability is None:
        if held is not None:
            held.epoch = max(assigned_epoch, held.epoch)
            return Takeover(held, 0, kept=True)
        return Takeover(Shard(number, TTLStore(clock), epoch=assigned_epoch), 0, kept=False)
    files = held.files if held is not None and held.files is not None else None
    opened = files is None
    if files is None:
        files = ShardFiles(durability, number)
    try:
        stored = files.take(assigned_epoch)
        if held is not None and stored == held.epoch:
            held.epoch = files.epoch
            return Takeover(held, stored, kept=True)
        store = TTLStore(clock)
        memory = RequestMemory()
        files.replay(store, memory, progress)
    except BaseException:
        if opened:
            files.close(sync=False)
        raise
    last_token = 0 if held is None else held.last_token
    shard = Shard(number, store, last_token, memory=memory, files=files, epoch=files.epoch)
    return Takeover(shard, stored, kept=False)
