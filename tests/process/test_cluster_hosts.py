"""Cluster mode across test hosts (tests/hosts.py, tests/netns/cluster_kit.py): etcd on one
host, two brokers, four workers on four hosts, CURVE on every socket, 1 s leases. Each module
of tests/netns/cluster_*.py runs one cluster through several failures and prints what it saw;
the tests here judge it (a module-scoped run shared by the tests of one scenario)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.hosts import can_run_scenarios, run_scenario
from tests.netns.cluster_kit import LEASE_TTL_S

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(can_run_scenarios() is not None, reason=str(can_run_scenarios())),
]

FAILOVER_BOUND_S = LEASE_TTL_S + 2.0  # the bound: the lease time plus 2 s


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_scenario("tests.netns.cluster_failover", tmp_path_factory.mktemp("failover"), 90)


def test_the_seed_api_and_the_client_work_through_either_broker(failover: dict[str, Any]):
    seen = failover["seen"]
    assert seen["set"][0] == 200 and seen["get"][1]["value"] == "1"
    assert seen["b_reads_a"] == "A" and seen["a_reads_b"] == "B"
    assert seen["b_reads_seed"] == "1"  # the gateway's write, read through the other broker
    assert seen["all"] == ["s", "via-a", "via-b"]
    assert seen["delete"][0] == 200 and seen["get_deleted"] == [200, {"error": "Data not found"}]


def test_a_killed_leader_host_loses_no_acknowledged_write(failover: dict[str, Any]) -> None:
    assert failover["first_write_after_kill_s"] < FAILOVER_BOUND_S, failover
    victim_id, new_leader = failover["victim"][1], failover["new_leader"]
    assert new_leader[0] != victim_id and new_leader[1] > failover["victim"][2]  # epoch rose
    assert failover["acked"] > 200, failover  # the load really ran through the failover
    assert failover["lost_count"] == 0, failover["lost"]
    assert not failover["writer_stuck"]
    assert failover["killed_log_kept"]  # the dead incarnation's log is still there to check


def test_a_returning_follower_catches_up_and_is_in_sync_again(failover: dict[str, Any]) -> None:
    catch_up = failover["catch_up"]
    assert catch_up["victim_id"] in catch_up["isr"], catch_up  # back in the ISR, in etcd
    assert failover["writes_while_catching_up"] > 0  # it caught up while writes went on
    assert catch_up["equal"], catch_up  # its log, replayed, holds exactly the leader's keys
    assert catch_up["follower_keys"] > 1000, catch_up


@pytest.fixture(scope="module")
def partition(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_scenario("tests.netns.cluster_partition", tmp_path_factory.mktemp("cut"), 90)


def test_a_leader_cut_off_for_10_s_and_healed_loses_nothing_and_never_shares_an_epoch(
    partition: dict[str, Any],
) -> None:
    summary = partition["summary"]
    assert summary["acknowledged"] > 1000, summary  # the workload ran through the cut
    assert summary["recovered"] and summary["unverified_keys"] == 0, summary
    assert summary["lost"] == 0, partition["lost"]  # no acknowledged write lost
    assert summary["invalid"] == 0, partition["invalid"]  # no read older than acknowledged
    assert summary["double_owner"] == 0, partition["double_owner"]
    assert summary["shared_epochs"] == 0, partition["shared_epochs"]
    assert summary["stuck_threads"] == 0 and not summary["crashes"], summary
    (cut,) = partition["cut"]
    # The cut-off leader said "no longer leader" (by its own clock, as its lease ran out)
    # before the next leader of shard 0 took it, in a newer epoch, on another host.
    leaders = partition["shard0"]
    before = [i for i in leaders if i[2] <= cut["at_ms"]]
    after = [i for i in leaders if i[2] > cut["at_ms"]]
    assert before and after, leaders
    old, new = before[-1], after[0]
    assert old[0].startswith(cut["host"] + "-") and old[4] == "left", leaders
    assert cut["at_ms"] < old[3] <= new[2] and new[1] > old[1], leaders
    assert not new[0].startswith(cut["host"] + "-"), leaders


def test_a_broker_killed_under_clients_with_both_frontends_costs_latency_not_errors(
    partition: dict[str, Any],
) -> None:
    broker = partition["broker"]
    assert broker["error_count"] == 0, broker
    assert broker["acked"] > 10 and broker["missing"] == 0, broker
