"""The exceptions of the zkv library, one per way a request can fail."""

from zkv.protocol import ProtocolError


class ZkvError(Exception):
    """Base of every zkv error."""


class RequestError(ZkvError):
    """The request was refused as wrong (bad key, bad TTL, ...); retrying cannot help."""


class InvalidArgument(RequestError, ValueError):
    """An argument of a client call is wrong (a TTL that is not positive, an increment outside
    64 bits, nx with xx, ...): refused before anything is sent, the message naming the
    argument. A RequestError (retrying cannot help) and a ValueError (it is a bad value)."""


class PreconditionFailed(ZkvError):
    """A conditional write was refused (status PRECONDITION): ``nx`` and the key exists,
    ``xx`` and it does not, ``if_version`` and the key has another version (or none). Nothing
    changed. The message is the worker's reason, e.g. "version is 7, not 5"."""


class Conflict(ZkvError):
    """A write was refused as conflicting (status CONFLICT), nothing changed: a fence token
    older than the newest one issued for its lock, a lock held by someone else (or a token that
    is no longer the lock's), an INCR of a value that is not an integer or that would overflow.

    Attributes:
        deadline_ms: for a lock held by another, when its hold expires (Unix ms); else None.
    """

    def __init__(self, message: str, deadline_ms: int | None = None) -> None:
        super().__init__(message)
        self.deadline_ms = deadline_ms


class LockLost(Conflict):
    """A lock held by a ``with kv.lock(..., refresh=True)`` block could not be kept: its
    background refresh was refused (someone else took the lock after it expired) or failed
    until the hold ran out. Raised by :meth:`zkv.calls.Lock.check` and when the block ends."""


class Unavailable(ZkvError):
    """The cluster cannot serve the request now: broker unreachable or shard without owner."""


class Busy(Unavailable):
    """The cluster refused the request for now to protect itself (BUSY) and did not apply it;
    the clients retry it with backoff until their deadline, then raise this."""


class StorageFull(ZkvError):
    """The shard's disk is full (NO_SPACE): the write was not applied. Reads still work and
    writes resume by themselves once space returns."""


class Timeout(ZkvError):
    """No reply within the deadline; whether the request was applied is unknown."""


__all__ = [
    "Busy",
    "Conflict",
    "InvalidArgument",
    "LockLost",
    "PreconditionFailed",
    "ProtocolError",
    "RequestError",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "ZkvError",
]
