"""TTLStore with a fake clock: expiry to the millisecond, listing, background expiry, memory."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from tests.fakes import START_MS, FakeClock
from workers.store import Missing, TTLStore
from zkv.protocol import Entry

pytestmark = pytest.mark.unit


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> TTLStore:
    return TTLStore(clock)


def test_set_returns_the_absolute_deadline(store: TTLStore) -> None:
    assert store.set(b"k", b"v", 1500) == START_MS + 1500
    assert store.get(b"k") == (b"v", START_MS + 1500)


def test_key_is_visible_until_the_millisecond_before_its_deadline(
    store: TTLStore, clock: FakeClock
) -> None:
    deadline = store.set(b"k", b"v", 100)
    assert deadline is not None
    clock.now = deadline - 1
    assert store.get(b"k") == (b"v", deadline)
    clock.now = deadline
    with pytest.raises(Missing):
        store.get(b"k")


def test_expired_key_found_by_a_read_is_deleted_on_the_spot(
    store: TTLStore, clock: FakeClock
) -> None:
    store.set(b"k", b"v", 10)
    clock.advance(10)
    assert len(store) == 1  # not swept yet: __len__ counts it
    with pytest.raises(Missing):
        store.get(b"k")
    assert len(store) == 0


def test_missing_is_a_key_error_not_none(store: TTLStore) -> None:
    with pytest.raises(KeyError):
        store.get(b"nope")


def test_overwrite_resets_the_deadline(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"k", b"old", 100)
    clock.advance(90)
    assert store.set(b"k", b"new", 100) == START_MS + 190
    clock.advance(50)  # past the first deadline, before the second
    assert store.get(b"k") == (b"new", START_MS + 190)
    assert store.expire(max_keys=100) == 0  # the old deadline's heap entry is stale
    assert store.get(b"k") == (b"new", START_MS + 190)
    clock.advance(50)
    with pytest.raises(Missing):
        store.get(b"k")


def test_overwrite_without_ttl_makes_the_key_permanent(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"k", b"v", 100)
    assert store.set(b"k", b"v2", None) is None
    clock.advance(10_000)
    assert store.expire(max_keys=100) == 0
    assert store.get(b"k") == (b"v2", None)


def test_keys_without_ttl_never_expire(store: TTLStore, clock: FakeClock) -> None:
    assert store.set(b"k", b"v", None) is None
    clock.advance(10 * 365 * 24 * 3600 * 1000)
    assert store.expire(max_keys=100) == 0
    assert store.get(b"k") == (b"v", None)
    assert store.next_deadline_ms() is None


def test_ttl_below_one_is_refused(store: TTLStore) -> None:
    with pytest.raises(ValueError):
        store.set(b"k", b"v", 0)


def test_delete(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"a", b"1", None)
    store.set(b"b", b"2", 10)
    assert store.delete(b"a") is True
    assert store.delete(b"a") is False
    with pytest.raises(Missing):
        store.get(b"a")
    clock.advance(10)
    assert store.delete(b"b") is False  # expired: nothing live was deleted
    assert len(store) == 0
    assert store.delete(b"never") is False


def test_key_deleted_and_set_again_in_the_same_millisecond(
    store: TTLStore, clock: FakeClock
) -> None:
    # Both heap entries carry the same (deadline, key): only identity tells them apart.
    store.set(b"k", b"1", 50)
    store.delete(b"k")
    store.set(b"k", b"2", 50)
    clock.advance(50)
    assert store.expire(max_keys=100) == 1
    assert len(store) == 0
    assert store.next_deadline_ms() is None


def test_entries_skips_and_deletes_expired_keys(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"live", b"1", 1000)
    store.set(b"dead", b"2", 10)
    store.set(b"forever", b"3", None)
    clock.advance(10)
    entries = store.entries()
    assert sorted(entries, key=lambda e: e.key) == [
        Entry(b"forever", b"3", None),
        Entry(b"live", b"1", START_MS + 1000),
    ]
    assert len(store) == 2


def test_entries_after_limit_keys_only(store: TTLStore) -> None:
    for name in [b"e", b"a", b"d", b"c", b"b", b"f"]:
        store.set(name, b"value-" + name, None)
    assert [e.key for e in store.entries(limit=3)] == [b"a", b"b", b"c"]
    assert [e.key for e in store.entries(after=b"c", limit=2)] == [b"d", b"e"]
    assert [e.key for e in store.entries(after=b"e", limit=10)] == [b"f"]
    assert store.entries(after=b"f", limit=10) == []
    assert sorted(e.key for e in store.entries(after=b"b")) == [b"c", b"d", b"e", b"f"]
    assert {e.value for e in store.entries(keys_only=True)} == {b""}
    assert store.entries(after=b"a", limit=1) == [Entry(b"b", b"value-b", None)]


def test_entries_pages_cover_every_key_once(store: TTLStore) -> None:
    keys = {b"key:%03d" % i for i in range(250)}
    for key in keys:
        store.set(key, b"", None)
    seen: list[bytes] = []
    cursor = b""
    while page := store.entries(after=cursor, limit=40, keys_only=True):
        seen.extend(e.key for e in page)
        cursor = page[-1].key
    assert seen == sorted(keys)


def test_entries_with_limit_does_not_count_expired_keys(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"a", b"", 5)
    store.set(b"b", b"", None)
    store.set(b"c", b"", None)
    clock.advance(5)
    assert [e.key for e in store.entries(limit=2)] == [b"b", b"c"]


def test_expire_removes_keys_nobody_read_and_leaves_live_ones(
    store: TTLStore, clock: FakeClock
) -> None:
    for i in range(10):
        store.set(b"short%d" % i, b"", 100)
        store.set(b"long%d" % i, b"", 200)
        store.set(b"forever%d" % i, b"", None)
    clock.advance(99)
    assert store.expire(max_keys=1000) == 0
    clock.advance(1)
    assert store.expire(max_keys=1000) == 10
    assert len(store) == 20
    assert store.next_deadline_ms() == START_MS + 200
    clock.advance(100)
    assert store.expire(max_keys=1000) == 10
    assert len(store) == 10
    assert store.next_deadline_ms() is None


def test_expire_respects_max_keys(store: TTLStore, clock: FakeClock) -> None:
    for i in range(100):
        store.set(b"k%d" % i, b"", 10 + i % 7)
    clock.advance(1000)
    assert store.expire(max_keys=30) == 30
    assert len(store) == 70
    next_deadline = store.next_deadline_ms()
    assert next_deadline is not None and next_deadline <= clock.now  # a backlog remains
    assert store.expire(max_keys=30) == 30
    assert store.expire(max_keys=100) == 40
    assert len(store) == 0


def test_expire_stops_at_its_time_budget(store: TTLStore, clock: FakeClock) -> None:
    for i in range(1000):
        store.set(b"k%d" % i, b"", 1)
    clock.advance(1)
    # A zero budget is spent after the first key: the pass still makes progress.
    assert store.expire(max_keys=1000, budget_s=0.0) == 1
    assert len(store) == 999


def test_expire_removes_keys_in_deadline_order(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"late", b"", 30)
    store.set(b"early", b"", 10)
    store.set(b"middle", b"", 20)
    clock.advance(100)
    assert store.expire(max_keys=1) == 1
    assert sorted(store._data) == [b"late", b"middle"]  # peeking: reads would delete them
    assert store.expire(max_keys=1) == 1
    assert sorted(store._data) == [b"late"]


def test_next_deadline_is_the_earliest(store: TTLStore) -> None:
    assert store.next_deadline_ms() is None
    store.set(b"a", b"", 300)
    store.set(b"b", b"", 100)
    store.set(b"c", b"", None)
    assert store.next_deadline_ms() == START_MS + 100


def test_setting_one_key_in_a_loop_does_not_grow_the_heap(store: TTLStore) -> None:
    for i in range(10_000):
        store.set(b"hot", b"%d" % i, 60_000)
    store.set(b"other", b"", 60_000)
    assert len(store) == 2
    assert len(store._heap) <= 2 * 2 + 1  # O(live keys), whatever the number of writes


def test_stale_heap_entries_stay_bounded_by_live_keys(store: TTLStore) -> None:
    for i in range(1000):
        store.set(b"k%d" % i, b"", 60_000)
    for round_ in range(20):
        for i in range(1000):
            store.set(b"k%d" % i, b"%d" % round_, 60_000)
        assert len(store._heap) <= 2 * 1000 + 1
    for i in range(1000):
        store.delete(b"k%d" % i)
    assert store._heap == []


def test_memory_is_given_back_after_a_mass_expiry(clock: FakeClock) -> None:
    count = 20_000  # enough for a dict table of a few MB; tracemalloc makes more slow
    gc.collect()
    tracemalloc.start()
    try:
        store = TTLStore(clock)
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            store.set(b"key:%012d" % i, b"%016d" % i, 1000)
        full = tracemalloc.get_traced_memory()[0] - baseline
        clock.advance(1000)
        assert store.expire(max_keys=count) == count
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert len(store) == 0
    assert full > 4_000_000  # ~300 bytes per key
    # Without the rebuild, the dict alone would keep its ~50k-key table (several MB).
    assert after < 100_000, f"{after} bytes still held after expiring {count} keys"


def test_memory_is_given_back_after_expiry_found_by_reads(clock: FakeClock) -> None:
    # The other way keys die: found expired by entries(), which makes their heap stamps stale.
    store = TTLStore(clock)
    for i in range(20_000):
        store.set(b"k%d" % i, b"v", 10)
    clock.advance(10)
    assert store.entries() == []
    assert len(store) == 0
    assert store._heap == []
    assert len(store._data) == 0


# --- replay and snapshots ---------------------------------------------------------------------


def test_restore_stores_with_an_absolute_deadline(store: TTLStore, clock: FakeClock) -> None:
    assert store.restore(b"k", b"v", START_MS + 50)
    assert store.restore(b"p", b"permanent", None)
    assert store.get(b"k") == (b"v", START_MS + 50)
    clock.advance(50)
    assert store.expire(max_keys=10) == 1  # restored keys expire like any other
    assert store.get(b"p") == (b"permanent", None)


def test_restore_of_a_dead_value_removes_the_key(store: TTLStore, clock: FakeClock) -> None:
    store.restore(b"k", b"old", None)
    # A replayed overwrite whose deadline has passed: the key is gone, not the old value back.
    assert not store.restore(b"k", b"new", START_MS)
    with pytest.raises(Missing):
        store.get(b"k")
    assert len(store) == 0
    assert not store.restore(b"never-seen", b"v", START_MS - 1)
    assert len(store) == 0


def test_a_snapshot_does_not_change_when_the_store_does(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"a", b"1", None)
    store.set(b"b", b"2", 100)
    store.set(b"c", b"3", 10)
    snapshot = store.snapshot()
    store.set(b"a", b"changed", None)
    store.delete(b"b")
    store.set(b"d", b"new", None)
    clock.advance(10)
    assert len(snapshot) == 3
    assert sorted(snapshot.live(clock())) == [(b"a", b"1", None), (b"b", b"2", START_MS + 100)]
