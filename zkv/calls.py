"""What the blocking and the asyncio clients share, without any I/O: the calls in flight.

Both clients do the same things between their sockets: pack each operation into a BATCH
record under a random request id, cut the records into BATCH messages small enough for the
broker, match REPLY and BATCH_REPLY messages to the calls still waiting, turn a status and a
body into a result or a :class:`ZkvError`, and decide from the clock when to send everything
unanswered again and when to give up. :class:`Calls` does all of that and nothing else: it
never touches a socket and never reads a clock (every method that needs the time takes
``now``), so its rules are tested with a fake clock and no sleeps, and the clients
(zkv/client.py, zkv/aio.py) are thin shells that move frames and wait.

Each call carries an opaque ``handle`` chosen by its client (a position in a pipeline's result
list, an asyncio future), handed back with its outcome as a :data:`Settled` pair, so the core
needs to know nothing of how a result reaches its caller.

Two timeout rules coexist because the clients promise different things: an asyncio call fails
``timeout_s`` after it was made (:meth:`Calls.expire`) and a queued one after
``connect_timeout_s`` without a connected broker (:meth:`Calls.stuck`); a pipeline fails
as a whole after ``timeout_s`` without any reply (:meth:`Calls.silent_s`) or
``connect_timeout_s`` of failed sends in a row (:meth:`Calls.unreachable_s`), so that a long
pipeline which keeps making progress never times out half-way.

A BUSY answer (the cluster shed the request to protect itself, and did not apply it) is not a
failure yet: the call is parked for a backoff (:func:`busy_backoff_s`) and then sent again with
the same request id, until its deadline (``timeout_s`` after it was made, for both kinds of
client). When the next resend would come after the deadline it fails, with :class:`Busy` (not
applied) if every attempt that left was answered BUSY, or with :class:`Timeout` (outcome
unknown) if an earlier attempt got no answer and was resent: that one may have been applied.
The clients wait for the parked calls with the timers they already have (:meth:`Calls.due_in`,
:meth:`Calls.next_resend_at`) and put them back in the queue with :meth:`Calls.unpark`.

A client given several brokers talks to one at a time and moves to the next when the current
one stays silent or cannot be reached, resending what is unanswered through it with the same
request ids and records: :class:`Brokers` decides, for both clients (section "several brokers").

Every SET and DEL is stamped with the wall-clock time it was made (flag STAMPED, see
zkv.protocol.stamp_of), read from an injected wall clock when the call is added: the stamp is
part of the call's record, packed once, so every resend of a request id carries the same one.
A worker refuses a stamped write older than its idempotency window that it does not remember
(a retry later than its memory reaches) with UNAVAILABLE "outcome unknown", which fails the
call with :class:`Timeout`, never applying it a second time.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from zkv import defaults
from zkv.config import endpoint_list
from zkv.errors import (
    Busy,
    Conflict,
    InvalidArgument,
    LockLost,
    PreconditionFailed,
    RequestError,
    StorageFull,
    Timeout,
    Unavailable,
    ZkvError,
)
from zkv.protocol import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPS,
    MAX_KEY_BYTES,
    MAX_LOCK_WAIT_MS,
    MAX_TTL_MS,
    OUTCOME_UNKNOWN,
    Answer,
    Kind,
    ProtocolError,
    Reply,
    Request,
    Status,
    batch_frames,
    batch_reply_answers,
    decode_old_item,
    decode_reply,
    pack_request,
    split_incr_body,
    split_token_body,
    split_versioned,
    stamp_of,
)

Op = tuple[int, bytes, Any, int | None]
"""One operation: ``(code, key, value, ttl_ms)``. Code GET, SET or DEL (the wire kinds, 1 to 3):
the plain operation, value bytes or None (the pipelines' hot path, packed as it always was).
A code from EXTENDED on (see "extended operations"): value is the operation's :data:`Spec`."""

RECENT_BATCHES = 4096  # batch ids remembered by default, to fail a whole batch the broker refused
# The wait before resending a call answered BUSY: BUSY_BACKOFF_MIN_S after the first BUSY,
# doubling with each BUSY in a row up to BUSY_BACKOFF_MAX_S, each wait drawn uniformly between
# half and all of that (jitter, so that clients shed together do not come back together).
BUSY_BACKOFF_MIN_S = 0.010
BUSY_BACKOFF_MAX_S = 0.500

_GET = int(Kind.GET)
_SET = int(Kind.SET)
_DEL = int(Kind.DEL)
_REPLY = int(Kind.REPLY)
_OK = int(Status.OK)
_NOT_FOUND = int(Status.NOT_FOUND)
_ERROR = int(Status.ERROR)
_BUSY = int(Status.BUSY)
_NO_SPACE = int(Status.NO_SPACE)
_UNAVAILABLE = int(Status.UNAVAILABLE)
_CONFLICT = int(Status.CONFLICT)
_PRECONDITION = int(Status.PRECONDITION)
_OUTCOME_UNKNOWN = OUTCOME_UNKNOWN.encode()
_NEVER = float("inf")


class NotFound(ZkvError, KeyError):
    """The key does not exist or has expired."""


@dataclass(frozen=True, slots=True)
class Item:
    """A stored value, its expiry (Unix milliseconds, None for never) and its version (a
    number that grows with every write of the key and is never reused for it: what
    ``if_version`` compares; 0 when the read did not ask for it, as a plain GET op does)."""

    value: bytes
    deadline_ms: int | None
    version: int = 0

    def __getattr__(self, name: str) -> Any:
        # Only reached when a slot is unset: an Item of a plain GET (new_item) leaves its
        # version slot empty, which reads as the default 0 (see new_item).
        if name == "version":
            return 0
        raise AttributeError(name)


# An Item without its frozen dataclass __init__, which sets each field through
# object.__setattr__: 0.55 us an Item, a third of what receive spent on a pipelined GET. The
# slots' own descriptors set the fields in C, for under half that; the Item is the same. A
# plain GET's Item leaves its version slot unset (read as 0 through Item.__getattr__): setting
# it cost the pipelined GET 0.05 us more (4% of the client's part; measured with
# a micro-benchmark of Calls.add_many + receive, see the commit).
_new_object = object.__new__
_set_value = Item.value.__set__  # type: ignore[attr-defined]
_set_deadline_ms = Item.deadline_ms.__set__  # type: ignore[attr-defined]
_set_version = Item.version.__set__  # type: ignore[attr-defined]


def new_item(value: bytes, deadline_ms: int | None) -> Item:
    """``Item(value, deadline_ms)``, made faster (a plain GET's result, one per operation)."""
    item = _new_object(Item)
    _set_value(item, value)
    _set_deadline_ms(item, deadline_ms)
    return item


def new_versioned_item(value: bytes, deadline_ms: int | None, version: int) -> Item:
    """``Item(value, deadline_ms, version)``, made faster (a versioned GET's result)."""
    item = _new_object(Item)
    _set_value(item, value)
    _set_deadline_ms(item, deadline_ms)
    _set_version(item, version)
    return item


# --- arguments and results ---------------------------------------------------------------------


def as_bytes(data: bytes | str, what: str) -> bytes:
    """A key or value as bytes (str as UTF-8); TypeError for anything else, naming ``what``."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")


def ttl_to_ms(ttl_s: float | None) -> int | None:
    """A time to live in whole milliseconds, at least 1 (a positive TTL under half a
    millisecond is rounded up to the wire's resolution, not down to "expired").

    Raises:
        RequestError: ``ttl_s`` is zero, negative, NaN or infinite (None means "never"), as
            the broker refuses a TTL over MAX_TTL_MS: the request is wrong, retrying cannot
            help. It used to become 1 ms, a value gone before anyone could read it.
    """
    return seconds_to_ms(ttl_s, "ttl_s")


def seconds_to_ms(seconds: float | None, name: str) -> int | None:
    """:func:`ttl_to_ms` for the argument called ``name`` (ttl_s, touch_s), named in errors
    (InvalidArgument, a RequestError and a ValueError; TypeError for what is not a number)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(seconds).__name__}")
    if not 0 < seconds < _NEVER:  # NaN fails both comparisons
        raise InvalidArgument(
            f"{name} must be a positive, finite number of seconds, got {seconds!r}"
        )
    if seconds * 1000 > MAX_TTL_MS:
        raise InvalidArgument(
            f"{name} must be at most {MAX_TTL_MS // 1000} seconds, got {seconds!r}"
        )
    return max(1, round(seconds * 1000))


def frontend(endpoint: str | None) -> str:
    """The broker's frontend to use: ``endpoint``, else ``$ZKV_FRONTEND``, else the default
    (so one environment variable moves every client of a deployment)."""
    return endpoint or os.environ.get("ZKV_FRONTEND") or defaults.FRONTEND


def frontends(endpoint: str | Sequence[str] | None) -> tuple[str, ...]:
    """The brokers' frontends to use (:func:`frontend`): one endpoint, a comma-separated list
    of them, or a sequence of endpoints; each checked by its form (zkv.config.endpoint_list).

    Raises:
        ValueError: an entry is empty, malformed or listed twice (the message names it), or
            more than MAX_FRONTENDS are given.
    """
    if endpoint is not None and not isinstance(endpoint, str):
        endpoint = ",".join(endpoint)
    text = frontend(endpoint)
    try:
        return tuple(endpoint_list(text))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"frontend: {exc}") from None


