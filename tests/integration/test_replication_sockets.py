"""Replication over real sockets in one process: a leader and followers on tcp://127.0.0.1 with
CURVE, the leader's records shipped as the cluster worker ships them, every follower ending
with the leader's data in memory and in its log on disk (replayed into a fresh store)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from tests.fakes import FakeClock
from tests.replicas import Writer, contents, follower_files, leader_shard, replay_log
from workers.aof import FsyncPolicy
from workers.persist import Durability
from workers.replication import (
    Follower,
    FollowerSocket,
    FollowerState,
    LeaderSocket,
    Replicator,
)
from zkv.keys import Keys, create_keys

pytestmark = pytest.mark.integration

WRITES = 10_000
PASS_OPS = 100  # requests per pass of the leader's loop
WAIT_S = 30.0  # the most any phase may take before the test fails


class Cluster:
    """One leader, followers added at will, all driven by one poll loop."""

    def __init__(self, tmp_path: Path, context: zmq.Context, keys: Keys) -> None:
        self.tmp_path = tmp_path
        self.context = context
        self.keys = keys
        self.clock = FakeClock()
        self.leader, self.shipped = leader_shard(
            tmp_path / "leader", self.clock, FsyncPolicy.EVERYSEC
        )
        self.writer = Writer(self.leader)
        self.link = LeaderSocket(context, "tcp://127.0.0.1:0", keys)
        self.released = 0
        self.expanded: list[frozenset[str]] = []
        self.rep = Replicator(
            0,
            7,
            [],
            source=lambda: (self.leader.store, self.leader.memory),
            send=self.link.send,
            release=self._release,
            shrink=lambda members: True,
            expand=self._expand,
        )
        self.followers: dict[str, tuple[Follower, FollowerSocket]] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.link.socket, zmq.POLLIN)

    def _release(self, item: int) -> None:
        self.released += item

    def _expand(self, members: frozenset[str]) -> bool:
        self.expanded.append(members)
        return True

    def add_follower(self, name: str, in_isr: bool) -> Follower:
        durability = Durability(self.tmp_path / name, FsyncPolicy.EVERYSEC)
        files, store, memory = follower_files(self.tmp_path / name, self.clock, durability)
        socket = FollowerSocket(self.context, name, self.keys)
        socket.connect(self.link.endpoint)
        follower = Follower(0, name, files, store, memory, send=socket.send)
        self.followers[name] = (follower, socket)
        self.poller.register(socket.socket, zmq.POLLIN)
        if in_isr:
            self.rep.set_followers([*self.rep.isr, name])
        follower.follow(self.rep.epoch)
        return follower

    def turn(self, timeout_ms: int = 0) -> None:
        """One pass of the loop: poll, drain every socket, run the timers."""
        ready = dict(self.poller.poll(timeout_ms))
        if self.link.socket in ready:
            self.link.drain(self.rep)
        for follower, socket in self.followers.values():
            if socket.socket in ready:
                socket.drain(follower)
            follower.tick()
        self.rep.tick()

    def write(self, requests: list) -> None:
        """One pass at the leader: apply, ship, hold its replies (counted by requests)."""
        while self.rep.full:
            self.turn(10)
        self.writer.apply(requests)
        for data in self.shipped:
            self.rep.ship(data)
        self.shipped.clear()
        self.rep.hold(len(requests), 64 * len(requests))

    def wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, f"not done in {WAIT_S} s: {what}"
            self.turn(10)

    def close(self) -> None:
        for follower, socket in self.followers.values():
            follower.close()
            follower.files.close()
            socket.close()
        self.link.close()
        self.leader.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    context = zmq.Context()
    create_keys(tmp_path / "keys")
    made = Cluster(tmp_path, context, Keys(tmp_path / "keys"))
    try:
        yield made
    finally:
        made.close()
        context.term()


def requests(writer: Writer, rng: random.Random, count: int) -> Iterator[list]:
    """``count`` SETs and DELs over 2,000 keys, some with TTLs, in passes of PASS_OPS."""
    batch: list = []
    for _ in range(count):
        key = b"key-%d" % rng.randrange(2000)
        roll = rng.random()
        if roll < 0.15:
            batch.append(writer.delete(key))
        else:
            ttl_ms = None if roll < 0.6 else rng.choice([50, 500, 60_000])
            batch.append(writer.set(key, rng.randbytes(rng.randrange(200, 2000)), ttl_ms))
        if len(batch) == PASS_OPS:
            yield batch
            batch = []
    if batch:
        yield batch


def synced(cluster: Cluster) -> bool:
    return cluster.rep.held == 0 and all(
        f.state is FollowerState.SYNCED and f.seq == cluster.rep.head
        for f, _ in cluster.followers.values()
    )


def test_followers_end_with_the_leaders_data_in_memory_and_on_disk(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers.replication")
    f1 = cluster.add_follower("f1", in_isr=True)
    f2 = cluster.add_follower("f2", in_isr=True)
    rng = random.Random(11)
    late: Follower | None = None
    for number, batch in enumerate(requests(cluster.writer, rng, WRITES)):
        cluster.write(batch)
        cluster.turn()
        cluster.clock.advance(7)  # 700 ms over the run: the short TTLs expire on the way
        if number == len(range(0, WRITES, PASS_OPS)) // 2:
            # A follower joining late, outside the ISR: a snapshot (several chunks) and the
            # tail while writes go on, then it is proposed to the ISR.
            late = cluster.add_follower("f3", in_isr=False)
    assert late is not None
    cluster.wait(lambda: synced(cluster), "every follower holds the last batch")
    cluster.wait(lambda: "f3" in cluster.rep.isr, "f3 back in the in-sync set")
    assert cluster.released == WRITES
    assert cluster.rep.isr == {"f1", "f2", "f3"}
    assert cluster.expanded[-1] == frozenset({"f1", "f2", "f3"})
    # f3 got a snapshot of several chunks, then batches written after it (the tail).
    (installed,) = [r for r in caplog.records if "f3 installed the snapshot" in r.message]
    snapshot_batch, chunks = installed.args[2], installed.args[3]
    assert chunks >= 2 and 0 < snapshot_batch < cluster.rep.head
    now = cluster.clock.now
    expected = contents(cluster.leader.store, cluster.leader.memory, now)
    assert len(expected[0]) > 1000 and len(expected[1]) > 5000
    for follower in (f1, f2, late):
        assert contents(follower.store, follower.memory, now) == expected, follower.follower_id
        follower.files.log.sync()
        on_disk = replay_log(follower.files.log_path, cluster.clock)
        assert contents(*on_disk, now) == expected, follower.follower_id


def test_a_follower_without_the_clusters_keys_gets_nothing(cluster: Cluster, tmp_path) -> None:
    create_keys(tmp_path / "other")
    socket = FollowerSocket(cluster.context, "intruder", Keys(tmp_path / "other"))
    try:
        socket.connect(cluster.link.endpoint)
        files, store, memory = follower_files(tmp_path / "intruder", cluster.clock)
        intruder = Follower(0, "intruder", files, store, memory, send=socket.send)
        intruder.follow(cluster.rep.epoch)
        cluster.write([cluster.writer.set(b"k", b"v")])
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            cluster.turn(10)
            socket.drain(intruder)
        assert cluster.rep.link_state("intruder") is None
        assert intruder.state is FollowerState.AWAITING and len(intruder.store) == 0
        files.close()
    finally:
        socket.close()


def test_a_dead_follower_is_shrunk_away_then_returns_and_rejoins(tmp_path: Path) -> None:
    """f2's process dies mid-stream: the leader holds replies until the shrink callback said
    yes (after --replica-lag, 1 s), then goes on with f1. f2 restarts from its own log,
    follows again, catches up from a snapshot and the tail, and is proposed back."""
    context = zmq.Context()
    create_keys(tmp_path / "keys")
    cluster = Cluster(tmp_path, context, Keys(tmp_path / "keys"))
    shrunk: list[tuple[frozenset[str], int]] = []

    def shrink(members: frozenset[str]) -> bool:
        shrunk.append((members, cluster.released))
        return True

    cluster.rep._shrink = shrink
    try:
        cluster.add_follower("f1", in_isr=True)
        f2 = cluster.add_follower("f2", in_isr=True)
        rng = random.Random(5)
        work = list(requests(cluster.writer, rng, 3000))
        for batch in work[:10]:
            cluster.write(batch)
            cluster.turn()
        cluster.wait(lambda: cluster.rep.held == 0, "the first writes acknowledged")
        # f2 dies: its socket and files close without a word to the leader.
        _, socket = cluster.followers.pop("f2")
        cluster.poller.unregister(socket.socket)
        socket.close()
        f2.files.close()
        before = cluster.released
        for batch in work[10:20]:
            cluster.write(batch)
            cluster.turn()
        cluster.wait(lambda: cluster.rep.held == 0, "writes acknowledged without f2")
        assert shrunk == [(frozenset({"f1"}), before)]  # nothing released before the shrink
        # f2 comes back: a new process replays its own log, then follows.
        back = cluster.add_follower("f2", in_isr=False)
        for batch in work[20:]:
            cluster.write(batch)
            cluster.turn()
        cluster.wait(lambda: synced(cluster), "f2 caught up")
        cluster.wait(lambda: "f2" in cluster.rep.isr, "f2 back in the in-sync set")
        now = cluster.clock.now
        expected = contents(cluster.leader.store, cluster.leader.memory, now)
        assert contents(back.store, back.memory, now) == expected
        assert cluster.released == 3000
    finally:
        cluster.close()
        context.term()
