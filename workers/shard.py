"""One shard as a worker holds it: the store, the idempotency memory, the fencing state, and
(unless the worker runs in memory) the shard's files.

Pure logic with no sockets, so every reply, both fencing rules and the group commit are tested
without ZeroMQ; the worker loop only gathers dispatches into a batch, calls
:meth:`Shard.handle_batch` and sends what it returns. A dispatch is one request (DISPATCH:
a plain :data:`KeyedDispatch` tuple for GET, SET and DEL, answered with REPLY frames; a
:class:`Dispatch` for ALL and PING) or many under one token (BATCH_DISPATCH, a
:class:`DispatchBatch`): a batch is fenced once, by its token, and its requests are applied in
order, each with its own idempotency memory, log record and sub-reply, in the same group commit
as everything else received in the pass.

How one batch is served (durable shards)::

    lock the owner file, check the epoch is ours      else ShardMoved: nothing applied
    apply every request in memory, in order           replies built, records collected
    append all the batch's records with one write
    unlock
    fsync per policy (ALWAYS: one fsync per batch)    group commit
    -> the worker sends the replies, reads included   no reply shows data not yet on disk
       (a GET before the batch's first write is answered at once, inside the fence: it can
       only show data that was on disk when the batch began)
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from workers import aof
from workers import store as store_module
from workers.aof import CorruptLog, DurabilityError, NoSpace
from workers.idempotency import (
    MAX_CLOCK_SKEW_S,
    MAX_MEMO_BODY_BYTES,
    NOT_REMEMBERED,
    Memo,
    RequestMemory,
)
from workers.persist import SET_OVERHEAD_BYTES, Durability, ShardFiles
from workers.store import (
    Clock,
    Event,
    HighWaterClock,
    ListingOverRoom,
    ListingTooLarge,
    Missing,
    TTLStore,
)
from zkv.hashing import key_shard
from zkv.logs import LogLimiter
from zkv.protocol import (
    EXTENDED_OP,
    MAX_LIST_KEYS,
    MAX_REPLY_BYTES,
    OUTCOME_UNKNOWN,
    REPLY_TOO_LARGE,
    STAMP_MASK,
    Dispatch,
    DispatchBatch,
    KeyedDispatch,
    Kind,
    Op,
    Reply,
    Request,
    Status,
    batch_reply_frames,
    encode_entries,
    encode_old_item,
    encode_reply,
    incr_body,
    pack_reply,
    reply_frames,
    stamp_age_ms,
    token_body,
    versioned_body,
)

log = logging.getLogger(__name__)
client_log = LogLimiter(log)  # lines that clients' requests can cause, rate-limited

# Event codes of the events hook (Shard.events; zkv.protocol.EventKind has the same numbers).
EVENT_SET = 1
EVENT_DELETE = 2
EVENT_INCR = 4
EVENT_TTL = 5  # EXPIRE, persist, GET touch
EVENT_EXPIRE = store_module.EVENT_EXPIRE  # a key removed at its deadline (by the store)


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
        # Called now and then during a long replay (the worker heartbeats); see take_shard.
        self.progress: Callable[[], None] | None = None
        # The bytes of GET values the answers of one handle_batch call may still carry, shared
        # by all its messages (see handle_batch): reset by each call.
        self._room = MAX_REPLY_BYTES
        # Requests answered, by ``kind << 3 | status`` (TALLY_SIZE entries), for the worker's
        # REPORT. The batch loop counts its common answers in locals and adds them here once a
        # batch; other paths add here directly (one list increment, tens of ns). A batch whose
        # append met an unforeseen full disk is answered twice (see _no_space): tallied twice.
        self.tally = [0] * TALLY_SIZE
        self.expired = 0  # keys the worker's active expiry removed since it took the shard
        self._events: list[Event] | None = None  # see the events property
        self._events_mark = 0  # len(events) when the current handle_batch call began
        # The cluster's shard count, set by the worker once it took the shard (0: unknown): with
        # it a fenced write tells a lock of this shard (checked exactly) from another's.
        self.shards = 0
        # The bound on the worker's own records (locks, fence tokens): see RESERVED_MAX_BYTES.
        self.reserved_max_bytes = RESERVED_MAX_BYTES

    # --- the events hook (design section 8) ---------------------------------------------------

    @property
    def events(self) -> list[Event] | None:
        """The changes applied since the owner last drained this list, in apply order, or None
        (the default: events off, and no cost beyond one test per write).

        Each is ``(event_code, key, version, deadline_ms or 0)``: EVENT_SET, EVENT_DELETE,
        EVENT_INCR, EVENT_TTL (EXPIRE, persist, GET touch) for the writes this shard applies,
        EVENT_EXPIRE for each key removed at its deadline, by the worker's active expiry
        (``store.expire``) or by a read that found it expired, with the version the key had.
        Never for the worker's own keys (0x00 first: locks, fence tokens). Nothing is added
        for a write that was refused or answered from memory. The loop that owns the shard
        drains it (and publishes) once the pass's replies are sent, so an event never announces
        a write that was not acknowledged; it must bound the list by draining every pass.
        """
        return self._events

    @events.setter
    def events(self, events: list[Event] | None) -> None:
        self._events = events
        self.store.events = events  # expiries are found by the store

    def handle(self, dispatch: Dispatch) -> Reply:
        """One request as a batch of one (see :meth:`handle_batch`)."""
        reply = self.handle_batch([dispatch])[0]
        assert isinstance(reply, Reply)  # a Dispatch is answered with a Reply
        return reply

    def handle_batch(
        self,
        dispatches: Sequence[Message],
        early: Callable[[list[bytes]], None] | None = None,
        room: int | None = None,
    ) -> list[Answer | None]:
        """Apply a batch of dispatched messages and build their answers, in order.

        A message is one request (a :data:`KeyedDispatch` for a GET, SET or DEL, as the worker
        decodes them, else a :class:`Dispatch`) or a :class:`DispatchBatch` (many requests
        under one token, applied in order); the worker gathers every message of one receive
        pass into one call. For a durable shard the whole call runs under the owner
        lock with the epoch checked, its records are appended with one write, and they are
        fsynced per policy before this returns (see the module docstring). Reads take the same
        path: a former owner that was paused must not answer even a GET from a copy that may
        be stale, and the check costs about 3 microseconds a batch (flock, pread, unlock).

        A GET that comes alone (not in a DispatchBatch) before the batch's first write need
        not wait for that write or its fsync: everything it can read was on disk before the
        batch began (under ALWAYS the previous batch was fsynced before its replies). With
        ``early`` given, such a GET's REPLY frames are passed to it at once, inside the fence,
        and its answer in the returned list is None. Reads after a write still wait: they may
        show it.

        The GET values of one call, every message together (lone GETs, those of every batch,
        those answered early), are bounded by MAX_REPLY_BYTES: the worker gathers up to 8,192
        requests a pass (256 BATCH_DISPATCHes of GETs of a 1 MiB value once built 1 GB in one
        call, before any reply was sent). A GET whose value does not fit, and every GET of the
        call after it, is answered BUSY (``reply too large``; not read, the client retries it
        after a backoff). A value is read before it is known not to fit: the one value read
        past the bound is the most this costs beyond it, and the first value of a call always
        fits (MAX_REPLY_BYTES >= MAX_VALUE_BYTES), so a lone GET of any value is served.
        ``room`` is that budget (None: MAX_REPLY_BYTES); the worker passes MAX_REPLY_BYTES less
        the reply bytes still queued in its socket (zkv.zmqio.SendLedger), so GETs are BUSY
        while that queue is full.

        Returns:
            One answer per message: the frames of a REPLY for a KeyedDispatch, a
            :class:`Reply` for a Dispatch, the frames of a BATCH_REPLY for a DispatchBatch
            (one sub-reply per request, in order), or None for a reply already given to
            ``early``. Each echoes the request ids (so the client matches them) and the token
            (so the broker knows which dispatch it answers).

        Raises:
            ShardMoved: a newer owner holds the shard; nothing was applied or written.
            LockTimeout: the owner file stayed locked; nothing was applied or written.
            DurabilityError: a write or fsync failed; the batch is applied in memory but may
                not be on disk, so the caller must stop serving without replying. A full disk
                is not such a failure: a batch that would not fit has its SETs refused
                (NO_SPACE) before anything is applied (ShardFiles.refusal), and one the
                estimate missed is undone and answered so, see :meth:`_no_space`.
        """
        files = self.files
        # This call's budget of GET values, see above (None: all of it).
        self._room = MAX_REPLY_BYTES if room is None else room
        if self._events is not None:  # where this call's events start (_no_space undoes them)
            self._events_mark = len(self._events)
        if files is None:
            self.memory.begin(self.store.clock())
            return [self._handle_message(dispatch, None) for dispatch in dispatches]
        if files.tight or files.no_space is not None:  # a short disk: measure, see refusal()
            refused = files.refusal(*write_bytes(dispatches))
            if refused is not None:
                return self._refusing_writes(files, dispatches, *refused)
        records: list[bytes] = []
        last_token = self.last_token
        full: NoSpace | None = None
        store = self.store
        files.fence()  # what fenced() does, without a generator's cost on every batch
        try:
            now = store.clock()
            self.memory.begin(now)  # the time of this batch's writes; forgets the old
            if store.expired_ms > files.time_ms:
                early = None  # a key expired unlogged: no reply before the TIME record below
            if early is None:
                answers = [self._handle_message(dispatch, records) for dispatch in dispatches]
            else:
                answers = []
                for dispatch in dispatches:
                    if records:  # a write came before: everything after it waits for it
                        answers.append(self._handle_message(dispatch, records))
                    elif type(dispatch) is tuple and dispatch[1] == _GET:  # only durable data
                        frames = self._handle_keyed(dispatch, None)
                        if store.expired_ms > files.time_ms:  # it saw a key expire: wait
                            answers.append(frames)
                        else:
                            early(frames)
                            answers.append(None)
                    elif (
                        type(dispatch) is Dispatch
                        and dispatch.request.kind == _GET
                        and dispatch.request.ttl_ms is None  # not a touch: that is a write
                    ):
                        reply = self._handle_one(dispatch, None)
                        if store.expired_ms > files.time_ms:
                            answers.append(reply)
                        else:
                            early(encode_reply(reply))
                            answers.append(None)
                    else:
                        answers.append(self._handle_message(dispatch, records))
            self._append(files, records, now)
        except NoSpace as exc:
            full = exc
        finally:
            files.unfence()
        if full is not None:
            return self._no_space(files, dispatches, answers, last_token, full)
        files.commit()
        return answers

    # --- a full disk (see "a full disk" in workers/persist.py) -------------------------------

    def _no_space(
        self,
        files: ShardFiles,
        dispatches: Sequence[Message],
        answers: list[Answer | None],
        last_token: int,
        full: NoSpace,
    ) -> list[Answer | None]:
        """A batch whose append found the disk full although the free space estimate said it
        would fit (another process filled the disk): nothing of it is on disk (the log was
        truncated back), so undo it in memory too, by rebuilding the store and the memory
        from the log (one replay, heartbeating: no per-request undo log on the hot path), then
        answer it again with its writes refused. GETs already answered early stay answered.
        refuse_writes() then holds writes off until the real free space has room for this
        batch above the reserve, so this cannot come back once a second."""
        failed = sum(write_bytes(dispatches))
        if self._events is not None:  # the batch's changes are undone: announce none of them
            del self._events[self._events_mark :]
        try:
            store = TTLStore(self.store.clock)
            memory = RequestMemory(self.memory.keep_ms, self.memory.max_bytes)
            files.replay(store, memory, self.progress)
        except CorruptLog as exc:  # the log was sound a batch ago: treat it as a failed disk
            raise DurabilityError(f"rebuilding shard {self.number} from its log: {exc}") from exc
        store.events = self._events
        self.store = store
        self.memory = memory
        self.last_token = last_token
        files.refuse_writes(str(full), failed)
        again = self._refusing_writes(files, dispatches, str(full), False)
        return [
            None if done is None else answer for done, answer in zip(answers, again, strict=True)
        ]

    def _append(self, files: ShardFiles, records: list[bytes], now: int) -> None:
        """Append a batch's records (inside the fence), headed by the clock's high-water mark
        (aof.TimeRecord) when due: at least every TIME_RECORD_INTERVAL_MS of writes, and
        whenever a key was seen to expire since the last one, read or not, so no reply shows
        a key gone that a replay with a clock stepped back would bring back."""
        expired_ms = self.store.expired_ms
        if expired_ms > files.time_ms or (
            records and now - files.time_ms >= aof.TIME_RECORD_INTERVAL_MS
        ):
            records.insert(0, files.time_record(max(now, expired_ms)))
        if records:
            files.append(b"".join(records))

    def _refusing_writes(
        self, files: ShardFiles, dispatches: Sequence[Message], reason: str, deletes: bool
    ) -> list[Answer | None]:
        """A batch on a short disk: reads served as usual, fenced like any batch; SETs refused
        before anything is applied (a retry of an applied one is answered from memory); DELs
        applied and logged if ``deletes`` (they fit in the reserve: how users free space),
        else refused like SETs (a DEL of a missing key is NOT_FOUND). A refusal here, NO_SPACE
        or that NOT_FOUND, is remembered in memory only: there is no room to log it
        (_no_space_refusal)."""
        records: list[bytes] | None = [] if deletes else None
        last_token = self.last_token
        full: NoSpace | None = None
        store = self.store
        files.fence()
        try:
            if records is not None:
                self.memory.begin(store.clock())
            answers: list[Answer | None] = [
                self._refusing_message(dispatch, reason, records) for dispatch in dispatches
            ]
            if records is not None:
                # As in handle_batch, within the reserve (``deletes``: there is room for it):
                # a batch that saw a key expire logs TIME before its replies even with no DEL.
                self._append(files, records, store.clock())
        except NoSpace as exc:
            full = exc
        finally:
            files.unfence()
        if full is not None:
            return self._no_space(files, dispatches, answers, last_token, full)
        if records:
            files.commit()
        return answers

    def _refusing_message(
        self, dispatch: Message, reason: str, records: list[bytes] | None
    ) -> Answer:
        if type(dispatch) is tuple:
            token, kind, request_id, key, value, ttl_ms, stamp = dispatch
            if (kind != _SET and kind != _DEL) or token <= self.last_token:
                return self._handle_keyed(dispatch, None)  # a read, or refused as stale
            self.last_token = token
            status, deadline_ms, body = self._refuse_write(
                kind, request_id, key, value, ttl_ms, stamp, reason, records
            )
            self.tally[kind << 3 | status] += 1
            return reply_frames(status, request_id, token, deadline_ms, body)
        if isinstance(dispatch, DispatchBatch):
            token = dispatch.token
            if token <= self.last_token:
                return self._handle_ops(dispatch, None)  # refused as stale
            self.last_token = token
            out = []
            for kind, request_id, key, value, ttl_ms, stamp in dispatch.ops:
                if kind == _SET or kind == _DEL:
                    status, deadline_ms, body = self._refuse_write(
                        kind, request_id, key, value, ttl_ms, stamp, reason, records
                    )
                elif kind == _EXTENDED:
                    request: Request = value  # type: ignore[assignment]
                    status, deadline_ms, body = self._refuse_ext(request, reason)
                    self.tally[request.kind << 3 | status] += 1
                    out.append(pack_reply(status, request_id, token, deadline_ms, body))
                    continue
                elif not kind:  # malformed; key holds the message
                    status, deadline_ms, body = _ERROR, None, b"malformed request: " + key
                else:
                    status, deadline_ms, body = self._apply(
                        kind, request_id, key, value, ttl_ms, stamp, None
                    )
                self.tally[kind << 3 | status] += 1
                out.append(pack_reply(status, request_id, token, deadline_ms, body))
            return batch_reply_frames(token, out)
        request = dispatch.request  # type: ignore[union-attr]  # a Dispatch
        token = dispatch.token  # type: ignore[union-attr]
        if token > self.last_token and _is_extended(request):
            self.last_token = token
            status, deadline_ms, body = self._refuse_ext(request, reason)
            self.tally[request.kind << 3 | status] += 1
            return Reply(status, request.request_id, token, deadline_ms, body)
        if request.kind not in (Kind.SET, Kind.DEL) or token <= self.last_token:
            return self._handle_one(dispatch, None)  # type: ignore[arg-type]
        self.last_token = token
        status, deadline_ms, body = self._refuse_write(
            request.kind,
            request.request_id,
            request.key,
            request.value,
            request.ttl_ms,
            request.stamp,
            reason,
            records,
        )
        self.tally[request.kind << 3 | status] += 1
        return Reply(status, request.request_id, token, deadline_ms, body)

    def _refuse_write(
        self,
        kind: int,
        request_id: int,
        key: bytes,
        value: bytes | None,
        ttl_ms: int | None,
        stamp: int | None,
        reason: str,
        records: list[bytes] | None,
    ) -> tuple[Status, int | None, bytes | None]:
        if kind == _DEL and records is not None:  # room for it: applied and logged
            try:
                return self._apply(kind, request_id, key, value, ttl_ms, stamp, records)
            except Exception:  # a bug: see _handle_one
                log.exception("internal error on DEL request %d", request_id)
                return _ERROR, None, b"internal worker error"
        fingerprint = zlib.crc32(value) if kind == _SET and value is not None else 0
        memo = self.memory.recall(request_id, kind, key, fingerprint)
        if memo is not None:
            return self._from_memory(kind, request_id, memo)
        if stamp is not None and self._out_of_window(stamp):
            return self._stamp_refusal(kind, request_id, stamp)
        if kind == _DEL:
            try:
                self.store.get(key)
            except Missing:
                # Remembered in memory only, as a NO_SPACE is (no room to log its MEMO).
                if request_id:
                    if self.memory.full:
                        return _BUSY, None, _MEMORY_FULL
                    self.memory.remember_write(request_id, _DEL, key, 0, None, _NOT_FOUND)
                return _NOT_FOUND, None, None
        message = (
            f"shard {self.number}: the disk is full ({reason}); the write was not "
            f"applied. Reads and deletes are served; writes resume by themselves once space "
            f"is freed"
        )
        return self._no_space_refusal(kind, request_id, key, fingerprint, message)

    def _refuse_ext(self, request: Request, reason: str) -> tuple[Status, int | None, bytes | None]:
        """An issue-12 request on a short disk: a read (GET without touch, FENCE_CHECK) is
        served; a write is answered from memory if applied before, refused if stamped outside
        the window, else refused NO_SPACE before anything is applied, as a SET is."""
        if _is_ext_read(request):
            try:
                return self._apply_ext(request, None)
            except Exception:  # a bug: see _handle_one
                log.exception("internal error on request %d", request.request_id)
                return _ERROR, None, b"internal worker error"
        kind = request.kind
        request_id = request.request_id
        fingerprint = _fingerprint(request)
        memo = self.memory.recall(request_id, kind, request.key, fingerprint)
        if memo is not None:
            return self._recalled(request, memo)
        if request.stamp is not None and self._out_of_window(request.stamp):
            return self._stamp_refusal(kind, request_id, request.stamp)
        message = (
            f"shard {self.number}: the disk is full ({reason}); the {kind.name} was not "
            f"applied. Reads and deletes are served; writes resume by themselves once space "
            f"is freed"
        )
        return self._no_space_refusal(kind, request_id, request.key, fingerprint, message)

    def _no_space_refusal(
        self, kind: int, request_id: int, key: bytes, fingerprint: int, message: str
    ) -> tuple[Status, int | None, bytes | None]:
        """NO_SPACE, remembered in memory only (there is no room to log it): a late second
        copy reaching this process after space is freed is answered NO_SPACE, not applied.
        Not logged, so a restart, a failover, or a batch undone by a full disk (which rebuilds
        the memory from the log) forgets it until the next compaction writes the memory out:
        docs/persistence.md section 6. BUSY if the memory is full (not applied either; the
        client retries)."""
        if request_id:
            if self.memory.full:
                return _BUSY, None, _MEMORY_FULL
            self.memory.remember_refusal(
                request_id, kind, key, fingerprint, _NO_SPACE, None, message.encode()
            )
        return _NO_SPACE, None, message.encode()

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

    def _handle_message(self, dispatch: Message, records: list[bytes] | None) -> Answer:
        if type(dispatch) is tuple:
            return self._handle_keyed(dispatch, records)
        if isinstance(dispatch, DispatchBatch):
            return self._handle_ops(dispatch, records)
        return self._handle_one(dispatch, records)  # type: ignore[arg-type]  # a Dispatch

    def _fresh(self, token: int, what: Request | KeyedDispatch | int) -> bool:
        """Fencing by token: accept ``token`` (and remember it) only if it is newer.

        Args:
            token: the dispatch's token.
            what: for the log line of a refusal: the request, or a batch's size.
        """
        if token > self.last_token:
            self.last_token = token
            return True
        if isinstance(what, int):
            refused = f"a batch of {what} requests"
        elif isinstance(what, Request):
            refused = f"{what.kind.name} request {what.request_id}"
        else:
            refused = f"{Kind(what[1]).name} request {what[2]}"
        log.warning(
            "shard %d refused %s: stale token %d, already accepted %d",
            self.number,
            refused,
            token,
            self.last_token,
        )
        return False

    def _stale_message(self, token: int) -> bytes:
        return f"stale token {token}: this shard already accepted {self.last_token}".encode()

    def _handle_keyed(self, dispatch: KeyedDispatch, records: list[bytes] | None) -> list[bytes]:
        """A lone GET, SET or DEL: what :meth:`_handle_one` does for a Dispatch, through the
        same :meth:`_apply`, from the fields the worker decoded and to REPLY frames, with no
        Request or Reply object in between (one request at a time, this is the whole path)."""
        token, kind, request_id, key, value, ttl_ms, stamp = dispatch
        tally = self.tally
        if not self._fresh(token, dispatch):
            tally[kind << 3 | _UNAVAILABLE] += 1
            message = self._stale_message(token)  # UNAVAILABLE: see _handle_one
            return reply_frames(_UNAVAILABLE, request_id, token, None, message)
        try:
            if kind == _GET:  # the common read, inline: _apply's GET branch, without the call
                room = self._room
                if room < 0:
                    tally[_GET_BUSY] += 1
                    return reply_frames(_BUSY, request_id, token, None, _TOO_LARGE)
                try:
                    found, deadline_ms = self.store.get(key)
                except Missing:
                    tally[_GET_MISS] += 1
                    return reply_frames(_NOT_FOUND, request_id, token, None, None)
                room -= len(found)
                self._room = room
                if room < 0:
                    tally[_GET_BUSY] += 1
                    return reply_frames(_BUSY, request_id, token, None, _TOO_LARGE)
                tally[_GET_OK] += 1
                return reply_frames(_OK, request_id, token, deadline_ms, found)
            status, deadline_ms, body = self._apply(
                kind, request_id, key, value, ttl_ms, stamp, records
            )
        except Exception:  # a bug: see _handle_one
            log.exception("internal error on %s request %d", Kind(kind).name, request_id)
            tally[kind << 3 | _ERROR] += 1
            return reply_frames(_ERROR, request_id, token, None, b"internal worker error")
        tally[kind << 3 | status] += 1
        return reply_frames(status, request_id, token, deadline_ms, body)

    def _handle_one(self, dispatch: Dispatch, records: list[bytes] | None) -> Reply:
        """A Dispatch (ALL, PING, or a request the peek did not take), tallied."""
        reply = self._handle_request(dispatch, records)
        self.tally[dispatch.request.kind << 3 | reply.status] += 1
        return reply

    def _handle_request(self, dispatch: Dispatch, records: list[bytes] | None) -> Reply:
        request = dispatch.request
        token = dispatch.token
        if not self._fresh(token, request):
            # UNAVAILABLE, not ERROR: nothing is wrong with the request, only with its route.
            message = self._stale_message(token)
            return Reply(Status.UNAVAILABLE, request.request_id, token, body=message)
        try:
            if _is_extended(request):
                status, deadline_ms, body = self._apply_ext(request, records)
            else:
                status, deadline_ms, body = self._apply(
                    request.kind,
                    request.request_id,
                    request.key,
                    request.value,
                    request.ttl_ms,
                    request.stamp,
                    records,
                    request,
                )
        except Exception:
            # A bug, not bad input (the request was decoded): answer so the client does not
            # wait for a timeout, and keep the shard's data alive rather than crash. Memory
            # and log stay in step: store.set and store.delete raise before changing anything,
            # and nothing after them can fail on a decoded request.
            log.exception("internal error on %s request %d", request.kind.name, request.request_id)
            return Reply(Status.ERROR, request.request_id, token, body=b"internal worker error")
        return Reply(status, request.request_id, token, deadline_ms, body)

    def _handle_ops(self, batch: DispatchBatch, records: list[bytes] | None) -> list[bytes]:
        """A DispatchBatch: one token for all its requests, each applied and answered on its
        own (its idempotency memory, its record, its error), in order. No Request or Reply
        objects are made: this runs once per operation at full speed."""
        token = batch.token
        ops = batch.ops
        tally = self.tally
        if not self._fresh(token, len(ops)):
            for op in ops:
                tally[_op_kind(op) << 3 | _UNAVAILABLE] += 1
            message = self._stale_message(token)
            return batch_reply_frames(
                token, [pack_reply(_UNAVAILABLE, op[1], token, None, message) for op in ops]
            )
        apply = self._apply
        store = self.store
        get = store.get
        put = store.set
        memory = self.memory
        recall = memory.recall
        known = memory.known
        max_bytes = memory.max_bytes
        # The stamp test of a new stamped write, bounds made once per batch (begin): one
        # subtraction, one mask, one comparison (see RequestMemory and zkv.protocol.stamp_range).
        stamp_low = memory.stamp_low
        stamp_span = memory.stamp_span
        stamp_mask = STAMP_MASK
        remember = self.memory.remember_write
        keep = None if records is None else records.append
        encode_setv = aof.encode_setv
        crc32 = zlib.crc32
        events = self._events  # the events hook: None (off) costs one test per SET
        # One clock read for the batch's SETs, not one per SET: their deadlines count from
        # when the batch began to be applied, a few milliseconds at most before each SET.
        now = store.clock()
        out: list[bytes] = []
        append = out.append
        # The bytes of values the call's answers may still carry (handle_batch: MAX_REPLY_BYTES
        # for all its messages): a GET whose value does not fit, and every GET after it, is
        # answered BUSY and its value dropped, so a batch of 1,000 GETs of a 1 MiB value holds
        # 64 MiB here, not a gigabyte. The one value read past the bound is the most this costs
        # beyond it. Kept in a local for the loop, and given back below.
        room = self._room
        # The answers, counted per batch: a GET that found its key (the hottest path) adds
        # nothing; a miss or a new SET adds 1 to a local; every other path, rarer, tallies
        # itself and adds 1 to ``others``. The found GETs are what is left, after the loop.
        get_miss = set_ok = others = 0
        for kind, request_id, key, value, ttl_ms, stamp in ops:
            if kind == _GET:  # the common read, inline: _apply's GET branch
                if room < 0:
                    tally[_GET_BUSY] += 1
                    others += 1
                    append(pack_reply(_BUSY, request_id, token, None, _TOO_LARGE))
                    continue
                try:
                    found, deadline_ms = get(key)
                except Missing:
                    get_miss += 1
                    append(pack_reply(_NOT_FOUND, request_id, token, None, None))
                    continue
                except Exception:  # a bug: see _handle_one
                    log.exception("internal error on GET request %d of a batch", request_id)
                    tally[_GET << 3 | _ERROR] += 1
                    others += 1
                    append(pack_reply(_ERROR, request_id, token, None, b"internal worker error"))
                    continue
                room -= len(found)
                if room < 0:
                    tally[_GET_BUSY] += 1
                    others += 1
                    append(pack_reply(_BUSY, request_id, token, None, _TOO_LARGE))
                    continue
                append(pack_reply(_OK, request_id, token, deadline_ms, found))
                continue
            if kind == _SET:  # the common write, inline: _apply's SET branch for a new request
                try:
                    fingerprint = crc32(value)  # type: ignore[arg-type]  # a SET op has a value
                    if not known(request_id) or recall(request_id, _SET, key, fingerprint) is None:
                        if stamp is not None and (stamp - stamp_low) & stamp_mask > stamp_span:
                            status, _, body = self._stamp_refusal(_SET, request_id, stamp)
                            tally[_SET << 3 | status] += 1
                            others += 1
                            append(pack_reply(status, request_id, token, None, body))
                            continue
                        if memory.used >= max_bytes and request_id:  # see RequestMemory.full
                            tally[_SET << 3 | _BUSY] += 1
                            others += 1
                            append(pack_reply(_BUSY, request_id, token, None, _MEMORY_FULL))
                            continue
                        deadline_ms = put(key, value, ttl_ms, now)  # type: ignore[arg-type]
                        remember(request_id, _SET, key, fingerprint, deadline_ms)
                        if keep is not None:
                            version = store.last_version
                            keep(encode_setv(request_id, key, value, deadline_ms, version))  # type: ignore[arg-type]
                        if events is not None:
                            events.append((EVENT_SET, key, store.last_version, deadline_ms or 0))
                        set_ok += 1
                        append(pack_reply(_OK, request_id, token, deadline_ms, None))
                        continue
                except Exception:  # a bug: see _handle_one
                    log.exception("internal error on SET request %d of a batch", request_id)
                    tally[_SET << 3 | _ERROR] += 1
                    others += 1
                    append(pack_reply(_ERROR, request_id, token, None, b"internal worker error"))
                    continue
                # A retry: _apply answers it from memory.
            elif kind == _EXTENDED:  # an issue-12 request, whole in the value slot: slow branch
                request: Request = value  # type: ignore[assignment]
                self._room = room  # its reads share the budget
                try:
                    status, deadline_ms, body = self._apply_ext(request, records)
                except Exception:  # a bug: see _handle_one
                    log.exception("internal error on request %d of a batch", request_id)
                    status, deadline_ms, body = _ERROR, None, b"internal worker error"
                room = self._room
                tally[request.kind << 3 | status] += 1
                others += 1
                append(pack_reply(status, request_id, token, deadline_ms, body))
                continue
            elif not kind:  # malformed; key holds the message (tallied as kind 0)
                tally[_ERROR] += 1
                others += 1
                append(pack_reply(_ERROR, request_id, token, None, b"malformed request: " + key))
                continue
            try:
                status, deadline_ms, body = apply(
                    kind, request_id, key, value, ttl_ms, stamp, records
                )
            except Exception:  # a bug: see _handle_one
                log.exception("internal error on request %d of a batch", request_id)
                status, deadline_ms, body = _ERROR, None, b"internal worker error"
            tally[kind << 3 | status] += 1
            others += 1
            append(pack_reply(status, request_id, token, deadline_ms, body))
        tally[_GET_OK] += len(ops) - get_miss - set_ok - others
        tally[_GET_MISS] += get_miss
        tally[_SET_OK] += set_ok
        self._room = room
        return batch_reply_frames(token, out)

    def _apply(
        self,
        kind: int,
        request_id: int,
        key: bytes,
        value: bytes | None,
        ttl_ms: int | None,
        stamp: int | None,
        records: list[bytes] | None,
        request: Request | None = None,
    ) -> tuple[Status, int | None, bytes | None]:
        """Apply one request. Returns ``(status, deadline_ms, body)`` of its reply.

        A write is answered from memory if it was applied before; else, if stamped outside the
        window, refused (:meth:`_stamp_refusal`); else BUSY if the memory is full; else applied.
        """
        store = self.store
        if kind == _GET:  # a lone GET (a batch's are inline in _handle_ops): the same budget
            room = self._room
            if room < 0:
                return _BUSY, None, _TOO_LARGE
            try:
                found, deadline_ms = store.get(key)
            except Missing:
                return _NOT_FOUND, None, None
            room -= len(found)
            self._room = room
            if room < 0:
                return _BUSY, None, _TOO_LARGE
            return _OK, deadline_ms, found
        if kind == _SET:
            if value is None:  # the decoders never produce this; a caller bug
                return _ERROR, None, b"SET needs a value"
            fingerprint = zlib.crc32(value)
            # known() first: almost every write has a new id, and it is a dict lookup where
            # recall() is a call.
            if self.memory.known(request_id):
                memo = self.memory.recall(request_id, _SET, key, fingerprint)
                if memo is not None:
                    return self._from_memory(kind, request_id, memo)
            if stamp is not None and self._out_of_window(stamp):
                return self._stamp_refusal(kind, request_id, stamp)
            if request_id and self.memory.full:
                return _BUSY, None, _MEMORY_FULL
            deadline_ms = store.set(key, value, ttl_ms)
            self.memory.remember_write(request_id, _SET, key, fingerprint, deadline_ms)
            if records is not None:
                records.append(
                    aof.encode_setv(request_id, key, value, deadline_ms, store.last_version)
                )
            if self._events is not None:
                self._events.append((EVENT_SET, key, store.last_version, deadline_ms or 0))
            return _OK, deadline_ms, None
        if kind == _DEL:
            memo = self.memory.recall(request_id, _DEL, key, 0)
            if memo is not None:
                return self._from_memory(kind, request_id, memo)
            if stamp is not None and self._out_of_window(stamp):
                return self._stamp_refusal(kind, request_id, stamp)
            if request_id and self.memory.full:
                return _BUSY, None, _MEMORY_FULL
            if not store.delete(key):
                # Remembered and logged (a MEMO record) although nothing changed: a second
                # copy of this DEL may still be on its way (a client resends through another
                # broker while the first holds it, as in a failover), and applied after the
                # client, answered NOT_FOUND, wrote the key again, it would delete that write.
                if request_id:
                    self.memory.remember_write(request_id, _DEL, key, 0, None, _NOT_FOUND)
                    if records is not None:
                        records.append(aof.encode_memo(request_id, _DEL, _NOT_FOUND, None, 0, key))
                return _NOT_FOUND, None, None
            self.memory.remember_write(request_id, _DEL, key, 0, None)
            if records is not None:
                records.append(aof.encode_delv(request_id, key, store.last_version))
            if self._events is not None:
                self._events.append((EVENT_DELETE, key, store.last_version, 0))
            return _OK, None, None
        if kind == _ALL and request is not None:
            # Bounded (MAX_LIST_KEYS, MAX_REPLY_BYTES) and sized before anything is copied: a
            # listing costs O(log n + limit), never a scan of the shard (see TTLStore.entries).
            # Its encoded entries come out of the pass's reply budget, like GET values (see
            # handle_batch): a listing larger than a whole budget is an ERROR (page it), one
            # larger than what this pass has left is BUSY (retry later), so a flood of ALLs
            # builds at most MAX_REPLY_BYTES a pass (tens of ms) and the loop keeps its
            # heartbeats; one ALL that fits a whole budget is served as the first of a pass.
            try:
                entries = store.entries(
                    request.key,
                    request.limit,
                    request.keys_only,
                    MAX_LIST_KEYS,
                    MAX_REPLY_BYTES,
                    self._room,
                )
            except ListingTooLarge as exc:
                message = f"{REPLY_TOO_LARGE}: shard {self.number}: {exc}; ask for fewer keys"
                return _ERROR, None, message.encode()
            except ListingOverRoom as exc:
                message = (
                    f"busy: shard {self.number} has built its {MAX_REPLY_BYTES} bytes of "
                    f"replies for this pass ({exc}); not listed, retry later"
                )
                return _BUSY, None, message.encode()
            body = encode_entries(entries)
            self._room -= len(body)
            return _OK, None, body
        if kind == _PING:
            return _OK, None, None
        message = f"{Kind(kind).name} is not a request a shard serves"
        return _ERROR, None, message.encode()

    def _out_of_window(self, stamp: int) -> bool:
        """Whether a stamped write that is not remembered must be refused: its stamp is
        more than the window in the past or more than the clock skew in the future."""
        memory = self.memory
        return (stamp - memory.stamp_low) & STAMP_MASK > memory.stamp_span

    def _stamp_refusal(
        self, kind: int, request_id: int, stamp: int
    ) -> tuple[Status, int | None, bytes | None]:
        """The reply to a stamped write outside the window (:meth:`_out_of_window`), not
        applied. Too old: UNAVAILABLE, body starting OUTCOME_UNKNOWN (it is a retry this
        shard no longer remembers, so an earlier attempt may or may not have been applied;
        applying it now could undo what was written since). In the future: ERROR, the
        client's clock is wrong (retrying cannot help)."""
        memory = self.memory
        age_ms = stamp_age_ms(stamp, memory.now_ms)
        window_s = memory.window_ms / 1000
        name = Kind(kind).name
        if age_ms > 0:
            client_log.warning(
                "late retry",
                "shard %d refused %s request %d: first sent %.1f s ago, past the idempotency "
                "window of %.0f s; outcome unknown",
                self.number,
                name,
                request_id,
                age_ms / 1000,
                window_s,
            )
            message = (
                f"{OUTCOME_UNKNOWN}: shard {self.number}: this {name} was first sent "
                f"{age_ms / 1000:.1f} s ago, past the idempotency window of {window_s:.0f} s; "
                "not applied now, but an earlier attempt may have been"
            )
            return _UNAVAILABLE, None, message.encode()
        client_log.warning(
            "stamp ahead",
            "shard %d refused %s request %d: stamped %.1f s ahead of this clock",
            self.number,
            name,
            request_id,
            -age_ms / 1000,
        )
        message = (
            f"{name} stamped {-age_ms / 1000:.1f} s ahead of shard {self.number}'s clock, more "
            f"than the {MAX_CLOCK_SKEW_S:.0f} s allowed: the client's clock is wrong; not applied"
        )
        return _ERROR, None, message.encode()

    def _from_memory(
        self, kind: int, request_id: int, memo: Memo
    ) -> tuple[Status, int | None, bytes | None]:
        log.debug(
            "shard %d: %s request %d is a retry, answered from memory",
            self.number,
            Kind(kind).name,
            request_id,
        )
        # A reply not kept: a body over MAX_MEMO_BODY_BYTES, or a key too long for one (a
        # plain CONFLICT entry; a CONFLICT refusal of a key within 2 bytes of the 65,535-byte
        # limit leaves one too, and is answered so: CONFLICT all the same, nothing applied).
        if memo.body == NOT_REMEMBERED or (memo.status == _CONFLICT and memo.body is None):
            message = (
                f"this {Kind(kind).name} was applied by an earlier attempt; its reply (over "
                f"{MAX_MEMO_BODY_BYTES} bytes) was not remembered: read the key"
            )
            return _CONFLICT, memo.deadline_ms, message.encode()
        return Status(memo.status), memo.deadline_ms, memo.body

    # --- issue 12: the slow branch -------------------------------------------------------------
    #
    # Conditional writes (NX, XX, IF_VERSION), VERSIONED and RETURN_OLD replies, INCR, EXPIRE
    # (and persist), GET touch and metadata, locks and fenced writes. They arrive as a whole
    # Request (a Dispatch, or an EXTENDED_OP of a batch), never on the inline GET/SET paths, so
    # those stay as they were. Every write here goes the way a SET does: answered from memory
    # if applied before, refused if stamped outside the window, BUSY if the memory is full,
    # else checked (fence first, then the command's own condition: a refusal changes nothing,
    # and is remembered and logged as a MEMOS record like a reply with a body, _refused),
    # applied, logged as SETV/DELV records (plus a MEMOS record of its reply when the reply has
    # a body: see "rich entries" in workers/idempotency.py), remembered, and given to the events
    # hook. Replication ships the same log bytes, so a follower needs nothing new.

    def _apply_ext(
        self, request: Request, records: list[bytes] | None
    ) -> tuple[Status, int | None, bytes | None]:
        """Apply one issue-12 request (see the comment above); ``(status, deadline, body)``."""
        kind = request.kind
        if kind == _FENCE_CHECK:
            return self._fence_check(request)
        if kind == _GET and request.ttl_ms is None:
            return self._read_ext(request)
        handler = _EXT_WRITES.get(kind) if kind != _GET else Shard._touch
        if handler is None:
            return _ERROR, None, f"{kind.name} is not a request a shard serves".encode()
        request_id = request.request_id
        key = request.key
        memory = self.memory
        fingerprint = _fingerprint(request)
        memo = memory.recall(request_id, kind, key, fingerprint)
        if memo is not None:
            return self._recalled(request, memo)
        if request.stamp is not None and self._out_of_window(request.stamp):
            return self._stamp_refusal(kind, request_id, request.stamp)
        if request_id and memory.full:
            return _BUSY, None, _MEMORY_FULL
        if kind == _GET:  # touch: a write, remembered (a late copy must not move it again)
            return self._touch(request, fingerprint, records)
        store = self.store
        now = store.clock()
        fence = request.fence
        if fence is not None:
            refusal = self._fence_refusal(fence, now)
            if refusal is not None:
                if refusal[0] == _BUSY:  # the budget: not remembered, a retry may pass
                    return refusal
                return self._refused(request, fingerprint, refusal, records)
        outcome = handler(self, request, now)
        status, deadline_ms, body = outcome[0], outcome[1], outcome[2]
        if status != _OK:
            return self._refused(request, fingerprint, outcome, records)
        event, written, value, version, stored_ms = outcome[3:]
        plain = body is None and (kind == _SET or kind == _DEL)
        logged_id = request_id if plain else 0
        out: list[bytes] = []
        if value is None:
            out.append(aof.encode_delv(logged_id, written, version))
        else:
            out.append(aof.encode_setv(logged_id, written, value, stored_ms, version))
        if fence is not None and self._lock_state(fence[0]) is None:  # another shard's lock
            out.append(self._raise_fence(fence, now))
        if plain:
            memory.remember_write(request_id, kind, key, fingerprint, deadline_ms)
        else:
            memo = Memo(kind, key, fingerprint, _OK, deadline_ms, body)
            entry = memory.remember(request_id, memo)
            if entry is not None:
                out.append(aof.encode_memo_entry(entry))
        if records is not None:
            records.extend(out)
        events = self._events
        if events is not None and event and written[:1] != _RESERVED:
            events.append((event, written, version, deadline_ms or 0))
        return _OK, deadline_ms, body

    def _read_ext(self, request: Request) -> tuple[Status, int | None, bytes | None]:
        """GET with VERSIONED and/or KEYS_ONLY (metadata), within the pass's reply budget."""
        if self._room < 0:
            return _BUSY, None, _TOO_LARGE
        try:
            value, version, deadline_ms = self.store.item(request.key)
        except Missing:
            return _NOT_FOUND, None, None
        return _OK, deadline_ms, self._read_body(request, value, version)

    def _read_body(self, request: Request, value: bytes, version: int) -> bytes:
        if request.keys_only:
            value = b""
        self._room -= len(value)
        return versioned_body(version, value) if request.versioned else value

    def _touch(
        self, request: Request, fingerprint: int, records: list[bytes] | None
    ) -> tuple[Status, int | None, bytes | None]:
        """GET with TTL: read the value and move its deadline to now + ttl, atomically.

        Remembered like any write (a late second copy must not move the deadline again after
        the client changed it): a miss as a NOT_FOUND refusal, a touch with the version it
        wrote as its body (8 bytes, not the value: see :meth:`_touched_again`), logged as a
        MEMOS record after its SETV."""
        if self._room < 0:
            return _BUSY, None, _TOO_LARGE
        store = self.store
        key = request.key
        try:
            value, _, _ = store.item(key)
        except Missing:
            return self._refused(request, fingerprint, (_NOT_FOUND, None, None), records)
        now = store.clock()
        deadline_ms = now + request.ttl_ms  # type: ignore[operator]  # a touch has a ttl
        version = store.put(key, value, deadline_ms, now)
        memo = Memo(_GET, key, fingerprint, _OK, deadline_ms, _U64.pack(version))
        entry = self.memory.remember(request.request_id, memo)
        if records is not None:
            records.append(aof.encode_setv(0, key, value, deadline_ms, version))
            if entry is not None:
                records.append(aof.encode_memo_entry(entry))
        if self._events is not None:
            self._events.append((EVENT_TTL, key, version, deadline_ms))
        return _OK, deadline_ms, self._read_body(request, value, version)

    def _touched_again(
        self, request: Request, memo: Memo
    ) -> tuple[Status, int | None, bytes | None]:
        """A second copy of a touch that moved the deadline: it moves nothing. Answered with
        the remembered deadline and the value as the touch read it, which is the value now if
        the key still holds the version the touch wrote; else (written, touched, deleted or
        expired since) CONFLICT, as for a reply not remembered: the value it read is gone."""
        if self._room < 0:
            return _BUSY, None, _TOO_LARGE
        version = _U64.unpack(memo.body)[0]  # type: ignore[arg-type]  # checked by _recalled
        try:
            value, now_version, _ = self.store.item(request.key)
        except Missing:
            now_version = -1
        if now_version != version:
            message = (
                "this touching GET was applied by an earlier attempt; the key has changed "
                "since: read it again"
            )
            return _CONFLICT, memo.deadline_ms, message.encode()
        return _OK, memo.deadline_ms, self._read_body(request, value, version)

    def _recalled(self, request: Request, memo: Memo) -> tuple[Status, int | None, bytes | None]:
        """The answer to a second copy of an issue-12 write, from its remembered reply."""
        if (
            request.kind == _GET
            and memo.status == _OK
            and memo.body is not None
            and len(memo.body) == _U64.size
        ):
            return self._touched_again(request, memo)
        return self._from_memory(request.kind, request.request_id, memo)

    def _refused(
        self,
        request: Request,
        fingerprint: int,
        refusal: tuple,
        records: list[bytes] | None,
    ) -> tuple[Status, int | None, bytes | None]:
        """A write refused with a definite "not applied" (PRECONDITION, CONFLICT, NOT_FOUND),
        remembered and logged as a MEMOS record, so that a second copy of it (a client with
        two brokers resends through the other while the first still holds its copy) is
        answered the same even when it arrives after the state changed so that it would now
        succeed (docs/persistence.md section 6). An ERROR (a request malformed in itself) is
        not: every copy is refused the same anyway. Nor is the CONFLICT of a LOCK with a wait:
        the broker parks it and sends it again, with the same request id, when the lock may be
        free (broker/locks.py); its final CONFLICT is the broker's answer, not this one."""
        status, deadline_ms, body = refusal[0], refusal[1], refusal[2]
        if status != _ERROR and not request.wait_ms:
            entry = self.memory.remember_refusal(
                request.request_id,
                request.kind,
                request.key,
                fingerprint,
                status,
                deadline_ms,
                body,
            )
            if records is not None and entry is not None:
                records.append(aof.encode_memo_entry(entry))
        return status, deadline_ms, body

    def _fence_refusal(
        self, fence: tuple[bytes, int], now: int
    ) -> tuple[Status, int | None, bytes] | None:
        """Why a write fenced by ``fence`` (lock name, token) is refused, or None to apply it.

        A lock of this shard (its record is here, or its name hashes here) is checked exactly:
        the token must be its current one. Another shard's lock is checked by order: refused if
        older than the newest token seen here, or from the future (above what the lock's shard
        can have issued by now + FENCE_MAX_AHEAD_MS), so that a forged huge token cannot be
        remembered as the newest and block the real holders for FENCE_MEMORY_MS. Only a write
        fenced by another shard's lock stores a fence record (the newest token seen); one that
        would store a new one is BUSY once the reserved records are at their budget.
        """
        name, token = fence
        current = self._lock_state(name)
        if current is not None:  # exact: no fence record needed (see _apply_ext)
            if token != current[1]:
                message = f"fence token {token} is not the current token of the lock ({current[1]})"
                return _CONFLICT, None, message.encode()
            return None
        if self.shards and key_shard(name, self.shards) == self.number:
            message = f"no such lock token: {token} (the lock's shard has no record of it)"
            return _CONFLICT, None, message.encode()
        if token > (now + FENCE_MAX_AHEAD_MS) * 1000:
            message = (
                f"fence token {token} is from the future (more than {FENCE_MAX_AHEAD_MS} ms "
                f"ahead of shard {self.number}'s clock): no lock issued it; not applied"
            )
            return _CONFLICT, None, message.encode()
        try:
            value, _, _ = self.store.item(FENCE_PREFIX + name)
        except Missing:
            if self.store.reserved_bytes >= self.reserved_max_bytes:
                return _BUSY, None, _RESERVED_FULL
            return None
        seen = _U64.unpack(value)[0]
        if token < seen:
            message = f"fence token {token} is older than {seen}: not applied"
            return _CONFLICT, None, message.encode()
        return None

    def _fence_seen(self, name: bytes) -> int:
        """The newest fence token of lock ``name`` this shard has seen (0: none)."""
        try:
            value, _, _ = self.store.item(FENCE_PREFIX + name)
        except Missing:
            return 0
        return _U64.unpack(value)[0]

    def _raise_fence(self, fence: tuple[bytes, int], now: int) -> bytes:
        """Remember ``fence``'s token as the newest seen for its lock, FENCE_MEMORY_MS from
        now (refreshed by every fenced write); returns its SETV record."""
        key = FENCE_PREFIX + fence[0]
        value = _U64.pack(max(fence[1], self._fence_seen(fence[0])))
        deadline_ms = now + FENCE_MEMORY_MS
        version = self.store.put(key, value, deadline_ms, now)
        return aof.encode_setv(0, key, value, deadline_ms, version)

    def _fence_check(self, request: Request) -> tuple[Status, int | None, bytes | None]:
        """FENCE_CHECK (a read): OK iff ``token`` is the newest token issued for the lock."""
        current = self._lock_state(request.key)
        if current is not None and current[1] == request.token:
            return _OK, None, None
        newest = 0 if current is None else current[1]
        message = (
            f"token {request.token} is not the newest of lock "
            f'"{request.key.decode(errors="backslashreplace")}" ({newest})'
        )
        return _CONFLICT, None, message.encode()

    def _lock_state(self, name: bytes) -> tuple[int, int, int] | None:
        """``(state, token, expires_at_ms)`` of lock ``name``, None if it has no record."""
        try:
            value, _, _ = self.store.item(LOCK_PREFIX + name)
        except Missing:
            return None
        return _LOCK.unpack(value)  # type: ignore[return-value]

    # Each returns (status, deadline_ms, body) for a refusal, or for OK (status, deadline_ms,
    # body, event code (0: none), the key written, its value (None: deleted), its version, and
    # the deadline it is stored with: the reply's, except for a lock's record).

    def _set_ext(self, request: Request, now: int) -> tuple:
        store = self.store
        key = request.key
        value = request.value
        if value is None:
            return _ERROR, None, b"SET needs a value"
        old = _live_item(store, key)
        refusal = _condition(request, old)
        if refusal is not None:
            return _PRECONDITION, None, refusal.encode()
        deadline_ms = store.set(key, value, request.ttl_ms, now)
        version = store.last_version
        if request.return_old:
            previous = None if old is None else (old[1], old[2], old[0])
            body: bytes | None = encode_old_item(version, previous)
        elif request.versioned:
            body = versioned_body(version)
        else:
            body = None
        return _OK, deadline_ms, body, EVENT_SET, key, value, version, deadline_ms

    def _del_ext(self, request: Request, now: int) -> tuple:
        store = self.store
        key = request.key
        old = _live_item(store, key)
        if old is None and request.if_version is None:
            return _NOT_FOUND, None, None
        refusal = _condition(request, old)
        if refusal is not None:
            return _PRECONDITION, None, refusal.encode()
        store.delete(key, now)
        version = store.last_version
        body = versioned_body(version) if request.versioned else None
        return _OK, None, body, EVENT_DELETE, key, None, version, None

    def _incr(self, request: Request, now: int) -> tuple:
        store = self.store
        key = request.key
        old = _live_item(store, key)
        refusal = _condition(request, old)
        if refusal is not None:
            return _PRECONDITION, None, refusal.encode()
        ttl_ms = request.ttl_ms
        if old is None:
            current = 0
            deadline_ms = None if ttl_ms is None else now + ttl_ms
        else:
            if len(old[0]) > MAX_INTEGER_BYTES or not _INTEGER.match(old[0]):
                return _CONFLICT, None, b"value is not an integer"
            current = int(old[0])
            if not I64_MIN <= current <= I64_MAX:
                return _CONFLICT, None, b"value is not an integer"
            deadline_ms = old[2] if ttl_ms is None else now + ttl_ms
        result = current + request.by
        if not I64_MIN <= result <= I64_MAX:
            return _CONFLICT, None, b"increment would overflow"
        value = str(result).encode()
        version = store.put(key, value, deadline_ms, now)
        body = incr_body(version, result)
        return _OK, deadline_ms, body, EVENT_INCR, key, value, version, deadline_ms

    def _expire_cmd(self, request: Request, now: int) -> tuple:
        store = self.store
        key = request.key
        old = _live_item(store, key)
        if old is None and request.if_version is None:
            return _NOT_FOUND, None, None
        refusal = _condition(request, old)
        if refusal is not None:
            return _PRECONDITION, None, refusal.encode()
        assert old is not None  # _condition refused an absent key with if_version
        ttl_ms = request.ttl_ms
        deadline_ms = None if ttl_ms is None else now + ttl_ms
        version = store.put(key, old[0], deadline_ms, now)
        body = versioned_body(version) if request.versioned else None
        return _OK, deadline_ms, body, EVENT_TTL, key, old[0], version, deadline_ms

    def _lock(self, request: Request, now: int) -> tuple:
        if request.ttl_ms is None:
            return _ERROR, None, b"LOCK needs a ttl"
        current = self._lock_state(request.key)
        if current is not None and current[0] == LOCK_HELD and current[2] > now:
            return _CONFLICT, current[2], b"the lock is held"
        if current is None and self.store.reserved_bytes >= self.reserved_max_bytes:
            return _BUSY, None, _RESERVED_FULL  # a new name only: existing locks keep working
        token = self.store.next_version(now)
        expires_ms = now + request.ttl_ms
        return self._write_lock(request.key, LOCK_HELD, token, expires_ms, now, token)

    def _refresh(self, request: Request, now: int) -> tuple:
        if request.ttl_ms is None:
            return _ERROR, None, b"REFRESH needs a ttl"
        refusal = self._not_current(request)
        if refusal is not None:
            return refusal
        expires_ms = now + request.ttl_ms
        return self._write_lock(request.key, LOCK_HELD, request.token, expires_ms, now, None)

    def _unlock(self, request: Request, now: int) -> tuple:
        refusal = self._not_current(request)
        if refusal is not None:
            return refusal
        outcome = self._write_lock(request.key, LOCK_RELEASED, request.token, now, now, None)
        return (outcome[0], None, None, *outcome[3:])

    def _not_current(self, request: Request) -> tuple[Status, int | None, bytes] | None:
        """CONFLICT unless ``request.token`` is the current token of a held lock (expired but
        not taken since counts: the token is still the newest)."""
        current = self._lock_state(request.key)
        if current is None or current[0] != LOCK_HELD or current[1] != request.token:
            held = "not held" if current is None or current[0] != LOCK_HELD else "held"
            newest = 0 if current is None else current[1]
            message = (
                f"token {request.token} is not the current token of lock "
                f'"{request.key.decode(errors="backslashreplace")}" '
                f"(the lock is {held}, newest token {newest})"
            )
            return _CONFLICT, None, message.encode()
        return None

    def _write_lock(
        self, name: bytes, state: int, token: int, expires_ms: int, now: int, version: int | None
    ) -> tuple:
        """Store lock ``name``'s record: kept LOCK_MEMORY_MS past its expiry, so the newest
        token outlives the lock (FENCE_CHECK, and tokens keep increasing)."""
        key = LOCK_PREFIX + name
        value = _LOCK.pack(state, token, expires_ms)
        stored_ms = expires_ms + LOCK_MEMORY_MS
        version = self.store.put(key, value, stored_ms, now, version)
        return _OK, expires_ms, token_body(token), 0, key, value, version, stored_ms


