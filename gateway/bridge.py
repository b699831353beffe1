"""The gateway's zkv client inside an event loop: blocking calls for the app, batches on the wire.

The Bottle app is plain blocking WSGI code: a route calls ``kv.get(key)`` and uses the result.
The event-loop server (gateway/http11.py) runs each request's app call in its own greenlet. When
the route calls :class:`LoopClient`, the call is handed to :class:`zkv.aio.AsyncClient`, which
queues it, and the greenlet switches back to the event loop, which goes on serving other
connections. Every call queued in the same turn of the loop leaves in one BATCH message (that is
what makes the gateway cheap per request: one ZeroMQ message, one broker turn and one worker
turn for many HTTP requests). When the reply comes, the loop switches back into the greenlet and
the route carries on as if the call had blocked.

Bottle keeps the current request and response in thread-locals, and every greenlet of the loop
runs on the same thread: a route parked in ``kv.get`` would come back to the request and
response of whichever request Bottle bound last. :class:`LoopClient` therefore saves Bottle's
request and response state before each switch out and puts it back when switched in.

``/all`` and ``/ping`` are rare and not batched: they run on a blocking
:class:`zkv.client.Client` in a one-thread executor, and the greenlet waits on that future the
same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import bottle
import greenlet
import zmq

from zkv.aio import AsyncClient
from zkv.calls import Lock, as_bytes, new_id
from zkv.client import ALL_PAGE_KEYS, Client, Item, dealer, paged
from zkv.errors import Unavailable, ZkvError
from zkv.keys import frontend_curve
from zkv.protocol import Entry, Kind, ProtocolError, Request, Status, decode_reply, encode_request

STATS_RESEND_S = 0.05  # a STATS not sent yet (no broker connected) is tried again this often

T = TypeVar("T")

# Bottle's thread-local state: the request's environ and the response's five fields.
_RESPONSE_FIELDS = ("_status_line", "_status_code", "_cookies", "_headers", "body")
_UNSET = object()


def _save_bottle() -> tuple[Any, ...]:
    """Bottle's current request and response state (whatever of it is set)."""
    try:
        request_environ = bottle.request.environ
    except RuntimeError:  # no request bound on this thread yet
        request_environ = _UNSET
    response = bottle.response
    fields = []
    for name in _RESPONSE_FIELDS:
        try:
            fields.append(getattr(response, name))
        except RuntimeError:
            fields.append(_UNSET)
    return (request_environ, *fields)


def _restore_bottle(state: tuple[Any, ...]) -> None:
    """Put back what :func:`_save_bottle` saved."""
    environ = state[0]
    if environ is not _UNSET:
        bottle.request.environ = environ
    response = bottle.response
    for name, value in zip(_RESPONSE_FIELDS, state[1:], strict=True):
        if value is not _UNSET:
            setattr(response, name, value)


def wait(awaitable: asyncio.Future[T] | Coroutine[Any, Any, T]) -> T:
    """Run ``awaitable`` to its end from a request greenlet, serving others meanwhile.

    A coroutine is driven step by step right here, without a Task: each step yields the
    asyncio future it waits on, the greenlet hands that future to its parent (the event loop's
    greenlet, see gateway/http11.py), and is switched back in once the future is done.
    """
    current = greenlet.getcurrent()
    hub = current.parent
    if hub is None:
        raise RuntimeError("LoopClient must be called from a request greenlet of the gateway")
    if isinstance(awaitable, asyncio.Future):
        while not awaitable.done():
            _park(hub, awaitable)
        return awaitable.result()
    coroutine = awaitable
    try:
        step: Any = coroutine.send(None)
        while True:
            if isinstance(step, asyncio.Future):
                step._asyncio_future_blocking = False  # as asyncio.Task does with what it awaits
                if not step.done():
                    _park(hub, step)
                step = coroutine.send(None)
            else:  # a bare yield (asyncio.sleep(0)) or a foreign awaitable: not supported here
                step = coroutine.throw(RuntimeError(f"a gateway call awaited {step!r}"))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _park(hub: greenlet.greenlet, future: asyncio.Future[Any]) -> None:
    """Switch to the loop until ``future`` is done, keeping Bottle's state for this request."""
    state = _save_bottle()
    try:
        hub.switch(future)
    finally:
        _restore_bottle(state)


