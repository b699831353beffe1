"""A worker that cannot be the cluster's says so (issue 10, items 9 and 13).

Before: a worker started with another cluster's keys logged "registered with the broker" and
then "no word from the broker" forever, and the broker logged nothing; a worker --in-memory on
a durable data directory took the shards with 0 keys after a full restart, silently.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT, Cluster, wait_for
from workers.manifest import open_manifest
from zkv.keys import create_keys

pytestmark = pytest.mark.process

EXIT_TIMEOUT_S = 10.0  # a Python process importing pyzmq, on a loaded machine


def test_a_worker_with_another_clusters_keys_logs_why_within_seconds(tmp_path: Path) -> None:
    with Cluster(tmp_path, shards=1) as cluster:
        cluster.start(workers=1, gateway=False)
        foreign = tmp_path / "elsewhere"
        create_keys(foreign / "keys")  # what ensure_keys made for a worker without ZKV_DATA_DIR
        cluster.env["ZKV_DATA_DIR"] = str(foreign)
        stray = cluster.start_worker()
        stray_log = tmp_path / "worker-2.log"
        line = wait_for(
            lambda: next((x for x in stray_log.read_text().splitlines() if " ERROR " in x), None),
            "the stray worker's ERROR line",
        )
        assert "refused this worker's CURVE handshake" in line, line
        assert str(foreign / "keys") in line and "--keys/ZKV_KEYS" in line, line
        broker_log = tmp_path / "broker-0.log"
        wait_for(
            lambda: "refused a worker's handshake" in broker_log.read_text(), "the broker's line"
        )
        text = stray_log.read_text()
        assert "registered with the broker" not in text, text
        assert "no word from the broker" not in text, text
        assert stray.poll() is None  # it keeps trying: the keys may be copied in meanwhile
        assert cluster.client().ping()["workers"] == 1


def run_workers(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-u", "-m", "workers", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "ZKV_DATA_DIR": str(tmp_path / "data"), "ZKV_INSECURE": "1"},
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )


@pytest.mark.parametrize("processes", ["1", "3"])
def test_a_worker_in_memory_refuses_a_durable_data_directory(
    tmp_path: Path, processes: str
) -> None:
    open_manifest(tmp_path / "data")  # a durable cluster ran here
    done = run_workers(tmp_path, "--in-memory", "--processes", processes)
    assert done.returncode == 2, done.stderr
    assert f"data directory {tmp_path / 'data'} holds a durable cluster's data" in done.stderr
    assert "an --in-memory worker would serve it empty" in done.stderr
