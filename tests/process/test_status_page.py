"""Watching a real cluster (issue 13): one /metrics scrape gathers the gateway, the broker and
every worker, and the status page, in a real headless Chromium, shows a shard losing its worker.

Chromium is Debian's (``.ci/run`` installs ``chromium``); the page is loaded with its own
``--dump-dom`` after a virtual time budget that lets the page's script poll /v1/status, so the
DOM read is what a person would see. Flags that work as root in a container: no sandbox, no
GPU, nothing fetched in the background, a new empty profile each run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.process

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
BROWSER_TIMEOUT_S = 60.0
# Virtual time the page runs before its DOM is read: its first poll of /v1/status is at once,
# and virtual time waits for the fetch; 3 s covers a second poll.
VIRTUAL_TIME_MS = 3000


def browse(url: str, profile: Path, *args: str) -> str:
    """Load ``url`` in headless Chromium with a new empty profile, doing ``args`` (by default
    ``--dump-dom``); its stdout (the DOM)."""
    profile.mkdir()
    done = subprocess.run(
        [
            CHROMIUM or "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={VIRTUAL_TIME_MS}",
            *(args or ("--dump-dom",)),
            url,
        ],
        capture_output=True,
        timeout=BROWSER_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode(errors="replace")


def shown(dom: str) -> tuple[str, dict[int, str]]:
    """What the page shows: its health badge and each shard row's owner cell."""
    health = re.search(r'<span id="health"[^>]*>([^<]*)</span>', dom)
    assert health is not None, dom[-2000:]
    owners = {
        int(shard): owner
        for shard, owner in re.findall(
            r'<tr data-shard="(\d+)">.*?<td class="owner[^"]*">([^<]*)</td>', dom
        )
    }
    return health.group(1), owners


def scrape(cluster: Cluster) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = cluster.http("GET", "/metrics")
    assert response.status == 200, response.body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.body.decode())
        for sample in family.samples
    }


def test_one_scrape_gathers_the_gateway_the_broker_and_every_worker(tmp_path: Path) -> None:
    with Cluster(tmp_path, shards=2) as cluster:
        cluster.start(workers=2)
        cluster.start_worker()  # the shards have owners: this one is a standby
        client = cluster.client(timeout_s=1.0)
        wait_for(lambda: client.ping()["standbys"] == 1 or None, "the standby")
        for i in range(10):
            assert cluster.http("GET", f"/set?key=k{i}&value=v&timeout=100").status == 200

        def reported() -> dict | None:
            found = scrape(cluster)
            sets = sum(
                value
                for (name, labels), value in found.items()
                if name == "zkv_shard_requests_total" and ("command", "SET") in labels
            )
            return found if sets == 10 else None

        found = wait_for(reported, "both owners to report their 10 SETs")
        assert found[("zkv_broker_up", ())] == 1
        route = (("code", "200"), ("method", "GET"), ("route", "/set"))
        assert found[("zkv_http_requests_total", route)] == 10  # the gateway's own
        assert found[("zkv_zmq_messages_total", (("kind", "BATCH"),))] >= 1  # the broker's
        assert found[("zkv_broker_standbys", ())] == 1
        keys = (
            found[("zkv_shard_keys", (("shard", "0"),))]
            + found[("zkv_shard_keys", (("shard", "1"),))]
        )
        assert keys == 10  # the workers'
        assert found[("zkv_shard_fsync_duration_seconds_count", (("shard", "0"),))] >= 1
        # An owner dies: the standby takes its shard over, and the scrape says so.
        cluster.kill(cluster.workers[0])

        def failed_over() -> dict | None:
            found = scrape(cluster)
            failovers = sum(
                value for (name, _), value in found.items() if name == "zkv_shard_failovers_total"
            )
            return found if failovers == 1 else None

        after = wait_for(failed_over, "the failover to show")
        removed = {
            dict(labels)["reason"]: value
            for (name, labels), value in after.items()
            if name == "zkv_broker_workers_removed_total"
        }
        # Missed heartbeats, or its connection gone when the broker next sent to it.
        assert sum(removed.values()) == 1, removed
        assert set(removed) <= {"missed heartbeats", "unreachable"}, removed
        # Without a broker the scrape still answers, with the gateway's figures.
        cluster.kill(cluster.broker)
        down = scrape(cluster)
        assert down[("zkv_broker_up", ())] == 0
        assert down[("zkv_http_requests_total", route)] == 10
        status = cluster.http("GET", "/v1/status")
        assert status.status == 200 and status.json()["status"] == "unavailable"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_status_page_shows_a_shard_that_lost_its_worker(tmp_path: Path) -> None:
    with Cluster(tmp_path, shards=2) as cluster:
        cluster.start(workers=2)  # no standby: a dead worker's shard stays without owner
        url = f"http://127.0.0.1:{cluster.http_port}/"
        health, owners = shown(browse(url, tmp_path / "profile-1"))
        assert health == "ok"
        assert sorted(owners) == [0, 1]
        assert all(owner != "no owner" for owner in owners.values()), owners

        cluster.kill(cluster.workers[0])
        client = cluster.client(timeout_s=1.0)

        def unowned() -> list[bool] | None:
            owned = client.ping()["owned"]
            return None if all(owned) else owned

        owned = wait_for(unowned, "the broker to notice the dead worker")
        lost = owned.index(False)
        dom = browse(url, tmp_path / "profile-2")
        health, owners = shown(dom)
        assert health == "degraded"
        assert owners[lost] == "no owner"
        assert owners[1 - lost] != "no owner"

        shot = tmp_path / "status-page.png"
        browse(url, tmp_path / "profile-3", "--window-size=900,700", f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_gthread_worker_class_counts_its_http_requests_too(tmp_path: Path) -> None:
    # Its series stayed at zero: only the event worker's server counted (a helper's report).
    with Cluster(tmp_path, shards=1, ZKV_HTTP_WORKER="gthread") as cluster:
        cluster.start(workers=1)
        for i in range(5):
            assert cluster.http("GET", f"/set?key=g{i}&value=v&timeout=100").status == 200

        def counted() -> float | None:
            found = scrape(cluster)
            sets = sum(
                value
                for (name, labels), value in found.items()
                if name == "zkv_http_requests_total"
                and ("route", "/set") in labels
                and ("code", "200") in labels
            )
            return sets if sets >= 5 else None

        assert wait_for(counted, "the gthread gateway's /set counts", 10.0) >= 5
