"""A shard of 200,000 keys listed and read in bulk (issue 10, items 3 and 7): the listing never
costs a failover, and a batch asking for a gigabyte of values leaves the worker's memory bounded.

One shard, an owner and a standby, heartbeats every 0.1 s (the broker drops a worker silent for
0.3 s): a listing that held the worker's loop for a third of a second would hand the shard to
the standby, which the logs show. How long a listing holds the loop is measured in the unit tests
by counting the records it looks at (tests/unit/test_store.py), never by timing here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.cluster import Cluster, wait_for
from zkv import RequestError, ZkvError
from zkv.protocol import MAX_REPLY_BYTES, REPLY_TOO_LARGE

pytestmark = pytest.mark.process

KEYS = 200_000
LOAD_BATCH = 5_000
VALUE_BYTES = 1 << 20
GETS = 300  # of one 1 MiB value: 300 MiB asked for; the worker builds at most MAX_REPLY_BYTES
# Peak resident memory the batch may add to the owner: its reply of MAX_REPLY_BYTES (64 MiB)
# about three times over (the sub-replies, the frame joined from them, and the CURVE-encrypted
# copy libzmq's I/O thread makes while sending), and slack. Before the bound, the 300 values
# were built whole: about 600 MB.
RSS_GROWTH_MAX_BYTES = 4 * MAX_REPLY_BYTES


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path: Path = tmp_path_factory.mktemp("big")
    with Cluster(path, shards=1, ZKV_FSYNC="no", ZKV_HEARTBEAT_INTERVAL="0.1") as cluster:
        try:
            cluster.start(workers=2)
            kv = cluster.client(timeout_s=30.0)
            for start in range(0, KEYS, LOAD_BATCH):
                kv.set_many({b"key:%07d" % i: b"v%d" % i for i in range(start, start + LOAD_BATCH)})
        except BaseException:
            print(cluster.logs())
            raise
        yield cluster


def owners(cluster: Cluster) -> list[subprocess.Popen[bytes]]:
    """The workers that took shard 0 at some point, by their logs."""
    found = []
    for worker in cluster.workers:
        log = cluster.tmp_path / f"worker-{cluster._all.index(worker)}.log"
        if "took shard 0" in log.read_text(errors="replace"):
            found.append(worker)
    return found


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_listing_a_big_shard_in_pages_costs_no_failover(big: Cluster) -> None:
    [owner] = owners(big)
    kv = big.client(timeout_s=10.0)
    seen = 0
    cursor = b""
    while page := kv.all(after=cursor, limit=5_000, keys_only=True)[:5_000]:
        seen += len(page)
        cursor = page[-1].key
    assert seen == KEYS
    # The REST listing, a few pages from the middle, and the seed /all past its bound.
    response = big.http("GET", "/v1/keys?limit=1000&after=" + quote("key:0100000"))
    assert response.status == 200 and response.json()["keys"][0]["key"] == "key:0100001"
    # Every key in one ALL is refused with a message that says what to do, not scanned
    # (Client.all pages by itself; all_once is the one request).
    refused: ZkvError | None = None
    for _ in range(3):
        try:
            kv.all_once(b"", 0)
        except ZkvError as exc:  # before the bound: a timeout, and a failover
            refused = exc
    assert owners(big) == [owner], big.logs()  # the standby never took the shard
    assert isinstance(refused, RequestError) and REPLY_TOO_LARGE in str(refused)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Cluster]:
    """One shard, an owner and a standby, heartbeats every second (liveness 3 s, the
    services' default): large replies under CURVE take a while to cross, and the 0.2 s
    heartbeats that ``Cluster`` sets for speed (0.6 s of silence drops a worker) made a loaded
    machine's run of this test about heartbeats rather than memory (CI, 2026-12-06)."""
    with Cluster(tmp_path, shards=1, ZKV_FSYNC="no", ZKV_HEARTBEAT_INTERVAL="1") as cluster:
        cluster.start(workers=2)
        yield cluster


def test_a_batch_of_a_gigabyte_of_gets_leaves_the_worker_bounded(small: Cluster) -> None:
    big = small
    # The broker counts a shard owned at its ASSIGN; the owner logs "took shard" once its
    # takeover is done, a moment later.
    [owner] = wait_for(lambda: owners(big) or None, "the owner's takeover logged", 10.0)
    kv = big.client(timeout_s=20.0)
    kv.set(b"big", b"x" * VALUE_BYTES)
    before = peak_rss_bytes(owner.pid)
    # The worker answers what fits in MAX_REPLY_BYTES and the rest BUSY; the client sends the
    # rest again after a backoff, so the whole batch is served, a bounded reply at a time.
    items = kv.get_many([b"big"] * GETS)
    assert all(item is not None and len(item.value) == VALUE_BYTES for item in items)
    grown = peak_rss_bytes(owner.pid) - before
    assert grown < RSS_GROWTH_MAX_BYTES, f"the worker's peak grew by {grown} bytes"
    assert kv.get(b"big").value == b"x" * VALUE_BYTES  # one value always fits
    assert owners(big) == [owner], big.logs()