def checked_batch_ops(batch_ops: int) -> int:
    """``batch_ops`` if the protocol allows that many operations in one BATCH, else ValueError
    (at construction, rather than a refused batch at the first send)."""
    if not 1 <= batch_ops <= MAX_BATCH_OPS:
        raise ValueError(f"batch_ops must be between 1 and {MAX_BATCH_OPS}, got {batch_ops}")
    return batch_ops


# --- request ids -------------------------------------------------------------------------------
#
# Request ids come from the kernel (os.urandom), never from a seeded generator: a random.Random
# seeded once is copied into every child forked from its process, and children that draw the
# same ids have their writes taken for retries of each other's (a second child's DEL answered
# from a worker's memory, never applied). The kernel's generator is not copied by fork.
#
# One urandom call per id costs about 0.6 us (a system call), so ids are drawn in bulk: a
# pipeline takes the ids of a whole chunk of operations in one call (8 bytes each, about 40 ns an
# id with the list, against 38 ns for random.getrandbits(64) before; measured on the reference
# machine), and calls made one at a time take theirs from a pool of ID_POOL_IDS ids, shared by
# every client of the process, which a fork empties in the child (os.register_at_fork), so a
# child never draws an id its parent drew or will draw. list.pop and list.extend are atomic, so
# threads can share the pool: each id popped is popped once.

ID_POOL_IDS = 512  # ids drawn at once for the pool (4 KiB from os.urandom)
BULK_IDS = 16  # from this many ids on, new_ids draws them directly instead of from the pool

_id_pool: list[int] = []
os.register_at_fork(after_in_child=_id_pool.clear)


def random_ids(count: int) -> list[int]:
    """``count`` random 64-bit ids from os.urandom; never 0, which the protocol reserves."""
    ids = array("Q", os.urandom(8 * count)).tolist()  # "Q" is 8 bytes wherever CPython runs
    if 0 in ids:  # a 2**-64 event per id, checked in C
        ids = [rid or 1 for rid in ids]
    return ids


def new_id() -> int:
    """A fresh random request or batch id (from the pool; see above)."""
    try:
        return _id_pool.pop()
    except IndexError:
        _id_pool.extend(random_ids(ID_POOL_IDS))
        return _id_pool.pop()


def new_ids(count: int) -> list[int]:
    """``count`` fresh random request ids: the default id source of :class:`Calls`."""
    if count >= BULK_IDS:
        return random_ids(count)
    return [new_id() for _ in range(count)]


def pack(op: Op, request_id: int, stamp: int | None = None) -> bytes:
    """The BATCH record of ``op`` (a SET or DEL stamped with ``stamp``, Unix seconds, if
    given); RequestError for one the broker would refuse (so it is refused here, without a
    round trip)."""
    kind, key, value, ttl = op
    if kind >= EXTENDED:
        return pack_ext(op, request_id, stamp)
    try:
        return pack_request(kind, request_id, key, value, ttl, stamp)
    except ProtocolError as exc:
        raise RequestError(str(exc)) from None


def cut(records: Sequence[bytes], max_ops: int) -> int:
    """How many of ``records``, from the first, go in one BATCH: at most ``max_ops``, and no
    more than half of MAX_BATCH_BYTES unless the first alone is larger (half, so that the
    replies, which carry values, are likely to fit in a broker's reply too)."""
    limit = MAX_BATCH_BYTES // 2
    end = min(len(records), max_ops)
    if sum(map(len, records[:end])) <= limit:  # the common case, summed in C
        return end
    size = 0
    for index in range(end):
        size += len(records[index])
        if size > limit and index:
            return index
    return end


def replies(frames: Sequence[bytes]) -> list[Answer]:
    """The replies a REPLY or a BATCH_REPLY carries, as :data:`zkv.protocol.Answer` tuples.

    Raises:
        ProtocolError: the message is malformed.
    """
    if frames and len(frames[0]) > 1 and frames[0][1] == _REPLY:
        reply = decode_reply(frames)
        return [(reply.status, reply.request_id, reply.deadline_ms, reply.body)]
    return batch_reply_answers(frames)


def error(status: int, body: bytes | None, deadline_ms: int | None = None) -> ZkvError:
    """The error of a failed status: RequestError for ERROR (retrying cannot help), Busy for
    BUSY (not applied; the cluster shed load), StorageFull for NO_SPACE (not applied; the disk
    is full), PreconditionFailed for PRECONDITION and Conflict for CONFLICT (refused, nothing
    changed; a Conflict carries the reply's ``deadline_ms``, a lock holder's expiry), Timeout
    for UNAVAILABLE with a body starting "outcome unknown" (a worker refused a retry later than
    its idempotency window: an earlier attempt may have been applied), Unavailable otherwise
    (the cluster could not serve it now)."""
    message = (body or b"").decode(errors="replace")
    if status == _ERROR:
        return RequestError(message)
    if status == _BUSY:
        return Busy(message)
    if status == _NO_SPACE:
        return StorageFull(message)
    if status == _PRECONDITION:
        return PreconditionFailed(message or "precondition failed")
    if status == _CONFLICT:
        return Conflict(message or "conflict", deadline_ms)
    if status == _UNAVAILABLE and body is not None and body.startswith(_OUTCOME_UNKNOWN):
        return Timeout(message)
    return Unavailable(message)


def outcome(kind: int, status: int, deadline_ms: int | None, body: bytes | None) -> Any:
    """The result of an operation from its reply, or the error it failed with (returned, not
    raised: a pipeline keeps it in its operation's place). ``kind`` is the operation's code.

    GET: an :class:`Item`, None if missing. SET: the deadline (Unix ms, None for never).
    DEL: whether a live key was removed. The extended codes: see :data:`RESULTS`. A reply
    whose body does not read as its code's is a :class:`ZkvError` (never a crash).
    """
    if status == _OK:
        if kind == _GET:
            return new_item(body or b"", deadline_ms)
        if kind < EXTENDED:
            return deadline_ms if kind == _SET else True
        read = _READ_OK.get(kind)
        if read is None:
            return ZkvError(f"reply to an unknown operation code {kind}")
        try:
            return read(deadline_ms, body or b"")
        except (ProtocolError, ValueError, TypeError) as exc:
            return ZkvError(f"malformed reply to {_NAMES[kind]}: {exc}")
    if status == _NOT_FOUND:
        if kind == _GET:
            return None
        if kind < EXTENDED:
            return False
        return _NOT_FOUND_RESULT.get(kind, _UNEXPECTED_NOT_FOUND)(kind)
    if status == _CONFLICT and kind == C_FENCE_CHECK:
        return False  # the answer "not the newest token", not a failure
    return error(status, body, deadline_ms)


def check(reply: Reply) -> Reply:
    """``reply`` if it succeeded (OK or NOT_FOUND); else raise its :func:`error`."""
    if reply.status != Status.OK and reply.status != Status.NOT_FOUND:
        raise error(reply.status, reply.body, reply.deadline_ms)
    return reply


# --- extended operations --------------------------------------------------------------------
#
# GET, SET and DEL without options travel as they always did: an Op (code, key, value, ttl_ms)
# packed by zkv.protocol.pack_request's fast path, read by the few lines of Calls.receive, the
# pipelines' hot path, untouched. Everything else (versioned and touching GETs, conditional,
# fenced and versioned writes, INCR, EXPIRE, locks) is an Op whose code is EXTENDED or more:
# its third field is a Spec, the zkv.protocol.Request fields the operation sets, packed by
# pack_ext through zkv.protocol (the only module that builds frames), and its code says how
# outcome() reads the reply (RESULTS). The pipelines take the general loop only when they hold
# an extended op (Calls.add_many's ``plain``), so a pipeline of plain ops pays nothing for them.

Spec = tuple[int, bytes | None, dict[str, Any]]
"""An extended operation's ``(kind, value, extra)``: its wire kind, its value (SET's, else
None) and its zkv.protocol.RequestExtra (the Request fields of issue 12 it sets: ``nx``,
``xx``, ``if_version``, ``fence``, ``versioned``, ``return_old``, ``by``, ``token``,
``wait_ms``, ``keys_only``), as zkv.protocol.pack_request takes them."""

