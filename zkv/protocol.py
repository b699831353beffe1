"""The zkv wire protocol, version 1. This module is the only place that builds or parses frames.

Everything here is socket-free: ``encode_*`` turns a message into ``list[bytes]`` (the frames of
one ZeroMQ multipart message, without any ROUTER identity frame), ``decode_*`` turns frames back
into a message or raises :class:`ProtocolError`. docs/protocol.md is the same specification in
prose, written so that a client in another language can be built from it alone.

Why the layout looks like this: on this machine a Python DEALER/ROUTER echo moves about 73,000
one-frame requests per second and about 39,000 four-frame ones, so every message is at most two
frames: one packed header that holds everything the broker routes on (command, request id, key),
then the value as an opaque second frame that the broker forwards without reading or copying.

All integers are unsigned and big-endian (network order). Every header starts with the same two
bytes, ``version`` and ``kind``, so a peer can reject an unknown version before reading further.

Frames, per message (``|`` separates frames):

Client -> broker (``REQUEST``, kinds GET, SET, DEL, ALL, PING)::

    header(20 + len(key) bytes) [| value]
    header = version:u8  kind:u8  flags:u8  reserved:u8(0)  request_id:u64  arg:u64  key:bytes

    GET/DEL  key non-empty, arg 0, one frame.
    SET      key non-empty, two frames (the value, any bytes, may be empty). With flag TTL the
             key expires ``arg`` milliseconds after the worker applies the write; without it the
             key never expires.
    ALL      key = cursor: only keys strictly greater (bytewise) are returned; arg = limit per
             shard (0 = no limit, and then no ordering either); flag KEYS_ONLY omits values.
    PING     key empty, arg 0.

Broker -> worker (``DISPATCH``), a request header wrapped with the token that fences it::

    header(10 bytes + request header) [| value]
    header = version:u8  kind:u8(DISPATCH)  token:u64  request-header

Worker -> broker -> client (``REPLY``)::

    header(28 bytes) [| body]
    header = version:u8  kind:u8(REPLY)  status:u8  reserved:u8(0)  request_id:u64  token:u64
             deadline_ms:u64

    deadline_ms is the key's expiry as Unix time in milliseconds, 0 for "never expires" or "not
    applicable". body: GET/OK the value; ALL/OK the entries (see :func:`encode_entries`); PING/OK
    a UTF-8 JSON object describing the cluster; ERROR/UNAVAILABLE a UTF-8 message; otherwise none.

Worker <-> broker control (one frame each)::

    READY       version:u8 kind:u8 reserved:u16 shard:u32 last_token:u64   worker -> broker
    ASSIGN      version:u8 kind:u8 reserved:u16 shard:u32 shards:u32 epoch:u64  broker -> worker
    HEARTBEAT   version:u8 kind:u8                                         both ways
    DISCONNECT  version:u8 kind:u8                                         both ways

    DISCONNECT from a worker: it leaves, free its shard now. From the broker: "I do not know
    you" (it restarted), so the worker sends READY again at once instead of waiting for the
    heartbeat liveness to run out.

    shard 0xFFFFFFFF means "none": a READY from a worker that owns nothing, an ASSIGN that makes
    the worker a standby.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

VERSION = 1

MAX_KEY_BYTES = 65_535  # the wire limit; services enforce smaller, configurable limits
MAX_VALUE_BYTES = 64 * 1024 * 1024
MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000  # ten years: longer is almost surely a unit mistake
NO_SHARD = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class Kind(enum.IntEnum):
    """The second byte of every header: what the message is."""

    GET = 0x01
    SET = 0x02
    DEL = 0x03
    ALL = 0x04
    PING = 0x05
    REPLY = 0x10
    DISPATCH = 0x11
    READY = 0x20
    ASSIGN = 0x21
    HEARTBEAT = 0x22
    DISCONNECT = 0x23


COMMANDS = frozenset({Kind.GET, Kind.SET, Kind.DEL, Kind.ALL, Kind.PING})
KEYED_COMMANDS = frozenset({Kind.GET, Kind.SET, Kind.DEL})


class Status(enum.IntEnum):
    """How a request ended. ERROR means the request itself is wrong and retrying cannot help;
    UNAVAILABLE means the cluster could not serve it now (no worker owns the shard, a worker did
    not answer in time) and its outcome may be unknown."""

    OK = 0
    NOT_FOUND = 1
    ERROR = 2
    UNAVAILABLE = 3


class Flag(enum.IntFlag):
    """Request flags (third header byte)."""

    NONE = 0
    TTL = 0x01  # SET: arg is a time to live in milliseconds
    KEYS_ONLY = 0x02  # ALL: leave the values out of the entries


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
_READY = struct.Struct("!BBxxIQ")
_ASSIGN = struct.Struct("!BBxxIIQ")
_BARE = struct.Struct("!BB")
_ENTRY = struct.Struct("!HIQ")

REQUEST_HEADER_BYTES = _REQUEST.size
DISPATCH_HEADER_BYTES = _DISPATCH.size


@dataclass(frozen=True, slots=True)
class Request:
    """A client's request.

    Attributes:
        kind: one of COMMANDS.
        request_id: chosen by the client, echoed in the reply; lets one socket keep many
            requests in flight.
        key: the key (GET, SET, DEL) or the listing cursor (ALL).
        value: the value to store (SET only).
        ttl_ms: SET only; None stores the key without expiry.
        limit: ALL only; most entries per shard, 0 for all of them.
        keys_only: ALL only; leave values out.
    """

    kind: Kind
    request_id: int
    key: bytes = b""
    value: bytes | None = None
    ttl_ms: int | None = None
    limit: int = 0
    keys_only: bool = False


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
    """A worker announcing itself; ``shard`` is the shard whose data it holds, if any."""

    shard: int | None = None
    last_token: int = 0


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
class Entry:
    """One key of an ALL listing."""

    key: bytes
    value: bytes
    deadline_ms: int | None


FromBroker = Dispatch | Assign | Heartbeat | Disconnect
FromWorker = Reply | Ready | Heartbeat | Disconnect


# --- requests ---------------------------------------------------------------------------------


def encode_request(request: Request) -> list[bytes]:
    """Frames of a client request. Raises ProtocolError for a request this spec forbids."""
    flags = Flag.NONE
    arg = 0
    if request.kind == Kind.SET:
        if request.value is None:
            raise ProtocolError("SET needs a value", request.request_id)
        if request.ttl_ms is not None:
            flags |= Flag.TTL
            arg = request.ttl_ms
    elif request.kind == Kind.ALL:
        arg = request.limit
        if request.keys_only:
            flags |= Flag.KEYS_ONLY
    header = _REQUEST.pack(VERSION, request.kind, flags, request.request_id, arg) + request.key
    frames = (
        [header, request.value]
        if request.kind == Kind.SET and request.value is not None
        else [header]
    )
    # Validate with the same code the receiver runs: what we send is what they accept.
    decode_request(frames)
    return frames


def decode_request(frames: Sequence[bytes]) -> Request:
    """Parse a client request (without the ROUTER identity frame).

    Raises:
        ProtocolError: naming what is wrong, carrying the request id when it was readable.
    """
    _check_version(frames)
    header = frames[0]
    if len(header) < _REQUEST.size:
        raise ProtocolError(
            f"request header of {len(header)} bytes is shorter than {_REQUEST.size}"
        )
    _, kind_byte, flags, request_id, arg = _REQUEST.unpack_from(header)
    # Plain dict and int operations below, not Enum/IntFlag calls: this runs for every request
    # in the broker and the worker, and enum construction costs microseconds each.
    kind = _COMMAND_OF.get(kind_byte)
    if kind is None:
        raise ProtocolError(f"unknown command 0x{kind_byte:02x}", request_id)
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags 0x{flags:02x}", request_id)
    key = header[_REQUEST.size :]
    if len(key) > MAX_KEY_BYTES:
        raise ProtocolError(f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}", request_id)
    expected_frames = 2 if kind == Kind.SET else 1
    if len(frames) != expected_frames:
        raise ProtocolError(
            f"{kind.name} takes {expected_frames} frame(s), got {len(frames)}", request_id
        )
    if kind in KEYED_COMMANDS:
        if not key:
            raise ProtocolError(f"{kind.name} needs a non-empty key", request_id)
        if flags & _KEYS_ONLY:
            raise ProtocolError(f"flag KEYS_ONLY does not apply to {kind.name}", request_id)
    if kind == Kind.SET:
        value = frames[1]
        if len(value) > MAX_VALUE_BYTES:
            raise ProtocolError(
                f"value of {len(value)} bytes exceeds {MAX_VALUE_BYTES}", request_id
            )
        ttl_ms = None
        if flags & _TTL:
            if not 1 <= arg <= MAX_TTL_MS:
                raise ProtocolError(
                    f"ttl_ms must be between 1 and {MAX_TTL_MS}, got {arg}", request_id
                )
            ttl_ms = arg
        elif arg:
            raise ProtocolError("SET without flag TTL must have arg 0", request_id)
        return Request(kind, request_id, bytes(key), bytes(value), ttl_ms)
    if flags & _TTL:
        raise ProtocolError(f"flag TTL does not apply to {kind.name}", request_id)
    if kind == Kind.ALL:
        return Request(kind, request_id, bytes(key), limit=arg, keys_only=bool(flags & _KEYS_ONLY))
    if arg:
        raise ProtocolError(f"{kind.name} must have arg 0", request_id)
    if kind == Kind.PING and key:
        raise ProtocolError("PING takes no key", request_id)
    if flags:
        raise ProtocolError(f"flags 0x{flags:02x} do not apply to {kind.name}", request_id)
    return Request(kind, request_id, bytes(key))


_COMMAND_OF = {int(kind): kind for kind in COMMANDS}
_KIND_OF = {int(kind): kind for kind in Kind}
_STATUS_OF = {int(status): status for status in Status}
_TTL = int(Flag.TTL)
_KEYS_ONLY = int(Flag.KEYS_ONLY)
_KNOWN_FLAGS = _TTL | _KEYS_ONLY


# --- dispatch ---------------------------------------------------------------------------------


def dispatch_frames(token: int, request_frames: Sequence[bytes]) -> list[bytes]:
    """Wrap an already validated request's frames for a worker.

    The broker calls this on the hot path: it prepends ten bytes to the header and passes the
    value frame through untouched, so a value is never decoded or copied by the broker.
    """
    return [_DISPATCH.pack(VERSION, Kind.DISPATCH, token) + request_frames[0], *request_frames[1:]]


# --- replies ----------------------------------------------------------------------------------


def encode_reply(reply: Reply) -> list[bytes]:
    """Frames of a reply."""
    header = _REPLY.pack(
        VERSION,
        Kind.REPLY,
        reply.status,
        reply.request_id,
        reply.token,
        reply.deadline_ms or 0,
    )
    return [header] if reply.body is None else [header, reply.body]


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


def reply_token(header: bytes) -> int:
    """The token of a reply header, read without decoding the rest (broker hot path)."""
    return int.from_bytes(header[12:20], "big")


def with_status(header: bytes, request_id: int, status: Status) -> bytes:
    """A copy of a reply header with another request id and status (used by the gather)."""
    _, kind, _, _, token, deadline_ms = _REPLY.unpack_from(header)
    return _REPLY.pack(VERSION, kind, status, request_id, token, deadline_ms)


# --- control ----------------------------------------------------------------------------------


def encode_control(message: Ready | Assign | Heartbeat | Disconnect) -> list[bytes]:
    """Frames of a worker/broker control message."""
    match message:
        case Ready(shard, last_token):
            return [_READY.pack(VERSION, Kind.READY, _shard_out(shard), last_token)]
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
    if len(frames) != 1:
        raise ProtocolError(f"{kind.name} takes 1 frame, got {len(frames)}")
    header = frames[0]
    match kind:
        case Kind.READY:
            _check_size(header, _READY.size, kind)
            _, _, shard, last_token = _READY.unpack(header)
            return Ready(_shard_in(shard), last_token)
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
