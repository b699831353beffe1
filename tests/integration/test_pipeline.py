"""Pipelines and the asyncio client over real sockets: a broker and two workers in threads of
the test process, and a fake broker (a ROUTER driven by hand) for lost messages."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq
import zmq.asyncio

from broker.core import BrokerConfig
from broker.server import ServerConfig, Stopper, serve
from tests.cluster import free_port, wait_for
from workers.worker import Worker, WorkerConfig
from zkv import Client, Item, NotFound, RequestError, Timeout, Unavailable
from zkv import aio as aio_module
from zkv import calls as calls_module
from zkv.aio import AsyncClient
from zkv.keys import ClientCurve
from zkv.protocol import (
    BatchReply,
    Kind,
    Reply,
    Status,
    encode_batch_reply,
    split_batch,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.1


@dataclass
class InProcessCluster:
    frontend: str
    context: zmq.Context

    def client(self, **options: float) -> Client:
        return Client(self.frontend, context=self.context, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    """A broker and one in-memory worker per shard, each in a thread, on loopback ports."""
    context = zmq.Context()
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    stopper = Stopper()
    config = ServerConfig(
        frontend, backend, BrokerConfig(2, 3.0, 4.0, INTERVAL_S, heartbeat_liveness=3)
    )
    threads = [threading.Thread(target=serve, args=(config, stopper, context), daemon=True)]
    workers = [
        Worker(WorkerConfig(backend=backend, heartbeat_interval_s=INTERVAL_S), context=context)
        for _ in range(2)
    ]
    threads += [threading.Thread(target=worker.run, daemon=True) for worker in workers]
    for thread in threads:
        thread.start()
    probe = Client(frontend, timeout_s=1.0, context=context)
    try:
        wait_for(lambda: all(probe.ping()["owned"]), "both shards to have a worker")
        yield InProcessCluster(frontend, context)
    finally:
        probe.close()
        for worker in workers:
            worker.stop()
        stopper.stopping = True
        for thread in threads:
            thread.join(10)
        context.term()


def test_set_many_then_get_many_in_order_with_missing_keys(cluster):
    with cluster.client() as kv:
        items = {f"user:{n}": f"value {n}".encode() for n in range(300)}
        deadlines = kv.set_many(items, ttl_s=60)
        assert len(deadlines) == 300 and all(d and d > time.time() * 1000 for d in deadlines)
        got = kv.get_many([*items, "missing"])
        assert [item.value if item else None for item in got] == [*items.values(), None]
        assert kv.delete_many(["user:0", "user:0", "missing"]) == [True, False, False]
        assert kv.get("user:1").value == b"value 1"  # the blocking API next to pipelines


def test_a_pipeline_returns_results_in_the_order_the_operations_were_queued(cluster):
    with cluster.client() as kv, kv.pipeline() as pipe:
        pipe.set("p:a", b"1").get("p:a").set("p:a", b"2", ttl_s=5).get("p:a")
        pipe.delete("p:a").get("p:a").delete("p:a")
        assert len(pipe) == 7
        first, got1, deadline, got2, deleted, gone, again = pipe.execute()
    assert first is None and got1.value == b"1" and got1.deadline_ms is None
    assert got2.value == b"2" and got2.deadline_ms == deadline
    assert (deleted, gone, again) == (True, None, False)


def test_a_hot_key_sees_every_operation_in_pipeline_order(cluster):
    with cluster.client(batch_ops=100, window_ops=400) as kv:
        ops = []
        for n in range(1500):
            ops.append((Kind.SET, b"hot", b"%d" % n, None))
            ops.append((Kind.GET, b"hot", None, None))
        results = kv.execute(ops)
    assert [item.value for item in results[1::2]] == [b"%d" % n for n in range(1500)]


def test_many_batches_in_flight_across_both_shards(cluster):
    with cluster.client(batch_ops=50, window_ops=500) as kv:
        keys = [f"k{n}" for n in range(5000)]
        kv.set_many({key: key.encode() for key in keys})
        assert [item.value for item in kv.get_many(keys)] == [key.encode() for key in keys]


def test_a_refused_operation_does_not_spoil_the_others(cluster):
    with cluster.client() as kv:
        ops = [
            (Kind.SET, b"ok", b"v", None),
            (Kind.SET, b"bad", b"v", 0),
            (Kind.GET, b"ok", None, None),
            (Kind.GET, b"", None, None),  # refused too, but the first failure is raised
        ]
        with pytest.raises(RequestError, match="ttl_ms"):
            kv.execute(ops)
        first, refused, got, empty = kv.execute(ops, raise_on_error=False)
        assert first is None and isinstance(refused, RequestError) and got.value == b"v"
        assert isinstance(empty, RequestError) and "non-empty key" in str(empty)


def test_asyncio_calls_from_many_tasks_travel_in_few_batches(cluster):
    async def scenario() -> None:
        async with AsyncClient(cluster.frontend) as kv:
            await asyncio.gather(*(kv.set(f"a:{n}", b"%d" % n, ttl_s=30) for n in range(2000)))
            sent = kv.batches
            assert sent <= 10  # 2000 calls from 2000 tasks, coalesced
            items = await kv.get_many([f"a:{n}" for n in range(2000)] + ["a:none"])
            assert [i.value for i in items[:-1]] == [b"%d" % n for n in range(2000)]
            assert items[-1] is None
            assert await kv.delete("a:1") is True
            assert await kv.delete("a:1") is False
            with pytest.raises(NotFound):
                await kv.get("a:1")
            with pytest.raises(RequestError, match="non-empty key"):
                await kv.get("")
            assert kv.retries == 0

    asyncio.run(scenario())


def test_asyncio_submit_gives_futures_of_outcomes_and_refuses_at_once(cluster):
    async def scenario() -> None:
        kv = AsyncClient(cluster.frontend)
        deadline = kv.submit(Kind.SET, b"s:1", b"one", 30_000)
        got, missing = kv.submit(Kind.GET, b"s:1"), kv.submit(Kind.GET, b"s:none")
        removed = kv.submit(Kind.DEL, b"s:1")
        assert not deadline.done()  # queued, not sent: they leave together
        await asyncio.wait([deadline, got, missing, removed])
        assert kv.batches == 1
        assert abs(deadline.result() - (time.time() * 1000 + 30_000)) < 5_000
        assert got.result() == Item(b"one", deadline.result())
        assert missing.result() is None and removed.result() is True
        with pytest.raises(RequestError, match="non-empty key"):
            kv.submit(Kind.GET, b"")  # raised here, nothing queued
        await kv.close()
        with pytest.raises(Unavailable, match="closed"):
            kv.submit(Kind.GET, b"s:1")

    asyncio.run(scenario())


def test_asyncio_replies_are_read_when_they_come_not_when_the_timer_looks(cluster):
    """The client reads on the socket's edge-triggered descriptor; a reply the descriptor did
    not announce would still be read, by the 100 ms timer, only late: count those."""

    async def scenario() -> None:
        async with AsyncClient(cluster.frontend, context=zmq.asyncio.Context.instance()) as kv:
            await kv.set("edge", b"x", ttl_s=30)
            for _ in range(300):  # one at a time: each reply is the only thing to read
                assert (await kv.get("edge")).value == b"x"

            async def chain() -> None:
                for _ in range(100):
                    assert (await kv.get("edge")).value == b"x"

            # 20 chains: replies come while the client sends the next calls.
            await asyncio.gather(*(chain() for _ in range(20)))
            # A descriptor that missed its edges leaves every reply to the timer: hundreds of
            # late reads in 2,300 calls. A loaded machine can let the timer run first once or
            # twice (its callback and the descriptor's due in one loop pass: CI, 2026-12-07).
            assert kv.late_reads <= 3 and kv.retries == 0, kv.late_reads

    asyncio.run(scenario())


# --- lost messages: a fake broker -------------------------------------------------------------


@pytest.fixture
def fake_broker() -> Iterator[tuple[zmq.Socket, str, zmq.Context]]:
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}", context
    socket.close(linger=0)
    context.term()


def answer_batches(
    socket: zmq.Socket,
    drop: int,
    seen: list,
    stop: threading.Event,
    mute: threading.Event | None = None,
) -> None:
    """Answer every GET of each BATCH with its key as the value, after dropping ``drop``
    batches (and all of them once ``mute`` is set); records (socket identity, request ids) of
    each batch received."""
    while not stop.is_set():
        if not socket.poll(20):
            continue
        identity, *frames = socket.recv_multipart()
        _, subs = split_batch(frames)
        seen.append((identity, [sub[1] for sub in subs]))
        if len(seen) <= drop or (mute is not None and mute.is_set()):
            continue
        replies = tuple(Reply(Status.OK, sub[1], 0, None, sub[2]) for sub in subs)
        socket.send_multipart([identity, *encode_batch_reply(BatchReply(0, replies))])


def test_a_lost_pipeline_is_sent_again_with_the_same_ids_on_a_fresh_socket(fake_broker):
    socket, endpoint, context = fake_broker
    seen: list = []
    stop = threading.Event()
    thread = threading.Thread(target=answer_batches, args=(socket, 1, seen, stop), daemon=True)
    thread.start()
    try:
        with Client(endpoint, timeout_s=3, attempt_s=0.2, context=context) as kv:
            items = kv.get_many(["a", "b", "c"])
            assert [item.value for item in items] == [b"a", b"b", b"c"]
            assert kv.retries == 1
        (first_socket, first_ids), (second_socket, second_ids) = seen
        assert first_ids == second_ids and first_socket != second_socket
    finally:
        stop.set()
        thread.join(5)


def test_an_unanswered_pipeline_times_out_with_outcome_unknown(fake_broker):
    socket, endpoint, context = fake_broker
    seen: list = []
    stop = threading.Event()
    thread = threading.Thread(target=answer_batches, args=(socket, 10**9, seen, stop))
    thread.start()
    try:
        with Client(endpoint, timeout_s=0.6, attempt_s=0.2, context=context) as kv:
            started = time.monotonic()
            with pytest.raises(Timeout, match="outcome unknown"):
                kv.get_many(["a", "b"])
            assert time.monotonic() - started < 2.0
        assert len(seen) >= 2 and len({tuple(ids) for _, ids in seen}) == 1
    finally:
        stop.set()
        thread.join(5)


def test_asyncio_resends_a_lost_batch_and_times_out_when_nobody_answers(fake_broker):
    socket, endpoint, _ = fake_broker
    seen: list = []
    stop, mute = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=answer_batches, args=(socket, 1, seen, stop, mute), daemon=True
    )
    thread.start()

    async def scenario() -> None:
        async with AsyncClient(endpoint, timeout_s=3, attempt_s=0.2) as kv:
            assert [i.value for i in await kv.get_many(["x", "y"])] == [b"x", b"y"]
            assert kv.retries == 1
        mute.set()  # nobody answers from now on
        async with AsyncClient(endpoint, timeout_s=0.5, attempt_s=0.2) as kv:
            with pytest.raises(Timeout, match="outcome unknown"):
                await kv.get("z")

    try:
        asyncio.run(scenario())
        assert seen[0][1] == seen[1][1]  # the same request ids, resent
    finally:
        stop.set()
        thread.join(5)


def test_asyncio_without_file_descriptors_makes_its_socket_later_and_loses_nothing(
    fake_broker, monkeypatch
):
    """A socket that cannot be made (EMFILE), at the first call or at a resend, is made at the
    next flush or tick: the calls still get answers, or their timeouts, never silence."""
    socket, endpoint, _ = fake_broker
    seen: list = []
    stop = threading.Event()
    thread = threading.Thread(target=answer_batches, args=(socket, 1, seen, stop), daemon=True)
    thread.start()
    made = 0
    real_dealer = aio_module.dealer

    def flaky_dealer(
        context: zmq.Context, endpoint: str, curve: ClientCurve | None = None
    ) -> zmq.Socket:
        nonlocal made
        made += 1
        if made in (1, 3):  # the first socket, and the first one made for the resend
            raise zmq.ZMQError(errno.EMFILE)
        return real_dealer(context, endpoint, curve)

    monkeypatch.setattr(aio_module, "dealer", flaky_dealer)

    async def scenario() -> None:
        async with AsyncClient(endpoint, timeout_s=3, attempt_s=0.2) as kv:
            # The first batch is dropped by the fake broker, so it is resent on a new socket.
            assert [i.value for i in await kv.get_many(["x", "y"])] == [b"x", b"y"]
            assert kv.retries == 1 and made >= 4

    try:
        asyncio.run(scenario())
    finally:
        stop.set()
        thread.join(5)


def test_asyncio_against_no_broker_is_unavailable_after_the_connect_timeout():
    async def scenario() -> None:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        async with AsyncClient(endpoint, timeout_s=5, connect_timeout_s=0.3) as kv:
            started = time.monotonic()
            with pytest.raises(Unavailable, match="not reachable"):
                await kv.get("k")
            assert 0.3 <= time.monotonic() - started < 1.5

    asyncio.run(scenario())


def test_a_pipeline_against_no_broker_is_unavailable_after_the_connect_timeout():
    with Client(f"tcp://127.0.0.1:{free_port()}", timeout_s=5, connect_timeout_s=0.3) as kv:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="not reachable"):
            kv.get_many(["a"])
        assert 0.3 <= time.monotonic() - started < 1.5


def test_large_values_are_cut_into_messages_by_size(cluster, monkeypatch):
    monkeypatch.setattr(calls_module, "MAX_BATCH_BYTES", 4_000)  # so 1 KiB values split early
    with cluster.client() as kv:
        values = {f"big:{n}": bytes([n]) * 1024 for n in range(20)}
        assert len(kv.set_many(values)) == 20
        assert [item.value for item in kv.get_many(values)] == list(values.values())
