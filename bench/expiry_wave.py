"""A million keys expiring in the same second: GET latency through it, and how late the last goes.

Usage: ``.venv/bin/python -m bench.expiry_wave [--keys N] [--durable] [--order O] [--in-flight K]``

What it does, against a real broker and one worker (``tests/cluster.py``, one shard, no
gateway; ``--in-memory`` unless ``--durable``, which uses a data directory with fsync ``no``):

1. Writes 1,000 *steady* keys without a TTL: the GETs read these, so they never miss.
2. Measures the SET rate on 20,000 more keys without a TTL, and from it picks the wave's second
   ``X`` far enough ahead to load everything first, plus ``--quiet-s`` of quiet.
3. Writes the N *wave* keys through a raw DEALER socket with many SETs in flight, each with the
   TTL that puts its deadline at ``X + offset`` (offsets spread over 0..899 ms, rising with the
   write order or, with ``--order scattered``, not; the queue adds a little, so the deadlines
   the replies carry are recorded and reported as they are).
4. From the end of the load until the worker reports the wave done (plus ``--after-s``), runs a
   steady GET load on the steady keys, ``--in-flight`` at a time (1: one request at a time),
   and records every latency by the 100 ms window it was sent in, with the worker's CPU time
   and the machine's load average every quarter second.
5. Reads the worker's log line ``expired N keys in P passes over T ms, each within L ms of its
   deadline; K keys left; the longest pass took M ms`` (workers/store.py): L is the lateness of
   the latest removal, the "gone within one second of its deadline" number; K is what is left
   (the steady and probe keys).

Phases of the report: *baseline* is from 2 s after the load until 6 s before ``X`` (nothing is
due: the wave's keys wait in coarse buckets); *pre-wave* is the 6 s before ``X``, when they are
refined into millisecond buckets; *wave* runs from ``X`` until the last wave key is gone; *after*
is the rest. The floor: no 100 ms window of pre-wave or wave has a p99 above twice the baseline
p99. Numbers are from one run on one machine (2 cores shared by broker, worker and this driver,
and by whatever else runs there: the CPU and load columns say how much the worker got).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script as well as with -m
    sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster  # noqa: E402
from zkv.protocol import Kind, Request, Status, decode_reply, encode_request  # noqa: E402

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
STEADY_KEYS = 1000
PROBE_SETS = 20_000
LOAD_IN_FLIGHT = 500  # SETs outstanding while loading: fast, and little queueing drift
WINDOW_MS = 100
REPLY_TIMEOUT_S = 10.0
WAVE_LINE = re.compile(
    rb"expired (\d+) keys in (\d+) passes over (\d+) ms, each within (\d+) ms of its deadline; "
    rb"(\d+) keys left; the longest pass took ([\d.]+) ms"
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Wave:
    """One "expired ..." line of the worker's log."""

    removed: int
    passes: int
    over_ms: int
    late_ms: int
    left: int
    longest_pass_ms: float


@dataclass
class Load:
    """Result of a pipelined SET load."""

    elapsed_s: float
    deadlines: list[int] = field(default_factory=list)