# --- issue 12: constants and helpers of the slow branch ----------------------------------------

# The worker's own keys (design section 2): 0x00 first, so no client key can collide with them
# (the protocol refuses client keys starting with NUL) and listings skip them.
LOCK_PREFIX = b"\x00lock\x00"  # + name: state:u8 token:u64 expires_at_ms:u64
FENCE_PREFIX = b"\x00fence\x00"  # + name: the newest fence token seen, token:u64
_RESERVED = b"\x00"
# How long the newest token of a lock is kept after the lock expires or is released (its
# record's deadline: expires_at + this), and how long a data shard remembers the newest fence
# token of a lock after the last fenced write: a day. Past it, tokens still increase (they are
# versions, see TTLStore.next_version), and a fenced write with a token older than the
# forgotten one is no longer refused by this shard (the client's FENCE_CHECK still refuses it
# while the lock's record lives). Bounded memory: one record per lock and per fenced lock.
LOCK_MEMORY_MS = 24 * 3600 * 1000
FENCE_MEMORY_MS = 24 * 3600 * 1000
# A fence token above (now + this) * 1000 is refused by a shard that does not hold the lock:
# tokens are versions, max(last + 1, now_ms * 1000) on the lock's shard, so no real token is
# that far ahead unless the lock shard's clock runs more than this ahead of the data shard's
# (the clock skew between hosts a cluster tolerates for fenced writes; such a write is refused,
# safely). A forged token can raise the remembered newest at most this far ahead: it blocks the
# real holders' fenced writes on that shard for at most about this long.
FENCE_MAX_AHEAD_MS = 10_000
# The bytes (key + record, TTLStore.reserved_bytes) a shard keeps for its own records (locks,
# fence tokens), each kept a day: past it a LOCK of a new name and a fenced write that would
# store a new fence record are BUSY (nothing issued or written); existing locks keep working.
RESERVED_MAX_BYTES = 64 * 1024 * 1024
_RESERVED_FULL = (
    b"this shard's lock and fence records are at their budget "
    b"(RESERVED_MAX_BYTES): no new lock name; retry later"
)
LOCK_HELD = 1
LOCK_RELEASED = 0
_LOCK = struct.Struct(">BQQ")  # a lock record's value: state, token, expires_at_ms
_U64 = struct.Struct(">Q")
# INCR: a value is a signed 64-bit decimal integer, ASCII, optional leading '-', no spaces.
MAX_INTEGER_BYTES = 20
_INTEGER = re.compile(rb"-?[0-9]+\Z")
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1


