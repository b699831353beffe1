"""The chaos test's cluster mode (``python -m tests.chaos --cluster``), short: about 20 s on
five test hosts with host kills, cuts and broker kills, then every worker host killed at once.

A fixed seed fixes the workload's choices and the nemesis's schedule (not the timing). The
long run is ``python -m tests.chaos --cluster --duration 300``; see docs/chaos.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import format_cluster_summary, run_cluster_chaos
from tests.hosts import can_run_scenarios
from tests.netns.cluster_chaos import ClusterChaosConfig

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(can_run_scenarios() is not None, reason=str(can_run_scenarios())),
]

SHORT = ClusterChaosConfig(
    duration_s=12.0,  # plus ~3 s to start, ~3 s to recover from the final kill and read back
    seed=20261206,
    faults=("kill", "cut", "broker"),
    fault_interval_s=2.0,  # four or five faults
    cut_s=2.0,
    away_s=0.0,
    final_kill=True,
    writers=3,
    readers=3,
    keys_per_writer=6,
    timeout_s=5.0,
)


@pytest.mark.timeout(150)
def test_nothing_acknowledged_is_lost_under_host_kills_cuts_and_broker_kills(tmp_path: Path):
    report = run_cluster_chaos(SHORT, tmp_path)
    summary = report["summary"]
    text = format_cluster_summary(report)
    print(text)
    faults = summary["host_kills"] + summary["cuts"] + summary["broker_kills"]
    assert faults >= 3, text
    assert summary["final_kills"] == 4, text
    assert summary["acknowledged"] > 500, text  # the workload really ran
    assert summary["recovered"], text
    assert summary["lost"] == 0, text
    assert summary["invalid"] == 0, text
    assert summary["unverified_keys"] == 0, text
    assert summary["double_owner"] == 0 and summary["shared_epochs"] == 0, text
    assert summary["passed"], text
