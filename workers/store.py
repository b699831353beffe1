"""The TTL store of one shard: a dict of keys with deadlines, and the index that expires them.

There are no sockets here and no clock of its own: the clock is injected, so tests drive time by
hand and check expiry to the millisecond. Deadlines are Unix time in integer milliseconds because
they leave the process (replies carry them to clients, who compare them with their own clocks).

Per-key layout, chosen to keep memory small::

    _data[key]       = value + version + deadline  one bytes object: the value, then the key's
                                                 version and its deadline, 8 big-endian bytes
                                                 each (deadline 0: never expires)
    _buckets[bucket] = [(key, ...), [key, ...]]  the expiry index: keys by deadline, in pieces
                                                 (see Bucket and "Active expiry" below)

A key with a TTL costs its dict slot, one bytes object for value, version and deadline, and
one slot (8 bytes) in a tuple of the expiry index: no per-key tuple or int object, and nothing
per key that the garbage collector has to visit. The 8 deadline bytes are often free: CPython
allocates small objects in 16-byte steps, and a 16-byte value takes 49 bytes as a bytes object,
57 with its deadline, both in the 64-byte size class (65 with the version of issue 12: the
next class, so 16 bytes more per key for 16-byte values, 0 for values of 1 to 7 bytes; the
8 bytes a record grew measure as 8 with tracemalloc). Reads pay for it with a slice (the value)
and an unpack (the deadline), about a tenth of a microsecond; a SET copies the value once into
the record (and a GET copies it out: for megabyte values that is a memcpy each way).

Versions (docs/persistence.md): every write of a key gives it a new version, a u64 from
:meth:`TTLStore.next_version`, ``max(last + 1, now_ms * 1000)``: strictly increasing within the
shard (so per key), restored from the log on replay (the largest version replayed), and, by
its clock term, never reissued after a restart that lost unsynced records. Keys whose first
byte is 0x00 are the worker's own (locks, fence tokens: workers/shard.py): listings skip them
and they make no events.

Measured with tracemalloc for 100,000 keys of 16 bytes with 16-byte values: 166 bytes per key
with a TTL, 158 without (the layout before, a (value, (deadline, key)) tuple pair and a heap of
the inner tuples: 306 with, 206 without); a plain dict of the same keys and values takes 150.
``python -m bench.memory`` measures a whole worker process instead.
"""

from __future__ import annotations

import heapq
import logging
import struct
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

from zkv.protocol import Entry

log = logging.getLogger(__name__)

Clock = Callable[[], int]
"""Returns Unix time in integer milliseconds."""

Record = bytes
"""What the dict holds for each key: the value, its version, then its deadline (see the module
docstring)."""

_DEADLINE = struct.Struct(">Q")
DEADLINE_BYTES = _DEADLINE.size
_pack_deadline = _DEADLINE.pack
_unpack_from = _DEADLINE.unpack_from
_TAIL = struct.Struct(">QQ")  # version, deadline: the end of every record
TAIL_BYTES = _TAIL.size
_pack_tail = _TAIL.pack
_VERSION_AT = -TAIL_BYTES  # the version's offset from the end of a record

RESERVED_PREFIX = b"\x00"  # keys the worker keeps for itself (zkv.protocol.RESERVED_KEY_BYTE)
FIRST_CLIENT_KEY = b"\x01"  # the smallest key that is not reserved

EVENT_EXPIRE = 3  # the event code of a key removed at its deadline (Shard.events, section 8)

Event = tuple[int, bytes, int, int]
"""``(event_code, key, version, deadline_ms or 0)``: a change for the events hook (see
workers/shard.py, ``Shard.events``)."""


Bucket = list[tuple[bytes, ...] | list[bytes]]
"""The keys of one bucket of the expiry index, in pieces of up to EXPIRE_CHUNK_KEYS keys: sealed
tuples, and at the end an open list that takes new keys until it is full and sealed in turn.

Why not one list of keys: the garbage collector traverses every list at each full collection,
and a million keys in lists made each one a 20-40 ms pause on this machine. A tuple of bytes is
untracked by the collector once a collection has seen it, so only the open tails (at most one
per bucket) and the short lists of pieces are traversed. The dict of keys is never traversed:
a dict that holds only bytes is not tracked at all, one more thing the record layout buys.
"""


def _deadline(record: Record) -> int:
    """The deadline stored at the end of ``record`` (Unix ms), 0 for never."""
    return _unpack_from(record, -DEADLINE_BYTES)[0]


def _version(record: Record) -> int:
    """The version stored in ``record`` (0 for a key replayed from a log older than versions)."""
    return _unpack_from(record, _VERSION_AT)[0]


def record_of(value: bytes, version: int, deadline_ms: int | None) -> Record:
    """The record of ``value`` at ``version`` with ``deadline_ms`` (None: never)."""
    return value + _pack_tail(version, deadline_ms or 0)


def _same_window(old: int, new: int, now: int) -> bool:
    """Whether a key filed in the index for deadline ``old`` needs no new entry for ``new``.

    Why this is enough (a key set again with about the same TTL, the common overwrite, then
    adds nothing to the index, and the index needs no compaction for it): the key's entry for
    ``old`` sits in a bucket whose window contains ``old``, at the level ``old``'s time left
    had when it was filed (or refined), which is no finer than the level it has ``now``
    provided the clock has not gone back since (the caller checks ``now`` against the latest
    filing time). Windows of one level are aligned powers of two, each inside one window of
    every coarser level, so if ``new`` shares ``old``'s window at the level ``old`` has now, it
    is in the window of the key's entry too: that entry is current for ``new`` (an expiry pass
    refines or expires the key by its record's deadline, and _compact_index keeps it).
    """
    left = old - now
    if left < HORIZON_MS[0]:
        return new == old  # level 0: the bucket of the deadline itself
    level = 1
    while level < TOP_LEVEL and left >= HORIZON_MS[level]:
        level += 1
    mask = -WIDTH_MS[level]
    return old & mask == new & mask


