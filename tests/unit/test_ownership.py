"""Ownership fencing: the owner file, its lock, and a former owner that finds a newer epoch.

Two owners in one process: flock locks belong to open file descriptions, so two ShardFiles
objects (two opens of the same file) exclude each other exactly as two processes would.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from workers.aof import FsyncPolicy
from workers.ownership import LockTimeout, OwnerFile, OwnershipError
from workers.persist import Durability, ShardFiles, ShardMoved
from workers.shard import Shard, take_shard
from zkv.protocol import Dispatch, Kind, Request, Status

pytestmark = pytest.mark.unit


class FakeTime:
    """monotonic() and sleep() that move together, so lock deadlines pass without waiting."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


@pytest.fixture
def durability(tmp_path: Path) -> Durability:
    return Durability(tmp_path / "data", FsyncPolicy.ALWAYS)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens() -> Iterator[int]:
    return itertools.count(1)


def send(shard: Shard, tokens: Iterator[int], *requests: Request) -> list[Status]:
    replies = shard.handle_batch([Dispatch(next(tokens), request) for request in requests])
    return [reply.status for reply in replies]


def test_a_new_owner_file_reads_as_epoch_zero(tmp_path: Path) -> None:
    owner = OwnerFile(tmp_path / "owner")
    assert owner.read() == 0
    owner.write(2**63 + 7)
    assert owner.read() == 2**63 + 7
    assert (tmp_path / "owner").read_bytes() == (2**63 + 7).to_bytes(8, "big")
    owner.close()


@pytest.mark.parametrize("content", [b"\x01", b"\x00" * 7, b"\x00" * 9])
def test_an_owner_file_of_the_wrong_length_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "owner").write_bytes(content)
    owner = OwnerFile(tmp_path / "owner")
    with pytest.raises(OwnershipError, match="expected 8"):
        owner.read()
    owner.close()


def test_the_lock_excludes_a_second_open_file_description(tmp_path: Path) -> None:
    fake = FakeTime()
    first = OwnerFile(tmp_path / "owner")
    second = OwnerFile(tmp_path / "owner", monotonic=fake.monotonic, sleep=fake.sleep)
    first.lock(1.0)
    with pytest.raises(LockTimeout, match="stayed locked"):
        second.lock(2.0)
    assert fake.slept == pytest.approx(2.0)  # polled until the deadline, never blocked
    first.unlock()
    second.lock(0.0)  # free now: taken at the first attempt
    second.unlock()
    first.close()
    second.close()


def test_closing_releases_the_lock(tmp_path: Path) -> None:
    first = OwnerFile(tmp_path / "owner")
    first.lock(1.0)
    first.close()  # as the kernel does when the process dies, even by SIGKILL
    second = OwnerFile(tmp_path / "owner")
    second.lock(0.0)
    second.close()


def test_take_stores_an_epoch_above_both_the_assigned_and_the_stored_one(
    durability: Durability,
) -> None:
    files = ShardFiles(durability, 2)
    assert files.take(10) == 0
    assert files.epoch == 10  # the broker's number when larger
    assert files.take(4) == 10
    assert files.epoch == 11  # else one above the stored one: still fences the previous owner
    assert files.take(0) == 11
    assert files.epoch == 12
    assert (durability.shard_dir(2) / "owner").read_bytes() == (12).to_bytes(8, "big")
    files.close()


