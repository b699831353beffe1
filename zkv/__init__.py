"""zkv: a key-value store with timeouts. This package is the public library: the wire protocol,
key hashing, the client and the command-line tool."""

from zkv.client import Client, Item, Lock, NotFound
from zkv.errors import (
    Busy,
    Conflict,
    InvalidArgument,
    LockLost,
    PreconditionFailed,
    ProtocolError,
    RequestError,
    StorageFull,
    Timeout,
    Unavailable,
    ZkvError,
)

__all__ = [
    "Busy",
    "Client",
    "Conflict",
    "InvalidArgument",
    "Item",
    "Lock",
    "LockLost",
    "NotFound",
    "PreconditionFailed",
    "ProtocolError",
    "RequestError",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "ZkvError",
]
