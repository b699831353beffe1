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

Bounds: the last MAX_REMEMBERED_REQUESTS writes, oldest forgotten first, so a retry is
recognised if fewer than that many writes reached the shard since the original. A DEL that found
nothing changed nothing, so it is not remembered (its retry is answered NOT_FOUND again, or
deletes a value written since, as if the first attempt had been lost). Request id 0 means "do
not remember" (compaction writes its snapshot with it).

Memory, since a full memory is 100,000 entries per shard: each write is kept as one bytes
object (request id, key length, kind, status, deadline and CRC-32 packed in 24 bytes, then the
key: a MEMOS log entry) in a plain dict by request id, and the order of forgetting is a ring of
the request ids, not an OrderedDict (whose linked list costs about 45 bytes an entry). About
170 bytes per entry with 16-byte keys (tracemalloc, 100,000 random 64-bit ids: the id itself is
48 of them, the dict slot about 50), so a full memory holds about 17 MB per shard; it was 300
bytes with a named tuple per entry, and 160 before the entry carried its id and key length
(10 bytes more that make compaction's MEMOS records one join each).
Measured as a whole worker's RSS (``bench/memory.py``) a full memory costs nearer 37 MB: the
dict's table is sized for its churn, and allocator pages are shared with the store's. A key
longer than INLINE_KEY_BYTES is not copied but kept by reference beside the packed head, as
the store holds it while the key lives. :class:`Memo` remains the interface: entries are
unpacked into one only when a retry is recognised or a test reads the memory.

Speed, since every SET and DEL is remembered: the worker's hot path calls
:meth:`RequestMemory.remember_write` with the fields, not a Memo (a named tuple built per write
cost about a tenth of a SET's time), and each entry is laid out as an entry of a MEMOS log
record (``request_id key_len kind status deadline_ms fingerprint key``, workers/aof.py), so
compaction writes the memory with one join per record (:meth:`RequestMemory.frozen`,
:func:`workers.aof.encode_memos`) without a Python loop over 100,000 entries, and replay keeps
the entries as they are read (:meth:`RequestMemory.restore`).

The memory is rebuilt on takeover: every SET and DEL record in the log carries its request id,
and compaction writes the memory itself into the new log as MEMOS records, so a request applied
by a worker that then died is answered from memory by its successor, not applied twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from workers.aof import MEMOS_ENTRY
from zkv.protocol import Status

MAX_REMEMBERED_REQUESTS = 100_000  # request ids per shard
# Keys up to this long are copied into the packed entry (one object instead of a 2-tuple and
# the packed head: 72 bytes instead of 120 with a 16-byte key); longer ones are shared.
INLINE_KEY_BYTES = 64

# request_id, key_len, kind, status, deadline_ms (0: None), fingerprint (CRC-32): the head of
# an entry of a MEMOS log record, so an entry with its key inline is that entry, byte for byte.
_HEAD = MEMOS_ENTRY
HEAD_BYTES = _HEAD.size

_OK = int(Status.OK)

Packed = bytes | tuple[bytes, bytes]
"""One remembered write: its head followed by the key, or (head, key) for a long key."""


class Memo(NamedTuple):
    """A remembered write and its reply, as callers see it (stored packed, see above)."""

    kind: int  # Kind.SET or Kind.DEL
    key: bytes
    fingerprint: int  # CRC-32 of a SET's value, 0 for DEL
    status: int  # Status of the reply
    deadline_ms: int | None  # the reply's deadline (SET), None for never or DEL


_pack_head = _HEAD.pack


def _pack(request_id: int, memo: Memo) -> Packed:
    key = memo.key
    head = _pack_head(
        request_id, len(key), memo.kind, memo.status, memo.deadline_ms or 0, memo.fingerprint
    )
    if len(key) <= INLINE_KEY_BYTES:
        return head + key
    return head, key


def _unpack(packed: Packed) -> Memo:
    if isinstance(packed, bytes):
        key = packed[HEAD_BYTES:]
    else:
        packed, key = packed
    _, _, kind, status, deadline_ms, fingerprint = _HEAD.unpack_from(packed)
    return Memo(kind, key, fingerprint, status, deadline_ms or None)


def packed_key(packed: Packed) -> bytes:
    """The key of a packed entry (see :meth:`RequestMemory.packed`)."""
    if isinstance(packed, bytes):
        return packed[HEAD_BYTES:]
    return packed[1]


class RequestMemory:
    """Replies to the last ``capacity`` remembered writes, by request id.

    Args:
        capacity: how many writes to keep; the oldest is forgotten first.
    """

    def __init__(self, capacity: int = MAX_REMEMBERED_REQUESTS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._memos: dict[int, Packed] = {}
        # Whether anything is remembered under a request id: the cheap test before recall()
        # on the worker's hot path (almost every write has a new id), the dict's own method.
        self.known: Callable[[int], bool] = self._memos.__contains__
        # Request ids in the order remembered: a ring once full, _next its oldest slot.
        self._ring: list[int] = []
        self._next = 0
        # Ids remembered again while still in the ring (a reused id): how many of their older
        # ring slots to skip when those are forgotten, so the newest write stays remembered.
        self._reused: dict[int, int] = {}

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

    def remember(self, request_id: int, memo: Memo) -> None:
        """Remember a write applied under ``request_id`` (0: not remembered)."""
        if request_id:
            self._store(request_id, _pack(request_id, memo))

    def remember_write(
        self, request_id: int, kind: int, key: bytes, fingerprint: int, deadline_ms: int | None
    ) -> None:
        """:meth:`remember` of an OK reply, from its fields (the worker's hot path: no Memo)."""
        if not request_id:
            return
        head = _pack_head(request_id, len(key), kind, _OK, deadline_ms or 0, fingerprint)
        packed = head + key if len(key) <= INLINE_KEY_BYTES else (head, key)
        memos = self._memos
        ring = self._ring
        if request_id in memos or len(ring) < self.capacity:
            self._store(request_id, packed)
            return
        # _store's steady state, inline (a new id, the ring full): one call less per write.
        memos[request_id] = packed
        slot = self._next
        oldest = ring[slot]
        ring[slot] = request_id
        self._next = slot + 1 if slot + 1 < self.capacity else 0
        if oldest in self._reused:
            skip = self._reused[oldest]
            if skip == 1:
                del self._reused[oldest]
            else:
                self._reused[oldest] = skip - 1
        else:
            del memos[oldest]

    def restore(self, entry: bytes) -> None:
        """Remember an entry read back from a MEMOS log record (replay), kept as it is unless
        its key is too long to inline."""
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
            del memos[request_id]
        memos[request_id] = packed
        ring = self._ring
        if len(ring) < self.capacity:
            ring.append(request_id)
            return
        oldest = ring[self._next]
        ring[self._next] = request_id
        self._next = (self._next + 1) % self.capacity
        skip = self._reused.get(oldest)
        if skip is None:
            del memos[oldest]
        elif skip == 1:
            del self._reused[oldest]
        else:
            self._reused[oldest] = skip - 1

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