def _live_item(store: TTLStore, key: bytes) -> tuple[bytes, int, int | None] | None:
    """``store.item(key)``, None for an absent or expired key (what the conditions read)."""
    try:
        return store.item(key)
    except Missing:
        return None


def _condition(request: Request, old: tuple[bytes, int, int | None] | None) -> str | None:
    """Why the write's condition (NX, XX, IF_VERSION) refuses it, on the live item ``old``
    (``(value, version, deadline)``, None if absent or expired), or None if it holds."""
    if request.nx and old is not None:
        return "key exists"
    if request.xx and old is None:
        return "key does not exist"
    if request.if_version is not None:
        if old is None:
            return "key does not exist"
        if old[1] != request.if_version:
            return f"version is {old[1]}, not {request.if_version}"
    return None


def _fingerprint(request: Request) -> int:
    """What a retry must repeat besides id, kind and key (see workers/idempotency.py): a SET's
    value as on the inline path (its CRC-32), the arguments of the other commands (mixed into
    32 bits by arithmetic: deterministic across processes, unlike hash())."""
    kind = request.kind
    if kind == _SET:
        return zlib.crc32(request.value or b"")
    if kind == _DEL:
        return 0
    mixed = request.by * 1_000_003 + request.token * 8_191 + (request.ttl_ms or 0)
    return (mixed ^ (mixed >> 32)) & 0xFFFF_FFFF


