"""The only module that talks to etcd: its v3 JSON gateway (``/v3/...``) over plain HTTP.

Why plain HTTP and not a client library: the gateway is part of every etcd 3.4 server (Debian's
``etcd-server``), speaks JSON over HTTP/1.1, and zkv needs eight calls of it; the standard
library's ``http.client`` with one keep-alive connection per endpoint is as fast as ``etcd3gw``
(which adds requests, futurist and pbr) on a get/put loop, see "The etcd client" in
docs/cluster.md for the figures. gRPC clients (etcd3, aetcd) would add grpcio and protobuf for
a handful of small requests a second. The rest of zkv sees :class:`Etcd` and its records,
never etcd's wire format (the way Patroni keeps each engine behind one module).

The gateway's conventions this module relies on (checked against etcd 3.4.23):

- every call is ``POST /v3/<service>/<method>`` with a JSON body; keys and values are base64;
- 64-bit integers (revisions, lease ids, TTLs, counts) are JSON strings; a field whose value
  is zero, false or empty is left out of the answer (``succeeded`` of a failed txn, ``kvs`` of
  an empty range, ``value`` of an empty value, ``TTL`` of a lease that is gone);
- an error is a non-200 status with ``{"error": text, "code": gRPC code, "message": text}``;
- ``/v3/lease/keepalive`` is a stream: one request body gives one ``{"result": {...}}`` line.

Every answer is treated as hostile: each field is checked for its type and range, and anything
else raises :class:`EtcdError` naming the endpoint, the call and the field (never ``KeyError``
or ``TypeError``). An answer is read within ``timeout_s`` in total (a server that trickles
bytes cannot hold a caller longer) and at most ``MAX_RESPONSE_BYTES``.

Endpoints are tried in turn, starting with the last one that answered: a connection that
fails, times out, or a server that says it cannot serve (no leader, overloaded: gRPC codes 4,
8 and 14, HTTP 502/503/504) moves on to the next; when none answers, :class:`EtcdUnavailable`.
The worst case of one call is therefore ``len(endpoints) * timeout_s``. A write whose answer was
lost may have been applied by etcd all the same and is then sent again to the next endpoint,
so callers make every write safe to repeat (zkv/coordination.py guards each one with a compare
and recognises its own earlier success).

An :class:`Etcd` may be shared between threads (one lock around each call), but a call then
waits for the one in progress: a lease keeper uses its own copy (:meth:`Etcd.copy`) so that a
slow range of another thread never delays a keepalive.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

DEFAULT_TIMEOUT_S = 1.0  # the most one call may take at one endpoint (connect, send, answer)
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # a larger answer is refused (EtcdError), never buffered
RANGE_LIMIT = 100_000  # keys one range_prefix returns at most; more is an EtcdError
MAX_INT64 = 2**63 - 1
_READ_CHUNK_BYTES = 64 * 1024
_ERROR_TEXT_CHARS = 200  # how much of a server's error text goes into an exception message

# gRPC status codes with which etcd says "not now, maybe another member": DEADLINE_EXCEEDED
# ("request timed out"), RESOURCE_EXHAUSTED ("too many requests"), UNAVAILABLE ("no leader",
# "leader changed"). Anything else is an answer about the request itself.
_RETRY_CODES = frozenset({4, 8, 14})
_RETRY_HTTP = frozenset({502, 503, 504})
_NOT_FOUND_CODE = 5  # NOT_FOUND: "requested lease not found"


class EtcdError(Exception):
    """etcd refused a request, or answered something that is not a valid answer."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within its timeout (or every one said it cannot serve now)."""


class LeaseNotFound(EtcdError):
    """The lease named in a request does not exist (any more): it expired or was revoked."""


@dataclass(frozen=True)
class KV:
    """One key as etcd holds it. Revisions are etcd's: they only grow, cluster-wide.

    Attributes:
        key: the key's bytes.
        value: the value's bytes (``b""`` for an empty value).
        create_revision: the revision of the write that created this incarnation of the key
            (a key deleted and created again gets a new, larger one).
        mod_revision: the revision of the last write to it.
        version: writes since its creation (1 after the first).
        lease: the id of the lease it is attached to, 0 for none.
    """

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class Target(Enum):
    """What a :class:`Compare` looks at (etcd's ``Compare.CompareTarget``)."""

    VERSION = "VERSION"
    CREATE = "CREATE"
    MOD = "MOD"
    VALUE = "VALUE"
    LEASE = "LEASE"


