"""Issue 12's commands through the real client over real sockets: a broker and two in-memory
workers in threads of the test process. Every method three ways (the blocking client, a
pipeline, the asyncio client), the lock context managers with their background refresh, and a
lock wait served by the broker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from broker.core import BrokerConfig
from broker.server import ServerConfig, Stopper, serve
from tests.cluster import free_port, wait_for
from workers.worker import Worker, WorkerConfig
from zkv import Client, Conflict, Item, Lock, LockLost, NotFound, PreconditionFailed
from zkv.aio import AsyncClient
from zkv.protocol import Kind, Request, Status

pytestmark = pytest.mark.integration

INTERVAL_S = 0.1
API = ("sync", "pipeline", "async")
MISSING_IS_NONE = {"get", "expire", "persist"}  # a pipeline's None for a missing key


class Cluster:
    def __init__(self, frontend: str, context: zmq.Context) -> None:
        self.frontend = frontend
        self.context = context

    def client(self, **options: float) -> Client:
        return Client(self.frontend, context=self.context, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
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
        yield Cluster(frontend, context)
    finally:
        probe.close()
        for worker in workers:
            worker.stop()
        stopper.stopping = True
        for thread in threads:
            thread.join(10)
        context.term()


class Api:
    """One way of calling the client's methods (``kind``: sync, pipeline or async), so that a
    test reads the same for the three: ``api("get", key)`` returns or raises as
    :class:`zkv.Client` does."""

    def __init__(self, kind: str, cluster: Cluster) -> None:
        self.kind = kind
        self.sync = cluster.client(timeout_s=5.0)
        self.loop = asyncio.new_event_loop()
        self.aio = AsyncClient(cluster.frontend, timeout_s=5.0, context=cluster.context)

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "sync":
            return getattr(self.sync, name)(*args, **kwargs)
        if self.kind == "async":
            return self.loop.run_until_complete(getattr(self.aio, name)(*args, **kwargs))
        pipe = self.sync.pipeline()
        getattr(pipe, name)(*args, **kwargs)
        (result,) = pipe.execute()
        if result is None and name in MISSING_IS_NONE:
            raise NotFound(args[0])
        return result

    def close(self) -> None:
        self.loop.run_until_complete(self.aio.close())
        self.loop.close()
        self.sync.close()


@pytest.fixture(params=API)
def api(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[Api]:
    calls = Api(request.param, cluster)
    yield calls
    calls.close()


def now_ms() -> int:
    return int(time.time() * 1000)


# --- versions and conditional writes ---------------------------------------------------------


def test_versions_grow_with_every_write_and_get_reads_them(api):
    key = f"{api.kind}:v"
    api("set", key, b"1")
    first = api("get", key)
    assert first.value == b"1" and first.version > 0
    put = api("put", key, b"2", ttl_s=60)
    assert put.value == b"2" and put.version > first.version
    assert put.deadline_ms is not None and put.deadline_ms > now_ms()
    assert api("get", key) == put
    touched = api("get", key, touch_s=600)
    assert touched.value == b"2" and touched.deadline_ms > put.deadline_ms + 500_000
    assert touched.version > put.version  # a touch is a write


def test_nx_xx_and_if_version_refuse_with_precondition_failed(api):
    key = f"{api.kind}:cond"
    api("set", key, b"a", nx=True)
    with pytest.raises(PreconditionFailed):
        api("set", key, b"b", nx=True)
    with pytest.raises(PreconditionFailed):
        api("set", f"{key}:absent", b"b", xx=True)
    api("set", key, b"c", xx=True)
    version = api("get", key).version
    with pytest.raises(PreconditionFailed, match=str(version)):
        api("set", key, b"d", if_version=version - 1)
    api("set", key, b"d", if_version=version)
    assert api("get", key).value == b"d"
    with pytest.raises(NotFound):
        api("get", f"{key}:absent")


def test_set_with_get_returns_the_previous_item(api):
    key = f"{api.kind}:old"
    assert api("set", key, b"first", get=True) is None
    before = api("get", key)
    old = api("set", key, b"second", ttl_s=60, get=True)
    assert old == before


def test_delete_if_version(api):
    key = f"{api.kind}:del"
    version = api("put", key, b"x").version
    with pytest.raises(PreconditionFailed):
        api("delete", key, if_version=version + 1)
    assert api("delete", key, if_version=version) is True
    with pytest.raises(PreconditionFailed):
        api("delete", key, if_version=version)  # absent now
    assert api("delete", key) is False


# --- counters ---------------------------------------------------------------------------------


def test_incr_counts_from_zero_keeps_the_deadline_and_refuses_what_is_not_an_integer(api):
    key = f"{api.kind}:n"
    assert api("incr", key) == 1
    assert api("incr", key, 41, ttl_s=60) == 42
    assert api("incr", key, -50) == -8
    value, version, deadline_ms = api("incr_item", key, 8)
    assert value == 0 and version > 0 and deadline_ms is not None and deadline_ms > now_ms()
    assert api("get", key).value == b"0"
    api("set", f"{key}:text", b"ten")
    with pytest.raises(Conflict, match="not an integer"):
        api("incr", f"{key}:text")
    api("set", f"{key}:max", str(2**63 - 1))
    with pytest.raises(Conflict, match="overflow"):
        api("incr", f"{key}:max")
    assert api("get", f"{key}:max").value == str(2**63 - 1).encode()  # nothing changed


# --- TTLs --------------------------------------------------------------------------------------


def test_expire_persist_and_ttl_ms(api):
    key = f"{api.kind}:ttl"
    api("set", key, b"x")
    assert api("ttl_ms", key) is None
    deadline_ms = api("expire", key, 30)
    assert abs(deadline_ms - (now_ms() + 30_000)) < 5_000
    assert 20_000 < api("ttl_ms", key) <= 30_000
    version = api("persist", key)
    assert version == api("get", key).version and api("ttl_ms", key) is None
    for name, args in (("expire", (5,)), ("persist", ()), ("ttl_ms", ())):
        with pytest.raises(NotFound):
            api(name, f"{key}:absent", *args)


# --- locks ---------------------------------------------------------------------------------


def test_lock_tokens_grow_and_fence_out_an_old_holder(api):
    name = f"{api.kind}:lock"
    first = api("acquire_lock", name, 30)
    assert isinstance(first, Lock) and first.token > 0 and first.expires_at_ms > now_ms()
    with pytest.raises(Conflict) as held:
        api("acquire_lock", name, 30)
    assert held.value.deadline_ms == first.expires_at_ms
    assert api("check_fence", name, first.token) is True
    later = api("refresh_lock", name, first.token, 60)
    assert later > first.expires_at_ms
    api("set", f"{name}:data", b"a", fence=first)
    api("release_lock", name, first.token)
    second = api("acquire_lock", name, 30)
    assert second.token > first.token
    assert api("check_fence", name, first.token) is False
    with pytest.raises(Conflict, match=f"fence token {first.token}"):
        api("set", f"{name}:data", b"stale", fence=first)
    with pytest.raises(Conflict):
        api("incr", f"{name}:n", fence=(name, first.token))
    with pytest.raises(Conflict):
        api("release_lock", name, first.token)
    with pytest.raises(Conflict):
        api("refresh_lock", name, first.token, 5)
    api("set", f"{name}:data", b"b", fence=second)
    # A TTL change is a write: fenced the same way (EXPIRE with FENCE), never silently not.
    with pytest.raises(Conflict, match=f"fence token {first.token}"):
        api("expire", f"{name}:data", 5, fence=first)
    with pytest.raises(Conflict):
        api("persist", f"{name}:data", fence=(name, first.token))
    assert api("expire", f"{name}:data", 60, fence=second) > now_ms()
    assert api("persist", f"{name}:data", fence=second) > 0
    assert api("delete", f"{name}:data", fence=second) is True
    with pytest.raises(NotFound):
        api("get", f"{name}:data")
    api("release_lock", name, second.token)


def test_the_data_shard_refuses_an_older_fence_token_even_without_the_pre_check(cluster):
    with cluster.client() as kv:
        first = kv.acquire_lock("raw:lock", 30)
        kv.release_lock("raw:lock", first.token)
        second = kv.acquire_lock("raw:lock", 30)
        kv.set("raw:data", b"new", fence=second)  # the shard has seen the newer token
        stale = Request(Kind.SET, 0, b"raw:data", b"old", fence=(b"raw:lock", first.token))
        reply = kv.request(stale, checked=False)
        assert reply.status == Status.CONFLICT
        assert kv.get("raw:data").value == b"new"


def test_a_lock_wait_is_served_when_the_holder_lets_go(cluster):
    with cluster.client() as holder, cluster.client() as waiter:
        held = holder.acquire_lock("wait:lock", 0.5)  # not released: it lapses
        started = time.monotonic()
        got = waiter.acquire_lock("wait:lock", 10, wait_s=10)
        assert got.token > held.token
        assert time.monotonic() - started < 5
        with pytest.raises(Conflict):
            holder.acquire_lock("wait:lock", 10, wait_s=0.2)


def test_a_pipeline_carries_every_new_command_in_one_execute(cluster):
    with cluster.client() as kv:
        lock = kv.acquire_lock("pipe:lock", 30)
        with kv.pipeline() as pipe:
            pipe.set("pipe:a", b"1", nx=True).put("pipe:b", b"2").incr("pipe:n", 5, ttl_s=60)
            pipe.expire("pipe:a", 30).persist("pipe:a").ttl_ms("pipe:n").get("pipe:a")
            pipe.set("pipe:f", b"x", fence=lock).check_fence("pipe:lock", lock.token)
            pipe.set("pipe:a", b"no", nx=True)
            results = pipe.execute(raise_on_error=False)
        a, b, n, expired, persisted, ttl, got, fenced, fresh, refused = results
        assert a is None and isinstance(b, Item) and n == 5
        assert expired > now_ms() and persisted == got.version and got.value == b"1"
        assert 50_000 < ttl <= 60_000 and fenced is None and fresh is True
        assert isinstance(refused, PreconditionFailed)
        kv.release_lock("pipe:lock", lock.token)


# --- the lock context managers -----------------------------------------------------------------


def refreshed(lock: Lock, since: int) -> Callable[[], bool]:
    return lambda: lock.expires_at_ms > since + 400 or None  # type: ignore[return-value]


def test_with_lock_refreshes_in_the_background_and_releases_at_the_end(cluster):
    with cluster.client() as kv, cluster.client() as other:
        with kv.lock("cm:lock", ttl_s=0.6, refresh=True) as lock:
            first_expiry = lock.expires_at_ms
            wait_for(refreshed(lock, first_expiry), "two refreshes", timeout_s=10)
            with pytest.raises(Conflict):
                other.acquire_lock("cm:lock", 5)  # still held, well past its first TTL
            assert not lock.lost
        again = other.acquire_lock("cm:lock", 5)  # released: no wait
        assert again.token > lock.token
        other.release_lock("cm:lock", again.token)


def test_with_lock_releases_when_the_block_raises(cluster):
    with cluster.client() as kv:
        with pytest.raises(RuntimeError, match="the block's"):
            with kv.lock("cm:raise", ttl_s=30, refresh=True):
                raise RuntimeError("the block's own error")
        kv.release_lock("cm:raise", kv.acquire_lock("cm:raise", 5).token)


def test_a_lost_lock_surfaces_through_lock_lost(cluster):
    with cluster.client() as kv, cluster.client() as thief:
        with pytest.raises(LockLost):
            with kv.lock("cm:lost", ttl_s=0.6, refresh=True) as lock:
                thief.release_lock("cm:lost", lock.token)  # as if it had lapsed ...
                taken = thief.acquire_lock("cm:lost", 30)  # ... and been taken
                wait_for(lambda: lock.lost or None, "the refresher to see it", timeout_s=10)
                with pytest.raises(LockLost):
                    lock.check()
        thief.release_lock("cm:lost", taken.token)


def test_async_with_lock_refreshes_releases_and_reports_a_loss(cluster):
    async def scenario() -> None:
        async with AsyncClient(cluster.frontend, context=cluster.context) as kv:
            async with kv.lock("acm:lock", ttl_s=0.6, refresh=True) as lock:
                first_expiry = lock.expires_at_ms
                deadline = time.monotonic() + 10
                while lock.expires_at_ms <= first_expiry + 400:
                    assert time.monotonic() < deadline, "no refresh"
                    await asyncio.sleep(0.05)
            again = await kv.acquire_lock("acm:lock", 5)
            await kv.release_lock("acm:lock", again.token)
            with pytest.raises(LockLost):
                async with kv.lock("acm:lost", ttl_s=0.6, refresh=True) as lost:
                    await kv.release_lock("acm:lost", lost.token)
                    taken = await kv.acquire_lock("acm:lost", 30)
                    while not lost.lost:
                        assert time.monotonic() < deadline + 10, "the loss was not seen"
                        await asyncio.sleep(0.05)
            await kv.release_lock("acm:lost", taken.token)

    asyncio.run(scenario())


def test_a_lock_wait_longer_than_the_clients_timeout_is_waited_for(cluster):
    """The broker holds a waiting LOCK: the clients allow its wait on top of their timeout
    (they resend it every attempt interval meanwhile, which the broker merges with the waiter:
    a restarted broker lost its queue, tests/process/test_locks_process.py)."""
    with cluster.client() as holder, cluster.client(timeout_s=0.5, attempt_s=0.2) as waiter:
        held = holder.acquire_lock("patient:sync", 0.8)
        got = waiter.acquire_lock("patient:sync", 0.8, wait_s=10)
        assert got.token > held.token
        with waiter.pipeline() as pipe:
            results = pipe.acquire_lock("patient:sync", 5, wait_s=10).execute()
        assert isinstance(results[0], Lock) and results[0].token > got.token  # after got lapsed

    async def scenario() -> None:
        async with AsyncClient(
            cluster.frontend, timeout_s=0.5, attempt_s=0.2, context=cluster.context
        ) as kv:
            first = await kv.acquire_lock("patient:async", 0.8)
            second = await kv.acquire_lock("patient:async", 5, wait_s=10)
            assert second.token > first.token

    asyncio.run(scenario())


def test_an_async_lock_wait_ends_when_asked_without_a_resend(cluster):
    """As the wait runs out the broker answers CONFLICT: a resend racing that answer went out
    on a fresh socket (the answer to the old one lost) with a fresh wait (restarted at the
    broker), so a 1 s wait ended with the lock once the holder's lease did, or a 10 s one
    in Timeout. The clients stay silent from one attempt before the wait's end to one past it."""

    async def scenario() -> None:
        async with AsyncClient(cluster.frontend, context=cluster.context) as kv:
            holder = await kv.acquire_lock("wait:ends", 2.5)
            with pytest.raises(Conflict):
                await kv.acquire_lock("wait:ends", 5, wait_s=1)
            assert kv.retries == 0
            # The lease ends meanwhile. Silences before the last attempt of the wait are resent
            # (a restarted broker lost its waiters); the broker merges them with the waiter.
            got = await kv.acquire_lock("wait:ends", 5, wait_s=10)
            assert got.token > holder.token

    asyncio.run(scenario())
