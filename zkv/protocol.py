"""The zkv wire protocol, version 1. This module is the only place that builds or parses frames.

Everything here is socket-free: ``encode_*`` turns a message into ``list[bytes]`` (the frames of
one ZeroMQ multipart message, without any ROUTER identity frame), ``decode_*`` turns frames back
into a message or raises :class:`ProtocolError`. docs/protocol.md is the same specification in
prose, written so that a client in another language can be built from it alone.

Why the layout looks like this: on this machine a Python DEALER/ROUTER echo moves about 73,000
one-frame requests per second and about 39,000 four-frame ones, so every message is at most two
frames: one packed header that holds everything the broker routes on (command, request id, key),
then the value as an opaque second frame that the broker forwards without reading or copying.
And since even one-frame messages cap a Python broker far below a pipelining client's needs,
many requests can travel in one message (BATCH), packed so that the broker can cut a batch by
shard by slicing records, never decoding a value.

All integers are unsigned and big-endian (network order). Every header starts with the same two
bytes, ``version`` and ``kind``, so a peer can reject an unknown version before reading further.

Frames, per message (``|`` separates frames):

Client -> broker (``REQUEST``, kinds GET, SET, DEL, ALL, PING, STATS, and the keyed commands
of issue 12: INCR, EXPIRE, LOCK, REFRESH, UNLOCK, FENCE_CHECK, below)::

    header(20 + len(key) bytes) [| value]
    header = version:u8  kind:u8  flags:u8  reserved:u8(0)  request_id:u64  arg:u64  key:bytes

    GET/DEL  key non-empty, arg 0, one frame.
    SET      key non-empty, two frames (the value, any bytes, may be empty). With flag TTL the
             key expires ``arg`` milliseconds after the worker applies the write; without it the
             key never expires.
    STAMPED  (SET, DEL) arg's top STAMP_BITS bits carry the client's first-send time, Unix
             seconds mod STAMP_MODULUS, the same in every resend; the rest of arg is as above.
             A worker refuses a stamped write older than its idempotency window that it does
             not remember: UNAVAILABLE, body starting OUTCOME_UNKNOWN (never a second apply).
    ALL      key = cursor: only keys strictly greater (bytewise) are returned; arg = limit per
             shard (0 = no limit, and then no ordering either); flag KEYS_ONLY omits values.
    PING     key empty, arg 0.
    STATS    key empty, arg 0: answered by the broker with UTF-8 JSON, its figures and each
             worker's last REPORT (see "worker reports and STATS" below).

    Issue 12 (docs/protocol.md section 3.2). Flags NX 0x08, XX 0x10 (SET), EXT 0x20 (SET, DEL,
    INCR, EXPIRE: the value frame starts with an extension block, :func:`encode_ext`),
    VERSIONED 0x40 (GET, SET, DEL, INCR, EXPIRE: the OK body starts with version:u64),
    RETURN_OLD 0x80 (SET: the OK body holds the previous item); TTL on GET is a touch (a
    write: STAMPED allowed), KEYS_ONLY on GET answers without the value. Each kind takes only
    its flags (_ALLOWED_FLAGS); NX with XX is an error; no key may start with 0x00.

    INCR         key, arg ttl ms with TTL; value [ext] by:i64.
    EXPIRE       key, arg ttl ms with TTL (without: remove the deadline); value [ext] with EXT.
    LOCK         lock name, TTL required; value wait_ms:u32 (0..MAX_LOCK_WAIT_MS).
    REFRESH      lock name, TTL required; value token:u64 (>= 1).
    UNLOCK       lock name, arg 0; value token:u64 (>= 1).
    FENCE_CHECK  lock name, arg 0, no flags; value token:u64 (>= 1).

Broker -> worker (``DISPATCH``), a request header wrapped with the token that fences it::

    header(10 bytes + request header) [| value]
    header = version:u8  kind:u8(DISPATCH)  token:u64  request-header

Worker -> broker -> client (``REPLY``)::

    header(28 bytes) [| body]
    header = version:u8  kind:u8(REPLY)  status:u8  reserved:u8(0)  request_id:u64  token:u64
             deadline_ms:u64

    deadline_ms is the key's expiry as Unix time in milliseconds, 0 for "never expires" or "not
    applicable". body: GET/OK the value; ALL/OK the entries (see :func:`encode_entries`); PING/OK
    a UTF-8 JSON object describing the cluster; ERROR/UNAVAILABLE/CONFLICT/PRECONDITION a UTF-8
    message; the issue-12 bodies (:func:`versioned_body`, :func:`encode_old_item`,
    :func:`incr_body`, :func:`token_body`); otherwise none.

Client -> broker (``BATCH``): many GET/SET/DEL requests, each answered on its own::

    header(16 bytes) | records
    header = version:u8  kind:u8(BATCH)  reserved:u16(0)  count:u32  batch_id:u64
    record = kind:u8  flags:u8  key_len:u16  value_len:u32  request_id:u64  arg:u64  key  value

    count 1..MAX_BATCH_OPS, records at most MAX_BATCH_BYTES; each record follows the rules of
    its kind above (ALL and PING cannot be batched). A malformed batch gets one ERROR REPLY
    whose request_id is batch_id; a malformed record an ERROR sub-reply of its own.

Broker -> worker (``BATCH_DISPATCH``): records cut from client batches, under one token::

    header(16 bytes) | records
    header = version:u8  kind:u8(BATCH_DISPATCH)  reserved:u16(0)  count:u32  token:u64

Worker -> broker -> client (``BATCH_REPLY``): one sub-reply per record, in order::

    header(16 bytes) | sub-replies
    header    = version:u8  kind:u8(BATCH_REPLY)  reserved:u16(0)  count:u32  token:u64
    sub-reply = status:u8  flags:u8(HAS_BODY)  reserved:u16(0)  body_len:u32  request_id:u64
                token:u64  deadline_ms:u64  body

    The fields and bodies of REPLY; HAS_BODY tells an empty body from none. A client may get
    the answers to a batch in any grouping, and some as plain REPLYs: match by request id.

Worker <-> broker control (one frame each)::

    READY       version:u8 kind:u8 flags:u16 shard:u32 last_token:u64 cluster:u64
                                                                           worker -> broker
    ASSIGN      version:u8 kind:u8 reserved:u16 shard:u32 shards:u32 epoch:u64  broker -> worker
    HEARTBEAT   version:u8 kind:u8                                         both ways
    DISCONNECT  version:u8 kind:u8                                         both ways
    REPORT      version:u8 kind:u8 | UTF-8 JSON (MAX_REPORT_BYTES)      worker -> broker

    DISCONNECT from a worker: it leaves, free its shard now. From the broker: "I do not know
    you" (it restarted), so the worker sends READY again at once instead of waiting for the
    heartbeat liveness to run out.

    shard 0xFFFFFFFF means "none": a READY from a worker that owns nothing, an ASSIGN that makes
    the worker a standby. READY's flags: READY_DURABLE (bit 0) for a worker that keeps shards
    in a data directory, whose manifest's cluster id is ``cluster`` (0 for a worker in memory).
    A READY of 16 bytes, without ``cluster`` (earlier versions), is read with cluster 0.

Worker -> broker's events proxy -> subscriber (``EVENT``, docs/protocol.md section 8)::

    key | header(32 bytes)
    header = version:u8  kind:u8(EVENT)  event:u8  reserved:u8(0)  shard:u32  seq:u64
             key_version:u64  deadline_ms:u64

    The key first: ZeroMQ subscriptions filter on the first frame's prefix. seq is
    ``stream << 32 | n`` (:func:`event_seq`), n = 1, 2, ... per shard and stream.

Leader <-> follower replication (kinds 0x30..0x3F; cluster mode, workers/replication.py)::

    FOLLOW    version:u8 kind:u8 flags:u8 id_len:u8 shard:u32 epoch:u64 have_seq:u64 follower_id
                                                                        follower -> leader
    SNAPSHOT  version:u8 kind:u8 flags:u8 reserved:u8 shard:u32 epoch:u64 seq:u64 chunk_no:u32
              | body                                                    leader -> follower
    RECORDS   version:u8 kind:u8 reserved:u16 shard:u32 epoch:u64 first_seq:u64 count:u32
              | body                                                    leader -> follower
    ACK       version:u8 kind:u8 flags:u8 reserved:u8 shard:u32 epoch:u64 seq:u64 chunk_no:u32
                                                                        follower -> leader
    REFUSE    version:u8 kind:u8 reserved:u16 shard:u32 epoch:u64 | reason   follower -> leader

    epoch >= 1 everywhere; shard below 0xFFFFFFFF. FOLLOW: follower_id is 1..255 bytes of
    UTF-8; flag RESUME (bit 0) says the follower holds the shard's state of ``epoch`` at
    ``have_seq`` (else have_seq is 0). SNAPSHOT: a slice (1..MAX_SNAPSHOT_CHUNK_BYTES) of the
    compacted log of the shard at ``seq``, chunks numbered from 0, flag LAST (bit 0) on the
    final one. RECORDS: the log records of batches first_seq..first_seq+count-1 (first_seq
    >= 1), exactly as the leader appended them; body at most MAX_RECORDS_BYTES, or one record
    of at most MAX_RECORD_BYTES when count is 1; count >= 1 and at most one batch per
    MIN_RECORD_BYTES of body. ACK: flag CHUNK (bit 0): chunk ``chunk_no`` of the snapshot at
    ``seq`` is written (flow control); without it, every record up to ``seq`` is appended and
    applied (chunk_no 0). REFUSE: the follower follows the newer ``epoch``; reason is 0..1024
    bytes of UTF-8.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

VERSION = 1

MAX_KEY_BYTES = 65_535  # the wire limit; services enforce smaller, configurable limits
MAX_VALUE_BYTES = 64 * 1024 * 1024
MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000  # ten years: longer is almost surely a unit mistake
NO_SHARD = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
# Fencing tokens are ``epoch << 32 | sequence`` in a u64 (broker/tokens.py). A peer may report
# (READY's last_token) only tokens whose epoch is below MAX_REPORTED_EPOCH: the broker issues
# tokens above what was reported, and the 2**16 epochs (2**48 tokens) above the limit are the
# headroom that keeps every number it issues inside the u64 of the wire format.
MAX_REPORTED_EPOCH = 2**32 - 2**16
MAX_REPORTED_TOKEN = MAX_REPORTED_EPOCH << 32  # exclusive: the smallest token refused


class Kind(enum.IntEnum):
    """The second byte of every header: what the message is."""

    GET = 0x01
    SET = 0x02
    DEL = 0x03
    ALL = 0x04
    PING = 0x05
    BATCH = 0x06
    STATS = 0x07
    INCR = 0x08
    EXPIRE = 0x09
    LOCK = 0x0A
    REFRESH = 0x0B
    UNLOCK = 0x0C
    FENCE_CHECK = 0x0D
    REPLY = 0x10
    DISPATCH = 0x11
    BATCH_REPLY = 0x12
    BATCH_DISPATCH = 0x13
    READY = 0x20
    ASSIGN = 0x21
    HEARTBEAT = 0x22
    DISCONNECT = 0x23
    REPORT = 0x24
    FOLLOW = 0x30
    SNAPSHOT = 0x31
    RECORDS = 0x32
    ACK = 0x33
    REFUSE = 0x34
    EVENT = 0x40


# The keyed commands (routed by key, like GET, SET and DEL) are also what a BATCH may carry.
KEYED_COMMANDS = frozenset(
    {
        Kind.GET,
        Kind.SET,
        Kind.DEL,
        Kind.INCR,
        Kind.EXPIRE,
        Kind.LOCK,
        Kind.REFRESH,
        Kind.UNLOCK,
        Kind.FENCE_CHECK,
    }
)
COMMANDS = KEYED_COMMANDS | {Kind.ALL, Kind.PING, Kind.STATS}
# The commands of issue 12: never on a fast path (peek_keyed_request and the batch splitters'
# common cases take only plain GET, SET and DEL), each parsed by _parse_request.
NEW_COMMANDS = frozenset(
    {Kind.INCR, Kind.EXPIRE, Kind.LOCK, Kind.REFRESH, Kind.UNLOCK, Kind.FENCE_CHECK}
)


class Status(enum.IntEnum):
    """How a request ended. ERROR means the request itself is wrong and retrying cannot help;
    UNAVAILABLE means the cluster could not serve it now (no worker owns the shard, a worker did
    not answer in time) and its outcome may be unknown."""

    OK = 0
    NOT_FOUND = 1
    ERROR = 2
    UNAVAILABLE = 3
    # The cluster refused the request to protect itself (a bound on what it holds was reached)
    # and did NOT apply it: send it again, with the same request id, after a backoff.
    BUSY = 4
    # The shard's disk is full: the write was NOT applied; reads still work, and writes resume
    # by themselves once space returns.
    NO_SPACE = 5
    # Refused, nothing changed: a fence token older than the newest one issued for its lock, a
    # lock held by someone else (the reply's deadline_ms is the holder's expiry), a lock token
    # that is no longer current, or an INCR of a value that is not an integer or would
    # overflow. Body: a UTF-8 reason.
    CONFLICT = 6
    # Refused, nothing changed: a condition of the write (NX, XX, IF_VERSION) did not hold.
    # Body: a UTF-8 reason.
    PRECONDITION = 7


class Flag(enum.IntFlag):
    """Request flags (third header byte)."""

    NONE = 0
    TTL = 0x01  # SET, INCR, EXPIRE, LOCK, REFRESH, GET (touch): arg is a time to live in ms
    KEYS_ONLY = 0x02  # ALL: leave the values out of the entries; GET: metadata only
    STAMPED = 0x04  # every write: arg's top STAMP_BITS bits are the first-send time (see below)
    NX = 0x08  # SET: only if the key is absent (or expired)
    XX = 0x10  # SET: only if the key is present (and live)
    EXT = 0x20  # SET, DEL, INCR, EXPIRE: the value frame starts with an extension block
    VERSIONED = 0x40  # GET, SET, DEL, INCR, EXPIRE: the OK reply's body starts with version:u64
    RETURN_OLD = 0x80  # SET: the OK reply's body holds the previous item (encode_old_item)


# Extension block bits (the first byte of the block, see encode_ext).
EXT_IF_VERSION = 0x01  # if_version:u64 follows: write only if the key has this version
EXT_FENCE = 0x02  # fence_token:u64 name_len:u16 name: write only if the token is the newest
# The longest a LOCK may wait in the broker's queue for the lock (its value, wait_ms:u32).
MAX_LOCK_WAIT_MS = 300_000
# Keys starting with this byte are the workers' own (locks, fence tokens): refused from clients.
RESERVED_KEY_BYTE = 0
RESERVED_KEY = "key starts with NUL (reserved)"  # the ERROR message for such a key


class ProtocolError(ValueError):
    """A message that does not follow this specification.

    Attributes:
        request_id: the request id if the header was readable far enough to find it, else 0,
            so that the error reply can still be matched by the sender.
    """

    def __init__(self, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.request_id = request_id


_REQUEST = struct.Struct("!BBBxQQ")
_DISPATCH = struct.Struct("!BBQ")
_REPLY = struct.Struct("!BBBxQQQ")
_READY = struct.Struct("!BBHIQQ")
_READY_V1_BYTES = 16  # a READY without its cluster id, as earlier versions send it
READY_DURABLE = 0x0001  # READY flags: the worker keeps its shards in a data directory
_ASSIGN = struct.Struct("!BBxxIIQ")
_BARE = struct.Struct("!BB")
_ENTRY = struct.Struct("!HIQ")

_BATCH = struct.Struct("!BBxxIQ")
_SUB_REQUEST = struct.Struct("!BBHIQQ")
_SUB_REPLY = struct.Struct("!BBxxIQQQ")
_SUB_REPLY_BODY_LEN = struct.Struct("!4xI")  # the body_len of a _SUB_REPLY, alone

REQUEST_HEADER_BYTES = _REQUEST.size
DISPATCH_HEADER_BYTES = _DISPATCH.size
REPLY_HEADER_BYTES = _REPLY.size  # 28
BATCH_HEADER_BYTES = _BATCH.size  # 16
SUB_REQUEST_BYTES = _SUB_REQUEST.size  # 24, then the key and the value
SUB_REPLY_BYTES = _SUB_REPLY.size  # 32, then the body

# A batch carries 1..MAX_BATCH_OPS sub-requests in at most MAX_BATCH_BYTES (its second frame):
# one largest SET fits, and the broker's frontend refuses larger frames outright.
MAX_BATCH_OPS = 10_000
MAX_BATCH_BYTES = MAX_VALUE_BYTES + MAX_KEY_BYTES + 1024
# What a worker puts in one reply. A BATCH_REPLY carries at most MAX_REPLY_BYTES of GET values
# (one largest value always fits): each GET past that is answered BUSY with REPLY_TOO_LARGE in its
# body, never read. An ALL reply holds at most MAX_LIST_KEYS entries and MAX_REPLY_BYTES of
# encoded entries per shard, else the whole ALL is answered ERROR with REPLY_TOO_LARGE.
MAX_REPLY_BYTES = MAX_BATCH_BYTES
MAX_LIST_KEYS = 10_000
REPLY_TOO_LARGE = "reply too large"
# Records cut out of a batch (split_batch, split_reply_records) shorter than this are bytes
# copies, longer ones memoryviews of the frame. A view of a record costs more to make, join and
# free than copying a few hundred bytes (0.3 us per pipelined SET in the broker), and it keeps
# its whole frame alive; the views are for large values, never copied before the join.
COPIED_RECORD_BYTES = 2048
HAS_BODY = 0x01  # sub-reply flag: a body follows (GET's value may be empty yet present)

# The first-send stamp of a write (flag STAMPED). A worker remembers writes for a window of
# time (workers/idempotency.py); a retry later than that cannot be told from a new request by
# the worker alone, only the client knows when it first sent it. So the client puts that time
# in the request, and the worker refuses a stamped write older than its window that it does not
# remember, with UNAVAILABLE and a body starting OUTCOME_UNKNOWN, instead of applying it again.
#
# Where: the top STAMP_BITS bits of ``arg``, which a TTL never uses (MAX_TTL_MS < 2**39, so
# bits 0..39 are the TTL's and bit 39 is always 0): no new bytes on the wire, the same header
# and record layouts, and a request without the flag reads exactly as before.
# What: Unix seconds mod STAMP_MODULUS (2**24 s, 194 days). Whole seconds are enough (the
# worker keeps writes for its window plus the clock skew plus STAMP_ROUNDING_S), and a stamp
# is read relative to the worker's clock (:func:`stamp_age_ms`), as the nearest time with those
# low bits: unambiguous while |age| < 97 days, far above any window (at most a day).
STAMP_BITS = 24
STAMP_SHIFT = 40
STAMP_MODULUS = 1 << STAMP_BITS  # seconds
STAMP_MASK = STAMP_MODULUS - 1
ARG_MASK = (1 << STAMP_SHIFT) - 1  # the bits of arg below the stamp
OUTCOME_UNKNOWN = "outcome unknown"  # the body's start of a refused late retry


@dataclass(frozen=True, slots=True)
class Request:
    """A client's request.

    Attributes:
        kind: one of COMMANDS.
        request_id: chosen by the client, echoed in the reply; lets one socket keep many
            requests in flight.
        key: the key (keyed commands; the lock's name for LOCK, REFRESH, UNLOCK and
            FENCE_CHECK) or the listing cursor (ALL).
        value: the value to store (SET only).
        ttl_ms: SET and INCR: the key's time to live, None for none (INCR: keep the existing
            deadline); EXPIRE: the new time to live, None to remove the deadline (persist);
            GET: move the deadline to now + ttl_ms as the key is read (touch), None to only
            read; LOCK and REFRESH: the lock's time to live (required).
        limit: ALL only; most entries per shard, 0 for all of them.
        keys_only: ALL: leave values out; GET: answer the metadata only (no value).
        stamp: writes only (every command but GET without ttl_ms, ALL, PING, STATS and
            FENCE_CHECK): the first-send time in Unix seconds (flag STAMPED; only its low
            STAMP_BITS bits travel, so a decoded stamp is mod STAMP_MODULUS), None for an
            unstamped request.
        nx: SET only: write only if the key is absent (flag NX).
        xx: SET only: write only if the key is present (flag XX; not with nx).
        if_version: SET, DEL, INCR, EXPIRE: write only if the key exists with this version
            (extension block).
        fence: SET, DEL, INCR, EXPIRE: ``(lock name, token)``: write only if the token is the
            newest issued for that lock (extension block).
        versioned: GET, SET, DEL, INCR, EXPIRE: the OK reply's body starts with the key's
            version (flag VERSIONED).
        return_old: SET only: the OK reply's body holds the previous item (flag RETURN_OLD).
        by: INCR only: the signed 64-bit increment.
        token: REFRESH, UNLOCK, FENCE_CHECK: the lock token (at least 1).
        wait_ms: LOCK only: how long the broker may queue the request while the lock is held
            (0..MAX_LOCK_WAIT_MS).
    """

    kind: Kind
    request_id: int
    key: bytes = b""
    value: bytes | None = None
    ttl_ms: int | None = None
    limit: int = 0
    keys_only: bool = False
    stamp: int | None = None
    nx: bool = False
    xx: bool = False
    if_version: int | None = None
    fence: tuple[bytes, int] | None = None
    versioned: bool = False
    return_old: bool = False
    by: int = 0
    token: int = 0
    wait_ms: int = 0


def _fast_init(cls: type) -> None:
    """Give a frozen slots dataclass an ``__init__`` that sets each slot through its own
    descriptor, the same fields, defaults and order as the generated one.

    Why: a frozen dataclass's generated ``__init__`` sets each field with
    ``object.__setattr__``, about 90 ns a field on this machine; a Request is built for every
    request a client sends alone (twice: encode_request checks its frames by decoding them) and
    every one the broker or a worker decodes off the fast paths, and issue 12 took its fields
    from 8 to 17 (1.0 to 1.8 us). Through the slot descriptors 17 fields cost what 8 did.
    """
    names = [field.name for field in dataclasses.fields(cls)]
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(cls)
        if field.default is not dataclasses.MISSING
    }
    params = ", ".join(f"{name}=_default_{name}" if name in defaults else name for name in names)
    body = "".join(f"    _set_{name}(self, {name})\n" for name in names)
    namespace: dict[str, object] = {f"_set_{name}": getattr(cls, name).__set__ for name in names}
    namespace.update({f"_default_{name}": value for name, value in defaults.items()})
    exec(f"def __init__(self, {params}):\n{body}", namespace)  # our own source, made above
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    init.__doc__ = cls.__init__.__doc__  # type: ignore[misc]
    setattr(cls, "__init__", init)  # noqa: B010


_fast_init(Request)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A request on its way from the broker to the worker owning the key's shard."""

    token: int
    request: Request


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one request. ``deadline_ms`` None means no expiry or not applicable."""

    status: Status
    request_id: int
    token: int = 0
    deadline_ms: int | None = None
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """A worker announcing itself; ``shard`` is the shard whose data it holds, if any.

    ``durable`` and ``cluster`` say where its data lives: in a data directory whose manifest
    names cluster ``cluster`` (durable), or in its memory only (not durable, cluster 0). The
    broker gives a durable cluster's shards only to workers that see that cluster's data.
    """

    shard: int | None = None
    last_token: int = 0
    durable: bool = False
    cluster: int = 0


@dataclass(frozen=True, slots=True)
class Assign:
    """The broker giving a worker a shard (``shard`` None: wait as a standby).

    ``epoch`` is the ownership epoch, a fencing number greater than that of every earlier
    assignment of any shard: the worker records it beside the shard's files and a former owner
    that finds a newer epoch there knows the shard moved and stops writing.
    """

    shard: int | None
    shards: int
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness, both ways."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Worker -> broker: leaving on purpose; the broker frees its shard at once.
    Broker -> worker: "I do not know you" (the broker restarted): register again now."""