class LoopClient:
    """A :class:`gateway.app.ClientLike` for apps served by the event-loop worker.

    Args:
        endpoint, timeout_s, connect_timeout_s, keys: as for :class:`zkv.client.Client`
            (``endpoint`` may list several brokers, comma-separated: both clients take it).
        blocking_factory: makes the blocking client for ``all`` and ``ping`` (tests pass fakes).
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float,
        connect_timeout_s: float,
        blocking_factory: Callable[[], Client] | None = None,
        keys: str | None = None,
    ) -> None:
        self.aio = AsyncClient(
            endpoint, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, keys=keys
        )
        self._blocking_factory = blocking_factory or (
            lambda: Client(
                endpoint, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, keys=keys
            )
        )
        self._blocking: Client | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._endpoint = endpoint
        self._curve = frontend_curve(keys)
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._stats_socket: zmq.Socket | None = None
        self._stats_waiting: dict[int, asyncio.Future[Any]] = {}

    def get(self, key: bytes | str, touch_s: float | None = None) -> Item:
        """As :meth:`zkv.client.Client.get` (``touch_s``: move the deadline, atomically)."""
        if touch_s is None:  # the plain read as before: no keyword for the hot path
            return wait(self.aio.get(key))
        return wait(self.aio.get(key, touch_s=touch_s))

    def set(self, key: bytes | str, value: bytes | str, ttl_s: float | None = None) -> int | None:
        """As :meth:`zkv.client.Client.set`."""
        return wait(self.aio.set(key, value, ttl_s))

    def put(
        self,
        key: bytes | str,
        value: bytes | str,
        ttl_s: float | None = None,
        nx: bool = False,
        xx: bool = False,
        if_version: int | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> Item:
        """As :meth:`zkv.client.Client.put`: the new item, its version included (the ETag)."""
        return wait(
            self.aio.put(key, value, ttl_s, nx=nx, xx=xx, if_version=if_version, fence=fence)
        )

    def delete(
        self,
        key: bytes | str,
        if_version: int | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> bool:
        """As :meth:`zkv.client.Client.delete`."""
        if if_version is None and fence is None:
            return wait(self.aio.delete(key))
        return wait(self.aio.delete(key, if_version=if_version, fence=fence))

    def incr_item(
        self,
        key: bytes | str,
        by: int = 1,
        ttl_s: float | None = None,
        fence: tuple[bytes, int] | None = None,
    ) -> tuple[int, int, int | None]:
        """As :meth:`zkv.client.Client.incr_item`: ``(value, version, deadline_ms)``."""
        return wait(self.aio.incr_item(key, by=by, ttl_s=ttl_s, fence=fence))

    def expire(
        self, key: bytes | str, ttl_s: float, fence: tuple[bytes | str, int] | None = None
    ) -> int:
        """As :meth:`zkv.client.Client.expire`: the new deadline."""
        return wait(self.aio.expire(key, ttl_s, fence=fence))

    def persist(self, key: bytes | str, fence: tuple[bytes | str, int] | None = None) -> int:
        """As :meth:`zkv.client.Client.persist`: the new version."""
        return wait(self.aio.persist(key, fence=fence))

    def acquire_lock(self, name: bytes | str, ttl_s: float, wait_s: float = 0) -> Lock:
        """As :meth:`zkv.client.Client.acquire_lock`. The wait is the broker's (LOCK wait_ms):
        this request's greenlet is parked meanwhile, the loop serves the others."""
        return wait(self.aio.acquire_lock(name, ttl_s, wait_s=wait_s))

    def refresh_lock(self, name: bytes | str, token: int, ttl_s: float) -> int:
        """As :meth:`zkv.client.Client.refresh_lock`: the lock's new expiry."""
        return wait(self.aio.refresh_lock(name, token, ttl_s))

    def release_lock(self, name: bytes | str, token: int) -> None:
        """As :meth:`zkv.client.Client.release_lock`."""
        wait(self.aio.release_lock(name, token))

    def all(self, after: bytes | str = b"", limit: int = 0, keys_only: bool = False) -> list[Entry]:
        """As :meth:`zkv.client.Client.all`, on the blocking client's thread."""
        return self._in_thread(lambda client: client.all(after, limit, keys_only))

    def pages(
        self,
        after: bytes | str = b"",
        keys_only: bool = False,
        limit: int = 0,
        page_keys: int = ALL_PAGE_KEYS,
    ) -> Iterator[list[Entry]]:
        """As :meth:`zkv.client.Client.pages`: each page's request on the blocking client's
        thread, the request greenlet waiting between pages."""
        return paged(self.all_once, as_bytes(after, "after"), keys_only, limit, page_keys)

    def all_once(self, after: bytes, limit: int, keys_only: bool = False) -> list[Entry]:
        """As :meth:`zkv.client.Client.all_once`, on the blocking client's thread."""
        return self._in_thread(lambda client: client.all_once(after, limit, keys_only))

    def ping(self) -> dict[str, Any]:
        """As :meth:`zkv.client.Client.ping`, on the blocking client's thread."""
        return self._in_thread(lambda client: client.ping())

    def stats(self) -> dict[str, Any]:
        """As :meth:`zkv.client.Client.stats`, but on the event loop, not the blocking
        client's thread: a scrape once a second through that thread cost the benchmark's
        throughput far more than its CPU (the loop and the thread handing the GIL to each
        other; measured in bench/scrape_cost.py, docs/operations.md)."""
        return wait(self._stats())

    async def _stats(self) -> dict[str, Any]:
        """One STATS on a DEALER of its own, watched by the loop: sent once a broker is
        connected (within ``connect_timeout_s``), answered within ``timeout_s``, else
        Unavailable. No retry: a scrape that fails says so (``zkv_broker_up 0``) and the next
        one asks again."""
        loop = asyncio.get_running_loop()
        socket = self._stats_socket
        if socket is None:
            socket = self._stats_socket = dealer(
                zmq.Context.instance(), self._endpoint, self._curve
            )
            loop.add_reader(socket.FD, self._on_stats_readable)
        request_id = new_id()
        frames = encode_request(Request(Kind.STATS, request_id))
        answer: asyncio.Future[Any] = loop.create_future()
        self._stats_waiting[request_id] = answer
        started = loop.time()
        deadline = started + self._timeout_s
        try:
            while True:
                try:
                    socket.send_multipart(frames, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:  # no broker connected yet (IMMEDIATE)
                    if loop.time() >= started + self._connect_timeout_s:
                        raise Unavailable(f"no broker at {self._endpoint}") from None
                    await asyncio.sleep(STATS_RESEND_S)
            self._on_stats_readable()  # the edge rule: a send may take a reply in
            try:
                reply = await asyncio.wait_for(answer, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise Unavailable(f"no STATS reply from {self._endpoint}") from None
        finally:
            self._stats_waiting.pop(request_id, None)
        if reply.status != Status.OK:
            raise ZkvError(f"STATS answered {reply.status.name}: {reply.body!r}")
        try:
            info = json.loads(reply.body or b"{}")
        except ValueError as exc:
            raise ZkvError(f"malformed STATS reply: {exc}") from None
        if not isinstance(info, dict):
            raise ZkvError("malformed STATS reply: not an object")
        return info

    def _on_stats_readable(self) -> None:
        """Read every reply waiting on the STATS socket; each settles its request's future
        (late or unknown ones are dropped)."""
        socket = self._stats_socket
        while socket is not None:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode_reply(frames)
            except ProtocolError:
                continue
            future = self._stats_waiting.get(reply.request_id)
            if future is not None and not future.done():
                future.set_result(reply)

    def _in_thread(self, call: Callable[[Client], T]) -> T:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="zkv-blocking"
            )

        def run() -> T:
            if self._blocking is None:
                self._blocking = self._blocking_factory()
            return call(self._blocking)

        return wait(asyncio.wrap_future(self._executor.submit(run)))

    async def close(self) -> None:
        """Close the asyncio client, the STATS socket, then the blocking one on its thread."""
        await self.aio.close()
        socket, self._stats_socket = self._stats_socket, None
        if socket is not None:
            asyncio.get_running_loop().remove_reader(socket.FD)
            socket.close(linger=0)
        executor, self._executor = self._executor, None
        if executor is not None:

            def close_blocking() -> None:
                if self._blocking is not None:
                    self._blocking.close()

            await asyncio.wrap_future(executor.submit(close_blocking))
            executor.shutdown(wait=False)