EXTENDED = 0x100  # the first code of an extended operation (wire kinds are one byte)
C_GET = 0x101  # GET VERSIONED (TTL: touch): Item with its version; None if missing
C_META = 0x102  # GET VERSIONED KEYS_ONLY: Item(b"", deadline, version); None if missing
C_SET = 0x103  # SET with NX/XX/IF_VERSION/FENCE: the deadline
C_PUT = 0x104  # SET VERSIONED: (version, deadline_ms)
C_SET_OLD = 0x105  # SET RETURN_OLD: the previous Item, None if there was none
C_DEL = 0x106  # DEL with IF_VERSION/FENCE: whether a live key was removed
C_INCR = 0x107  # INCR: the new value
C_INCR_ITEM = 0x108  # INCR: (value, version, deadline_ms)
C_EXPIRE = 0x109  # EXPIRE with TTL: the new deadline; None if missing
C_PERSIST = 0x10A  # EXPIRE without TTL, VERSIONED: the key's new version; None if missing
C_LOCK = 0x10B  # LOCK: (token, expires_at_ms)
C_REFRESH = 0x10C  # REFRESH: the new expires_at_ms
C_UNLOCK = 0x10D  # UNLOCK: None
C_FENCE_CHECK = 0x10E  # FENCE_CHECK: whether the token is the lock's newest

RESULTS = {
    C_GET: "Item (with version) or None",
    C_META: "Item without value (with version) or None",
    C_SET: "deadline_ms",
    C_PUT: "(version, deadline_ms)",
    C_SET_OLD: "previous Item or None",
    C_DEL: "bool",
    C_INCR: "int",
    C_INCR_ITEM: "(value, version, deadline_ms)",
    C_EXPIRE: "deadline_ms or None",
    C_PERSIST: "version or None",
    C_LOCK: "(token, expires_at_ms)",
    C_REFRESH: "expires_at_ms",
    C_UNLOCK: "None",
    C_FENCE_CHECK: "bool",
}
"""What :func:`outcome` gives for an OK (or NOT_FOUND) reply to each extended code."""

_NAMES = {
    C_GET: "GET",
    C_META: "GET",
    C_SET: "SET",
    C_PUT: "SET",
    C_SET_OLD: "SET",
    C_DEL: "DEL",
    C_INCR: "INCR",
    C_INCR_ITEM: "INCR",
    C_EXPIRE: "EXPIRE",
    C_PERSIST: "EXPIRE",
    C_LOCK: "LOCK",
    C_REFRESH: "REFRESH",
    C_UNLOCK: "UNLOCK",
    C_FENCE_CHECK: "FENCE_CHECK",
}


def _read_get(deadline_ms: int | None, body: bytes) -> Item:
    version, value = split_versioned(body)
    return new_versioned_item(value, deadline_ms, version)


def _read_meta(deadline_ms: int | None, body: bytes) -> Item:
    return new_versioned_item(b"", deadline_ms, split_versioned(body)[0])


def _read_put(deadline_ms: int | None, body: bytes) -> tuple[int, int | None]:
    return split_versioned(body)[0], deadline_ms


def _read_old(deadline_ms: int | None, body: bytes) -> Item | None:
    _, old = decode_old_item(body)
    if old is None:
        return None
    old_version, old_deadline, old_value = old
    return new_versioned_item(old_value, old_deadline or None, old_version)


def _read_incr(deadline_ms: int | None, body: bytes) -> int:
    return split_incr_body(body)[1]


def _read_incr_item(deadline_ms: int | None, body: bytes) -> tuple[int, int, int | None]:
    version, value = split_incr_body(body)
    return value, version, deadline_ms


def _read_lock(deadline_ms: int | None, body: bytes) -> tuple[int, int]:
    token = split_token_body(body)
    if not token or deadline_ms is None:
        raise ValueError(f"token {token}, expiry {deadline_ms}")
    return token, deadline_ms


def _read_refresh(deadline_ms: int | None, body: bytes) -> int:
    if deadline_ms is None:
        raise ValueError("no expiry")
    return deadline_ms


_READ_OK: dict[int, Callable[[int | None, bytes], Any]] = {
    C_GET: _read_get,
    C_META: _read_meta,
    C_SET: lambda deadline_ms, body: deadline_ms,
    C_PUT: _read_put,
    C_SET_OLD: _read_old,
    C_DEL: lambda deadline_ms, body: True,
    C_INCR: _read_incr,
    C_INCR_ITEM: _read_incr_item,
    C_EXPIRE: lambda deadline_ms, body: deadline_ms,
    C_PERSIST: lambda deadline_ms, body: split_versioned(body)[0],
    C_LOCK: _read_lock,
    C_REFRESH: _read_refresh,
    C_UNLOCK: lambda deadline_ms, body: None,
    C_FENCE_CHECK: lambda deadline_ms, body: True,
}


def _not_held(kind: int) -> Conflict:
    return Conflict("the lock is not held with this token (no such lock)")


def _UNEXPECTED_NOT_FOUND(kind: int) -> ZkvError:  # noqa: N802 (a constant's role)
    return ZkvError(f"unexpected NOT_FOUND reply to {_NAMES.get(kind, kind)}")


_NOT_FOUND_RESULT: dict[int, Callable[[int], Any]] = {
    C_GET: lambda kind: None,
    C_META: lambda kind: None,
    C_DEL: lambda kind: False,
    C_EXPIRE: lambda kind: None,
    C_PERSIST: lambda kind: None,
    C_REFRESH: _not_held,
    C_UNLOCK: _not_held,
    C_FENCE_CHECK: lambda kind: False,
}


def request_of(op: Op, request_id: int = 0, stamp: int | None = None) -> Request:
    """The single :class:`zkv.protocol.Request` of an operation (request id 0 by default: a
    client puts its own, and the first-send stamp, which a read drops)."""
    code, key, value, ttl_ms = op
    if code < EXTENDED:
        if code == _SET:
            return Request(Kind.SET, request_id, key, value, ttl_ms, stamp=stamp)
        return Request(Kind(code), request_id, key, stamp=stamp)
    kind, data, extra = value
    return Request(Kind(kind), request_id, key, data, ttl_ms, stamp=stamp, **extra)


def pack_ext(op: Op, request_id: int, stamp: int | None) -> bytes:
    """The BATCH record of an extended ``op`` (a write stamped with ``stamp``: protocol drops
    it from a read); RequestError for one the broker would refuse, as :func:`pack`."""
    _, key, (kind, value, extra), ttl_ms = op
    try:
        return pack_request(kind, request_id, key, value, ttl_ms, stamp, extra)  # type: ignore[arg-type]
    except ProtocolError as exc:
        raise RequestError(str(exc)) from None


# --- arguments of the extended operations ----------------------------------------------------

MAX_U64 = 2**64 - 1
MIN_I64 = -(2**63)
MAX_I64 = 2**63 - 1


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def check_version(version: Any, name: str = "if_version") -> int:
    """A version argument: an int from 0 to 2**64 - 1 (TypeError, InvalidArgument)."""
    version = _integer(version, name)
    if not 0 <= version <= MAX_U64:
        raise InvalidArgument(f"{name} must be between 0 and 2**64 - 1, got {version}")
    return version


def check_token(token: Any, name: str = "token") -> int:
    """A lock token: an int from 1 to 2**64 - 1 (TypeError, InvalidArgument)."""
    token = _integer(token, name)
    if not 1 <= token <= MAX_U64:
        raise InvalidArgument(f"{name} must be between 1 and 2**64 - 1, got {token}")
    return token


def check_by(by: Any) -> int:
    """An increment: an int within signed 64 bits (TypeError, InvalidArgument)."""
    by = _integer(by, "by")
    if not MIN_I64 <= by <= MAX_I64:
        raise InvalidArgument(f"by must be within signed 64 bits (-2**63 to 2**63 - 1), got {by}")
    return by


def wait_to_ms(wait_s: Any) -> int:
    """A lock wait in whole milliseconds: 0 (do not wait) to MAX_LOCK_WAIT_MS."""
    if isinstance(wait_s, bool) or not isinstance(wait_s, int | float):
        raise TypeError(f"wait_s must be a number of seconds, not {type(wait_s).__name__}")
    if not 0 <= wait_s * 1000 <= MAX_LOCK_WAIT_MS:  # NaN fails too
        raise InvalidArgument(
            f"wait_s must be between 0 and {MAX_LOCK_WAIT_MS // 1000} seconds, got {wait_s!r}"
        )
    return round(wait_s * 1000)