def _is_extended(request: Request) -> bool:
    """Whether a decoded request takes the slow branch (Shard._apply_ext)."""
    kind = request.kind
    if kind == Kind.GET:
        return request.ttl_ms is not None or request.keys_only or request.versioned
    if kind == Kind.SET or kind == Kind.DEL:
        return (
            request.nx
            or request.xx
            or request.versioned
            or request.return_old
            or request.if_version is not None
            or request.fence is not None
        )
    return kind in _EXT_WRITES or kind == Kind.FENCE_CHECK


def _is_ext_read(request: Request) -> bool:
    """Whether an issue-12 request changes nothing (served on a full disk, answered early)."""
    kind = request.kind
    return (kind == Kind.GET and request.ttl_ms is None) or kind == Kind.FENCE_CHECK


_EXT_WRITES: dict[Kind, Callable[..., tuple]] = {
    Kind.SET: Shard._set_ext,
    Kind.DEL: Shard._del_ext,
    Kind.INCR: Shard._incr,
    Kind.EXPIRE: Shard._expire_cmd,
    Kind.LOCK: Shard._lock,
    Kind.REFRESH: Shard._refresh,
    Kind.UNLOCK: Shard._unlock,
}


Message = KeyedDispatch | Dispatch | DispatchBatch
"""What the worker hands :meth:`Shard.handle_batch`: one decoded message from the broker."""

