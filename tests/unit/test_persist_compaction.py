"""Compaction: the log is rewritten in the background, and a crash at any step loses nothing.

Each test builds an acknowledged state (what the replies said), compacts with a crash injected
after one RewriteStep, "crashes" (closes the descriptors without any cleanup or fsync, as the
kernel does when a process dies), then takes the shard over from disk alone and checks that
every acknowledged write, delete and remembered request id is there.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from workers import aof
from workers.aof import FsyncPolicy, LogReader, MemosRecord, SetRecord, TimeRecord
from workers.persist import Durability, RewriteStep, ShardMoved, SimulatedCrash
from workers.shard import Shard, take_shard
from zkv.protocol import Dispatch, Kind, Request, Status

pytestmark = pytest.mark.unit

WAIT_S = 5.0  # for the compaction thread; it needs milliseconds


class Acknowledged:
    """The state the replies promised: key -> (value, deadline), plus the applied ids."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.tokens = itertools.count(1)
        self.ids = itertools.count(1)
        self.data: dict[bytes, tuple[bytes, int | None]] = {}
        self.applied: list[Request] = []

    def set(self, key: bytes, value: bytes, ttl_ms: int | None = None) -> None:
        request = Request(Kind.SET, next(self.ids), key, value, ttl_ms)
        (reply,) = self.shard.handle_batch([Dispatch(next(self.tokens), request)])
        assert reply.status == Status.OK
        self.data[key] = (value, reply.deadline_ms)
        self.applied.append(request)

    def delete(self, key: bytes) -> None:
        request = Request(Kind.DEL, next(self.ids), key)
        (reply,) = self.shard.handle_batch([Dispatch(next(self.tokens), request)])
        assert reply.status == Status.OK
        del self.data[key]
        self.applied.append(request)

    def check(self, shard: Shard) -> None:
        """``shard`` (rebuilt from disk) holds exactly the acknowledged state, and answers a
        retry of every acknowledged write from memory instead of applying it again."""
        entries = {e.key: (e.value, e.deadline_ms) for e in shard.store.entries()}
        assert entries == self.data
        tokens = itertools.count(10**6)
        for request in self.applied:
            (reply,) = shard.handle_batch([Dispatch(next(tokens), request)])
            assert reply.status == Status.OK, request
        assert {e.key: (e.value, e.deadline_ms) for e in shard.store.entries()} == self.data


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def durability(tmp_path: Path) -> Durability:
    # Thresholds small enough for a test: compact once the log passes 4 KiB.
    return Durability(tmp_path / "data", FsyncPolicy.ALWAYS, rewrite_min_bytes=4096)


@pytest.fixture
def history(durability: Durability, clock: FakeClock) -> Iterator[Acknowledged]:
    shard = take_shard(0, 1, None, durability, clock).shard
    state = Acknowledged(shard)
    for round_ in range(20):  # plenty of garbage: every key overwritten 20 times
        for i in range(10):
            state.set(b"key-%d" % i, b"value %d of round %d" % (i, round_), ttl_ms=60_000)
    state.set(b"forever", b"no deadline")
    state.set(b"doomed", b"soon deleted")
    state.delete(b"doomed")
    state.set(b"expiring", b"x", ttl_ms=10)
    yield state
    shard.close(sync=False)


def take_from_disk(durability: Durability, clock: FakeClock) -> Shard:
    return take_shard(0, 100, None, durability, clock).shard


def test_compaction_shrinks_the_log_and_keeps_everything(
    history: Acknowledged, durability: Durability, clock: FakeClock
) -> None:
    shard = history.shard
    files = shard.files
    assert files is not None
    before = files.log_path.stat().st_size
    clock.advance(10)  # "expiring" is dead: compaction leaves it out
    del history.data[b"expiring"]
    shard.tick()  # due: the log is past 4 KiB
    assert files.rewriting
    history.set(b"during", b"written while the thread runs")
    history.delete(b"key-0")
    assert files.wait_rewrite(WAIT_S)
    shard.tick()  # the loop finishes it
    assert not files.rewriting
    after = files.log_path.stat().st_size
    assert after < before  # the memory of every request stays: compaction keeps it
    assert not files.rewrite_path.exists()
    history.set(b"after", b"written to the new log")
    history.check(shard)
    shard.close()
    history.check(take_from_disk(durability, clock))