def lock_name(name: bytes | str) -> bytes:
    """A lock's name as bytes: 1 to MAX_KEY_BYTES bytes, not starting with NUL (reserved)."""
    data = as_bytes(name, "name")
    if not data or len(data) > MAX_KEY_BYTES:
        raise InvalidArgument(f"name must be 1 to {MAX_KEY_BYTES} bytes, got {len(data)}")
    if data[0] == 0:
        raise InvalidArgument("name must not start with a NUL byte (reserved)")
    return data


def fence_of(fence: Any) -> tuple[bytes, int] | None:
    """The ``(lock name, token)`` of a ``fence=`` argument: a :class:`Lock`, a ``(name,
    token)`` pair, or None."""
    if fence is None:
        return None
    if isinstance(fence, Lock):
        return fence.name, fence.token
    if isinstance(fence, tuple) and len(fence) == 2:
        return lock_name(fence[0]), check_token(fence[1], "fence token")
    raise TypeError(f"fence must be a Lock or a (name, token) pair, not {type(fence).__name__}")


def get_op(key: bytes | str, touch_s: float | None = None) -> Op:
    """A GET that reads the version too (and with ``touch_s``, moves the deadline)."""
    spec: Spec = (_GET, None, {"versioned": True})
    return (C_GET, as_bytes(key, "key"), spec, seconds_to_ms(touch_s, "touch_s"))


def meta_op(key: bytes | str) -> Op:
    """A GET of the deadline and version only (``ttl_ms``)."""
    spec: Spec = (_GET, None, {"versioned": True, "keys_only": True})
    return (C_META, as_bytes(key, "key"), spec, None)


def set_op(
    key: bytes | str,
    value: bytes | str,
    ttl_s: float | None = None,
    nx: bool = False,
    xx: bool = False,
    if_version: int | None = None,
    get: bool = False,
    fence: Any = None,
    versioned: bool = False,
) -> Op:
    """A SET, plain when it has no option (the hot path), else extended: C_SET_OLD with
    ``get``, C_PUT with ``versioned``, C_SET otherwise."""
    key_bytes = as_bytes(key, "key")
    value_bytes = as_bytes(value, "value")
    ttl_ms = ttl_to_ms(ttl_s)
    if nx and xx:
        raise InvalidArgument("nx and xx cannot both be set (absent and present)")
    if nx and if_version is not None:
        raise InvalidArgument("nx and if_version cannot both be set (absent and a version)")
    if get and versioned:
        raise InvalidArgument("get and versioned cannot both be set")
    fence_pair = fence_of(fence)
    if not (nx or xx or get or versioned or if_version is not None or fence_pair):
        return (_SET, key_bytes, value_bytes, ttl_ms)
    extra: dict[str, Any] = {}
    if nx:
        extra["nx"] = True
    if xx:
        extra["xx"] = True
    if if_version is not None:
        extra["if_version"] = check_version(if_version)
    if fence_pair:
        extra["fence"] = fence_pair
    code = C_SET
    if get:
        extra["return_old"] = True
        code = C_SET_OLD
    elif versioned:
        extra["versioned"] = True
        code = C_PUT
    return (code, key_bytes, (_SET, value_bytes, extra), ttl_ms)


def delete_op(key: bytes | str, if_version: int | None = None, fence: Any = None) -> Op:
    """A DEL, plain without options."""
    key_bytes = as_bytes(key, "key")
    fence_pair = fence_of(fence)
    if if_version is None and fence_pair is None:
        return (_DEL, key_bytes, None, None)
    extra: dict[str, Any] = {}
    if if_version is not None:
        extra["if_version"] = check_version(if_version)
    if fence_pair:
        extra["fence"] = fence_pair
    return (C_DEL, key_bytes, (_DEL, None, extra), None)


def incr_op(
    key: bytes | str, by: int = 1, ttl_s: float | None = None, fence: Any = None, item: bool = False
) -> Op:
    """An INCR (C_INCR_ITEM with ``item``: value, version and deadline)."""
    extra: dict[str, Any] = {"by": check_by(by)}
    fence_pair = fence_of(fence)
    if fence_pair:
        extra["fence"] = fence_pair
    spec: Spec = (int(Kind.INCR), None, extra)
    return (C_INCR_ITEM if item else C_INCR, as_bytes(key, "key"), spec, ttl_to_ms(ttl_s))


def expire_op(key: bytes | str, ttl_s: float, fence: Any = None) -> Op:
    """An EXPIRE: a new deadline ``ttl_s`` from now (None is refused: that is persist);
    fenced like a SET if ``fence`` is given (EXT with FENCE on the wire)."""
    if ttl_s is None:
        raise InvalidArgument("ttl_s must be a number of seconds (persist() removes a deadline)")
    spec: Spec = (int(Kind.EXPIRE), None, _fenced({}, fence))
    return (C_EXPIRE, as_bytes(key, "key"), spec, ttl_to_ms(ttl_s))


def persist_op(key: bytes | str, fence: Any = None) -> Op:
    """An EXPIRE without TTL: no deadline any more; the reply carries the new version.
    Fenced like a SET if ``fence`` is given."""
    spec: Spec = (int(Kind.EXPIRE), None, _fenced({"versioned": True}, fence))
    return (C_PERSIST, as_bytes(key, "key"), spec, None)


def _fenced(extra: dict[str, Any], fence: Any) -> dict[str, Any]:
    """``extra`` with the ``fence`` pair of a ``fence=`` argument, if one is given."""
    fence_pair = fence_of(fence)
    if fence_pair:
        extra["fence"] = fence_pair
    return extra


def lock_op(name: bytes | str, ttl_s: float, wait_s: float = 0) -> Op:
    """A LOCK for ``ttl_s`` seconds, waiting up to ``wait_s`` in the broker's queue."""
    if ttl_s is None:
        raise InvalidArgument("ttl_s is required for a lock (it frees itself when it lapses)")
    spec: Spec = (int(Kind.LOCK), None, {"wait_ms": wait_to_ms(wait_s)})
    return (C_LOCK, lock_name(name), spec, ttl_to_ms(ttl_s))


def refresh_op(name: bytes | str, token: int, ttl_s: float) -> Op:
    """A REFRESH: the lock held with ``token`` expires ``ttl_s`` from now."""
    if ttl_s is None:
        raise InvalidArgument("ttl_s is required to refresh a lock")
    spec: Spec = (int(Kind.REFRESH), None, {"token": check_token(token)})
    return (C_REFRESH, lock_name(name), spec, ttl_to_ms(ttl_s))


def unlock_op(name: bytes | str, token: int) -> Op:
    """An UNLOCK of the lock held with ``token``."""
    spec: Spec = (int(Kind.UNLOCK), None, {"token": check_token(token)})
    return (C_UNLOCK, lock_name(name), spec, None)


def fence_check_op(name: bytes | str, token: int) -> Op:
    """A FENCE_CHECK: is ``token`` the newest ever issued for the lock?"""
    spec: Spec = (int(Kind.FENCE_CHECK), None, {"token": check_token(token)})
    return (C_FENCE_CHECK, lock_name(name), spec, None)


def fence_of_op(op: Op) -> tuple[bytes, int] | None:
    """The fence an operation carries (checked with FENCE_CHECK before it is sent)."""
    if op[0] < EXTENDED:
        return None
    return op[2][2].get("fence")


def stale_fence(fence: tuple[bytes, int]) -> Conflict:
    """The error of a fenced write whose pre-check (FENCE_CHECK) failed: not sent."""
    name, token = fence
    return Conflict(
        f'fence token {token} of lock "{name.decode(errors="backslashreplace")}" is not the '
        "lock's newest token (never issued, or the lock was taken again since): not written"
    )


def remaining_ms(deadline_ms: int | None, now_ms: int | None = None) -> int | None:
    """Milliseconds from ``now_ms`` (default: this machine's clock) to ``deadline_ms``, at
    least 0; None for no deadline."""
    if deadline_ms is None:
        return None
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    return max(0, deadline_ms - now_ms)


def op_wait_s(op: Op) -> float:
    """How long the broker may hold ``op`` before answering (a LOCK's wait), in seconds: the
    clients allow that much more silence and time for it."""
    if op[0] == C_LOCK:
        return op[2][2]["wait_ms"] / 1000
    return 0.0


# --- locks -----------------------------------------------------------------------------------
#
# A lock is taken with LOCK (the broker queues waiters, FIFO), kept with REFRESH, released with
# UNLOCK; its token is the lock record's version, so it grows with every acquisition, across
# restarts and failovers: a fencing token. ``kv.lock(...)`` wraps the three in a context
# manager; with refresh=True a background thread (sync) or task (asyncio) refreshes the hold
# every ttl / REFRESH_SHARE, as the Refresher below decides (no I/O, no clock of its own).
#
# How a failed refresh surfaces: a refusal (CONFLICT: the token is no longer the lock's, it
# lapsed and someone else took it) marks the lock lost at once; any other failure (timeout,
# broker unreachable) is retried every REFRESH_RETRY_S until the hold's expiry, then marks it
# lost. Lost means: ``lock.lost`` is True, ``lock.error`` is a LockLost, ``lock.check()``
# raises it, the refresher stops, and the ``with`` block raises it when it ends (unless the
# block raised something else, which is never masked). Writes fenced with the lock are refused
# by the store anyway once a newer token exists: the fence, not the refresh, is the safety net.

