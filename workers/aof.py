"""The append-only log of one shard: its byte format, the reader that replays it, the writer.

docs/persistence.md specifies the same format in prose. In short::

    file   = magic records*
    magic  = b"ZKVLOG4\\n"                                  8 bytes, names the format and version
                                                           (b"ZKVLOG1\\n" before MEMOS,
                                                           b"ZKVLOG2\\n" before TIME and
                                                           b"ZKVLOG3\\n" before versions: still
                                                           read)
    record = length:u32  crc:u32  body                     length = len(body)
    crc    = CRC-32 (zlib.crc32) of the four length bytes followed by the body

    body of SET  (0x01) = type:u8  request_id:u64  deadline_ms:u64  key_len:u32  key  value
    body of DEL  (0x02) = type:u8  request_id:u64  key
    body of MEMO (0x03) = type:u8  request_id:u64  kind:u8  status:u8  deadline_ms:u64
                          fingerprint:u32  key
    body of MEMOS (0x04) = type:u8  count:u32  entry*     count entries, filling the body
    entry = request_id:u64  key_len:u16  kind:u8  status:u8  deadline_ms:u64  fingerprint:u32  key
    body of TIME (0x05) = type:u8  now_ms:u64         the worker's time had reached now_ms
    body of SETV (0x06) = type:u8  request_id:u64  deadline_ms:u64  version:u64  key_len:u32
                          key  value                  a SET with the key's new version
    body of DELV (0x07) = type:u8  request_id:u64  version:u64  key    a DEL with its version
    body of VERSION (0x08) = type:u8  version:u64     the shard's versions had reached it

Versions (issue 12): every write logs SETV or DELV (the worker's new commands too: an INCR, an
EXPIRE, a lock is a SETV of the record it leaves), never SET or DEL, which older versions wrote
and replay still reads (their keys get version 0). Replay restores the shard's version counter
as the largest version it read (SETV, DELV, VERSION); compaction writes a VERSION record of the
counter, so dropping deleted keys never lowers it.

All integers are unsigned big-endian, like the wire protocol. ``deadline_ms`` is Unix time in
milliseconds, 0 for "never expires". ``request_id`` 0 means "not remembered" (snapshot records
written by compaction carry no request). A MEMOS record holds up to MEMOS_PER_RECORD remembered
replies of the idempotency memory (see workers/idempotency.py), so that a retry reaching a later
owner is still answered from memory: compaction writes them, and the shard appends a one-entry one
for a reply with a body, a refusal of an issue-12 write or a GET touch (workers/shard.py). A MEMO
record is appended for a DEL that found nothing (its NOT_FOUND reply, remembered so a late copy of
that DEL deletes nothing). Compaction writes the whole memory (every write of the window, 36 s)
every time. Written as one MEMO record per entry (measured with 100,000 entries, the memory's bound
then), as earlier versions did (still read), that cost the worker about 110 ms per compaction (34 ms
of snapshot on its loop, 72 of encoding in the thread; now 1.4 and 5), a tenth of its CPU under a
steady stream of SETs. The memory keeps each entry in the form a MEMOS entry has, so a MEMOS record
is one join, and replay keeps the entries as they are read.

Why a length *and* a checksum: the length lets the reader find the next record without parsing
the body; the CRC, which covers the length too, tells a record that was written completely from
one that was torn by a crash (a write cut short) or damaged on disk. A CRC-32 misses a random
corruption with probability 2**-32.

Writes go through :class:`AppendLog`, which applies one of Redis's three fsync policies.
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import re
import struct
import time
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from zkv.protocol import FSYNC_BUCKETS_S, MAX_KEY_BYTES, MAX_VALUE_BYTES

log = logging.getLogger(__name__)

# Version 2 added MEMOS records. Every file this version creates says 2, so that a version-1
# reader refuses it at its first bytes as "not a zkv log" instead of replaying a compacted log
# up to its first MEMOS record and calling the rest damage (or, at the end, a torn tail to cut).
# Version-1 files are read as they are; the appends to one are SET and DEL records, which both
# versions know, until a compaction replaces it with a version-2 file.
#
# Version 3 added TIME records (a high-water mark of the worker's wall clock, see TimeRecord).
# A version-2 reader refuses a version-3 file at its magic; TIME records are also appended to
# version-1 and -2 files this version takes over, which a version-2 reader then refuses at the
# first of them as a record type it does not know (never as damage to cut off).
#
# Version 4 added SETV, DELV and VERSION records (issue 12), in the same way: a version-3
# reader refuses a version-4 file at its magic, and an older file appended to at its first SETV.
MAGIC = b"ZKVLOG4\n"
MAGIC_V3 = b"ZKVLOG3\n"
MAGIC_V2 = b"ZKVLOG2\n"
MAGIC_V1 = b"ZKVLOG1\n"
MAGICS = (MAGIC, MAGIC_V3, MAGIC_V2, MAGIC_V1)

_PREFIX = struct.Struct("!II")  # length, crc
_LENGTH = struct.Struct("!I")
_KEY_LEN = struct.Struct("!H")  # a MEMOS entry's key_len
_KEY_LEN_AT = struct.calcsize("!Q")  # its offset in the entry: after the request id
_SET = struct.Struct("!BQQI")  # type, request_id, deadline_ms, key_len
_DEL = struct.Struct("!BQ")  # type, request_id
_MEMO = struct.Struct("!BQBBQI")  # type, request_id, kind, status, deadline_ms, fingerprint
_MEMOS = struct.Struct("!BI")  # type, count
_TIME = struct.Struct("!BQ")  # type, now_ms
_SETV = struct.Struct("!BQQQI")  # type, request_id, deadline_ms, version, key_len
_DELV = struct.Struct("!BQQ")  # type, request_id, version
_VERSION = struct.Struct("!BQ")  # type, version
# A MEMOS entry's head, followed by the key: request_id, key_len, kind, status, deadline_ms,
# fingerprint. The idempotency memory keeps its entries in this form.
MEMOS_ENTRY = struct.Struct("!QHBBQI")
MEMOS_HEAD_BYTES = _MEMOS.size
# Entries per MEMOS record: about 45 KiB with 16-byte keys, and never past MAX_BODY_BYTES
# (512 entries of the longest key are 33.6 MB).
MEMOS_PER_RECORD = 512

PREFIX_BYTES = _PREFIX.size
# The largest body a valid record can have: a SET of the largest key and value the protocol
# allows. A length field above it is damage, and is reported as such rather than trusted.
MAX_BODY_BYTES = _SETV.size + MAX_KEY_BYTES + MAX_VALUE_BYTES
# The longest key a record may hold: a client's, or one of the worker's own (a lock's or a
# fence's record: a prefix of 7 bytes before a client's lock name, see workers/shard.py).
MAX_STORED_KEY_BYTES = MAX_KEY_BYTES + 16

# A batch that writes starts with a TIME record once this long has passed since the last one,
# so every logged write was applied less than this after the TIME record before it.
TIME_RECORD_INTERVAL_MS = 1000
EVERYSEC_INTERVAL_S = 1.0  # fsync policy "everysec": the most time a write stays un-synced
WRITE_CHUNK_BYTES = 1024 * 1024  # snapshots are written in chunks of about this size


class RecordType(enum.IntEnum):
    """The first byte of a record's body."""

    SET = 0x01
    DEL = 0x02
    MEMO = 0x03
    MEMOS = 0x04
    TIME = 0x05
    SETV = 0x06
    DELV = 0x07
    VERSION = 0x08


