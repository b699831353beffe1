"""The issue-12 rows: pipelined INCR and conditional SETs against pipelined SET, a lock taken
and released one at a time against a lone SET, and Redis's SET NX and INCRBY, all in one run
(one cluster, one redis-server), so their ratios are not the drift between two runs.

1. Pipelined (bench/client_pipeline.py, ``CLIENT_PROCESSES`` processes, ``zkv.Client``): SET
   of 16 bytes on the uniform keys, then INCR, SET NX on keys never written, and SET IF_VERSION
   (a compare-and-set loop: each call writes every key with the version its previous write
   returned), in ROUNDS rounds, the second in the reverse order (the machine's drift cancels
   to first order in the ratios); each row is the mean of its rounds.
2. One at a time (one ``zkv.Client``): in turns, a lone SET, a lock acquired and released
   (``acquire_lock`` + ``release_lock``: two durable writes, each its own round trip and, under
   ``ZKV_FSYNC=always``, its own fsync), and two SETs one after the other: the pair of SETs is
   what the lock's two writes cost without the lock.
3. Redis (if installed): ``redis-benchmark -c 50`` of SET, ``SET key v NX`` (fresh keys from a
   space of 10^9) and ``INCRBY key 1``, in the same run.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Collection, Sequence

from bench import client_pipeline, peers
from bench.scenarios import CLIENT_PROCESSES
from bench.stats import LoadResult, summarize
from zkv.client import Client

PIPELINED_OPS = ("set", "incr", "set-nx", "set-ifv")
ROUNDS = 2  # of the pipelined rows, each run lasting the row duration
ONE_AT_A_TIME = ("set", "lock-unlock", "set-set")
LOCK_TTL_S = 10.0
REDIS_CLIENTS = 50
REDIS_FRESH_KEYS = 1_000_000_000  # -r of SET NX: nearly every key new
REDIS_SHARE = 0.5  # of the row duration per redis-benchmark run


def pipelined_id(op: str) -> str:
    size = "" if op == "incr" else ".16B"
    return f"issue12.client.pipeline.{op}{size}.p{CLIENT_PROCESSES}"


def single_id(op: str) -> str:
    size = "" if op == "lock-unlock" else ".16B"
    return f"issue12.client.{op}{size}.c1"


def redis_id(op: str) -> str:
    size = "" if op == "incrby" else ".16B"
    return f"issue12.redis.{op}{size}.c{REDIS_CLIENTS}"


REDIS_COMMANDS = {
    "set": None,  # redis-benchmark -t set
    "set-nx": ["SET", "nx:__rand_int__", "v" * 16, "NX"],
    "incrby": ["INCRBY", "n:__rand_int__", "1"],
}


def run(
    frontend: str,
    redis_port: int | None,
    keys: Sequence[bytes],
    value: bytes,
    duration_s: float,
    say: Callable[[str], None],
    wanted: Collection[str] | None = None,
) -> dict[str, LoadResult]:
    """The issue-12 rows' results by id: those in ``wanted`` (None: all) and the SET rows
    they are compared with (the redis rows only with ``redis_port``)."""
    found: dict[str, LoadResult] = {}
    wanted = set(wanted) if wanted is not None else None

    def want(row: str) -> bool:
        return wanted is None or row in wanted

    ops = [op for op in PIPELINED_OPS[1:] if want(pipelined_id(op))]
    if ops or want(pipelined_id("set")):
        ops = ["set", *ops]
        runs: dict[str, list[LoadResult]] = {op: [] for op in ops}
        # ROUNDS rounds, the order reversed every other one: each row's mean position is
        # the same, so a drift of the machine's speed cancels to first order in the ratios.
        for n in range(ROUNDS):
            for op in ops if n % 2 == 0 else ops[::-1]:
                say(f"pipelined {op}, round {n + 1} of {ROUNDS}")
                runs[op].append(
                    client_pipeline.run_client_pipeline(
                        frontend, op, keys, value, CLIENT_PROCESSES, duration_s
                    )
                )
        for op, results in runs.items():
            found[pipelined_id(op)] = _mean_of(results)
    if any(want(single_id(op)) for op in ONE_AT_A_TIME):
        say("one at a time: SET, LOCK+UNLOCK, SET+SET in turns")
        found.update(one_at_a_time(frontend, keys, value, duration_s))
    if redis_port is not None:
        for op, command in REDIS_COMMANDS.items():
            if want(redis_id(op)):
                say(f"redis-benchmark {op}")
                found[redis_id(op)] = run_redis(redis_port, op, command, duration_s * REDIS_SHARE)
    return found


def _mean_of(results: Sequence[LoadResult]) -> LoadResult:
    """A row of its rounds: their mean ops/s, the latencies of the first, every round's ops/s
    in details."""
    first = results[0]
    rates = [r.ops_per_s or 0.0 for r in results]
    details = dict(first.details or {})
    details["rounds_ops_per_s"] = [round(rate, 1) for rate in rates]
    details["of_rounds"] = "mean ops/s; latencies of the first round"
    return LoadResult(
        generator=first.generator,
        ops=sum(r.ops for r in results),
        errors=sum(r.errors or 0 for r in results),
        elapsed_s=sum(r.elapsed_s for r in results),
        p50_ms=first.p50_ms,
        p99_ms=first.p99_ms,
        p999_ms=first.p999_ms,
        count=sum(r.count for r in results),
        ops_per_s=sum(rates) / len(rates),
        details=details,
    )


def one_at_a_time(
    frontend: str, keys: Sequence[bytes], value: bytes, duration_s: float
) -> dict[str, LoadResult]:
    """The lock row and its two peers, in turns: one of each per round until ``duration_s``."""
    times: dict[str, list[int]] = {op: [] for op in ONE_AT_A_TIME}
    errors = dict.fromkeys(ONE_AT_A_TIME, 0)
    clock = time.perf_counter_ns
    with Client(frontend) as client:
        client.ping()
        n = 0
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            key = keys[n % len(keys)]
            n += 1
            start = clock()
            client.set(key, value)
            times["set"].append(clock() - start)
            start = clock()
            try:
                lock = client.acquire_lock(b"bench-lock", LOCK_TTL_S)
                client.release_lock(lock.name, lock.token)
            except Exception:  # a refused lock is counted, not timed
                errors["lock-unlock"] += 1
            else:
                times["lock-unlock"].append(clock() - start)
            start = clock()
            client.set(key, value)
            client.set(keys[(n + 1) % len(keys)], value)
            times["set-set"].append(clock() - start)
    return {
        single_id(op): summarize(
            "zkv.Client",
            samples,
            ops=len(samples),
            errors=errors[op],
            elapsed_s=sum(samples) / 1e9,
            details={"latency_is_per": _PER[op], "rounds": n},
        )
        for op, samples in times.items()
    }


_PER = {
    "set": "SET",
    "lock-unlock": "acquire_lock + release_lock (two round trips, two durable writes)",
    "set-set": "two SETs one after the other (two round trips, two durable writes)",
}


def run_redis(port: int, op: str, command: list[str] | None, seconds: float) -> LoadResult:
    """redis-benchmark -c 50 of one command (``None``: its own ``-t set``)."""
    if command is None:
        return peers.run_redis_benchmark(port, "set", REDIS_CLIENTS, 1, 16, seconds)
    requests = peers.redis_benchmark_requests(REDIS_CLIENTS, 1, 16, seconds)
    line = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(REDIS_CLIENTS)]
    line += ["-n", str(requests), "-r", str(REDIS_FRESH_KEYS), "--csv", *command]
    completed = subprocess.run(
        line, capture_output=True, text=True, timeout=seconds + peers.EXTRA_WAIT_S, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited {completed.returncode}: {completed.stderr}")
    (row,) = peers.parse_redis_csv(completed.stdout).values()
    rps = row["rps"]
    return LoadResult(
        generator="redis-benchmark",
        ops=requests,
        errors=None,
        elapsed_s=requests / rps if rps else 0.0,
        p50_ms=row["p50_latency_ms"],
        p99_ms=row["p99_latency_ms"],
        p999_ms=None,
        count=requests,
        ops_per_s=rps,
        details={"command": " ".join(line[:1] + line[5:])},
    )
