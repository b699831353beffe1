"""The exceptions of the zkv library, one per way a request can fail."""

from zkv.protocol import ProtocolError


class ZkvError(Exception):
    """Base of every zkv error."""


class RequestError(ZkvError):
    """The request was refused as wrong (bad key, bad TTL, ...); retrying cannot help."""


class Unavailable(ZkvError):
    """The cluster cannot serve the request now: broker unreachable or shard without owner."""


class Timeout(ZkvError):
    """No reply within the deadline; whether the request was applied is unknown."""


__all__ = ["ProtocolError", "RequestError", "Timeout", "Unavailable", "ZkvError"]
