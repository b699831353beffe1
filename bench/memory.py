"""Bytes per key, measured the way a user would: RSS growth of a real worker, next to Redis.

Usage: ``.venv/bin/python -m bench.memory [--keys N] [--ttl-s S] [--spread-s S] [--modes ...]``

For each mode this starts a broker and one worker (``tests/cluster.py``, the process tests'
cluster, one shard, no gateway), warms the request path up with GETs of missing keys, reads the
worker's ``VmRSS`` from ``/proc/<pid>/status``, then writes N distinct keys (16-byte keys
``key:000000000042``, 16-byte values, each with a TTL) through the broker from a raw DEALER
socket, many requests in flight, and reads ``VmRSS`` again once the worker is idle: a durable
worker may be compacting its log right after the load (a snapshot of the dict and a rewrite
buffer, both freed when it ends), so the reading waits until every compaction the worker's log
announced has finished and RSS holds still. Growth / N is the number reported: everything the
process pays per key (dict, records, expiry index, allocator slack), not only what tracemalloc
sees.

Modes:

* ``memory``: ``--in-memory``; ``durable``: a data directory with ``ZKV_FSYNC=no`` (the log is
  written, the page cache is not in RSS).
* ``-noid`` suffix: every SET carries request id 0, which the worker never remembers, so the
  idempotency memory (every write of the last 21 s per shard, bounded in bytes) stays empty.
  The difference between a mode and its ``-noid`` twin is that memory.
* ``redis``: the same keys and values with ``SET key value PX ttl`` into a ``redis-server`` on a
  free port (no persistence), pipelined; reported as ``INFO memory`` ``used_memory`` growth (what
  Redis itself counts) and as RSS growth.

TTLs: every key gets ``--ttl-s`` seconds, plus a uniform random extra in ``[0, --spread-s)``; a
spread of hours scatters the deadlines the way real sessions do. Numbers are from one run on
one machine.

``python -m bench --only memory`` (or ``--full``) runs the ``memory``, ``durable`` and ``redis``
modes as rows of the benchmark's table (:func:`scenario_result`), with a 1 h TTL and no spread.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script as well as with -m
    sys.path.insert(0, str(ROOT))

from bench.stats import LoadResult  # noqa: E402
from bench.zmq_load import Failed, queued_replies  # noqa: E402
from tests.cluster import free_port, one_worker, wait_for  # noqa: E402
from zkv.protocol import Kind, Request, Status, encode_request  # noqa: E402

MODES = ["memory", "memory-noid", "durable", "durable-noid", "redis"]
IN_FLIGHT = 500  # requests outstanding: keeps both busy, under the 1000-message queue limits
WARM_UP_REQUESTS = 20_000
REPLY_TIMEOUT_S = 30.0
SETTLE_S = 1.0  # RSS must hold still this long before the final reading
SETTLE_MAX_S = 60.0
SCENARIO_TTL_MS = 3_600_000  # the benchmark's rows: every key lives an hour


def key_of(i: int) -> bytes:
    return b"key:%012d" % i  # 16 bytes


def value_of(i: int) -> bytes:
    return b"%016d" % i  # 16 bytes, distinct per key as real data would be


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def compacting(log_path: Path | None) -> bool:
    """Whether the worker's log shows a compaction started and not yet ended."""
    if log_path is None:
        return False
    text = log_path.read_text(errors="replace")
    ended = text.count(" compacted ") + text.count("compaction of")
    return text.count(" compacting ") > ended


def settled_rss(pid: int, log_path: Path | None = None) -> int:
    """RSS once no compaction runs and RSS stopped changing for SETTLE_S."""
    deadline_s = time.monotonic() + SETTLE_MAX_S
    last = rss_bytes(pid)
    stable_since_s = time.monotonic()
    while time.monotonic() < deadline_s:
        time.sleep(0.1)
        now = rss_bytes(pid)
        if abs(now - last) > 64 * 1024 or compacting(log_path):
            last, stable_since_s = now, time.monotonic()
        elif time.monotonic() - stable_since_s >= SETTLE_S:
            break
    return rss_bytes(pid)


