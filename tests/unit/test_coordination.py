"""zkv.coordination without etcd: the lease's timing with an injected clock, values read from
etcd as hostile, and a write that recognises its own success after a lost answer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zkv.coordination import (
    BadValue,
    ClusterConfig,
    ConfigMismatch,
    Coordinator,
    Isr,
    Lease,
    check_id,
    parse_broker,
    parse_config,
    parse_isr,
    parse_leader,
    parse_worker,
)
from zkv.etcd import KV, EtcdUnavailable, TxnResult

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeLeases:
    """The lease calls of an Etcd; each takes ``delay_s`` of the fake clock (a slow network)."""

    timeout_s = 1.0

    def __init__(self, clock: Clock, ttl_s: int = 3, delay_s: float = 0.5) -> None:
        self.clock = clock
        self.ttl_s = ttl_s
        self.delay_s = delay_s
        self.answers: list[int | Exception] = []

    def copy(self, timeout_s: float | None = None) -> FakeLeases:
        return self

    def close(self) -> None:
        pass

    def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        self.clock.now += self.delay_s
        return 42, max(ttl_s, self.ttl_s)

    def lease_keepalive(self, lease_id: int) -> int:
        self.clock.now += self.delay_s
        answer = self.answers.pop(0) if self.answers else self.ttl_s
        if isinstance(answer, Exception):
            raise answer
        return answer

    def lease_revoke(self, lease_id: int) -> None:
        pass


def lease(clock: Clock, **kwargs: Any) -> tuple[Lease, FakeLeases]:
    fake = FakeLeases(clock, **kwargs)
    return Lease(fake, 1, clock=clock), fake  # type: ignore[arg-type]


def test_valid_until_counts_from_before_the_grant_with_a_ten_percent_margin() -> None:
    clock = Clock()
    held, _ = lease(clock, ttl_s=3, delay_s=0.5)
    held.grant()
    assert held.ttl_s == 3  # etcd's minimum, above the 1 s asked for
    # sent at 100.0, answered at 100.5: etcd's expiry is at least 100.0 + 3 s
    assert held.valid_until() == pytest.approx(100.0 + 3 * 0.9)


def test_a_renewal_counts_from_before_its_request_not_from_its_answer() -> None:
    clock = Clock()
    held, _ = lease(clock, ttl_s=10, delay_s=2.0)
    held.grant()
    clock.now = 105.0
    assert held.renew()
    assert clock.now == 107.0
    assert held.valid_until() == pytest.approx(105.0 + 9.0)
    assert held.valid()
    clock.now = 105.0 + 9.0
    assert not held.valid()  # at valid_until the holder acts no more


def test_a_failed_renewal_leaves_valid_until_and_a_later_one_moves_it_on() -> None:
    clock = Clock()
    held, fake = lease(clock, ttl_s=3, delay_s=0.0)
    held.grant()
    before = held.valid_until()
    fake.answers = [EtcdUnavailable("no endpoint answered")]
    clock.now = 101.0
    with pytest.raises(EtcdUnavailable):
        held.renew()
    assert held.valid_until() == before
    clock.now = 103.0  # past valid_until: not valid, though etcd may still hold the lease
    assert not held.valid()
    assert held.renew()  # etcd still had it: its keys were never deleted
    assert held.valid_until() == pytest.approx(103.0 + 2.7)
    assert not held.lost


def test_valid_until_never_moves_back() -> None:
    clock = Clock()
    held, fake = lease(clock, ttl_s=10, delay_s=0.0)
    held.grant()
    fake.ttl_s = 2  # a shorter TTL answered later cannot shorten what was promised
    clock.now = 101.0
    assert held.renew()
    assert held.valid_until() == pytest.approx(100.0 + 9.0)


def test_a_lease_etcd_says_is_gone_is_lost_for_good() -> None:
    clock = Clock()
    fake = FakeLeases(clock, ttl_s=3, delay_s=0.0)
    calls: list[str] = []
    held = Lease(fake, 3, clock=clock, on_lost=lambda: calls.append("lost"))  # type: ignore[arg-type]
    held.grant()
    fake.answers = [0, 3]
    assert not held.renew()
    assert held.lost and held.valid_until() == float("-inf") and not held.valid()
    assert not held.renew()  # no resurrection: a later answer is not even asked for
    assert calls == ["lost"]


def test_a_lease_ttl_below_one_second_is_refused() -> None:
    with pytest.raises(ValueError):
        Lease(FakeLeases(Clock()), 0)  # type: ignore[arg-type]


# --- values read from etcd --------------------------------------------------------------------


def kv(value: Any, key: bytes = b"/zkv/zkv/x", create: int = 5, mod: int = 9) -> KV:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return KV(key, raw, create, mod, 1, 0)


GOOD_CONFIG = {"shards": 2, "replicas": 1, "cluster_id": "0123456789abcdef"}


def test_good_values_parse() -> None:
    assert parse_config(kv(GOOD_CONFIG)) == ClusterConfig(2, 1, "0123456789abcdef")
    assert parse_leader(kv({"worker": "w1", "replication": "tcp://h:1"})) == (
        "w1",
        5,
        "tcp://h:1",
    )
    assert parse_isr(kv({"members": ["w1", "w2"], "epoch": 4})) == Isr(("w1", "w2"), 4, 9)
    # written by a campaign (epoch 0): the epoch is the write's own revision
    assert parse_isr(kv({"members": ["w1"], "epoch": 0})).epoch == 9
    assert parse_worker(kv({"host": "h", "replication": "tcp://h:1", "durable": True})).durable
    assert (
        parse_broker(
            kv({"backend": "tcp://h:1", "frontend": "tcp://h:2", "public_key": None})
        ).public_key
        is None
    )


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (parse_config, b"\xff"),
        (parse_config, b"[1]"),
        (parse_config, {**GOOD_CONFIG, "shards": 0}),
        (parse_config, {**GOOD_CONFIG, "shards": True}),
        (parse_config, {**GOOD_CONFIG, "shards": "2"}),
        (parse_config, {**GOOD_CONFIG, "replicas": -1}),
        (parse_config, {**GOOD_CONFIG, "cluster_id": "xyz"}),
        (parse_config, {"shards": 2, "replicas": 1}),
        (parse_leader, {"worker": "a/b", "replication": "tcp://h:1"}),
        (parse_leader, {"worker": "w", "replication": 5}),
        (parse_leader, {"worker": "w", "replication": "x" * 5000}),
        (parse_leader, None),
        (parse_isr, {"members": [], "epoch": 1}),
        (parse_isr, {"members": ["a", "a"], "epoch": 1}),
        (parse_isr, {"members": [["a"]], "epoch": 1}),
        (parse_isr, {"members": [1], "epoch": 1}),
        (parse_isr, {"members": ["w"] * 65, "epoch": 1}),
        (parse_isr, {"members": ["w"], "epoch": -1}),
        (parse_isr, {"members": ["w"], "epoch": 1.5}),
        (parse_isr, {"members": "w", "epoch": 1}),
        (parse_worker, {"host": "h", "replication": "r", "durable": 1}),
        (parse_broker, {"backend": "b", "frontend": "f", "public_key": 7}),
        (parse_broker, {"backend": "b", "frontend": "f", "public_key": "short"}),
    ],
)
def test_malformed_values_are_bad_values_naming_the_key(parse: Any, value: Any) -> None:
    with pytest.raises(BadValue, match="/zkv/zkv/x"):
        parse(kv(value))


def test_config_mismatch_names_both_values() -> None:
    config = ClusterConfig(4, 1, "0123456789abcdef")
    config.check(4, 1)
    with pytest.raises(ConfigMismatch) as raised:
        config.check(2, 0)
    text = str(raised.value)
    assert "ZKV_SHARDS is 2 here but 4 in the cluster" in text
    assert "ZKV_REPLICAS is 0 here but 1 in the cluster" in text


@pytest.mark.parametrize("bad", ["", "a/b", "-a", "a b", "x" * 129, "é"])
def test_ids_that_cannot_be_one_key_segment_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="worker id"):
        check_id(bad, "worker id")


def test_a_cluster_name_becomes_the_prefix() -> None:
    assert Coordinator(object(), "prod-1").prefix == "/zkv/prod-1/"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cluster name"):
        Coordinator(object(), "../x")  # type: ignore[arg-type]


# --- a write whose answer was lost ------------------------------------------------------------


class LostAnswer:
    """An Etcd whose first campaign txn applied but whose answer went missing, so the same txn
    reached etcd again (the next endpoint) and failed its compare on its own leader key."""

    def __init__(self, lease_id: int, worker: str) -> None:
        self.leader = KV(
            b"/zkv/zkv/shards/0/leader",
            json.dumps({"worker": worker, "replication": "tcp://h:1"}).encode(),
            12,
            12,
            1,
            lease_id,
        )

    def get(self, key: str) -> None:
        return None

    def txn(self, compare: Any, success: Any, failure: Any) -> TxnResult:
        return TxnResult(False, 12, ([self.leader],))


def test_a_campaign_recognises_its_own_win_after_a_lost_answer() -> None:
    coordinator = Coordinator(LostAnswer(42, "w1"))  # type: ignore[arg-type]
    assert coordinator.campaign(0, "w1", "tcp://h:1", 42) == 12


@pytest.mark.parametrize(("lease_id", "worker"), [(43, "w1"), (42, "w2")])
def test_another_holder_of_the_leader_key_is_a_lost_race(lease_id: int, worker: str) -> None:
    coordinator = Coordinator(LostAnswer(lease_id, worker))  # type: ignore[arg-type]
    assert coordinator.campaign(0, "w1", "tcp://h:1", 42) is None


class Listing:
    """An Etcd whose range_prefix answers fixed KVs."""

    def __init__(self, kvs: list[KV]) -> None:
        self.kvs = kvs

    def range_prefix(self, prefix: str | bytes) -> list[KV]:
        return self.kvs


def test_of_two_brokers_on_one_backend_workers_link_to_the_newest_only() -> None:
    """A broker restarted on its address has a new id; its predecessor's key lingers until
    its lease runs out. Workers must link to the new one only (one routing id, one ROUTER)."""

    def broker(name: str, backend: str, create: int) -> KV:
        value = {"backend": backend, "frontend": "tcp://10.0.0.1:5555", "public_key": None}
        return kv(value, key=b"/zkv/zkv/brokers/" + name.encode(), create=create)

    listing = Listing(
        [
            broker("h2-new", "tcp://10.0.0.2:5556", 40),  # keys sort by name, not by age
            broker("h2-old", "tcp://10.0.0.2:5556", 12),
            broker("h3-one", "tcp://10.0.0.3:5556", 20),
        ]
    )
    coordinator = Coordinator(listing, "zkv")  # type: ignore[arg-type]
    assert sorted(coordinator.brokers()) == ["h2-new", "h2-old", "h3-one"]
    assert {n: i.backend for n, i in coordinator.live_brokers().items()} == {
        "h2-new": "tcp://10.0.0.2:5556",
        "h3-one": "tcp://10.0.0.3:5556",
    }
