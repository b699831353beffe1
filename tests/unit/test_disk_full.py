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
from workers.persist import NO_SPACE_CHECK_S, NO_SPACE_REWRITE_S, Durability, ShardFiles
from workers.shard import Shard, take_shard
from zkv.protocol import Dispatch, DispatchBatch, Kind, Reply, Request, Status, decode_batch_reply

pytestmark = pytest.mark.unit

RESERVE = 1024 * 1024  # the disk reserve of these tests (ZKV_DISK_RESERVE)
MiB = 1024 * 1024


class Disk:
    """A disk of ``capacity`` bytes holding the files of the data directory (what they take is
    counted from their sizes), with its write function and its statvfs. ``fill()`` makes it
    full behind the worker's back (another process): the first write is cut short (half its
    bytes land) and every later one fails with ENOSPC, as a real disk does."""

    def __init__(self, error: int = errno.ENOSPC) -> None:
        self.full = False
        self.calls = 0
        self.error = error
        self._cut = False
        self.root: Path | None = None
        self.capacity = 1 << 40

    def used(self) -> int:
        if self.root is None or not self.root.exists():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    @property
    def free(self) -> int:
        return 0 if self.full else max(0, self.capacity - self.used())

    def __call__(self, fd: int, data: memoryview) -> int:
        self.calls += 1
        if not self.full:
            room = min(len(data), self.free)
            if room:
                return os.write(fd, data[:room])
        elif not self._cut and len(data) > 1:
            self._cut = True
            return os.write(fd, data[: len(data) // 2])
        raise OSError(self.error, os.strerror(self.error))

    def fill(self) -> None:
        self.full, self._cut = True, False

    def free_up(self) -> None:
        self.full = False

    def leave_free(self, free: int) -> None:
        """Size the disk so that ``free`` bytes are free now (a ballast file of another
        program would do the same)."""
        self.capacity = self.used() + free


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
    disk.root = tmp_path / "data"
    return Durability(
        tmp_path / "data",
        FsyncPolicy.ALWAYS,
        monotonic=seconds,
        write=disk,
        free_bytes=lambda path: disk.free,
        reserve_bytes=RESERVE,
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
    disk.root = durability.data_dir
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


def look(shard: Shard, seconds: Seconds) -> None:
    """A second later the timer reads the free space (statvfs) the disk now has."""
    seconds.now += NO_SPACE_CHECK_S
    shard.tick()


def count_replays(files: ShardFiles | None) -> list[int]:
    """Make ``files`` count its replays (and the progress calls of each) in the returned list."""
    assert files is not None
    replays: list[int] = []
    replay = files.replay

    def counting(store, memory, progress=None):  # type: ignore[no-untyped-def]
        replays.append(0)
        return replay(store, memory, progress)

    files.replay = counting  # type: ignore[method-assign]
    return replays


def test_a_set_that_would_not_fit_is_refused_up_front_without_a_replay(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    """The attack of finding F3: with 400,000 keys and 3 MiB free, each 8 MiB SET made the
    worker apply it, hit ENOSPC, and replay the whole log to undo it (seconds on its loop)."""
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    batch(shard, tokens, *(set_(i, b"k%d" % i) for i in range(1, 100)))
    replays = count_replays(shard.files)
    disk.leave_free(RESERVE + 3 * MiB)
    look(shard, seconds)
    calls = disk.calls
    big = batch(shard, tokens, set_(200, b"big", b"x" * (8 * MiB)), get(b"k7"))
    assert [r.status for r in big] == [Status.NO_SPACE, Status.OK]
    assert big[0].body is not None and b"the disk is full" in big[0].body
    assert replays == [] and disk.calls == calls  # refused before anything was applied
    assert batch(shard, tokens, get(b"big"))[0].status == Status.NOT_FOUND
    # Above the reserve there is room for small writes: only the batch that does not fit is
    # refused, and the shard keeps accepting writes.
    assert batch(shard, tokens, set_(201, b"small", b"y" * 1000))[0].status == Status.OK
    assert batch(shard, tokens, set_(202, b"big", b"x" * (8 * MiB)))[0].status == Status.NO_SPACE
    assert replays == []


def test_after_a_refusal_writes_resume_only_with_room_for_the_refused_write(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    """Hysteresis: before, writes resumed at a fixed 1 MiB free, so the refused 8 MiB SET came
    back and was undone (replayed) again, once a second."""
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    batch(shard, tokens, set_(1, b"a"))
    replays = count_replays(shard.files)
    disk.leave_free(RESERVE // 2)  # below the reserve
    look(shard, seconds)
    assert batch(shard, tokens, set_(2, b"big", b"x" * (8 * MiB)))[0].status == Status.NO_SPACE
    disk.leave_free(RESERVE + 2 * MiB)  # more than the old 1 MiB, less than the 8 MiB refused
    look(shard, seconds)
    seconds.now += NO_SPACE_CHECK_S
    shard.tick()
    assert batch(shard, tokens, set_(3, b"b"))[0].status == Status.NO_SPACE
    disk.leave_free(RESERVE + 9 * MiB)
    look(shard, seconds)
    seconds.now += NO_SPACE_CHECK_S
    shard.tick()
    assert batch(shard, tokens, set_(4, b"b"))[0].status == Status.OK
    assert replays == []


def test_an_unforeseen_enospc_replays_once_with_heartbeats_and_not_every_second(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    """Another process fills the disk behind the estimate: the batch is undone by one replay
    (which calls the worker's heartbeat), then writes stay refused until there is room for
    the write that failed, so the same SET does not replay the log again a second later."""
    progress: list[float] = []
    shard = take_shard(0, 1, None, durability, FakeClock(), lambda: progress.append(0)).shard
    batch(shard, tokens, *(set_(i, b"k%d" % i) for i in range(1, 100)))
    replays = count_replays(shard.files)
    disk.fill()  # the estimate still says there is room

    def slow_seconds() -> float:  # each look at the clock: a second later (a slow replay)
        seconds.now += 1.0
        return seconds.now

    assert shard.files is not None
    shard.files.durability = replace(durability, monotonic=slow_seconds)
    big = b"x" * (4 * MiB)
    assert batch(shard, tokens, set_(200, b"big", big))[0].status == Status.NO_SPACE
    shard.files.durability = durability
    assert len(replays) == 1 and progress  # the replay heartbeated
    disk.free_up()
    disk.leave_free(RESERVE + 2 * MiB)  # the old code resumed at 1 MiB and replayed again
    look(shard, seconds)
    for request_id in range(201, 205):
        seconds.now += NO_SPACE_CHECK_S
        shard.tick()
        assert batch(shard, tokens, set_(request_id, b"big", big))[0].status == Status.NO_SPACE
    assert len(replays) == 1
    assert batch(shard, tokens, get(b"k5"))[0].status == Status.OK


def test_deletes_are_accepted_into_the_reserve(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    batch(shard, tokens, set_(1, b"a"), set_(2, b"b"))
    disk.leave_free(RESERVE // 2)
    look(shard, seconds)
    replies = batch(shard, tokens, Request(Kind.DEL, 3, b"a"), set_(4, b"c"), get(b"a"))
    assert [r.status for r in replies] == [Status.OK, Status.NO_SPACE, Status.NOT_FOUND]
    assert batch(shard, tokens, Request(Kind.DEL, 3, b"a"))[0].status == Status.OK  # a retry
    shard.close()
    again = take_shard(0, 2, None, durability, FakeClock()).shard
    assert [e.key for e in again.store.entries()] == [b"b"]  # the DEL was logged


def test_a_key_seen_expired_on_a_short_disk_stays_gone_after_the_clock_steps_back(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    # Refusing writes, a batch that saw a key expire logged no TIME unless it also held a
    # DEL: the key answered NOT_FOUND came back after a replay with the clock stepped back.
    clock = FakeClock()
    shard = take_shard(0, 1, None, durability, clock).shard
    batch(shard, tokens, Request(Kind.SET, 1, b"k", b"v", ttl_ms=10_000))
    disk.leave_free(RESERVE // 2)
    look(shard, seconds)
    clock.advance(11_000)
    assert [r.status for r in batch(shard, tokens, get(b"k"))] == [Status.NOT_FOUND]
    shard.close()
    clock.advance(-60_000)
    again = take_shard(0, 2, None, durability, clock).shard
    assert batch(again, tokens, get(b"k"))[0].status == Status.NOT_FOUND
    again.close()


def test_expired_keys_and_deletes_compact_the_log_and_writes_resume(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    """Before, a full disk stopped compaction, so neither expiry nor DELs could ever shrink
    the log: a disk filled through zkv stayed full until an operator stepped in."""
    clock = FakeClock()
    shard = take_shard(0, 1, None, durability, clock).shard
    value = b"v" * 1000
    for start in range(0, 4000, 500):  # 4 MB of keys that expire in a minute
        ops = [
            Request(Kind.SET, start + i + 1, b"t%d" % (start + i), value, ttl_ms=60_000)
            for i in range(500)
        ]
        batch(shard, tokens, *ops)
    batch(shard, tokens, *(set_(9000 + i, b"p%d" % i, value) for i in range(100)))
    files = shard.files
    assert files is not None
    disk.leave_free(RESERVE // 2)
    look(shard, seconds)
    assert batch(shard, tokens, set_(10_000, b"new", value))[0].status == Status.NO_SPACE
    assert batch(shard, tokens, Request(Kind.DEL, 10_001, b"p1"))[0].status == Status.OK
    assert files.wait_rewrite(5.0)
    shard.tick()  # the compaction the short disk started at once found nothing to gain
    assert not files.rewriting
    clock.advance(61_000)  # the keys expire (unread: nobody DELs them)
    seconds.now += NO_SPACE_REWRITE_S
    shard.tick()  # still short of space: a measured compaction starts again
    assert files.rewriting
    assert files.wait_rewrite(5.0)
    shard.tick()  # it fitted and shrank the log; the room is seen at once
    assert not files.rewriting
    assert files.log_path.stat().st_size < 400_000  # from 4 MB
    assert batch(shard, tokens, set_(10_002, b"new", value))[0].status == Status.OK
    shard.close()
    again = take_shard(0, 2, None, durability, clock).shard
    assert len(again.store) == 100  # p0..p99 without p1, and new


def test_a_compaction_that_would_not_fit_writes_nothing(
    durability: Durability, disk: Disk, seconds: Seconds, tokens: Iterator[int]
) -> None:
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    batch(shard, tokens, *(set_(i, b"k%d" % i, b"v" * 1000) for i in range(1, 300)))
    files = shard.files
    assert files is not None
    log_bytes = files.log_path.read_bytes()
    disk.leave_free(RESERVE // 2)
    look(shard, seconds)
    assert batch(shard, tokens, set_(1000, b"new"))[0].status == Status.NO_SPACE
    writes = disk.calls
    seconds.now += NO_SPACE_CHECK_S
    shard.tick()
    assert files.wait_rewrite(5.0)
    shard.tick()
    assert not files.rewriting and not files.rewrite_path.exists()
    assert disk.calls == writes  # measured, found nothing to gain, wrote nothing
    assert files.log_path.read_bytes() == log_bytes