# Python dicts never give memory back when keys are deleted: the table keeps its peak size until
# the next insert that triggers a resize. After a mass expiry the table is copied into a new,
# right-sized dict once it holds less than 1/SHRINK_FACTOR of its peak. Small dicts are left
# alone: copying them saves little and would happen often. The copy waits until no expiry is
# due: a copy is one pause (tens of milliseconds per million keys left), and in the middle of a
# wave of expiries it would copy keys that are about to go anyway.
SHRINK_FACTOR = 4
SHRINK_MIN_PEAK_KEYS = 1024

# The expiry index: levels of buckets, see "Active expiry" below. Level 0 has one bucket per
# millisecond; level m >= 1 has buckets WIDTH_MS[m] wide (2**(6m+6) ms: 4.1 s, 4.4 min, 4.7 h,
# 12 days, 2.2 years, 139 years), each refined into finer buckets LEAD_MS[m] before it starts.
# A key goes into the first level whose HORIZON_MS exceeds the time it has left.
WIDTH_MS = (1, 1 << 12, 1 << 18, 1 << 24, 1 << 30, 1 << 36, 1 << 42)
LEAD_MS = (0, *(width >> 2 for width in WIDTH_MS[1:]))
HORIZON_MS = (*(WIDTH_MS[m] + LEAD_MS[m] for m in range(1, len(WIDTH_MS))),)
TOP_LEVEL = len(WIDTH_MS) - 1
_LEVEL_BITS = 3  # a bucket id is (due_ms << _LEVEL_BITS) | level
_LEVEL_MASK = (1 << _LEVEL_BITS) - 1

# An expiry pass checks its time budget once per chunk of this many index entries (reading the
# monotonic clock per key would cost a sixth of the pass).
EXPIRE_CHUNK_KEYS = 64
# A stretch of back-to-back expiry passes that removes at least this many keys is logged when
# its backlog is gone (how many, how long, how late): mass expiries are worth a line, the
# steady trickle is not.
EXPIRY_LOG_MIN_KEYS = 10_000


def wall_clock_ms() -> int:
    """Unix time in integer milliseconds, the unit of every key deadline."""
    return time.time_ns() // 1_000_000


# The key index: every key in bytewise order, so a listing page seeks to its cursor and reads on
# (O(log n + page)) instead of scanning the dict (O(n)). See KeyIndex.
INDEX_PIECE_KEYS = 64
# Stale entries (keys deleted or expired since they were indexed) are filtered out of the index
# by TTLStore.expire, this many pieces a pass, once they outnumber the live keys by more than
# INDEX_TIDY_MIN_STALE: about 0.4-0.8 ms a pass at 1,000,000 keys on this machine. A pass that
# expired or refined keys tidies only INDEX_TIDY_PIECES_BUSY (about 40 us): 64 pieces in every
# pass of a mass expiry (once half the keys had gone) made each pass 5-8 times longer than its
# 100 keys, and GETs waited behind them (the expiry wave's p99 went from 1.3x its baseline to
# 3.9x). The idle passes, every 50 ms, clean up after the wave.
INDEX_TIDY_PIECES = 64
INDEX_TIDY_PIECES_BUSY = 4
INDEX_TIDY_MIN_STALE = 1024