@dataclass(frozen=True, slots=True)
class Report:
    """Worker -> broker, once a heartbeat interval: the worker's figures (see
    :func:`check_report` for the fields), which the broker keeps and answers STATS with."""

    figures: dict[str, object]


@dataclass(frozen=True, slots=True)
class Entry:
    """One key of an ALL listing."""

    key: bytes
    value: bytes
    deadline_ms: int | None


@dataclass(frozen=True, slots=True)
class Batch:
    """Many requests in one message (client -> broker); each is answered on its own."""

    batch_id: int
    requests: tuple[Request, ...]


SubRequest = tuple[int, int, bytes, "bytes | memoryview"]
"""The broker's view of a BATCH sub-request: ``(kind, request_id, key, record)``, where
``record`` is the sub-request's bytes on the wire (header, key, value), a slice of the received
frame (bytes if shorter than :data:`COPIED_RECORD_BYTES`, else a memoryview, see there), ready
to be joined into a BATCH_DISPATCH without being decoded. ``kind`` 0 marks a malformed
sub-request; then ``key`` is the error message (UTF-8) and ``record`` is empty."""

Op = tuple[int, int, bytes, bytes | Request | None, int | None, int | None]
"""A worker's view of a BATCH_DISPATCH sub-request: ``(kind, request_id, key, value, ttl_ms,
stamp)``; ``value`` is None except for SET, ``stamp`` (mod STAMP_MODULUS) None unless flag
STAMPED. ``kind`` 0 marks a malformed one; then ``key`` is the error message (UTF-8). Plain
tuples, not :class:`Request`: a worker builds one per operation.

Only a plain GET, SET or DEL (no flag but TTL and STAMPED) comes with its own kind. Every other
sub-request (an issue-12 command, or a GET, SET or DEL with an issue-12 flag or extension)
comes as ``(EXTENDED_OP, request_id, key, request, ttl_ms, stamp)``, ``request`` the whole
decoded :class:`Request` (its ``kind`` the command): so a worker's inline GET and SET paths
never see a conditional SET or a versioned GET, and the rare requests cost their object."""

EXTENDED_OP = 0xFF
"""The kind of an :data:`Op` that carries a whole :class:`Request` in its value slot (no
command has this code: kinds are below 0x80)."""


KeyedDispatch = tuple[int, int, int, bytes, bytes | None, int | None, int | None]
"""A worker's view of a DISPATCH of a GET, SET or DEL: ``(token, kind, request_id, key, value,
ttl_ms, stamp)``, an :data:`Op` behind its token (see :func:`peek_keyed_dispatch`). A plain
tuple, not a :class:`Dispatch` of a :class:`Request`: one request at a time, decoding into
those two objects took 5 us of the 11 (GET) to 20 (SET) a worker spent per request; peeking
takes 1."""


@dataclass(frozen=True, slots=True)
class DispatchBatch:
    """Sub-requests on their way to a worker in one message, fenced by one token and applied
    in order."""

    token: int
    ops: list[Op]


@dataclass(frozen=True, slots=True)
class BatchReply:
    """Many replies in one message (worker -> broker -> client)."""

    token: int
    replies: tuple[Reply, ...]


FromBroker = Dispatch | DispatchBatch | Assign | Heartbeat | Disconnect
FromWorker = Reply | BatchReply | Ready | Heartbeat | Disconnect | Report


# --- requests ---------------------------------------------------------------------------------


def encode_request(request: Request) -> list[bytes]:
    """Frames of a client request. Raises ProtocolError for a request this spec forbids."""
    flags, arg, value = _wire(request)
    header = _REQUEST.pack(VERSION, request.kind, flags, request.request_id, arg) + request.key
    frames = [header] if value is None else [header, value]
    # Validate with the same code the receiver runs: what we send is what they accept.
    decode_request(frames)
    return frames


def _wire(request: Request) -> tuple[int, int, bytes | None]:
    """``(flags, arg, value frame or None)`` of a request: the one place a :class:`Request`'s
    fields become bits and bytes (:func:`encode_request` and :func:`pack_request`).

    The fields of issue 12 become their flags whatever the kind, so that the receiver's
    decoder, which the caller runs on the result, refuses one the kind does not take ("flag
    NX does not apply to GET") rather than the option being lost; ``by``, ``token`` and
    ``wait_ms`` on a kind without them are refused here. As before issue 12, a stamp on a read
    (a GET without ttl_ms, FENCE_CHECK) and a TTL on a kind without flag TTL are dropped.
    """
    kind = request.kind
    request_id = request.request_id
    if kind == _ALL:
        return (_KEYS_ONLY if request.keys_only else 0), request.limit, None
    flags = 0
    arg = 0
    value = None
    ttl_ms = request.ttl_ms
    if ttl_ms is not None and kind in _TTL_KINDS:
        flags = _TTL
        arg = ttl_ms
    if request.nx:
        flags |= _NX
    if request.xx:
        flags |= _XX
    if request.versioned:
        flags |= _VERSIONED
    if request.return_old:
        flags |= _RETURN_OLD
    if request.keys_only:
        flags |= _KEYS_ONLY
    if kind == _SET:
        value = request.value
        if value is None:
            raise ProtocolError("SET needs a value", request_id)
    elif kind == _INCR:
        by = request.by
        if isinstance(by, bool) or not isinstance(by, int) or not _I64_MIN <= by <= _I64_MAX:
            raise ProtocolError(f"INCR by {by!r} is not a signed 64-bit integer", request_id)
        value = _I64.pack(by)
    elif kind == _LOCK:
        value = _check_u32(request.wait_ms, "LOCK wait_ms", request_id)
    elif kind == _REFRESH or kind == _UNLOCK or kind == _FENCE_CHECK:
        value = _check_u64_bytes(request.token, f"{kind.name} token", request_id)
    if request.by and kind != _INCR:
        raise ProtocolError(f"by applies to INCR only, not {kind.name}", request_id)
    if request.wait_ms and kind != _LOCK:
        raise ProtocolError(f"wait_ms applies to LOCK only, not {kind.name}", request_id)
    if request.token and not (kind == _REFRESH or kind == _UNLOCK or kind == _FENCE_CHECK):
        raise ProtocolError(f"token does not apply to {kind.name}", request_id)
    if request.if_version is not None or request.fence is not None:
        flags |= _EXT
        try:
            ext = encode_ext(request.if_version, request.fence)
        except ProtocolError as exc:
            raise ProtocolError(str(exc), request_id) from None
        value = ext if value is None else ext + value
    stamp = request.stamp
    if stamp is not None and (kind in _STAMP_KINDS or (kind == _GET and flags & _TTL)):
        flags |= _STAMPED
        arg |= (stamp & STAMP_MASK) << STAMP_SHIFT
    return flags, arg, value