def pipeline(
    frontend: str, requests: Iterator[list[bytes]], count: int, in_flight: int = IN_FLIGHT
) -> int:
    """Send ``count`` requests with up to ``in_flight`` outstanding; returns the failures."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.connect(frontend)
    failures = sent = received = 0
    try:
        while received < count:
            while sent < count and sent - received < in_flight:
                dealer.send_multipart(next(requests), copy=False)
                sent += 1
            for reply in queued_replies(dealer, REPLY_TIMEOUT_S, f"{received}/{count}"):
                received += 1
                if reply.status not in (Status.OK, Status.NOT_FOUND):
                    if not failures:
                        print(f"first failure: {reply}", file=sys.stderr)
                    failures += 1
    finally:
        dealer.close(linger=0)
        context.term()
    return failures


def set_requests(count: int, ttl_ms: Callable[[int], int], with_ids: bool) -> Iterator[list[bytes]]:
    for i in range(count):
        request_id = i + 1 if with_ids else 0
        yield encode_request(Request(Kind.SET, request_id, key_of(i), value_of(i), ttl_ms(i)))


def get_requests(count: int) -> Iterator[list[bytes]]:
    for i in range(count):
        yield encode_request(Request(Kind.GET, 10**12 + i, b"warm:%d" % i))


def measure_zkv(mode: str, keys: int, ttl_ms: Callable[[int], int]) -> dict[str, float]:
    durable = mode.startswith("durable")
    with_ids = not mode.endswith("-noid")
    with one_worker("zkv-memory-", durable) as (cluster, worker, log_path):
        pid = worker.pid
        pipeline(cluster.frontend, get_requests(WARM_UP_REQUESTS), WARM_UP_REQUESTS)
        before = settled_rss(pid, log_path)
        started_s = time.monotonic()
        failures = pipeline(cluster.frontend, set_requests(keys, ttl_ms, with_ids), keys)
        elapsed_s = time.monotonic() - started_s
        after = settled_rss(pid, log_path)
        if failures:
            raise Failed(f"{failures} SETs failed\n{cluster.logs()}")
        if worker.poll() is not None:
            raise Failed(f"the worker died\n{cluster.logs()}")
    return {
        "bytes_per_key": (after - before) / keys,
        "elapsed_s": elapsed_s,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "sets_per_s": keys / elapsed_s,
    }


def redis_info(sock: socket.socket) -> dict[str, str]:
    sock.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n")
    data = b""
    while True:
        data += sock.recv(65536)
        header, _, rest = data.partition(b"\r\n")
        if header.startswith(b"$") and len(rest) >= int(header[1:]) + 2:
            break
    text = rest[: int(header[1:])].decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def measure_redis(keys: int, ttl_ms: Callable[[int], int]) -> dict[str, float]:
    server = shutil.which("redis-server")
    if server is None:
        raise Failed("redis-server not found: apt-get install -y redis-server")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        sock = wait_for(lambda: socket.create_connection(("127.0.0.1", port)), "redis-server")
        with sock:
            before = redis_info(sock)
            rss_before = rss_bytes(process.pid)
            started_s = time.monotonic()
            batch = 1000
            for start in range(0, keys, batch):
                end = min(start + batch, keys)
                sock.sendall(
                    b"".join(
                        resp(b"SET", key_of(i), value_of(i), b"PX", b"%d" % ttl_ms(i))
                        for i in range(start, end)
                    )
                )
                expected = b"+OK\r\n" * (end - start)
                answer = b""
                while len(answer) < len(expected):
                    chunk = sock.recv(len(expected) - len(answer))
                    if not chunk:
                        raise Failed("redis-server closed the connection")
                    answer += chunk
                if answer != expected:
                    raise Failed(f"unexpected Redis answer: {answer[:80]!r}")
            elapsed_s = time.monotonic() - started_s
            after = redis_info(sock)
            rss_after = rss_bytes(process.pid)
    finally:
        process.terminate()
        process.wait(10)
    return {
        "bytes_per_key": (int(after["used_memory"]) - int(before["used_memory"])) / keys,
        "rss_bytes_per_key": (rss_after - rss_before) / keys,
        "elapsed_s": elapsed_s,
        "sets_per_s": keys / elapsed_s,
    }


def scenario_result(mode: str, keys: int) -> LoadResult:
    """One row of ``python -m bench``: ``mode`` is ``memory`` (an --in-memory worker),
    ``durable`` (a data directory, fsync no) or ``redis``; every key gets a one-hour TTL and
    its request id is remembered, as the real client's SETs are.

    The row's ops/s is the SET rate while loading (one DEALER, 500 in flight; one connection
    with batches of 1,000 for Redis), its bytes_per_key what the ratio compares: RSS growth
    for zkv, ``used_memory`` growth for Redis (RSS growth is in the details).

    Raises:
        Failed: the measurement could not be made.
    """
    if mode == "redis":
        found = measure_redis(keys, lambda i: SCENARIO_TTL_MS)
        notes = (
            f"{found['bytes_per_key']:.0f} B/key used_memory, "
            f"{found['rss_bytes_per_key']:.0f} B/key RSS, {keys:,} keys"
        )
        generator = "bench.memory redis"
    else:
        found = measure_zkv(mode, keys, lambda i: SCENARIO_TTL_MS)
        notes = (
            f"{found['bytes_per_key']:.0f} B/key RSS (RSS {found['rss_before_mb']:.0f} -> "
            f"{found['rss_after_mb']:.0f} MiB), {keys:,} keys"
        )
        generator = "bench.memory zkv"
    return LoadResult(
        generator=generator,
        ops=keys,
        errors=0,
        elapsed_s=found["elapsed_s"],
        p50_ms=None,
        p99_ms=None,
        p999_ms=None,
        details={"keys": keys, "ttl_ms": SCENARIO_TTL_MS, **found},
        bytes_per_key=found["bytes_per_key"],
        notes=notes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--ttl-s", type=float, default=3600.0, help="every key's base TTL")
    parser.add_argument("--spread-s", type=float, default=0.0, help="random extra TTL, up to")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    extra_ms = [int(rng.random() * args.spread_s * 1000) for _ in range(args.keys)]
    base_ms = int(args.ttl_s * 1000)

    def ttl_ms(i: int) -> int:
        return base_ms + extra_ms[i]

    print(
        f"{args.keys:,} keys, 16-byte keys and values, TTL {args.ttl_s:g} s"
        f" + [0, {args.spread_s:g}) s; python {sys.version.split()[0]}, pid {os.getpid()}"
    )
    try:
        report(args.modes, args.keys, ttl_ms)
    except Failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def report(modes: list[str], keys: int, ttl_ms: Callable[[int], int]) -> None:
    """Measure each mode and print one line each."""
    for mode in modes:
        if mode == "redis":
            result = measure_redis(keys, ttl_ms)
            print(
                f"{mode:14} {result['bytes_per_key']:7.1f} bytes/key (used_memory)"
                f"   {result['rss_bytes_per_key']:7.1f} bytes/key (RSS)"
            )
        else:
            result = measure_zkv(mode, keys, ttl_ms)
            print(
                f"{mode:14} {result['bytes_per_key']:7.1f} bytes/key (RSS)"
                f"   RSS {result['rss_before_mb']:.0f} -> {result['rss_after_mb']:.0f} MiB"
                f"   {result['sets_per_s']:,.0f} SET/s",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
