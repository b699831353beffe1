"""A full disk refuses writes (NO_SPACE), keeps serving reads, and resumes by itself (issue 10,
item 19). Before, every write that hit ENOSPC made the worker exit."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from workers.aof import DurabilityError, FsyncPolicy, LogReader, SetRecord
from workers.persist import NO_SPACE_CHECK_S, NO_SPACE_RESUME_BYTES, Durability
from workers.shard import Shard, take_shard
from zkv.protocol import Dispatch, DispatchBatch, Kind, Reply, Request, Status, decode_batch_reply

pytestmark = pytest.mark.unit


class Disk:
    """The write function of a disk that fills up: when ``full``, the first write is cut
    short (half its bytes land) and every later one fails with ENOSPC, as a real disk does."""

    def __init__(self, error: int = errno.ENOSPC) -> None:
        self.full = False
        self.calls = 0
        self.error = error
        self._cut = False
        self.free = 10 * NO_SPACE_RESUME_BYTES

    def __call__(self, fd: int, data: memoryview) -> int:
        self.calls += 1
        if not self.full:
            return os.write(fd, data)
        if not self._cut and len(data) > 1:
            self._cut = True
            return os.write(fd, data[: len(data) // 2])
        raise OSError(self.error, os.strerror(self.error))

    def fill(self) -> None:
        self.full, self._cut, self.free = True, False, 0

    def free_up(self) -> None:
        self.full, self.free = False, 10 * NO_SPACE_RESUME_BYTES


class Seconds:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def disk() -> Disk:
    return Disk()


@pytest.fixture
def seconds() -> Seconds:
    return Seconds()


@pytest.fixture
def durability(tmp_path: Path, disk: Disk, seconds: Seconds) -> Durability:
    return Durability(
        tmp_path / "data",
        FsyncPolicy.ALWAYS,
        monotonic=seconds,
        write=disk,
        free_bytes=lambda path: disk.free,
    )


@pytest.fixture
def tokens() -> Iterator[int]:
    return itertools.count(1)


def batch(shard: Shard, tokens: Iterator[int], *requests: Request) -> list[Reply]:
    replies = shard.handle_batch([Dispatch(next(tokens), r) for r in requests])
    assert all(isinstance(r, Reply) for r in replies)
    return replies  # type: ignore[return-value]


def set_(request_id: int, key: bytes, value: bytes = b"v") -> Request:
    return Request(Kind.SET, request_id, key, value)


def get(key: bytes) -> Request:
    return Request(Kind.GET, 0, key)


def logged_keys(durability: Durability) -> list[bytes]:
    with LogReader(durability.shard_dir(0) / "log") as reader:
        return [r.key for _, r in reader.records() if isinstance(r, SetRecord)]


def test_a_full_disk_refuses_the_batch_writes_and_still_serves_reads(
    durability: Durability, disk: Disk, tokens: Iterator[int]
) -> None:
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    assert [r.status for r in batch(shard, tokens, set_(1, b"a"), set_(2, b"b"))] == [
        Status.OK,
        Status.OK,
    ]
    log_path = durability.shard_dir(0) / "log"
    size = log_path.stat().st_size
    disk.fill()
    replies = batch(
        shard,
        tokens,
        set_(3, b"c"),  # new: refused
        get(b"c"),  # after the write: sees that it was not applied
        set_(1, b"a"),  # a retry of an acknowledged write: answered from memory
        Request(Kind.DEL, 4, b"a"),  # would have to be logged: refused
        Request(Kind.DEL, 5, b"nothing"),  # changes nothing: answered
        get(b"a"),
    )
    assert [r.status for r in replies] == [
        Status.NO_SPACE,
        Status.NOT_FOUND,
        Status.OK,
        Status.NO_SPACE,
        Status.NOT_FOUND,
        Status.OK,
    ]
    assert replies[0].body is not None and b"the disk is full" in replies[0].body
    assert b"No space left on device" in replies[0].body
    assert replies[5].body == b"v"
    assert log_path.stat().st_size == size  # the half-written record was cut off
    assert logged_keys(durability) == [b"a", b"b"]
    # Meanwhile writes are refused before they are applied: no write reaches the disk.
    calls = disk.calls
    assert batch(shard, tokens, set_(6, b"d"))[0].status == Status.NO_SPACE
    assert disk.calls == calls
    assert batch(shard, tokens, get(b"b"))[0].status == Status.OK


def test_writes_resume_by_themselves_once_space_is_freed(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    batch(shard, tokens, set_(1, b"a"))
    disk.fill()
    assert batch(shard, tokens, set_(2, b"b"))[0].status == Status.NO_SPACE
    disk.free_up()
    shard.tick()  # not yet: the free space is looked at every NO_SPACE_CHECK_S
    assert batch(shard, tokens, set_(3, b"b"))[0].status == Status.NO_SPACE
    seconds.now += NO_SPACE_CHECK_S
    shard.tick()
    assert batch(shard, tokens, set_(4, b"b"), get(b"b"))[1].status == Status.OK
    shard.close()
    again = take_shard(0, 2, None, durability, FakeClock()).shard
    assert sorted(e.key for e in again.store.entries()) == [b"a", b"b"]  # nothing lost
    assert logged_keys(durability) == [b"a", b"b"]


def test_a_batch_dispatch_and_lone_dispatches_are_refused_op_by_op(
    durability: Durability, disk: Disk
) -> None:
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    disk.fill()
    ops = ((int(Kind.SET), 1, b"k", b"v", None, None), (int(Kind.GET), 2, b"k", None, None, None))
    keyed = (5, int(Kind.SET), 3, b"j", b"v", None, None)
    answers = shard.handle_batch([DispatchBatch(4, ops), keyed])  # type: ignore[list-item]
    assert isinstance(answers[0], list) and isinstance(answers[1], list)
    assert [r.status for r in decode_batch_reply(answers[0]).replies] == [
        Status.NO_SPACE,
        Status.NOT_FOUND,
    ]
    assert answers[1][0][2] == Status.NO_SPACE  # a REPLY's status byte


def test_an_io_error_that_is_not_a_full_disk_still_stops_the_worker(
    durability: Durability, tokens: Iterator[int]
) -> None:
    disk = Disk(errno.EIO)
    shard = take_shard(0, 1, None, replace(durability, write=disk), FakeClock()).shard
    disk.fill()
    with pytest.raises(DurabilityError):
        batch(shard, tokens, set_(1, b"a"))


def test_a_failed_fsync_still_stops_the_worker_even_for_enospc(
    durability: Durability, tokens: Iterator[int]
) -> None:
    def fsync(fd: int) -> None:
        if failing:
            raise OSError(errno.ENOSPC, "No space left on device")

    failing = False
    shard = take_shard(0, 1, None, replace(durability, fsync=fsync), FakeClock()).shard
    failing = True  # after a failed fsync the page cache's state is unknown (fsyncgate)
    with pytest.raises(DurabilityError):
        batch(shard, tokens, set_(1, b"a"))


def test_compaction_on_a_full_disk_keeps_the_old_log_and_gives_its_room_back(
    durability: Durability, disk: Disk, tokens: Iterator[int]
) -> None:
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    batch(shard, tokens, *(set_(i, b"k%d" % i) for i in range(1, 50)))
    files = shard.files
    assert files is not None
    log_bytes = files.log_path.read_bytes()
    disk.fill()
    files.start_rewrite(shard.store, shard.memory)
    assert files.wait_rewrite(5.0)
    shard.tick()  # the thread failed: the rewrite is abandoned
    assert not files.rewriting
    assert not files.rewrite_path.exists()  # the scratch file no longer takes room
    assert files.log_path.read_bytes() == log_bytes
    assert batch(shard, tokens, get(b"k7"))[0].status == Status.OK