def test_the_compacted_log_holds_the_memory_then_the_live_keys(
    history: Acknowledged, durability: Durability, clock: FakeClock
) -> None:
    shard = history.shard
    files = shard.files
    assert files is not None
    files.start_rewrite(shard.store, shard.memory)
    assert files.wait_rewrite(WAIT_S)
    shard.tick()
    with LogReader(files.log_path) as reader:
        records = [record for _, record in reader.records()]
    blocks = [r for r in records if isinstance(r, MemosRecord)]
    memos = [memo for block in blocks for memo in block.memos()]
    sets = [r for r in records if isinstance(r, SetRecord)]
    assert len(memos) == len(history.applied)
    # The snapshot's time, the memory oldest first (each run under its TIME), the time again,
    # then the data.
    head = records[: len(records) - len(sets)]
    assert records == head + sets
    assert isinstance(head[0], TimeRecord) and head[-1] == head[0]
    # Then the version counter (issue 12), so a replay never gives a version again.
    assert head[1] == aof.VersionRecord(shard.store.last_version)
    assert [r for r in head[2:] if not isinstance(r, TimeRecord)] == blocks
    assert [m.request_id for m in memos] == [r.request_id for r in history.applied]
    assert sorted(s.key for s in sets) == sorted(history.data)
    assert all(s.request_id == 0 for s in sets)
    assert all(s.version for s in sets)  # SETV records: each key keeps its version


@pytest.mark.parametrize("step", list(RewriteStep), ids=lambda step: step.name)
def test_a_crash_at_any_step_of_compaction_loses_nothing(
    history: Acknowledged, durability: Durability, clock: FakeClock, step: RewriteStep
) -> None:
    shard = history.shard
    files = shard.files
    assert files is not None
    files.crash_at = step
    if step is RewriteStep.STARTED:
        with pytest.raises(SimulatedCrash):
            files.start_rewrite(shard.store, shard.memory)
    else:
        files.start_rewrite(shard.store, shard.memory)
        # Acknowledged while the thread writes: in the old log and in the rewrite buffer.
        history.set(b"during", b"written while the thread runs")
        history.delete(b"key-1")
        assert files.wait_rewrite(WAIT_S)
        with pytest.raises(SimulatedCrash):
            shard.tick()
    shard.close(sync=False)  # the crash: descriptors closed, nothing flushed or cleaned up

    successor = take_from_disk(durability, clock)
    assert not (durability.shard_dir(0) / "log.rewrite").exists()
    history.check(successor)
    successor.close()


def test_a_failed_compaction_is_abandoned_and_the_log_kept(
    history: Acknowledged, durability: Durability, clock: FakeClock
) -> None:
    shard = history.shard
    files = shard.files
    assert files is not None
    before = files.log_path.read_bytes()
    files.start_rewrite(shard.store, shard.memory)
    assert files.wait_rewrite(WAIT_S)
    files.rewrite_path.unlink()  # the rename will fail
    shard.tick()
    assert not files.rewriting
    assert files.log_path.read_bytes() == before
    history.set(b"still", b"appending to the old log")
    shard.tick()  # not retried at once
    assert not files.rewriting
    shard.close()
    history.check(take_from_disk(durability, clock))


def test_a_former_owner_cannot_finish_its_compaction_after_the_shard_moved(
    history: Acknowledged, durability: Durability, clock: FakeClock
) -> None:
    shard = history.shard
    files = shard.files
    assert files is not None
    files.start_rewrite(shard.store, shard.memory)
    assert files.wait_rewrite(WAIT_S)
    successor = take_from_disk(durability, clock)  # the shard moves; log.rewrite is removed
    successor_log = successor.source
    snapshot = Path(successor_log).read_bytes()
    with pytest.raises(ShardMoved):
        shard.tick()
    assert Path(successor_log).read_bytes() == snapshot  # nothing renamed over the log
    history.check(successor)
    successor.close()


def test_a_compaction_after_a_replay_does_not_move_the_next_replays_clock(
    durability: Durability, clock: FakeClock
) -> None:
    """A memory rebuilt by replay dates its writes at the end of their TIME record's interval
    (up to a second ahead of the clock); compaction used to write those dates as TIME records,
    and the next replay raised its clock to them: a key with 800 ms left was gone at once.
    Followers rebuild their memory that way from every record their leader ships."""
    first = take_shard(0, 1, None, durability, clock).shard
    state = Acknowledged(first)
    state.set(b"soon", b"800 ms left", ttl_ms=800)
    first.close()
    clock.advance(100)
    second = take_from_disk(durability, clock)  # replay: the memory's run is dated +1 s
    files = second.files
    assert files is not None
    files.start_rewrite(second.store, second.memory)
    assert files.wait_rewrite(WAIT_S)
    second.tick()
    second.close()
    third = take_shard(0, 200, None, durability, clock).shard
    assert {e.key for e in third.store.entries()} == {b"soon"}
    third.close()
