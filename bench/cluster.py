"""``python -m bench.cluster``: cluster mode on test hosts (tests/hosts.py; root needed).

The layout of tests/netns/cluster_kit.py: five network namespaces on a bridge, etcd on h1,
brokers on h2 and h3, a worker on each of h2..h5, 2 shards, CURVE on every socket, 1 s leases,
fsync always; the load comes from the operator's address on the bridge. Measured, in one run:

* ``set.pipelined``: SETs pipelined in batches of PIPELINE ops from LOADERS processes through
  one broker, with ZKV_REPLICAS=1 (every write on two hosts before its reply) against
  ZKV_REPLICAS=0;
* ``set.one``: one SET at a time, the same two ways (ops/s and p50/p99 latency);
* ``get.brokers``: pipelined GETs from LOADERS processes, all through one broker, then half
  through each of the two (ZKV_REPLICAS=1);
* ``failover``: KILLS times, shard 0's leader's host killed (SIGKILL of everything on it)
  under one-at-a-time SETs to shard 0: the time from the kill to the first SET sent after it
  and acknowledged; the host is started again and the cluster left to settle before the next.

Floors (ratios in one run, docs/benchmarks.md): replicated pipelined SET >= 0.5x unreplicated;
GETs through two brokers >= 1.0x through one. Exit status 1 if a floor is missed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

DURATION_S = 3.0  # per throughput measurement
PIPELINE = 200  # SETs/GETs per pipelined batch
LOADERS = 4  # GET load processes
KILLS = 10
VALUE = b"x" * 16
SETTLE_TIMEOUT_S = 30.0
FLOOR_REPLICATED_SET = 0.5
FLOOR_TWO_BROKERS = 1.0
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "cluster.json"


# --- load (run in the scenario, i.e. inside the test's namespaces) ----------------------------


def _pipelined(client: Any, op: str, duration_s: float, prefix: str) -> int:
    done = 0
    deadline = time.monotonic() + duration_s
    keys = [f"{prefix}{i}" for i in range(PIPELINE)]
    while time.monotonic() < deadline:
        if op == "set":
            client.set_many({k: VALUE for k in keys})
        else:
            client.get_many(keys)
        done += PIPELINE
    return done


def _loader(args: tuple[str, str, str, float, str]) -> int:
    """One load process: pipelined ``op`` batches for ``duration_s``; how many ops done."""
    from zkv.client import Client

    op, frontend, keys, duration_s, prefix = args
    client = Client(frontend, timeout_s=10.0, keys=keys)
    try:
        return _pipelined(client, op, duration_s, prefix)
    finally:
        client.close()


def _load(op: str, frontends: list[str], keys: str, duration_s: float) -> float:
    """ops/s of one load process per entry of ``frontends``, all at once."""
    context = multiprocessing.get_context("fork")
    work = [(op, f, keys, duration_s, f"set{i}-") for i, f in enumerate(frontends)]  # GETs hit
    with context.Pool(len(frontends)) as pool:
        return sum(pool.map(_loader, work)) / duration_s


def _one_at_a_time(client: Any, duration_s: float) -> dict[str, float]:
    latencies = []
    deadline = time.monotonic() + duration_s
    n = 0
    while time.monotonic() < deadline:
        n += 1
        sent = time.monotonic()
        client.set(f"one{n}", VALUE)
        latencies.append(time.monotonic() - sent)
    latencies.sort()
    return {
        "ops_s": round(len(latencies) / duration_s, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
    }


def measure_sets(hosts: Any, replicas: int) -> dict[str, Any]:
    from tests.netns.cluster_kit import ClusterOnHosts

    for host in hosts:  # a cluster of its own: nothing left of the previous one
        host.kill(wipe=True)
    h1, h2, h3, h4, h5 = hosts
    cluster = ClusterOnHosts(
        hosts, etcd=h1, brokers=[h2, h3], workers=[h2, h3, h4, h5], replicas=replicas
    ).start()
    try:
        client = cluster.client(timeout_s=10.0)
        _pipelined(client, "set", 0.5, "warm")  # connections, CURVE, first snapshots
        keys = str(cluster.client_keys)
        piped = _load("set", [cluster.frontends[0]] * LOADERS, keys, DURATION_S)
        one = _one_at_a_time(client, DURATION_S)
        found: dict[str, Any] = {"set_pipelined_ops_s": round(piped, 1), "set_one": one}
        if replicas:
            found.update(measure_gets(cluster))
            found["failover_s"] = measure_failover(cluster)
        return found
    finally:
        cluster.close()


def measure_gets(cluster: Any) -> dict[str, Any]:
    keys = str(cluster.client_keys)
    one = [cluster.frontends[0]] * LOADERS
    two = [cluster.frontends[i % 2] for i in range(LOADERS)]
    return {
        "get_one_broker_ops_s": round(_load("get", one, keys, DURATION_S), 1),
        "get_two_brokers_ops_s": round(_load("get", two, keys, DURATION_S), 1),
    }


def measure_failover(cluster: Any) -> list[float]:
    from zkv.errors import ZkvError
    from zkv.hashing import key_shard

    times = []
    for kill in range(KILLS):
        cluster.wait_ready(SETTLE_TIMEOUT_S)
        victim = cluster.leader_host(0)
        via = cluster.frontend_off(victim)
        client = cluster.client(via, timeout_s=10.0)
        acked: list[tuple[float, float]] = []
        stop = threading.Event()

        def write(
            client: Any = client,
            acked: list = acked,
            stop: threading.Event = stop,
            kill: int = kill,
        ) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                key = f"f{kill}-{n}"
                if key_shard(key.encode(), cluster.shards) != 0:
                    continue
                sent = time.monotonic()
                try:
                    client.set(key, VALUE)
                except ZkvError:
                    continue
                acked.append((sent, time.monotonic()))

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while len(acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        cluster.kill_host(victim)
        killed = time.monotonic()
        while time.monotonic() < deadline:
            after = [done for sent, done in acked if sent > killed]
            if after:
                times.append(round(after[0] - killed, 3))
                break
            time.sleep(0.005)
        stop.set()
        writer.join(timeout=15)
        cluster.restart(victim)
    return times


def inner(workdir: Path) -> dict[str, Any]:
    from tests.hosts import Hosts

    with Hosts(5, workdir, operator=True) as hosts:
        plain = measure_sets(hosts, 0)
        replicated = measure_sets(hosts, 1)
    return {"replicas_0": plain, "replicas_1": replicated}


# --- the report (outside the namespaces) ------------------------------------------------------


def table(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    r0, r1 = result["replicas_0"], result["replicas_1"]
    failover = sorted(r1["failover_s"])
    ratios = {
        "replicated_set_pipelined": round(r1["set_pipelined_ops_s"] / r0["set_pipelined_ops_s"], 3),
        "replicated_set_one": round(r1["set_one"]["ops_s"] / r0["set_one"]["ops_s"], 3),
        "two_brokers_get": round(r1["get_two_brokers_ops_s"] / r1["get_one_broker_ops_s"], 3),
    }
    rows = [
        ("scenario", "ops/s", "p50 ms", "p99 ms", "ratio"),
        ("set.pipelined, 0 replicas", f"{r0['set_pipelined_ops_s']:,.0f}", "", "", ""),
        (
            "set.pipelined, 1 replica",
            f"{r1['set_pipelined_ops_s']:,.0f}",
            "",
            "",
            f"{ratios['replicated_set_pipelined']:.2f}x (floor {FLOOR_REPLICATED_SET}x)",
        ),
        (
            "set.one, 0 replicas",
            f"{r0['set_one']['ops_s']:,.0f}",
            f"{r0['set_one']['p50_ms']:.2f}",
            f"{r0['set_one']['p99_ms']:.2f}",
            "",
        ),
        (
            "set.one, 1 replica",
            f"{r1['set_one']['ops_s']:,.0f}",
            f"{r1['set_one']['p50_ms']:.2f}",
            f"{r1['set_one']['p99_ms']:.2f}",
            f"{ratios['replicated_set_one']:.2f}x",
        ),
        ("get.pipelined, 1 broker", f"{r1['get_one_broker_ops_s']:,.0f}", "", "", ""),
        (
            "get.pipelined, 2 brokers",
            f"{r1['get_two_brokers_ops_s']:,.0f}",
            "",
            "",
            f"{ratios['two_brokers_get']:.2f}x (floor {FLOOR_TWO_BROKERS}x)",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    if failover:
        lines.append(
            f"failover, {len(failover)} leader host kills (lease 1 s): min {failover[0]:.2f} s, "
            f"p50 {statistics.median(failover):.2f} s, max {failover[-1]:.2f} s"
        )
    return "\n".join(line.rstrip() for line in lines), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)  # the inner run
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.workdir is not None:  # inside the namespaces (tests.hosts.run_scenario)
        try:
            result = inner(args.workdir)
        except BaseException:
            traceback.print_exc()
            return 1
        print(json.dumps(result), flush=True)
        return 0
    from tests.hosts import can_run_scenarios, run_scenario

    why = can_run_scenarios()
    if why is not None:
        print(f"bench.cluster cannot run: {why}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="zkv-bench-cluster-"))
    result = run_scenario("bench.cluster", workdir, timeout_s=600)
    text, ratios = table(result)
    print(text)
    passed = (
        ratios["replicated_set_pipelined"] >= FLOOR_REPLICATED_SET
        and ratios["two_brokers_get"] >= FLOOR_TWO_BROKERS
    )
    print("floors:", "met" if passed else "MISSED")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"result": result, "ratios": ratios}, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
