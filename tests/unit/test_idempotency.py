"""RequestMemory on its own: packed entries, the ring that forgets the oldest, reused ids."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from workers import aof
from workers.idempotency import INLINE_KEY_BYTES, Memo, RequestMemory, packed_key
from zkv.protocol import Kind, Status

pytestmark = pytest.mark.unit


def memo_for(key: bytes, deadline_ms: int | None = 1_700_000_000_123) -> Memo:
    return Memo(Kind.SET, key, 0xDEADBEEF, Status.OK, deadline_ms)


@pytest.mark.parametrize("key_bytes", [1, 16, INLINE_KEY_BYTES, INLINE_KEY_BYTES + 1, 1024])
def test_a_memo_comes_back_as_it_went_in(key_bytes: int) -> None:
    memory = RequestMemory()
    key = b"k" * key_bytes
    memory.remember(7, memo_for(key))
    memory.remember(8, Memo(Kind.DEL, key, 0, Status.OK, None))
    assert memory.recall(7, Kind.SET, key, 0xDEADBEEF) == memo_for(key)
    assert memory.recall(8, Kind.DEL, key, 0) == Memo(Kind.DEL, key, 0, Status.OK, None)
    assert memory.snapshot() == [
        (7, memo_for(key)),
        (8, Memo(Kind.DEL, key, 0, Status.OK, None)),
    ]


def test_a_retry_is_recognised_only_with_the_same_kind_key_and_value() -> None:
    memory = RequestMemory()
    memory.remember(7, memo_for(b"k"))
    assert memory.recall(7, Kind.DEL, b"k", 0xDEADBEEF) is None
    assert memory.recall(7, Kind.SET, b"other", 0xDEADBEEF) is None
    assert memory.recall(7, Kind.SET, b"k", 1) is None
    assert memory.recall(6, Kind.SET, b"k", 0xDEADBEEF) is None
    assert memory.recall(0, Kind.SET, b"k", 0xDEADBEEF) is None


def test_request_id_zero_is_not_remembered() -> None:
    memory = RequestMemory()
    memory.remember(0, memo_for(b"k"))
    assert len(memory) == 0
    assert memory.snapshot() == []


def test_the_oldest_is_forgotten_first() -> None:
    memory = RequestMemory(capacity=3)
    for request_id in range(1, 8):
        memory.remember(request_id, memo_for(b"k%d" % request_id))
    assert len(memory) == 3
    assert [request_id for request_id, _ in memory.snapshot()] == [5, 6, 7]
    assert memory.recall(4, Kind.SET, b"k4", 0xDEADBEEF) is None
    assert memory.recall(5, Kind.SET, b"k5", 0xDEADBEEF) == memo_for(b"k5")


def test_a_reused_id_keeps_its_newest_write_until_that_one_is_the_oldest() -> None:
    memory = RequestMemory(capacity=3)
    memory.remember(1, memo_for(b"first"))
    memory.remember(2, memo_for(b"two"))
    memory.remember(1, memo_for(b"second"))  # reused: the newest write is what counts
    assert memory.recall(1, Kind.SET, b"first", 0xDEADBEEF) is None
    assert memory.snapshot() == [(2, memo_for(b"two")), (1, memo_for(b"second"))]
    memory.remember(3, memo_for(b"three"))  # forgets the ring slot of the first write of 1
    assert memory.recall(1, Kind.SET, b"second", 0xDEADBEEF) == memo_for(b"second")
    assert len(memory) == 3
    memory.remember(4, memo_for(b"four"))  # forgets 2
    memory.remember(5, memo_for(b"five"))  # forgets the newest write of 1
    assert memory.recall(1, Kind.SET, b"second", 0xDEADBEEF) is None
    assert [request_id for request_id, _ in memory.snapshot()] == [3, 4, 5]


def test_random_ids_agree_with_a_simple_model() -> None:
    # The ring and the reuse counts against the obvious model (the last `capacity` writes,
    # each id at its newest position), with ids drawn from a small range so reuse is frequent.
    rng = random.Random(11)
    memory = RequestMemory(capacity=50)
    ring_model: list[int] = []
    latest: dict[int, Memo] = {}
    for step in range(5000):
        request_id = rng.randrange(1, 120)
        memo = memo_for(b"k%d" % step, rng.choice([None, 1_700_000_000_000 + step]))
        memory.remember(request_id, memo)
        ring_model.append(request_id)
        latest[request_id] = memo
        window = ring_model[-50:]
        expected = [(r, latest[r]) for i, r in enumerate(window) if r not in window[i + 1 :]]
        assert memory.snapshot() == expected
        assert len(memory) == len(set(window))


def test_a_full_memory_of_random_ids_stays_small() -> None:
    rng = random.Random(3)
    keys = [b"key:%012d" % i for i in range(100_000)]  # kept alive by the store in real life
    gc.collect()
    tracemalloc.start()
    try:
        memory = RequestMemory()
        baseline = tracemalloc.get_traced_memory()[0]
        for key in keys:
            memory.remember(rng.getrandbits(64), memo_for(key, 1_700_000_000_000 + 3_600_000))
        used = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert len(memory) == 100_000
    assert used / 100_000 < 200, f"{used / 100_000:.0f} bytes per remembered request"


@pytest.mark.parametrize("key_bytes", [1, INLINE_KEY_BYTES, INLINE_KEY_BYTES + 1])
def test_remember_write_is_remember_of_an_ok_memo(key_bytes: int) -> None:
    key = b"k" * key_bytes
    fast, slow = RequestMemory(capacity=2), RequestMemory(capacity=2)
    for request_id, kind, fingerprint, deadline_ms in [
        (1, Kind.SET, 0xDEADBEEF, 1_700_000_000_123),
        (2, Kind.DEL, 0, None),
        (1, Kind.SET, 7, None),  # reused
        (3, Kind.SET, 8, 5),  # forgets the oldest
        (0, Kind.SET, 9, 5),  # not remembered
    ]:
        fast.remember_write(request_id, kind, key, fingerprint, deadline_ms)
        slow.remember(request_id, Memo(kind, key, fingerprint, Status.OK, deadline_ms))
    assert (
        fast.snapshot()
        == slow.snapshot()
        == [
            (1, Memo(Kind.SET, key, 7, Status.OK, None)),
            (3, Memo(Kind.SET, key, 8, Status.OK, 5)),
        ]
    )
    assert fast.recall(3, Kind.SET, key, 8) == Memo(Kind.SET, key, 8, Status.OK, 5)


def test_packed_entries_are_the_tail_of_memos_entries() -> None:
    # Compaction writes the memory from its packed entries: read back, they must be the
    # memos, and replay must rebuild the same memory from them.
    memory = RequestMemory(capacity=3)
    memory.remember_write(1, Kind.SET, b"a", 1, 1_700_000_000_123)
    memory.remember_write(2, Kind.DEL, b"b" * (INLINE_KEY_BYTES + 5), 0, None)
    memory.remember_write(1, Kind.SET, b"c", 3, None)  # a reused id: only its newest write
    memory.remember_write(4, Kind.SET, b"d" * INLINE_KEY_BYTES, 0xFFFFFFFF, 2**64 - 1)
    packed = memory.packed()
    assert [request_id for request_id, _ in packed] == [2, 1, 4]
    assert memory.frozen() == [entry for _, entry in packed]
    for (request_id, entry), (same_id, memo) in zip(packed, memory.snapshot(), strict=True):
        assert request_id == same_id
        assert packed_key(entry) == memo.key
    (data,) = aof.encode_memos(memory.frozen())
    record, _ = aof.parse_at(memoryview(data), 0)  # type: ignore[misc]
    assert isinstance(record, aof.MemosRecord)
    assert record.memos() == [
        aof.MemoRecord(request_id, m.kind, m.status, m.deadline_ms, m.fingerprint, m.key)
        for request_id, m in memory.snapshot()
    ]
    # Replay: restored from the record, the memory is the same, long key and all.
    restored = RequestMemory(capacity=3)
    for entry in record.entries:
        restored.restore(entry)
    assert restored.snapshot() == memory.snapshot()
    assert restored.packed() == packed


def test_a_frozen_memory_does_not_see_later_writes() -> None:
    memory = RequestMemory(capacity=2)
    memory.remember_write(1, Kind.SET, b"a", 1, None)
    memory.remember_write(2, Kind.SET, b"b", 2, None)
    frozen = memory.frozen()
    memory.remember_write(3, Kind.SET, b"c", 3, None)  # forgets 1
    memory.remember_write(2, Kind.DEL, b"b", 0, None)  # a reused id
    assert [packed_key(entry) for entry in frozen] == [b"a", b"b"]
    assert [request_id for request_id, _ in memory.packed()] == [3, 2]


def test_packed_order_is_the_rings_order_of_each_ids_newest_write() -> None:
    # packed() reads the dict's order; the ring decides what is forgotten. Random reuse of a
    # few ids must keep the two in agreement: the ring, each id at its newest slot.
    rng = random.Random(5)
    for capacity in (1, 3, 10):
        memory = RequestMemory(capacity=capacity)
        history: list[int] = []  # every id remembered, in order
        for _ in range(400):
            request_id = rng.randrange(1, 15)
            memory.remember_write(request_id, Kind.SET, b"k%d" % request_id, 0, None)
            history.append(request_id)
            window = history[-capacity:]  # what the ring holds, oldest first
            newest = [rid for i, rid in enumerate(window) if rid not in window[i + 1 :]]
            assert [request_id for request_id, _ in memory.packed()] == newest


def test_known_says_whether_an_id_is_remembered() -> None:
    memory = RequestMemory(capacity=1)
    assert not memory.known(7)
    memory.remember_write(7, Kind.SET, b"k", 1, None)
    assert memory.known(7)
    memory.remember_write(8, Kind.DEL, b"k", 0, None)  # forgets 7
    assert not memory.known(7) and memory.known(8)
