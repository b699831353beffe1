"""Helpers for the replication tests: a leader shard whose appended records are captured (what
the cluster worker ships), followers' files, and the comparison of two shards' data."""

from __future__ import annotations

import itertools
from pathlib import Path

from workers.aof import FsyncPolicy, LogReader, TimeRecord
from workers.idempotency import RequestMemory
from workers.persist import Durability, ShardFiles, apply_record
from workers.shard import Shard, take_shard
from workers.store import Clock, HighWaterClock, TTLStore
from zkv.protocol import Dispatch, Kind, Request


def tap(shard: Shard) -> list[bytes]:
    """The list that receives every batch of records ``shard`` appends to its log, as the
    cluster worker captures them to ship (ShardFiles.append is called once per pass)."""
    files = shard.files
    assert files is not None
    appended: list[bytes] = []
    append = files.append

    def tapped(data: bytes) -> None:
        append(data)
        appended.append(data)

    files.append = tapped  # type: ignore[method-assign]
    return appended


def leader_shard(
    data_dir: Path, clock: Clock, policy: FsyncPolicy = FsyncPolicy.ALWAYS
) -> tuple[Shard, list[bytes]]:
    shard = take_shard(0, 1, None, Durability(data_dir, policy), clock).shard
    return shard, tap(shard)


def follower_files(
    data_dir: Path, clock: Clock, durability: Durability | None = None
) -> tuple[ShardFiles, TTLStore, RequestMemory]:
    """A follower's shard files, taken and replayed (empty at first)."""
    files = ShardFiles(durability or Durability(data_dir), 0)
    files.take(1)
    store = TTLStore(HighWaterClock(clock))
    memory = RequestMemory()
    files.replay(store, memory)
    return files, store, memory


class Writer:
    """Applies requests to a leader shard as the worker does, one handle_batch per pass."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._tokens = itertools.count(1)
        self._ids = itertools.count(1)

    def set(self, key: bytes, value: bytes, ttl_ms: int | None = None) -> Request:
        return Request(Kind.SET, next(self._ids), key, value, ttl_ms)

    def delete(self, key: bytes) -> Request:
        return Request(Kind.DEL, next(self._ids), key)

    def get(self, key: bytes) -> Request:
        return Request(Kind.GET, next(self._ids), key)

    def apply(self, requests: list[Request]) -> list:
        return self.shard.handle_batch(
            [Dispatch(next(self._tokens), request) for request in requests]
        )


def replay_log(path: Path, clock: Clock) -> tuple[TTLStore, RequestMemory]:
    """A fresh store and memory rebuilt from the log file at ``path``, as a takeover does."""
    store = TTLStore(HighWaterClock(clock))
    memory = RequestMemory()
    floor = store.clock.raise_to  # type: ignore[attr-defined]
    with LogReader(path) as reader:
        for _, record in reader.records():
            if type(record) is TimeRecord:
                floor(record.now_ms)
            apply_record(record, store, memory)
    return store, memory


def contents(store: TTLStore, memory: RequestMemory, now_ms: int) -> tuple[dict, dict]:
    """What a shard holds at ``now_ms``: live keys with values and deadlines, and remembered
    writes (normalised: a long key's entry is kept as a pair)."""
    live = {key: (value, deadline) for key, value, deadline in store.snapshot().live(now_ms)}
    memos = {
        request_id: packed if type(packed) is bytes else b"".join(packed)
        for request_id, packed in memory.packed()
    }
    return live, memos
