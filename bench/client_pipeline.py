"""Pipelined load through the real client library: ``zkv.Client.execute`` in N processes.

This is what an application that batches does: it hands the client many operations at once and
the client packs them into BATCH messages (``batch_ops`` operations each, ``window_ops`` in
flight; the client's defaults), matches the replies and returns the results. Nothing here
builds a frame.

One Python process is not enough to feed the cluster: the client's own packing and unpacking
costs CPU, and the GIL rules out threads. So the load runs in ``processes`` child processes
(``spawn``: no ZeroMQ state inherited), each with its own :class:`zkv.Client`:

1. Each child builds ``CHUNKS`` lists of ``ops_per_call`` operations (keys drawn uniformly from
   the key space, or the one hot key) before the clock starts, connects and PINGs, then says it
   is ready.
2. The parent waits for every child, then sets one start time and one deadline (CLOCK_MONOTONIC
   is the same clock in every process); each child waits for the start.
3. Each child calls ``execute`` on its lists in turn until the deadline and reports its
   operations, errors, the times of its first call and last return, and the duration of each
   call.

Ops/s is every child's OK operations over the span from the common start to the last return.
Latency is per ``execute`` call (``ops_per_call`` operations), not per operation: the client
does not expose when each operation's reply came.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import LoadResult, summarize
from zkv import calls
from zkv import protocol as zkv_protocol
from zkv.client import Client
from zkv.errors import ZkvError
from zkv.protocol import Kind

OPS_PER_CALL = 10_000  # operations per execute() call
CHUNKS = 4  # distinct lists of operations each child cycles through
TTL_MS = 3_600_000
READY_TIMEOUT_S = 30.0  # for a child to start, build its lists and get its PING answered
CALL_TIMEOUT_S = 30.0  # the client's timeout per call
DONE_SLACK_S = 60.0  # after the deadline, how long a child may take to report


@dataclass(frozen=True, slots=True)
class ChildReport:
    """What one child measured (times are time.monotonic_ns())."""

    ok: int
    errors: dict[str, int]
    first_ns: int
    last_ns: int
    calls_ns: list[int]


# The issue-12 operations (bench/issue12.py's rows): each child's keys of its own (``<op>:<pid>:
# <n>``); an NX SET goes to a key never written, so a child holds FRESH_CHUNKS lists and stops
# early (its ops/s over its own span) if it runs through them all.
EXTENDED_OPS = ("incr", "set-nx", "set-ifv")
FRESH_CHUNKS = 24


def build_extended(op: str, value: bytes, count: int, chunk: int) -> list[Any]:
    """``count`` issue-12 operations (zkv.calls Ops), built before the clock starts. The NX
    SETs and INCRs share one Spec object (an op's options): what an application holding one
    options value would send. ``set-ifv`` starts as plain SETs that learn each key's version
    (see :func:`next_cas`)."""
    prefix = b"%s:%d:%d:" % (op.encode(), os.getpid(), chunk)
    keys = [prefix + b"%d" % i for i in range(count)]
    if op == "incr":
        spec = calls.incr_op(b"k", 1)[2]
        return [(calls.C_INCR, key, spec, None) for key in keys]
    if op == "set-nx":
        spec = calls.set_op(b"k", value, nx=True)[2]
        return [(calls.C_SET, key, spec, TTL_MS) for key in keys]
    if op == "set-ifv":
        spec = calls.set_op(b"k", value, versioned=True)[2]
        return [(calls.C_PUT, key, spec, TTL_MS) for key in keys]
    raise ValueError(f"unknown operation {op!r}")


def next_cas(ops: list[Any], results: list[Any], value: bytes) -> list[Any]:
    """The next round of a compare-and-set loop: each key written again with IF_VERSION of
    the version its last write returned (a refused one keeps its op). Built while the clock
    runs, as an application's read-modify-write loop would."""
    kind = zkv_protocol.Kind.SET
    return [
        op
        if isinstance(result, ZkvError)
        else (
            calls.C_PUT,
            op[1],
            (kind, value, {"if_version": result[0], "versioned": True}),
            TTL_MS,
        )
        for op, result in zip(ops, results, strict=True)
    ]


def build_ops(
    op: str, keys: Sequence[bytes], value: bytes, count: int, rng: random.Random
) -> list[tuple[int, bytes, bytes | None, int | None]]:
    """``count`` operations for ``Client.execute``, keys drawn uniformly from ``keys``."""
    if op == "get":
        kind, data, ttl = int(Kind.GET), None, None
    elif op == "set":
        kind, data, ttl = int(Kind.SET), value, TTL_MS
    else:
        raise ValueError(f"unknown operation {op!r}")
    if len(keys) == 1:
        return [(kind, keys[0], data, ttl)] * count
    return [(kind, keys[rng.randrange(len(keys))], data, ttl) for _ in range(count)]


def _child(
    endpoint: str,
    op: str,
    keys: Sequence[bytes],
    value: bytes,
    ops_per_call: int,
    ready: Any,
    start: Any,
    times: Any,
    reports: Any,
) -> None:
    """One load process: build, connect, wait for the start, call execute until the deadline."""
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    extended = op in EXTENDED_OPS
    if extended:
        count = FRESH_CHUNKS if op == "set-nx" else CHUNKS
        chunks = [build_extended(op, value, ops_per_call, n) for n in range(count)]
    else:
        chunks = [build_ops(op, keys, value, ops_per_call, rng) for _ in range(CHUNKS)]
    errors: Counter[str] = Counter()
    ok = 0
    calls: list[int] = []
    with Client(endpoint, timeout_s=CALL_TIMEOUT_S) as client:
        client.ping()
        if op == "set-ifv":  # the first versions, before the clock
            for n, chunk in enumerate(chunks):
                chunks[n] = next_cas(chunk, client._execute(chunk, False, plain=False), value)
        ready.put(os.getpid())
        if not start.wait(READY_TIMEOUT_S * 2):
            return
        start_ns, deadline_ns = times[0], times[1]
        while time.monotonic_ns() < start_ns:
            pass
        first = now = time.monotonic_ns()
        index = 0
        while now < deadline_ns:
            if not extended:
                results = client.execute(chunks[index % CHUNKS], raise_on_error=False)
            elif op == "set-nx" and index == len(chunks):
                break  # no fresh key left
            else:  # the pipelines' general path (Client.execute takes plain ops only)
                chunk = chunks[index % len(chunks)]
                results = client._execute(chunk, False, plain=False)
                if op == "set-ifv":
                    chunks[index % len(chunks)] = next_cas(chunk, results, value)
            index += 1
            for result in results:
                if isinstance(result, ZkvError):
                    errors[type(result).__name__] += 1
                elif result is None and op == "get":
                    errors["not found"] += 1
            ok += len(results)
            end = time.monotonic_ns()
            calls.append(end - now)
            now = end
    error_count = sum(errors.values())
    reports.put(ChildReport(ok - error_count, dict(errors), first, now, calls))


def run_client_pipeline(
    endpoint: str,
    op: str,
    keys: Sequence[bytes],
    value: bytes,
    processes: int,
    duration_s: float,
    ops_per_call: int = OPS_PER_CALL,
) -> LoadResult:
    """``processes`` clients, each calling ``execute`` with ``ops_per_call`` operations."""
    spawn = multiprocessing.get_context("spawn")
    ready, reports = spawn.Queue(), spawn.Queue()
    start = spawn.Event()
    times = spawn.Array("q", 2, lock=False)
    children = [
        spawn.Process(
            target=_child,
            args=(endpoint, op, list(keys), value, ops_per_call, ready, start, times, reports),
            daemon=True,
        )
        for _ in range(processes)
    ]
    try:
        for child in children:
            child.start()
        for _ in children:
            try:
                ready.get(timeout=READY_TIMEOUT_S)
            except queue.Empty:
                raise TimeoutError(
                    f"the load processes were not ready within {READY_TIMEOUT_S} s"
                ) from None
        start_ns = time.monotonic_ns() + 20_000_000  # 20 ms: every child sees the event first
        times[0], times[1] = start_ns, start_ns + int(duration_s * 1e9)
        start.set()
        found: list[ChildReport] = []
        for _ in children:
            try:
                found.append(reports.get(timeout=duration_s + DONE_SLACK_S))
            except queue.Empty:
                raise TimeoutError("a load process did not report") from None
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
    errors: Counter[str] = Counter()
    for report in found:
        errors.update(report.errors)
    latencies = [ns for report in found for ns in report.calls_ns]
    last_ns = max(report.last_ns for report in found)
    details: dict[str, Any] = {
        "processes": processes,
        "ops_per_call": ops_per_call,
        "latency_is_per": f"execute() call of {ops_per_call} operations",
        "per_process_ops": [report.ok for report in found],
    }
    if errors:
        details["error_kinds"] = dict(errors)
    return summarize(
        "zkv.Client.execute",
        latencies,
        ops=sum(report.ok for report in found),
        errors=sum(errors.values()),
        elapsed_s=(last_ns - start_ns) / 1e9,
        details=details,
    )