Answer = Reply | list[bytes]
"""What :meth:`Shard.handle_batch` returns per message: a Reply (for a Dispatch), or the frames
of a REPLY (for a KeyedDispatch) or of a BATCH_REPLY (for a DispatchBatch)."""


def write_bytes(dispatches: Sequence[Message]) -> tuple[int, int]:
    """The most bytes of log records the SETs, and the DELs, of a batch may append (a retry
    appends nothing; counted all the same): bounded from the requests before any is applied,
    so a batch that would not fit is refused without being applied (ShardFiles.refusal). Runs
    only on a short disk (ShardFiles.tight)."""
    sets = dels = 0
    for dispatch in dispatches:
        if type(dispatch) is tuple:
            kind, key, value = dispatch[1], dispatch[3], dispatch[4]
            if kind == _SET:
                sets += _SET_BYTES + len(key) + len(value or b"")
            elif kind == _DEL:
                dels += _DEL_BYTES + len(key)
        elif isinstance(dispatch, DispatchBatch):
            for kind, _, key, value, _, _ in dispatch.ops:
                if kind == _SET:
                    sets += _SET_BYTES + len(key) + len(value or b"")  # type: ignore[arg-type]
                elif kind == _DEL:
                    dels += _DEL_BYTES + len(key)
                elif kind == _EXTENDED:
                    sets += _ext_write_bytes(value)  # type: ignore[arg-type]
        else:
            request = dispatch.request
            if _is_extended(request):
                sets += _ext_write_bytes(request)
            elif request.kind == Kind.SET:
                sets += _SET_BYTES + len(request.key) + len(request.value or b"")
            elif request.kind == Kind.DEL:
                dels += _DEL_BYTES + len(request.key)
    return sets, dels


