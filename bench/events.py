"""Change events: how late expiry events come, and what a watcher costs the writers.

Usage: ``.venv/bin/python -m bench.events [--keys N] [--seconds S] [--rounds R] [--ci]``
(``--ci``: 10,000 keys, 1 s rounds, 2 rounds: a smoke run of a minute).

Against a real broker and one worker (``tests/cluster.py``, one shard, in memory, no gateway):

1. **Expiry-event delay.** Writes N keys whose deadlines are spread over one second ``X``
   (key i at ``X + i * 1000 / N`` ms; the deadline each SET reply carries is recorded), then
   subscribes to their prefix (a probe key written until its event comes back), and records
   for every ``expire`` event the time it was received minus the key's deadline: p50, p99,
   max, and how many events were missing or reported as a gap. This is end to end: the
   worker's expiry pass, its PUB, the broker's XSUB/XPUB proxy and this script's SUB. The
   worker's own log line (``expired N keys ... each within L ms of its deadline``) gives the
   removal's lateness alone.
2. **Redis keyspace notifications** (when ``redis-server`` is installed): the same keys with
   ``SET k v PXAT deadline``, ``notify-keyspace-events Ex``, a ``SUBSCRIBE`` to
   ``__keyevent@0__:expired``: the same delays.
3. **SET throughput with a watcher.** Pipelined SETs (zkv.Client pipelines of 2,000, new keys)
   for ``--seconds``, in ``--rounds`` pairs: one round without a watcher, one with a watcher
   process subscribed to every key (it counts what it receives and the gaps it sees), in
   alternating order. The ratio is the median of the per-pair ratios (with/without); the floor
   of the issue is 0.9.

Numbers are from one run on one machine: 2 cores shared by the broker, the worker, this
driver and the watcher (and by whatever else runs there: the load average is printed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script as well as with -m
    sys.path.insert(0, str(ROOT))

from bench.expiry_wave import cpu_s  # noqa: E402
from bench.peers import RedisServer, missing, resp_command  # noqa: E402
from bench.zmq_load import Failed, queued_replies  # noqa: E402
from tests.cluster import free_port, one_worker  # noqa: E402
from zkv.client import Client  # noqa: E402
from zkv.protocol import (  # noqa: E402
    EventKind,
    Kind,
    ProtocolError,
    Request,
    Status,
    decode_event,
    encode_request,
)
from zkv.watch import Gap, SeqTracker  # noqa: E402

LOAD_IN_FLIGHT = 500  # SETs outstanding while loading
OPS_PER_CALL = 2_000  # SETs per pipeline call of the throughput rounds
REPLY_TIMEOUT_S = 10.0
QUIET_S = 3.0  # between the end of the load and the wave: the subscription is made then
WAVE_TIMEOUT_S = 60.0  # after the wave's second, how long to wait for its last events
SUB_RCVHWM = 4_000_000  # this script's queue: it must not be the one that drops
PREFIX = b"w:"
WAVE_LINE = re.compile(rb"expired (\d+) keys in (\d+) passes over (\d+) ms, each within (\d+) ms")
CI_KEYS = 10_000
# Request ids unique across the run: the worker answers a SET whose id it has seen (within its
# idempotency window) from memory, without applying it again.
_ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 20)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def percentile(samples: list[int], q: float) -> int:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Delays:
    """The lateness of expiry events (received minus deadline, ms)."""

    keys: int
    late_ms: list[int] = field(default_factory=list)
    gaps: int = 0
    missed: int = 0
    notes: str = ""

    def summary(self) -> dict[str, object]:
        late = self.late_ms
        return {
            "keys": self.keys,
            "received": len(late),
            "p50_ms": percentile(late, 0.5) if late else None,
            "p99_ms": percentile(late, 0.99) if late else None,
            "max_ms": max(late) if late else None,
            "early": sum(1 for x in late if x < 0),
            "gaps": self.gaps,
            "missed": self.missed,
            "notes": self.notes,
        }


# --- zkv: the expiry wave --------------------------------------------------------------------


def set_many(frontend: str, keys: list[bytes], deadline_of: list[int] | None) -> list[int]:
    """SET every key, LOAD_IN_FLIGHT at a time, each with the TTL that puts its deadline at
    ``deadline_of[i]`` (computed at send time), or none; returns the deadlines replied."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(frontend)
    deadlines = [0] * len(keys)
    first = next(_ids)
    for _ in range(len(keys)):
        next(_ids)
    sent = received = 0
    try:
        while received < len(keys):
            while sent < len(keys) and sent - received < LOAD_IN_FLIGHT:
                ttl = None if deadline_of is None else max(1, deadline_of[sent] - now_ms())
                dealer.send_multipart(
                    encode_request(Request(Kind.SET, first + sent, keys[sent], b"v", ttl))
                )
                sent += 1
            for reply in queued_replies(dealer, REPLY_TIMEOUT_S, "SET"):
                if reply.status != Status.OK:
                    raise Failed(f"SET failed: {reply}")
                deadlines[reply.request_id - first] = reply.deadline_ms or 0
                received += 1
    finally:
        dealer.close(linger=0)
        context.term()
    return deadlines