REFRESH_SHARE = 3  # a held lock is refreshed every ttl / 3
REFRESH_RETRY_S = 0.25  # a refresh that failed (not refused) is tried again this soon


@dataclass(eq=False, slots=True)
class Lock:
    """A lock held: its name, its fencing token, and when the hold expires (Unix ms).

    Attributes:
        error: None while the hold is kept; a :class:`LockLost` once a background refresh
            found it lost (see the block comment above).
    """

    name: bytes
    token: int
    expires_at_ms: int
    error: ZkvError | None = None

    @property
    def lost(self) -> bool:
        """Whether the background refresh found the lock lost."""
        return self.error is not None

    def check(self) -> None:
        """Raise :class:`LockLost` if the background refresh found the lock lost."""
        if self.error is not None:
            raise self.error


class Refresher:
    """When a held lock's background refresh runs next, and what a failure means (see the
    block comment above). No I/O: the thread or task that owns it does the REFRESH calls.

    Args:
        lock: the lock held.
        ttl_s: the hold each refresh asks for.
        now: the monotonic clock at acquisition.
    """

    def __init__(self, lock: Lock, ttl_s: float, now: float) -> None:
        self.lock = lock
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / REFRESH_SHARE
        self.next_at = now + self.interval_s
        self.refreshes = 0

    def due_in(self, now: float) -> float:
        """Seconds until the next refresh (<= 0: now)."""
        return self.next_at - now

    def refreshed(self, expires_at_ms: int, now: float) -> None:
        """A refresh succeeded: the hold now expires at ``expires_at_ms``."""
        self.lock.expires_at_ms = expires_at_ms
        self.refreshes += 1
        self.next_at = now + self.interval_s

    def failed(self, err: BaseException, now: float, wall_ms: int) -> bool:
        """A refresh failed with ``err``; returns whether to go on (False: the lock is lost,
        ``lock.error`` says why)."""
        lock = self.lock
        name = lock.name.decode(errors="replace")
        if isinstance(err, Conflict):
            lock.error = LockLost(f"lock {name!r} lost (token {lock.token}): {err}")
            return False
        if wall_ms >= lock.expires_at_ms:
            lock.error = LockLost(
                f"lock {name!r} lost (token {lock.token}): not refreshed before it expired "
                f"({type(err).__name__}: {err})"
            )
            return False
        self.next_at = now + min(self.interval_s, REFRESH_RETRY_S)
        return True


def busy_backoff_s(answers: int, jitter: float) -> float:
    """Seconds to wait before resending a call answered BUSY ``answers`` times in a row
    (``jitter`` uniform in [0, 1)): see BUSY_BACKOFF_MIN_S."""
    ceiling = min(BUSY_BACKOFF_MAX_S, BUSY_BACKOFF_MIN_S * 2 ** min(answers - 1, 32))
    return ceiling * (0.5 + jitter / 2)


def busy_gave_up(
    body: bytes | None, answers: int, elapsed_s: float, maybe_applied: bool
) -> ZkvError:
    """The error of a call given up after BUSY answers: :class:`Busy` (not applied) if every
    attempt that left was answered BUSY, else :class:`Timeout` (an attempt that got no answer
    may have been applied)."""
    message = (body or b"").decode(errors="replace") or "cluster busy"
    tried = f"answered BUSY {answers} time(s) in {elapsed_s:.1f} s"
    if maybe_applied:
        return Timeout(f"{message} ({tried}, after an attempt without answer); outcome unknown")
    return Busy(f"{message} ({tried}); not applied")


def gave_up(message: str, sent: bool) -> ZkvError:
    """The error of a call given up: Timeout if it ever left (it may have been applied, so the
    outcome is unknown), Unavailable if it never did."""
    return Timeout(f"{message}; outcome unknown") if sent else Unavailable(message)


# --- several brokers -------------------------------------------------------------------------
#
# A client may be given several brokers (ZKV_FRONTEND=tcp://a:5555,tcp://b:5555), each a way
# into the same cluster. :class:`Brokers` decides which one a request goes to and when to move
# on; the blocking client's single requests and pipelines and the asyncio client (so the
# gateway too) all follow it, and only it.
#
# One broker at a time: every request goes to the current broker, through one DEALER
# connected to it alone (a DEALER connected to several brokers deals its messages round-robin
# and cannot be told to resend through another one). The first current broker is drawn at
# random, so the clients of a deployment spread over the brokers, and a client stays with its
# broker as long as it answers: its requests keep the order it sent them in (a pipeline's SET
# then GET of one key is answered in that order: a broker keeps one client socket's order per
# key, two brokers would not), and it pays for one connection, not one per broker. Spreading
# one client's batches over several brokers could not be measured against this yet (workers
# serve one broker until cluster mode), and it would give up that order: not done.
#
# When the current broker gives no answer at all for the resend interval while requests are
# out (the rule of Calls.resend_due: counted from the first request sent since its last
# answer), or cannot be reached (a send refused because the socket, given UNSENDABLE_GRACE_S
# to connect, is not connected), it is marked failed: avoided for a back-off of
# BROKER_BACKOFF_MIN_S, doubling with each failure in a row up to BROKER_BACKOFF_MAX_S (an
# answer resets the count), and the next broker of the list that is not avoided becomes
# current (if all are, the one whose back-off ends first). Everything
# unanswered is sent to it again, with the same request ids and the same records (so the same
# first-send stamps): a write that the failed broker did get through is answered from the
# worker's idempotency memory, not applied twice. The failed broker's socket is closed, which
# drops what it still queued and any reply it would send late (a reply to a call already
# answered is dropped anyway: Calls.receive ignores ids it no longer waits for).
#
# The resend interval, with several brokers: min(attempt_s, timeout_s / RESEND_SHARE), so that
# a request's timeout leaves room for RESEND_SHARE brokers, times a factor drawn uniformly in
# [1 - RESEND_JITTER, 1] at each move (clients left by one broker do not all give up on the
# next at the same instant). With 5 s timeouts and 1 s attempts: 0.75 to 1 s. With one broker
# nothing changes: attempt_s, and a resend on a fresh socket to the same broker.

BROKER_BACKOFF_MIN_S = 1.0  # a failed broker is avoided this long after one failure,
BROKER_BACKOFF_MAX_S = 30.0  # doubling with each failure in a row, up to this
RESEND_SHARE = 3  # with several brokers, the resend interval is at most timeout_s / 3
RESEND_JITTER = 0.25  # ... times a factor drawn in [0.75, 1] at each move
UNSENDABLE_GRACE_S = 0.1  # a socket this young that cannot send is connecting, not failed