def _ext_write_bytes(request: Request) -> int:
    """The most bytes of log records an issue-12 request may append (0 for a read): its
    SETV/DELV (an INCR's value is at most 20 digits, a lock's 17 bytes), a fence's SETV, and
    the MEMOS record of its reply."""
    if _is_ext_read(request):
        return 0
    key = len(request.key) + len(LOCK_PREFIX)
    total = _SET_BYTES + key + max(len(request.value or b""), MAX_INTEGER_BYTES, _LOCK.size)
    if request.fence is not None:
        total += _SET_BYTES + len(FENCE_PREFIX) + len(request.fence[0]) + _U64.size
    return total + _MEMO_RECORD_BYTES + key + MAX_MEMO_BODY_BYTES


def _op_kind(op: Op) -> int:
    """The command of a batch's op, for the tally (an EXTENDED_OP carries its Request)."""
    kind = op[0]
    return op[3].kind if kind == _EXTENDED else kind  # type: ignore[union-attr]


def unavailable(dispatch: Message, message: str) -> Answer:
    """UNAVAILABLE for a message that was not applied: the route is wrong, not the request."""
    if type(dispatch) is tuple:
        return reply_frames(_UNAVAILABLE, dispatch[2], dispatch[0], None, message.encode())
    if isinstance(dispatch, DispatchBatch):
        body = message.encode()
        token = dispatch.token
        return batch_reply_frames(
            token, [pack_reply(_UNAVAILABLE, op[1], token, None, body) for op in dispatch.ops]
        )
    request_id = dispatch.request.request_id
    return Reply(Status.UNAVAILABLE, request_id, dispatch.token, body=message.encode())