class KeyIndex:
    """The keys of a store in bytewise order, for listing in pages.

    How: a list of sorted pieces of 1..2*INDEX_PIECE_KEYS keys, ordered among themselves, and
    the last key of each piece (``_maxes``) to bisect into. Adding a key bisects ``_maxes``, then
    the piece, and replaces the piece with a copy holding the key (a piece past twice the size
    is cut in two); a walk from a cursor bisects once and reads pieces in order.

    Why tuples (rebuilt on each insert) and not lists, nor sortedcontainers.SortedList: lists
    are traversed at every full garbage collection, and a million keys in a SortedList made
    each one a 28 ms pause on this machine, against 1 ms for these tuples (untracked once a
    collection has seen them, see Bucket). The price: measured alone for 1,000,000 random
    16-byte keys, 3.9 us to index a new key (SortedList.add: 2.2 us), 1.8 us for a key already
    in it; in TTLStore.set of a new key (a loaded machine), 0.9 -> 6.5 us at 1,000,000 random
    keys and 0.4 -> 2.8 us at 100,000, mostly cache misses of the bisections. A SET that
    overwrites a key, the common write, does not touch the index.

    Deletions do not touch it either (an expiry wave would pay a bisect per key): the entry of
    a deleted key goes stale, a walk skips keys the store no longer holds (and rewrites the
    pieces where it met them), and :meth:`tidy` filters a few pieces per expiry pass once stale
    entries outnumber the live keys. A key deleted and set again finds its stale entry and is
    not indexed twice.

    Not thread-safe, like the store.
    """

    __slots__ = ("_maxes", "_pieces", "_tidy_at", "entries")

    def __init__(self) -> None:
        self._pieces: list[tuple[bytes, ...]] = []
        self._maxes: list[bytes] = []
        self._tidy_at = 0  # the next piece tidy() filters
        self.entries = 0  # keys indexed, stale ones included

    def add(self, key: bytes) -> None:
        """Index ``key`` (nothing if it is indexed already, stale or not)."""
        maxes = self._maxes
        i = bisect_left(maxes, key)
        if i == len(maxes):
            if not maxes:
                self._pieces.append((key,))
                maxes.append(key)
                self.entries = 1
                return
            i -= 1
            maxes[i] = key  # a new largest key joins the last piece
        piece = self._pieces[i]
        j = bisect_left(piece, key)
        if j < len(piece) and piece[j] == key:
            return
        piece = piece[:j] + (key,) + piece[j:]  # noqa: RUF005  # 10% faster than unpacking
        self.entries += 1
        if len(piece) > 2 * INDEX_PIECE_KEYS:
            self._pieces[i : i + 1] = [piece[:INDEX_PIECE_KEYS], piece[INDEX_PIECE_KEYS:]]
            maxes.insert(i, piece[INDEX_PIECE_KEYS - 1])
        else:
            self._pieces[i] = piece

    def clear(self) -> None:
        """Forget every entry (the store is empty)."""
        self._pieces = []
        self._maxes = []
        self._tidy_at = 0
        self.entries = 0

    def walk(
        self, after: bytes, data: dict[bytes, Record], inclusive: bool = False
    ) -> Iterator[tuple[bytes, Record]]:
        """``(key, record)`` of each key of ``data`` greater than ``after`` (or equal to it, if
        ``inclusive``), in order.

        Stale entries are skipped, and a piece where the walk met any is replaced by its live
        keys once the walk has passed it (never while a caller may still add keys: the caller
        must not change the store while it iterates).
        """
        pieces = self._pieces
        bisect = bisect_left if inclusive else bisect_right
        i = bisect(self._maxes, after)
        start = bisect(pieces[i], after) if i < len(pieces) else 0  # the first piece only
        while i < len(pieces):
            piece = pieces[i]
            stale = 0
            for key in piece[start:] if start else piece:
                record = data.get(key)
                if record is None:
                    stale += 1
                else:
                    yield key, record
            start = 0
            if stale:
                i = self._filter(i, data)
            else:
                i += 1

    def tidy(self, data: dict[bytes, Record], pieces: int) -> None:
        """Filter stale entries out of up to ``pieces`` pieces, round robin.

        The pieces are replaced by one slice assignment: deleting emptied pieces one at a time
        moved the list's tail (15,000 pieces at 1,000,000 keys) once each.
        """
        if not data:
            self.clear()
            return
        all_pieces = self._pieces
        i = self._tidy_at
        if i >= len(all_pieces):
            i = 0
        end = min(i + pieces, len(all_pieces))
        kept_pieces: list[tuple[bytes, ...]] = []
        removed = 0
        live = data.__contains__
        for piece in all_pieces[i:end]:
            kept = tuple(filter(live, piece))
            if len(kept) == len(piece):
                kept_pieces.append(piece)
            elif kept:
                kept_pieces.append(kept)
                removed += len(piece) - len(kept)
            else:
                removed += len(piece)
        if removed:
            all_pieces[i:end] = kept_pieces
            self._maxes[i:end] = [piece[-1] for piece in kept_pieces]
            self.entries -= removed
        self._tidy_at = i + len(kept_pieces)

    def _filter(self, i: int, data: dict[bytes, Record]) -> int:
        """Keep only the live keys of piece ``i``; returns the index of the piece after it."""
        piece = self._pieces[i]
        kept = tuple(key for key in piece if key in data)
        self.entries -= len(piece) - len(kept)
        if kept:
            self._pieces[i] = kept
            self._maxes[i] = kept[-1]
            return i + 1
        del self._pieces[i]
        del self._maxes[i]
        return i

    def __len__(self) -> int:
        return self.entries


class ListingTooLarge(ValueError):
    """A listing would exceed the bound it was given: the caller must ask for fewer keys."""


class ListingOverRoom(Exception):
    """A listing within its bound does not fit in the room left (``TTLStore.entries``): the
    caller may ask again later, when that room is back. ``size`` is its encoded size."""

    def __init__(self, size: int, room: int) -> None:
        super().__init__(f"{size} bytes of entries, {max(room, 0)} bytes of room left")
        self.size = size


class HighWaterClock:
    """A wall clock (Unix ms) that never goes back: the largest of every reading so far and of
    a floor raised by replay (:meth:`raise_to`, from the log's TIME records).

    Why: a key whose deadline passed was answered NOT_FOUND; if the system clock then steps
    back, the plain clock would find it alive again (in memory, or in the log at the next
    replay). With this clock, time as the store sees it stands still until the system clock
    catches up: keys expire late by up to the step rather than come back, and new deadlines
    count from the high-water mark. A clock stepped forward moves the mark forward for good
    (keys expire early by the step), as any wall clock deadline would.

    Args:
        clock: the underlying wall clock; injected for tests.
    """

    __slots__ = ("_clock", "high_ms")

    def __init__(self, clock: Clock = wall_clock_ms) -> None:
        self._clock = clock
        self.high_ms = 0

    def __call__(self) -> int:
        now = self._clock()
        if now > self.high_ms:
            self.high_ms = now
            return now
        return self.high_ms

    def raise_to(self, floor_ms: int) -> None:
        """Time has reached at least ``floor_ms`` (replay found it in the log)."""
        if floor_ms > self.high_ms:
            self.high_ms = floor_ms


class Missing(KeyError):
    """The key is absent, or its deadline has passed (which, to a reader, is the same thing)."""


