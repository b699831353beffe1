"""zkv: a key-value store with timeouts. This package is the public library: the wire protocol,
key hashing, the client and the command-line tool."""

from zkv.client import Client, Item, NotFound
from zkv.errors import (
    Busy,
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
    "Item",
    "NotFound",
    "ProtocolError",
    "RequestError",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "ZkvError",
]