_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)
_ALL = int(Kind.ALL)
_PING = int(Kind.PING)
_FENCE_CHECK = int(Kind.FENCE_CHECK)
_GET_OK = _GET << 3 | Status.OK
_GET_MISS = _GET << 3 | Status.NOT_FOUND
_GET_BUSY = _GET << 3 | Status.BUSY
_SET_OK = _SET << 3 | Status.OK
TALLY_SIZE = 128  # kind << 3 | status: kinds up to 15, statuses up to 7
_SET_BYTES = SET_OVERHEAD_BYTES  # a SET record beyond its key and value
# A DEL's record beyond its key: a DELV record (type, request id, version), or, for a DEL that
# finds nothing, the larger MEMO record (type, request id, kind, status, deadline, fingerprint).
_DEL_BYTES = max(aof.PREFIX_BYTES + 17, len(aof.encode_memo(0, 0, 0, None, 0, b"")))
# A MEMOS record of one entry beyond its key field: prefix, head (type, count), entry head.
_MEMO_RECORD_BYTES = aof.PREFIX_BYTES + aof.MEMOS_HEAD_BYTES + aof.MEMOS_ENTRY.size + 2
_OK = Status.OK
_NOT_FOUND = Status.NOT_FOUND
_ERROR = Status.ERROR
_UNAVAILABLE = Status.UNAVAILABLE
_NO_SPACE = Status.NO_SPACE
_BUSY = Status.BUSY
_CONFLICT = Status.CONFLICT
_PRECONDITION = Status.PRECONDITION
_EXTENDED = EXTENDED_OP
_TOO_LARGE = (
    f"{REPLY_TOO_LARGE}: the values of the replies this worker is building exceed "
    f"{MAX_REPLY_BYTES} bytes; fetch fewer keys per batch (not read; retry it)"
).encode()
_MEMORY_FULL = (
    b"the shard's idempotency memory is full of writes still inside its window: "
    b"not applied, retry with the same request id after a backoff"
)


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
    memory: Callable[[], RequestMemory] = RequestMemory,
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
        memory: makes the shard's empty idempotency memory (its window and bound: the
            worker's settings), before a replay fills it.

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
        store = TTLStore(HighWaterClock(clock))
        return Takeover(Shard(number, store, epoch=assigned_epoch, memory=memory()), 0, kept=False)
    files = held.files if held is not None and held.files is not None else None
    opened = files is None
    if files is None:
        files = ShardFiles(durability, number)
    try:
        stored = files.take(assigned_epoch)
        if held is not None and stored == held.epoch:
            held.epoch = files.epoch
            held.progress = progress
            return Takeover(held, stored, kept=True)
        store = TTLStore(HighWaterClock(clock))  # time never goes back: see HighWaterClock
        remembered = memory()
        files.replay(store, remembered, progress)
    except BaseException:
        if opened:
            files.close(sync=False)
        raise
    last_token = 0 if held is None else held.last_token
    shard = Shard(number, store, last_token, memory=remembered, files=files, epoch=files.epoch)
    shard.progress = progress
    return Takeover(shard, stored, kept=False)
