"""The exceptions of the zkv library, one per way a request can fail."""

from zkv.protocol import ProtocolError


class ZkvError(Exception):
    """Base of every zkv error."""


class RequestError(ZkvError):
    """The request was refused as wrong (bad key, bad TTL, ...); retrying cannot help."""


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
    "ProtocolError",
    "RequestError",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "ZkvError",
]
