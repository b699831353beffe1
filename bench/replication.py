"""Replicated against unreplicated apply throughput of one shard, pipelined SETs, in one run.

Usage: ``.venv/bin/python -m bench.replication [--passes N] [--ops K] [--value-bytes B]
[--fsync always|everysec|no] [--in-flight P] [--rounds R]``

Both runs apply the same N passes of K SETs to a durable leader shard (Shard.handle_batch, the
worker's own path, under the given fsync policy). The unreplicated run holds nothing. The
replicated run ships each pass's records (workers/replication.py) to one follower in another
process (``--follower``, its own log under the same policy) over tcp://127.0.0.1 with CURVE,
holds each pass's replies until the follower acks, and keeps at most P passes in flight, as a
worker does while the broker sends more. The figure is SET throughput until every reply is
released, the best of ``--rounds`` runs of each, alternated; the ratio is replicated /
unreplicated (issue 11's floor: 0.5). ``ZKV_BENCH_PLAIN=1`` runs the link without CURVE.
Numbers are from one machine: compare ratios, not absolute values. Not a test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from workers.aof import FsyncPolicy
from workers.idempotency import RequestMemory
from workers.persist import Durability, ShardFiles
from workers.replication import Follower, FollowerSocket, LeaderSocket, Replicator
from workers.shard import Shard, take_shard
from workers.store import HighWaterClock, TTLStore, wall_clock_ms
from zkv.keys import Keys, create_keys
from zkv.protocol import Dispatch, Kind, Request

READY_WAIT_S = 30.0  # the follower's first snapshot
FOLLOWER_ID = "bench-follower"
CURVE = os.environ.get("ZKV_BENCH_PLAIN") != "1"  # ZKV_BENCH_PLAIN=1: no CURVE (to compare)


def passes(count: int, ops: int, value: bytes) -> list[list[Dispatch]]:
    """Every pass's dispatches, built before any clock starts."""
    tokens = itertools.count(1)
    ids = itertools.count(1)
    return [
        [
            Dispatch(next(tokens), Request(Kind.SET, next(ids), b"key-%d" % (n * ops + i), value))
            for i in range(ops)
        ]
        for n in range(count)
    ]


def leader(
    data_dir: Path, policy: FsyncPolicy, ship: Callable[[bytes], object] | None = None
) -> Shard:
    """The leader's shard; each pass's records go to ``ship`` as soon as they are appended,
    before the leader's own fsync, so the follower's write and fsync overlap it (safe: the
    replies still wait for both; a leader that dies before its fsync leaves a write it never
    acknowledged on the follower, which is allowed to survive)."""
    shard = take_shard(0, 1, None, Durability(data_dir, policy), wall_clock_ms).shard
    files = shard.files
    assert files is not None
    if ship is not None:
        append = files.append

        def tapped(data: bytes) -> None:
            append(data)
            ship(data)

        files.append = tapped  # type: ignore[method-assign]
    return shard


def unreplicated(work: list[list[Dispatch]], data_dir: Path, policy: FsyncPolicy) -> float:
    shard = leader(data_dir, policy)
    started = time.perf_counter()
    for dispatches in work:
        shard.handle_batch(dispatches)
    elapsed = time.perf_counter() - started
    shard.close()
    return elapsed