def subscribe(context: zmq.Context, events: str, frontend: str) -> zmq.Socket:
    """A SUB on ``PREFIX``, returned once a probe key's event came back through it."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
    sub.connect(events)
    sub.setsockopt(zmq.SUBSCRIBE, PREFIX)
    deadline_s = time.monotonic() + 10
    while time.monotonic() < deadline_s:
        set_many(frontend, [PREFIX + b"probe"], None)
        if sub.poll(100):
            while sub.poll(200):
                sub.recv_multipart()
            return sub
    raise Failed("the subscription never reached the worker")


def zkv_wave(keys: int, say) -> Delays:  # type: ignore[no-untyped-def]
    """Part 1 (see the module docstring)."""
    with one_worker("zkv-events-", durable=False) as (cluster, worker, log_path):
        names = [PREFIX + b"%d" % n for n in range(keys)]
        started = time.monotonic()
        set_many(cluster.frontend, names[: min(keys, 20_000)], None)  # the rate, and warm-up
        rate = min(keys, 20_000) / (time.monotonic() - started)
        x_ms = (now_ms() + int(1000 * (keys / rate * 1.3 + QUIET_S)) + 999) // 1000 * 1000
        say(f"  loading {keys} keys (about {rate:.0f}/s) due in the second {x_ms / 1000:.0f}")
        deadlines = set_many(
            cluster.frontend, names, [x_ms + n * 1000 // keys for n in range(keys)]
        )
        if now_ms() > x_ms - 1000:
            raise Failed("the load ended too late: the wave began before the subscription")
        context = zmq.Context()
        sub = subscribe(context, cluster.events, cluster.frontend)
        deadline_of = dict(zip(names, deadlines, strict=True))
        stamps: list[tuple[int, list[bytes]]] = []
        end_s = time.monotonic() + (x_ms + 1000 - now_ms()) / 1000 + WAVE_TIMEOUT_S
        assert cluster.broker is not None
        cpu_before = cpu_s(worker.pid), cpu_s(cluster.broker.pid), time.process_time()
        wall_before = time.monotonic()
        try:
            while len(stamps) < keys and time.monotonic() < end_s:
                if not sub.poll(200):
                    continue
                while True:
                    try:
                        frames = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    stamps.append((time.time_ns(), frames))
        finally:
            sub.close(linger=0)
            context.term()
        wall = time.monotonic() - wall_before
        used = [
            after - before
            for before, after in zip(
                cpu_before,
                (cpu_s(worker.pid), cpu_s(cluster.broker.pid), time.process_time()),
                strict=True,
            )
        ]
        result = Delays(keys)
        tracker = SeqTracker()
        for stamp_ns, frames in stamps:
            try:
                event = decode_event(frames)
            except ProtocolError:
                continue
            found = tracker.check(event.shard, event.seq)
            if isinstance(found, Gap):
                result.gaps += 1
                result.missed += found.missed or 0
            if event.event is EventKind.EXPIRE and event.key in deadline_of:
                result.late_ms.append(stamp_ns // 1_000_000 - deadline_of[event.key])
        waves = WAVE_LINE.findall(log_path.read_bytes())
        if waves:
            removed, passes, over, within = waves[-1]
            result.notes = (
                f"worker: removed {int(removed)} keys in {int(passes)} passes over {int(over)} "
                f"ms, each within {int(within)} ms of its deadline; "
            )
        # On a shared machine the wall time says little without the CPU each process got.
        result.notes += (
            f"CPU from the subscription to the last event ({wall:.1f} s): worker {used[0]:.1f} s, "
            f"broker {used[1]:.1f} s, this subscriber {used[2]:.1f} s; load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        return result


# --- Redis: the same wave ----------------------------------------------------------------------


def redis_wave(keys: int, workdir: Path, say) -> Delays:  # type: ignore[no-untyped-def]
    """Part 2: the same wave in Redis, with keyspace notifications."""
    server = RedisServer(free_port(), workdir)
    try:
        with (
            socket.create_connection(("127.0.0.1", server.port)) as writer,
            socket.create_connection(("127.0.0.1", server.port)) as reader,
        ):
            writer.sendall(resp_command(b"CONFIG", b"SET", b"notify-keyspace-events", b"Ex"))
            assert writer.recv(64).startswith(b"+OK")
            reader.sendall(resp_command(b"SUBSCRIBE", b"__keyevent@0__:expired"))
            assert b"subscribe" in reader.recv(256)
            names = [PREFIX + b"%d" % n for n in range(keys)]
            started = time.monotonic()
            rate_keys = min(keys, 20_000)
            _redis_set(writer, names[:rate_keys], None)
            rate = rate_keys / (time.monotonic() - started)
            x_ms = (now_ms() + int(1000 * (keys / rate * 1.3 + QUIET_S)) + 999) // 1000 * 1000
            deadlines = [x_ms + n * 1000 // keys for n in range(keys)]
            say(f"  redis: {keys} keys due in the second {x_ms / 1000:.0f}")
            _redis_set(writer, names, deadlines)
            deadline_of = dict(zip(names, deadlines, strict=True))
            result = Delays(keys)
            pattern = re.compile(
                rb"\*3\r\n\$7\r\nmessage\r\n\$\d+\r\n[^\r]*\r\n\$\d+\r\n([^\r]*)\r\n"
            )
            buffer = b""
            reader.settimeout(0.2)
            end_s = time.monotonic() + (x_ms + 1000 - now_ms()) / 1000 + WAVE_TIMEOUT_S
            while len(result.late_ms) < keys and time.monotonic() < end_s:
                try:
                    chunk = reader.recv(1 << 20)
                except TimeoutError:
                    continue
                if not chunk:
                    # Redis closes a subscriber past client-output-buffer-limit pubsub (32 MB,
                    # or 8 MB for 60 s): its notifications are lost, not queued.
                    result.notes = "redis closed the subscription (output buffer limit); "
                    break
                at_ms = now_ms()
                buffer += chunk
                last = 0
                for match in pattern.finditer(buffer):
                    deadline = deadline_of.get(match.group(1))
                    if deadline is not None:
                        result.late_ms.append(at_ms - deadline)
                    last = match.end()
                buffer = buffer[last:]
            result.notes += f"redis-server defaults (hz 10); load {os.getloadavg()[0]:.1f}"
            return result
    finally:
        server.stop()


def _redis_set(conn: socket.socket, names: list[bytes], deadlines: list[int] | None) -> None:
    """SET each key (PXAT its deadline, or no expiry), pipelined in chunks."""
    for start in range(0, len(names), 10_000):
        chunk = names[start : start + 10_000]
        if deadlines is None:
            payload = b"".join(resp_command(b"SET", name, b"v") for name in chunk)
        else:
            payload = b"".join(
                resp_command(b"SET", name, b"v", b"PXAT", b"%d" % deadlines[start + i])
                for i, name in enumerate(chunk)
            )
        conn.sendall(payload)
        expected = b"+OK\r\n" * len(chunk)
        received = b""
        while len(received) < len(expected):
            part = conn.recv(1 << 20)
            if not part:
                raise Failed("redis closed the connection")
            received += part
        if received != expected:
            raise Failed(f"redis SET answered {received[:200]!r}")


# --- throughput with and without a watcher ----------------------------------------------------


def set_rate(frontend: str, seconds: float, first: int) -> tuple[float, int]:
    """Pipelined SETs of new keys for ``seconds`` through the client library (BATCH messages,
    OPS_PER_CALL a call, as bench/client_pipeline.py): (SETs per second, SETs answered)."""
    done = 0
    value = b"v" * 16
    with Client(frontend, timeout_s=30.0) as kv:
        started = time.monotonic()
        stop_at = started + seconds
        while True:
            pipeline = kv.pipeline()
            for n in range(OPS_PER_CALL):
                pipeline.set(b"t:%d" % (first + done + n), value)
            pipeline.execute()
            done += OPS_PER_CALL
            if time.monotonic() >= stop_at:
                break
        return done / (time.monotonic() - started), done


def receive_all(events: str) -> int:
    """The watcher process (``--receive``): counts every event until stdin closes; prints
    ``ready`` once subscribed (after its first event), then ``{"events": N, "missed": M}``."""
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
    sub.connect(events)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    tracker = SeqTracker()
    count = missed = 0
    ready = False
    while True:
        found = dict(poller.poll(500))
        if sub in found:
            while True:
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                event = decode_event(frames)
                gap = tracker.check(event.shard, event.seq)
                if isinstance(gap, Gap):
                    missed += gap.missed or 0
                count += 1
            if not ready:
                print("ready", flush=True)
                ready = True
        if sys.stdin.fileno() in found and not sys.stdin.readline():
            break
    print(json.dumps({"events": count, "missed": missed}), flush=True)
    sub.close(linger=0)
    context.term()
    return 0


def with_and_without(seconds: float, rounds: int, say) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Part 3 (see the module docstring)."""
    ratios: list[float] = []
    rows: list[dict[str, float]] = []
    with one_worker("zkv-events-rate-", durable=False) as (cluster, _worker, _log):
        first = 0
        set_rate(cluster.frontend, 1.0, 10**9)  # warm-up
        for round_ in range(rounds):
            order = ("without", "with") if round_ % 2 == 0 else ("with", "without")
            found: dict[str, float] = {}
            for mode in order:
                watcher = None
                if mode == "with":
                    watcher = subprocess.Popen(
                        [sys.executable, "-m", "bench.events", "--receive", cluster.events],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=ROOT,
                    )
                    assert watcher.stdin is not None and watcher.stdout is not None
                    give_up = time.monotonic() + 10
                    while True:  # probe writes until the watcher's subscription took
                        first += set_rate(cluster.frontend, 0.0, 10**9 + first)[1]
                        if select.select([watcher.stdout], [], [], 0.1)[0]:
                            assert watcher.stdout.readline().strip() == "ready"
                            break
                        if time.monotonic() > give_up:
                            raise Failed("the watcher's subscription never took")
                rate, count = set_rate(cluster.frontend, seconds, first)
                first += count
                found[mode] = rate
                if watcher is not None:
                    assert watcher.stdin is not None and watcher.stdout is not None
                    time.sleep(0.5)  # the last events on their way (not a readiness wait)
                    watcher.stdin.close()
                    report = json.loads(watcher.stdout.readline())
                    watcher.wait(timeout=10)
                    found["watcher_events"] = report["events"]
                    found["watcher_missed"] = report["missed"]
                    found["sets_with"] = count
            ratio = found["with"] / found["without"]
            ratios.append(ratio)
            rows.append(found)
            say(
                f"  round {round_ + 1}: {found['without']:.0f} SET/s without a watcher, "
                f"{found['with']:.0f} with ({ratio:.2f}x); the watcher got "
                f"{found['watcher_events']:.0f} events for {found['sets_with']:.0f} SETs, "
                f"{found['watcher_missed']:.0f} reported missed"
            )
    return {"ratio": statistics.median(ratios), "rounds": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="each throughput round")
    parser.add_argument("--rounds", type=int, default=4, help="pairs of throughput rounds")
    parser.add_argument("--ci", action="store_true", help=f"{CI_KEYS} keys, 1 s, 2 rounds")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--only", choices=("expiry", "throughput"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--receive", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive:
        return receive_all(args.receive)
    if args.ci:
        args.keys, args.seconds, args.rounds = CI_KEYS, 1.0, 2

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    results: dict[str, object] = {}
    try:
        if args.only in (None, "expiry"):
            say(f"expiry events of {args.keys} keys due in one second (zkv)")
            results["zkv_expiry"] = zkv_wave(args.keys, say).summary()
            say(f"  {results['zkv_expiry']}")
            if not args.no_redis and missing("redis-server") is None:
                with tempfile.TemporaryDirectory(prefix="zkv-events-redis-") as tmp:
                    results["redis_expiry"] = redis_wave(args.keys, Path(tmp), say).summary()
                say(f"  {results['redis_expiry']}")
        if args.only in (None, "throughput"):
            say(f"pipelined SET with and without a watcher, {args.rounds} x {args.seconds} s")
            results["watcher"] = with_and_without(args.seconds, args.rounds, say)
            say(f"  median ratio {results['watcher']['ratio']:.2f}x (floor 0.9x)")  # type: ignore[index]
    except Failed as exc:
        say(f"failed: {exc}")
        return 1
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
