"""zkv across test hosts (tests/hosts.py): network namespaces on a bridge, inside namespaces of
the test's own. Each test runs a scenario of tests/netns/ and judges the JSON it prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hosts import can_run_scenarios, run_scenario
from tests.netns.three_hosts import REQUEST_TIMEOUT_S

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(can_run_scenarios() is not None, reason=str(can_run_scenarios())),
]

# A failed request may take its whole deadline, plus a moment to be answered and measured.
ANSWER_MARGIN_S = 1.0


def test_the_hosts_reach_each_other_only_and_die_whole(tmp_path: Path) -> None:
    """The harness's own promises, which every scenario relies on."""
    result = run_scenario("tests.netns.harness", tmp_path, timeout_s=30)
    assert result["addresses"] == ["10.77.0.11", "10.77.0.12"]
    assert "Network is unreachable" in result["outside"]  # no route out of the test's network
    assert "Connection refused" in result["loopback_is_its_own"]  # h2's loopback is h2's
    assert "timed out" in result["cut"]  # a cut host is silent, not refusing
    assert result["healed"] is True
    assert result["pids_before_kill"] == 3  # the server, the escaper, its child elsewhere
    assert result["pids_after_kill"] == 0
    assert result["disk_after_wipe"] == []
    assert result["h2_lives"] == 1  # the other host's agent: a host's kill is its own
    assert result["pids_after_young_kills"] == 0  # a kill right after a start leaves nothing


def test_three_hosts_with_curve_survive_a_cut_of_the_workers_host(tmp_path: Path) -> None:
    """Broker on h1 (CURVE frontend and backend on its address), workers on h2, gateway and
    client on h3: the seed API and the client work; cut h2 off and every request fails
    cleanly in time; heal, and they work again."""
    result = run_scenario("tests.netns.three_hosts", tmp_path, timeout_s=60)

    # A plain frontend on a non-loopback address is refused, and the message names the flags.
    assert result["plain_broker_exit"] == 2
    (line,) = result["plain_broker_says"]
    assert "tcp://10.77.0.11:5555" in line and "--frontend-curve" in line, line
    assert "--insecure" in line, line

    # Each host got only the key files its side needs, as the README tells operators.
    assert result["files"] == {
        "h2": ["broker.key", "worker.key", "worker.key_secret"],
        "h3": ["broker.key", "client.key", "client.key_secret"],
    }

    seen = result["seen"]
    assert seen["set"][0] == 200 and seen["set"][1]["value"] == "1"
    assert seen["get"][0] == 200 and seen["get"][1]["value"] == "1"
    assert seen["all"] == ["a", "b"]
    assert seen["delete"] == [200, {"message": "Value deleted successfully"}]
    assert seen["get_deleted"] == [200, {"error": "Data not found"}]
    assert seen["client_get"] == "3"
    assert ["c", "3"] in seen["client_all"] and ["a", "1"] in seen["client_all"]
    assert seen["client_delete"] is True
    # The frontend is CURVE: a client without the keys never gets a connection.
    assert seen["plain_client"][0] == "Unavailable"

    # While h2 is cut off: every request answered, 503 or Unavailable, within its deadline.
    cut = result["cut"]
    assert {attempt[0] for attempt in cut} == {"http", "client"}, cut
    for attempt in cut:
        if attempt[0] == "http":
            _, status, _, elapsed_s = attempt
            assert status == 503, attempt
        else:
            _, error, _, elapsed_s = attempt
            assert error == "Unavailable", attempt
        assert elapsed_s < REQUEST_TIMEOUT_S + ANSWER_MARGIN_S, attempt

    # Healed: the value written before the cut (or the cut's write, whose outcome was unknown).
    status, body = result["after_heal"]["http"]
    assert status == 200 and body["value"] in ("1", "cut"), result["after_heal"]
    assert result["after_heal"]["client"] == body["value"]