class FsyncPolicy(enum.StrEnum):
    """When appended records are forced to disk, named as Redis names its ``appendfsync``.

    ALWAYS: before any reply of the batch that wrote them is sent (group commit), so an
    acknowledged write survives a power cut. EVERYSEC: at most once per second, from the
    worker's timers; a crash of the machine may lose the last second, a crash of the process
    loses nothing (the data is in the kernel's page cache). NO: never explicitly; the kernel
    writes back when it likes (typically within 30 s on Linux).
    """

    ALWAYS = "always"
    EVERYSEC = "everysec"
    NO = "no"


@dataclass(frozen=True, slots=True)
class SetRecord:
    """A SET that was applied: ``deadline_ms`` is absolute (Unix ms), None for never.
    ``version`` is the key's new version (a SETV record), 0 for a SET record of an older log."""

    request_id: int
    key: bytes
    value: bytes
    deadline_ms: int | None
    version: int = 0


@dataclass(frozen=True, slots=True)
class DelRecord:
    """A DEL that removed a live key; ``version`` that of the delete (DELV), 0 in older logs."""

    request_id: int
    key: bytes
    version: int = 0


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """The shard's version counter had reached ``version`` (compaction writes it)."""

    version: int


@dataclass(frozen=True, slots=True)
class MemoRecord:
    """A remembered reply, written by compaction: see workers/idempotency.py."""

    request_id: int
    kind: int
    status: int
    deadline_ms: int | None
    fingerprint: int
    key: bytes