def decode_request(frames: Sequence[bytes]) -> Request:
    """Parse a client request (without the ROUTER identity frame).

    Raises:
        ProtocolError: naming what is wrong, carrying the request id when it was readable.
    """
    keyed = peek_keyed_request(frames)
    if keyed is not None:  # GET, SET, DEL: the common case, checked without the branches below
        kind_byte, request_id, key, ttl_ms, stamp = keyed
        if kind_byte == _SET:
            return Request(Kind.SET, request_id, bytes(key), bytes(frames[1]), ttl_ms, stamp=stamp)
        return Request(_COMMAND_OF[kind_byte], request_id, bytes(key), stamp=stamp)
    _check_version(frames)
    header = frames[0]
    if len(header) < _REQUEST.size:
        raise ProtocolError(
            f"request header of {len(header)} bytes is shorter than {_REQUEST.size}"
        )
    _, kind_byte, flags, request_id, arg = _REQUEST.unpack_from(header)
    kind = _COMMAND_OF.get(kind_byte)
    if kind is None:
        raise ProtocolError(f"unknown command 0x{kind_byte:02x}", request_id)
    expected_frames = 2 if _takes_value(kind_byte, flags) else 1
    if len(frames) != expected_frames:
        # The flags first: a flag the kind does not take explains a wrong frame count better.
        _check_flags(kind, flags, request_id)
        raise ProtocolError(
            f"{kind.name} takes {expected_frames} frame(s), got {len(frames)}", request_id
        )
    key = header[_REQUEST.size :]
    value = frames[1] if expected_frames == 2 else None
    return _parse_request(kind, flags, arg, key, value, request_id)


def _takes_value(kind: int, flags: int) -> bool:
    """Whether a request has a value frame (a batch record: a value, possibly empty)."""
    return kind in _VALUE_KINDS or (flags & _EXT != 0 and (kind == _DEL or kind == _EXPIRE))


def _check_flags(kind: Kind, flags: int, request_id: int) -> None:
    """Refuse a flag the kind does not take, naming the lowest such flag."""
    bad = flags & ~_ALLOWED_FLAGS[kind]
    if bad:
        lowest = bad & -bad
        raise ProtocolError(f"flag {_FLAG_NAMES[lowest]} does not apply to {kind.name}", request_id)


def _parse_request(
    kind: Kind,
    flags: int,
    arg: int,
    key: bytes | memoryview,
    value: bytes | memoryview | None,
    request_id: int,
) -> Request:
    """The rules of every command (docs/protocol.md section 3), on its fields as they came
    (``value`` None: no value frame; in a batch record, an empty value of a kind that takes
    none). The general path of :func:`decode_request` and of the batch splitters: the plain
    GET, SET and DEL take the fast paths (peek_keyed_request, _split_requests' common case)
    and come here only to be explained when malformed.

    Raises:
        ProtocolError: naming what is wrong, with ``request_id``.
    """
    _check_flags(kind, flags, request_id)
    name = kind.name
    stamp = None
    if flags & _STAMPED:
        if kind == _GET and not flags & _TTL:
            raise ProtocolError("flag STAMPED does not apply to GET without flag TTL", request_id)
        stamp = arg >> STAMP_SHIFT
        arg &= ARG_MASK
    if flags & _NX and flags & _XX:
        raise ProtocolError("flags NX and XX cannot be combined", request_id)
    if len(key) > MAX_KEY_BYTES:
        raise ProtocolError(f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}", request_id)
    if kind in KEYED_COMMANDS:
        if not key:
            raise ProtocolError(f"{name} needs a non-empty key", request_id)
        if key[0] == RESERVED_KEY_BYTE:
            raise ProtocolError(RESERVED_KEY, request_id)
    elif key and kind != _ALL:
        raise ProtocolError(f"{name} takes no key", request_id)
    if value is not None and len(value) > MAX_VALUE_BYTES:
        raise ProtocolError(f"value of {len(value)} bytes exceeds {MAX_VALUE_BYTES}", request_id)
    if not _takes_value(kind, flags) and value:
        raise ProtocolError(f"{name} takes no value", request_id)
    ttl_ms = None
    limit = 0
    if flags & _TTL:
        if not 1 <= arg <= MAX_TTL_MS:
            raise ProtocolError(f"ttl_ms must be between 1 and {MAX_TTL_MS}, got {arg}", request_id)
        ttl_ms = arg
    elif kind == _LOCK or kind == _REFRESH:
        raise ProtocolError(f"{name} needs flag TTL (the lock's time to live)", request_id)
    elif kind == _ALL:
        limit = arg
    elif arg:
        if kind == _SET or kind == _INCR:
            raise ProtocolError(f"{name} without flag TTL must have arg 0", request_id)
        raise ProtocolError(f"{name} must have arg 0", request_id)
    if_version = fence = None
    rest = b"" if value is None else value
    if flags & _EXT:
        try:
            if_version, fence, rest = split_ext(rest)
        except ProtocolError as exc:
            raise ProtocolError(str(exc), request_id) from None
    by = token = wait_ms = 0
    if kind == _SET:
        stored = bytes(rest)
    else:
        stored = None
        if kind == _INCR:
            if len(rest) != _I64.size:
                raise ProtocolError(
                    f"INCR value must be by:i64 (8 bytes), got {len(rest)} bytes", request_id
                )
            by = _I64.unpack(rest)[0]
        elif kind == _LOCK:
            if len(rest) != _U32.size:
                raise ProtocolError(
                    f"LOCK value must be wait_ms:u32 (4 bytes), got {len(rest)} bytes", request_id
                )
            wait_ms = _U32.unpack(rest)[0]
            if wait_ms > MAX_LOCK_WAIT_MS:
                raise ProtocolError(
                    f"wait_ms must be between 0 and {MAX_LOCK_WAIT_MS}, got {wait_ms}", request_id
                )
        elif kind == _REFRESH or kind == _UNLOCK or kind == _FENCE_CHECK:
            if len(rest) != _U64.size:
                raise ProtocolError(
                    f"{name} value must be token:u64 (8 bytes), got {len(rest)} bytes", request_id
                )
            token = _U64.unpack(rest)[0]
            if not token:
                raise ProtocolError(f"{name} token must be at least 1, got 0", request_id)
        elif rest:  # DEL, EXPIRE with EXT
            raise ProtocolError(
                f"{name} takes no value after the extension block, got {len(rest)} bytes",
                request_id,
            )
    return Request(
        kind,
        request_id,
        bytes(key),
        stored,
        ttl_ms,
        limit,
        bool(flags & _KEYS_ONLY),
        stamp,
        bool(flags & _NX),
        bool(flags & _XX),
        if_version,
        fence,
        bool(flags & _VERSIONED),
        bool(flags & _RETURN_OLD),
        by,
        token,
        wait_ms,
    )


def encode_ext(if_version: int | None, fence: tuple[bytes, int] | None) -> bytes:
    """The extension block that starts the value frame of a request with flag EXT.

    Layout: ``ext_flags:u8``, then ``if_version:u64`` if bit EXT_IF_VERSION, then
    ``fence_token:u64 name_len:u16 name`` if bit EXT_FENCE (name 1..MAX_KEY_BYTES bytes, not
    starting with NUL; token at least 1). Raises ProtocolError for what split_ext refuses.
    """
    ext_flags = 0
    parts = [b""]
    if if_version is not None:
        ext_flags |= EXT_IF_VERSION
        parts.append(_check_u64_bytes(if_version, "if_version"))
    if fence is not None:
        name, token = fence
        ext_flags |= EXT_FENCE
        _check_lock_name(name)
        if not 1 <= token <= U64_MAX:
            raise ProtocolError(f"fence token {token} out of range (1..2**64-1)")
        parts.append(_FENCE.pack(token, len(name)))
        parts.append(bytes(name))
    parts[0] = bytes((ext_flags,))
    return b"".join(parts)


def split_ext(
    value: bytes | memoryview,
) -> tuple[int | None, tuple[bytes, int] | None, memoryview]:
    """Parse the extension block at the front of a value frame (see :func:`encode_ext`).

    Returns:
        ``(if_version or None, (lock name, token) or None, the rest of the value)``.

    Raises:
        ProtocolError: an empty or truncated block, unknown bits, a bad fence.
    """
    view = memoryview(value)
    if not len(view):
        raise ProtocolError("flag EXT without an extension block")
    ext_flags = view[0]
    if ext_flags & ~(EXT_IF_VERSION | EXT_FENCE):
        raise ProtocolError(f"unknown extension bits 0x{ext_flags:02x}")
    offset = 1
    if_version = fence = None
    if ext_flags & EXT_IF_VERSION:
        if len(view) < offset + 8:
            raise ProtocolError("extension block truncated in if_version")
        if_version = _U64.unpack_from(view, offset)[0]
        offset += 8
    if ext_flags & EXT_FENCE:
        if len(view) < offset + _FENCE.size:
            raise ProtocolError("extension block truncated in the fence")
        token, name_len = _FENCE.unpack_from(view, offset)
        offset += _FENCE.size
        if len(view) < offset + name_len:
            raise ProtocolError("extension block truncated in the fence's lock name")
        name = bytes(view[offset : offset + name_len])
        offset += name_len
        _check_lock_name(name)
        if not token:
            raise ProtocolError("fence token must be at least 1, got 0")
        fence = (name, token)
    return if_version, fence, view[offset:]


def _check_lock_name(name: bytes) -> None:
    if not 1 <= len(name) <= MAX_KEY_BYTES:
        raise ProtocolError(f"fence lock name of {len(name)} bytes, 1..{MAX_KEY_BYTES} allowed")
    if name[0] == RESERVED_KEY_BYTE:
        raise ProtocolError(f"fence lock name: {RESERVED_KEY}")


def _check_u64_bytes(number: int, what: str, request_id: int = 0) -> bytes:
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= U64_MAX:
        raise ProtocolError(f"{what} {number!r} is not a u64", request_id)
    return _U64.pack(number)


def _check_u32(number: int, what: str, request_id: int = 0) -> bytes:
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 0xFFFF_FFFF:
        raise ProtocolError(f"{what} {number!r} is not a u32", request_id)
    return _U32.pack(number)


def peek_keyed_request(
    frames: Sequence[bytes], offset: int = 0
) -> tuple[int, int, bytes, int | None, int | None] | None:
    """``(kind, request_id, key, ttl_ms, stamp)`` of a valid plain GET, SET or DEL, else None
    (``stamp`` mod STAMP_MODULUS, None without flag STAMPED). Plain: no flag but TTL (SET) and
    STAMPED (SET, DEL), and a key that does not start with NUL (RESERVED_KEY_BYTE); anything
    else (the issue-12 commands and flags) is None, for :func:`decode_request`.

    The hot path of the broker (which reads nothing else of a keyed request), of
    :func:`decode_request` and of :func:`peek_keyed_dispatch`: the same checks, without the
    generic path's work. None means "not a well-formed keyed request", for
    :func:`decode_request` to answer or raise as usual.

    Args:
        frames: the request's frames.
        offset: where the request header starts in the first frame (past a DISPATCH's own
            header, for a worker: the key is read in place, with one copy).
    """
    start = offset + _REQUEST.size
    if len(frames) == 1:
        header = frames[0]
        if len(header) <= start or len(header) - start > MAX_KEY_BYTES or not header[start]:
            return None
        version, kind, flags, request_id, arg = _REQUEST.unpack_from(header, offset)
        if version != VERSION:
            return None
        if not (flags or arg):
            if kind == _GET or kind == _DEL:
                return kind, request_id, header[start:], None, None
            return None
        if kind == _DEL and flags == _STAMPED and not arg & ARG_MASK:
            return kind, request_id, header[start:], None, arg >> STAMP_SHIFT
        return None
    if len(frames) == 2:
        header = frames[0]
        if len(header) <= start or len(header) - start > MAX_KEY_BYTES or not header[start]:
            return None
        version, kind, flags, request_id, arg = _REQUEST.unpack_from(header, offset)
        if version != VERSION or kind != _SET or len(frames[1]) > MAX_VALUE_BYTES:
            return None
        stamp = None
        if flags & _STAMPED:
            stamp = arg >> STAMP_SHIFT
            arg &= ARG_MASK
            flags ^= _STAMPED
        if flags == _TTL:
            if not 1 <= arg <= MAX_TTL_MS:
                return None
            return kind, request_id, header[start:], arg, stamp
        if flags or arg:
            return None
        return kind, request_id, header[start:], None, stamp
    return None