class Brokers:
    """Which of a client's brokers gets its requests, and when to move to another (see the
    block comment above). No I/O and no clock: every method that needs the time takes ``now``.

    Args:
        endpoints: the brokers' frontends, at least one.
        attempt_s: the client's wait for an answer before resending.
        timeout_s: the client's timeout of a request.
        first: which broker is current at first; None: one at random.
        jitter: uniform in [0, 1), for the resend interval (tests pass a constant).

    Attributes:
        current: the index of the broker requests go to.
        resend_s: the resend interval (see above).
        moves: how many times the client moved to another broker (for statistics).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        attempt_s: float,
        timeout_s: float,
        first: int | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one broker endpoint is needed")
        self.endpoints = tuple(endpoints)
        count = len(self.endpoints)
        self.several = count > 1
        self.description = ",".join(self.endpoints)  # for messages: as ZKV_FRONTEND says it
        self.current = random.randrange(count) if first is None else first % count
        self._attempt_s = attempt_s
        self._interval_s = min(attempt_s, timeout_s / RESEND_SHARE)
        self._jitter = jitter
        self._failures = [0] * count  # failures in a row, per broker
        self._avoid_until = [-_NEVER] * count  # monotonic time, per broker
        self._opened_at = -_NEVER  # when the client's socket to the current broker was made
        self.moves = 0
        self.resend_s = self._draw()

    @property
    def endpoint(self) -> str:
        """The current broker's frontend: where the client's socket connects."""
        return self.endpoints[self.current]

    def _draw(self) -> float:
        if not self.several:
            return self._attempt_s  # one broker: as ever
        return self._interval_s * (1.0 - RESEND_JITTER * self._jitter())

    def opened(self, now: float) -> None:
        """The client made a socket to the current broker (it is connecting from now on)."""
        self._opened_at = now

    def answered(self) -> None:
        """A message came from the current broker: it works (its failures are forgotten)."""
        failures = self._failures
        if failures[self.current]:
            failures[self.current] = 0

    def failed(self, now: float) -> bool:
        """The current broker gave no answer within :attr:`resend_s`: avoid it for a back-off
        and make the next one current. Returns whether the client moved (never with a single
        broker, which gets the resend on a fresh socket)."""
        if not self.several:
            return False
        failed = self.current
        failures = self._failures[failed] = self._failures[failed] + 1
        backoff_s = min(BROKER_BACKOFF_MAX_S, BROKER_BACKOFF_MIN_S * 2 ** min(failures - 1, 32))
        self._avoid_until[failed] = now + backoff_s
        count = len(self.endpoints)
        order = [(failed + step) % count for step in range(1, count + 1)]  # itself last
        avoid_until = self._avoid_until
        self.current = next(
            (index for index in order if avoid_until[index] <= now),
            min(order, key=avoid_until.__getitem__),  # all avoided: the first free again
        )
        self._opened_at = now  # the client closes its socket and makes one to the next now
        self.moves += 1
        self.resend_s = self._draw()
        return True

    def unsendable(self, now: float) -> bool:
        """A send to the current broker was refused (its socket is not connected): whether
        the client moved to another (:meth:`failed`). Not before the socket had
        UNSENDABLE_GRACE_S to connect, and never with a single broker (which the client keeps
        trying for its connect timeout, as ever)."""
        if not self.several or now - self._opened_at < UNSENDABLE_GRACE_S:
            return False
        return self.failed(now)

    def avoided(self, now: float) -> list[str]:
        """The brokers avoided at ``now`` (for messages and tests)."""
        pairs = zip(self.endpoints, self._avoid_until, strict=True)
        return [endpoint for endpoint, until in pairs if until > now]


# --- the calls in flight -----------------------------------------------------------------------


Call = tuple[int, bytes, Any, float, float]
"""One operation waiting for its reply: ``(kind, record, handle, started, deadline)``; the
handle is the client's (where the outcome goes), the record its BATCH record. A plain tuple,
not an object: a pipeline makes one per operation, and building a class instance (even with
__slots__, even a NamedTuple) cost it 0.25 to 0.45 us per operation more. Whether a call left
yet is kept apart, in one set for all calls (:attr:`Calls._unsent`), updated a batch at a
time."""

_record_of = itemgetter(1)  # of a Call

Settled = tuple[Any, Any]
"""A call done with: ``(handle, outcome)``, the outcome a result or the :class:`ZkvError` it
failed with (see :func:`outcome`)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """A BATCH message ready to leave: its id, the request ids it carries, its frames."""

    batch_id: int
    request_ids: list[int]
    frames: list[bytes]