@dataclass(frozen=True, slots=True)
class MemosRecord:
    """Remembered replies, written by compaction, oldest first: see workers/idempotency.py.

    Attributes:
        entries: each entry's bytes as they are in the record (:data:`MEMOS_ENTRY`, then the
            key): the form the idempotency memory keeps.
    """

    entries: tuple[bytes, ...]

    def memos(self) -> list[MemoRecord]:
        """The entries as MemoRecords (tools and tests)."""
        records = []
        for entry in self.entries:
            request_id, _, kind, status, deadline_ms, fingerprint = MEMOS_ENTRY.unpack_from(entry)
            key = entry[MEMOS_ENTRY.size :]
            records.append(
                MemoRecord(request_id, kind, status, deadline_ms or None, fingerprint, key)
            )
        return records


@dataclass(frozen=True, slots=True)
class TimeRecord:
    """The worker's wall clock had reached ``now_ms`` (Unix ms) when it wrote what follows.

    Why: a key that expired is not logged, so a replay with a clock stepped back would bring
    it back; and the idempotency memory needs to know when the writes it replays were applied.
    The worker writes one at the head of a batch's records when a second has passed since the
    last (so every record is applied less than TIME_RECORD_INTERVAL_MS after the TIME before
    it) and whenever a read saw a key expire since (so replay knows the time had passed that
    key's deadline); compaction writes them with the memory. See docs/persistence.md.
    """

    now_ms: int


Record = SetRecord | DelRecord | MemoRecord | MemosRecord | TimeRecord | VersionRecord


class Unreadable(str):
    """Why a record whose checksum matched cannot be read: an unknown type (a newer version
    wrote it), a key longer than any version writes, or a body that does not parse. Not damage
    from a crash (the checksum rules that out), so never a torn tail to cut off, wherever it
    stands: :func:`classify` reports it as corruption, and replay refuses the log."""


class CorruptLog(Exception):
    """A log damaged before its end: replaying past the damage would skip acknowledged
    writes, and stopping there would silently drop the writes after it, so neither is done.

    Attributes:
        path: the log file.
        offset: byte offset of the first bad record.
        reason: what is wrong with it.
        size: the file's size.
    """

    def __init__(self, path: str, offset: int, reason: str, size: int) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        self.size = size
        if isinstance(reason, Unreadable):  # intact, but not this version's to read
            super().__init__(
                f"log {path} cannot be read from byte {offset}: {reason}. Its checksums match, "
                f"so it is not damage: run the zkv version that wrote it (`python -m "
                f"workers.repair` would cut off everything from that byte, and refuses to)"
            )
            return
        super().__init__(
            f"log {path} is damaged at byte {offset} ({reason}) with valid records after it, "
            f"{size - offset} bytes from there to the end: refusing to replay it. To repair, "
            f"run `python -m workers.repair {path}`: it keeps a copy of the file and truncates "
            f"it at byte {offset}, dropping the bad record and everything after it"
        )


class DurabilityError(Exception):
    """A write or fsync of a shard's files failed: what is in memory may no longer be on disk,
    so the worker must stop serving (fail-stop, as Redis and PostgreSQL do on fsync errors)."""


class NoSpace(Exception):
    """An append found the disk full (ENOSPC, or EDQUOT: over quota) and was undone: the log
    was truncated back to where it ended before, so nothing of the batch is on disk. Unlike a
    failed fsync (see :meth:`AppendLog.sync`), the page cache holds nothing unknown, so the
    worker can refuse writes, keep serving reads, and try again when space returns."""


# write() errors that mean "no room", not "the disk failed"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


# --- encoding ---------------------------------------------------------------------------------


# The CRC of a record starts with its four length bytes: zlib.crc32 of them, by length, so a
# record costs one crc32 call (over its body), not two. Records of a batch mostly share a few
# lengths; the cache is bounded so a stream of distinct lengths cannot grow it without end.
_LENGTH_CRCS: dict[int, int] = {}
_LENGTH_CRCS_MAX = 4096
_pack_prefix = _PREFIX.pack
_pack_set_head = _SET.pack
_pack_del_head = _DEL.pack
_pack_memos_head = _MEMOS.pack
_crc32 = zlib.crc32
_SET_TYPE = int(RecordType.SET)
_DEL_TYPE = int(RecordType.DEL)
_MEMO_TYPE = int(RecordType.MEMO)
_MEMOS_TYPE = int(RecordType.MEMOS)
_TIME_TYPE = int(RecordType.TIME)
_SETV_TYPE = int(RecordType.SETV)
_DELV_TYPE = int(RecordType.DELV)
_VERSION_TYPE = int(RecordType.VERSION)
_pack_setv_head = _SETV.pack
_pack_delv_head = _DELV.pack


