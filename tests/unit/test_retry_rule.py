"""One rule tells a retry from another request, in the broker and in the worker (issue 10,
item 2).

A client's retry carries the request id of its first attempt. The broker merges a retry with
its original while that is still in flight (broker/core.py); a worker answers a retry of a
write it already applied from its idempotency memory (workers/idempotency.py). If the two
disagreed, a request could be merged away at the broker although the worker would have applied
it (a SET of another value under a reused id, answered with the first one's reply and never
written), or the other way round. Each case below is played against both, with the same two
requests, and both must say "retry" or both "another request".
"""

from __future__ import annotations

import itertools

import pytest

from broker.core import Side
from tests.fakes import FakeClock
from tests.unit.test_broker_core import Harness, answer_all, key_for
from workers.shard import Shard
from workers.store import TTLStore
from zkv.protocol import (
    Batch,
    Dispatch,
    DispatchBatch,
    Kind,
    Reply,
    Request,
    Status,
    decode_from_broker,
    encode_batch,
    encode_batch_reply,
    encode_reply,
    encode_request,
)

pytestmark = pytest.mark.unit

ID = 0x5EED
KEY = key_for(0, "k")
OTHER_KEY = key_for(0, "other")
batch_ids = itertools.count(1)

# (name, first, second, is the second a retry of the first): both under request id ID.
CASES = [
    ("same SET", Request(Kind.SET, ID, KEY, b"v"), Request(Kind.SET, ID, KEY, b"v"), True),
    (
        "same SET, another TTL",  # a TTL is not compared: a retry never changes it
        Request(Kind.SET, ID, KEY, b"v", 10_000),
        Request(Kind.SET, ID, KEY, b"v", 20_000),
        True,
    ),
    ("same DEL", Request(Kind.DEL, ID, KEY), Request(Kind.DEL, ID, KEY), True),
    (
        "SET of another value",
        Request(Kind.SET, ID, KEY, b"v1"),
        Request(Kind.SET, ID, KEY, b"v2"),
        False,
    ),
    (
        "SET of an empty value",
        Request(Kind.SET, ID, KEY, b"v"),
        Request(Kind.SET, ID, KEY, b""),
        False,
    ),
    ("DEL after SET", Request(Kind.SET, ID, KEY, b"v"), Request(Kind.DEL, ID, KEY), False),
    ("SET after DEL", Request(Kind.DEL, ID, KEY), Request(Kind.SET, ID, KEY, b"v"), False),
    (
        "SET of another key",
        Request(Kind.SET, ID, KEY, b"v"),
        Request(Kind.SET, ID, OTHER_KEY, b"v"),
        False,
    ),
]


def broker_merges(first: Request, second: Request, batched: bool) -> bool:
    """Whether the broker merges ``second`` (from a fresh socket) into ``first``, still in
    flight: then only one request reaches a worker."""
    h = Harness()
    h.register(b"w0")
    h.register(b"w1")
    for client, request in ((b"old", first), (b"new", second)):
        if batched:
            frames = encode_batch(Batch(next(batch_ids), (request,)))
        else:
            frames = encode_request(request)
        h.broker.on_client([client, *frames], h.now)
    applied = 0
    while dispatches := [
        (f[0], decode_from_broker(f[1:])) for side, f in h.take() if side is Side.BACKEND
    ]:
        for worker, message in dispatches:
            if isinstance(message, DispatchBatch):
                applied += len(message.ops)
                h.broker.on_worker([worker, *encode_batch_reply(answer_all(message))], h.now)
            else:
                assert isinstance(message, Dispatch)
                applied += 1
                reply = Reply(Status.OK, message.request.request_id, message.token)
                h.broker.on_worker([worker, *encode_reply(reply)], h.now)
    assert h.broker.idle()
    assert applied in (1, 2)
    return applied == 1


def worker_recognises(first: Request, second: Request) -> bool:
    """Whether a worker that applied ``first`` answers ``second`` from its memory (the store
    is not written again)."""
    shard = Shard(0, TTLStore(FakeClock()))
    tokens = itertools.count(1)
    # The key exists: a DEL that finds nothing is not remembered (it changed nothing).
    shard.handle(Dispatch(next(tokens), Request(Kind.SET, 1, KEY, b"before")))
    shard.handle(Dispatch(next(tokens), first))
    writes = []
    store = shard.store
    real_set, real_delete = store.set, store.delete
    store.set = lambda *a: writes.append("set") or real_set(*a)  # type: ignore[method-assign]
    store.delete = lambda *a: writes.append("del") or real_delete(*a)  # type: ignore[method-assign]
    reply = shard.handle(Dispatch(next(tokens), second))
    assert reply.status in (Status.OK, Status.NOT_FOUND)
    return not writes


@pytest.mark.parametrize(("name", "first", "second", "retry"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_broker_and_worker_tell_a_retry_alike(
    name: str, first: Request, second: Request, retry: bool, batched: bool
) -> None:
    assert worker_recognises(first, second) is retry
    assert broker_merges(first, second, batched) is retry


def test_a_set_reusing_an_id_with_another_value_is_written_not_answered_with_the_first():
    """The symptom: before, the broker merged the second SET into the first (same id, kind and
    key) and the value it carried was never written; its sender was told OK."""
    harness = Harness()
    harness.register(b"w0")
    harness.register(b"w1")
    harness.broker.on_client([b"a", *encode_request(Request(Kind.SET, ID, KEY, b"v1"))], 0.0)
    harness.broker.on_client([b"b", *encode_request(Request(Kind.SET, ID, KEY, b"v2"))], 0.0)
    [(_, frames)] = harness.take()
    first = decode_from_broker(frames[1:])
    assert isinstance(first, Dispatch) and first.request.value == b"v1"
    reply = Reply(Status.OK, ID, first.token)
    harness.broker.on_worker([b"w0", *encode_reply(reply)], 0.0)
    out = harness.take()
    assert [frames[0] for side, frames in out if side is Side.FRONTEND] == [b"a"]
    [second] = [decode_from_broker(f[1:]) for side, f in out if side is Side.BACKEND]
    assert isinstance(second, Dispatch) and second.request.value == b"v2"
