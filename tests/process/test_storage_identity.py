"""A shard's data stays with the cluster it belongs to (issue 10, item 9).

Before the data directory had a manifest, a standby started with another data directory or
``--in-memory`` took a durable shard over from an empty log and acknowledged writes vanished;
and a data directory restarted with another ``ZKV_SHARDS`` lost keys. Both are now refused,
with a message saying why, and nothing acknowledged is lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.process

KEYS = [f"key-{i}".encode() for i in range(20)]


def write_keys(cluster: Cluster) -> None:
    client = cluster.client()
    for key in KEYS:
        client.set(key, b"value of " + key)


def check_keys(cluster: Cluster) -> None:
    client = cluster.client()
    for key in KEYS:
        assert client.get(key).value == b"value of " + key, cluster.logs()
    listed = [entry.key for entry in client.all(keys_only=True)]
    assert sorted(listed) == sorted(KEYS), cluster.logs()


def log_of(process_log: Path) -> str:
    return process_log.read_text(errors="replace")


def test_a_standby_that_cannot_see_the_shards_data_is_never_given_the_shard(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, shards=1) as cluster:
        cluster.start_broker()
        owner = cluster.start_worker()
        cluster.wait_ready(gateway=False)
        write_keys(cluster)
        cluster.start_worker("--data-dir", str(tmp_path / "another-data"))
        # In memory on the cluster's own directory it would refuse to start (test below); a
        # cache's own directory lets it register, and the broker refuses it the shard.
        cluster.start_worker("--in-memory", "--data-dir", str(tmp_path / "cache"))
        client = cluster.client(timeout_s=1.0)
        wait_for(lambda: client.ping()["workers"] == 3, "both standbys to register")
        cluster.kill(owner)
        broker_log = tmp_path / "broker-0.log"
        wait_for(lambda: "(shard 0) removed" in log_of(broker_log), "the owner's removal")
        cluster.start_worker()  # the cluster's own data directory
        cluster.wait_ready(gateway=False)
        check_keys(cluster)  # before the manifest, a standby served shard 0 from an empty log
        text = log_of(broker_log)
        assert text.count("may own no shard") == 2, text
        assert "another --data-dir" in text and "keeps data in memory only" in text, text


def test_a_data_directory_restarted_with_another_shard_count_is_refused(tmp_path: Path) -> None:
    data = {"ZKV_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "two").mkdir()
    with Cluster(tmp_path / "two", shards=2, **data) as cluster:
        cluster.start(gateway=False)
        write_keys(cluster)
    (tmp_path / "three").mkdir()
    with Cluster(tmp_path / "three", shards=3, **data) as cluster:
        cluster.start_broker()
        worker = cluster.start_worker()
        wait_for(lambda: worker.poll() is not None, "the worker to refuse", timeout_s=10.0)
        assert worker.returncode == 2, cluster.logs()
        assert "holds a cluster of 2 shards" in cluster.logs()
        assert "but the broker runs 3" in cluster.logs()
    (tmp_path / "again").mkdir()
    with Cluster(tmp_path / "again", shards=2, **data) as cluster:
        cluster.start(gateway=False)
        check_keys(cluster)
