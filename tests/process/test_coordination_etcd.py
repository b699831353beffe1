"""The cluster's schema against a real etcd: bootstrap, campaigns and epochs across lease expiry,
in-sync sets fenced by the leader's epoch, follower slots, the brokers' view.

Leases here are etcd's minimum, 1 s (tests/etcd.py starts etcd so); a lapsed lease is gone
within about 1.5 s (etcd looks for expired leases every 0.5 s), which tests wait for by polling
with a deadline. Each test uses a cluster name of its own, so they share one etcd.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.cluster import wait_for
from tests.etcd import MIN_LEASE_TTL_S, EtcdServer, etcd_server
from zkv.coordination import (
    BrokerInfo,
    ConfigMismatch,
    ConfigMissing,
    Coordinator,
    Leader,
    Lease,
    WorkerInfo,
)
from zkv.etcd import Etcd

__all__ = ["etcd_server"]  # the fixture, imported for pytest

pytestmark = pytest.mark.process

LAPSE_TIMEOUT_S = 10.0  # a 1 s lease is gone within ~1.5 s; generous for a loaded machine


@pytest.fixture
def make(
    etcd_server: EtcdServer, request: pytest.FixtureRequest
) -> Iterator[Callable[[], tuple[Coordinator, Lease]]]:
    """Makes coordinators of one cluster (named after the test), each with its own client and
    a running 1 s lease; stops every lease at the end (revoked, so nothing lingers)."""
    name = request.node.name.replace("[", "-").replace("]", "")[:60].replace("_", "-")
    leases: list[Lease] = []

    def one() -> tuple[Coordinator, Lease]:
        etcd = Etcd([etcd_server.url], timeout_s=1.0)
        lease = Lease(etcd, MIN_LEASE_TTL_S).start()
        leases.append(lease)
        return Coordinator(etcd, name), lease

    yield one
    for lease in leases:
        lease.close()


def lapse(lease: Lease) -> None:
    """Stop renewing without revoking: the lease ends the way a dead host's does."""
    lease.close(revoke=False)


def test_bootstrap_writes_once_and_a_mismatch_refuses(make) -> None:
    first, _ = make()
    second, _ = make()
    config = first.bootstrap(shards=4, replicas=1)
    assert (config.shards, config.replicas) == (4, 1) and len(config.cluster_id) == 16
    assert second.bootstrap(shards=4, replicas=1) == config  # the same cluster, not a new id
    assert second.read_config(timeout_s=1.0) == config
    with pytest.raises(ConfigMismatch, match=r"ZKV_SHARDS is 2 here but 4 in the cluster"):
        second.bootstrap(shards=2, replicas=1)
    with pytest.raises(ConfigMismatch, match=r"ZKV_REPLICAS is 0 here but 1 in the cluster"):
        second.bootstrap(shards=4, replicas=0)