def _length_crc(length: int) -> int:
    crc = _LENGTH_CRCS.get(length)
    if crc is None:
        crc = _crc32(_LENGTH.pack(length))
        if len(_LENGTH_CRCS) < _LENGTH_CRCS_MAX:
            _LENGTH_CRCS[length] = crc
    return crc


def _frame(body: bytes) -> bytes:
    length = len(body)
    crc = _LENGTH_CRCS.get(length)
    if crc is None:
        crc = _length_crc(length)
    return _pack_prefix(length, _crc32(body, crc)) + body


def encode_set(request_id: int, key: bytes, value: bytes, deadline_ms: int | None) -> bytes:
    """One SET record, ready to append (the worker's hot path: _frame written out)."""
    body = _pack_set_head(_SET_TYPE, request_id, deadline_ms or 0, len(key)) + key + value
    length = len(body)
    crc = _LENGTH_CRCS.get(length)
    if crc is None:
        crc = _length_crc(length)
    return _pack_prefix(length, _crc32(body, crc)) + body


def encode_setv(
    request_id: int, key: bytes, value: bytes, deadline_ms: int | None, version: int
) -> bytes:
    """One SETV record, ready to append (every SET's: _frame written out, as encode_set)."""
    body = (
        _pack_setv_head(_SETV_TYPE, request_id, deadline_ms or 0, version, len(key)) + key + value
    )
    length = len(body)
    crc = _LENGTH_CRCS.get(length)
    if crc is None:
        crc = _length_crc(length)
    return _pack_prefix(length, _crc32(body, crc)) + body


def encode_del(request_id: int, key: bytes) -> bytes:
    """One DEL record, ready to append (older logs' form: the worker writes DELV)."""
    return _frame(_pack_del_head(_DEL_TYPE, request_id) + key)


def encode_delv(request_id: int, key: bytes, version: int) -> bytes:
    """One DELV record, ready to append."""
    return _frame(_pack_delv_head(_DELV_TYPE, request_id, version) + key)


def encode_version(version: int) -> bytes:
    """One VERSION record, ready to append."""
    return _frame(_VERSION.pack(_VERSION_TYPE, version))


def encode_memo(
    request_id: int, kind: int, status: int, deadline_ms: int | None, fingerprint: int, key: bytes
) -> bytes:
    """One MEMO record (a remembered reply), ready to append."""
    head = _MEMO.pack(_MEMO_TYPE, request_id, kind, status, deadline_ms or 0, fingerprint)
    return _frame(head + key)


def encode_time(now_ms: int) -> bytes:
    """One TIME record, ready to append."""
    return _frame(_TIME.pack(_TIME_TYPE, now_ms))


def encode_memos(entries: Sequence[bytes | tuple[bytes, bytes]]) -> Iterator[bytes]:
    """MEMOS records holding ``entries`` in order, MEMOS_PER_RECORD to a record.

    Args:
        entries: as the idempotency memory keeps them (:meth:`RequestMemory.frozen
            <workers.idempotency.RequestMemory.frozen>`): an entry's bytes, or for a long key
            ``(head, key)``. So a record is one join, not a loop over its entries.
    """
    pack_head = _pack_memos_head
    for start in range(0, len(entries), MEMOS_PER_RECORD):
        part = entries[start : start + MEMOS_PER_RECORD]
        try:
            body = b"".join(part)  # type: ignore[arg-type]  # a TypeError if a key is long
        except TypeError:
            body = b"".join(e if type(e) is bytes else e[0] + e[1] for e in part)  # type: ignore[misc]
        yield _frame(pack_head(_MEMOS_TYPE, len(part)) + body)


def encode_memo_entry(entry: bytes) -> bytes:
    """A MEMOS record of one entry (the shard logs a reply with a body so, see
    workers/idempotency.py): :func:`encode_memos` of one entry, without its loop."""
    return _frame(_pack_memos_head(_MEMOS_TYPE, 1) + entry)


def encode(record: Record) -> bytes:
    """Any record, ready to append (tests and tools; the worker calls the typed encoders)."""
    match record:
        case SetRecord(request_id, key, value, deadline_ms, version):
            if version:
                return encode_setv(request_id, key, value, deadline_ms, version)
            return encode_set(request_id, key, value, deadline_ms)
        case DelRecord(request_id, key, version):
            if version:
                return encode_delv(request_id, key, version)
            return encode_del(request_id, key)
        case VersionRecord(version):
            return encode_version(version)
        case MemoRecord(request_id, kind, status, deadline_ms, fingerprint, key):
            return encode_memo(request_id, kind, status, deadline_ms, fingerprint, key)
        case MemosRecord(entries):
            return _frame(_pack_memos_head(_MEMOS_TYPE, len(entries)) + b"".join(entries))
        case TimeRecord(now_ms):
            return encode_time(now_ms)
    raise TypeError(f"not a log record: {record!r}")


