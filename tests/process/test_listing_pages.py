"""Listing a store larger than one ALL may answer: Client.all and ``zkv all`` page by cursor.

A shard answers at most MAX_LIST_KEYS keys per ALL (zkv/protocol.py); an ALL without a limit on
a larger shard is refused "reply too large". The client's listings must page by themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT, Cluster
from zkv.protocol import MAX_LIST_KEYS

pytestmark = pytest.mark.process

KEYS = MAX_LIST_KEYS + 57  # all in one shard: past what one ALL of it may answer


def test_all_and_the_cli_list_a_shard_past_the_bound_of_one_reply(tmp_path: Path) -> None:
    with Cluster(tmp_path, shards=1) as cluster:
        cluster.start(gateway=False)
        kv = cluster.client(timeout_s=10.0)
        keys = [b"k%06d" % i for i in range(KEYS)]
        kv.set_many({key: b"v" + key for key in keys}, ttl_s=600)

        entries = kv.all()
        assert [entry.key for entry in entries] == keys  # each once, sorted
        assert all(entry.value == b"v" + entry.key for entry in entries)
        assert [e.key for e in kv.all(after=keys[99], limit=MAX_LIST_KEYS + 1, keys_only=True)] == (
            keys[100 : 100 + MAX_LIST_KEYS + 1]
        )

        done = subprocess.run(
            [sys.executable, "-m", "zkv", "--frontend", cluster.frontend, "all"],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert [line["key"] for line in lines] == [key.decode() for key in keys]