def test_a_newer_owner_makes_the_old_one_refuse_its_next_batch(
    durability: Durability, clock: FakeClock, tokens: Iterator[int]
) -> None:
    old = take_shard(0, 5, None, durability, clock).shard
    assert send(old, tokens, Request(Kind.SET, 1, b"k", b"v1")) == [Status.OK]
    log_path = durability.shard_dir(0) / "log"
    before = log_path.read_bytes()

    new = take_shard(0, 6, None, durability, clock).shard
    assert new.epoch == 6
    assert new.store.get(b"k") == (b"v1", None)  # replayed what the old owner wrote

    for request in [
        Request(Kind.SET, 2, b"k", b"stale"),
        Request(Kind.DEL, 3, b"k"),
        Request(Kind.GET, 4, b"k"),  # a read from a stale copy is refused too
    ]:
        with pytest.raises(ShardMoved) as caught:
            old.handle_batch([Dispatch(next(tokens), request)])
        assert (caught.value.held, caught.value.found) == (5, 6)
    assert log_path.read_bytes() == before  # the former owner wrote nothing
    assert old.store.get(b"k") == (b"v1", None)  # and applied nothing

    assert send(new, tokens, Request(Kind.SET, 5, b"k", b"v2")) == [Status.OK]
    old.close(sync=False)
    new.close()
    again = take_shard(0, 0, None, durability, clock).shard
    assert again.store.get(b"k") == (b"v2", None)
    again.close()


def test_a_takeover_gives_up_at_its_deadline_while_a_stopped_owner_holds_the_lock(
    durability: Durability, clock: FakeClock, tokens: Iterator[int]
) -> None:
    # A process stopped while holding the lock keeps it: a takeover must give up at its
    # deadline rather than hang (and, meanwhile, nothing is applied anywhere).
    shard = take_shard(0, 1, None, durability, clock).shard
    fake = FakeTime()
    other = ShardFiles(durability, 0)
    other.owner._monotonic = fake.monotonic
    other.owner._sleep = fake.sleep
    assert shard.files is not None
    shard.files.owner.lock(1.0)  # "stopped" in the middle of a batch
    with pytest.raises(LockTimeout):
        other.take(2)
    shard.files.owner.unlock()
    assert send(shard, tokens, Request(Kind.SET, 1, b"k", b"v")) == [Status.OK]
    other.close()
    shard.close()


def test_retaking_a_shard_nobody_else_took_keeps_the_memory(
    durability: Durability, clock: FakeClock, tokens: Iterator[int]
) -> None:
    shard = take_shard(0, 3, None, durability, clock).shard
    send(shard, tokens, Request(Kind.SET, 1, b"k", b"v"))
    takeover = take_shard(0, 9, shard, durability, clock)
    assert takeover.kept
    assert takeover.shard is shard
    assert (takeover.stored_epoch, shard.epoch) == (3, 9)
    assert send(shard, tokens, Request(Kind.GET, 2, b"k")) == [Status.OK]
    shard.close()


def test_retaking_a_shard_someone_else_held_meanwhile_replays_it(
    durability: Durability, clock: FakeClock, tokens: Iterator[int]
) -> None:
    first = take_shard(0, 3, None, durability, clock).shard
    send(first, tokens, Request(Kind.SET, 1, b"k", b"from first"))
    second = take_shard(0, 4, None, durability, clock).shard
    send(second, tokens, Request(Kind.SET, 2, b"k", b"from second"))
    second.close()
    takeover = take_shard(0, 5, first, durability, clock)
    assert not takeover.kept
    assert takeover.shard.store.get(b"k") == (b"from second", None)
    assert send(takeover.shard, tokens, Request(Kind.SET, 3, b"k", b"again")) == [Status.OK]
    takeover.shard.close()


def test_a_shard_in_memory_has_no_files(tmp_path: Path, clock: FakeClock) -> None:
    takeover = take_shard(0, 7, None, None, clock)
    assert (takeover.shard.files, takeover.shard.epoch, takeover.shard.source) == (
        None,
        7,
        "memory",
    )
    assert list(tmp_path.iterdir()) == []


def test_the_timers_notice_a_move_without_any_request(
    durability: Durability, clock: FakeClock, tokens: Iterator[int]
) -> None:
    old = take_shard(0, 5, None, durability, clock).shard
    old.tick()
    new = take_shard(0, 6, None, durability, clock).shard
    with pytest.raises(ShardMoved):
        old.tick()
    old.close(sync=False)
    new.close()
