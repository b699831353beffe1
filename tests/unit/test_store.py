"""TTLStore with a fake clock: expiry to the millisecond, listing, background expiry, memory."""

from __future__ import annotations

import gc
import logging
import random
import tracemalloc

import pytest

from tests.fakes import START_MS, FakeClock
from workers.store import (
    EXPIRE_CHUNK_KEYS,
    EXPIRY_LOG_MIN_KEYS,
    INDEX_PIECE_KEYS,
    ListingTooLarge,
    Missing,
    TTLStore,
)
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
    assert store.expire(max_keys=100) == 0  # the old deadline's index entry is stale
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
    # Two index entries for one key and one deadline: the key must be removed once.
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


class CountingDict(dict):  # type: ignore[type-arg]
    """The store's dict, counting the records a listing looks at (by lookup or by scan)."""

    looked = 0

    def get(self, key, default=None):  # type: ignore[no-untyped-def]
        self.looked += 1
        return super().get(key, default)

    def items(self):  # type: ignore[no-untyped-def]
        for item in super().items():
            self.looked += 1
            yield item


def test_a_page_costs_its_size_not_the_size_of_the_store(store: TTLStore) -> None:
    # The cost of a listing, counted in records looked at (no timing): a page of 100 keys
    # out of 200,000 looks at about 100 records, not 200,000 (issue 10, item 3).
    keys = [b"key:%07d" % i for i in range(200_000)]
    random.Random(7).shuffle(keys)
    for key in keys:
        store.set(key, b"v", None)
    data = store._data = CountingDict(store._data)
    page = store.entries(after=b"key:0123456", limit=100, keys_only=True)
    assert [e.key for e in page] == [b"key:%07d" % i for i in range(123457, 123557)]
    assert data.looked <= 100 + 2 * INDEX_PIECE_KEYS
    data.looked = 0
    last = store.entries(after=b"key:0199990", limit=100)
    assert len(last) == 9 and data.looked <= 9 + 2 * INDEX_PIECE_KEYS


def test_paging_skips_deleted_keys_and_never_repeats_one(store: TTLStore, clock: FakeClock) -> None:
    for i in range(5_000):
        store.set(b"k%05d" % i, b"", None if i % 3 else 10)
    for i in range(0, 5_000, 7):
        store.delete(b"k%05d" % i)
    for i in range(0, 5_000, 14):  # deleted, then set again: indexed once
        store.set(b"k%05d" % i, b"again", None)
    clock.advance(10)
    expected = sorted(b"k%05d" % i for i in range(5_000) if (i % 3 and i % 7) or i % 14 == 0)
    seen: list[bytes] = []
    cursor = b""
    while page := store.entries(after=cursor, limit=97, keys_only=True):
        seen.extend(e.key for e in page)
        cursor = page[-1].key
    assert seen == expected
    assert [e.key for e in store.entries()] == expected


def test_stale_index_entries_are_tidied_by_expiry_passes(store: TTLStore) -> None:
    for i in range(20_000):
        store.set(b"k%05d" % i, b"", None)
    for i in range(19_000):
        store.delete(b"k%05d" % i)
    assert store._index.entries == 20_000  # deletions leave stale entries behind
    for _ in range(100):
        store.expire(100)
    assert store._index.entries <= 2 * len(store) + 2_048
    for i in range(19_000, 20_000):
        store.delete(b"k%05d" % i)
    store.expire(100)
    assert store._index.entries == 0  # an empty store drops its index at once


def test_listing_bounds_refuse_before_copying(store: TTLStore) -> None:
    for i in range(50):
        store.set(b"k%02d" % i, b"x" * 100, None)
    with pytest.raises(ListingTooLarge, match="more than 10 keys"):
        store.entries(max_keys=10)
    with pytest.raises(ListingTooLarge, match="over the bound"):
        store.entries(limit=11, max_keys=10)
    with pytest.raises(ListingTooLarge, match="bytes of entries"):
        store.entries(limit=10, max_bytes=1_000)
    assert len(store.entries(limit=10, keys_only=True, max_bytes=1_000)) == 10
    assert len(store.entries(after=b"k39", max_keys=10)) == 10


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
    # A zero budget is spent after the first chunk of keys: the pass still makes progress.
    removed = store.expire(max_keys=1000, budget_s=0.0)
    assert 1 <= removed <= EXPIRE_CHUNK_KEYS
    assert len(store) == 1000 - removed


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