class TTLStore:
    """Keys with optional deadlines; a key is never returned at or after its deadline.

    A key set at ``t`` with ``ttl_ms = d`` has deadline ``t + d`` and is gone as soon as
    ``now >= t + d``. Two mechanisms enforce this, as in Redis:

    * lazily: every read checks the deadline and deletes an expired key on the spot, so
      correctness never depends on the background pass;
    * actively: :meth:`expire` removes expired keys that nobody reads, so they do not hold
      memory forever.

    Not thread-safe: a worker owns one store and drives it from its single loop.

    Args:
        clock: returns Unix time in integer milliseconds; injected so tests control time.
    """

    def __init__(self, clock: Clock = wall_clock_ms) -> None:
        self._clock = clock
        self._data: dict[bytes, Record] = {}
        # The expiry index: bucket id -> keys, and a min-heap of the bucket ids (ordered by
        # due time, since the id starts with it). See "Active expiry".
        self._buckets: dict[int, Bucket] = {}
        self._heap: list[int] = []
        # How many keys have a deadline, and how many entries the index holds. Entries beyond
        # one per key are stale (the key was deleted or got another deadline); _compact_index
        # removes them once there are too many, without scanning the dict.
        self._timed = 0
        self._indexed = 0
        # Entries that were legitimately left after the last index compaction beyond one per
        # key (see _compact_index): the next compaction waits until the excess exceeds that.
        self._irreducible = 0
        # The latest clock reading any key was filed at (see _same_window).
        self._filed_ms = 0
        # The latest clock reading at which a key was found or removed expired (0: none yet):
        # a durable shard logs a TIME record at least this late before its next reply, so a
        # key once gone stays gone through a replay with a clock stepped back (TimeRecord).
        self.expired_ms = 0
        # The largest len(_data) since the dict was last rebuilt (see SHRINK_FACTOR).
        self._peak = 0
        # The stretch of expiry passes in progress, for its log line (EXPIRY_LOG_MIN_KEYS).
        self._wave_removed = 0
        self._wave_passes = 0
        self._wave_started_ms = 0
        self._wave_ended_ms = 0
        self._wave_late_ms = 0
        self._longest_pass_s = 0.0  # since the last stretch ended, refinement passes included
        self._index = KeyIndex()  # every key in order, for listings
        # The largest version given or replayed (see next_version).
        self.last_version = 0
        # How many of the keys are the worker's own (0x00 first), so counts can leave them out.
        self.reserved = 0
        # Their bytes (key + record each; workers/shard.py bounds them by RESERVED_MAX_BYTES).
        # A reserved key's record keeps its size (fixed-size values), so only a new key and a
        # removal change this: nothing on the overwrite path.
        self.reserved_bytes = 0
        # The events hook (Shard.events): None, or a list that gets an Event for every key
        # removed at its deadline, by a read or by expire(), with the version the key had.
        self.events: list[Event] | None = None

    # --- reading and writing ----------------------------------------------------------------

    def next_version(self, now: int) -> int:
        """A new version for a write at ``now`` (Unix ms): ``max(last + 1, now * 1000)``.

        A hybrid logical clock: strictly increasing within the shard, so per key, and by its
        clock term larger than anything a previous owner gave before ``now``, even one whose
        last records were lost with an un-fsynced page cache (docs/persistence.md). Below
        2**53 until the year 2255 (JSON numbers stay exact).
        """
        version = self.last_version + 1
        clocked = now * 1000
        if clocked > version:
            version = clocked
        self.last_version = version
        return version

    def note_version(self, version: int) -> None:
        """A version read back from the log (replay, a VERSION record): never given again."""
        if version > self.last_version:
            self.last_version = version

    def set(
        self, key: bytes, value: bytes, ttl_ms: int | None, now: int | None = None
    ) -> int | None:
        """Store ``value`` under ``key``, replacing any previous value and deadline, at a new
        version (:attr:`last_version` after the call).

        Args:
            key: the key.
            value: the value; its bytes are copied into the key's record.
            ttl_ms: time to live from now in milliseconds (at least 1), or None for a key
                that never expires. Overwriting a key always resets its deadline.
            now: the store's clock as the caller read it (Unix ms), None to read it here: a
                worker reads it once per batch of operations, not once per SET (a clock read
                is about 0.2 us, 5% of a SET); the caller must not hold it across an expiry
                pass or longer than a batch takes.

        Returns:
            The key's absolute deadline in Unix milliseconds, None if it never expires; the
            client gets the deadline the store actually applies, not its own estimate.

        Raises:
            ValueError: ``ttl_ms`` is below 1 (a key that is dead on arrival is a caller bug).
        """
        if now is None:
            now = self._clock()
        # next_version() inlined: this is every SET's path.
        version = now * 1000
        if version <= self.last_version:
            version = self.last_version + 1
        if ttl_ms is None:
            self.last_version = version
            self._put(key, value + _pack_tail(version, 0), 0, 0)
            return None
        if ttl_ms < 1:
            raise ValueError(f"ttl_ms must be at least 1, got {ttl_ms}")
        self.last_version = version
        deadline = now + ttl_ms
        self._put(key, value + _pack_tail(version, deadline), deadline, now)
        return deadline

    def put(
        self,
        key: bytes,
        value: bytes,
        deadline_ms: int | None,
        now: int,
        version: int | None = None,
    ) -> int:
        """Store ``value`` under ``key`` with an absolute deadline (None: never), which must be
        after ``now``, at a new version (or at ``version``, one :meth:`next_version` just gave:
        a lock's token is the version of its record); returns the version. The slow path's
        write (INCR, EXPIRE, touch, locks): :meth:`set` is the SET's."""
        if version is None:
            version = self.next_version(now)
        else:
            self.note_version(version)
        self._put(key, value + _pack_tail(version, deadline_ms or 0), deadline_ms or 0, now)
        return version

    def _put(self, key: bytes, record: Record, deadline: int, now: int) -> None:
        """Store ``record`` (deadline 0: none) and file the key in the expiry index."""
        data = self._data
        old = data.get(key)
        data[key] = record
        if old is None:
            self._index.add(key)
            if len(data) > self._peak:
                self._peak = len(data)
            if key < FIRST_CLIENT_KEY:  # a new key only: overwrites, the common write, skip it
                self.reserved += 1
                self.reserved_bytes += len(key) + len(record)
        elif old_deadline := _unpack_from(old, -DEADLINE_BYTES)[0]:
            if deadline and now >= self._filed_ms and _same_window(old_deadline, deadline, now):
                return  # the key's entry for its old deadline stays current for the new one
            self._timed -= 1  # its index entry goes stale
        if deadline:
            self._timed += 1
            self._file(key, deadline, now)
        if self._indexed - self._timed > self._timed + 2 * self._irreducible:
            self._compact_index()

    @property
    def clock(self) -> Clock:
        """The store's clock (Unix ms): replay and compaction judge expiry by the same one."""
        return self._clock

    def restore(self, key: bytes, value: bytes, deadline_ms: int | None, version: int = 0) -> bool:
        """Store ``value`` under ``key`` with an absolute deadline, as a log replay does.

        A deadline already reached by the store's clock means the value is dead: the key is
        removed instead (a replayed SET overwrote whatever came before it, and then expired).

        Args:
            key: the key.
            value: the value.
            deadline_ms: Unix ms, None for a key that never expires.
            version: the key's version (0 from a log older than versions); the store never
                gives it again, dropped or not.

        Returns:
            True if the key is now stored, False if it was dropped as expired.
        """
        if version > self.last_version:
            self.last_version = version
        if deadline_ms is None:
            self._put(key, value + _pack_tail(version, 0), 0, 0)
            return True
        now = self._clock()
        if deadline_ms <= now:
            if now > self.expired_ms:
                self.expired_ms = now
            record = self._data.get(key)
            if record is not None:
                self._forget(key, record)
                self._compact()
            return False
        self._put(key, value + _pack_tail(version, deadline_ms), deadline_ms, now)
        return True

    def snapshot(self) -> Snapshot:
        """A point-in-time copy of every record, for compaction to write from another thread.

        O(n) in the calling thread but cheap: one dict copy of references, no object per key.
        Records are immutable bytes that writes replace rather than change, so the copy stays
        exactly as it was while the store moves on.
        """
        return Snapshot(self._data.copy(), self.last_version)

    def get(self, key: bytes) -> tuple[bytes, int | None]:
        """The value of a live key and its deadline (Unix ms, None for never).

        Raises:
            Missing: the key is absent or expired. Missing is an exception rather than a
                None so that no caller can mistake it for a stored value.
        """
        record = self._data.get(key)
        if record is None:
            raise Missing(key)
        deadline = _unpack_from(record, -DEADLINE_BYTES)[0]
        if not deadline:
            return record[:-TAIL_BYTES], None
        now = self._clock()
        if now >= deadline:
            self._expired(key, record, now)
            raise Missing(key)
        return record[:-TAIL_BYTES], deadline

    def item(self, key: bytes) -> tuple[bytes, int, int | None]:
        """``(value, version, deadline_ms or None)`` of a live key (the slow path's read).

        Raises:
            Missing: the key is absent or expired.
        """
        record = self._data.get(key)
        if record is None:
            raise Missing(key)
        version, deadline = _TAIL.unpack_from(record, _VERSION_AT)
        if deadline:
            now = self._clock()
            if now >= deadline:
                self._expired(key, record, now)
                raise Missing(key)
        return record[:-TAIL_BYTES], version, deadline or None

    def _expired(self, key: bytes, record: Record, now: int) -> None:
        """Remove ``key``, found past its deadline by a read (an EXPIRE event, see events)."""
        if now > self.expired_ms:
            self.expired_ms = now
        self._forget(key, record)
        events = self.events
        if events is not None and key[:1] != RESERVED_PREFIX:
            events.append((EVENT_EXPIRE, key, *_TAIL.unpack_from(record, _VERSION_AT)))
        self._compact()

    def delete(self, key: bytes, now: int | None = None) -> bool:
        """Remove ``key``; a live key's delete takes a new version (:attr:`last_version`).

        Args:
            key: the key.
            now: the caller's clock reading, as for :meth:`set`.

        Returns:
            True if a live key was removed; False if there was none, or only an expired one
            (which is removed too), so DEL reports what a GET just before it would have seen.
        """
        record = self._data.get(key)
        if record is None:
            return False
        deadline = _deadline(record)
        if now is None or deadline:
            now = self._clock()
        if deadline and now >= deadline:
            self._expired(key, record, now)
            return False
        self._forget(key, record)
        self.next_version(now)
        self._compact()
        return True

    def remove(self, key: bytes) -> None:
        """Remove ``key`` whatever its state, giving no version (replay of a DEL record)."""
        record = self._data.get(key)
        if record is not None:
            self._forget(key, record)
            self._compact()

    def entries(
        self,
        after: bytes = b"",
        limit: int = 0,
        keys_only: bool = False,
        max_keys: int = 0,
        max_bytes: int = 0,
        room: int | None = None,
    ) -> list[Entry]:
        """The live keys greater than ``after``, sorted by key, for listing and paging.

        A walk of the key index (see KeyIndex) from the cursor: O(log n + limit) (plus the
        stale entries met on the way, each paid once), never a scan of the whole store. The
        whole answer is sized before any value is copied, so a listing over ``max_bytes``
        costs its walk and nothing more. Expired keys met on the way are deleted, like any
        read does.

        Args:
            after: only keys strictly greater than this one (bytewise), the paging cursor.
            limit: if above 0, only the ``limit`` smallest such keys, so the last key returned
                is the next cursor; 0 returns all of them.
            keys_only: leave values out (each entry's value is ``b""``), for listings that
                only need names.
            max_keys: if above 0, the most keys the answer may hold (with ``limit`` 0: the
                walk stops there); 0 for no bound.
            max_bytes: if above 0, the most bytes :func:`zkv.protocol.encode_entries` may
                make of the answer; 0 for no bound.
            room: if given, what is left of the caller's budget for replies (its worker pass's,
                see workers/shard.py): an answer within ``max_bytes`` but larger than this is
                refused before anything is copied, so the caller may answer "later", not
                "never".

        Raises:
            ValueError: ``limit`` is negative.
            ListingTooLarge: the answer would exceed ``max_keys`` or ``max_bytes``.
            ListingOverRoom: it would not, but it exceeds ``room``.
        """
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}")
        if max_keys and limit > max_keys:
            raise ListingTooLarge(f"a limit of {limit} keys is over the bound of {max_keys}")
        wanted = (limit or max_keys + 1) if max_keys else limit  # 0: every key
        now = self._clock()
        data = self._data
        expired: list[tuple[bytes, Record]] = []
        selected: list[tuple[bytes, Record]] = []
        size = 0
        # Reserved keys (0x00 first) sort before every client key: a walk from before the
        # first client key starts at it, so listings never see them and never pay for them.
        if after < FIRST_CLIENT_KEY:
            walk = self._index.walk(FIRST_CLIENT_KEY, data, inclusive=True)
        else:
            walk = self._index.walk(after, data)
        for item in walk:
            deadline = _unpack_from(item[1], -DEADLINE_BYTES)[0]
            if deadline and now >= deadline:
                expired.append(item)
                continue
            selected.append(item)
            # encode_entries: 14 bytes of lengths and deadline, the key, the value.
            size += 14 + len(item[0]) + (0 if keys_only else len(item[1]) - TAIL_BYTES)
            if len(selected) == wanted or (max_bytes and size > max_bytes):
                break
        # Deleting while walking is not allowed: expired keys are removed afterwards.
        events = self.events
        for key, record in expired:
            self._forget(key, record)
            if events is not None:  # client keys only: the walk skipped the reserved ones
                events.append((EVENT_EXPIRE, key, *_TAIL.unpack_from(record, _VERSION_AT)))
        if expired:
            if now > self.expired_ms:
                self.expired_ms = now
            self._compact()
            self._tidy_index()
        if max_keys and not limit and len(selected) > max_keys:
            raise ListingTooLarge(f"more than {max_keys} keys: list them in pages (a limit)")
        if max_bytes and size > max_bytes:
            raise ListingTooLarge(f"{size} bytes of entries, over the bound of {max_bytes}")
        if room is not None and size > max(room, 0):
            raise ListingOverRoom(size, room)
        return [
            Entry(
                key,
                b"" if keys_only else record[:-TAIL_BYTES],
                _deadline(record) or None,
            )
            for key, record in selected
        ]

    def _tidy_index(self, pieces: int = INDEX_TIDY_PIECES) -> None:
        """Filter stale entries out of ``pieces`` pieces of the key index, once they are many."""
        live = len(self._data)
        if self._index.entries - live > live + INDEX_TIDY_MIN_STALE or not live:
            self._index.tidy(self._data, pieces)

    # --- active expiry ----------------------------------------------------------------------

    # Active expiry, the background half of "a key is gone at its deadline".
    #
    # Reads already refuse expired keys, so this exists to give back the memory of keys that
    # expire while nobody reads them, promptly (within a pass or two of the deadline) and in
    # bounded steps, even when a million keys share one second. Redis (expire.c,
    # activeExpireCycle) has no index ordered by time: it samples keys that have a TTL, 20 a
    # loop, and loops again while more than 10% of a sample had expired, within a CPU-time
    # limit, so a mass expiry drains at the rate that limit allows and the last stragglers
    # wait until a sample finds them. Here an index says exactly which keys are due.
    #
    # The index is a hierarchical timing wheel (Varghese and Lauck; the Linux kernel's timers
    # and Kafka's purgatory work alike), with buckets of keys (see Bucket):
    #
    #   level 0   one bucket per millisecond: the keys whose deadline is exactly that ms.
    #   level m   buckets WIDTH_MS[m] wide, aligned to multiples of the width: the keys whose
    #             deadline falls inside. Level 1 is 4.1 s wide, each level 64 times the last.
    #
    # A key is filed at the first level whose HORIZON_MS exceeds the time it has left, so
    # level 0 holds the next ~5 s and each level above covers 64 times more. A bucket is
    # *due* at its deadline (level 0) or LEAD_MS[m] (a quarter of its width) before its start
    # (level m); its id, (due << 3) | level, orders a min-heap of bucket ids by due time. So
    # there are at most about 5,000 + 6 * 80 buckets whatever the number of keys or how their
    # deadlines spread, and a key costs one slot of 8 bytes.
    #
    # A pass: take `now` once; while the top bucket of the heap is due, take its last piece
    # (up to EXPIRE_CHUNK_KEYS keys), and for each key read its deadline from the dict (one
    # lookup and an unpack):
    #
    #   * gone, or no deadline any more: the entry is stale; drop it.
    #   * deadline <= now: delete the key (whatever bucket it was found in).
    #   * a level-m bucket and the deadline lies inside its window: refine, i.e. file the key
    #     again by the time it has left, which is less than the width plus the lead, so it
    #     lands on a lower level (level 0 from level 1). Refining happens a lead ahead of the
    #     window, so a wave of keys due in one second is sorted into millisecond buckets about
    #     a second before the first of them is due, and then each bucket needs deletes only.
    #   * otherwise the key was overwritten with a deadline elsewhere: stale, dropped.
    #
    # Whether an entry is current depends only on the key's deadline and the bucket, never on
    # how the entry got there, so stale and duplicate entries are harmless: at worst a key is
    # looked up twice. An emptied bucket leaves the heap and the dict.
    #
    # When a pass stops: when the top bucket is not due (nothing below it is either: every
    # key's current bucket is due at or before its deadline, so no expired key is missed);
    # after `max_keys` entries, stale ones and refinements included, since each costs a
    # lookup; or when `budget_s` has passed, checked after each chunk. A pass always handles
    # at least one chunk when something is due, so passes make progress.
    #
    # Limits: a pass does a bounded amount of work, O(max_keys), so a request never waits
    # behind a long sweep; the worker runs passes back to back (serving requests between them)
    # while next_deadline_ms() <= now, i.e. while a backlog remains. A key is deleted by the
    # first pass at or after its deadline that reaches its bucket; a key far in the future is
    # refined once per level on its way down (a one-hour TTL: twice). Writes and deletes make
    # entries stale without touching the index (a key set again with the same bucket is not
    # filed twice when it was the bucket's last entry, nor when its new deadline falls in the
    # window of its old one, see _same_window); _compact_index filters the index once
    # stale entries outnumber the live ones, one pause of O(entries) amortized to O(1) per
    # write. No timing assumption anywhere: the clock may jump forward (a backlog, drained in
    # passes) or back (buckets simply come due later).
    #
    # Measured (bench/expiry_wave.py, one worker on this 2-core machine, 1,000 or 250 keys a
    # pass): a million keys due within one second were each removed within 50-61 ms of their
    # deadline when written in deadline order, within 429 ms when their deadlines were
    # scattered across the write order (each millisecond's keys spread over the whole heap:
    # the cost is cache misses, about 1 us a key here, not the index).
    def expire(self, max_keys: int, budget_s: float | None = None) -> int:
        """Remove expired keys in one bounded pass (see the comment above for the algorithm).

        Args:
            max_keys: the most index entries to examine, so the most keys to remove.
            budget_s: the most monotonic seconds to spend, None for no time limit.

        Returns:
            How many keys were removed.
        """
        heap = self._heap
        buckets = self._buckets
        data = self._data
        events = self.events  # None unless the shard publishes events (no cost then)
        now = self._clock()
        if now > self._filed_ms:
            self._filed_ms = now  # refinements below file keys at this time
        started_s = time.monotonic()
        examined = removed = refiled = late_ms = 0
        while heap and examined < max_keys:
            bucket_id = heap[0]
            due = bucket_id >> _LEVEL_BITS
            if due > now:
                break
            pieces = buckets[bucket_id]
            chunk = pieces.pop()
            room = max_keys - examined
            if len(chunk) > room:
                pieces.append(chunk[:-room])
                chunk = chunk[-room:]
            examined += len(chunk)
            self._indexed -= len(chunk)
            level = bucket_id & _LEVEL_MASK
            if level == 0:
                # Current entries here are exactly the records ending with this deadline.
                suffix = _pack_deadline(due)
                before = removed
                for key, record in zip(chunk, map(data.get, chunk), strict=True):
                    if record is not None and record.endswith(suffix):
                        del data[key]
                        removed += 1
                        if key < b"\x01":
                            self.reserved -= 1
                            self.reserved_bytes -= len(key) + len(record)
                        elif events is not None:  # the deadline that passed: ``due``
                            events.append((3, key, _unpack_from(record, -16)[0], due))
                if removed > before and now - due > late_ms:
                    late_ms = now - due
            else:
                start = due + LEAD_MS[level]
                end = start + WIDTH_MS[level]
                near = now + HORIZON_MS[0]  # deadlines before this go to level 0
                for key, record in zip(chunk, map(data.get, chunk), strict=True):
                    if record is None:
                        continue
                    deadline = _unpack_from(record, -DEADLINE_BYTES)[0]
                    if not deadline:
                        continue
                    if deadline <= now:
                        del data[key]
                        removed += 1
                        if key < b"\x01":
                            self.reserved -= 1
                            self.reserved_bytes -= len(key) + len(record)
                        elif events is not None:
                            events.append((3, key, _unpack_from(record, -16)[0], deadline))
                        if now - deadline > late_ms:
                            late_ms = now - deadline
                    elif not start <= deadline < end:
                        continue  # stale: the key was filed elsewhere since
                    elif deadline < near:
                        # _file() inlined for level 0, where a wave's keys go: a refinement
                        # costs about as much as a delete this way, not twice as much.
                        target_id = deadline << _LEVEL_BITS
                        target = buckets.get(target_id)
                        if target is None:
                            buckets[target_id] = [[key]]
                            heapq.heappush(heap, target_id)
                            refiled += 1
                        elif (tail := target[-1])[-1] != key:
                            if type(tail) is list:
                                tail.append(key)
                                if len(tail) == EXPIRE_CHUNK_KEYS:
                                    target[-1] = tuple(tail)
                            else:
                                target.append([key])
                            refiled += 1
                    else:
                        self._file(key, deadline, now)
            if not pieces:
                heapq.heappop(heap)
                del buckets[bucket_id]
            if budget_s is not None and time.monotonic() - started_s >= budget_s:
                break
        self._timed -= removed
        self._indexed += refiled
        self._tidy_index(INDEX_TIDY_PIECES_BUSY if examined else INDEX_TIDY_PIECES)
        if removed and now > self.expired_ms:
            self.expired_ms = now
        if examined:
            self._compact()
            self._longest_pass_s = max(self._longest_pass_s, time.monotonic() - started_s)
        self._note_pass(removed, late_ms, now)
        return removed

    def _file(self, key: bytes, deadline: int, now: int) -> None:
        """Add ``key`` to the bucket its deadline belongs in, given the time left before it."""
        if now > self._filed_ms:
            self._filed_ms = now
        left = deadline - now
        if left < HORIZON_MS[0]:
            bucket_id = deadline << _LEVEL_BITS  # level 0: due at the deadline itself
        else:
            level = 1
            while level < TOP_LEVEL and left >= HORIZON_MS[level]:
                level += 1
            start = deadline & -WIDTH_MS[level]  # widths are powers of two
            bucket_id = ((start - LEAD_MS[level]) << _LEVEL_BITS) | level
        pieces = self._buckets.get(bucket_id)
        if pieces is None:
            self._buckets[bucket_id] = [[key]]
            heapq.heappush(self._heap, bucket_id)
        else:
            tail = pieces[-1]
            if tail[-1] == key:
                return  # set again before anything else joined the bucket: already filed here
            if type(tail) is list:
                tail.append(key)
                if len(tail) == EXPIRE_CHUNK_KEYS:
                    pieces[-1] = tuple(tail)  # sealed: see Bucket
            else:
                pieces.append([key])
        self._indexed += 1

    def _note_pass(self, removed: int, late_ms: int, now: int) -> None:
        """Account for one pass; log a mass expiry once a pass finds nothing left to do.

        A stretch of passes runs from the first that removes a key to the first that removes
        none with nothing due: while a wave lasts, the worker's passes 50 ms apart (or back to
        back) keep finding keys, so one wave makes one line.
        """
        if removed:
            if not self._wave_removed:
                self._wave_started_ms = now
            self._wave_removed += removed
            self._wave_passes += 1
            self._wave_ended_ms = now
            self._wave_late_ms = max(self._wave_late_ms, late_ms)
            return
        if not self._wave_removed or (self._heap and self._heap[0] >> _LEVEL_BITS <= now):
            return  # no stretch in progress, or a backlog (of refinements) remains
        if self._wave_removed >= EXPIRY_LOG_MIN_KEYS:
            log.info(
                "expired %d keys in %d passes over %d ms, each within %d ms of its deadline; "
                "%d keys left; the longest pass took %.1f ms",
                self._wave_removed,
                self._wave_passes,
                self._wave_ended_ms - self._wave_started_ms,
                self._wave_late_ms,
                len(self._data),
                self._longest_pass_s * 1000,
            )
        self._wave_removed = self._wave_passes = self._wave_late_ms = 0
        self._longest_pass_s = 0.0

    def next_deadline_ms(self) -> int | None:
        """When :meth:`expire` next has work (Unix ms), None if no key has a TTL.

        The due time of the first bucket of the expiry index: never later than the earliest
        deadline of any key (every key sits in a bucket due at or before its deadline), but
        possibly earlier (a bucket to refine, or stale entries). That is what a scheduler
        needs: waking early only makes :meth:`expire` refine or drop entries; while this is at
        or before now, a backlog remains.
        """
        return self._heap[0] >> _LEVEL_BITS if self._heap else None

    def index_size(self) -> int:
        """Entries in the expiry index, stale ones included (tests bound it)."""
        return self._indexed

    def __len__(self) -> int:
        """How many keys are stored, including expired keys that no read or :meth:`expire`
        pass has removed yet, and the worker's own (:attr:`reserved`); use :meth:`entries` for
        an exact count of live keys."""
        return len(self._data)

    # --- memory -----------------------------------------------------------------------------

    def _forget(self, key: bytes, record: Record) -> None:
        """Delete ``key``, whose current record is ``record``; its index entry goes stale."""
        del self._data[key]
        if _deadline(record):
            self._timed -= 1
        if key < FIRST_CLIENT_KEY:
            self.reserved -= 1
            self.reserved_bytes -= len(key) + len(record)

    def _compact(self) -> None:
        """Give memory back after deletions, in time amortized to O(1) per operation.

        The index: see :meth:`_compact_index`. The dict: see SHRINK_FACTOR; copying it costs
        O(keys left), which is at most 1/SHRINK_FACTOR of the deletions since the last copy.
        """
        if self._indexed - self._timed > self._timed + 2 * self._irreducible:
            self._compact_index()
        if (
            self._peak > SHRINK_MIN_PEAK_KEYS
            and len(self._data) * SHRINK_FACTOR < self._peak
            and not (self._heap and self._heap[0] >> _LEVEL_BITS <= self._clock())
        ):
            log.debug("rebuilt the key dict: peak %d keys, now %d", self._peak, len(self._data))
            self._data = dict(self._data)
            self._peak = len(self._data)

    def _compact_index(self) -> None:
        """Keep only the current entries of the index, once stale ones outnumber the others.

        Without this a key set in a loop would add an entry per SET until its old bucket came
        due. Each bucket's keys are filtered: a key stays if it is still stored, its deadline
        lies in the bucket's window, and it was not met earlier in the same bucket. The filter
        walks the index, not the dict, so it costs O(entries) and not O(keys); it runs once
        stale entries exceed the live keys, so it amortizes to O(1) per write (but is one
        pause of that length).

        A key may remain in buckets of two levels (filed at level 2, say, then set again, with
        a deadline in the same window, when its time left put it on level 1); each is current
        by the rule above and the finer one wins when it comes due. That excess is bounded by
        the number of levels per key; it is remembered so the next compaction waits until the
        new excess is larger than the key count plus twice it, and never runs back to back.
        """
        data = self._data
        before = self._indexed
        buckets: dict[int, Bucket] = {}
        indexed = 0
        for bucket_id, pieces in self._buckets.items():
            level = bucket_id & _LEVEL_MASK
            start = (bucket_id >> _LEVEL_BITS) + LEAD_MS[level]
            end = start + WIDTH_MS[level]
            kept = [
                key
                for key in dict.fromkeys(key for piece in pieces for key in piece)
                if (record := data.get(key)) is not None
                and start <= _unpack_from(record, -DEADLINE_BYTES)[0] < end
            ]
            if kept:
                size = EXPIRE_CHUNK_KEYS
                buckets[bucket_id] = [tuple(kept[i : i + size]) for i in range(0, len(kept), size)]
                indexed += len(kept)
        self._buckets = buckets
        self._heap = list(buckets)
        heapq.heapify(self._heap)
        self._indexed = indexed
        self._irreducible = max(0, indexed - self._timed)
        if before > SHRINK_MIN_PEAK_KEYS:
            log.debug("compacted the expiry index: %d entries, %d current", before, indexed)


class Snapshot:
    """The records of a store at one moment (see :meth:`TTLStore.snapshot`).

    Safe to read from another thread while the store changes: it holds its own dict, whose
    values are bytes nobody mutates.
    """

    def __init__(self, data: dict[bytes, Record], last_version: int = 0) -> None:
        self._data = data
        self.last_version = last_version  # the store's, when the snapshot was taken

    def live(self, now_ms: int) -> Iterator[tuple[bytes, bytes, int | None]]:
        """``(key, value, deadline_ms)`` of every key not expired at ``now_ms``, in no order."""
        for key, value, deadline, _ in self.versioned(now_ms):
            yield key, value, deadline

    def versioned(self, now_ms: int) -> Iterator[tuple[bytes, bytes, int | None, int]]:
        """``(key, value, deadline_ms, version)`` of every key not expired at ``now_ms``."""
        unpack = _TAIL.unpack_from
        for key, record in self._data.items():
            version, deadline = unpack(record, _VERSION_AT)
            if not deadline:
                yield key, record[:-TAIL_BYTES], None, version
            elif now_ms < deadline:
                yield key, record[:-TAIL_BYTES], deadline, version

    def __len__(self) -> int:
        return len(self._data)
