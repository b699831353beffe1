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
is the rest. The floor, in the issue's words: GET p99 does not rise above twice its baseline
during the wave; checked for the pre-wave phase too (its refinement is expiry work). The worst
100 ms window of each phase is reported beside it, but not judged: a window holds a few hundred
GETs, so its p99 is nearly its maximum, and on a shared 2-core machine one descheduling sets it
(seen: a pre-wave window at 12x the baseline p99 while nothing expired). Numbers are from one
run on one machine (2 cores shared by broker, worker and this driver, and by whatever else runs
there: the CPU and load columns say how much the worker got).

``python -m bench --only expiry`` (or ``--full``) runs it once with the defaults (in memory,
sequential order, one GET at a time, ``--full-keys`` keys) and shows the baseline, pre-wave and
wave phases as rows of the benchmark's table (:func:`run`, :func:`phase_result`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script as well as with -m
    sys.path.insert(0, str(ROOT))

from bench.stats import LoadResult  # noqa: E402
from bench.zmq_load import Failed, queued_replies  # noqa: E402
from tests.cluster import one_worker  # noqa: E402
from zkv.protocol import Kind, Request, Status, encode_request  # noqa: E402

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
STEADY_KEYS = 1000
PROBE_SETS = 20_000
LOAD_IN_FLIGHT = 500  # SETs outstanding while loading: fast, and little queueing drift
WINDOW_MS = 100
REPLY_TIMEOUT_S = 10.0
PHASES = ("baseline", "pre-wave", "wave", "after")
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
            for reply in queued_replies(dealer, REPLY_TIMEOUT_S, "SET"):
                if reply.status != Status.OK:
                    raise Failed(f"SET failed: {reply}")
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
            for reply in queued_replies(dealer, REPLY_TIMEOUT_S, "GET"):
                done_ns = time.perf_counter_ns()
                if reply.status != Status.OK:
                    raise Failed(f"GET of a steady key failed: {reply}")
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
    say: Callable[[str], None] = print,
) -> dict:
    chosen = {w: s for w, s in windows.items() if lo_ms <= w * WINDOW_MS < hi_ms and len(s) >= 20}
    samples = [x for s in chosen.values() for x in s]
    if not samples:
        say(f"  {name:9} no samples")
        return {}
    p99s = {w: percentile(s, 0.99) for w, s in chosen.items()}
    worst = max(p99s, key=p99s.__getitem__)
    result = {
        "p50": percentile(samples, 0.5),
        "p99": percentile(samples, 0.99),
        "p999": percentile(samples, 0.999),
        "worst_window_p99": p99s[worst],
        "worst_window_at_ms": worst * WINDOW_MS,
        "gets": len(samples),
        "windows": len(chosen),
        "cpu": cpu_between(cpu, lo_ms, hi_ms),
    }
    say(
        f"  {name:9} {len(chosen):4d} windows {len(samples):7d} GETs   p50 {result['p50']:.3f} ms"
        f"   p99 {result['p99']:.3f} ms   worst 100 ms window p99 {result['worst_window_p99']:.3f}"
        f" ms (at {(worst * WINDOW_MS - lo_ms) / 1000:+.1f} s, Unix {worst * WINDOW_MS / 1000:.1f})"
    )
    say(f"  {'':9} {result['cpu']}")
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
    try:
        found = run(
            args.keys,
            args.durable,
            args.in_flight,
            args.quiet_s,
            args.after_s,
            args.order,
            args.keep,
        )
    except Failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0 if found["waves"] else 1


