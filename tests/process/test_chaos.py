"""The chaos test (tests/chaos.py), short: about 9 s of real processes killed with SIGKILL.

A fixed seed fixes the workload's choices and the nemesis's schedule (not the timing, which
is real). The long run is ``python -m tests.chaos --duration 300``; see docs/chaos.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import ChaosConfig, format_summary, run_chaos

pytestmark = pytest.mark.process

SHORT = ChaosConfig(
    duration_s=6.0,  # plus ~1.6 s to start the cluster and ~1.5 s to check and stop it
    seed=20261127,
    shards=2,
    workers=3,  # one standby
    kill_interval_s=1.5,  # three or four workers killed, and the broker once
    broker_restart=True,
    final_kill=True,  # then every worker at once: the last values must come back from disk
    writers=3,
    readers=3,
    keys_per_writer=6,
    timeout_s=2.0,
    recovery_timeout_s=8.0,
)


@pytest.mark.timeout(60)
def test_nothing_acknowledged_is_lost_and_every_read_is_valid_under_kill_9(tmp_path: Path):
    report = run_chaos(SHORT, tmp_path)
    summary = report["summary"]
    text = format_summary(report)
    print(text)
    assert summary["kills"] >= 2 and summary["broker_restarts"] == 1, text
    assert summary["final_kills"] == SHORT.workers, text
    assert summary["acknowledged"] > 100, text  # the workload really ran
    assert summary["recovered"], text
    assert summary["lost"] == 0, text
    assert summary["invalid"] == 0, text
    assert summary["unverified_keys"] == 0, text
    if summary["double_owner"] is not None:
        assert summary["double_owner"] == 0, text