_COMMAND_OF = {int(kind): kind for kind in COMMANDS}
_DISPATCH_KIND = int(Kind.DISPATCH)
_REPLY_KIND = int(Kind.REPLY)
_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)
_ALL = int(Kind.ALL)
_INCR = int(Kind.INCR)
_EXPIRE = int(Kind.EXPIRE)
_LOCK = int(Kind.LOCK)
_REFRESH = int(Kind.REFRESH)
_UNLOCK = int(Kind.UNLOCK)
_FENCE_CHECK = int(Kind.FENCE_CHECK)
_KIND_OF = {int(kind): kind for kind in Kind}
_STATUS_OF = {int(status): status for status in Status}
_TTL = int(Flag.TTL)
_KEYS_ONLY = int(Flag.KEYS_ONLY)
_STAMPED = int(Flag.STAMPED)
_NX = int(Flag.NX)
_XX = int(Flag.XX)
_EXT = int(Flag.EXT)
_VERSIONED = int(Flag.VERSIONED)
_RETURN_OLD = int(Flag.RETURN_OLD)
_KNOWN_FLAGS = _TTL | _KEYS_ONLY | _STAMPED | _NX | _XX | _EXT | _VERSIONED | _RETURN_OLD
_FLAG_NAMES = {int(flag): flag.name for flag in Flag if flag}
# The flags each command takes (docs/protocol.md section 3); any other is an ERROR naming it.
_ALLOWED_FLAGS = {
    Kind.GET: _TTL | _KEYS_ONLY | _STAMPED | _VERSIONED,  # STAMPED only with TTL (a touch)
    Kind.SET: _TTL | _STAMPED | _NX | _XX | _EXT | _VERSIONED | _RETURN_OLD,
    Kind.DEL: _STAMPED | _EXT | _VERSIONED,
    Kind.ALL: _KEYS_ONLY,
    Kind.PING: 0,
    Kind.STATS: 0,
    Kind.INCR: _TTL | _STAMPED | _EXT | _VERSIONED,
    Kind.EXPIRE: _TTL | _STAMPED | _EXT | _VERSIONED,
    Kind.LOCK: _TTL | _STAMPED,
    Kind.REFRESH: _TTL | _STAMPED,
    Kind.UNLOCK: _STAMPED,
    Kind.FENCE_CHECK: 0,
}
assert set(_ALLOWED_FLAGS) == COMMANDS
_NEW_KINDS = frozenset(int(kind) for kind in NEW_COMMANDS)
_TTL_KINDS = frozenset({_GET, _SET, _INCR, _EXPIRE, _LOCK, _REFRESH})  # flag TTL: arg is a TTL
_EXT_KINDS = frozenset({_SET, _DEL, _INCR, _EXPIRE})  # may carry an extension block
_VALUE_KINDS = frozenset({_SET, _INCR, _LOCK, _REFRESH, _UNLOCK, _FENCE_CHECK})  # a value frame
# The commands a stamp applies to (the writes; and GET with flag TTL, a touch).
_STAMP_KINDS = frozenset({_SET, _DEL, _INCR, _EXPIRE, _LOCK, _REFRESH, _UNLOCK})
_WRITES = frozenset(Kind(kind) for kind in _STAMP_KINDS)
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_FENCE = struct.Struct("!QH")  # an extension block's fence_token, name_len


