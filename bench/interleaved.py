"""One request at a time against several chains at once, interleaved, so they share the noise.

On a shared 2-core machine the load drifts by a factor of two within a minute, so two p50s
measured one after the other compare the minutes as much as the systems. Here every chain is
started first, then one client per chain takes turns: ``BLOCK`` GETs on the first chain, then
``BLOCK`` SETs, then the same on the next chain, round after round until the time is up. Each
chain gets the same share of every minute, and its latencies are pooled per operation.

Used by the ``interleaved`` target (bench/targets.py): zkv over tcp:// and over ipc://
(ZKV_FSYNC=always), zkv over tcp:// with ZKV_FSYNC=no, and the bare chain (bench/bare.py) over
both, all running during the whole measurement (``INTERLEAVED_CHAINS`` in bench/scenarios.py).
Idle chains cost little (zkv's heartbeats), so their presence changes the numbers less than the
drift would.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence

from bench.stats import LoadResult, summarize
from bench.zmq_load import call_once
from zkv.client import Client

BLOCK = 50  # requests of one kind on one chain before the next takes its turn
TTL_S = 3600.0
OPS = ("get", "set")


def run_interleaved(
    endpoints: Mapping[str, str], keys: Sequence[bytes], value: bytes, duration_s: float
) -> dict[tuple[str, str], LoadResult]:
    """Turns of ``BLOCK`` GETs and ``BLOCK`` SETs on every endpoint for ``duration_s`` in all.

    Returns:
        One result per (endpoint name, ``get`` or ``set``); ops/s is the requests over the time
        spent on that chain and operation (one at a time, so about 1 / mean latency).
    """
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    clients = {name: Client(endpoint, timeout_s=5.0) for name, endpoint in endpoints.items()}
    latencies: dict[tuple[str, str], list[int]] = {(n, op): [] for n in endpoints for op in OPS}
    spent_ns: Counter[tuple[str, str]] = Counter()
    errors: dict[tuple[str, str], Counter[str]] = {pair: Counter() for pair in latencies}
    try:
        for client in clients.values():
            client.ping()  # connected before the clock starts
        deadline = time.perf_counter_ns() + int(duration_s * 1e9)
        while time.perf_counter_ns() < deadline:
            for name, client in clients.items():
                for op in OPS:
                    pair = (name, op)
                    samples, failed = latencies[pair], errors[pair]
                    began = now = time.perf_counter_ns()
                    for _ in range(BLOCK):
                        key = keys[rng.randrange(len(keys))]
                        call_once(client, op, key, value, TTL_S, failed)
                        end = time.perf_counter_ns()
                        samples.append(end - now)
                        now = end
                    spent_ns[pair] += now - began
    finally:
        for client in clients.values():
            client.close()
    results = {}
    for pair, samples in latencies.items():
        count = sum(errors[pair].values())
        details = {"interleaved_with": sorted(endpoints), "block": BLOCK}
        if count:
            details["error_kinds"] = dict(errors[pair])
        results[pair] = summarize(
            "zkv.Client interleaved",
            samples,
            ops=len(samples) - count,
            errors=count,
            elapsed_s=spent_ns[pair] / 1e9,
            details=details,
        )
    return results
