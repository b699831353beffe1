"""Request ids of forked processes never repeat (issue 10, item 2).

A client made before a fork, unused, is copied into every child; ids drawn from a generator
seeded once would be the same in each, and a second child's DEL would be answered from a
worker's memory as a retry of the first's, never applied. Each test forks children that use
an inherited client (its sockets replaced by a capture, so no broker is needed and no ZeroMQ
context is touched after the fork), writes the ids they sent to a pipe, and checks that no
two children sent the same id.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from zkv.aio import AsyncClient
from zkv.client import Client
from zkv.protocol import Kind, decode_request, split_batch

pytestmark = pytest.mark.unit

CHILDREN = 3
ENDPOINT = "tcp://127.0.0.1:9"  # never connected: the tests capture what would be sent


class Captured(Exception):
    """Raised by the fake send with what it was given, to stop the client there."""

    def __init__(self, frames: list[bytes]) -> None:
        super().__init__("captured")
        self.frames = frames


def in_children(draw: Callable[[], list[int]]) -> list[list[int]]:
    """The ids ``draw`` returns in each of CHILDREN forked children, read from pipes."""
    results = []
    for _ in range(CHILDREN):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                os.close(read_end)
                os.write(write_end, json.dumps(draw()).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert status == 0, "the child failed"
        results.append(json.loads(data))
    return results


def capture_sync(client: Client) -> Callable[[], list[int]]:
    """What a child does with the inherited sync client: one SET alone and a pipeline of three
    operations; returns the request and batch ids they would have sent."""

    def send(socket: Any, frames: list[bytes], deadline: float) -> bool:
        raise Captured(list(frames))

    def draw() -> list[int]:
        client._connected_socket = lambda: None  # type: ignore[method-assign]
        client._send = send  # type: ignore[method-assign]
        ids = []
        try:
            client.set(b"k", b"v")
        except Captured as exc:
            ids.append(decode_request(exc.frames).request_id)
        try:
            client.execute([(int(Kind.DEL), b"k", None, None)] * 3)
        except Captured as exc:
            batch_id, subs = split_batch(exc.frames)
            ids += [batch_id, *(sub[1] for sub in subs)]
        return ids

    return draw


class FakeSocket:
    """Enough of a DEALER for AsyncClient's flush: keeps what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent.append(list(frames))

    def get(self, option: int) -> int:
        return 0  # nothing to read

    def close(self, linger: int = 0) -> None:
        pass


def capture_async(client: AsyncClient) -> Callable[[], list[int]]:
    """What a child does with the inherited asyncio client: three calls in one turn of a new
    event loop; returns the batch and request ids of what they would have sent."""

    def draw() -> list[int]:
        socket = FakeSocket()

        def reset_socket(open_new: bool) -> Any:
            client._socket = socket if open_new else None  # type: ignore[assignment]
            return client._socket

        client._reset_socket = reset_socket  # type: ignore[method-assign]

        async def run() -> None:
            for key in (b"a", b"b", b"c"):
                client.submit(int(Kind.DEL), key)
            while not socket.sent:
                await asyncio.sleep(0)  # a turn of the loop: the flush runs
            await client.close()

        asyncio.run(run())
        ids = []
        for frames in socket.sent:
            batch_id, subs = split_batch(frames)
            ids += [batch_id, *(sub[1] for sub in subs)]
        return ids

    return draw


def assert_distinct(per_child: list[list[int]]) -> None:
    assert all(per_child), "every child sent something"
    flat = [rid for ids in per_child for rid in ids]
    assert len(set(flat)) == len(flat), f"ids repeat across forked children: {per_child}"


def test_forked_children_of_an_unused_sync_client_send_distinct_ids():
    client = Client(ENDPOINT)
    try:
        assert_distinct(in_children(capture_sync(client)))
    finally:
        client.close()


def test_forked_children_of_a_used_sync_client_send_distinct_ids():
    """The parent drew ids before the fork (a pool of them may be left): the children must not
    draw the ones it left."""
    client = Client(ENDPOINT)
    try:
        parent = capture_sync(client)()
        per_child = in_children(capture_sync(client))
        assert_distinct([parent, *per_child])
    finally:
        client.close()


def test_forked_children_of_an_unused_asyncio_client_send_distinct_ids():
    client = AsyncClient(ENDPOINT)
    assert_distinct(in_children(capture_async(client)))