def stamp_of(unix_s: float) -> int:
    """The stamp of a wall-clock time (Unix seconds): its whole seconds, floored, so a stamp
    is never later than the send it stamps, mod STAMP_MODULUS."""
    return int(unix_s // 1) & STAMP_MASK


def stamp_age_ms(stamp: int, now_ms: int) -> int:
    """How long before ``now_ms`` (Unix ms) the stamp's second began, negative if after:
    the stamp read as the Unix second nearest ``now_ms`` with those low STAMP_BITS bits."""
    now_s = now_ms // 1000
    half = STAMP_MODULUS // 2
    delta_s = ((stamp - now_s + half) & STAMP_MASK) - half
    return now_ms - (now_s + delta_s) * 1000


def stamp_range(now_ms: int, before_ms: int, after_ms: int) -> tuple[int, int]:
    """``(low, span)`` such that ``(stamp - low) & STAMP_MASK <= span`` exactly when
    ``-after_ms <= stamp_age_ms(stamp, now_ms) <= before_ms``: the test a worker makes per
    stamped write, one subtraction, one mask and one comparison, with the bounds made once
    per batch. (``span`` < 0, nothing in range, when the bounds hold no whole second.)"""
    low_s = -((before_ms - now_ms) // 1000)  # ceil((now_ms - before_ms) / 1000)
    high_s = (now_ms + after_ms) // 1000
    return low_s & STAMP_MASK, high_s - low_s


# --- dispatch ---------------------------------------------------------------------------------


def dispatch_frames(token: int, request_frames: Sequence[bytes]) -> list[bytes]:
    """Wrap an already validated request's frames for a worker.

    The broker calls this on the hot path: it prepends ten bytes to the header and passes the
    value frame through untouched, so a value is never decoded or copied by the broker.
    """
    return [_DISPATCH.pack(VERSION, Kind.DISPATCH, token) + request_frames[0], *request_frames[1:]]


def dispatch_token(frames: Sequence[bytes]) -> int:
    """The token of a DISPATCH or BATCH_DISPATCH read from its header alone, 0 if unreadable.

    A worker that refuses a whole dispatch (malformed, over a limit) answers with this token,
    so the broker can tell its requests at once that nothing was applied, rather than wait
    for them to time out as "outcome unknown".
    """
    if not frames:
        return 0
    header = frames[0]
    if len(header) >= _DISPATCH.size and header[1] == Kind.DISPATCH:
        return int.from_bytes(header[2:10], "big")
    if len(header) >= _BATCH.size and header[1] == Kind.BATCH_DISPATCH:
        return int.from_bytes(header[8:16], "big")
    return 0


def peek_keyed_dispatch(frames: Sequence[bytes]) -> KeyedDispatch | None:
    """A DISPATCH of a valid GET, SET or DEL as a :data:`KeyedDispatch`, else None.

    The worker's hot path for a request that came alone: the checks of
    :func:`decode_from_broker` (those of :func:`peek_keyed_request`), without building a
    Dispatch and a Request. None means "anything else" (ALL, PING, a batch, a control message,
    a malformed DISPATCH), for :func:`decode_from_broker` to parse or raise as usual: so a
    malformed request still gets its ProtocolError, with its request id when readable.
    """
    if not frames:
        return None
    header = frames[0]
    if len(header) <= _DISPATCH.size:
        return None
    version, kind, token = _DISPATCH.unpack_from(header)
    if version != VERSION or kind != _DISPATCH_KIND:
        return None
    keyed = peek_keyed_request(frames, _DISPATCH.size)
    if keyed is None:
        return None
    kind, request_id, key, ttl_ms, stamp = keyed
    return token, kind, request_id, key, frames[1] if kind == _SET else None, ttl_ms, stamp


# --- replies ----------------------------------------------------------------------------------


def encode_reply(reply: Reply) -> list[bytes]:
    """Frames of a reply."""
    return reply_frames(reply.status, reply.request_id, reply.token, reply.deadline_ms, reply.body)


def reply_frames(
    status: int, request_id: int, token: int, deadline_ms: int | None, body: bytes | None
) -> list[bytes]:
    """Frames of a REPLY from its fields: :func:`encode_reply` without a :class:`Reply` (the
    worker answering a :data:`KeyedDispatch`). ``deadline_ms`` None or 0: none."""
    header = _REPLY.pack(VERSION, _REPLY_KIND, status, request_id, token, deadline_ms or 0)
    return [header] if body is None else [header, body]


def error_reply(request_id: int, message: str, status: Status = Status.ERROR) -> list[bytes]:
    """Frames of an ERROR (or UNAVAILABLE) reply carrying a human-readable message."""
    return encode_reply(Reply(status, request_id, body=message.encode()))


def decode_reply(frames: Sequence[bytes]) -> Reply:
    """Parse a reply. Raises ProtocolError if it is not one."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a reply has 1 or 2 frames, got {len(frames)}")
    header = frames[0]
    _check_kind(header, Kind.REPLY, _REPLY.size)
    _, _, status_byte, request_id, token, deadline_ms = _REPLY.unpack_from(header)
    if len(header) != _REPLY.size:
        raise ProtocolError(f"reply header must be {_REPLY.size} bytes", request_id)
    status = _STATUS_OF.get(status_byte)
    if status is None:
        raise ProtocolError(f"unknown status {status_byte}", request_id)
    body = bytes(frames[1]) if len(frames) == 2 else None
    return Reply(status, request_id, token, deadline_ms or None, body)


def peek_reply(frames: Sequence[bytes]) -> tuple[int, int] | None:
    """``(status, token)`` of a well-formed REPLY, read from its header alone, else None.

    The broker's path for a lone request's reply, which it forwards as it came: the checks of
    :func:`decode_reply` on the header (version, kind, size, a known status, one or two
    frames), without building a :class:`Reply`. None: anything else, for the full decoders.
    """
    if not 1 <= len(frames) <= 2:
        return None
    header = frames[0]
    if (
        len(header) != _REPLY.size
        or header[0] != VERSION
        or header[1] != _REPLY_KIND
        or header[2] not in _STATUS_OF
    ):
        return None
    return header[2], int.from_bytes(header[12:20], "big")


def with_status(header: bytes, request_id: int, status: Status) -> bytes:
    """A copy of a reply header with another request id and status (used by the gather)."""
    _, kind, _, _, token, deadline_ms = _REPLY.unpack_from(header)
    return _REPLY.pack(VERSION, kind, status, request_id, token, deadline_ms)


# --- reply bodies of issue 12 -----------------------------------------------------------------
#
# What an OK reply's body holds for the new flags and commands (docs/protocol.md section 3):
# VERSIONED: version:u64, then what the body holds without the flag (GET: the value, none with
# KEYS_ONLY); RETURN_OLD (SET): version:u64 had:u8, then if had old_version:u64
# old_deadline_ms:u64 old_value; INCR: version:u64 value:i64; LOCK, REFRESH: token:u64.

_OLD_ITEM = struct.Struct("!QB")  # version, had
_OLD_HEAD = struct.Struct("!QQ")  # old_version, old_deadline_ms
_INCR_BODY = struct.Struct("!Qq")  # version, value

OldItem = tuple[int, int | None, bytes]
"""A previous item in a RETURN_OLD reply: ``(version, deadline_ms or None, value)``."""


def versioned_body(version: int, rest: bytes = b"") -> bytes:
    """The body of an OK reply to a request with flag VERSIONED: the key's version, then
    ``rest`` (what the body holds without the flag: GET's value, else nothing)."""
    return _check_u64_bytes(version, "version") + rest


def split_versioned(body: bytes | None) -> tuple[int, bytes]:
    """``(version, rest)`` of a :func:`versioned_body`. Raises ProtocolError if shorter than
    8 bytes (or absent)."""
    if body is None or len(body) < _U64.size:
        raise ProtocolError(f"versioned body of {0 if body is None else len(body)} bytes, need 8")
    return _U64.unpack_from(body)[0], bytes(body[_U64.size :])


def encode_old_item(version: int, old: OldItem | None) -> bytes:
    """The body of an OK reply to a SET with flag RETURN_OLD: the new version, then whether
    the key held a live item before (``had``), and if so that item."""
    _check_u64(version, "version")
    if old is None:
        return _OLD_ITEM.pack(version, 0)
    old_version, old_deadline_ms, old_value = old
    _check_u64(old_version, "old version")
    _check_u64(old_deadline_ms or 0, "old deadline_ms")
    return (
        _OLD_ITEM.pack(version, 1) + _OLD_HEAD.pack(old_version, old_deadline_ms or 0) + old_value
    )


def decode_old_item(body: bytes | None) -> tuple[int, OldItem | None]:
    """``(version, previous item or None)`` of an :func:`encode_old_item` body.

    Raises:
        ProtocolError: a truncated body, ``had`` other than 0 or 1, or bytes after a body
            without an item.
    """
    if body is None or len(body) < _OLD_ITEM.size:
        raise ProtocolError(
            f"RETURN_OLD body of {0 if body is None else len(body)} bytes, need at least 9"
        )
    version, had = _OLD_ITEM.unpack_from(body)
    if had == 0:
        if len(body) != _OLD_ITEM.size:
            raise ProtocolError(f"RETURN_OLD body without an item has {len(body) - 9} extra bytes")
        return version, None
    if had != 1:
        raise ProtocolError(f"RETURN_OLD body: had is {had}, not 0 or 1")
    if len(body) < _OLD_ITEM.size + _OLD_HEAD.size:
        raise ProtocolError(f"RETURN_OLD body of {len(body)} bytes, need at least 25 with an item")
    old_version, old_deadline_ms = _OLD_HEAD.unpack_from(body, _OLD_ITEM.size)
    old_value = bytes(body[_OLD_ITEM.size + _OLD_HEAD.size :])
    return version, (old_version, old_deadline_ms or None, old_value)


def incr_body(version: int, value: int) -> bytes:
    """The body of an OK reply to INCR: the key's new version and its new value."""
    _check_u64(version, "version")
    if isinstance(value, bool) or not _I64_MIN <= value <= _I64_MAX:
        raise ProtocolError(f"INCR value {value!r} is not a signed 64-bit integer")
    return _INCR_BODY.pack(version, value)


def split_incr_body(body: bytes | None) -> tuple[int, int]:
    """``(version, value)`` of an :func:`incr_body`. Raises ProtocolError unless 16 bytes."""
    if body is None or len(body) != _INCR_BODY.size:
        raise ProtocolError(f"INCR body of {0 if body is None else len(body)} bytes, need 16")
    version, value = _INCR_BODY.unpack(body)
    return version, value


def token_body(token: int) -> bytes:
    """The body of an OK reply to LOCK or REFRESH: the lock's token."""
    return _check_u64_bytes(token, "token")


def split_token_body(body: bytes | None) -> int:
    """The token of a :func:`token_body`. Raises ProtocolError unless 8 bytes."""
    if body is None or len(body) != _U64.size:
        raise ProtocolError(f"token body of {0 if body is None else len(body)} bytes, need 8")
    return _U64.unpack(body)[0]


# --- events -----------------------------------------------------------------------------------
#
# Each shard publishes one message per change on a PUB socket (workers/events.py), which the
# broker's events proxy forwards to subscribers (docs/protocol.md section 8). The key is the
# first frame so that ZeroMQ's prefix subscriptions filter by key prefix; the second is a fixed
# 32-byte header: version:u8 kind:u8(EVENT) event:u8 reserved:u8(0) shard:u32 seq:u64
# key_version:u64 deadline_ms:u64. seq is ``stream << 32 | n``: n counts 1, 2, ... per shard
# and stream (the owner's epoch), so a gap in n within a stream is a missed message.


class EventKind(enum.IntEnum):
    """What happened to the key (an EVENT's third byte)."""

    SET = 1  # written by SET (the new version and deadline)
    DELETE = 2  # deleted by DEL (deadline 0)
    EXPIRE = 3  # removed by the active expiry at its deadline (the version it had)
    INCR = 4  # written by INCR
    TTL = 5  # its deadline changed: EXPIRE, persist (deadline 0), GET with touch


_EVENT = struct.Struct("!BBBxIQQQ")
EVENT_HEADER_BYTES = _EVENT.size  # 32
_EVENT_KIND = int(Kind.EVENT)
_EVENT_KIND_OF = {int(kind): kind for kind in EventKind}


@dataclass(frozen=True, slots=True)
class Event:
    """One change of one key, as a subscriber receives it.

    Attributes:
        key: the key (never a reserved one: they have no events).
        event: what happened.
        shard: the shard that published it.
        seq: ``stream << 32 | n``, see :func:`event_seq`.
        version: the key's version after the change (EXPIRE, DELETE: its last version).
        deadline_ms: the key's deadline (Unix ms) after the change, None for none.
    """

    key: bytes
    event: EventKind
    shard: int
    seq: int
    version: int
    deadline_ms: int | None = None


def event_seq(stream: int, n: int) -> int:
    """The ``seq`` of the ``n``-th event (from 1) of a shard's ``stream`` (its owner's epoch):
    ``stream << 32 | n``, so that a subscriber sees a missed message as a gap in ``n``."""
    if not 0 <= stream <= 0xFFFF_FFFF or not 0 <= n <= 0xFFFF_FFFF:
        raise ProtocolError(f"event stream {stream} or number {n} out of range (u32)")
    return stream << 32 | n


def event_stream(epoch: int) -> int:
    """The 32-bit ``stream`` of a shard owner's epoch (a u64): the epoch itself below 2**32
    (cluster mode's leader epochs), else its two halves XORed. An ownership epoch is a broker
    token, ``broker_epoch << 32 | sequence``: successive owners under one broker differ in the
    low half, owners under a restarted broker in the high half, so consecutive streams of a
    shard differ (what a subscriber needs to see a change of owner)."""
    if not 0 <= epoch <= U64_MAX:
        raise ProtocolError(f"epoch {epoch} out of range (u64)")
    return (epoch >> 32 ^ epoch) & 0xFFFF_FFFF


def split_event_seq(seq: int) -> tuple[int, int]:
    """``(stream, n)`` of an event's ``seq``."""
    return seq >> 32, seq & 0xFFFF_FFFF


def encode_event(event: Event) -> list[bytes]:
    """Frames of an EVENT: ``key | header``. Raises ProtocolError for one decode_event
    refuses (a sender never puts on the wire what a subscriber cannot read)."""
    _check_event_key(event.key)
    code = _EVENT_KIND_OF.get(event.event)
    if code is None:
        raise ProtocolError(f"unknown event {event.event!r}")
    if not 0 <= event.shard < NO_SHARD:
        raise ProtocolError(f"EVENT: shard {event.shard} out of range")
    _check_u64(event.seq, "EVENT seq")
    _check_u64(event.version, "EVENT version")
    _check_u64(event.deadline_ms or 0, "EVENT deadline_ms")
    header = _EVENT.pack(
        VERSION, _EVENT_KIND, code, event.shard, event.seq, event.version, event.deadline_ms or 0
    )
    return [bytes(event.key), header]


def event_header(code: int, shard: int, seq: int, version: int, deadline_ms: int) -> bytes:
    """The header frame of an EVENT (the key is the first frame), unchecked: the worker's
    publisher (workers/events.py) sends one per change of a pass, from numbers its own shard
    made (a client key, u64 version and deadline, event code of EventKind), where
    :func:`encode_event`'s checks and Event object cost 7 us of its 9 us per event here.
    Subscribers decode it with :func:`decode_event` as any other."""
    return _EVENT.pack(VERSION, _EVENT_KIND, code, shard, seq, version, deadline_ms)


def decode_event(frames: Sequence[bytes]) -> Event:
    """Parse an EVENT (two frames, key then header). Raises ProtocolError naming what is
    wrong: the frame count, the header's size, version or kind, an unknown event, a key that
    is empty, too long or reserved, a shard out of range."""
    if len(frames) != 2:
        raise ProtocolError(f"EVENT takes 2 frames, got {len(frames)}")
    key, header = frames
    if len(header) != _EVENT.size:
        raise ProtocolError(f"EVENT header of {len(header)} bytes, expected {_EVENT.size}")
    version, kind, code, shard, seq, key_version, deadline_ms = _EVENT.unpack(header)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}, this peer speaks {VERSION}")
    if kind != _EVENT_KIND:
        found = _KIND_OF.get(kind)
        raise ProtocolError(f"expected EVENT, got {found.name if found else f'0x{kind:02x}'}")
    event = _EVENT_KIND_OF.get(code)
    if event is None:
        raise ProtocolError(f"unknown event {code}")
    if shard == NO_SHARD:
        raise ProtocolError("EVENT: shard 0xFFFFFFFF out of range")
    _check_event_key(key)
    return Event(bytes(key), event, shard, seq, key_version, deadline_ms or None)


def _check_event_key(key: bytes) -> None:
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ProtocolError(f"EVENT key of {len(key)} bytes, 1..{MAX_KEY_BYTES} allowed")
    if key[0] == RESERVED_KEY_BYTE:
        raise ProtocolError(f"EVENT {RESERVED_KEY}")


# --- batches ----------------------------------------------------------------------------------
#
# A batch is two frames: a 16-byte header, then its sub-requests (or sub-replies) back to back,
# each a fixed header followed by its variable parts, whose lengths that header gives. So a
# reader walks the second frame record by record, and the broker can cut a client's batch into
# per-shard dispatches by slicing records out of it, never decoding or copying a value until it
# joins the slices of one dispatch (one copy; a small record is copied out of its frame as it is
# cut, see COPIED_RECORD_BYTES). Limits (MAX_BATCH_OPS, MAX_BATCH_BYTES) bound
# the work one message can ask of the broker.


_pack_sub_request = _SUB_REQUEST.pack
_FIRST_KEY = bytes((RESERVED_KEY_BYTE + 1,))  # the smallest key a client may use


def pack_request(
    kind: int,
    request_id: int,
    key: bytes,
    value: bytes | None = None,
    ttl_ms: int | None = None,
    stamp: int | None = None,
    extra: RequestExtra | None = None,
) -> bytes:
    """One BATCH sub-request record. Raises ProtocolError for one the broker would refuse.

    ``stamp``: for a write, the first-send time in Unix seconds (:func:`stamp_of`; only its
    low STAMP_BITS bits travel), set with flag STAMPED; None: unstamped. A GET without
    ``ttl_ms`` (a read, not a touch) drops it. ``ttl_ms`` on a GET makes it a touch.
    ``extra``: the :class:`Request` fields of issue 12 (:class:`RequestExtra`: nx, xx,
    if_version, fence, versioned, return_old, by, token, wait_ms, keys_only), None for none.
    """
    # The common cases first, accepted with a few integer tests: a pipeline packs every
    # operation here, and the general checks below cost more than the packing. (A GET or DEL
    # has no value on the wire, whatever it is given: the general path drops it too.)
    # ``key >= _FIRST_KEY``: a key neither empty nor starting with NUL (reserved), in one
    # bytes comparison (20 ns less than ``key_len and key[0]``: a pipeline packs every op here).
    key_len = len(key)
    if key_len <= MAX_KEY_BYTES and key >= _FIRST_KEY:
        if extra is not None:  # the issue-12 options: their own fast path, else the general
            record = _pack_extra(kind, request_id, key, value, ttl_ms, stamp, extra)
            if record is not None:
                return record
        elif kind == _SET:
            if value is not None and len(value) <= MAX_VALUE_BYTES:
                if stamp is None:
                    flags = arg = 0
                else:
                    flags = _STAMPED
                    arg = (stamp & STAMP_MASK) << STAMP_SHIFT
                if ttl_ms is None:
                    head = _pack_sub_request(_SET, flags, key_len, len(value), request_id, arg)
                    return head + key + value
                if 0 < ttl_ms <= MAX_TTL_MS:
                    flags |= _TTL
                    arg |= ttl_ms
                    head = _pack_sub_request(_SET, flags, key_len, len(value), request_id, arg)
                    return head + key + value
        elif (kind == _GET and ttl_ms is None) or (kind == _DEL and stamp is None):
            return _pack_sub_request(kind, 0, key_len, 0, request_id, 0) + key
        elif kind == _DEL:
            arg = (stamp & STAMP_MASK) << STAMP_SHIFT
            return _pack_sub_request(_DEL, _STAMPED, key_len, 0, request_id, arg) + key
    return _pack_any(kind, request_id, key, value, ttl_ms, stamp, extra)


_FAST_EXTRA = frozenset({"nx", "xx", "if_version", "versioned", "by", "keys_only"})
_FAST_EXTRA_KINDS = frozenset({_GET, _SET, _DEL, _INCR, _EXPIRE})
_pack_if_version = struct.Struct("!BQ").pack  # an extension block of if_version alone


def _pack_extra(
    kind: int,
    request_id: int,
    key: bytes,
    value: bytes | None,
    ttl_ms: int | None,
    stamp: int | None,
    extra: RequestExtra,
) -> bytes | None:
    """:func:`pack_request`'s fast path for the common issue-12 operations (INCR; SET with NX,
    XX, IF_VERSION or VERSIONED; GET VERSIONED or KEYS_ONLY, a touch; DEL IF_VERSION; EXPIRE
    and persist), on a key already checked: the same bytes as :func:`_pack_any` (a randomized
    test holds them equal) without building and re-decoding a Request (about 8 us an op, for
    0.5 to 1 here). None for anything else (a fence, RETURN_OLD, a lock command, an option
    the kind does not take, a value out of range), which the general path packs or refuses.
    """
    if kind not in _FAST_EXTRA_KINDS or not extra.keys() <= _FAST_EXTRA:
        return None
    get = extra.get
    flags = arg = 0
    if ttl_ms is not None and kind != _DEL:
        if not 0 < ttl_ms <= MAX_TTL_MS:
            return None
        flags = _TTL
        arg = ttl_ms
    if get("versioned"):
        flags |= _VERSIONED
    if kind == _SET:
        if value is None or len(value) > MAX_VALUE_BYTES:
            return None
        if get("nx"):
            if get("xx"):
                return None
            flags |= _NX
        elif get("xx"):
            flags |= _XX
    elif get("nx") or get("xx"):
        return None
    elif kind == _INCR:
        by = get("by", 0)
        if by.__class__ is not int or not _I64_MIN <= by <= _I64_MAX:
            return None
        value = _I64.pack(by)
    else:
        value = b""
    if get("by") and kind != _INCR:
        return None
    if get("keys_only"):
        if kind != _GET:
            return None
        flags |= _KEYS_ONLY
    if_version = get("if_version")
    if if_version is not None:
        if kind == _GET or if_version.__class__ is not int or not 0 <= if_version <= U64_MAX:
            return None
        flags |= _EXT
        value = _pack_if_version(EXT_IF_VERSION, if_version) + value
        if len(value) > MAX_VALUE_BYTES:  # a SET's value and the block, together
            return None
    if stamp is not None and (kind != _GET or flags & _TTL):
        flags |= _STAMPED
        arg |= (stamp & STAMP_MASK) << STAMP_SHIFT
    return _pack_sub_request(kind, flags, len(key), len(value), request_id, arg) + key + value


def _pack_any(
    kind: int,
    request_id: int,
    key: bytes,
    value: bytes | None,
    ttl_ms: int | None,
    stamp: int | None,
    extra: RequestExtra | None,
) -> bytes:
    """:func:`pack_request`'s general path: every command and option, through the fields of a
    Request, checked by the broker's own rules before anything is returned. (A function of
    its own: its locals would make every call of the fast path build a larger frame.)"""
    command = _COMMAND_OF.get(kind)
    if command is None:
        raise ProtocolError(f"unknown command 0x{kind:02x}", request_id)
    if command not in KEYED_COMMANDS:
        raise ProtocolError(f"{command.name} cannot be sent in a batch", request_id)
    request = Request(command, request_id, key, value, ttl_ms, stamp=stamp, **(extra or {}))
    flags, arg, wire_value = _wire(request)
    if wire_value is None:
        wire_value = b""
    _record_request(kind, flags, arg, key, wire_value, request_id)
    head = _SUB_REQUEST.pack(kind, flags, len(key), len(wire_value), request_id, arg)
    return head + key + wire_value


class RequestExtra(TypedDict, total=False):
    """The options of :func:`pack_request` beyond the plain GET, SET and DEL: the
    :class:`Request` fields of the same names."""

    nx: bool
    xx: bool
    if_version: int | None
    fence: tuple[bytes, int] | None
    versioned: bool
    return_old: bool
    by: int
    token: int
    wait_ms: int
    keys_only: bool


def request_extra(request: Request) -> RequestExtra | None:
    """The :class:`RequestExtra` of a request (None when it has none of those options): what
    :func:`pack_request` takes to pack it."""
    extra: RequestExtra = {}
    if request.nx:
        extra["nx"] = True
    if request.xx:
        extra["xx"] = True
    if request.if_version is not None:
        extra["if_version"] = request.if_version
    if request.fence is not None:
        extra["fence"] = request.fence
    if request.versioned:
        extra["versioned"] = True
    if request.return_old:
        extra["return_old"] = True
    if request.by:
        extra["by"] = request.by
    if request.token:
        extra["token"] = request.token
    if request.wait_ms:
        extra["wait_ms"] = request.wait_ms
    if request.keys_only:
        extra["keys_only"] = True
    return extra or None


def batch_frames(batch_id: int, records: Sequence[bytes]) -> list[bytes]:
    """Frames of a BATCH from records made by :func:`pack_request`."""
    return [_BATCH.pack(VERSION, Kind.BATCH, len(records), batch_id), b"".join(records)]


def encode_batch(batch: Batch) -> list[bytes]:
    """Frames of a BATCH. Raises ProtocolError for a request or a batch this spec forbids."""
    records = [
        pack_request(r.kind, r.request_id, r.key, r.value, r.ttl_ms, r.stamp, request_extra(r))
        for r in batch.requests
    ]
    if not 1 <= len(records) <= MAX_BATCH_OPS:
        raise ProtocolError(
            f"a batch holds 1 to {MAX_BATCH_OPS} requests, got {len(records)}", batch.batch_id
        )
    return batch_frames(batch.batch_id, records)


def decode_batch(frames: Sequence[bytes]) -> Batch:
    """Parse a BATCH strictly: the first malformed sub-request raises ProtocolError (carrying
    its request id). The broker uses :func:`split_batch`, which answers each on its own."""
    batch_id, count, body = _batch_parts(frames, Kind.BATCH)
    requests = []
    for kind, request_id, key, value, ttl_ms, stamp in _split_requests(body, count, batch_id, True):
        if not kind:
            raise ProtocolError(key.decode(), request_id)
        if kind == EXTENDED_OP:
            requests.append(value)
        else:
            requests.append(Request(_COMMAND_OF[kind], request_id, key, value, ttl_ms, stamp=stamp))
    return Batch(batch_id, tuple(requests))


def split_batch(frames: Sequence[bytes]) -> tuple[int, list[SubRequest]]:
    """Cut a BATCH into sub-requests without decoding values (the broker's hot path).

    Returns:
        The batch id and one :data:`SubRequest` per sub-request, in order; a malformed one
        is marked with kind 0 and its error message, so it can be answered on its own.

    Raises:
        ProtocolError: the batch itself is malformed (header, frame count, limits, or a record
            that runs past the end); its ``request_id`` is the batch id when readable.
    """
    batch_id, count, body = _batch_parts(frames, Kind.BATCH)
    return batch_id, _split_requests(body, count, batch_id, False)


def request_id_of(header: bytes) -> int:
    """The request id of a client's REQUEST header, or the batch id of a BATCH header; 0 if
    the header is too short to hold it (to answer a message refused before it is parsed)."""
    if len(header) >= 2 and header[1] == Kind.BATCH:
        return batch_id_of(header)
    if len(header) < _REQUEST.size:
        return 0
    return int.from_bytes(header[4:12], "big")


def batch_id_of(header: bytes) -> int:
    """The batch id of a BATCH header, or 0 if the header is too short to hold it."""
    if len(header) < _BATCH.size:
        return 0
    return int.from_bytes(header[8:16], "big")


def dispatch_batch_frames(token: int, records: Sequence[bytes | memoryview]) -> list[bytes]:
    """A BATCH_DISPATCH of sub-request records (slices of client batches, or records made by
    :func:`request_record`): the one place the broker copies values, joining the slices."""
    return [_BATCH.pack(VERSION, Kind.BATCH_DISPATCH, len(records), token), b"".join(records)]


def request_record(frames: Sequence[bytes]) -> bytes:
    """The sub-request record of a validated single request (a broker putting it in a
    BATCH_DISPATCH together with others waiting for the same key)."""
    header = frames[0]
    _, kind, flags, request_id, arg = _REQUEST.unpack_from(header)
    key = header[_REQUEST.size :]
    value = frames[1] if len(frames) > 1 else b""
    return _SUB_REQUEST.pack(kind, flags, len(key), len(value), request_id, arg) + key + value


def sub_request_value(record: bytes | memoryview) -> bytes | memoryview:
    """The value of a validated sub-request record (empty for GET and DEL): what a broker
    compares, as a worker's idempotency memory does, to tell a retry from another request
    that reuses its id."""
    _, _, key_len, value_len, _, _ = _SUB_REQUEST.unpack_from(record)
    start = _SUB_REQUEST.size + key_len
    return record[start : start + value_len]


# --- batch replies ----------------------------------------------------------------------------


def pack_reply(
    status: int, request_id: int, token: int, deadline_ms: int | None, body: bytes | None
) -> bytes:
    """One BATCH_REPLY sub-reply record."""
    if body is None:
        return _SUB_REPLY.pack(status, 0, 0, request_id, token, deadline_ms or 0)
    return _SUB_REPLY.pack(status, HAS_BODY, len(body), request_id, token, deadline_ms or 0) + body


def batch_reply_frames(token: int, records: Sequence[bytes | memoryview]) -> list[bytes]:
    """Frames of a BATCH_REPLY from sub-reply records (:func:`pack_reply`, or slices of another
    BATCH_REPLY that a broker regroups by client)."""
    return [_BATCH.pack(VERSION, Kind.BATCH_REPLY, len(records), token), b"".join(records)]


def encode_batch_reply(batch: BatchReply) -> list[bytes]:
    """Frames of a BATCH_REPLY."""
    records = [
        pack_reply(r.status, r.request_id, r.token, r.deadline_ms, r.body) for r in batch.replies
    ]
    return batch_reply_frames(batch.token, records)


def decode_batch_reply(frames: Sequence[bytes]) -> BatchReply:
    """Parse a BATCH_REPLY into :class:`Reply` objects. Raises ProtocolError."""
    token, replies = split_batch_reply(frames)
    return BatchReply(
        token,
        tuple(
            Reply(_STATUS_OF[status], request_id, sub_token, deadline_ms, body)
            for status, request_id, sub_token, deadline_ms, body in replies
        ),
    )


SubReply = tuple[int, int, int, int | None, bytes | None]
"""A sub-reply as :func:`split_batch_reply` gives it: ``(status, request_id, token,
deadline_ms, body)``, ``deadline_ms`` None for 0, ``body`` None when absent."""

Answer = tuple[int, int, int | None, bytes | None]
"""A sub-reply as a client reads it (:func:`batch_reply_answers`): a :data:`SubReply`
without the token, ``(status, request_id, deadline_ms, body)``."""


def split_batch_reply(frames: Sequence[bytes]) -> tuple[int, list[SubReply]]:
    """Parse a BATCH_REPLY into plain tuples.

    Returns:
        The header's token and one :data:`SubReply` per sub-reply, in order.

    Raises:
        ProtocolError: anything malformed.
    """
    token, count, body = _batch_parts(frames, Kind.BATCH_REPLY)
    return token, _walk_sub_replies(body, count, True)


def batch_reply_answers(frames: Sequence[bytes]) -> list[Answer]:
    """What :func:`split_batch_reply` gives, as a client reads it (its hot path): one
    :data:`Answer` per sub-reply, in order, no tokens (a client has no use for them, and
    leaving them out is 0.1 us a sub-reply less to allocate).

    The common BATCH_REPLY (to SETs and DELs, to GETs of missing keys) has no bodies at all:
    it is checked a byte column at a time (:func:`_all_bodiless`) and unpacked by
    :meth:`struct.Struct.iter_unpack`, at under half the cost of walking it record by record.

    Raises:
        ProtocolError: anything malformed.
    """
    _, count, body = _batch_parts(frames, Kind.BATCH_REPLY)
    if _all_bodiless(body, count):
        return [
            (status, request_id, deadline_ms or None, None)
            for status, request_id, deadline_ms in _SUB_REPLY_ANSWER.iter_unpack(body)
        ]
    return _walk_sub_replies(body, count, False)


def _walk_sub_replies(body: bytes, count: int, tokens: bool) -> list:
    """The ``count`` sub-replies of a BATCH_REPLY's body, walked record by record and every
    field checked, as :data:`SubReply` tuples (``tokens``) or :data:`Answer` ones: the
    general path, and the one that explains (raises ProtocolError for) a malformed body."""
    size = len(body)
    unpack = _SUB_REPLY.unpack_from
    head = _SUB_REPLY.size
    statuses = _STATUS_OF
    replies = []
    append = replies.append
    offset = 0
    for index in range(count):
        start = offset + head
        if start > size:
            raise ProtocolError(f"sub-reply {index} of {count} is truncated")
        status, flags, body_len, request_id, sub_token, deadline_ms = unpack(body, offset)
        offset = start + body_len
        if offset > size:
            raise ProtocolError(f"sub-reply {index} runs past the end of the batch", request_id)
        # With a body or without (then no body_len either), each case checked on its own.
        if flags:
            if flags != HAS_BODY or status not in statuses:
                raise ProtocolError(f"sub-reply {index}: bad status or flags", request_id)
            sub_body = body[start:offset]
        else:
            if body_len or status not in statuses:
                raise ProtocolError(f"sub-reply {index}: bad status or flags", request_id)
            sub_body = None
        append(
            (status, request_id, sub_token, deadline_ms or None, sub_body)
            if tokens
            else (status, request_id, deadline_ms or None, sub_body)
        )
    if offset != size:
        raise ProtocolError(f"{size - offset} bytes after the last of {count} sub-replies")
    return replies


_SUB_REPLY_ANSWER = struct.Struct("!B7xQ8xQ")  # status, request_id, deadline_ms of a sub-reply
_SUB_REPLY_STATUSES = bytes(sorted(_STATUS_OF))
# flags and body_len: all zero in a bodiless record (offsets derived from _SUB_REPLY's layout)
_SUB_REPLY_ZERO_OFFSETS = (
    struct.calcsize("!B"),
    *range(struct.calcsize("!BBxx"), struct.calcsize("!BBxxI")),
)
assert _SUB_REPLY.format == "!BBxxIQQQ" and _SUB_REPLY_ANSWER.size == _SUB_REPLY.size


def _all_bodiless(body: bytes, count: int) -> bool:
    """Whether a BATCH_REPLY body is ``count`` well-formed sub-replies without bodies, checked
    with C slices a byte column at a time (flags and body_len zero, statuses known), without
    walking it. If so, the walk would find the same records at the same offsets (each exactly
    a header, since no body_len is set) and accept every one; if not, the walk answers or
    raises as usual."""
    step = _SUB_REPLY.size
    if len(body) != count * step:
        return False
    for offset in _SUB_REPLY_ZERO_OFFSETS:
        if body[offset::step].count(0) != count:
            return False
    return not body[::step].translate(None, _SUB_REPLY_STATUSES)  # no unknown status left


def batch_reply_header(frames: Sequence[bytes]) -> tuple[int, int]:
    """``(token, count)`` of a BATCH_REPLY, reading the header only (broker hot path: a reply
    whose sub-replies all go to one client is forwarded without reading further).

    Raises:
        ProtocolError: the header or the frame count is wrong.
    """
    token, count, _ = _batch_parts(frames, Kind.BATCH_REPLY)
    return token, count


def split_reply_records(frames: Sequence[bytes], count: int) -> list[bytes | memoryview]:
    """The ``count`` sub-reply records of a BATCH_REPLY as slices, undecoded (a broker
    regrouping them by client): bytes if shorter than :data:`COPIED_RECORD_BYTES`, else
    memoryviews. Raises ProtocolError if the framing is wrong."""
    if len(frames) != 2:
        raise ProtocolError(f"BATCH_REPLY takes 2 frames, got {len(frames)}")
    body = frames[1]
    view = memoryview(body)
    size = len(body)
    body_len = _SUB_REPLY_BODY_LEN.unpack_from  # not int.from_bytes of a slice: 0.13 us vs 0.31
    copied = COPIED_RECORD_BYTES
    records = []
    offset = 0
    for index in range(count):
        start = offset + _SUB_REPLY.size
        if start > size:
            raise ProtocolError(f"sub-reply {index} of {count} is truncated")
        end = start + body_len(body, offset)[0]
        if end > size:
            raise ProtocolError(f"sub-reply {index} runs past the end of the batch")
        records.append(body[offset:end] if end - offset < copied else view[offset:end])
        offset = end
    if offset != size:
        raise ProtocolError(f"{size - offset} bytes after the last of {count} sub-replies")
    return records


def reply_record_status(record: bytes | memoryview) -> int:
    """The status byte of a sub-reply record."""
    return record[0]


def decode_reply_record(record: bytes | memoryview) -> Reply:
    """A sub-reply record (one of :func:`split_reply_records`) as a :class:`Reply`."""
    if len(record) < _SUB_REPLY.size:
        raise ProtocolError("sub-reply record truncated")
    status, flags, body_len, request_id, token, deadline_ms = _SUB_REPLY.unpack_from(record)
    body = bytes(record[_SUB_REPLY.size :]) if flags & HAS_BODY else None
    status_ = _STATUS_OF.get(status)
    if status_ is None or len(record) != _SUB_REPLY.size + body_len:
        raise ProtocolError("bad sub-reply record", request_id)
    return Reply(status_, request_id, token, deadline_ms or None, body)


def reply_from_record(record: bytes | memoryview) -> list[bytes]:
    """The REPLY frames for a sub-reply record (a single request that rode in a batch)."""
    status, flags, _, request_id, token, deadline_ms = _SUB_REPLY.unpack_from(record)
    header = _REPLY.pack(VERSION, Kind.REPLY, status, request_id, token, deadline_ms)
    return [header, bytes(record[_SUB_REPLY.size :])] if flags & HAS_BODY else [header]


# --- batch helpers ----------------------------------------------------------------------------


_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)
_BATCHABLE = frozenset(int(kind) for kind in KEYED_COMMANDS)  # what a BATCH may carry


def _batch_parts(frames: Sequence[bytes], kind: Kind) -> tuple[int, int, bytes]:
    """Check a batch message's header and frames; returns ``(tag, count, body)``."""
    _check_version(frames)
    header = frames[0]
    if header[1] != kind:
        found = _KIND_OF.get(header[1])
        raise ProtocolError(
            f"expected {kind.name}, got {found.name if found else f'0x{header[1]:02x}'}"
        )
    if len(header) != _BATCH.size:
        raise ProtocolError(
            f"{kind.name} header of {len(header)} bytes, expected {_BATCH.size}",
            batch_id_of(header) if kind == Kind.BATCH else 0,
        )
    _, _, count, tag = _BATCH.unpack(header)
    error_id = tag if kind == Kind.BATCH else 0
    if len(frames) != 2:
        raise ProtocolError(f"{kind.name} takes 2 frames, got {len(frames)}", error_id)
    if not 1 <= count <= MAX_BATCH_OPS:
        raise ProtocolError(f"a batch holds 1 to {MAX_BATCH_OPS} items, got {count}", error_id)
    body = frames[1]
    if not isinstance(body, bytes):
        body = bytes(body)
    if len(body) > MAX_BATCH_BYTES and kind != Kind.BATCH_REPLY:
        raise ProtocolError(f"batch of {len(body)} bytes exceeds {MAX_BATCH_BYTES}", error_id)
    return tag, count, body


def _split_requests(body: bytes, count: int, error_id: int, values: bool) -> list:
    """Walk ``count`` sub-request records; see :data:`SubRequest` (``values`` False) and
    :data:`Op` (``values`` True) for what each becomes."""
    size = len(body)
    view = memoryview(body)
    unpack = _SUB_REQUEST.unpack_from
    head_bytes = _SUB_REQUEST.size
    max_ttl_ms = MAX_TTL_MS
    max_value = MAX_VALUE_BYTES
    copied = COPIED_RECORD_BYTES
    stamped = _STAMPED
    get = _GET
    first_key = _FIRST_KEY
    shift = STAMP_SHIFT
    arg_mask = ARG_MASK
    fast_kinds = _FAST_EXTENDED
    command_of = _COMMAND_OF
    ops: list = []
    append = ops.append
    offset = 0
    for index in range(count):
        key_start = offset + head_bytes
        if key_start > size:
            raise ProtocolError(f"sub-request {index} of {count} is truncated", error_id)
        kind, flags, key_len, value_len, request_id, arg = unpack(body, offset)
        key_end = key_start + key_len
        end = key_end + value_len
        if end > size:
            raise ProtocolError(f"sub-request {index} runs past the end of the batch", error_id)
        # A stamp (SET, DEL) is taken off arg and flags first; the rest is read as without it.
        stamp = None
        if flags & stamped and kind != get:
            stamp = arg >> shift
            arg &= arg_mask
            flags ^= stamped
        # The common cases (a plain GET, SET or DEL), accepted with a few integer tests and,
        # on the key they copy anyway, one bytes comparison (``key >= first_key``: neither
        # empty nor starting with NUL, reserved); anything else, the issue-12 commands and
        # flags included, is read (or explained) by _record_request, the one place for the
        # rules.
        if ((kind == _GET or kind == _DEL) and not (flags or value_len or arg)) or (
            kind == _SET
            and value_len <= max_value
            and ((not flags and not arg) or (flags == _TTL and 0 < arg <= max_ttl_ms))
        ):
            key = body[key_start:key_end]
            if key >= first_key:
                if values:
                    if kind == _SET:
                        append((kind, request_id, key, body[key_end:end], arg or None, stamp))
                    else:
                        append((kind, request_id, key, None, None, stamp))
                else:
                    append(
                        (
                            kind,
                            request_id,
                            key,
                            body[offset:end] if end - offset < copied else view[offset:end],
                        )
                    )
                offset = end
                continue
        # The common issue-12 records (INCR, a conditional or versioned SET, ...): their own
        # fast path, _extended_fields; anything else is read or explained below.
        if kind in fast_kinds:
            fields = _extended_fields(kind, flags, arg, body, key_start, key_end, end)
            if fields is not None:
                key = body[key_start:key_end]
                if values:
                    ttl_ms, value, keys_only, nx, xx, if_version, versioned, by = fields
                    request = Request(
                        command_of[kind], request_id, key, value, ttl_ms, 0, keys_only, stamp,
                        nx, xx, if_version, None, versioned, False, by,
                    )  # fmt: skip
                    append((EXTENDED_OP, request_id, key, request, ttl_ms, stamp))
                else:
                    record = body[offset:end] if end - offset < copied else view[offset:end]
                    append((kind, request_id, key, record))
                offset = end
                continue
        if stamp is not None:  # put back: _record_request reads the record as it came
            flags |= stamped
            arg |= stamp << shift
        try:
            request = _record_request(
                kind, flags, arg, view[key_start:key_end], view[key_end:end], request_id
            )
        except ProtocolError as exc:
            message = str(exc).encode()
            append(
                (0, request_id, message, None, None, None)
                if values
                else (0, request_id, message, view[0:0])
            )
        else:
            if values:
                key = request.key
                append((EXTENDED_OP, request_id, key, request, request.ttl_ms, request.stamp))
            else:
                append(
                    (
                        kind,
                        request_id,
                        request.key,
                        body[offset:end] if end - offset < copied else view[offset:end],
                    )
                )
        offset = end
    if offset != size:
        raise ProtocolError(
            f"{size - offset} bytes after the last of {count} sub-requests", error_id
        )
    return ops


# The flags of the records _extended_fields reads (a stamp already taken off; a stamped GET, a
# touch, goes the general way), by kind.
_FAST_EXTENDED = {
    _SET: _TTL | _NX | _XX | _EXT | _VERSIONED,
    _INCR: _TTL | _EXT | _VERSIONED,
    _EXPIRE: _TTL | _EXT | _VERSIONED,
    _DEL: _EXT | _VERSIONED,
    _GET: _TTL | _KEYS_ONLY | _VERSIONED,
}


def _extended_fields(
    kind: int, flags: int, arg: int, body: bytes, key_start: int, key_end: int, end: int
) -> tuple[int | None, bytes | None, bool, bool, bool, int | None, bool, int] | None:
    """The batch splitters' fast path for the common issue-12 records (INCR; SET with NX, XX,
    IF_VERSION or VERSIONED; GET VERSIONED or KEYS_ONLY; DEL IF_VERSION; EXPIRE and persist):
    ``(ttl_ms, value, keys_only, nx, xx, if_version, versioned, by)`` of a valid one, what
    _record_request would find (a randomized test holds them equal), without its per-field
    checks and exception handlers (3 to 4.5 us a record, at the broker and again at the
    worker, for about 1 here). None for anything else (a fence, RETURN_OLD, a lock command,
    a malformed record), which the general path reads or explains. ``flags`` and ``arg``
    without the stamp; ``kind`` one of _FAST_EXTENDED."""
    if flags & ~_FAST_EXTENDED[kind] or (flags & _NX and flags & _XX):
        return None
    if flags & _TTL:
        if not 0 < arg <= MAX_TTL_MS:
            return None
        ttl_ms = arg
    elif arg:
        return None
    else:
        ttl_ms = None
    if end - key_end > MAX_VALUE_BYTES or body[key_start:key_end] < _FIRST_KEY:
        return None
    if_version = None
    start = key_end
    if flags & _EXT:
        if end - key_end < 9 or body[key_end] != EXT_IF_VERSION:
            return None
        if_version = _U64.unpack_from(body, key_end + 1)[0]
        start += 9
    value = None
    by = 0
    if kind == _SET:
        value = body[start:end]
    elif kind == _INCR:
        if end - start != 8:
            return None
        by = _I64.unpack_from(body, start)[0]
    elif end != start:
        return None
    return (
        ttl_ms,
        value,
        flags & _KEYS_ONLY != 0,
        flags & _NX != 0,
        flags & _XX != 0,
        if_version,
        flags & _VERSIONED != 0,
        by,
    )


def _record_request(
    kind: int,
    flags: int,
    arg: int,
    key: bytes | memoryview,
    value: bytes | memoryview,
    request_id: int,
) -> Request:
    """A sub-request record's fields as a :class:`Request`, by the rules of section 3 for the
    commands a batch may carry (an empty value is "no value" for a command that takes none).

    Raises:
        ProtocolError: naming what is wrong, with ``request_id``.
    """
    command = _COMMAND_OF.get(kind)
    if command is None:
        raise ProtocolError(f"unknown command 0x{kind:02x}", request_id)
    if command not in KEYED_COMMANDS:
        raise ProtocolError(f"{command.name} cannot be sent in a batch", request_id)
    return _parse_request(command, flags, arg, key, value, request_id)


def _sub_request_error(
    kind: int, flags: int, arg: int, key: bytes | memoryview, value: bytes | memoryview
) -> str:
    """What is wrong with a sub-request ("" if nothing): the rules of section 3, for the
    commands a batch may carry."""
    try:
        _record_request(kind, flags, arg, key, value, 0)
    except ProtocolError as exc:
        return str(exc)
    return ""


# --- control ----------------------------------------------------------------------------------


def encode_control(message: Ready | Assign | Heartbeat | Disconnect) -> list[bytes]:
    """Frames of a worker/broker control message."""
    match message:
        case Ready(shard, last_token, durable, cluster):
            flags = READY_DURABLE if durable else 0
            return [_READY.pack(VERSION, Kind.READY, flags, _shard_out(shard), last_token, cluster)]
        case Assign(shard, shards, epoch):
            return [_ASSIGN.pack(VERSION, Kind.ASSIGN, _shard_out(shard), shards, epoch)]
        case Heartbeat():
            return [_BARE.pack(VERSION, Kind.HEARTBEAT)]
        case Disconnect():
            return [_BARE.pack(VERSION, Kind.DISCONNECT)]
    raise TypeError(f"not a control message: {message!r}")


def decode_from_worker(frames: Sequence[bytes]) -> FromWorker:
    """Parse anything a worker sends the broker: a reply or a control message."""
    kind = _peek_kind(frames)
    if kind == Kind.REPLY:
        return decode_reply(frames)
    if kind == Kind.BATCH_REPLY:
        return decode_batch_reply(frames)
    if kind == Kind.REPORT:
        return decode_report(frames)
    if len(frames) != 1:
        raise ProtocolError(f"{kind.name} takes 1 frame, got {len(frames)}")
    header = frames[0]
    match kind:
        case Kind.READY:
            if len(header) == _READY_V1_BYTES:  # an earlier version's: no cluster id
                header = bytes(header) + bytes(_READY.size - _READY_V1_BYTES)
            _check_size(header, _READY.size, kind)
            _, _, flags, shard, last_token, cluster = _READY.unpack(header)
            return Ready(_shard_in(shard), last_token, bool(flags & READY_DURABLE), cluster)
        case Kind.HEARTBEAT:
            _check_size(header, _BARE.size, kind)
            return Heartbeat()
        case Kind.DISCONNECT:
            _check_size(header, _BARE.size, kind)
            return Disconnect()
    raise ProtocolError(f"a worker may not send {kind.name}")


def decode_from_broker(frames: Sequence[bytes]) -> FromBroker:
    """Parse anything the broker sends a worker: a dispatched request or a control message."""
    kind = _peek_kind(frames)
    header = frames[0]
    match kind:
        case Kind.DISPATCH:
            if len(header) < _DISPATCH.size:
                raise ProtocolError("DISPATCH header too short")
            _, _, token = _DISPATCH.unpack_from(header)
            request = decode_request([header[_DISPATCH.size :], *frames[1:]])
            return Dispatch(token, request)
        case Kind.BATCH_DISPATCH:
            token, count, body = _batch_parts(frames, Kind.BATCH_DISPATCH)
            return DispatchBatch(token, _split_requests(body, count, 0, True))
        case Kind.ASSIGN:
            _check_frames(frames, 1, kind)
            _check_size(header, _ASSIGN.size, kind)
            _, _, shard, shards, epoch = _ASSIGN.unpack(header)
            if shards < 1 or (shard != NO_SHARD and shard >= shards):
                raise ProtocolError(f"ASSIGN of shard {shard} out of {shards}")
            return Assign(_shard_in(shard), shards, epoch)
        case Kind.HEARTBEAT | Kind.DISCONNECT:
            _check_frames(frames, 1, kind)
            _check_size(header, _BARE.size, kind)
            return Heartbeat() if kind == Kind.HEARTBEAT else Disconnect()
    raise ProtocolError(f"the broker may not send {kind.name}")


# --- worker reports and STATS -------------------------------------------------------------
#
# A worker sends REPORT once a heartbeat interval (two frames: the 2-byte header, then a UTF-8
# JSON object of at most MAX_REPORT_BYTES); the broker keeps the last one of each worker and
# answers a client's STATS from them and its own figures, so a scrape costs the broker a JSON
# encoding and no worker anything. Nothing a worker reports is trusted: check_report takes
# exactly the fields below, each of its type and range, and refuses the whole report otherwise.

MAX_REPORT_BYTES = 4096  # a REPORT's JSON body; a full one is about 1 KiB
MAX_FIGURE = U64_MAX  # every count in a report is an integer from 0 to this (epochs are u64)
# fsync latency buckets (upper bounds, seconds) of a report's fsync_buckets: one count per
# bucket, not cumulative, then one for the fsyncs slower than the last bound.
FSYNC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A report's counts of requests served by command and status (names of Kind and Status).
# Every command a worker serves (STATS is the broker's).
REPORT_COMMANDS = (
    "GET",
    "SET",
    "DEL",
    "ALL",
    "PING",
    "INCR",
    "EXPIRE",
    "LOCK",
    "REFRESH",
    "UNLOCK",
    "FENCE_CHECK",
)
REPORT_STATUSES = tuple(status.name for status in Status)
# Field -> kind of value: "count" an integer 0..MAX_FIGURE, "count?" the same or null,
# "rate" a finite float >= 0.
_REPORT_FIELDS = {
    "shard": "count?",  # the shard the worker owns, null for a standby
    "epoch": "count",  # its ownership epoch (0: none)
    "keys": "count",  # keys in the shard, expired ones not yet removed included
    "keys_with_ttl": "count",  # of which have a deadline
    "expired": "count",  # keys removed by the active expiry since the worker took the shard
    "log_bytes": "count?",  # the shard's log size (null: in memory)
    "fsync_count": "count",  # fsyncs of the log since this worker took the shard
    "fsync_seconds": "rate",  # their total duration
    "compactions": "count",  # log compactions since the worker took the shard
    "broker_silences": "count",  # times the worker heard nothing from the broker for its
    # liveness and reconnected (missed heartbeats, seen from the worker)
    "ops_per_s": "rate",  # requests served per second over the last report interval
}

# Optional counts (absent: 0): the worker's own records (locks, fence tokens), left out of
# "keys", and their bytes (bounded by workers.shard.RESERVED_MAX_BYTES).
_REPORT_OPTIONAL = ("internal_keys", "internal_bytes")


def encode_report(figures: dict[str, object]) -> list[bytes]:
    """Frames of a REPORT. Raises ProtocolError if ``figures`` would be refused."""
    body = json.dumps(figures, separators=(",", ":")).encode()
    frames = [_BARE.pack(VERSION, Kind.REPORT), body]
    decode_report(frames)  # what we send is what the broker accepts
    return frames


def decode_report(frames: Sequence[bytes]) -> Report:
    """Parse and check a REPORT (see :func:`check_report`). Raises ProtocolError."""
    _check_frames(frames, 2, Kind.REPORT)
    _check_size(frames[0], _BARE.size, Kind.REPORT)
    body = frames[1]
    if len(body) > MAX_REPORT_BYTES:
        raise ProtocolError(f"REPORT of {len(body)} bytes exceeds {MAX_REPORT_BYTES}")
    try:
        figures = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"REPORT is not UTF-8 JSON: {exc}") from None
    return Report(check_report(figures))