class Result(Enum):
    """How a :class:`Compare` compares (etcd's ``Compare.CompareResult``)."""

    EQUAL = "EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"
    NOT_EQUAL = "NOT_EQUAL"


_TARGET_FIELD = {
    Target.VERSION: "version",
    Target.CREATE: "create_revision",
    Target.MOD: "mod_revision",
    Target.VALUE: "value",
    Target.LEASE: "lease",
}


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction.

    A key that does not exist compares as 0 for VERSION, CREATE, MOD and LEASE (so
    ``Compare.absent(key)`` is ``CREATE == 0``), and fails every VALUE comparison. With
    ``range_end`` the condition must hold for every existing key in ``[key, range_end)``.
    """

    key: bytes
    target: Target
    result: Result
    operand: int | bytes
    range_end: bytes = b""

    @staticmethod
    def absent(key: str | bytes) -> Compare:
        """The key does not exist."""
        return Compare(_b(key), Target.CREATE, Result.EQUAL, 0)

    @staticmethod
    def create_revision(key: str | bytes, revision: int) -> Compare:
        """The key exists with this create_revision (0: does not exist)."""
        return Compare(_b(key), Target.CREATE, Result.EQUAL, revision)

    @staticmethod
    def mod_revision(key: str | bytes, revision: int) -> Compare:
        """The key was last written at this revision (0: does not exist)."""
        return Compare(_b(key), Target.MOD, Result.EQUAL, revision)

    @staticmethod
    def value_equals(key: str | bytes, value: str | bytes) -> Compare:
        """The key exists with exactly this value."""
        return Compare(_b(key), Target.VALUE, Result.EQUAL, _b(value))

    @staticmethod
    def unchanged_since(prefix: str | bytes, revision: int) -> Compare:
        """No key under ``prefix`` was created or written after ``revision`` (a deletion is
        not seen: it can only free what a caller counted)."""
        key = _b(prefix)
        return Compare(key, Target.MOD, Result.LESS, revision + 1, prefix_end(key))

    def to_json(self) -> dict[str, Any]:
        field = _TARGET_FIELD[self.target]
        if self.target is Target.VALUE:
            if not isinstance(self.operand, bytes):
                raise TypeError("a VALUE compare needs bytes")
            operand: Any = _b64(self.operand)
        else:
            if not isinstance(self.operand, int):
                raise TypeError(f"a {self.target.value} compare needs an int")
            operand = str(self.operand)
        body: dict[str, Any] = {
            "key": _b64(self.key),
            "target": self.target.value,
            "result": self.result.value,
            field: operand,
        }
        if self.range_end:
            body["range_end"] = _b64(self.range_end)
        return body


@dataclass(frozen=True)
class Put:
    """Transaction operation: write ``value`` at ``key``, attached to ``lease`` (0: none)."""

    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """Transaction operation: delete ``key`` (or every key under it with ``prefix=True``)."""

    key: bytes
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    """Transaction operation: read ``key`` (or every key under it with ``prefix=True``)."""

    key: bytes
    prefix: bool = False


Op = Put | Delete | Get


def put(key: str | bytes, value: str | bytes, lease: int = 0) -> Put:
    """A :class:`Put` from text or bytes."""
    return Put(_b(key), _b(value), lease)


def delete(key: str | bytes, prefix: bool = False) -> Delete:
    """A :class:`Delete` from text or bytes."""
    return Delete(_b(key), prefix)


def get(key: str | bytes, prefix: bool = False) -> Get:
    """A :class:`Get` from text or bytes."""
    return Get(_b(key), prefix)


@dataclass(frozen=True)
class TxnResult:
    """What a transaction did.

    Attributes:
        succeeded: every compare held, so the ``success`` operations ran (else ``failure``).
        revision: the store's revision after the transaction. When the branch that ran wrote
            anything, every key it wrote has this revision as its mod_revision (and, for a key
            it created, as its create_revision): one transaction is one revision.
        responses: one per operation of the branch that ran, in order: a ``list[KV]`` for a
            :class:`Get`, the number of keys deleted for a :class:`Delete`, ``None`` for a
            :class:`Put`.
    """

    succeeded: bool
    revision: int
    responses: tuple[list[KV] | int | None, ...]


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix`` (etcd's range_end
    for a prefix): the prefix with its last byte below 0xff incremented."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key (etcd's convention for "to the end")


def _b(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else bytes(text)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """``http://host:port`` -> (scheme, host, port).

    Raises:
        ValueError: naming the URL, for anything else (a path, a user, another scheme).
    """
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not an etcd client URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an etcd client URL: write http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{url!r} is not an etcd client URL: no path, user or query")
    if port is None:
        raise ValueError(f"{url!r} needs a port (etcd listens on 2379 by default)")
    return parts.scheme, parts.hostname, port


# --- reading answers as hostile ---------------------------------------------------------------


class _Fields:
    """Checked access to one JSON object of an answer; every failure is an EtcdError that names
    the call and the field."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise EtcdError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        self.raw = raw
        self.where = where

    def object(self, name: str, required: bool = True) -> _Fields | None:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise EtcdError(f"{self.where}: no {name!r}")
            return None
        return _Fields(value, f"{self.where}.{name}")

    def integer(self, name: str, low: int = 0, high: int = MAX_INT64) -> int:
        """A 64-bit integer field (a JSON string of digits, or a number); absent means 0."""
        value = self.raw.get(name, 0)
        if isinstance(value, str) and 0 < len(value) <= 20 and value.lstrip("-").isdigit():
            number = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise EtcdError(f"{self.where}.{name}: not an integer: {_clip(repr(value))}")
        if not low <= number <= high:
            raise EtcdError(f"{self.where}.{name}: {number} is outside {low}..{high}")
        return number

    def boolean(self, name: str) -> bool:
        value = self.raw.get(name, False)
        if not isinstance(value, bool):
            raise EtcdError(f"{self.where}.{name}: not a boolean: {_clip(repr(value))}")
        return value

    def base64(self, name: str) -> bytes:
        """A base64 field; absent means empty."""
        value = self.raw.get(name, "")
        if not isinstance(value, str):
            raise EtcdError(f"{self.where}.{name}: not a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise EtcdError(f"{self.where}.{name}: not valid base64") from None

    def array(self, name: str) -> list[Any]:
        value = self.raw.get(name, [])
        if not isinstance(value, list):
            raise EtcdError(f"{self.where}.{name}: not a list")
        return value


def _clip(text: str) -> str:
    return text if len(text) <= _ERROR_TEXT_CHARS else text[:_ERROR_TEXT_CHARS] + "..."


def parse_kv(raw: Any, where: str) -> KV:
    """A KV of an answer, every field checked."""
    fields = _Fields(raw, where)
    key = fields.base64("key")
    if not key:
        raise EtcdError(f"{where}: empty key")
    return KV(
        key=key,
        value=fields.base64("value"),
        create_revision=fields.integer("create_revision", low=1),
        mod_revision=fields.integer("mod_revision", low=1),
        version=fields.integer("version", low=1),
        lease=fields.integer("lease"),
    )


def parse_revision(doc: _Fields) -> int:
    """The store's revision in an answer's header (etcd always sends it)."""
    header = doc.object("header")
    assert header is not None  # required=True raised otherwise
    return header.integer("revision", low=1)


def parse_range(doc: _Fields, limit: int = RANGE_LIMIT) -> list[KV]:
    """The keys of a range answer. ``more`` (keys left out by the limit) is an error: a caller
    that acted on part of a listing would act on a wrong picture."""
    if doc.boolean("more"):
        raise EtcdError(f"{doc.where}: more than {limit} keys")
    items = doc.array("kvs")
    if len(items) > limit:
        raise EtcdError(f"{doc.where}: {len(items)} keys, more than asked for ({limit})")
    return [parse_kv(item, f"{doc.where}.kvs[{n}]") for n, item in enumerate(items)]


def parse_txn(doc: _Fields, ops: Sequence[Op]) -> TxnResult:
    """A txn answer, checked against the operations of the branch that ran: one response per
    operation, each of the kind of its operation."""
    succeeded = doc.boolean("succeeded")
    revision = parse_revision(doc)
    items = doc.array("responses")
    if len(items) != len(ops):
        raise EtcdError(f"{doc.where}.responses: {len(items)} responses for {len(ops)} operations")
    responses: list[list[KV] | int | None] = []
    for n, (item, op) in enumerate(zip(items, ops, strict=True)):
        one = _Fields(item, f"{doc.where}.responses[{n}]")
        if isinstance(op, Put):
            one.object("response_put")
            responses.append(None)
        elif isinstance(op, Delete):
            body = one.object("response_delete_range")
            assert body is not None
            responses.append(body.integer("deleted"))
        else:
            body = one.object("response_range")
            assert body is not None
            responses.append(parse_range(body))
    return TxnResult(succeeded, revision, tuple(responses))


def _op_json(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        body: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            body["lease"] = str(op.lease)
        return {"request_put": body}
    body = {"key": _b64(op.key)}
    if op.prefix:
        body["range_end"] = _b64(prefix_end(op.key))
    if isinstance(op, Delete):
        return {"request_delete_range": body}
    body["limit"] = str(RANGE_LIMIT)
    return {"request_range": body}


# --- HTTP with a deadline ---------------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side whose every read gets only what is left of one deadline, so a
    server that sends one byte just before each timeout cannot make an answer last longer than
    the call's timeout (http.client alone bounds each recv, not the whole answer)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # counts as a reference to the socket
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the answer took longer than the call's timeout")
        self._sock.settimeout(remaining)
        return self._raw.readinto(buffer) or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client.HTTPResponse needs of a socket: ``makefile``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _Connection:
    """One keep-alive HTTP connection to one endpoint."""

    def __init__(self, scheme: str, host: str, port: int, timeout_s: float) -> None:
        self.deadline = 0.0
        if scheme == "https":
            self.http: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout_s, context=ssl.create_default_context()
            )
        else:
            self.http = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self.http.response_class = self._response  # type: ignore[assignment]
        self.used = False

    def _response(self, sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        return http.client.HTTPResponse(_DeadlineSocket(sock, self.deadline), *args, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, payload: bytes, deadline: float) -> tuple[int, bytes]:
        self.deadline = deadline
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no time left for the call")
        self.http.timeout = remaining
        if self.http.sock is not None:
            self.http.sock.settimeout(remaining)
        self.http.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
        self.used = True
        response = self.http.getresponse()
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read(_READ_CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise _TooLarge(f"an answer larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)
        return response.status, b"".join(chunks)

    def close(self) -> None:
        self.http.close()


class _TooLarge(Exception):
    pass


class _ServerBusy(Exception):
    """The server answered that it cannot serve now (try another endpoint)."""


_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, TimeoutError)
# Errors of a reused keep-alive connection that the server closed while it was idle; the request
# never reached it, so it is sent once more on a fresh connection to the same endpoint.
_STALE_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class Etcd:
    """A client of one etcd cluster, through its v3 JSON gateway.

    Args:
        endpoints: client URLs (``http://host:port``) of the cluster's members, tried in turn.
        timeout_s: the most one call may take at one endpoint, connection included.
    """

    def __init__(self, endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints is a list of URLs, not one string")
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.endpoints = [url.strip().rstrip("/") for url in endpoints]
        self._parsed = [parse_endpoint(url) for url in self.endpoints]
        self.timeout_s = timeout_s
        self._connections: dict[int, _Connection] = {}
        self._preferred = 0
        self._lock = threading.Lock()

    def copy(self, timeout_s: float | None = None) -> Etcd:
        """A client of the same endpoints with connections of its own (for another thread),
        with the same timeout unless given another."""
        return Etcd(self.endpoints, self.timeout_s if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Close every connection (a later call opens new ones)."""
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the calls ------------------------------------------------------------------------

    def get(self, key: str | bytes) -> KV | None:
        """The key, or None when it does not exist."""
        doc = self.call("/v3/kv/range", {"key": _b64(_b(key))})
        kvs = parse_range(doc)
        if len(kvs) > 1:
            raise EtcdError(f"{doc.where}: {len(kvs)} keys for one")
        if kvs and kvs[0].key != _b(key):
            raise EtcdError(f"{doc.where}: answered another key")
        return kvs[0] if kvs else None

    def range_prefix(self, prefix: str | bytes) -> list[KV]:
        """Every key that starts with ``prefix``, in key order (at most ``RANGE_LIMIT``)."""
        start = _b(prefix)
        body = {
            "key": _b64(start),
            "range_end": _b64(prefix_end(start)),
            "limit": str(RANGE_LIMIT),
        }
        doc = self.call("/v3/kv/range", body)
        kvs = parse_range(doc)
        for kv in kvs:
            if not kv.key.startswith(start):
                raise EtcdError(f"{doc.where}: answered a key outside the prefix")
        return kvs

    def put(self, key: str | bytes, value: str | bytes, lease: int = 0) -> int:
        """Write ``value`` at ``key`` (attached to ``lease`` unless 0); the new revision.

        Raises:
            LeaseNotFound: the lease has expired or was revoked.
        """
        body: dict[str, Any] = {"key": _b64(_b(key)), "value": _b64(_b(value))}
        if lease:
            body["lease"] = str(lease)
        return parse_revision(self.call("/v3/kv/put", body))

    def delete(self, key: str | bytes) -> int:
        """Delete ``key``; how many keys were deleted (0 or 1)."""
        doc = self.call("/v3/kv/deleterange", {"key": _b64(_b(key))})
        return doc.integer("deleted", high=1)

    def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        """If every ``compare`` holds, run ``success``, else ``failure``: atomically, in one
        revision."""
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [_op_json(op) for op in success],
            "failure": [_op_json(op) for op in failure],
        }
        doc = self.call("/v3/kv/txn", body)
        succeeded = doc.boolean("succeeded")
        return parse_txn(doc, success if succeeded else failure)

    def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease; (its id, the TTL granted in seconds). etcd raises a TTL below its
        minimum (``ceil(1.5 * election timeout)``, 2 s with the default 1 s election timeout)
        to that minimum, so use the TTL it answers, not the one asked for."""
        if ttl_s < 1:
            raise ValueError(f"a lease TTL is at least 1 s, got {ttl_s}")
        doc = self.call("/v3/lease/grant", {"TTL": str(ttl_s), "ID": "0"})
        lease_id = doc.integer("ID", low=1)
        granted = doc.integer("TTL", low=1)
        return lease_id, granted

    def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease for its whole TTL again; that TTL in seconds, or 0 if the lease is
        gone (expired or revoked: etcd has deleted its keys)."""
        doc = self.call("/v3/lease/keepalive", {"ID": str(lease_id)})
        result = doc.object("result")
        assert result is not None
        answered = result.integer("ID")
        if answered not in (0, lease_id):
            raise EtcdError(f"{result.where}.ID: renewed lease {answered}, not {lease_id}")
        return result.integer("TTL")

    def lease_revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys; a lease already gone is not an error."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease_id)})
        except LeaseNotFound:
            pass

    # --- the transport --------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any]) -> _Fields:
        """POST ``body`` to ``path`` at the first endpoint that answers; its checked answer.

        Raises:
            EtcdUnavailable: no endpoint answered (each tried once, ``timeout_s`` each).
            LeaseNotFound: etcd says the request's lease does not exist.
            EtcdError: etcd refused the request, or its answer is malformed.
        """
        payload = json.dumps(body).encode()
        failures: list[str] = []
        with self._lock:
            for index in self._rotation():
                url = self.endpoints[index]
                try:
                    status, data = self._post(index, path, payload)
                    doc = self._answer(url, path, status, data)
                except (_ServerBusy, _TooLarge, *_TRANSPORT_ERRORS) as exc:
                    self._drop(index)
                    failures.append(f"{url}: {_clip(str(exc) or type(exc).__name__)}")
                    continue
                self._preferred = index
                return doc
        raise EtcdUnavailable(f"etcd {path}: no endpoint answered ({'; '.join(failures)})")

    def _rotation(self) -> Iterator[int]:
        count = len(self.endpoints)
        for step in range(count):
            yield (self._preferred + step) % count

    def _post(self, index: int, path: str, payload: bytes) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.timeout_s
        connection = self._connections.get(index)
        if connection is not None and connection.used:
            try:
                return connection.post(path, payload, deadline)
            except _STALE_ERRORS:
                self._drop(index)
        scheme, host, port = self._parsed[index]
        connection = _Connection(scheme, host, port, self.timeout_s)
        self._connections[index] = connection
        return connection.post(path, payload, deadline)

    def _drop(self, index: int) -> None:
        connection = self._connections.pop(index, None)
        if connection is not None:
            connection.close()

    def _answer(self, url: str, path: str, status: int, data: bytes) -> _Fields:
        """The checked JSON object of an answer, or the exception its error calls for."""
        where = f"etcd {url}{path}"
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            if status in _RETRY_HTTP:
                raise _ServerBusy(f"HTTP {status}") from None
            raise EtcdError(f"{where}: HTTP {status}, not JSON: {_clip(repr(data[:80]))}") from None
        doc = _Fields(raw, where)
        error = raw.get("error")
        if status == 200 and error is None:
            return doc
        code = raw.get("code")
        if isinstance(error, dict):  # a stream's error: {"error": {"grpc_code": ..., ...}}
            code = error.get("grpc_code", error.get("code"))
            error = error.get("message")
        text = _clip(str(error if error is not None else raw.get("message")))
        if not isinstance(code, int) or isinstance(code, bool):
            code = None
        if status in _RETRY_HTTP or code in _RETRY_CODES:
            raise _ServerBusy(f"{text} (HTTP {status}, code {code!r})")
        if code == _NOT_FOUND_CODE and "lease not found" in text:
            raise LeaseNotFound(f"{where}: {text}")
        raise EtcdError(f"{where}: {text} (HTTP {status}, code {_clip(repr(code))})")