class Calls:
    """The calls of one client that wait for a reply, and when to resend or give up.

    Args:
        endpoint: the client's :class:`Brokers` (which broker gets the calls, and the resend
            interval), or one broker's address, for a client of a single broker.
        timeout_s: see the module docstring; with ``per_call_deadline`` False no call expires
            by itself (a pipeline uses :meth:`silent_s` instead).
        attempt_s: silence after which everything unanswered is sent again (with
            ``endpoint`` a Brokers, its own :attr:`Brokers.resend_s` is used instead).
        ids: makes ``count`` fresh nonzero request ids (:func:`new_ids`; tests pass their own).
        now: the clock at creation (the silence starts then).
        recent_batches: how many batch ids to remember for whole-batch refusals; None for all.
        per_call_deadline: whether each call expires ``timeout_s`` after it was added.
        jitter: uniform in [0, 1), for the BUSY backoff (tests pass a constant).
        wall: the wall clock, Unix seconds, read once per :meth:`add` or :meth:`add_many` to
            stamp the writes added (tests pass a fake).
    """

    def __init__(
        self,
        endpoint: str | Brokers,
        timeout_s: float,
        attempt_s: float,
        ids: Callable[[int], list[int]],
        now: float,
        recent_batches: int | None = RECENT_BATCHES,
        per_call_deadline: bool = True,
        jitter: Callable[[], float] = random.random,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(endpoint, str):
            endpoint = Brokers((endpoint,), attempt_s, timeout_s, first=0)
        self.brokers = endpoint
        self.endpoint = endpoint.description  # for messages
        self._wall = wall
        self.timeout_s = timeout_s
        self._ids = ids
        # One id at a time (an asyncio call, a batch id): from the pool, without a list.
        self._new_id: Callable[[], int] = new_id if ids is new_ids else lambda: ids(1)[0]
        self._recent_max = recent_batches
        self._lifetime = timeout_s if per_call_deadline else _NEVER
        # Request id -> call, until answered or failed. Insertion order is creation order,
        # which is deadline order (one timeout for all) and the order a pipeline queued them.
        self._calls: dict[int, Call] = {}
        self._queue: list[int] = []  # request ids to send, oldest first (may hold stale ids)
        self._recent: OrderedDict[int, list[int]] = OrderedDict()  # batch id -> request ids
        # When a reply last came, and when a message last left: resend only after attempt_s
        # of silence since both (a busy client may read replies late). With several brokers,
        # the silence counts from the first message sent since the last reply instead of the
        # last one: a client that keeps sending (a gateway under steady load) would otherwise
        # never leave a broker that takes everything and answers nothing (a host cut off).
        self.last_progress = now
        self.last_send = now
        self._several = self.brokers.several
        self._first_unanswered_send: float | None = None
        self._unreachable_since: float | None = None
        # Request ids of the calls that never left in a message: their outcome is known (not
        # applied). Every other call in _calls is in flight and its outcome may be unknown.
        self._unsent: set[int] = set()
        self.sent_any = False
        # Calls answered BUSY (none on the common path; see the module docstring): those
        # waiting for their backoff, out of _calls, as request id -> (call, when to resend);
        # how many BUSY answers each had in a row (stale entries are pruned, see _on_busy); the
        # ids of calls resent after an attempt got no answer (it may have been applied); and,
        # with per-call deadlines, the deadlines of calls put back in _calls out of creation
        # order, which expire() checks apart.
        self._jitter = jitter
        self._parked: dict[int, tuple[Call, float]] = {}
        self._busy: dict[int, int] = {}
        self._tainted: set[int] = set()
        self._requeued: dict[int, float] = {}
        # Calls the broker may hold before answering (a LOCK waiting in its queue): request id
        # -> until when their silence is expected. Their deadline is that much later (so out of
        # creation order: expire() skips them); a silence of theirs is resent like any other,
        # every attempt_s (a restarted broker lost its queue), but to the same broker: a wait
        # is not a failure. And their ops, to stamp each resend anew (see _queue_again).
        self._patient: dict[int, float] = {}
        self._lock_ops: dict[int, Op] = {}

    @property
    def attempt_s(self) -> float:
        """Silence after which everything unanswered is sent again (Brokers.resend_s)."""
        return self.brokers.resend_s

    def __len__(self) -> int:
        """How many calls wait for a reply (queued, sent, or parked after a BUSY answer)."""
        return len(self._calls) + len(self._parked)

    @property
    def parked(self) -> int:
        """How many calls wait for their backoff after a BUSY answer."""
        return len(self._parked)

    @property
    def in_flight(self) -> int:
        """How many calls left at least once and wait for a reply."""
        return len(self._calls) - len(self._unsent)

    @property
    def queued(self) -> int:
        """How many request ids wait to be sent; exact after :meth:`next_batch` or
        :meth:`stuck`, else it may still count calls forgotten or expired since."""
        return len(self._queue)

    # --- adding and sending ---------------------------------------------------------------------

    def add(self, op: Op, handle: Any, now: float) -> int:
        """Queue ``op`` for sending; returns its request id. RequestError if it is refused."""
        request_id = self._new_id()
        record = pack(op, request_id, stamp_of(self._wall()))
        deadline = now + self._lifetime
        if op[0] == C_LOCK:  # the broker may hold it for its wait: allow that much more
            deadline = self._be_patient(request_id, op, now, deadline)
        self._calls[request_id] = (op[0], record, handle, now, deadline)
        self._queue.append(request_id)
        self._unsent.add(request_id)
        return request_id

    def _be_patient(self, request_id: int, op: Op, now: float, deadline: float) -> float:
        wait_s = op_wait_s(op)
        if not wait_s:
            return deadline
        # Patient until the wait ends and one attempt more: the broker answers when the wait
        # runs out, and a resend racing that answer would go out on a fresh socket (the answer,
        # to the old one, is lost) with a fresh wait. Resends before then (a restarted broker
        # lost its queue of waiters) stop one attempt before the wait ends: see resend_due.
        self._patient[request_id] = now + wait_s + self.attempt_s
        lock_ops = self._lock_ops
        lock_ops[request_id] = op
        if len(lock_ops) > 2 * len(self._calls) + 64:  # forget the ops of calls settled since
            self._lock_ops = {rid: o for rid, o in lock_ops.items() if rid in self._calls}
        if deadline < _NEVER:
            deadline += wait_s
            self._requeued[request_id] = deadline  # out of creation order: see expire()
        return deadline

    def add_many(
        self, ops: Sequence[Op], start: int, stop: int, now: float, plain: bool = True
    ) -> list[tuple[int, RequestError]]:
        """Queue ``ops[start:stop]``, each with its position as handle (a pipeline's hot path:
        the loop of :meth:`add` with its lookups hoisted); returns the positions refused, each
        with its RequestError. ``plain``: every op is a plain GET, SET or DEL (else the
        general loop packs the extended ones too)."""
        if not plain:
            return self._add_many_extended(ops, start, stop, now)
        calls = self._calls
        queue = self._queue
        queue_append = queue.append
        first = len(queue)
        deadline = now + self._lifetime
        stamp = stamp_of(self._wall())  # one for the chunk: made together, sent together
        refused: list[tuple[int, RequestError]] = []
        try:
            ids = self._ids(stop - start)
            for position, request_id in zip(range(start, stop), ids, strict=True):
                kind, key, value, ttl = ops[position]
                try:
                    record = pack_request(kind, request_id, key, value, ttl, stamp)
                except ProtocolError as exc:  # as in pack()
                    if kind >= EXTENDED:  # an extended op given to execute(): off the hot path
                        refused += self._add_many_extended(ops, position, position + 1, now)
                    else:
                        refused.append((position, RequestError(str(exc))))
                    continue
                calls[request_id] = (kind, record, position, now, deadline)
                queue_append(request_id)
        finally:  # all at once, even if an op was not an Op at all (a TypeError)
            self._unsent.update(queue[first:])
        return refused

    def _add_many_extended(
        self, ops: Sequence[Op], start: int, stop: int, now: float
    ) -> list[tuple[int, RequestError]]:
        """:meth:`add_many` of ops that may be extended (:func:`pack` each)."""
        calls = self._calls
        queue = self._queue
        first = len(queue)
        deadline = now + self._lifetime
        stamp = stamp_of(self._wall())
        refused: list[tuple[int, RequestError]] = []
        try:
            ids = self._ids(stop - start)
            for position, request_id in zip(range(start, stop), ids, strict=True):
                op = ops[position]
                code, key, value, ttl = op
                try:  # pack() inlined (0.3 us an op less): protocol's fast paths either way
                    if code >= EXTENDED:
                        kind, data, extra = value
                        record = pack_request(kind, request_id, key, data, ttl, stamp, extra)
                    else:
                        record = pack_request(code, request_id, key, value, ttl, stamp)
                except ProtocolError as exc:
                    refused.append((position, RequestError(str(exc))))
                    continue
                until = deadline
                if code == C_LOCK:
                    until = self._be_patient(request_id, op, now, deadline)
                calls[request_id] = (code, record, position, now, until)
                queue.append(request_id)
        finally:
            self._unsent.update(queue[first:])
        return refused

    def next_batch(self, max_ops: int) -> Batch | None:
        """The next BATCH to send from the queue (None if it is empty); it stays queued until
        :meth:`sent` says it left."""
        calls = self._calls
        queue = self._queue
        waiting = list(map(calls.get, queue[:max_ops]))  # in C: this runs per operation
        if not all(waiting):  # a None: forgotten or expired since it was queued
            queue[:] = [rid for rid in queue if rid in calls]
            waiting = [calls[rid] for rid in queue[:max_ops]]
        if not queue:
            return None
        records = list(map(_record_of, waiting))
        end = cut(records, max_ops)
        batch_id = self._new_id()
        return Batch(batch_id, queue[:end], batch_frames(batch_id, records[:end]))

    def sent(self, batch: Batch, now: float) -> None:
        """``batch`` left: its calls are answerable, and may have been applied from now on."""
        del self._queue[: len(batch.request_ids)]
        self._unsent.difference_update(batch.request_ids)
        self.last_send = now
        if self._first_unanswered_send is None:
            self._first_unanswered_send = now
        self._unreachable_since = None
        self.sent_any = True
        recent = self._recent
        recent[batch.batch_id] = batch.request_ids
        if self._recent_max is not None and len(recent) > self._recent_max:
            recent.popitem(last=False)

    def unreachable_s(self, now: float) -> float:
        """A send just failed (no broker connected): for how long sends have failed in a row."""
        if self._unreachable_since is None:
            self._unreachable_since = now
        return now - self._unreachable_since

    # --- replies ------------------------------------------------------------------------------

    def receive(self, frames: Sequence[bytes], now: float) -> list[Settled]:
        """Match a REPLY or BATCH_REPLY to the calls it answers; per call answered (and now
        forgotten), its handle and its :func:`outcome`. Late replies to calls already answered
        or given up are ignored.

        Raises:
            ProtocolError: the message is malformed (nothing was matched).
        """
        subs = replies(frames)
        self.last_progress = now
        self._first_unanswered_send = None
        self.brokers.answered()
        calls = self._calls
        unsent = self._unsent
        done: list[Settled] = []
        append = done.append
        for status, request_id, deadline_ms, body in subs:
            call = calls.pop(request_id, None)
            if call is not None:
                if unsent:  # empty while a pipeline waits for replies: skip the lookup
                    unsent.discard(request_id)
                kind, _, handle, _, _ = call
                if status == _OK and kind == _SET:  # outcome() of the common results, inline
                    append((handle, deadline_ms))
                elif status == _OK and kind == _GET:
                    append((handle, new_item(body or b"", deadline_ms)))
                elif status == _BUSY:
                    self._on_busy(request_id, call, body, now, done)
                else:
                    append((handle, outcome(kind, status, deadline_ms, body)))
            elif status == _ERROR and request_id in self._recent:
                # The broker refused a whole batch (it answers under the batch id): its
                # records are this client's bug, so every call in it fails.
                refused = error(status, body)
                for rid in self._recent.pop(request_id):
                    call = calls.pop(rid, None)
                    if call is not None:
                        unsent.discard(rid)
                        append((call[2], refused))
            elif status == _BUSY and request_id in self._recent:
                # A whole batch shed: every call of it waits for its backoff.
                for rid in self._recent.pop(request_id):
                    call = calls.pop(rid, None)
                    if call is not None:
                        unsent.discard(rid)
                        self._on_busy(rid, call, body, now, done)
            elif self._parked and status != _BUSY and request_id in self._parked:
                # A late answer to an earlier attempt of a call parked since: it settles it.
                call, _ = self._parked.pop(request_id)
                append((call[2], outcome(call[0], status, deadline_ms, body)))
        return done

    def _on_busy(
        self, request_id: int, call: Call, body: bytes | None, now: float, done: list[Settled]
    ) -> None:
        """A call (already out of _calls) answered BUSY: park it for its backoff, or, if the
        resend would come after its deadline, fail it (:func:`busy_gave_up`)."""
        busy = self._busy
        answers = busy.get(request_id, 0) + 1
        started = call[3]
        give_up = min(call[4], started + self.timeout_s)
        resend_at = now + busy_backoff_s(answers, self._jitter())
        if resend_at >= give_up:
            busy.pop(request_id, None)
            maybe_applied = request_id in self._tainted
            self._tainted.discard(request_id)
            done.append((call[2], busy_gave_up(body, answers, now - started, maybe_applied)))
            return
        busy[request_id] = answers
        self._parked[request_id] = (call, resend_at)
        if len(busy) > 2 * len(self) + 64:  # forget the counts of calls settled since
            self._busy = {
                rid: n for rid, n in busy.items() if rid in self._calls or rid in self._parked
            }

    def next_resend_at(self) -> float:
        """When the first parked call is due to be sent again (inf if none is parked)."""
        return min((at for _, at in self._parked.values()), default=_NEVER)

    def unpark(self, now: float) -> list[Settled]:
        """Queue again, with their request ids, the parked calls whose backoff is over; fail
        those whose deadline passed meanwhile (a late caller), as :meth:`_on_busy` would."""
        parked = self._parked
        if not parked:
            return []
        failed: list[Settled] = []
        for rid, (call, at) in list(parked.items()):
            if at > now:
                continue
            del parked[rid]
            started, deadline = call[3], call[4]
            if now >= min(deadline, started + self.timeout_s):
                answers = self._busy.pop(rid, 1)
                maybe_applied = rid in self._tainted
                self._tainted.discard(rid)
                failed.append((call[2], busy_gave_up(None, answers, now - started, maybe_applied)))
                continue
            self._calls[rid] = call  # out of creation order: see _requeued
            self._queue.append(rid)
            if deadline < _NEVER:
                self._requeued[rid] = deadline
        return failed

    # --- the clock ----------------------------------------------------------------------------

    def silent_s(self, now: float) -> float:
        """Seconds since the last reply (or since the calls began)."""
        return now - self.last_progress

    def resend_in(self, now: float) -> float:
        """Seconds until :meth:`resend_due`, if nothing comes or leaves meanwhile (<= 0: due)."""
        return self._resend_at() - now

    def _resend_at(self) -> float:
        sent = self.last_send
        if self._several and self._first_unanswered_send is not None:
            sent = self._first_unanswered_send  # see __init__
        return max(self.last_progress, sent) + self.attempt_s

    def resend_due(self, now: float) -> bool:
        """Whether a call that left is unanswered after ``attempt_s`` without any message in
        either direction (with several brokers: without a reply since the first message that
        left after the last one): the request or its reply may be lost (a broker restart).
        Not while only waiting LOCKs are out and one of them is within an attempt of its wait's
        end: the broker answers then, and a resend would race that answer (see _be_patient)."""
        return self.in_flight > 0 and self._lock_resend_at(now) <= now

    def _impatient(self, now: float) -> int:
        """How many calls in flight are not allowed to be silent yet (see _patient)."""
        patient = self._patient
        for rid, until in list(patient.items()):
            if until <= now or rid not in self._calls:
                del patient[rid]
        return self.in_flight - sum(1 for rid in patient if rid not in self._unsent)

    def resend(self, now: float) -> None:
        """The current broker gave no answer for :attr:`attempt_s`: mark it failed (with
        several brokers, another becomes current: :meth:`Brokers.failed`) and queue every
        unanswered call again, in creation order, with the same request ids and records (the
        brokers and workers recognise them, so nothing is applied twice). The caller sends them
        on a fresh socket to ``brokers.endpoint``, which drops anything stale queued in the old
        one. A silence while only LOCKs wait in the broker's queue (their wait not over) is
        no failure of the broker: they are resent to the same one (on a fresh socket: a broker
        restarted since lost its queue, and a live one merges the resend with the waiter)."""
        if not self._patient or self._impatient(now):
            self.brokers.failed(now)
        self._queue_again(now)

    def unsendable(self, now: float) -> bool:
        """A send was refused (the current broker is not connected): with several brokers,
        once the socket had its grace to connect, move to the next broker
        (:meth:`Brokers.unsendable`) and queue every unanswered call again, as :meth:`resend`
        does; the caller then makes a socket to ``brokers.endpoint``. Returns whether it moved;
        with one broker it never does (the caller keeps trying for its connect timeout)."""
        if not self.brokers.unsendable(now):
            return False
        self._queue_again(now)
        return True

    def _queue_again(self, now: float) -> None:
        if self._lock_ops:
            self._restamp()
        self._queue = list(self._calls)
        self._recent.clear()  # replies to the old socket can no longer come
        self.last_send = now
        self._first_unanswered_send = None
        # The attempts that left and got no answer may have been applied: a BUSY answer to a
        # later attempt no longer means "not applied" (see busy_gave_up). Rare (a silence of
        # attempt_s), so rebuilt whole, which also drops the ids of calls settled since.
        unsent = self._unsent
        parked = self._parked
        self._tainted = {rid for rid in self._calls if rid not in unsent} | {
            rid for rid in self._tainted if rid in parked
        }

    def _restamp(self) -> None:
        """Stamp the waiting LOCKs anew for their resend: a wait (up to 300 s) outlasts the
        workers' idempotency window, past which a stamped LOCK they do not remember is refused
        'outcome unknown'. Safe: an earlier attempt that was applied is answered from the
        worker's memory by request id (the stamp is not compared); past that memory, the LOCK
        is applied anew, and at worst the lost acquisition holds the lock until its TTL."""
        calls = self._calls
        stamp = stamp_of(self._wall())
        for rid, op in list(self._lock_ops.items()):
            call = calls.get(rid)
            if call is None:
                del self._lock_ops[rid]  # answered or given up
                continue
            kind, _, handle, started, deadline = call
            calls[rid] = (kind, pack(op, rid, stamp), handle, started, deadline)

    def due_in(self, now: float) -> float | None:
        """Seconds until a call expires or a resend is due, None if no call waits."""
        if not self._calls:
            if not self._parked:
                return None
            return max(0.0, self.next_resend_at() - now)
        _, _, _, _, earliest = next(iter(self._calls.values()))
        if self._parked or self._requeued:  # after BUSY answers, or a lock's wait, only
            requeued = self._requeued
            in_order = (call[4] for rid, call in self._calls.items() if rid not in requeued)
            earliest = min(next(in_order, _NEVER), self.next_resend_at(), *requeued.values())
        return max(0.0, min(self._lock_resend_at(now), earliest) - now)

    def _lock_resend_at(self, now: float) -> float:
        """When a resend is due: :meth:`_resend_at`, moved past the end of a waiting LOCK's
        wait (plus its attempt) when only waiting LOCKs are out and it would fall within an
        attempt of that end (see resend_due)."""
        resend_at = self._resend_at()
        if self._patient and not self._impatient(now):
            window = 2 * self.attempt_s
            for until in sorted(self._patient.values()):
                if until - window <= resend_at < until:
                    resend_at = until
        return resend_at

    def expire(self, now: float) -> list[Settled]:
        """Forget the calls whose deadline has passed; each with its error (:func:`gave_up`)."""
        calls = self._calls
        expired: list[int] = []
        for rid, (_, _, _, _, deadline) in calls.items():  # creation order is deadline order
            if deadline > now:
                if rid in self._requeued:  # not in that order: checked below
                    continue
                break
            expired.append(rid)
        if self._requeued:  # calls put back out of that order after a BUSY answer
            for rid, deadline in list(self._requeued.items()):
                if rid not in calls:
                    del self._requeued[rid]  # answered or parked again since
                elif deadline <= now:
                    del self._requeued[rid]
                    if rid not in expired:
                        expired.append(rid)
        if not expired:
            return []
        timeout = f"no reply from {self.endpoint} within {self.timeout_s} s"
        unreachable = f"broker at {self.endpoint} is not reachable"
        failed: list[Settled] = []
        unsent = self._unsent
        for rid in expired:
            kind, _, handle, started, deadline = calls.pop(rid)
            # One error each: an exception raised in many tasks would gather their tracebacks.
            if rid in unsent:
                unsent.discard(rid)
                err = gave_up(unreachable, False)
            elif kind == C_LOCK:  # its wait was allowed on top of the timeout: say how long
                err = gave_up(
                    f"no reply from {self.endpoint} within {deadline - started:g} s", True
                )
            else:
                err = gave_up(timeout, True)
            failed.append((handle, err))
        return failed

    def stuck(self, now: float, connect_timeout_s: float) -> list[Settled]:
        """Forget the queued calls made ``connect_timeout_s`` ago or more that never left (no
        broker connected all that time); each with Unavailable. A call queued again for a
        resend has left before and may have been applied: it waits for its deadline, and
        Timeout (outcome unknown), not Unavailable (not applied)."""
        calls = self._calls
        unsent = self._unsent
        self._queue = queue = [rid for rid in self._queue if rid in calls]
        old = [
            rid
            for rid in queue
            if rid in unsent and now - calls[rid][3] >= connect_timeout_s  # (..., started, _)
        ]
        if not old:
            return []
        message = f"broker at {self.endpoint} is not reachable (tried for {connect_timeout_s} s)"
        failed = self.fail(old, gave_up(message, False))
        self._queue = [rid for rid in queue if rid in calls]
        return failed

    def fail(self, request_ids: Sequence[int] | None, err: ZkvError) -> list[Settled]:
        """Forget these calls (None: all of them), each with ``err``."""
        calls = self._calls
        parked = self._parked
        if request_ids is None:
            failed = [(handle, err) for _, _, handle, _, _ in calls.values()]
            failed += [(call[2], err) for call, _ in parked.values()]
            calls.clear()
            parked.clear()
            self._queue = []
            self._unsent.clear()
            self._busy.clear()
            self._tainted.clear()
            self._requeued.clear()
            self._patient.clear()
            self._lock_ops.clear()
            return failed
        failed = []
        for rid in request_ids:
            call = calls.pop(rid, None)
            if call is None and rid in parked:
                call = parked.pop(rid)[0]
            if call is not None:
                self._unsent.discard(rid)
                failed.append((call[2], err))
        return failed

    def forget(self, request_id: int) -> None:
        """Stop waiting for one call (its caller went away); a late reply is ignored."""
        self._calls.pop(request_id, None)
        self._parked.pop(request_id, None)
        self._unsent.discard(request_id)