def load(
    frontend: str,
    keys: list[bytes],
    deadline_of: list[int] | None,
    ttl_ms: int | None,
    first_id: int,
) -> Load:
    """SET every key (value 16 bytes), LOAD_IN_FLIGHT at a time; a TTL computed at send time
    so the deadline lands on ``deadline_of[i]``, or ``ttl_ms`` for all, or none."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(frontend)
    value = b"v" * 16
    result = Load(0.0)
    sent = received = 0
    # The worker applies a SET a queue's wait after it is sent, so a TTL computed at send time
    # lands late by that wait: subtract a running average of the waits seen so far.
    wait_ms = 0.0
    sent_wait_ms: dict[int, int] = {}
    started_s = time.monotonic()
    try:
        while received < len(keys):
            while sent < len(keys) and sent - received < LOAD_IN_FLIGHT:
                ttl = ttl_ms
                if deadline_of is not None:
                    sent_wait_ms[first_id + sent] = round(wait_ms)
                    ttl = max(1, deadline_of[sent] - now_ms() - sent_wait_ms[first_id + sent])
                request = Request(Kind.SET, first_id + sent, keys[sent], value, ttl)
                dealer.send_multipart(encode_request(request))
                sent += 1
            if not dealer.poll(REPLY_TIMEOUT_S * 1000):
                raise SystemExit(f"no SET reply within {REPLY_TIMEOUT_S} s")
            while True:
                try:
                    reply = decode_reply(dealer.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if reply.status != Status.OK:
                    raise SystemExit(f"SET failed: {reply}")
                received += 1
                if reply.deadline_ms is not None:
                    result.deadlines.append(reply.deadline_ms)
                    if deadline_of is not None:
                        late_ms = reply.deadline_ms - deadline_of[reply.request_id - first_id]
                        waited_ms = late_ms + sent_wait_ms.pop(reply.request_id)
                        wait_ms += (waited_ms - wait_ms) * 0.01
    finally:
        dealer.close(linger=0)
        context.term()
    result.elapsed_s = time.monotonic() - started_s
    return result


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def get_load(
    frontend: str,
    log_path: Path,
    in_flight: int,
    until: Callable[[list[Wave]], bool],
    worker_pid: int,
) -> tuple[dict[int, list[float]], list[Wave], list[tuple[int, float, float]]]:
    """GETs of steady keys, ``in_flight`` at a time, until ``until(waves)`` says stop.

    Returns latencies in ms by window (Unix ms // WINDOW_MS of the send time), the worker's
    wave lines seen so far, and samples of (Unix ms, the worker's CPU seconds, the 1-minute
    load average) every quarter second: on a shared machine they tell a worker that was busy
    from one that was starved.
    """
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(frontend)
    windows: dict[int, list[float]] = {}
    sent_at: dict[int, tuple[int, int]] = {}
    request_id = 1 << 40
    waves: list[Wave] = []
    cpu: list[tuple[int, float, float]] = []
    next_log_check_s = 0.0
    try:
        while True:
            now_s = time.monotonic()
            if now_s >= next_log_check_s:
                next_log_check_s = now_s + 0.25
                cpu.append((now_ms(), cpu_s(worker_pid), os.getloadavg()[0]))
                waves = [
                    Wave(*map(int, m[:-1]), float(m[-1]))
                    for m in WAVE_LINE.findall(log_path.read_bytes())
                ]
                if until(waves):
                    break
            while len(sent_at) < in_flight:
                request_id += 1
                key = b"steady:%d" % (request_id % STEADY_KEYS)
                frames = encode_request(Request(Kind.GET, request_id, key))
                sent_at[request_id] = (time.perf_counter_ns(), now_ms())
                dealer.send_multipart(frames)
            if not dealer.poll(REPLY_TIMEOUT_S * 1000):
                raise SystemExit(f"no GET reply within {REPLY_TIMEOUT_S} s")
            while True:
                try:
                    frames = dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                done_ns = time.perf_counter_ns()
                reply = decode_reply(frames)
                if reply.status != Status.OK:
                    raise SystemExit(f"GET of a steady key failed: {reply}")
                started_ns, wall_ms = sent_at.pop(reply.request_id)
                windows.setdefault(wall_ms // WINDOW_MS, []).append((done_ns - started_ns) / 1e6)
    finally:
        dealer.close(linger=0)
        context.term()
    return windows, waves, cpu


def cpu_between(cpu: list[tuple[int, float, float]], lo_ms: int, hi_ms: int) -> str:
    inside = [sample for sample in cpu if lo_ms <= sample[0] < hi_ms]
    if len(inside) < 2:
        return ""
    (t0, c0, _), (t1, c1, _) = inside[0], inside[-1]
    load = max(sample[2] for sample in inside)
    return f"worker CPU {100 * (c1 - c0) / ((t1 - t0) / 1000):.0f}%, load average up to {load:.1f}"


def summarize(
    name: str,
    windows: dict[int, list[float]],
    lo_ms: int,
    hi_ms: int,
    cpu: list[tuple[int, float, float]],
) -> dict:
    chosen = {w: s for w, s in windows.items() if lo_ms <= w * WINDOW_MS < hi_ms and len(s) >= 20}
    samples = [x for s in chosen.values() for x in s]
    if not samples:
        print(f"  {name:9} no samples")
        return {}
    p99s = {w: percentile(s, 0.99) for w, s in chosen.items()}
    worst = max(p99s, key=p99s.__getitem__)
    result = {
        "p50": percentile(samples, 0.5),
        "p99": percentile(samples, 0.99),
        "worst_window_p99": p99s[worst],
        "worst_window_at_ms": worst * WINDOW_MS,
        "gets": len(samples),
        "windows": len(chosen),
    }
    print(
        f"  {name:9} {len(chosen):4d} windows {len(samples):7d} GETs   p50 {result['p50']:.3f} ms"
        f"   p99 {result['p99']:.3f} ms   worst 100 ms window p99 {result['worst_window_p99']:.3f}"
        f" ms (at {(worst * WINDOW_MS - lo_ms) / 1000:+.1f} s, Unix {worst * WINDOW_MS / 1000:.1f})"
    )
    print(f"  {'':9} {cpu_between(cpu, lo_ms, hi_ms)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.expiry_wave", description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--durable", action="store_true", help="data dir, fsync no")
    parser.add_argument("--in-flight", type=int, default=1, help="GETs outstanding at once")
    parser.add_argument("--quiet-s", type=float, default=20.0, help="quiet time before the wave")
    parser.add_argument("--after-s", type=float, default=3.0, help="GETs after the wave is gone")
    parser.add_argument(
        "--order",
        choices=["sequential", "scattered"],
        default="sequential",
        help="deadlines in the order the keys are written (a batch told to expire at one time),"
        " or scattered over the second regardless of write order (the worst case for memory"
        " locality: each millisecond's keys lie all over the heap)",
    )
    parser.add_argument("--keep", type=Path, help="copy the worker's log here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="zkv-wave-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster(workdir, shards=1, ZKV_FSYNC="no", ZKV_HEARTBEAT_INTERVAL="1")
        with cluster:
            cluster.start_broker()
            worker = cluster.start_worker(*([] if args.durable else ["--in-memory"]))
            cluster.wait_ready(gateway=False)
            log_path = next(workdir.glob("worker-*.log"))
            steady = [b"steady:%d" % i for i in range(STEADY_KEYS)]
            load(cluster.frontend, steady, None, None, 1 << 50)
            probe_keys = [b"probe:%d" % i for i in range(PROBE_SETS)]
            probe = load(cluster.frontend, probe_keys, None, None, 2 << 50)
            rate = PROBE_SETS / probe.elapsed_s
            wave_ms = now_ms() + int((args.keys / rate * 1.5 + args.quiet_s) * 1000)
            wave_ms -= wave_ms % 1000  # the wave's second starts on a second
            mode = "durable" if args.durable else "in memory"
            print(
                f"{args.keys:,} keys due in one second, {mode}, {args.order} order"
                f"; probe {rate:,.0f} SET/s; the wave starts in {(wave_ms - now_ms()) / 1000:.0f} s"
            )
            if args.order == "sequential":
                offsets = [i * 900 // args.keys for i in range(args.keys)]
            else:
                offsets = [(i * 7919) % 900 for i in range(args.keys)]
            wave = load(
                cluster.frontend,
                [b"wave:%d" % i for i in range(args.keys)],
                [wave_ms + offset for offset in offsets],
                None,
                3 << 50,
            )
            loaded_ms = now_ms()
            first, last = min(wave.deadlines), max(wave.deadlines)
            print(
                f"loaded in {wave.elapsed_s:.0f} s ({args.keys / wave.elapsed_s:,.0f} SET/s); "
                f"deadlines from X{first - wave_ms:+d} ms to X{last - wave_ms:+d} ms; "
                f"the load ended {(wave_ms - loaded_ms) / 1000:.1f} s before X"
            )
            if loaded_ms > wave_ms - 8000:
                raise SystemExit("the load ended too close to the wave: raise --quiet-s")
            stop_after: list[float] = []

            def until(waves: list[Wave]) -> bool:
                if sum(wave.removed for wave in waves) < args.keys:
                    return now_ms() > last + 60_000  # give up a minute after the deadlines
                if not stop_after:
                    stop_after.append(time.monotonic() + args.after_s)
                return time.monotonic() >= stop_after[0]

            windows, waves, cpu = get_load(
                cluster.frontend, log_path, args.in_flight, until, worker.pid
            )
            if args.keep:
                args.keep.write_bytes(log_path.read_bytes())
            if worker.poll() is not None:
                raise SystemExit(f"the worker died\n{cluster.logs()}")

    if not waves:
        print("the worker never logged the end of the wave")
        return 1
    removed = sum(wave.removed for wave in waves)
    passes = sum(wave.passes for wave in waves)
    over_ms = sum(wave.over_ms for wave in waves)
    late_ms = max(wave.late_ms for wave in waves)
    left = waves[-1].left
    longest_ms = max(wave.longest_pass_ms for wave in waves)
    if len(waves) > 1:
        print(f"the worker logged the wave in {len(waves)} parts")
    gone_ms = last + late_ms  # at the latest: each key went within late_ms of its deadline
    print(
        f"worker: expired {removed:,} keys in {passes:,} passes over {over_ms} ms; every key "
        f"within {late_ms} ms of its deadline; {left} keys left; longest pass {longest_ms} ms"
    )
    print(f"GET latency, {args.in_flight} in flight, by phase (X = the wave's first second):")
    baseline = summarize("baseline", windows, loaded_ms + 2000, wave_ms - 6000, cpu)
    pre = summarize("pre-wave", windows, wave_ms - 6000, wave_ms, cpu)
    during = summarize("wave", windows, wave_ms, gone_ms + WINDOW_MS, cpu)
    summarize("after", windows, gone_ms + WINDOW_MS, 1 << 62, cpu)
    if baseline and pre and during:
        worst = max(pre["worst_window_p99"], during["worst_window_p99"])
        print(
            f"floor: worst window p99 {worst:.3f} ms vs 2 x baseline p99 "
            f"{2 * baseline['p99']:.3f} ms: {'ok' if worst <= 2 * baseline['p99'] else 'MISSED'};"
            f" last key gone within {late_ms} ms of its deadline: "
            f"{'ok' if late_ms <= 1000 else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
