"""Worker registry: shard assignment, standbys, takeover, liveness."""

import pytest

from broker.registry import Registry

pytestmark = pytest.mark.unit


def test_new_workers_take_the_lowest_unowned_shard_then_stand_by():
    registry = Registry(shards=2)
    assert registry.register(b"a", None, now=0) == 0
    assert registry.register(b"b", None, now=0) == 1
    assert registry.register(b"c", None, now=0) is None
    assert registry.owned() == [True, True]
    assert registry.standbys() == 1


def test_a_worker_holding_a_shard_gets_it_back_if_free():
    registry = Registry(shards=3)
    assert registry.register(b"a", 2, now=0) == 2
    assert registry.owner(2) == b"a"
    # Shard 2 is taken: a second claimant gets the lowest free one instead.
    assert registry.register(b"b", 2, now=0) == 0
    # A claim outside the range is ignored, not trusted.
    assert registry.register(b"c", 99, now=0) == 1


def test_removing_an_owner_frees_its_shard_for_the_oldest_standby():
    registry = Registry(shards=1)
    registry.register(b"owner", None, now=0)
    registry.register(b"standby1", None, now=0)
    registry.register(b"standby2", None, now=0)
    record = registry.remove(b"owner")
    assert record is not None and record.shard == 0
    assert registry.owner(0) is None
    assert registry.promote(0) == b"standby1"
    assert registry.owner(0) == b"standby1"
    assert registry.promote(0) is None  # already owned


def test_registering_again_releases_the_old_shard_first():
    registry = Registry(shards=2)
    registry.register(b"a", None, now=0)
    registry.register(b"a", 1, now=0)
    assert registry.owner(0) is None
    assert registry.owner(1) == b"a"
    assert len(registry.identities()) == 1


def test_silent_workers_are_reported():
    registry = Registry(shards=2)
    registry.register(b"a", None, now=0.0)
    registry.register(b"b", None, now=0.0)
    registry.seen(b"b", now=5.0)
    registry.seen(b"unknown", now=5.0)  # ignored
    assert registry.silent_since(3.0) == [b"a"]


def test_zero_shards_is_refused():
    with pytest.raises(ValueError, match="shards"):
        Registry(shards=0)


CLUSTER = 0x1234_5678_9ABC_DEF0


def test_once_a_durable_worker_owned_a_shard_only_its_cluster_may_own_one():
    registry = Registry(shards=1)
    assert registry.refusal(durable=False, cluster=0) is None  # nothing to protect yet
    assert registry.register(b"owner", None, now=0, durable=True, cluster=CLUSTER) == 0
    assert registry.cluster == CLUSTER
    registry.register(b"memory", None, now=0)  # --in-memory: would start from an empty log
    registry.register(b"other", None, now=0, durable=True, cluster=CLUSTER + 1)  # another dir
    registry.register(b"same", None, now=0, durable=True, cluster=CLUSTER)
    memory, other = registry.get(b"memory"), registry.get(b"other")
    assert memory is not None and memory.refused is not None and "memory only" in memory.refused
    assert other is not None and other.refused is not None and "another --data-dir" in other.refused
    assert registry.standbys() == 1
    registry.remove(b"owner")
    assert registry.promote(0) == b"same"  # the older standbys were passed over
    registry.remove(b"same")
    assert registry.promote(0) is None  # none left that can see the data
    assert registry.register(b"memory", 0, now=1) is None  # not even by claiming it


def test_a_standby_registered_before_the_cluster_was_known_is_checked_when_promoted():
    registry = Registry(shards=1)
    registry.register(b"memory", None, now=0, hand_out=False)  # claims window: waits
    assert registry.register(b"owner", 0, now=0, durable=True, cluster=CLUSTER) == 0
    registry.remove(b"owner")
    assert registry.promote(0) is None
    record = registry.get(b"memory")
    assert record is not None and record.refused is not None
