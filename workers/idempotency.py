"""The idempotency memory of a shard: replies to recent writes, by request id.

Why: a client that gets no reply (a timeout, a worker that died, a broker that restarted)
cannot know whether its SET or DEL was applied, so it sends the same request again with the
same request id. Applying it twice is wrong: a retried SET would overwrite a newer value written
in between by someone else, a retried DEL would delete it. So the shard remembers the reply to
each recent write and answers a retry from memory.

What is remembered: for each request id, the request's kind, key and value fingerprint (the
value's CRC-32; 0 for DEL), and the reply's status and deadline. A retry is recognised only if
kind, key and fingerprint match too, not just the id, because ids are chosen by clients. With a
badly chosen id (a counter starting at 1 in every process), a wrong answer from memory needs
the same id on the same kind, key and value: a SET answered that way leaves the value it would
have written (only its deadline is the first one's); a DEL answered that way may leave a value
written since. Random 64-bit ids, as the Python client picks, make either a 2**-64 event.

Bounds: every write of the last keep_ms (DEFAULT_WINDOW_S plus MAX_CLOCK_SKEW_S plus a
second: 21 s) by the shard's clock, however many; past DEFAULT_MAX_BYTES (estimated) with all
of them still inside that time, new writes are refused BUSY rather than any entry forgotten
early (docs/persistence.md section 6). A DEL that found nothing is remembered too, with its
NOT_FOUND (workers/shard.py logs it as a MEMO record): a second copy of it, resent through
another broker and reaching the shard after the client wrote the key again, would otherwise
delete that newer value. So is every definite answer of an issue-12 write: a refusal
(PRECONDITION, CONFLICT, NOT_FOUND) with its message (:meth:`RequestMemory.remember_refusal`),
and a GET touch with the version it wrote (both logged as MEMOS records); a NO_SPACE is kept in
memory only (docs/persistence.md section 6). Request id 0 means "do not remember" (compaction
writes its snapshot with it).

Memory, since a busy shard remembers about a million writes: each write is kept as one bytes
object (request id, key length, kind, status, deadline and CRC-32 packed in 24 bytes, then the
key: a MEMOS log entry) in a plain dict by request id, and the order of forgetting is a ring of
the request ids (8 bytes each in arrays, see ORDER_CHUNK_IDS), not an OrderedDict (whose linked
list costs about 45 bytes an entry). About 170 bytes per entry with 16-byte keys (tracemalloc,
100,000 random 64-bit ids: the id itself is 48 of them, the dict slot about 50), so 100,000
entries hold about 17 MB (a full memory, DEFAULT_MAX_BYTES, about 1.6 million entries with
short keys); it was 300 bytes with a named tuple per entry, and 160 before the entry carried
its id and key length (10 bytes more that make compaction's MEMOS records one join each).
Measured as a whole worker's RSS (``bench/memory.py``) a full memory costs nearer 37 MB: the
dict's table is sized for its churn, and allocator pages are shared with the store's. A key
longer than INLINE_KEY_BYTES is not copied but kept by reference beside the packed head, as the
store holds it while the key lives. :class:`Memo` remains the interface: entries are unpacked
into one only when a retry is recognised or a test reads the memory.

Speed, since every SET and DEL is remembered: the worker's hot path calls
:meth:`RequestMemory.remember_write` with the fields, not a Memo (a named tuple built per write
cost about a tenth of a SET's time), and each entry is laid out as an entry of a MEMOS log
record (``request_id key_len kind status deadline_ms fingerprint key``, workers/aof.py), so
compaction writes the memory with one join per record (:meth:`RequestMemory.frozen`,
:func:`workers.aof.encode_memos`) without a Python loop over the entries, and replay keeps
the entries as they are read (:meth:`RequestMemory.restore`).

The memory is rebuilt on takeover: every SET and DEL record in the log carries its request id,
and compaction writes the memory itself into the new log as MEMOS records, so a request applied
by a worker that then died is answered from memory by its successor, not applied twice.

Replies with a body (issue 12: an INCR's value, a LOCK's token, a VERSIONED or RETURN_OLD
SET's version and previous item) are remembered with it, as "rich" entries: the kind byte has
RICH_KIND set and the key field is ``body_len:u16 body key`` (so the MEMOS entry layout, and
every bound on it, stays as it is). The shard logs such an entry as a MEMOS record of its own
right after the write's SETV/DELV (which then carries request id 0), so replay, and a follower,
rebuild it. A body longer than MAX_MEMO_BODY_BYTES (only a RETURN_OLD of a large value) is not
kept: the entry says so (an empty body; for a key within 2 bytes of the 65,535-byte limit, a
plain entry of status CONFLICT), and a retry is answered CONFLICT ("applied by an earlier
attempt; its reply was not remembered") rather than with a wrong reply, never applied again.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from workers.aof import MEMOS_ENTRY
from zkv import defaults
from zkv.protocol import Status, stamp_range

# How long a remembered write is kept, by the shard's clock: the idempotency window (the
# longest a client stamps a request as young enough to apply, see docs/persistence.md section
# 6) plus the clock skew allowed between a client and the worker, plus a second because a
# request's stamp is in whole seconds. Entries younger than this are never forgotten.
DEFAULT_WINDOW_S = defaults.IDEMPOTENCY_WINDOW_S  # --idempotency-window
MIN_WINDOW_S = 1.0
MAX_WINDOW_S = 86_400.0  # a day: stamps wrap after 194 days (zkv.protocol.STAMP_MODULUS)
MAX_CLOCK_SKEW_S = 5.0  # a client's clock may be this far from the worker's
STAMP_ROUNDING_S = 1.0
SLACK_MS = round((MAX_CLOCK_SKEW_S + STAMP_ROUNDING_S) * 1000)  # keep_ms - window
# The memory's bound per shard, in estimated bytes (ENTRY_BYTES per entry plus its key): when
# a new write would pass it while every entry is still inside the window, the write is
# refused BUSY (not applied) rather than an entry forgotten early.
DEFAULT_MAX_BYTES = defaults.IDEMPOTENCY_MAX_BYTES  # --idempotency-max-bytes
ENTRY_BYTES = 160  # measured: about 170 with a 16-byte key (see the module docstring)
MIN_MAX_BYTES = 1024 * 1024  # the smallest --idempotency-max-bytes taken: about 6,500 writes


# The order of forgetting is kept in arrays of request ids (8 bytes each, no reference to the
# int objects), a new array begun by the first begin() after the last one holds this many:
# a deque of int objects was traversed at every full garbage collection, 7-10 ms with a
# million entries on this machine (a GET stalled behind it), against ~250 arrays here.
ORDER_CHUNK_IDS = 4096
# The most entries one begin() forgets beyond the writes remembered since the previous one:
# forgetting a second's worth of writes at once (after an idle second, or a replay) was one
# pause of ~25,000 pops; this way a backlog drains by at least this many per batch (about
# 0.2 ms), always faster than writes arrive, and entries live at least keep_ms, a little
# longer while a backlog drains. A memory that is full forgets its whole backlog at once
# (a write refused BUSY for want of forgetting would be worse than the pause).
FORGET_STEP_IDS = 1024


def keep_ms(window_s: float) -> int:
    """How long entries are kept for a window of ``window_s`` (see DEFAULT_WINDOW_S)."""
    return round(window_s * 1000) + SLACK_MS


# Keys up to this long are copied into the packed entry (one object instead of a 2-tuple and
# the packed head: 72 bytes instead of 120 with a 16-byte key); longer ones are shared.
INLINE_KEY_BYTES = 64

# request_id, key_len, kind, status, deadline_ms (0: None), fingerprint (CRC-32): the head of
# an entry of a MEMOS log record, so an entry with its key inline is that entry, byte for byte.
_HEAD = MEMOS_ENTRY
HEAD_BYTES = _HEAD.size

_OK = int(Status.OK)
_CONFLICT = int(Status.CONFLICT)

# Rich entries (see the module docstring): the kind byte's flag, and the longest body kept.
RICH_KIND = 0x80
MAX_MEMO_BODY_BYTES = 4096
_BODY_LEN = 2  # body_len:u16 at the front of a rich entry's key field
NOT_REMEMBERED = b""  # the body of a rich entry whose reply was too long to keep

Packed = bytes | tuple[bytes, bytes]
"""One remembered write: its head followed by the key, or (head, key) for a long key."""


class Memo(NamedTuple):
    """A remembered write and its reply, as callers see it (stored packed, see above)."""

    kind: int  # Kind.SET or Kind.DEL
    key: bytes
    fingerprint: int  # CRC-32 of a SET's value, 0 for DEL
    status: int  # Status of the reply
    deadline_ms: int | None  # the reply's deadline (SET), None for never or DEL
    body: bytes | None = None  # the reply's body (a rich entry), None for none


_pack_head = _HEAD.pack


def _pack(request_id: int, memo: Memo) -> Packed:
    key = memo.key
    kind = memo.kind
    status = memo.status
    if memo.body is not None:
        body = memo.body
        if len(body) > MAX_MEMO_BODY_BYTES or _BODY_LEN + len(body) + len(key) > 0xFFFF:
            body = NOT_REMEMBERED
        if _BODY_LEN + len(key) > 0xFFFF:  # a key too long for even that: a plain entry
            status = _CONFLICT  # that says so (see the module docstring)
        else:
            key = len(body).to_bytes(_BODY_LEN, "big") + body + key
            kind |= RICH_KIND
    head = _pack_head(request_id, len(key), kind, status, memo.deadline_ms or 0, memo.fingerprint)
    if len(key) <= INLINE_KEY_BYTES:
        return head + key
    return head, key


def _unpack(packed: Packed) -> Memo:
    if isinstance(packed, bytes):
        key = packed[HEAD_BYTES:]
    else:
        packed, key = packed
    _, _, kind, status, deadline_ms, fingerprint = _HEAD.unpack_from(packed)
    if kind & RICH_KIND:
        end = _BODY_LEN + int.from_bytes(key[:_BODY_LEN], "big")
        body = key[_BODY_LEN:end]
        return Memo(kind & ~RICH_KIND, key[end:], fingerprint, status, deadline_ms or None, body)
    return Memo(kind, key, fingerprint, status, deadline_ms or None)


def pack_memo(request_id: int, memo: Memo) -> bytes:
    """The entry of ``memo`` as a MEMOS record holds it (the shard logs a rich entry so)."""
    packed = _pack(request_id, memo)
    return packed if type(packed) is bytes else packed[0] + packed[1]


def packed_key(packed: Packed) -> bytes:
    """The key of a packed entry (see :meth:`RequestMemory.packed`)."""
    if isinstance(packed, bytes):
        return packed[HEAD_BYTES:]
    return packed[1]


class RequestMemory:
    """Replies to the writes of the last ``keep_ms`` milliseconds, by request id.

    Time: the shard calls :meth:`begin` with its clock (Unix ms, never going back) before each
    batch, and replay calls it with the time of each TIME record; a write is remembered under
    the time of the last :meth:`begin`, which comes before it was applied, so entries are never
    older than they look. :meth:`begin` forgets entries of runs older than ``keep_ms``, oldest
    first, at most FORGET_STEP_IDS more than were remembered since the previous :meth:`begin`
    (a backlog drains over the next batches): the forgetting costs nothing per write, and a
    bounded amount per batch.

    Layout: ``_memos`` the entries by request id (see the module docstring); ``_order`` the
    request ids in the order remembered, in arrays (see ORDER_CHUNK_IDS: appended to the last,
    ``_tail``, forgotten from the first, from index ``_head``); ``_runs``
    ``(time_ms, first)`` per :meth:`begin` that changed the time, ``first`` the position (in
    ids ever appended) of its first id, so run ``i`` holds the ids from its ``first`` to the
    next run's.

    The window: a write stamped by its client (zkv.protocol flag STAMPED) is applied only if
    its stamp is at most ``window_ms`` (``keep_ms`` less SLACK_MS) in the past and at most
    MAX_CLOCK_SKEW_S in the future by this clock. :meth:`begin` makes the bounds of that test
    for the batch (:attr:`stamp_low`, :attr:`stamp_span`, see zkv.protocol.stamp_range), and
    the shard tests each stamped write it does not remember against them. Why it is safe:
    a retry accepted arrives at most ``window_ms`` after its stamp, the stamp is at most
    MAX_CLOCK_SKEW_S after the first attempt reached this shard (clocks within the skew,
    stamps floored), and that attempt's entry is kept ``window_ms`` + SLACK_MS: a retry is
    answered from memory or refused, never applied a second time.

    Args:
        keep_ms: how long an entry is kept (:func:`keep_ms` of the window).
        max_bytes: the bound on the estimated size (see :attr:`full`).
        capacity: a bound on the number of entries, on top of ``max_bytes`` (tests).
    """

    def __init__(
        self,
        keep_ms: int = keep_ms(DEFAULT_WINDOW_S),
        max_bytes: int = DEFAULT_MAX_BYTES,
        capacity: int | None = None,
    ) -> None:
        if keep_ms < 1 or max_bytes < ENTRY_BYTES:
            raise ValueError(f"keep_ms {keep_ms} and max_bytes {max_bytes} leave no room")
        self.keep_ms = keep_ms
        self.max_bytes = max_bytes
        if capacity is not None:
            self.max_bytes = min(max_bytes, capacity * ENTRY_BYTES)
        self._memos: dict[int, Packed] = {}
        # Whether anything is remembered under a request id: the cheap test before recall()
        # on the worker's hot path (almost every write has a new id), the dict's own method.
        self.known: Callable[[int], bool] = self._memos.__contains__
        self._tail = array("Q")
        self._order: deque[array[int]] = deque((self._tail,))
        self._head = 0  # the index in _order[0] of the oldest id not forgotten
        self._runs: deque[tuple[int, int]] = deque()
        self._appended = 0  # ids ever appended to _order
        self._forgotten = 0  # ids ever forgotten from _order: the position of the oldest left
        self._appended_at_begin = 0  # _appended at the last begin() (see FORGET_STEP_IDS)
        self.now_ms = 0  # the time of the last begin()
        # The idempotency window, and the bounds of the stamp test for the current batch.
        self.window_ms = max(0, keep_ms - SLACK_MS)
        self.stamp_low, self.stamp_span = stamp_range(0, self.window_ms, SLACK_MS)
        # Estimated bytes held: ENTRY_BYTES per entry in _order plus its key (see full).
        self.used = 0
        # Ids remembered again while still in the ring (a reused id): how many of their older
        # slots in _order to skip when those are forgotten, so the newest write stays.
        self._reused: dict[int, int] = {}

    @property
    def full(self) -> bool:
        """Whether a new write must be refused (BUSY): the memory holds ``max_bytes`` of
        entries, all younger than ``keep_ms``."""
        return self.used >= self.max_bytes

    def begin(self, now_ms: int) -> None:
        """The time is now ``now_ms``: writes remembered from here on carry it, and entries
        older than ``keep_ms`` are forgotten, oldest first, within the step (FORGET_STEP_IDS)."""
        if now_ms > self.now_ms:
            self.now_ms = now_ms
            self.stamp_low, self.stamp_span = stamp_range(
                now_ms, self.window_ms, round(MAX_CLOCK_SKEW_S * 1000)
            )
        runs = self._runs
        appended = self._appended
        if not runs:  # the first run also holds what was remembered before (an old log)
            runs.append((self.now_ms, self._forgotten))
        elif runs[-1][0] < self.now_ms:
            runs.append((self.now_ms, appended))
        if len(self._tail) >= ORDER_CHUNK_IDS:
            self._tail = array("Q")
            self._order.append(self._tail)
        # Room to forget: the step, plus what was remembered since the last begin() so a
        # backlog never grows; everything due if the memory is full (see FORGET_STEP_IDS).
        step = FORGET_STEP_IDS + appended - self._appended_at_begin
        self._appended_at_begin = appended
        if self.used >= self.max_bytes:
            step = appended
        horizon = self.now_ms - self.keep_ms
        while len(runs) > 1 and runs[0][0] < horizon and step > 0:
            end = runs[1][1]  # run 0 holds the ids up to run 1's first
            count = min(end - self._forgotten, step)
            self._forget(count)
            step -= count
            if self._forgotten >= end:
                runs.popleft()

    def _forget(self, count: int) -> None:
        """Forget the ``count`` oldest ids of the ring (all due: see :meth:`begin`)."""
        order = self._order
        memos = self._memos
        reused = self._reused
        used = 0
        self._forgotten += count
        while count > 0:
            chunk = order[0]
            head = self._head
            take = min(count, len(chunk) - head)
            ids = chunk[head : head + take]
            count -= take
            if head + take < len(chunk) or chunk is self._tail:
                self._head = head + take
            else:
                order.popleft()
                self._head = 0
            for oldest in ids:
                skip = reused.get(oldest)
                if skip is None:
                    packed = memos.pop(oldest)
                    used += ENTRY_BYTES + (
                        len(packed) - HEAD_BYTES if type(packed) is bytes else len(packed[1])
                    )
                elif skip == 1:
                    del reused[oldest]
                    used += ENTRY_BYTES
                else:
                    reused[oldest] = skip - 1
                    used += ENTRY_BYTES
        self.used -= used

    def recall(self, request_id: int, kind: int, key: bytes, fingerprint: int) -> Memo | None:
        """The remembered reply if this request (same id, kind, key and value) was applied."""
        if not request_id:
            return None
        packed = self._memos.get(request_id)
        if packed is None:
            return None
        memo = _unpack(packed)
        if memo.kind != kind or memo.key != key or memo.fingerprint != fingerprint:
            return None
        return memo

    def remember(self, request_id: int, memo: Memo) -> bytes | None:
        """Remember a write applied under ``request_id`` (0: not remembered).

        Returns:
            The entry as a MEMOS record holds it (what the shard logs for a rich entry), None
            for request id 0.
        """
        if not request_id:
            return None
        packed = _pack(request_id, memo)
        self._store(request_id, packed)
        return packed if type(packed) is bytes else packed[0] + packed[1]

    def remember_write(
        self,
        request_id: int,
        kind: int,
        key: bytes,
        fingerprint: int,
        deadline_ms: int | None,
        status: int = _OK,
    ) -> None:
        """:meth:`remember` of a reply (OK unless ``status`` says otherwise: a DEL that found
        nothing), from its fields (the worker's hot path: no Memo). The caller checks
        :attr:`full` first for a new write (the shard answers BUSY)."""
        if not request_id:
            return
        head = _pack_head(request_id, len(key), kind, status, deadline_ms or 0, fingerprint)
        if request_id in self._memos:
            self._store(request_id, head + key if len(key) <= INLINE_KEY_BYTES else (head, key))
            return
        # _store's common case, inline: a new id.
        self._memos[request_id] = head + key if len(key) <= INLINE_KEY_BYTES else (head, key)
        self._tail.append(request_id)
        self._appended += 1
        self.used += ENTRY_BYTES + len(key)

    def remember_refusal(
        self,
        request_id: int,
        kind: int,
        key: bytes,
        fingerprint: int,
        status: int,
        deadline_ms: int | None,
        body: bytes | None,
    ) -> bytes | None:
        """:meth:`remember` of a refusal (PRECONDITION, CONFLICT, NOT_FOUND, NO_SPACE): a
        definite "not applied", which a late second copy of the request must repeat, not
        undo by applying (docs/persistence.md section 6). Its message is kept cut to what
        fits a rich entry (MAX_MEMO_BODY_BYTES, and the 65,535 bytes of body and key), never
        dropped into NOT_REMEMBERED; with no room at all (a key within 2 bytes of the limit) a
        plain entry keeps the status alone.

        Returns:
            The entry as a MEMOS record holds it, None for request id 0.
        """
        if not request_id:
            return None
        field = key
        if body:
            room = min(MAX_MEMO_BODY_BYTES, 0xFFFF - _BODY_LEN - len(key))
            if room > 0:
                body = body[:room]
                field = len(body).to_bytes(_BODY_LEN, "big") + body + key
                kind |= RICH_KIND
        head = _pack_head(request_id, len(field), kind, status, deadline_ms or 0, fingerprint)
        self._store(request_id, head + field if len(field) <= INLINE_KEY_BYTES else (head, field))
        return head + field

    def restore(self, entry: bytes) -> None:
        """Remember an entry read back from a MEMOS log record (replay), kept as it is unless
        its key is too long to inline. Replay never refuses one for :attr:`full`: they were
        all inside the bound when written."""
        request_id = _HEAD.unpack_from(entry)[0]
        if not request_id:
            return
        if len(entry) - HEAD_BYTES > INLINE_KEY_BYTES:
            self._store(request_id, (entry[:HEAD_BYTES], entry[HEAD_BYTES:]))
        else:
            self._store(request_id, entry)

    def _store(self, request_id: int, packed: Packed) -> None:
        memos = self._memos
        if request_id in memos:
            # An id reused for another write: the newest one is what a retry would repeat.
            self._reused[request_id] = self._reused.get(request_id, 0) + 1
            # Removed first, so the dict's order stays the order of each id's newest write
            # (what packed() and frozen() rely on).
            old = memos.pop(request_id)
            # Its key's bytes go; its older slot in _order keeps its ENTRY_BYTES until forgotten.
            self.used -= len(old) - HEAD_BYTES if type(old) is bytes else len(old[1])
        memos[request_id] = packed
        self._tail.append(request_id)
        self._appended += 1
        self.used += ENTRY_BYTES + (
            len(packed) - HEAD_BYTES if type(packed) is bytes else len(packed[1])
        )

    def runs(self) -> list[tuple[int, list[Packed]]]:
        """The packed entries by the time they were remembered, oldest first: what compaction
        writes (a TIME record, then the MEMOS records of the run's entries), a copy made on
        the loop by C-speed slices. With a reused id in the memory (rare: ids are random) the
        dict's order is no longer the runs' order, and everything goes under the newest time,
        which only keeps entries longer."""
        entries = list(self._memos.values())
        runs = self._runs
        if self._reused or not runs:
            return [(self.now_ms, entries)] if entries else []
        base = self._forgotten
        out: list[tuple[int, list[Packed]]] = []
        for index, (time_ms, first) in enumerate(runs):
            end = runs[index + 1][1] if index + 1 < len(runs) else self._appended
            part = entries[max(first, base) - base : end - base]
            if part:
                out.append((time_ms, part))
        return out

    def snapshot(self) -> list[tuple[int, Memo]]:
        """The remembered writes, oldest first, unpacked (tests and tools)."""
        return [(request_id, _unpack(packed)) for request_id, packed in self._memos.items()]

    def packed(self) -> list[tuple[int, Packed]]:
        """The remembered writes, oldest first, as ``(request_id, packed entry)``.

        Oldest first is the dict's own order: an id enters it at the end and leaves it when
        forgotten, and a reused id is moved to the end (:meth:`_store`), which is also where
        the ring now holds its newest write.
        """
        return list(self._memos.items())

    def frozen(self) -> list[Packed]:
        """The packed entries, oldest first: a copy that compaction's thread writes out as
        MEMOS records (:func:`workers.aof.encode_memos`) while the loop goes on. One C loop,
        about 1 ms for a full memory; each entry holds its request id."""
        return list(self._memos.values())

    def __len__(self) -> int:
        return len(self._memos)