def test_setting_one_key_in_a_loop_does_not_grow_the_index(store: TTLStore) -> None:
    for i in range(10_000):
        store.set(b"hot", b"%d" % i, 60_000)
    store.set(b"other", b"", 60_000)
    assert len(store) == 2
    assert store.index_size() <= 2 * 2 + 1  # O(live keys), whatever the number of writes


def test_stale_index_entries_stay_bounded_by_live_keys(store: TTLStore) -> None:
    for i in range(1000):
        store.set(b"k%d" % i, b"", 60_000)
    for round_ in range(20):
        for i in range(1000):
            store.set(b"k%d" % i, b"%d" % round_, 60_000)
        assert store.index_size() <= 2 * 1000 + 1
    for i in range(1000):
        store.delete(b"k%d" % i)
    assert store.index_size() == 0
    assert store.next_deadline_ms() is None


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
    assert full > 2_000_000  # ~150 bytes per key
    # Without the rebuild, the dict alone would keep its ~50k-key table (several MB).
    assert after < 100_000, f"{after} bytes still held after expiring {count} keys"


def test_memory_is_given_back_after_expiry_found_by_reads(clock: FakeClock) -> None:
    # The other way keys die: found expired by entries(), which makes their index entries stale.
    store = TTLStore(clock)
    for i in range(20_000):
        store.set(b"k%d" % i, b"v", 10)
    clock.advance(10)
    assert store.entries() == []
    assert len(store) == 0
    assert store.index_size() == 0
    assert store.next_deadline_ms() is None
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


# --- the expiry index: a hierarchical timing wheel ---------------------------------------------

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


def drain(store: TTLStore, max_keys: int = 1000) -> int:
    """Run expiry passes while a backlog remains, as the worker does; returns the passes."""
    passes = 0
    while (due := store.next_deadline_ms()) is not None and due <= store.clock():
        store.expire(max_keys)
        passes += 1
        assert passes < 1_000_000, "expiry made no progress"
    return passes


def levels(store: TTLStore) -> dict[int, int]:
    """Index entries per level (peeking: the level is the low bits of a bucket id)."""
    counts: dict[int, int] = {}
    for bucket_id, pieces in store._buckets.items():
        level = bucket_id & 7
        counts[level] = counts.get(level, 0) + sum(len(piece) for piece in pieces)
    return counts


