"""Several brokers over real sockets, in one process: a black hole (a ROUTER that takes every
request and answers none), a reply eater (it passes requests on to the real broker and drops
every reply: the write is applied, the client hears nothing), and a real broker with two
in-memory workers. Listed first, a dead path is tried first; the clients (single requests,
pipelines, asyncio, the gateway) get their answers through the live broker, with the same
request ids, and each SET is applied once, counted at the workers' stores."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from wsgiref.util import setup_testing_defaults

import pytest
import zmq

from broker.core import BrokerConfig
from broker.server import ServerConfig, Stopper, serve
from gateway import server as gateway_server
from gateway.app import ClientPlugin
from tests.cluster import free_port, wait_for
from workers import store as store_module
from workers.worker import Worker, WorkerConfig
from zkv import Client, Timeout
from zkv import calls as calls_module
from zkv.aio import AsyncClient
from zkv.config import endpoints
from zkv.keys import Keys, create_keys
from zkv.protocol import (
    BatchReply,
    Kind,
    Reply,
    Status,
    decode_request,
    encode_batch_reply,
    split_batch,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.1
TIMEOUT_S = 3.0
ATTEMPT_S = 0.3  # the resend interval: 0.225 to 0.3 s with two brokers


@dataclass
class DeadPath:
    """A ROUTER on a loopback port, in a thread. It records the request ids of every message
    it gets; with ``forward_to``, it passes each message on to that broker (through one DEALER)
    and drops what comes back."""

    context: zmq.Context
    forward_to: str | None = None
    seen: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.upstream: zmq.Socket | None = None
        if self.forward_to is not None:
            self.upstream = self.context.socket(zmq.DEALER)
            self.upstream.setsockopt(zmq.LINGER, 0)
            self.upstream.connect(self.forward_to)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.upstream is not None:
            poller.register(self.upstream, zmq.POLLIN)
        while not self._stop.is_set():
            for socket, _ in poller.poll(20):
                frames = socket.recv_multipart()
                if socket is self.upstream:
                    continue  # a reply: eaten
                _, *message = frames
                if message[0][1] == Kind.BATCH:
                    self.seen += [sub[1] for sub in split_batch(message)[1]]
                else:
                    self.seen.append(decode_request(message).request_id)
                if self.upstream is not None:
                    self.upstream.send_multipart(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(linger=0)
        if self.upstream is not None:
            self.upstream.close(linger=0)


@dataclass
class Setup:
    live: str
    black_hole: DeadPath
    eater: DeadPath
    context: zmq.Context
    applied: Counter[bytes]

    def client(self, dead: DeadPath, **options: object) -> Client:
        return Client(
            f"{dead.endpoint},{self.live}",
            timeout_s=TIMEOUT_S,
            attempt_s=ATTEMPT_S,
            context=self.context,
            first_broker=0,
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    """The real broker and one in-memory worker per shard, each in a thread; the workers'
    stores count every SET they apply, per key."""
    applied: Counter[bytes] = Counter()
    real_set = store_module.TTLStore.set

    def counted(self, key, value, ttl_ms=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        applied[key] += 1
        return real_set(self, key, value, ttl_ms, *args, **kwargs)

    store_module.TTLStore.set = counted  # type: ignore[method-assign]
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
    black_hole = DeadPath(context)
    eater = DeadPath(context, forward_to=frontend)
    try:
        wait_for(lambda: all(probe.ping()["owned"]), "both shards to have a worker")
        yield Setup(frontend, black_hole, eater, context, applied)
    finally:
        probe.close()
        black_hole.close()
        eater.close()
        for worker in workers:
            worker.stop()
        stopper.stopping = True
        for thread in threads:
            thread.join(10)
        context.term()
        store_module.TTLStore.set = real_set  # type: ignore[method-assign]


@pytest.fixture(params=["black hole", "reply eater"])
def dead(request: pytest.FixtureRequest, setup: Setup) -> DeadPath:
    return setup.black_hole if request.param == "black hole" else setup.eater


def test_a_request_without_answer_goes_again_with_its_id_through_the_next_broker(setup, dead):
    key = f"single:{dead.endpoint}".encode()
    before = len(dead.seen)
    with setup.client(dead) as kv:
        started = time.monotonic()
        deadline = kv.set(key, b"v", ttl_s=60)
        assert time.monotonic() - started < TIMEOUT_S / 2  # one resend interval, not a timeout
        assert kv.brokers.endpoint == setup.live and kv.brokers.avoided(time.monotonic())
        assert kv.get(key).deadline_ms == deadline  # the live broker is kept: no wait now
        assert kv.delete(key) is True
    assert len(dead.seen) == before + 1  # the SET only: GET and DEL went to the live one
    assert setup.applied[key] == 1  # through the eater too: the retry answered from memory


def test_a_pipeline_goes_again_through_the_next_broker_each_set_applied_once(setup, dead):
    keys = [f"pipe:{dead.endpoint}:{n}".encode() for n in range(500)]
    before = len(dead.seen)
    with setup.client(dead, batch_ops=100) as kv:
        deadlines = kv.set_many({key: key for key in keys}, ttl_s=60)
        items = kv.get_many(keys)
        assert kv.retries == 1
    assert [item.value for item in items] == keys
    assert [item.deadline_ms for item in items] == deadlines
    assert {setup.applied[key] for key in keys} == {1}
    assert len(dead.seen) == before + len(keys)  # every SET once, nothing after the move


def test_asyncio_calls_go_again_through_the_next_broker_each_set_applied_once(setup, dead):
    keys = [f"aio:{dead.endpoint}:{n}".encode() for n in range(200)]

    async def scenario() -> None:
        async with AsyncClient(
            f"{dead.endpoint},{setup.live}",
            timeout_s=TIMEOUT_S,
            attempt_s=ATTEMPT_S,
            first_broker=0,
        ) as kv:
            deadlines = await asyncio.gather(*(kv.set(key, key, ttl_s=60) for key in keys))
            items = await kv.get_many(keys)
            assert [item.value for item in items] == keys
            assert [item.deadline_ms for item in items] == deadlines
            assert kv.retries == 1 and kv.brokers.endpoint == setup.live

    before = len(dead.seen)
    asyncio.run(scenario())
    assert {setup.applied[key] for key in keys} == {1}
    assert len(dead.seen) == before + len(keys)  # every SET once, nothing after the move


def test_an_unreachable_broker_is_left_at_once_not_after_the_resend_interval(setup):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with Client(
        f"{nobody},{setup.live}", timeout_s=TIMEOUT_S, context=setup.context, first_broker=0
    ) as kv:
        started = time.monotonic()
        kv.set("unreachable", b"v")
        assert [item.value for item in kv.get_many(["unreachable"])] == [b"v"]
        assert time.monotonic() - started < 0.8  # the connect grace (0.1 s), not 1 s silence
        assert kv.brokers.avoided(time.monotonic()) == [nobody]


def test_the_gateway_takes_the_list_and_answers_through_the_live_broker(setup, monkeypatch):
    monkeypatch.setattr(calls_module.random, "randrange", lambda count: 0)  # the black hole first
    args = gateway_server.build_parser().parse_args(
        ["--frontend", f"{setup.black_hole.endpoint}, {setup.live}", "--worker-class", "gthread"]
    )
    assert args.frontend == f"{setup.black_hole.endpoint},{setup.live}"
    app = gateway_server.app_factory(args)()
    before = len(setup.black_hole.seen)
    environ: dict[str, object] = {"QUERY_STRING": "key=gw&value=hello&timeout=60"}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO="/set", REQUEST_METHOD="GET", **{"wsgi.input": io.BytesIO()})
    answer: list[str] = []
    body = b"".join(app(environ, lambda status, headers, *_: answer.append(status)))
    assert answer == ["200 OK"] and json.loads(body)["message"] == "Value set successfully"
    assert len(setup.black_hole.seen) == before + 1 and setup.applied[b"gw"] == 1
    for plugin in app.plugins:  # the client the app made for this thread
        if isinstance(plugin, ClientPlugin) and (client := plugin.current()) is not None:
            client.close()  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        gateway_server.build_parser().parse_args(["--frontend", f"{setup.live},tcp://nohost"])


def test_a_malformed_list_is_refused_by_the_clients_naming_the_entry():
    with pytest.raises(ValueError, match=r"entry 2 of .*'tcp://b' is not a ZeroMQ endpoint"):
        Client("tcp://a:1,tcp://b")
    with pytest.raises(ValueError, match=r"entry 1 .* is empty"):
        AsyncClient(",tcp://b:1")
    with pytest.raises(argparse.ArgumentTypeError):
        endpoints("tcp://a:1,tcp://a:1")


def test_the_curve_keys_serve_every_broker_of_the_list(tmp_path):
    """With --frontend-curve every broker of a cluster holds its key set: the client's one
    set of keys opens the first broker (a black hole here) and the next alike."""
    create_keys(tmp_path / "keys")
    broker = Keys(tmp_path / "keys").broker(secret=True)
    context = zmq.Context()
    servers = []
    for _ in range(2):
        server = context.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        server.curve_secretkey = broker.secret
        server.curve_publickey = broker.public
        server.curve_server = True
        servers.append((server, f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"))
    (hole, hole_endpoint), (live, live_endpoint) = servers
    stop = threading.Event()

    def answer() -> None:  # every GET of a BATCH gets its key as value
        while not stop.is_set():
            if live.poll(20):
                identity, *frames = live.recv_multipart()
                subs = split_batch(frames)[1]
                replies = tuple(Reply(Status.OK, sub[1], 0, None, sub[2]) for sub in subs)
                live.send_multipart([identity, *encode_batch_reply(BatchReply(0, replies))])

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with Client(
            f"{hole_endpoint},{live_endpoint}",
            timeout_s=TIMEOUT_S,
            attempt_s=ATTEMPT_S,
            context=context,
            keys=tmp_path / "keys",
            first_broker=0,
        ) as kv:
            assert [item.value for item in kv.get_many(["a", "b"])] == [b"a", b"b"]
            assert kv.retries == 1
        assert hole.poll(0)  # the first broker took the batch: its CURVE handshake passed
    finally:
        stop.set()
        thread.join(5)
        for server, _ in servers:
            server.close(linger=0)
        context.term()


def test_asyncio_under_steady_load_leaves_a_broker_that_answers_nothing(setup):
    """Calls keep coming (a gateway's load) while the first broker takes them all and answers
    none: the client still moves on after one resend interval, and no call times out."""
    hole = setup.black_hole

    async def scenario() -> None:
        async with AsyncClient(
            f"{hole.endpoint},{setup.live}", timeout_s=1.2, attempt_s=ATTEMPT_S, first_broker=0
        ) as kv:
            calls = []
            for n in range(30):  # one call every 50 ms for 1.5 s: longer than the timeout
                calls.append(asyncio.ensure_future(kv.set(f"steady:{n}", b"v")))
                await asyncio.sleep(0.05)
            await asyncio.gather(*calls)  # a Timeout would raise here
            assert kv.brokers.endpoint == setup.live

    asyncio.run(scenario())
    assert {setup.applied[b"steady:%d" % n] for n in range(30)} == {1}


def test_a_dead_broker_beside_one_that_waits_does_not_cut_the_timeout_short(setup):
    # One broker dead, the other up but without an answer yet (its shard has no leader): the
    # client went back and forth and gave up after connect_timeout_s with "not reachable",
    # counting every failed send since the first as failures in a row (a newcomer's test).
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with Client(
        f"{nobody},{setup.black_hole.endpoint}",
        timeout_s=TIMEOUT_S,
        attempt_s=ATTEMPT_S,
        connect_timeout_s=0.5,
        context=setup.context,
        first_broker=0,
    ) as kv:
        started = time.monotonic()
        with pytest.raises(Timeout, match="no reply"):
            kv.set("waits", b"v")
        assert time.monotonic() - started >= TIMEOUT_S * 0.9  # its whole timeout, not 0.5 s