# --- decoding ---------------------------------------------------------------------------------


def parse_at(data: memoryview, offset: int) -> tuple[Record, int] | str:
    """The record starting at ``offset`` and the offset just past it, or why there is none.

    Never raises on damaged input: every field is bounds-checked against the buffer, which
    is what lets the reader classify damage instead of crashing on it. The cheap structural
    checks (length, type, sizes) come before the CRC, so that trying a garbage offset (see
    :func:`classify`) rarely costs a checksum.

    Args:
        data: the whole file, as a memoryview (slices of it are not copies).
        offset: where the record should start.
    """
    size = len(data)
    if offset + PREFIX_BYTES > size:
        return "incomplete record header"
    length, crc = _PREFIX.unpack_from(data, offset)
    if length > MAX_BODY_BYTES:
        return f"record length {length} exceeds the largest possible {MAX_BODY_BYTES}"
    start = offset + PREFIX_BYTES
    end = start + length
    if end > size:
        return f"incomplete record: {length} body bytes declared, {size - start} present"
    if length == 0:
        return "empty record"
    kind = data[start]
    unknown = False
    if kind == RecordType.SET:
        if length < _SET.size:
            return "SET record too short"
        key_len = _LENGTH.unpack_from(data, start + _SET.size - 4)[0]
        if _SET.size + key_len > length:
            return "SET record key runs past its end"
    elif kind == RecordType.DEL:
        if length < _DEL.size:
            return "DEL record too short"
        key_len = length - _DEL.size
    elif kind == RecordType.MEMO:
        if length < _MEMO.size:
            return "MEMO record too short"
        key_len = length - _MEMO.size
    elif kind == RecordType.MEMOS:
        if length < _MEMOS.size:
            return "MEMOS record too short"
        key_len = 0  # an entry's is 16 bits: never over MAX_KEY_BYTES
    elif kind == RecordType.TIME:
        if length != _TIME.size:
            return "TIME record of the wrong size"
        key_len = 0
    elif kind == RecordType.SETV:
        if length < _SETV.size:
            return "SETV record too short"
        key_len = _LENGTH.unpack_from(data, start + _SETV.size - 4)[0]
        if _SETV.size + key_len > length:
            return "SETV record key runs past its end"
    elif kind == RecordType.DELV:
        if length < _DELV.size:
            return "DELV record too short"
        key_len = length - _DELV.size
    elif kind == RecordType.VERSION:
        if length != _VERSION.size:
            return "VERSION record of the wrong size"
        key_len = 0
    else:
        unknown = True  # judged after the CRC: a valid record of a newer version is not garbage
        key_len = 0
    if zlib.crc32(data[start:end], zlib.crc32(data[offset : offset + 4])) != crc:
        return "checksum mismatch"
    if unknown:
        return Unreadable(f"record type 0x{kind:02x} is unknown to this version (a newer one's?)")
    if key_len > MAX_STORED_KEY_BYTES:
        return Unreadable(
            f"a key of {key_len} bytes: no version writes keys over {MAX_STORED_KEY_BYTES}"
        )
    if kind == RecordType.SETV:
        _, request_id, deadline_ms, version, key_len = _SETV.unpack_from(data, start)
        key_end = start + _SETV.size + key_len
        record: Record = SetRecord(
            request_id,
            bytes(data[start + _SETV.size : key_end]),
            bytes(data[key_end:end]),
            deadline_ms or None,
            version,
        )
    elif kind == RecordType.DELV:
        _, request_id, version = _DELV.unpack_from(data, start)
        record = DelRecord(request_id, bytes(data[start + _DELV.size : end]), version)
    elif kind == RecordType.VERSION:
        record = VersionRecord(_VERSION.unpack_from(data, start)[1])
    elif kind == RecordType.SET:
        _, request_id, deadline_ms, key_len = _SET.unpack_from(data, start)
        key_end = start + _SET.size + key_len
        record = SetRecord(
            request_id,
            bytes(data[start + _SET.size : key_end]),
            bytes(data[key_end:end]),
            deadline_ms or None,
        )
    elif kind == RecordType.DEL:
        _, request_id = _DEL.unpack_from(data, start)
        record = DelRecord(request_id, bytes(data[start + _DEL.size : end]))
    elif kind == RecordType.TIME:
        record = TimeRecord(_TIME.unpack_from(data, start)[1])
    elif kind == RecordType.MEMOS:
        parsed = _parse_memos(data, start, end)
        if isinstance(parsed, str):
            return parsed
        record = parsed
    else:
        _, request_id, command, status, deadline_ms, fingerprint = _MEMO.unpack_from(data, start)
        record = MemoRecord(
            request_id,
            command,
            status,
            deadline_ms or None,
            fingerprint,
            bytes(data[start + _MEMO.size : end]),
        )
    return record, end