@pytest.mark.parametrize("ttl_ms", [1, 999, 5_119, 5_120, 4_096 * 70, HOUR_MS, 40 * DAY_MS])
def test_expire_removes_a_key_at_its_exact_millisecond_from_any_level(
    store: TTLStore, clock: FakeClock, ttl_ms: int
) -> None:
    # Far deadlines start in coarse buckets and are refined on the way; the background pass
    # still removes the key at its deadline, not a bucket width later, and not before.
    deadline = store.set(b"k", b"v", ttl_ms)
    store.set(b"forever", b"", None)
    assert deadline is not None
    step = max(1, ttl_ms // 7)
    while clock.now < deadline - 1:
        clock.now = min(clock.now + step, deadline - 1)
        drain(store)
        assert store._data.keys() >= {b"k"}  # peeking: a read would not tell
    next_due = store.next_deadline_ms()
    assert next_due is not None and next_due <= deadline
    clock.now = deadline
    drain(store)
    assert b"k" not in store._data
    assert len(store) == 1
    assert store.index_size() == 0
    assert store.next_deadline_ms() is None


def test_keys_are_filed_by_time_left_and_refined_to_millisecond_buckets(
    store: TTLStore, clock: FakeClock
) -> None:
    store.set(b"soon", b"", 2_000)  # level 0: one bucket per millisecond
    store.set(b"minutes", b"", 60_000)  # level 1: 4.1 s buckets
    store.set(b"hour", b"", HOUR_MS)  # level 2: 4.4 min buckets
    assert levels(store) == {0: 1, 1: 1, 2: 1}
    clock.advance(HOUR_MS - 3_000)
    drain(store)
    assert set(store._data) == {b"hour"}
    assert levels(store) == {0: 1}  # refined level by level down to its millisecond


def test_a_wave_in_one_second_is_refined_before_it_is_due(
    store: TTLStore, clock: FakeClock
) -> None:
    # 20,000 keys due within one second, a minute away: one or two level-1 buckets, refined
    # into millisecond buckets a lead ahead, so the wave itself is deletes only.
    start = clock.now + 60_000
    for i in range(20_000):
        store.restore(b"k%d" % i, b"v", start + i % 1000)
    assert set(levels(store)) == {1}
    clock.now = start - 1
    drain(store)
    assert levels(store) == {0: 20_000}
    assert len(store) == 20_000
    clock.now = start + 999
    drain(store)
    assert len(store) == 0


def test_mass_expiry_drains_in_bounded_passes(store: TTLStore, clock: FakeClock) -> None:
    for i in range(30_000):
        store.set(b"k%d" % i, b"v", 10_000 + i % 1000)
    for i in range(100):
        store.set(b"keep%d" % i, b"v", None)
    clock.advance(20_000)  # all due at once: a backlog
    passes = 0
    while True:
        due = store.next_deadline_ms()
        if due is None or due > clock.now:
            break
        assert store.expire(max_keys=500) <= 500  # never more per pass than asked
        passes += 1
    assert len(store) == 100
    assert 30_000 / 500 <= passes <= 30_000 / 500 + 1000  # one partial pass per bucket at most
    assert store.index_size() == 0


def test_memory_is_rebuilt_after_a_mass_expiry(store: TTLStore, clock: FakeClock) -> None:
    for i in range(20_000):
        store.set(b"k%d" % i, b"v", 5_000 + i % 2_000)
    store.set(b"keep", b"v", None)
    table = store._data
    clock.advance(10_000)
    drain(store, max_keys=1000)
    assert store._data is not table  # the dict was copied into a right-sized one
    assert store._data == {b"keep": b"v" + store.last_version.to_bytes(8, "big") + bytes(8)}
    assert store._buckets == {}
    assert store._heap == []


def test_mass_expiry_does_not_copy_the_dict_while_a_backlog_remains(
    store: TTLStore, clock: FakeClock
) -> None:
    for i in range(20_000):
        store.set(b"k%d" % i, b"v", 100)
    clock.advance(100)
    table = store._data
    while store.expire(max_keys=1000):
        if store.next_deadline_ms() is not None:
            assert store._data is table  # a copy mid-wave would be a pause for nothing
    assert len(store) == 0


def test_overwrite_moves_a_key_between_levels(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"k", b"far", HOUR_MS)
    store.set(b"k", b"near", 50)  # the coarse entry goes stale
    clock.advance(50)
    assert store.expire(max_keys=10) == 1
    assert len(store) == 0
    store.set(b"k", b"near", 50)
    store.set(b"k", b"far", HOUR_MS)  # the fine entry goes stale
    clock.advance(50)
    assert store.expire(max_keys=10) == 0
    assert store.get(b"k") == (b"far", clock.now - 50 + HOUR_MS)
    clock.advance(HOUR_MS - 50)
    drain(store)
    assert len(store) == 0
    assert store.index_size() == 0


def test_delete_then_set_in_another_bucket(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"k", b"1", 100)
    assert store.delete(b"k")
    store.set(b"k", b"2", 300)
    clock.advance(100)
    assert store.expire(max_keys=10) == 0
    assert store.get(b"k") == (b"2", START_MS + 300)
    clock.advance(200)
    assert store.expire(max_keys=10) == 1


def test_buckets_stay_few_however_deadlines_spread(store: TTLStore) -> None:
    rng = random.Random(7)
    for i in range(20_000):
        store.set(b"k%d" % i, b"", rng.randrange(1, 3650 * DAY_MS))
    # Not one bucket per key: a bounded number per level (see the comment in expire()).
    assert len(store._buckets) < 600
    assert store.index_size() == 20_000


def test_sets_in_rotation_keep_the_index_bounded(store: TTLStore, clock: FakeClock) -> None:
    # Refreshing sessions: each key set again and again with a deadline in the same bucket,
    # interleaved with the others, so no SET finds its key last in the bucket's list.
    for round_ in range(30):
        for i in range(500):
            store.set(b"session%d" % i, b"%d" % round_, 30 * 60_000)
        clock.advance(10)
        assert store.index_size() <= 3 * 500 + 1
    clock.advance(30 * 60_000)
    drain(store)
    assert len(store) == 0
    assert store.index_size() == 0


def test_mass_expiry_is_logged_once_the_backlog_is_gone(
    store: TTLStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(EXPIRY_LOG_MIN_KEYS):
        store.set(b"k%d" % i, b"", 1_000 + i % 10)
    clock.advance(1_020)
    with caplog.at_level(logging.INFO, logger="workers.store"):
        store.expire(max_keys=100)
        assert "expired" not in caplog.text  # a backlog remains
        drain(store, max_keys=100)
        assert "expired" not in caplog.text  # the stretch ends with a pass that finds nothing
        clock.advance(50)
        store.expire(max_keys=100)
    assert f"expired {EXPIRY_LOG_MIN_KEYS} keys in" in caplog.text
    assert "each within 20 ms of its deadline; 0 keys left; the longest pass took" in caplog.text


def test_the_index_holds_keys_in_sealed_tuples_the_collector_skips(
    store: TTLStore, clock: FakeClock
) -> None:
    for i in range(1000):
        store.set(b"k%d" % i, b"v", 60_000)
    (pieces,) = store._buckets.values()
    assert all(type(piece) is tuple for piece in pieces[:-1])
    assert sum(len(piece) for piece in pieces) == 1000
    gc.collect()
    assert not gc.is_tracked(store._data)  # a dict of bytes: never traversed
    assert not any(gc.is_tracked(piece) for piece in pieces[:-1])
    clock.advance(60_000)
    assert store.expire(max_keys=100) == 100  # pieces split to fit max_keys
    drain(store, max_keys=30)
    assert len(store) == 0


def test_the_clock_going_back_loses_no_key(store: TTLStore, clock: FakeClock) -> None:
    store.set(b"k", b"v", 10_000)
    clock.advance(-60_000)  # a wall clock stepped back: the key lives longer, never less
    assert store.expire(max_keys=10) == 0
    assert store.get(b"k") == (b"v", START_MS + 10_000)
    clock.now = START_MS + 10_000
    drain(store)
    assert len(store) == 0


def test_random_operations_agree_with_a_model(clock: FakeClock) -> None:
    # Against a plain dict of (value, deadline): reads never see a key at or after its
    # deadline, and once the passes have drained, no expired key is left in memory.
    rng = random.Random(2024)
    store = TTLStore(clock)
    model: dict[bytes, tuple[bytes, int | None]] = {}
    ttls = [1, 2, 50, 1_000, 5_119, 5_121, 70_000, HOUR_MS, 3 * DAY_MS]
    keys = [b"k%d" % i for i in range(60)]
    for step in range(20_000):
        key = rng.choice(keys)
        action = rng.random()
        if action < 0.45:
            ttl = rng.choice([*ttls, None])
            value = b"%d" % step
            deadline = store.set(key, value, ttl)
            model[key] = (value, deadline)
        elif action < 0.55:
            live = key in model and (model[key][1] or clock.now + 1) > clock.now
            assert store.delete(key) is live
            model.pop(key, None)
        elif action < 0.75:
            expected = model.get(key)
            if expected is None or (expected[1] is not None and expected[1] <= clock.now):
                with pytest.raises(Missing):
                    store.get(key)
            else:
                assert store.get(key) == expected
        elif action < 0.9:
            store.expire(max_keys=rng.choice([1, 7, 100]))
        else:
            clock.advance(rng.choice([1, 3, 100, 2_000, 60_000, HOUR_MS]))
            drain(store, max_keys=rng.choice([5, 100]))
            for gone in [k for k, (_, d) in model.items() if d is not None and d <= clock.now]:
                assert gone not in store._data
                del model[gone]
            assert set(store._data) == set(model)
        assert store.index_size() <= 2 * len(model) + 8 * len(keys)


def test_overwrites_with_about_the_same_ttl_add_no_index_entries(
    store: TTLStore, clock: FakeClock
) -> None:
    # The common overwrite (same TTL, a little later): the key's entry stays current, so the
    # index holds one entry per key and never needs compacting, however many writes come.
    keys = [b"k%d" % i for i in range(500)]
    for key in keys:
        store.set(key, b"v", HOUR_MS)
    for _ in range(20):
        clock.advance(7)
        for key in keys:
            store.set(key, b"w", HOUR_MS)
    assert store.index_size() == len(keys)
    clock.advance(HOUR_MS)
    drain(store)
    assert len(store) == 0
    assert store.index_size() == 0


@pytest.mark.parametrize("seed", range(4))
def test_overwrites_across_clock_steps_leave_no_key_unexpired(clock: FakeClock, seed: int) -> None:
    # Overwrites that reuse the key's entry (same window) mixed with a clock that steps back
    # and forward: once every deadline has passed, the passes must find every key, which
    # they can only do through the index.
    rng = random.Random(seed)
    store = TTLStore(clock)
    keys = [b"k%d" % i for i in range(40)]
    ttls = [1, 3, 4_000, 5_119, 5_200, 200_000, 300_000, HOUR_MS, HOUR_MS + 1, 2 * DAY_MS]
    for _ in range(5_000):
        action = rng.random()
        if action < 0.8:
            store.set(rng.choice(keys), b"v", rng.choice(ttls))
        elif action < 0.9:
            clock.advance(rng.choice([-HOUR_MS, -70_000, -5_000, -1, 1, 9, 4_000, 100_000]))
        else:
            store.expire(max_keys=rng.choice([1, 50]))
    clock.advance(3 * DAY_MS + 2 * HOUR_MS)  # past every deadline, whatever the steps were
    drain(store, max_keys=37)
    assert len(store) == 0
    assert store.index_size() == 0


def test_a_mass_expiry_tidies_the_key_index_a_little_per_pass_and_the_rest_when_idle(
    store: TTLStore, clock: FakeClock
) -> None:
    # Issue 10 follow-up: every pass of a mass expiry filtered 64 pieces of the key index once
    # half the keys had gone, 5-8 times the pass's own work, and GETs waited behind it. A pass
    # that expires keys now tidies INDEX_TIDY_PIECES_BUSY pieces; idle passes do the rest.
    from workers.store import INDEX_PIECE_KEYS, INDEX_TIDY_MIN_STALE, INDEX_TIDY_PIECES_BUSY

    for i in range(40_000):
        store.set(b"wave:%08d" % i, b"v", 10)
    for i in range(1_000):
        store.set(b"steady:%06d" % i, b"v", None)
    clock.advance(10)
    most = INDEX_TIDY_PIECES_BUSY * 2 * INDEX_PIECE_KEYS  # a piece holds up to twice the keys
    tidied = 0
    while store.next_deadline_ms() is not None:
        before = store._index.entries
        removed = store.expire(100)
        assert removed
        assert before - store._index.entries <= most
        tidied += before - store._index.entries
    assert tidied  # the passes did tidy
    passes = 0
    while store._index.entries > 2 * 1_000 + INDEX_TIDY_MIN_STALE:  # stale > live + min
        before = store._index.entries  # idle passes, no key due: the whole tidy
        store.expire(100)
        assert before - store._index.entries > most
        passes += 1
    assert passes
    assert [entry.key for entry in store.entries(limit=2)] == [b"steady:000000", b"steady:000001"]


def test_an_expire_event_carries_the_deadline_that_passed(
    store: TTLStore, clock: FakeClock
) -> None:
    # Every way a key expires: the active expiry near (level 0) and far (a refinement level)
    # from its deadline, a listing that finds it, a read that finds it.
    events: list[tuple[int, bytes, int, int]] = []
    store.events = events
    store.set(b"near", b"v", 50)
    store.set(b"far", b"v", 3_600_000)
    store.set(b"listed", b"v", 70)
    store.set(b"read", b"v", 80)
    clock.now += 60
    store.expire(100)
    clock.now += 15
    store.entries()
    clock.now += 10
    with pytest.raises(Missing):
        store.get(b"read")
    clock.now += 3_600_000
    store.expire(1000)
    deadlines = {key: deadline for _, key, _, deadline in events}
    assert deadlines == {
        b"near": START_MS + 50,
        b"listed": START_MS + 70,
        b"read": START_MS + 80,
        b"far": START_MS + 3_600_000,
    }
