"""BUSY answers over real sockets: both clients wait a backoff and resend with the same request
id until the deadline, then raise Busy (not applied). The broker is a fake, a ROUTER in a
thread that sheds each request id a given number of times before answering it."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import zmq

from zkv import Busy, Client
from zkv.aio import AsyncClient
from zkv.protocol import (
    BatchReply,
    Kind,
    Reply,
    Status,
    decode_request,
    encode_batch_reply,
    encode_reply,
    split_batch,
    versioned_body,
)

pytestmark = pytest.mark.integration

ALWAYS = 10**9
SHED = b"broker holds too many bytes"


class SheddingBroker:
    """Answers BUSY to the first ``shed`` copies of each request id, then OK (a GET's value is
    its key); records each copy's (socket identity, request id)."""

    def __init__(self, shed: int) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.shed = shed
        self.seen: list[tuple[bytes, int]] = []
        self.copies: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _reply(self, request_id: int, key: bytes, identity: bytes) -> Reply:
        self.seen.append((identity, request_id))
        self.copies[request_id] += 1
        if self.copies[request_id] <= self.shed:
            return Reply(Status.BUSY, request_id, 0, body=SHED)
        return Reply(Status.OK, request_id, 0, None, key)

    def _serve(self) -> None:
        socket = self.socket
        while not self._stop.is_set():
            if not socket.poll(20):
                continue
            identity, *frames = socket.recv_multipart()
            if frames[0][1] == Kind.BATCH:
                _, subs = split_batch(frames)
                replies = tuple(self._reply(sub[1], sub[2], identity) for sub in subs)
                socket.send_multipart([identity, *encode_batch_reply(BatchReply(0, replies))])
            else:
                request = decode_request(frames)
                reply = self._reply(request.request_id, request.key, identity)
                if request.versioned and reply.status == Status.OK:  # a Client.get (issue 12)
                    reply = Reply(
                        Status.OK, reply.request_id, 0, None, versioned_body(1, reply.body or b"")
                    )
                socket.send_multipart([identity, *encode_reply(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def shedding() -> Iterator[type[SheddingBroker]]:
    made: list[SheddingBroker] = []

    def make(shed: int) -> SheddingBroker:
        broker = SheddingBroker(shed)
        made.append(broker)
        return broker

    yield make  # type: ignore[misc]
    for broker in made:
        broker.close()


def test_a_request_answered_busy_is_resent_with_its_id_on_the_same_socket(shedding):
    broker = shedding(shed=3)
    with Client(broker.endpoint, timeout_s=3, attempt_s=1.0) as kv:
        assert kv.get("k").value == b"k"
        assert kv.retries == 0  # not a lost request: nothing was resent on a fresh socket
    assert len(broker.seen) == 4 and len(set(broker.seen)) == 1  # same socket, same id


def test_a_request_busy_until_its_deadline_raises_busy_not_applied(shedding):
    broker = shedding(shed=ALWAYS)
    with Client(broker.endpoint, timeout_s=0.3, attempt_s=1.0) as kv:
        with pytest.raises(Busy, match="not applied") as caught:
            kv.set("k", "v")
    assert SHED.decode() in str(caught.value)
    assert len(broker.seen) >= 3 and len({rid for _, rid in broker.seen}) == 1


def test_a_pipeline_resends_what_was_answered_busy_and_keeps_the_order(shedding):
    broker = shedding(shed=2)
    keys = [f"key:{n}" for n in range(50)]
    with Client(broker.endpoint, timeout_s=3, attempt_s=1.0, batch_ops=20) as kv:
        items = kv.get_many(keys)
    assert [item.value for item in items] == [key.encode() for key in keys]
    assert set(broker.copies.values()) == {3}


def test_a_pipeline_busy_until_the_deadline_fails_each_operation_with_busy(shedding):
    broker = shedding(shed=ALWAYS)
    with Client(broker.endpoint, timeout_s=0.3, attempt_s=1.0) as kv:
        results = kv.execute([(int(Kind.GET), b"a", None, None)] * 3, raise_on_error=False)
    assert [type(result) for result in results] == [Busy] * 3
    assert min(broker.copies.values()) >= 3


def test_asyncio_calls_answered_busy_are_resent_then_fail_with_busy_at_the_deadline(shedding):
    broker = shedding(shed=2)

    async def scenario() -> None:
        async with AsyncClient(broker.endpoint, timeout_s=3, attempt_s=1.0) as kv:
            items = await kv.get_many(["x", "y"])
            assert [item.value for item in items] == [b"x", b"y"]
        broker.shed = ALWAYS
        async with AsyncClient(broker.endpoint, timeout_s=0.3, attempt_s=1.0) as kv:
            with pytest.raises(Busy, match="not applied"):
                await kv.get("z")

    asyncio.run(scenario())
    assert broker.copies.most_common()[-1][1] == 3  # x and y: two BUSY answers, then served
