"""workers/roles.py: what a cluster-mode worker does next, from one reading of etcd."""

from __future__ import annotations

import pytest

from workers.roles import Leader, View, next_step

pytestmark = pytest.mark.unit

HOSTS = {"a1": "A", "a2": "A", "b1": "B", "c1": "C"}


def view(**kw) -> View:  # type: ignore[no-untyped-def]
    return View(shards=2, replicas=1, hosts=HOSTS, **kw)


def test_a_standby_campaigns_for_the_lowest_shard_that_never_had_data() -> None:
    step = next_step(view(), "a1", "standby", None)
    assert (step.action, step.shard) == ("campaign", 0)
    led = view(leaders={0: Leader("b1", 5, "tcp://b:1")}, isr={0: ("b1",)})
    assert (
        next_step(led, "a1", "standby", None).action,
        next_step(led, "a1", "standby", None).shard,
    ) == ("campaign", 1)


def test_a_standby_never_campaigns_for_a_shard_with_data_whose_leader_is_gone() -> None:
    # Shard 0 had data (its ISR names b1) and lost its leader: only b1 may lead it.
    v = view(
        isr={0: ("b1",)},
        leaders={1: Leader("c1", 7, "tcp://c:1")},
        followers={1: frozenset({"a1"})},
    )
    assert next_step(v, "a2", "standby", None).action == "idle"


def test_a_standby_follows_a_shard_short_of_followers_but_never_on_a_host_with_a_copy() -> None:
    v = view(
        leaders={0: Leader("a1", 5, "tcp://a:1"), 1: Leader("b1", 6, "tcp://b:1")},
        isr={0: ("a1",), 1: ("b1",)},
    )
    assert next_step(v, "a2", "standby", None).shard == 1  # shard 0's leader is on host A
    assert next_step(v, "c1", "standby", None).shard == 0
    full = view(
        leaders=v.leaders, isr=v.isr, followers={0: frozenset({"c1"}), 1: frozenset({"c1"})}
    )
    assert next_step(full, "a2", "standby", None).action == "idle"


def test_an_in_sync_follower_campaigns_when_the_leader_key_is_gone_and_others_wait() -> None:
    v = view(isr={0: ("a1", "b1")}, followers={0: frozenset({"b1", "c1"})})
    assert next_step(v, "b1", "follower", 0).action == "campaign"
    assert next_step(v, "c1", "follower", 0).action == "idle"  # not in sync: may lack writes


def test_a_leader_whose_key_is_gone_or_taken_steps_down() -> None:
    gone = view(isr={0: ("a1",)})
    assert next_step(gone, "a1", "leader", 0).action == "step_down"
    taken = view(leaders={0: Leader("b1", 9, "tcp://b:1")}, isr={0: ("b1",)})
    assert next_step(taken, "a1", "leader", 0).action == "step_down"
    mine = view(leaders={0: Leader("a1", 9, "tcp://a:1")}, isr={0: ("a1",)})
    assert next_step(mine, "a1", "leader", 0).action == "idle"


def test_a_follower_that_lost_its_slot_steps_down() -> None:
    v = view(leaders={0: Leader("a1", 9, "tcp://a:1")}, isr={0: ("a1",)})
    assert next_step(v, "b1", "follower", 0).action == "step_down"


def test_a_new_leader_still_holding_its_follower_slot_does_not_count_as_its_own_follower() -> None:
    v = view(
        leaders={0: Leader("b1", 9, "tcp://b:1"), 1: Leader("c1", 9, "tcp://c:1")},
        isr={0: ("b1",), 1: ("c1",)},
        followers={0: frozenset({"b1"}), 1: frozenset({"a1"})},
    )
    assert (
        next_step(v, "a2", "standby", None).action,
        next_step(v, "a2", "standby", None).shard,
    ) == ("follow", 0)


def test_a_standby_restarted_on_the_disk_of_an_in_sync_member_campaigns_for_its_shard() -> None:
    # Every worker of a cluster restarted (a power cut): their ids come back with their data
    # (workers/member.py), so the in-sync members find their shards again.
    v = view(isr={0: ("a1",), 1: ("b1",)})
    assert (
        next_step(v, "b1", "standby", None).action,
        next_step(v, "b1", "standby", None).shard,
    ) == ("campaign", 1)
    assert next_step(v, "c1", "standby", None).action == "idle"


def test_a_standby_named_by_a_live_leader_key_resigns_it() -> None:
    # It stepped down (a stall made its lease look lapsed, etcd restarted and kept the lease):
    # brokers would route the shard to a worker that serves nothing, for as long as it lives.
    v = view(leaders={0: Leader("a1", 9, "tcp://a:1")}, isr={0: ("a1", "b1")})
    step = next_step(v, "a1", "standby", None)
    assert (step.action, step.shard) == ("resign", 0)