def _parse_memos(data: memoryview, start: int, end: int) -> MemosRecord | Unreadable:
    """The body of a MEMOS record whose CRC matched, or why it does not parse (a writer's bug
    or a crafted file: the CRC rules out a crash's damage, see :class:`Unreadable`)."""
    count = _MEMOS.unpack_from(data, start)[1]
    unpack_key_len = _KEY_LEN.unpack_from
    head_bytes = MEMOS_ENTRY.size
    entries: list[bytes] = []
    append = entries.append
    offset = start + _MEMOS.size
    for index in range(count):
        if offset + head_bytes > end:
            return Unreadable(f"MEMOS record: entry {index} of {count} runs past its end")
        entry_end = offset + head_bytes + unpack_key_len(data, offset + _KEY_LEN_AT)[0]
        if entry_end > end:
            return Unreadable(f"MEMOS record: entry {index} of {count} runs past its end")
        append(bytes(data[offset:entry_end]))
        offset = entry_end
    if offset != end:
        return Unreadable(f"MEMOS record: {end - offset} bytes after its {count} entries")
    return MemosRecord(tuple(entries))


@dataclass(frozen=True, slots=True)
class Damage:
    """The first bad spot of a log.

    Attributes:
        offset: where the bad record (or bad magic) starts.
        reason: what is wrong there.
        torn: True if nothing valid follows it: the tail of a write cut short by a crash,
            safe to cut off. False: corruption with valid records after it.
    """

    offset: int
    reason: str
    torn: bool


# How a bad record is classified, the heart of "torn tail or corruption?".
#
# A crash in the middle of an append leaves a prefix of the last write: a record header cut
# short, a body cut short, or (after a power cut on some filesystems) a tail of zeros or stale
# blocks where the data should be. Everything in such a tail is garbage, and it is only ever at
# the end. Corruption in the middle (a bad disk block, a stray write) is followed by valid
# records: acknowledged writes that replaying up to the damage would silently drop.
#
# So the question is "does any valid record start after the bad spot?". The length field of
# the bad record cannot be trusted (a flipped bit there makes a record in the middle look as if
# it ran past the end of the file), so:
#   1. fast path: if a valid record starts exactly where the bad one says it ends, only its
#      contents are damaged: corruption;
#   2. otherwise try every later byte offset as a record start, stopping at the first valid
#      one (corruption) or at the end of the file (a torn tail). parse_at rejects almost every
#      garbage offset on its length and type fields before computing any checksum, runs of
#      zero bytes (which can never start a record: its length is at least 9) are skipped at C
#      speed, and a CRC-32 makes a false match a 2**-32 event per offset that gets that far.
#   3. a valid record found INSIDE the bad record's declared extent (its length field, when
#      that is possible at all) is no evidence by itself: a torn SET whose value holds the
#      bytes of a record (a value that is a log, or a zkv record copied by a client) has one
#      there. It counts only if the bad record's own CRC matches with the length that would end
#      it exactly there, i.e. only its length field was damaged (a flipped bit in the middle of
#      the log, whose real successor is then that record). Candidates past the declared extent
#      count as before. What this gives up: a record in the middle whose length AND contents
#      are both damaged, with a length reaching past every later record, reads as a torn tail.
# Cost: a torn tail is scanned once, to its end, which is short (the part of the last batch
# that made it to disk); corruption in the middle is scanned up to the next valid record, at
# most one record away unless several are damaged.
# Damaged magic at offset 0 is corruption unless the file is a cut-short prefix of the magic.
_NONZERO = re.compile(rb"[^\x00]")


def classify(data: memoryview, offset: int, reason: str) -> Damage:
    """Decide whether the bad record at ``offset`` is a torn tail (see the comment above).
    A record whose checksum matched (``reason`` an :class:`Unreadable`) is never one."""
    if isinstance(reason, Unreadable):
        return Damage(offset, reason, torn=False)
    size = len(data)
    extent_end = offset + 1  # the bad record's declared end, if its length is possible at all
    crc = 0
    if offset + PREFIX_BYTES <= size:
        length, crc = _PREFIX.unpack_from(data, offset)
        declared_end = offset + PREFIX_BYTES + length
        if declared_end < size and not isinstance(parse_at(data, declared_end), str):
            return Damage(offset, reason, torn=False)
        if length <= MAX_BODY_BYTES:
            extent_end = declared_end
    candidate = offset + 1
    last = size - PREFIX_BYTES
    while candidate <= last:
        found = _NONZERO.search(data, candidate)
        if found is None:
            break
        # A record's four length bytes cannot all be zero: skip to where they first may not be.
        candidate = max(candidate, found.start() - 3)
        if not isinstance(parse_at(data, candidate), str) and (
            candidate >= extent_end or _ends_at(data, offset, crc, candidate)
        ):
            return Damage(offset, reason, torn=False)
        candidate += 1
    return Damage(offset, reason, torn=True)