def run(
    keys: int,
    durable: bool = False,
    in_flight: int = 1,
    quiet_s: float = 20.0,
    after_s: float = 3.0,
    order: str = "sequential",
    keep: Path | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """One wave, as the module docstring says; ``say`` gets the report's lines.

    Returns:
        ``keys``, ``waves`` (how many "expired" lines the worker logged; 0: the wave never
        ended), ``removed``, ``passes``, ``over_ms``, ``late_ms`` (the latest removal after its
        deadline), ``left``, ``longest_pass_ms``, ``phases`` (per phase of PHASES: p50, p99,
        p999, worst_window_p99, gets, windows, cpu; empty without samples), ``floor_ok`` and
        ``gone_ok`` (None when a phase is missing).

    Raises:
        Failed: the cluster did not answer as it should.
    """
    with one_worker("zkv-wave-", durable) as (cluster, worker, log_path):
        steady = [b"steady:%d" % i for i in range(STEADY_KEYS)]
        load(cluster.frontend, steady, None, None, 1 << 50)
        probe_keys = [b"probe:%d" % i for i in range(PROBE_SETS)]
        probe = load(cluster.frontend, probe_keys, None, None, 2 << 50)
        rate = PROBE_SETS / probe.elapsed_s
        wave_ms = now_ms() + int((keys / rate * 1.5 + quiet_s) * 1000)
        wave_ms -= wave_ms % 1000  # the wave's second starts on a second
        mode = "durable" if durable else "in memory"
        say(
            f"{keys:,} keys due in one second, {mode}, {order} order"
            f"; probe {rate:,.0f} SET/s; the wave starts in {(wave_ms - now_ms()) / 1000:.0f} s"
        )
        if order == "sequential":
            offsets = [i * 900 // keys for i in range(keys)]
        else:
            offsets = [(i * 7919) % 900 for i in range(keys)]
        wave = load(
            cluster.frontend,
            [b"wave:%d" % i for i in range(keys)],
            [wave_ms + offset for offset in offsets],
            None,
            3 << 50,
        )
        loaded_ms = now_ms()
        first, last = min(wave.deadlines), max(wave.deadlines)
        say(
            f"loaded in {wave.elapsed_s:.0f} s ({keys / wave.elapsed_s:,.0f} SET/s); "
            f"deadlines from X{first - wave_ms:+d} ms to X{last - wave_ms:+d} ms; "
            f"the load ended {(wave_ms - loaded_ms) / 1000:.1f} s before X"
        )
        if loaded_ms > wave_ms - 8000:
            raise Failed("the load ended too close to the wave: raise --quiet-s")
        stop_after: list[float] = []

        def until(waves: list[Wave]) -> bool:
            if sum(wave.removed for wave in waves) < keys:
                return now_ms() > last + 60_000  # give up a minute after the deadlines
            if not stop_after:
                stop_after.append(time.monotonic() + after_s)
            return time.monotonic() >= stop_after[0]

        windows, waves, cpu = get_load(cluster.frontend, log_path, in_flight, until, worker.pid)
        if keep:
            keep.write_bytes(log_path.read_bytes())
        if worker.poll() is not None:
            raise Failed(f"the worker died\n{cluster.logs()}")

    found: dict = {"keys": keys, "waves": len(waves), "load_set_per_s": keys / wave.elapsed_s}
    if not waves:
        say("the worker never logged the end of the wave")
        return found
    late_ms = max(wave.late_ms for wave in waves)
    found.update(
        removed=sum(wave.removed for wave in waves),
        passes=sum(wave.passes for wave in waves),
        over_ms=sum(wave.over_ms for wave in waves),
        late_ms=late_ms,
        left=waves[-1].left,
        longest_pass_ms=max(wave.longest_pass_ms for wave in waves),
    )
    if len(waves) > 1:
        say(f"the worker logged the wave in {len(waves)} parts")
    gone_ms = last + late_ms  # at the latest: each key went within late_ms of its deadline
    say(
        f"worker: expired {found['removed']:,} keys in {found['passes']:,} passes over "
        f"{found['over_ms']} ms; every key within {late_ms} ms of its deadline; "
        f"{found['left']} keys left; longest pass {found['longest_pass_ms']} ms"
    )
    say(f"GET latency, {in_flight} in flight, by phase (X = the wave's first second):")
    bounds = {
        "baseline": (loaded_ms + 2000, wave_ms - 6000),
        "pre-wave": (wave_ms - 6000, wave_ms),
        "wave": (wave_ms, gone_ms + WINDOW_MS),
        "after": (gone_ms + WINDOW_MS, 1 << 62),
    }
    phases = {
        name: summarize(name, windows, lo_ms, hi_ms, cpu, say)
        for name, (lo_ms, hi_ms) in bounds.items()
    }
    found["phases"] = phases
    found["floor_ok"] = found["gone_ok"] = None
    baseline, pre, during = phases["baseline"], phases["pre-wave"], phases["wave"]
    if baseline and pre and during:
        worst = max(pre["p99"], during["p99"])
        found["floor_ok"] = worst <= 2 * baseline["p99"]
        found["gone_ok"] = late_ms <= 1000
        say(
            f"floor: pre-wave and wave p99 up to {worst:.3f} ms vs 2 x baseline p99 "
            f"{2 * baseline['p99']:.3f} ms: {'ok' if found['floor_ok'] else 'MISSED'};"
            f" last key gone within {late_ms} ms of its deadline: "
            f"{'ok' if found['gone_ok'] else 'MISSED'}"
        )
    return found


def phase_result(found: dict, phase: str) -> LoadResult:
    """One phase of :func:`run`'s result as a row of ``python -m bench``: GETs one at a time,
    ops/s over the phase's windows, the phase's percentiles; the wave's notes say whether the
    floors were met.

    Raises:
        Failed: the wave never ended, or the phase has no samples.
    """
    if not found.get("waves"):
        raise Failed(f"the worker never logged the end of the wave of {found['keys']:,} keys")
    summary = found["phases"].get(phase)
    if not summary:
        raise Failed(f"no GETs were measured in the {phase} phase")
    base = found["phases"].get("baseline") or {}
    notes = ""
    if phase in ("pre-wave", "wave") and base:
        worst = summary["worst_window_p99"]
        notes = f"worst 100 ms p99 {worst:.2f} ms = {worst / base['p99']:.2f}x baseline p99"
    if phase == "wave":
        notes += (
            f"; {found['removed']:,} keys expired, the last {found['late_ms']} ms after its "
            f"deadline (floor 1000: {'ok' if found['gone_ok'] else 'MISSED'}); "
            f"p99 floor (pre-wave and wave p99 <= 2x baseline): "
            f"{'ok' if found['floor_ok'] else 'MISSED'}"
        )
    elapsed_s = summary["windows"] * WINDOW_MS / 1000
    details = {key: value for key, value in found.items() if key != "phases"}
    details.update(phase=phase, worst_window_p99_ms=summary["worst_window_p99"], cpu=summary["cpu"])
    return LoadResult(
        generator="bench.expiry_wave",
        ops=summary["gets"],
        errors=0,
        elapsed_s=elapsed_s,
        p50_ms=summary["p50"],
        p99_ms=summary["p99"],
        p999_ms=summary["p999"],
        count=summary["gets"],
        details=details,
        notes=notes,
    )


if __name__ == "__main__":
    sys.exit(main())
