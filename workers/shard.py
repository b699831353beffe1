"""One shard as a worker holds it: the store, the shard number and the fencing token.

Pure logic with no sockets, so every reply and the fencing rule are tested without ZeroMQ; the
worker loop only decodes dispatches, calls :meth:`Shard.handle` and sends what it returns.
"""

from __future__ import annotations

import logging

from workers.store import Missing, TTLStore
from zkv.protocol import Dispatch, Kind, Reply, Request, Status, encode_entries

log = logging.getLogger(__name__)


class Shard:
    """The data of one shard and the newest token that reached it.

    Fencing: the broker stamps every dispatch with a token larger than any it issued before.
    A shard accepts a dispatch only if its token is larger than the last one it accepted, so
    a request delayed in a queue, or sent by a broker that no longer owns the cluster (an old
    instance still running after a restart), cannot overwrite newer writes. Refused requests
    change nothing, not even ``last_token``.

    Args:
        number: the shard number, 0-based.
        store: the shard's data; a new empty store if None.
        last_token: the newest token already accepted, e.g. the one this worker reported in
            READY when it re-registered.
    """

    def __init__(self, number: int, store: TTLStore | None = None, last_token: int = 0) -> None:
        self.number = number
        self.store = store if store is not None else TTLStore()
        self.last_token = last_token

    def handle(self, dispatch: Dispatch) -> Reply:
        """Apply a dispatched request unless its token is stale, and build the reply.

        Every reply echoes the request id (so the client matches it) and the dispatch token
        (so the broker knows which dispatch it answers).
        """
        request = dispatch.request
        token = dispatch.token
        if token <= self.last_token:
            log.warning(
                "shard %d refused %s request %d: stale token %d, already accepted %d",
                self.number,
                request.kind.name,
                request.request_id,
                token,
                self.last_token,
            )
            message = f"stale token {token}: this shard already accepted {self.last_token}"
            # UNAVAILABLE, not ERROR: nothing is wrong with the request, only with its route.
            return Reply(Status.UNAVAILABLE, request.request_id, token, body=message.encode())
        self.last_token = token
        return self._apply(request, token)

    def _apply(self, request: Request, token: int) -> Reply:
        request_id = request.request_id
        store = self.store
        match request.kind:
            case Kind.GET:
                try:
                    value, deadline_ms = store.get(request.key)
                except Missing:
                    return Reply(Status.NOT_FOUND, request_id, token)
                return Reply(Status.OK, request_id, token, deadline_ms, value)
            case Kind.SET:
                if request.value is None:  # decode_request never produces this; a caller bug
                    return Reply(Status.ERROR, request_id, token, body=b"SET needs a value")
                deadline_ms = store.set(request.key, request.value, request.ttl_ms)
                return Reply(Status.OK, request_id, token, deadline_ms)
            case Kind.DEL:
                status = Status.OK if store.delete(request.key) else Status.NOT_FOUND
                return Reply(status, request_id, token)
            case Kind.ALL:
                entries = store.entries(request.key, request.limit, request.keys_only)
                return Reply(Status.OK, request_id, token, body=encode_entries(entries))
            case Kind.PING:
                return Reply(Status.OK, request_id, token)
        message = f"{request.kind.name} is not a request a shard serves"
        return Reply(Status.ERROR, request_id, token, body=message.encode())
