"""Pipelined throughput of the real cluster next to ``redis-benchmark -c 50`` (not pipelined).

    python -m bench.pipeline [--ops 200000] [--fsync no always] [--json out.json]

For each fsync policy it starts a real cluster (broker and one worker per shard, as separate
processes, via tests.cluster.Cluster), then one Python client in this process sends SETs and
GETs of 16-byte values through :meth:`zkv.Client.execute` (BATCH messages, a window of
operations in flight): once over uniformly random keys, once all on one hot key. Then, if
``redis-server`` and ``redis-benchmark`` are installed, it starts a redis-server on a free
port (no persistence) and runs ``redis-benchmark -c 50 -t get,set -d 16 -n N -q`` against it,
once before and once after the zkv runs, so the numbers come from the same machine in the same
minutes; the ratio is to the better of the two Redis runs (on a shared machine the load moves).
It prints ops/s, the ratio to Redis for each case, and the load average before and after.

Everything runs on loopback and stops by itself; every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster, free_port, wait_for  # noqa: E402 - after the path set-up
from zkv.client import Client  # noqa: E402
from zkv.protocol import Kind  # noqa: E402

VALUE = b"v" * 16
KEYSPACE = 100_000
HOT_KEY = b"hot:key"
REDIS_TIMEOUT_S = 120.0


def measure(client: Client, ops: list[tuple[int, bytes, bytes | None, int | None]]) -> float:
    """Ops/s of one pipelined run of ``ops``."""
    started = time.perf_counter()
    results = client.execute(ops)
    elapsed = time.perf_counter() - started
    if len(results) != len(ops):
        raise AssertionError("a pipeline lost results")
    return len(ops) / elapsed


def zkv_numbers(count: int, fsync: str) -> dict[str, float]:
    """SET and GET ops/s, uniform keys and one hot key, through a fresh cluster."""
    rng = random.Random(1)
    keys = [b"key:%d" % rng.randrange(KEYSPACE) for _ in range(count)]
    with tempfile.TemporaryDirectory(prefix="zkv-pipeline-") as tmp:
        env = {"ZKV_FSYNC": fsync, "ZKV_HEARTBEAT_INTERVAL": "1.0"}
        with Cluster(Path(tmp), shards=2, **env) as cluster:
            cluster.start(gateway=False)
            client = Client(cluster.frontend, timeout_s=30.0)
            try:
                # Warm up (connections, dict growth), then measure.
                client.execute([(Kind.SET, key, VALUE, None) for key in keys[:20_000]])
                return {
                    "set": measure(client, [(Kind.SET, key, VALUE, None) for key in keys]),
                    "get": measure(client, [(Kind.GET, key, None, None) for key in keys]),
                    "set_hot": measure(client, [(Kind.SET, HOT_KEY, VALUE, None)] * count),
                    "get_hot": measure(client, [(Kind.GET, HOT_KEY, None, None)] * count),
                }
            finally:
                client.close()


def redis_numbers(count: int) -> dict[str, float] | None:
    """``redis-benchmark -c 50 -t get,set -d 16 -n count -q`` against a private redis-server,
    or None if Redis is not installed."""
    server, bench = shutil.which("redis-server"), shutil.which("redis-benchmark")
    if server is None or bench is None:
        return None
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [bench, "-p", str(port), "-n", "1", "-t", "ping", "-q"],
                    capture_output=True,
                    timeout=5,
                ).returncode
                == 0
            ),
            "redis-server",
        )
        command = [bench, "-p", str(port), "-c", "50", "-t", "get,set", "-d", "16"]
        command += ["-n", str(count), "-q"]
        output = subprocess.run(
            command, capture_output=True, text=True, timeout=REDIS_TIMEOUT_S, check=True
        ).stdout
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    numbers = {}
    # -q prints progress lines ending in \r, then "SET: 66777.97 requests per second, ...".
    for name, value in re.findall(r"(SET|GET): ([\d.]+) requests per second", output):
        numbers[name.lower()] = float(value)
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__)
    parser.add_argument("--ops", type=int, default=200_000, help="operations per measurement")
    parser.add_argument("--fsync", nargs="+", default=["no", "always"], help="fsync policies")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    results: dict[str, object] = {"ops": args.ops, "load_before": os.getloadavg()}
    redis_before = redis_numbers(args.ops)
    for fsync in args.fsync:
        results[f"zkv_fsync_{fsync}"] = zkv_numbers(args.ops, fsync)
    redis_after = redis_numbers(args.ops)
    redis = None
    if redis_before and redis_after:
        redis = {case: max(redis_before[case], redis_after[case]) for case in redis_before}
    results["redis_c50_before"] = redis_before
    results["redis_c50_after"] = redis_after
    results["redis_c50"] = redis
    results["load_after"] = os.getloadavg()
    print(f"{'case':<28}{'ops/s':>12}{'x redis':>10}")
    for fsync in args.fsync:
        numbers = results[f"zkv_fsync_{fsync}"]
        assert isinstance(numbers, dict)
        for case, value in numbers.items():
            base = redis.get(case.split("_")[0]) if redis else None
            ratio = f"{value / base:.2f}" if base else "-"
            print(f"{f'zkv fsync={fsync} {case}':<28}{value:>12,.0f}{ratio:>10}")
    if redis and redis_before and redis_after:
        for case, value in redis.items():
            runs = f"(runs: {redis_before[case]:,.0f} before, {redis_after[case]:,.0f} after)"
            print(f"{f'redis -c 50 {case}':<28}{value:>12,.0f}{'1.00':>10}  {runs}")
    else:
        print("redis-server or redis-benchmark not installed: no comparison")
    before, after = results["load_before"], results["load_after"]
    print(f"load average (1 min): {before[0]:.1f} before, {after[0]:.1f} after")  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