def replicated(
    work: list[list[Dispatch]], data_dir: Path, policy: FsyncPolicy, in_flight: int, keys: Path
) -> float:
    holder: list[Shard] = []
    context = zmq.Context()
    link = LeaderSocket(context, "tcp://127.0.0.1:0", Keys(keys) if CURVE else None)
    released = [0]
    rep = Replicator(
        0,
        1,
        [FOLLOWER_ID],
        source=lambda: (holder[0].store, holder[0].memory),
        send=link.send,
        release=lambda item: released.__setitem__(0, released[0] + item),
        shrink=lambda members: True,
        expand=lambda members: True,
        lag_s=60.0,  # the bench measures throughput, never a follower dropped
    )
    shard = leader(data_dir / "leader", policy, rep.ship)
    holder.append(shard)
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.replication",
            "--follower",
            link.endpoint,
            "--keys",
            str(keys),
            "--data",
            str(data_dir / "follower"),
            "--fsync",
            policy.value,
        ],
        stdin=subprocess.PIPE,
    )
    poller = zmq.Poller()
    poller.register(link.socket, zmq.POLLIN)
    try:
        deadline = time.monotonic() + READY_WAIT_S
        while rep.commit_seq() < 0:  # the follower's first snapshot installed
            if time.monotonic() > deadline or follower.poll() is not None:
                raise SystemExit("the follower did not start")
            if poller.poll(10):
                link.drain(rep)
            rep.tick()
        total = sum(len(d) for d in work)
        started = time.perf_counter()
        for dispatches in work:
            while rep.held >= in_flight:
                if poller.poll(100):
                    link.drain(rep)
            shard.handle_batch(dispatches)  # ships its records before its fsync
            rep.hold(len(dispatches), 64 * len(dispatches))
            if poller.poll(0):
                link.drain(rep)
        while released[0] < total:
            if poller.poll(100):
                link.drain(rep)
            rep.tick()
        elapsed = time.perf_counter() - started
    finally:
        if follower.stdin is not None:
            follower.stdin.close()
        try:
            follower.wait(5)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait()
        link.close()
        shard.close()
        context.term()
    return elapsed


def follow(endpoint: str, keys: Path, data_dir: Path, policy: FsyncPolicy) -> None:
    """The follower process: follows until its stdin closes."""
    files = ShardFiles(Durability(data_dir, policy), 0)
    files.take(1)
    store = TTLStore(HighWaterClock())
    memory = RequestMemory()
    files.replay(store, memory)
    context = zmq.Context()
    link = FollowerSocket(context, FOLLOWER_ID, Keys(keys) if CURVE else None)
    link.connect(endpoint)
    follower = Follower(0, FOLLOWER_ID, files, store, memory, send=link.send)
    follower.follow(1)
    poller = zmq.Poller()
    poller.register(link.socket, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    try:
        while True:
            ready = dict(poller.poll(100))
            if sys.stdin.fileno() in ready and not os.read(sys.stdin.fileno(), 1):
                return
            if link.socket in ready:
                link.drain(follower)
            follower.tick()
    finally:
        link.close()
        follower.files.close()
        context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2000)
    parser.add_argument("--ops", type=int, default=50, help="SETs per pass")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--fsync", default="always", choices=[p.value for p in FsyncPolicy])
    parser.add_argument("--in-flight", type=int, default=16, help="passes held at most")
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of each")
    parser.add_argument("--follower", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    policy = FsyncPolicy(args.fsync)
    if args.follower:
        follow(args.follower, Path(args.keys), Path(args.data), policy)
        return 0
    value = b"v" * args.value_bytes
    total = args.passes * args.ops
    alone_s: list[float] = []
    shipped_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="zkv-bench-repl-") as scratch:
        root = Path(scratch)
        create_keys(root / "keys")
        for number in range(args.rounds):  # alternated, so both see the same machine
            work = passes(args.passes, args.ops, value)
            alone_s.append(unreplicated(work, root / f"alone-{number}", policy))
            work = passes(args.passes, args.ops, value)
            shipped_s.append(
                replicated(work, root / f"shipped-{number}", policy, args.in_flight, root / "keys")
            )
    alone = total / min(alone_s)
    shipped = total / min(shipped_s)
    print(
        f"pipelined SETs ({args.passes} passes of {args.ops}, {args.value_bytes}-byte values, "
        f"fsync {policy.value}, {args.in_flight} passes in flight, best of {args.rounds}"
        f"{', CURVE' if CURVE else ', plain'}):\n"
        f"  unreplicated  {alone:10,.0f} SET/s\n"
        f"  1 follower    {shipped:10,.0f} SET/s\n"
        f"  ratio         {shipped / alone:10.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