def _ends_at(data: memoryview, offset: int, crc: int, end: int) -> bool:
    """Whether the record at ``offset`` is intact but for its length field, ending at ``end``:
    its stored CRC matches its body cut there, with the length that cut implies (see step 3 of
    the comment above :func:`classify`)."""
    length = end - offset - PREFIX_BYTES
    if length < 1:
        return False
    return zlib.crc32(data[offset + PREFIX_BYTES : end], zlib.crc32(_LENGTH.pack(length))) == crc


def check_magic(data: memoryview) -> Damage | None:
    """None if the file starts with a magic this version reads (:data:`MAGICS`); a torn Damage
    if it is a cut-short prefix of one (a crash while the file was being created), else a
    corrupt one."""
    head = bytes(data[: len(MAGIC)])
    if head in MAGICS:
        return None
    if len(head) < len(MAGIC) and any(magic.startswith(head) for magic in MAGICS):
        return Damage(0, "incomplete magic", torn=True)
    if len(head) == len(MAGIC) and head.startswith(b"ZKVLOG"):
        reason = Unreadable(f"a zkv log of another version ({head!r}); this one reads {MAGICS!r}")
        return Damage(0, reason, torn=False)
    return Damage(0, f"not a zkv log: starts with {head!r}, expected {MAGIC!r}", torn=False)


