"""Durable shards: replay, the idempotency memory across owners, group commit, torn tails."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import START_MS, FakeClock
from workers import aof
from workers.aof import CorruptLog, FsyncPolicy
from workers.persist import REPLAY_PROGRESS_S, Durability
from workers.shard import Shard, take_shard
from zkv.protocol import Dispatch, Kind, Reply, Request, Status

pytestmark = pytest.mark.unit


class FsyncCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1


class FakeSeconds:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens() -> Iterator[int]:
    return itertools.count(1)


def durable(tmp_path: Path, policy: FsyncPolicy = FsyncPolicy.ALWAYS) -> Durability:
    return Durability(tmp_path / "data", policy)


def batch(shard: Shard, tokens: Iterator[int], *requests: Request) -> list[Reply]:
    return shard.handle_batch([Dispatch(next(tokens), request) for request in requests])


def set_(request_id: int, key: bytes, value: bytes, ttl_ms: int | None = None) -> Request:
    return Request(Kind.SET, request_id, key, value, ttl_ms)


def test_replay_rebuilds_the_store_and_drops_keys_that_expired(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int]
) -> None:
    durability = durable(tmp_path)
    shard = take_shard(0, 1, None, durability, clock).shard
    batch(
        shard,
        tokens,
        set_(1, b"forever", b"f"),
        set_(2, b"short", b"s", ttl_ms=100),
        set_(3, b"long", b"l", ttl_ms=10_000),
        set_(4, b"deleted", b"d"),
        set_(5, b"overwritten", b"old", ttl_ms=10_000),
        set_(6, b"overwritten", b"new", ttl_ms=50),
    )
    batch(shard, tokens, Request(Kind.DEL, 7, b"deleted"))
    shard.close()
    clock.advance(100)  # "short" and the second "overwritten" are past their deadline
    again = take_shard(0, 2, None, durability, clock).shard
    assert sorted((e.key, e.value, e.deadline_ms) for e in again.store.entries()) == [
        (b"forever", b"f", None),
        (b"long", b"l", START_MS + 10_000),
    ]
    assert len(again.store) == 2  # expired keys were never loaded, not merely hidden
    again.close()


def test_a_write_applied_by_a_dead_owner_is_not_applied_again_by_its_successor(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int]
) -> None:
    durability = durable(tmp_path)
    first = take_shard(0, 1, None, durability, clock).shard
    (original,) = batch(first, tokens, set_(41, b"k", b"v1", ttl_ms=5000))
    batch(first, tokens, set_(42, b"k", b"v2"))  # someone else's newer write
    (deleted,) = batch(first, tokens, Request(Kind.DEL, 43, b"gone-key"))
    assert deleted.status == Status.NOT_FOUND  # remembered all the same (a MEMO record)
    batch(first, tokens, set_(44, b"x", b"1"), Request(Kind.DEL, 45, b"x"))
    first.close(sync=False)  # "dies"; its reply to request 41 never arrived

    successor = take_shard(0, 2, None, durability, clock).shard
    clock.advance(10)
    retry, retry_del = batch(
        successor, tokens, set_(41, b"k", b"v1", ttl_ms=5000), Request(Kind.DEL, 45, b"x")
    )
    assert (retry.status, retry.deadline_ms) == (Status.OK, original.deadline_ms)
    assert retry_del.status == Status.OK  # the remembered reply, though x is gone now
    assert successor.store.get(b"k") == (b"v2", None)  # not overwritten by the retry
    # A late copy of the DEL that found nothing, after someone wrote the key: answered as the
    # first copy was, and the newer value stays.
    batch(successor, tokens, set_(46, b"gone-key", b"written since"))
    (late_del,) = batch(successor, tokens, Request(Kind.DEL, 43, b"gone-key"))
    assert late_del.status == Status.NOT_FOUND
    assert successor.store.get(b"gone-key") == (b"written since", None)
    size = Path(successor.source).stat().st_size
    successor.handle_batch([])
    assert Path(successor.source).stat().st_size == size  # nothing appended for retries
    successor.close()


def test_group_commit_one_fsync_per_batch_under_always(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int]
) -> None:
    fsync = FsyncCounter()
    durability = Durability(tmp_path / "data", FsyncPolicy.ALWAYS, fsync=fsync)
    shard = take_shard(0, 1, None, durability, clock).shard
    fsync.calls = 0  # the takeover's own fsyncs (owner file, log, directory)
    replies = batch(shard, tokens, *[set_(i, b"k%d" % i, b"v") for i in range(1, 101)])
    assert [r.status for r in replies] == [Status.OK] * 100
    assert fsync.calls == 1
    batch(shard, tokens, Request(Kind.GET, 200, b"k1"), Request(Kind.DEL, 201, b"k1"))
    assert fsync.calls == 2
    batch(shard, tokens, Request(Kind.GET, 202, b"k2"), Request(Kind.ALL, 203))
    assert fsync.calls == 2  # a batch that wrote nothing has nothing to sync
    shard.close()


def test_no_fsync_per_batch_under_no(tmp_path: Path, clock: FakeClock, tokens: Iterator[int]):
    fsync = FsyncCounter()
    durability = Durability(tmp_path / "data", FsyncPolicy.NO, fsync=fsync)
    shard = take_shard(0, 1, None, durability, clock).shard
    fsync.calls = 0
    for i in range(10):
        batch(shard, tokens, set_(i + 1, b"k", b"v"))
        shard.tick()
    assert fsync.calls == 0
    shard.close()
    assert fsync.calls == 1  # the clean stop


def test_everysec_fsyncs_from_the_timers_at_most_once_a_second(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int]
) -> None:
    fsync = FsyncCounter()
    seconds = FakeSeconds()
    durability = Durability(tmp_path / "data", FsyncPolicy.EVERYSEC, fsync=fsync, monotonic=seconds)
    shard = take_shard(0, 1, None, durability, clock).shard
    fsync.calls = 0
    for i in range(25):  # 25 batches over 2.4 s of fake time, a timer pass after each
        batch(shard, tokens, set_(i + 1, b"k", b"v"))
        shard.tick()
        seconds.now += 0.1
    assert fsync.calls == 2
    shard.close()


def test_a_torn_last_record_is_truncated_with_a_warning(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int], caplog: pytest.LogCaptureFixture
) -> None:
    durability = durable(tmp_path)
    shard = take_shard(0, 1, None, durability, clock).shard
    batch(shard, tokens, set_(1, b"a", b"1"), set_(2, b"b", b"2"))
    shard.close()
    log_path = durability.shard_dir(0) / "log"
    intact = log_path.stat().st_size
    with open(log_path, "ab") as file:
        file.write(aof.encode_set(3, b"c", b"3", None)[:-2])  # a write cut short
    with caplog.at_level(logging.WARNING, logger="workers.persist"):
        again = take_shard(0, 2, None, durability, clock).shard
    assert sorted(e.key for e in again.store.entries()) == [b"a", b"b"]
    assert log_path.stat().st_size == intact
    assert any("is torn" in r.message and f"at byte {intact}" in r.message for r in caplog.records)
    batch(again, tokens, set_(4, b"d", b"4"))  # appends after the cut are readable
    again.close()
    third = take_shard(0, 3, None, durability, clock).shard
    assert sorted(e.key for e in third.store.entries()) == [b"a", b"b", b"d"]
    third.close()


def test_corruption_in_the_middle_refuses_the_takeover(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int]
) -> None:
    durability = durable(tmp_path)
    shard = take_shard(0, 1, None, durability, clock).shard
    batch(shard, tokens, set_(1, b"a", b"1"))
    batch(shard, tokens, set_(2, b"b", b"2"))
    shard.close()
    log_path = durability.shard_dir(0) / "log"
    data = bytearray(log_path.read_bytes())
    first_record = len(aof.MAGIC)
    data[first_record + 12] ^= 0x01
    log_path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as caught:
        take_shard(0, 2, None, durability, clock)
    assert caught.value.offset == first_record
    assert log_path.read_bytes() == bytes(data)  # refused, not "fixed"


def test_a_shard_in_memory_remembers_requests_too(clock: FakeClock, tokens: Iterator[int]):
    shard = take_shard(0, 1, None, None, clock).shard
    batch(shard, tokens, set_(1, b"k", b"v1"))
    batch(shard, tokens, set_(2, b"k", b"v2"))
    (retry,) = batch(shard, tokens, set_(1, b"k", b"v1"))
    assert retry.status == Status.OK
    assert shard.store.get(b"k") == (b"v2", None)


@pytest.mark.parametrize("length", [0, 3])
def test_a_log_cut_short_in_its_magic_starts_over(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int], length: int
) -> None:
    durability = durable(tmp_path)
    shard_dir = durability.shard_dir(0)
    shard_dir.mkdir(parents=True)
    (shard_dir / "log").write_bytes(aof.MAGIC[:length])  # a crash while creating the file
    shard = take_shard(0, 1, None, durability, clock).shard
    assert (shard_dir / "log").read_bytes() == aof.MAGIC
    batch(shard, tokens, set_(1, b"k", b"v"))
    shard.close()
    again = take_shard(0, 2, None, durability, clock).shard
    assert again.store.get(b"k") == (b"v", None)
    again.close()


def with_log(tmp_path: Path, data: bytes) -> tuple[Durability, Path]:
    """A data directory whose shard 0 has ``data`` as its log (written by someone else)."""
    durability = durable(tmp_path)
    shard_dir = durability.shard_dir(0)
    shard_dir.mkdir(parents=True)
    (shard_dir / "log").write_bytes(data)
    return durability, shard_dir


def test_memo_records_of_earlier_versions_and_memos_records_both_replay_into_the_memory(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int]
) -> None:
    # A log compacted by an earlier version holds one MEMO record per remembered write; this
    # version writes MEMOS records. A successor must answer retries from either.
    long_key = b"L" * 200  # kept beside its head in the memory, not inline
    memos = aof.MemosRecord(
        (
            aof.MEMOS_ENTRY.pack(11, 1, Kind.SET, Status.OK, START_MS + 60_000, 0xAB) + b"b",
            aof.MEMOS_ENTRY.pack(12, len(long_key), Kind.DEL, Status.OK, 0, 0) + long_key,
        )
    )
    durability, _ = with_log(
        tmp_path,
        aof.MAGIC
        + aof.encode(aof.MemoRecord(10, Kind.SET, Status.OK, None, 0xCD, b"a"))
        + aof.encode(memos)
        + aof.encode(aof.SetRecord(0, b"b", b"value", START_MS + 60_000)),
    )
    shard = take_shard(0, 1, None, durability, clock).shard
    assert [request_id for request_id, _ in shard.memory.snapshot()] == [10, 11, 12]
    assert shard.memory.recall(10, Kind.SET, b"a", 0xCD) is not None
    assert shard.memory.recall(11, Kind.SET, b"b", 0xAB) is not None
    assert shard.memory.recall(12, Kind.DEL, long_key, 0) is not None
    assert shard.memory.recall(11, Kind.SET, b"b", 0xAC) is None  # another value: not a retry
    shard.close()


# A log written by the version before MEMOS records (commit f162638, its own encoder): magic
# ZKVLOG1, MEMO of request 10 (SET a, deadline 4102444800000, fingerprint 0xCAFE) and of 11
# (DEL gone), SET a=alpha (snapshot, id 0), SET b=beta (request 12), DEL b (request 13).
VERSION_1_LOG = bytes.fromhex(
    "5a4b564c4f47310a000000183bc1854003000000000000000a0200000003bb2cc3d8000000cafe610000001b"
    "ad1e697b03000000000000000b0300000000000000000000000000676f6e650000001b08a6a1210100000000"
    "00000000000003bb2cc3d8000000000161616c7068610000001a3c75868201000000000000000c0000000000"
    "0000000000000162626574610000000a21f38f4702000000000000000d62"
)


def test_a_log_of_the_version_before_replays_and_takes_appends(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int]
) -> None:
    durability, shard_dir = with_log(tmp_path, VERSION_1_LOG)
    shard = take_shard(0, 1, None, durability, clock).shard
    assert shard.store.get(b"a") == (b"alpha", 4_102_444_800_000)
    assert [request_id for request_id, _ in shard.memory.snapshot()] == [10, 11, 12, 13]
    assert shard.memory.recall(10, Kind.SET, b"a", 0xCAFE) is not None
    assert shard.memory.recall(11, Kind.DEL, b"gone", 0) is not None
    batch(shard, tokens, set_(20, b"c", b"gamma"))
    shard.close()
    log = (shard_dir / "log").read_bytes()
    assert log.startswith(VERSION_1_LOG)  # appended to as it is, still version 1
    again = take_shard(0, 2, None, durability, clock).shard
    assert again.store.get(b"c") == (b"gamma", None)
    again.close()


class TickingSeconds(FakeSeconds):
    """Monotonic seconds that pass ``step`` at every reading: a replay of slow records."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("step_s", [0.0, 0.1])
def test_a_replay_reports_progress_by_elapsed_time_not_by_record_count(
    tmp_path: Path, clock: FakeClock, tokens: Iterator[int], step_s: float
) -> None:
    # 3,000 records of 1 MiB replayed in 10 s with no heartbeat (issue 10, item 4): progress
    # (the worker's heartbeat) must come by time. Here 60 records, each read 0.1 s apart on
    # the fake clock: 6 s of replay, a progress call every REPLAY_PROGRESS_S.
    first = take_shard(0, 1, None, durable(tmp_path), clock).shard
    batch(first, tokens, *(set_(i, b"k%d" % i, b"v") for i in range(1, 61)))
    first.close()
    calls: list[float] = []
    seconds = TickingSeconds(step_s)
    durability = Durability(tmp_path / "data", FsyncPolicy.ALWAYS, monotonic=seconds)
    second = take_shard(0, 2, None, durability, clock, lambda: calls.append(seconds.now)).shard
    second.close()
    assert len(second.store) == 60
    if not step_s:
        assert calls == []  # no time passed: nothing to report
        return
    assert len(calls) >= 60 * step_s / REPLAY_PROGRESS_S - 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert max(gaps) <= REPLAY_PROGRESS_S + 2 * step_s
