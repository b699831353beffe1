"""RequestMemory on its own: packed entries, forgetting by time, the byte bound, reused ids."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from workers import aof, idempotency
from workers.idempotency import (
    FORGET_STEP_IDS,
    INLINE_KEY_BYTES,
    Memo,
    RequestMemory,
    packed_key,
)
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
        (3, Kind.SET, 8, 5),
        (0, Kind.SET, 9, 5),  # not remembered
    ]:
        fast.remember_write(request_id, kind, key, fingerprint, deadline_ms)
        slow.remember(request_id, Memo(kind, key, fingerprint, Status.OK, deadline_ms))
    assert (
        fast.snapshot()
        == slow.snapshot()
        == [
            (2, Memo(Kind.DEL, key, 0, Status.OK, None)),
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


T0 = 1_700_000_000_000


def test_entries_are_kept_for_the_whole_window_and_forgotten_after_it_oldest_first() -> None:
    memory = RequestMemory(keep_ms=10_000)
    memory.begin(T0)
    for request_id in range(1, 200_001):  # far past the old bound of 100,000 writes
        memory.remember_write(request_id, Kind.SET, b"k", 1, None)
    memory.begin(T0 + 5_000)
    memory.remember_write(300_000, Kind.DEL, b"k", 0, None)
    memory.begin(T0 + 10_000)  # exactly the window: nothing is forgotten yet
    assert len(memory) == 200_001 and memory.known(1)
    memory.begin(T0 + 10_001)  # the first run is older than the window: forgotten in steps
    assert len(memory) == 200_001 - FORGET_STEP_IDS and not memory.known(FORGET_STEP_IDS)
    assert memory.known(FORGET_STEP_IDS + 1)  # oldest first
    batches = 1
    while memory.known(200_000):
        memory.begin(T0 + 10_001)
        batches += 1
    assert batches == -(-200_000 // FORGET_STEP_IDS)
    assert len(memory) == 1 and memory.known(300_000)
    memory.begin(T0 + 15_001)
    assert len(memory) == 0 and memory.used == 0


def test_a_backlog_is_forgotten_a_bounded_step_per_batch_never_before_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 10 follow-up: forgetting a second's worth of writes in one begin() was one pause
    # on the worker's loop (GETs waited behind it). Now each begin() forgets at most the step
    # plus the writes since the previous one, and never an entry younger than keep_ms.
    monkeypatch.setattr(idempotency, "FORGET_STEP_IDS", 10)
    monkeypatch.setattr(idempotency, "ORDER_CHUNK_IDS", 7)  # many chunks of the ring
    rng = random.Random(5)
    keep = 100
    memory = RequestMemory(keep_ms=keep)
    now = T0
    written: dict[int, int] = {}  # request id -> time remembered
    next_id = 1
    since_begin = 0  # writes since the previous begin()
    for _ in range(2000):
        now += rng.choice([0, 1, 3, 40, 150])  # idle gaps leave whole windows due at once
        before = len(memory)
        memory.begin(now)
        assert before - len(memory) <= 10 + since_begin
        since_begin = rng.randrange(0, 15)
        for request_id, time_ms in written.items():
            if time_ms >= now - keep:  # inside keep_ms: never forgotten
                assert memory.known(request_id)
        for _ in range(since_begin):
            memory.remember_write(next_id, Kind.SET, b"k", 1, None)
            written[next_id] = now
            next_id += 1
    # Oldest first: what is left is a suffix of the writes, in order.
    left = [request_id for request_id, _ in memory.packed()]
    assert left == list(range(next_id - len(left), next_id))
    for _ in range(next_id):  # idle batches drain the rest
        memory.begin(now + keep + 1)
    assert len(memory) == 0 and memory.used == 0


def test_a_full_memory_forgets_its_whole_backlog_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A write refused BUSY while due entries wait to be forgotten would be a needless refusal.
    monkeypatch.setattr(idempotency, "FORGET_STEP_IDS", 10)
    memory = RequestMemory(keep_ms=1_000, capacity=100)
    memory.begin(T0)
    for request_id in range(1, 101):
        memory.remember_write(request_id, Kind.SET, b"k", 1, None)
    assert memory.full
    memory.begin(T0 + 1_001)
    assert len(memory) == 0 and not memory.full


def test_the_order_of_forgetting_is_not_walked_by_the_garbage_collector() -> None:
    # Issue 10 follow-up: the ring of request ids was a deque of int objects, traversed at
    # every full collection: 7-10 ms with a million entries, a stall of the worker's loop.
    memory = RequestMemory()
    memory.begin(T0)
    for request_id in range(1, 100_001):
        memory.remember_write(request_id * 7919, Kind.SET, b"k", 1, None)
    tracked = [value for value in vars(memory).values() if gc.is_tracked(value)]
    walked = gc.get_referents(*tracked)
    assert len(walked) < 1_000  # ~25 arrays of ids, a run, a few attributes


def test_a_memory_full_inside_its_window_says_so_and_frees_with_time() -> None:
    memory = RequestMemory(keep_ms=1_000, capacity=3)
    memory.begin(T0)
    for request_id in (1, 2, 3):
        assert not memory.full
        memory.remember_write(request_id, Kind.SET, b"k", 1, None)
    assert memory.full and len(memory) == 3  # nothing forgotten: the shard answers BUSY
    memory.begin(T0 + 1_001)
    assert not memory.full and len(memory) == 0


def test_a_reused_id_keeps_its_newest_write_until_that_one_is_old() -> None:
    memory = RequestMemory(keep_ms=1_000)
    memory.begin(T0)
    memory.remember(1, memo_for(b"first"))
    memory.remember(2, memo_for(b"two"))
    memory.begin(T0 + 500)
    memory.remember(1, memo_for(b"second"))  # reused: the newest write is what counts
    assert memory.recall(1, Kind.SET, b"first", 0xDEADBEEF) is None
    assert memory.snapshot() == [(2, memo_for(b"two")), (1, memo_for(b"second"))]
    memory.begin(T0 + 1_001)  # forgets 2 and the older slot of 1
    assert memory.snapshot() == [(1, memo_for(b"second"))]
    memory.begin(T0 + 1_501)
    assert memory.snapshot() == [] and memory.used == 0


def test_random_ids_and_times_agree_with_a_simple_model() -> None:
    # Forgetting by runs and the reuse counts against the obvious model (each id at its
    # newest write, kept while that write is inside the window), with frequent reuse.
    rng = random.Random(11)
    memory = RequestMemory(keep_ms=50)
    now = T0
    memory.begin(now)
    history: list[tuple[int, int]] = []  # (time, id) of every write
    latest: dict[int, Memo] = {}
    for step in range(3000):
        if rng.random() < 0.2:
            now += rng.randrange(0, 20)
            memory.begin(now)
        request_id = rng.randrange(1, 120)
        memo = memo_for(b"k%d" % step, rng.choice([None, T0 + step]))
        memory.remember(request_id, memo)
        history.append((now, request_id))
        latest[request_id] = memo
        newest = {rid: i for i, (_, rid) in enumerate(history)}
        # begin() forgets whole runs older than the window, measured at the last begin().
        kept = [
            (rid, latest[rid])
            for i, (t, rid) in enumerate(history)
            if newest[rid] == i and t >= memory.now_ms - 50
        ]
        assert memory.snapshot() == kept
    runs = memory.runs()
    assert [e for _, entries in runs for e in entries] == memory.frozen()


def test_runs_give_each_entry_the_time_it_was_remembered() -> None:
    memory = RequestMemory(keep_ms=10_000)
    memory.begin(T0)
    memory.remember_write(1, Kind.SET, b"a", 1, None)
    memory.remember_write(2, Kind.SET, b"b", 1, None)
    memory.begin(T0 + 7)
    memory.begin(T0 + 9)  # a run without writes is left out
    memory.remember_write(3, Kind.DEL, b"c", 0, None)
    assert [(t, [packed_key(e) for e in entries]) for t, entries in memory.runs()] == [
        (T0, [b"a", b"b"]),
        (T0 + 9, [b"c"]),
    ]
    frozen = memory.frozen()
    memory.remember_write(4, Kind.SET, b"d", 3, None)  # a copy: later writes are not in it
    assert [packed_key(entry) for entry in frozen] == [b"a", b"b", b"c"]
    memory.remember_write(1, Kind.SET, b"e", 3, None)  # a reused id: one run, the newest time
    assert [(t, len(entries)) for t, entries in memory.runs()] == [(T0 + 9, 4)]