def test_bootstrap_races_have_one_winner(make) -> None:
    coordinators = [make()[0] for _ in range(4)]
    barrier = threading.Barrier(len(coordinators))
    configs: list[object] = []

    def boot(coordinator: Coordinator) -> None:
        barrier.wait()
        configs.append(coordinator.bootstrap(shards=2, replicas=1))

    threads = [threading.Thread(target=boot, args=(c,)) for c in coordinators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(configs) == 4 and len({id(c) for c in configs}) == 4
    assert len({c.cluster_id for c in configs}) == 1  # type: ignore[attr-defined]


def test_read_config_waits_for_the_first_broker(make) -> None:
    worker, _ = make()
    broker, _ = make()
    with pytest.raises(ConfigMissing, match="start a broker first"):
        worker.read_config(timeout_s=0.2, poll_s=0.05)
    timer = threading.Timer(0.2, broker.bootstrap, kwargs={"shards": 3, "replicas": 0})
    timer.start()
    try:
        assert worker.read_config(timeout_s=10.0, poll_s=0.05).shards == 3
    finally:
        timer.join()


def test_two_campaigners_one_wins(make) -> None:
    (a, lease_a), (b, lease_b) = make(), make()
    barrier = threading.Barrier(2)
    results: dict[str, int | None] = {}

    def run(coordinator: Coordinator, worker: str, lease: Lease) -> None:
        barrier.wait()
        results[worker] = coordinator.campaign(0, worker, f"tcp://{worker}:1", lease)

    threads = [
        threading.Thread(target=run, args=(a, "wa", lease_a)),
        threading.Thread(target=run, args=(b, "wb", lease_b)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    winners = {w: e for w, e in results.items() if e is not None}
    assert len(results) == 2 and len(winners) == 1, results
    ((winner, epoch),) = winners.items()
    assert a.leader(0) == Leader(winner, epoch, f"tcp://{winner}:1")
    assert a.leaders() == {0: Leader(winner, epoch, f"tcp://{winner}:1")}
    isr = a.read_isr(0)
    assert isr is not None and isr.members == (winner,) and isr.epoch == epoch


def test_epochs_increase_across_lease_expiry_and_a_lapsed_lease_deletes_the_leader(make) -> None:
    (a, lease_a), (b, lease_b) = make(), make()
    epoch1 = a.campaign(0, "wa", "tcp://a:1", lease_a)
    assert epoch1 is not None
    isr = a.read_isr(0)
    assert isr is not None
    isr = a.expand_isr(0, epoch1, isr, ["wa", "wb"])
    assert isr is not None and isr.members == ("wa", "wb")
    assert b.campaign(0, "wb", "tcp://b:1", lease_b) is None  # a leader holds the shard

    lapse(lease_a)  # wa's host dies
    wait_for(
        lambda: a.leader(0) is None, "the lapsed lease to delete the leader key", LAPSE_TIMEOUT_S
    )
    epoch2 = b.campaign(0, "wb", "tcp://b:1", lease_b)
    assert epoch2 is not None and epoch2 > epoch1
    # The previous leader, whose key lapsed, leaves the set in the same transaction: waiting
    # for it to be dropped for lagging held the new epoch's first writes (a hostile test).
    assert b.read_isr(0).members == ("wb",)  # type: ignore[union-attr]

    assert b.resign(0, epoch2)  # a restart: give up and campaign again
    epoch3 = b.campaign(0, "wb", "tcp://b:1", lease_b)
    assert epoch3 is not None and epoch3 > epoch2
    assert not b.resign(0, epoch2)  # an old epoch cannot delete the new leader key


def test_a_worker_outside_the_in_sync_set_cannot_win(make) -> None:
    (a, lease_a), (c, lease_c) = make(), make()
    assert a.campaign(1, "wa", "tcp://a:1", lease_a) is not None
    lapse(lease_a)
    wait_for(lambda: a.leader(1) is None, "the leader key to go", LAPSE_TIMEOUT_S)
    assert c.campaign(1, "wc", "tcp://c:1", lease_c) is None  # might lack acknowledged writes
    assert c.leader(1) is None


def test_isr_changes_are_fenced_by_the_leaders_epoch(make) -> None:
    (a, lease_a), (b, lease_b) = make(), make()
    epoch1 = a.campaign(0, "wa", "tcp://a:1", lease_a)
    assert epoch1 is not None
    seen = a.expand_isr(0, epoch1, a.read_isr(0), ["wa", "wb", "wc"])  # type: ignore[arg-type]
    assert seen is not None
    stale_view = seen
    shrunk = a.shrink_isr(0, epoch1, seen, ["wa", "wb"])
    assert shrunk is not None and a.read_isr(0) == shrunk
    assert a.shrink_isr(0, epoch1, stale_view, ["wa"]) is None  # the set changed since

    lapse(lease_a)  # wa is cut off; wb takes over
    wait_for(lambda: b.leader(0) is None, "the leader key to go", LAPSE_TIMEOUT_S)
    epoch2 = b.campaign(0, "wb", "tcp://b:1", lease_b)
    assert epoch2 is not None and epoch2 > epoch1
    current = b.read_isr(0)
    assert current is not None and current.epoch == epoch2
    assert current.members == ("wb",)  # the old leader, wa, is out
    # the old leader, on the other side of a partition, tries to change the set: refused
    assert a.expand_isr(0, epoch1, current, [*current.members, "wa"]) is None
    assert b.read_isr(0) == current
    grown = b.expand_isr(0, epoch2, current, ["wb", "wc"])  # the new leader may
    assert grown is not None
    assert a.shrink_isr(0, epoch1, grown, ["wc"]) is None  # fenced: not wa's epoch
    assert b.shrink_isr(0, epoch2, grown, ["wb"]) is not None
    with pytest.raises(ValueError):
        b.shrink_isr(0, epoch2, grown, ["wb", "wz"])  # not a shrink


def test_follower_slots_are_limited_even_under_a_race(make) -> None:
    claimants = [make() for _ in range(4)]
    barrier = threading.Barrier(len(claimants))
    won: list[str] = []

    def claim(n: int) -> None:
        coordinator, lease = claimants[n]
        barrier.wait()
        if coordinator.claim_replica(0, f"w{n}", lease, limit=2):
            won.append(f"w{n}")

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(len(claimants))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    coordinator = claimants[0][0]
    assert sorted(coordinator.replicas(0)) == sorted(won)
    assert 1 <= len(won) <= 2
    holder = int(won[0][1:])
    assert claimants[holder][0].claim_replica(0, won[0], claimants[holder][1], limit=2)
    lapse(claimants[holder][1])
    wait_for(lambda: won[0] not in coordinator.replicas(0), "the slot to free", LAPSE_TIMEOUT_S)


def test_members_register_under_their_leases(make, etcd_server: EtcdServer) -> None:
    (a, lease_a), (b, lease_b) = make(), make()
    broker = BrokerInfo("tcp://10.0.0.1:5556", "tcp://10.0.0.1:5555", None)
    worker = WorkerInfo("host-1", "tcp://10.0.0.2:7000", True)
    a.register_broker("b1", broker, lease_a)
    b.register_worker("w1", worker, lease_b)
    etcd_server.client().put(a.key("workers", "w2"), "{not json")  # a malformed entry
    assert a.brokers() == {"b1": broker}
    assert a.workers() == {"w1": worker}  # the malformed one left out, logged
    lapse(lease_b)
    wait_for(lambda: a.workers() == {}, "the worker's key to go", LAPSE_TIMEOUT_S)


def test_the_keeper_keeps_a_lease_past_its_ttl(make) -> None:
    a, lease = make()
    a.register_worker("w1", WorkerInfo("h", "tcp://h:1", False), lease)
    time.sleep(2.0 * MIN_LEASE_TTL_S)  # nothing may happen: a fixed wait is the test
    assert "w1" in a.workers()
    assert lease.valid() and not lease.lost
    assert lease.valid_until() > time.monotonic()


def test_valid_until_ends_before_etcd_deletes_the_keys(make) -> None:
    """The safety claim of Lease.valid_until, against etcd's own expiry: every read that
    started before valid_until still found the key held under the lease."""
    a, lease = make()
    a.register_worker("w1", WorkerInfo("h", "tcp://h:1", False), lease)
    key = a.key("workers", "w1")
    lapse(lease)  # no more renewals: the lease ends at etcd's own pace
    valid_until = lease.valid_until()
    deadline = time.monotonic() + LAPSE_TIMEOUT_S
    reads_before = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        present = a.etcd.get(key) is not None
        if started < valid_until:
            assert present, f"the key went {valid_until - started:.3f} s before valid_until"
            reads_before += 1
        elif not present:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the lapsed lease's key never went")
    assert reads_before > 0