def check_report(figures: object) -> dict[str, object]:
    """A worker's figures, checked field by field; raises ProtocolError naming the first bad one.

    Fields (all required; others are ignored, so a newer worker may add some): those of
    ``_REPORT_FIELDS`` above, plus ``fsync_buckets`` (len(FSYNC_BUCKETS_S) + 1 counts) and
    ``requests`` (``{command: {status: count}}`` with names from REPORT_COMMANDS and
    REPORT_STATUSES, any subset).
    """
    if not isinstance(figures, dict):
        raise ProtocolError("REPORT is not a JSON object")
    checked: dict[str, object] = {}
    for name, form in _REPORT_FIELDS.items():
        if name not in figures:
            raise ProtocolError(f"REPORT lacks {name!r}")
        value = figures[name]
        if form == "rate":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 <= value <= MAX_FIGURE
            ):
                raise ProtocolError(f"REPORT field {name!r} is not a finite number >= 0")
            checked[name] = float(value)
        elif value is None and form == "count?":
            checked[name] = None
        else:
            checked[name] = _count(value, name)
    buckets = figures.get("fsync_buckets")
    if not isinstance(buckets, list) or len(buckets) != len(FSYNC_BUCKETS_S) + 1:
        raise ProtocolError(
            f"REPORT field 'fsync_buckets' is not {len(FSYNC_BUCKETS_S) + 1} counts"
        )
    checked["fsync_buckets"] = [_count(count, "fsync_buckets") for count in buckets]
    requests = figures.get("requests")
    if not isinstance(requests, dict):
        raise ProtocolError("REPORT field 'requests' is not an object")
    served: dict[str, dict[str, int]] = {}
    for command, by_status in requests.items():
        if command not in REPORT_COMMANDS or not isinstance(by_status, dict):
            raise ProtocolError(f"REPORT field 'requests' has a bad command {str(command)[:20]!r}")
        counts: dict[str, int] = {}
        for status, count in by_status.items():
            if status not in REPORT_STATUSES:
                raise ProtocolError(
                    f"REPORT field 'requests' has a bad status {str(status)[:20]!r}"
                )
            counts[status] = _count(count, "requests")
        served[command] = counts
    checked["requests"] = served
    for name in _REPORT_OPTIONAL:  # added later: 0 in an older worker's report
        checked[name] = _count(figures.get(name, 0), name)
    return checked


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FIGURE:
        raise ProtocolError(f"REPORT field {name!r} is not an integer from 0 to {MAX_FIGURE}")
    return value