class LogReader:
    """Reads a log file once, from start to end, for replay or repair.

    The file is mapped into memory (mmap), so a large log is not read into a bytes object
    first. Use as a context manager; after :meth:`records` is exhausted, :attr:`damage` says
    whether and where it stopped early.

    Args:
        path: the log file; it must exist.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._file = open(path, "rb")  # closed by close()
        self.size = os.fstat(self._file.fileno()).st_size
        self._map = (
            mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        )
        self._data = memoryview(self._map if self._map is not None else b"")
        self.damage: Damage | None = None
        self.valid_end = 0  # the offset just past the last valid record, after records()

    def records(self) -> Iterator[tuple[int, Record]]:
        """Yield ``(offset, record)`` for every valid record, in order.

        A torn tail ends the iteration quietly (:attr:`damage` tells where).

        Raises:
            CorruptLog: a bad record with valid records after it, or a file that is not a log.
        """
        data = self._data
        damage = check_magic(data)
        if damage is not None:
            self._fail(damage)
            return
        offset = len(MAGIC)
        self.valid_end = offset
        size = self.size
        while offset < size:
            parsed = parse_at(data, offset)
            if isinstance(parsed, str):
                self._fail(classify(data, offset, parsed))
                return
            yield offset, parsed[0]
            offset = parsed[1]
            self.valid_end = offset

    def _fail(self, damage: Damage) -> None:
        self.damage = damage
        self.valid_end = damage.offset
        if not damage.torn:
            raise CorruptLog(self.path, damage.offset, damage.reason, self.size)

    def close(self) -> None:
        """Unmap and close the file (the memoryview goes first: an exported map cannot close)."""
        self._data.release()
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- writing ----------------------------------------------------------------------------------


def write_all(
    fd: int, data: bytes | memoryview, write: Callable[[int, memoryview], int] = os.write
) -> None:
    """os.write until every byte is written (a regular file may take a write in parts).

    Args:
        write: the write function (tests inject one that fails with ENOSPC).

    Raises:
        DurabilityError: the write failed (disk full, I/O error); the file may now end with a
            partial record, which replay treats as a torn tail. Its ``__cause__`` is the
            OSError.
    """
    view = memoryview(data)
    while view:
        try:
            written = write(fd, view)
        except InterruptedError:
            continue
        except OSError as exc:
            raise DurabilityError(f"write failed: {exc}") from exc
        view = view[written:]


def fsync_dir(path: str | Path, fsync: Callable[[int], None] = os.fsync) -> None:
    """fsync a directory, which makes the creation, removal or renaming of its entries durable
    (fsyncing a file does not make its name durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    except OSError as exc:
        raise DurabilityError(f"fsync of directory {path} failed: {exc}") from exc
    finally:
        os.close(fd)


def create_log(path: str | Path, fsync: Callable[[int], None] = os.fsync) -> None:
    """Create an empty log (just the magic), durably, unless a file is already there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return
    try:
        write_all(fd, MAGIC)
        fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(Path(path).parent, fsync)


class AppendLog:
    """The open end of a shard's log: appends records and fsyncs them per policy.

    The worker calls :meth:`append` once per batch with all of the batch's records joined, so
    a batch costs one ``write`` and, under ALWAYS, one ``fsync`` (group commit): replies wait
    for the fsync, and everything that arrived together shares its cost.

    Args:
        path: the log file, which must exist (see :func:`create_log`).
        policy: when to fsync.
        fsync: the fsync function; tests pass a counter.
        monotonic: seconds for the EVERYSEC timer; tests pass a fake clock.
        write: the write function; tests pass one that fails with ENOSPC.
    """

    def __init__(
        self,
        path: str | Path,
        policy: FsyncPolicy,
        fsync: Callable[[int], None] = os.fsync,
        monotonic: Callable[[], float] = time.monotonic,
        write: Callable[[int, memoryview], int] = os.write,
    ) -> None:
        self.path = str(path)
        self.policy = policy
        self._fsync = fsync
        self._write = write
        self._monotonic = monotonic
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.dirty = False  # appended bytes not yet fsynced
        self._synced_s = monotonic()
        # fsync latencies for the worker's REPORT: counts per zkv.protocol.FSYNC_BUCKETS_S
        # bucket (the last for slower ones), and their total; two clock reads an fsync.
        self.fsync_buckets = [0] * (len(FSYNC_BUCKETS_S) + 1)
        self.fsync_seconds = 0.0
        # The policy as booleans, read on every batch and every pass of the loop.
        self._always = policy is FsyncPolicy.ALWAYS
        self._everysec = policy is FsyncPolicy.EVERYSEC

    def append(self, data: bytes) -> None:
        """Append records (one write). Not yet durable unless :meth:`commit` says so.

        Raises:
            NoSpace: the disk is full; the file was truncated back to its size before, so
                none of ``data`` is in it (a write cut short leaves no partial record).
            DurabilityError: the write failed otherwise (an I/O error), or the truncation did.
        """
        if not data:
            return
        try:
            write_all(self.fd, data, self._write)
        except DurabilityError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError) or cause.errno not in NO_SPACE_ERRNOS:
                raise
            try:
                os.ftruncate(self.fd, self.size)  # shrinking needs no space
            except OSError as undo:
                raise DurabilityError(
                    f"{exc}; then truncating {self.path} back to {self.size} bytes failed: {undo}"
                ) from undo
            raise NoSpace(f"{cause.strerror or cause} writing {self.path}") from cause
        self.size += len(data)
        self.dirty = True

    def commit(self) -> None:
        """End of a batch: under ALWAYS, fsync what the batch appended before its replies go.

        Raises:
            DurabilityError: the fsync failed.
        """
        if self.dirty and self._always:
            self.sync()

    def tick(self) -> None:
        """The worker's timer: under EVERYSEC, fsync if something waits and a second passed."""
        if (
            self.dirty
            and self._everysec
            and self._monotonic() - self._synced_s >= EVERYSEC_INTERVAL_S
        ):
            self.sync()

    def sync(self) -> None:
        """fsync now, whatever the policy.

        Raises:
            DurabilityError: the fsync failed. After a failed fsync Linux may have dropped the
                dirty pages and marked them clean, so retrying cannot tell whether the data is
                on disk: the caller must stop.
        """
        started = time.perf_counter()
        try:
            self._fsync(self.fd)
        except OSError as exc:
            raise DurabilityError(f"fsync of {self.path} failed: {exc}") from exc
        took_s = time.perf_counter() - started
        self.fsync_buckets[bisect_left(FSYNC_BUCKETS_S, took_s)] += 1
        self.fsync_seconds += took_s
        self.dirty = False
        self._synced_s = self._monotonic()

    def switch(self, fd: int, size: int) -> None:
        """Continue on another open file (a compacted log renamed over this one); closes the
        old descriptor. The new file must already be fsynced."""
        os.close(self.fd)
        self.fd = fd
        self.size = size
        self.dirty = False
        self._synced_s = self._monotonic()

    def close(self, sync: bool = True) -> None:
        """fsync (unless ``sync`` is False or nothing is dirty) and close."""
        try:
            if sync and self.dirty:
                self.sync()
        finally:
            try:
                os.close(self.fd)
            except OSError as exc:  # pragma: no cover - EBADF would be our bug, EIO the disk's
                if exc.errno != errno.EBADF:
                    raise
