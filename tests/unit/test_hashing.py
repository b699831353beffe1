"""Key hashing: Redis Cluster's slots, with the documented values."""

import random

import pytest

from zkv.hashing import SLOTS, key_shard, key_slot, slot_shard

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        (b"123456789", 0x31C3),  # CRC16/XMODEM check value, Redis's own test vector
        (b"foo", 12182),  # CLUSTER KEYSLOT foo in Redis
        (b"", 0),
        (b"1", 9842),
    ],
)
def test_documented_slots(key, slot):
    assert key_slot(key) == slot


def test_hash_tags_put_related_keys_in_one_slot():
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"{user1000}.following") == key_slot(b"user1000")
    # Empty tag or no closing brace: the whole key is hashed, as in Redis.
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")
    assert key_slot(b"foo{bar") != key_slot(b"bar")
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")


def test_slots_split_into_contiguous_equal_ranges():
    for shards in (1, 2, 3, 5, 16):
        owners = [slot_shard(slot, shards) for slot in range(SLOTS)]
        assert owners == sorted(owners)
        sizes = [owners.count(s) for s in range(shards)]
        assert max(sizes) - min(sizes) <= 1


def test_keys_spread_across_shards():
    rng = random.Random(7)
    counts = [0, 0]
    for _ in range(10_000):
        counts[key_shard(rng.randbytes(8), 2)] += 1
    assert all(4_500 < count < 5_500 for count in counts)


def test_stable_shard_of_the_seed_example_key():
    # Documented in README/docs: key "1" lives in slot 9842, hence shard 1 of 2.
    assert key_shard(b"1", 2) == 1