# --- ALL entries ------------------------------------------------------------------------------


def encode_entries(entries: Sequence[Entry]) -> bytes:
    """The body of an ALL reply: each entry is ``key_len:u16 value_len:u32 deadline_ms:u64 key
    value``. Bodies concatenate: the broker gathers shards by joining their bodies."""
    parts: list[bytes] = []
    for entry in entries:
        parts.append(_ENTRY.pack(len(entry.key), len(entry.value), entry.deadline_ms or 0))
        parts.append(entry.key)
        parts.append(entry.value)
    return b"".join(parts)


def decode_entries(body: bytes) -> list[Entry]:
    """Parse an ALL body. Raises ProtocolError on a truncated or overlong body."""
    entries = []
    offset = 0
    view = memoryview(body)
    while offset < len(body):
        if offset + _ENTRY.size > len(body):
            raise ProtocolError(f"entry header truncated at byte {offset}")
        key_len, value_len, deadline_ms = _ENTRY.unpack_from(body, offset)
        offset += _ENTRY.size
        end = offset + key_len + value_len
        if end > len(body):
            raise ProtocolError(f"entry at byte {offset} runs past the end of the body")
        key = bytes(view[offset : offset + key_len])
        value = bytes(view[offset + key_len : end])
        entries.append(Entry(key, value, deadline_ms or None))
        offset = end
    return entries


