"""SET throughput of one worker process under each fsync policy (and in memory).

Usage: ``.venv/bin/python bench/fsync.py [--requests N] [--in-flight K] [--value-bytes B]``

For each policy this starts ``python -m workers --processes 1`` in a fresh data directory,
stands in for the broker with a ROUTER socket in this process, assigns shard 0, then keeps K
SET dispatches in flight (new ones are sent as replies come back) until N replies arrived.
Many requests in flight is what lets group commit work: the worker receives up to 256 messages
per pass, applies them, appends them with one write and fsyncs once for all of them.

The driver encodes every request before the clock starts, so it measures the worker, not the
driver; the worker runs in its own process, so the two do not share a GIL. Numbers are from
one run on one machine: compare ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zkv.protocol import (  # noqa: E402 - after the path set-up, to run from anywhere
    Assign,
    Heartbeat,
    Kind,
    Ready,
    Reply,
    Request,
    Status,
    decode_from_worker,
    dispatch_frames,
    encode_control,
    encode_request,
)

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
REPLY_TIMEOUT_S = 10.0
START_TIMEOUT_S = 20.0
MODES = ["always", "everysec", "no", "memory"]


def recv(socket: zmq.Socket, timeout_s: float) -> tuple[bytes, object]:
    """The next non-heartbeat message, or fail after ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    while (remaining_s := deadline_s - time.monotonic()) > 0:
        if not socket.poll(int(remaining_s * 1000) + 1):
            break
        identity, *frames = socket.recv_multipart()
        message = decode_from_worker(frames)
        if not isinstance(message, Heartbeat):
            return identity, message
    raise SystemExit(f"no message from the worker within {timeout_s} s")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), or NaN elsewhere.

    On a shared machine wall-clock throughput depends on what else runs; CPU time per request
    hardly does, so both are reported.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def run(mode: str, requests: int, in_flight: int, value_bytes: int) -> dict[str, float]:
    """Throughput of one worker in ``mode``; returns requests/s and the log's size."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.SNDHWM, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="zkv-bench-") as data_dir:
        storage = ["--in-memory"] if mode == "memory" else ["--data-dir", data_dir, "--fsync", mode]
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers",
                "--processes",
                "1",
                "--backend",
                f"tcp://127.0.0.1:{port}",
                "--heartbeat-liveness",
                "1000",
                *storage,
            ],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            identity, message = recv(router, START_TIMEOUT_S)
            if not isinstance(message, Ready):
                raise SystemExit(f"expected READY, got {message}")
            router.send_multipart([identity, *encode_control(Assign(0, 1, 1))])
            value = os.urandom(value_bytes)
            token = 1
            frames = []
            for i in range(requests + 1):
                token += 1
                request = Request(Kind.SET, i + 1, b"key-%d" % (i % 10_000), value, 600_000)
                frames.append([identity, *dispatch_frames(token, encode_request(request))])
            # The first request waits for the takeover; the clock starts at its reply.
            router.send_multipart(frames[0])
            recv(router, START_TIMEOUT_S)
            sent = 1
            received = 0
            started_cpu_s = cpu_s(worker.pid)
            started_s = time.perf_counter()
            while sent <= min(in_flight, requests):
                router.send_multipart(frames[sent])
                sent += 1
            while received < requests:
                _, reply = recv(router, REPLY_TIMEOUT_S)
                if not isinstance(reply, Reply) or reply.status != Status.OK:
                    raise SystemExit(f"unexpected answer: {reply}")
                received += 1
                if sent <= requests:
                    router.send_multipart(frames[sent])
                    sent += 1
            elapsed_s = time.perf_counter() - started_s
            worker_cpu_s = cpu_s(worker.pid) - started_cpu_s
            log_path = Path(data_dir) / "shard-0" / "log"
            log_bytes = log_path.stat().st_size if log_path.exists() else 0
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            router.close(linger=0)
            context.term()
    return {
        "per_s": requests / elapsed_s,
        "cpu_us": worker_cpu_s / requests * 1e6,
        "log_bytes": log_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="SETs timed per mode")
    parser.add_argument("--in-flight", type=int, default=256, help="requests outstanding")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes per value")
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of {','.join(MODES)}")
    args = parser.parse_args()
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run(mode, args.requests, args.in_flight, args.value_bytes)
    baseline = results.get("no", next(iter(results.values())))["per_s"]
    print(
        f"{args.requests} SETs of {args.value_bytes}-byte values, {args.in_flight} in flight, "
        f"one worker process"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'mode':<10} {'SET/s':>10} {'vs no':>7} {'worker CPU/SET':>15} {'log bytes':>12}")
    for mode, result in results.items():
        print(
            f"{mode:<10} {result['per_s']:>10,.0f} {result['per_s'] / baseline:>7.2f} "
            f"{result['cpu_us']:>12.1f} us {result['log_bytes']:>12,}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