# --- helpers ----------------------------------------------------------------------------------


def _check_version(frames: Sequence[bytes]) -> None:
    """Every message: at least one frame, starting with our version and a kind byte."""
    if not frames:
        raise ProtocolError("empty message")
    header = frames[0]
    if len(header) < 2:
        raise ProtocolError(f"header of {len(header)} bytes is too short")
    if header[0] != VERSION:
        raise ProtocolError(f"unsupported protocol version {header[0]}, this peer speaks {VERSION}")


def _peek_kind(frames: Sequence[bytes]) -> Kind:
    _check_version(frames)
    kind = _KIND_OF.get(frames[0][1])
    if kind is None:
        raise ProtocolError(f"unknown message kind 0x{frames[0][1]:02x}")
    return kind


def _check_kind(header: bytes, kind: Kind, size: int) -> None:
    found = _peek_kind([header])
    if found != kind:
        raise ProtocolError(f"expected {kind.name}, got {found.name}")
    if len(header) < size:
        raise ProtocolError(f"{kind.name} header of {len(header)} bytes, expected {size}")


def _check_size(header: bytes, size: int, kind: Kind) -> None:
    if len(header) != size:
        raise ProtocolError(f"{kind.name} header of {len(header)} bytes, expected {size}")


def _check_frames(frames: Sequence[bytes], count: int, kind: Kind) -> None:
    if len(frames) != count:
        raise ProtocolError(f"{kind.name} takes {count} frame(s), got {len(frames)}")


def _shard_out(shard: int | None) -> int:
    return NO_SHARD if shard is None else shard


def _shard_in(shard: int) -> int | None:
    return None if shard == NO_SHARD else shard


# --- replication (leader <-> follower) --------------------------------------------------------

# Bounds of the replication messages (docs/protocol.md section 7). A follower id is a worker
# id as registered in etcd; a snapshot travels in chunks of at most a MiB (the leader sends a
# few at a time, see workers/replication.py); RECORDS carry at most 16 MiB of batches, or one
# batch that is a single record larger than that (a SET of the largest key and value).
MAX_FOLLOWER_ID_BYTES = 255
MAX_SNAPSHOT_CHUNK_BYTES = 1024 * 1024
MAX_RECORDS_BYTES = 16 * 1024 * 1024
# One log record of the largest SET: length and CRC (8), type, request id, deadline, version
# and key length (29: a SETV, issue 12), key, value (workers/aof.py). A record is at least 17
# bytes (a DEL of an empty key: the prefix and 9 bytes of body), so a RECORDS body holds at
# most len/17 batches.
MAX_RECORD_BYTES = 8 + 29 + MAX_KEY_BYTES + MAX_VALUE_BYTES
MIN_RECORD_BYTES = 17
MAX_REFUSE_REASON_BYTES = 1024
FOLLOW_RESUME = 0x01  # FOLLOW flags: have_seq is meaningful
SNAPSHOT_LAST = 0x01  # SNAPSHOT flags: the final chunk
ACK_CHUNK = 0x01  # ACK flags: a snapshot chunk is written (not records applied)

_FOLLOW = struct.Struct("!BBBBIQQ")
_SNAPSHOT = struct.Struct("!BBBxIQQI")
_RECORDS = struct.Struct("!BBxxIQQI")
_ACK = struct.Struct("!BBBxIQQI")
_REFUSE = struct.Struct("!BBxxIQ")


@dataclass(frozen=True, slots=True)
class Follow:
    """Follower -> leader: "I follow you in ``epoch``; send me the shard".

    ``have_seq`` None: send a snapshot. Otherwise the follower holds the shard's state of
    ``epoch`` at that sequence number (after a reconnection) and the leader may resume from
    the next batch if it still has it, else it sends a snapshot anyway."""

    shard: int
    epoch: int
    follower_id: str
    have_seq: int | None = None


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Leader -> follower: chunk ``chunk_no`` of the shard's compacted log at batch ``seq``."""

    shard: int
    epoch: int
    seq: int
    chunk_no: int
    last: bool
    body: bytes


@dataclass(frozen=True, slots=True)
class Records:
    """Leader -> follower: the log records of batches ``first_seq .. first_seq + count - 1``."""

    shard: int
    epoch: int
    first_seq: int
    count: int
    body: bytes

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


@dataclass(frozen=True, slots=True)
class Ack:
    """Follower -> leader: records up to ``seq`` are appended and applied (``chunk`` None), or
    snapshot chunk ``chunk`` of the snapshot at ``seq`` is written."""

    shard: int
    epoch: int
    seq: int
    chunk: int | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Follower -> leader: I follow the newer ``epoch``; you are not my leader (fencing)."""

    shard: int
    epoch: int
    reason: str = ""


ToLeader = Follow | Ack | Refuse
ToFollower = SnapshotChunk | Records


def encode_replication(message: ToLeader | ToFollower) -> list[bytes]:
    """Frames of a replication message. Raises ProtocolError for one this spec forbids (the
    same checks as the decoders: a sender never puts on the wire what a receiver refuses)."""
    match message:
        case Follow(shard, epoch, follower_id, have_seq):
            name = follower_id.encode()
            _check_link(shard, epoch, Kind.FOLLOW)
            if not 1 <= len(name) <= MAX_FOLLOWER_ID_BYTES:
                raise ProtocolError(f"FOLLOW: follower id of {len(name)} bytes, 1..255 allowed")
            flags = 0 if have_seq is None else FOLLOW_RESUME
            seq = 0 if have_seq is None else have_seq
            _check_u64(seq, "FOLLOW have_seq")
            return [_FOLLOW.pack(VERSION, Kind.FOLLOW, flags, len(name), shard, epoch, seq) + name]
        case SnapshotChunk(shard, epoch, seq, chunk_no, last, body):
            _check_link(shard, epoch, Kind.SNAPSHOT)
            _check_u64(seq, "SNAPSHOT seq")
            _check_snapshot_body(len(body), chunk_no)
            flags = SNAPSHOT_LAST if last else 0
            header = _SNAPSHOT.pack(VERSION, Kind.SNAPSHOT, flags, shard, epoch, seq, chunk_no)
            return [header, body]
        case Records(shard, epoch, first_seq, count, body):
            _check_link(shard, epoch, Kind.RECORDS)
            _check_records(first_seq, count, len(body))
            return [_RECORDS.pack(VERSION, Kind.RECORDS, shard, epoch, first_seq, count), body]
        case Ack(shard, epoch, seq, chunk):
            _check_link(shard, epoch, Kind.ACK)
            _check_u64(seq, "ACK seq")
            flags = 0 if chunk is None else ACK_CHUNK
            number = 0 if chunk is None else chunk
            if not 0 <= number <= 0xFFFF_FFFF:
                raise ProtocolError(f"ACK chunk {number} out of range")
            return [_ACK.pack(VERSION, Kind.ACK, flags, shard, epoch, seq, number)]
        case Refuse(shard, epoch, reason):
            _check_link(shard, epoch, Kind.REFUSE)
            text = reason.encode()[:MAX_REFUSE_REASON_BYTES]
            return [_REFUSE.pack(VERSION, Kind.REFUSE, shard, epoch), text]
    raise TypeError(f"not a replication message: {message!r}")


def decode_to_leader(frames: Sequence[bytes]) -> ToLeader:
    """Parse what a follower sends its leader (FOLLOW, ACK, REFUSE); anything else, or any
    field out of range, raises ProtocolError."""
    kind = _peek_kind(frames)
    header = frames[0]
    match kind:
        case Kind.FOLLOW:
            _check_frames(frames, 1, kind)
            if len(header) < _FOLLOW.size:
                raise ProtocolError(f"FOLLOW header of {len(header)} bytes, expected more")
            _, _, flags, id_len, shard, epoch, have_seq = _FOLLOW.unpack_from(header)
            _check_link(shard, epoch, kind)
            if flags & ~FOLLOW_RESUME:
                raise ProtocolError(f"FOLLOW: unknown flags 0x{flags:02x}")
            if id_len == 0 or len(header) != _FOLLOW.size + id_len:
                raise ProtocolError(
                    f"FOLLOW: id_len {id_len} with {len(header) - _FOLLOW.size} id bytes"
                )
            if not flags and have_seq:
                raise ProtocolError("FOLLOW: have_seq without flag RESUME")
            try:
                name = bytes(header[_FOLLOW.size :]).decode()
            except UnicodeDecodeError:
                raise ProtocolError("FOLLOW: follower id is not UTF-8") from None
            return Follow(shard, epoch, name, have_seq if flags else None)
        case Kind.ACK:
            _check_frames(frames, 1, kind)
            _check_size(header, _ACK.size, kind)
            _, _, flags, shard, epoch, seq, chunk = _ACK.unpack(header)
            _check_link(shard, epoch, kind)
            if flags & ~ACK_CHUNK:
                raise ProtocolError(f"ACK: unknown flags 0x{flags:02x}")
            if not flags and chunk:
                raise ProtocolError("ACK: chunk_no without flag CHUNK")
            return Ack(shard, epoch, seq, chunk if flags else None)
        case Kind.REFUSE:
            _check_frames(frames, 2, kind)
            _check_size(header, _REFUSE.size, kind)
            _, _, shard, epoch = _REFUSE.unpack(header)
            _check_link(shard, epoch, kind)
            text = frames[1]
            if len(text) > MAX_REFUSE_REASON_BYTES:
                raise ProtocolError(f"REFUSE: reason of {len(text)} bytes, at most 1024")
            try:
                reason = bytes(text).decode()
            except UnicodeDecodeError:
                raise ProtocolError("REFUSE: reason is not UTF-8") from None
            return Refuse(shard, epoch, reason)
    raise ProtocolError(f"a follower may not send {kind.name}")


def decode_to_follower(frames: Sequence[bytes]) -> ToFollower:
    """Parse what a leader sends a follower (SNAPSHOT, RECORDS); anything else, or any field
    out of range, raises ProtocolError. The body is returned as received, not parsed: the
    follower parses records with the log reader (workers/aof.py) before applying any."""
    kind = _peek_kind(frames)
    header = frames[0]
    match kind:
        case Kind.SNAPSHOT:
            _check_frames(frames, 2, kind)
            _check_size(header, _SNAPSHOT.size, kind)
            _, _, flags, shard, epoch, seq, chunk_no = _SNAPSHOT.unpack(header)
            _check_link(shard, epoch, kind)
            if flags & ~SNAPSHOT_LAST:
                raise ProtocolError(f"SNAPSHOT: unknown flags 0x{flags:02x}")
            body = frames[1]
            _check_snapshot_body(len(body), chunk_no)
            return SnapshotChunk(shard, epoch, seq, chunk_no, bool(flags), body)
        case Kind.RECORDS:
            _check_frames(frames, 2, kind)
            _check_size(header, _RECORDS.size, kind)
            _, _, shard, epoch, first_seq, count = _RECORDS.unpack(header)
            _check_link(shard, epoch, kind)
            body = frames[1]
            _check_records(first_seq, count, len(body))
            return Records(shard, epoch, first_seq, count, body)
    raise ProtocolError(f"a leader may not send {kind.name}")


def _check_link(shard: int, epoch: int, kind: Kind) -> None:
    if not 0 <= shard < NO_SHARD:
        raise ProtocolError(f"{kind.name}: shard {shard} out of range")
    if not 1 <= epoch <= U64_MAX:
        raise ProtocolError(f"{kind.name}: epoch {epoch} out of range (1..2**64-1)")


def _check_u64(value: int, what: str) -> None:
    if not 0 <= value <= U64_MAX:
        raise ProtocolError(f"{what} {value} out of range")


def _check_snapshot_body(size: int, chunk_no: int) -> None:
    if not 1 <= size <= MAX_SNAPSHOT_CHUNK_BYTES:
        raise ProtocolError(f"SNAPSHOT: chunk of {size} bytes, 1..{MAX_SNAPSHOT_CHUNK_BYTES}")
    if not 0 <= chunk_no <= 0xFFFF_FFFF:
        raise ProtocolError(f"SNAPSHOT: chunk_no {chunk_no} out of range")


def _check_records(first_seq: int, count: int, size: int) -> None:
    if count < 1 or count > 0xFFFF_FFFF or count > size // MIN_RECORD_BYTES:
        raise ProtocolError(f"RECORDS: count {count} for a body of {size} bytes")
    if first_seq < 1 or first_seq + count - 1 > U64_MAX:
        raise ProtocolError(f"RECORDS: batches {first_seq}+{count} out of range")
    if size > MAX_RECORDS_BYTES and (count != 1 or size > MAX_RECORD_BYTES):
        raise ProtocolError(
            f"RECORDS: body of {size} bytes in {count} batch(es): at most {MAX_RECORDS_BYTES}, "
            f"or one batch of at most {MAX_RECORD_BYTES}"
        )
