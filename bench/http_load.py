"""HTTP load: wrk with bench/wrk/zkv.lua when installed, else a Python fallback generator.

Both build the same requests (see :func:`request_for` and the Lua script) and report the same
:class:`bench.stats.LoadResult`, whose ``generator`` says which produced a row: ``wrk`` or
``python-http``. The fallback is threads with one keep-alive ``http.client`` connection each; in
CPython they share one core's worth of interpreter, so it saturates long before wrk does and its
rows are not comparable with wrk's (the table marks them).

Errors are what wrk counts as errors (connect, read, write, timeout, and HTTP statuses >= 400),
and the same in the fallback (exceptions and statuses >= 400). A seed ``/get`` of a missing key
answers 200 ``{"error": "Data not found"}`` and is not an error; the benchmark preloads every key
so that it does not happen.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.stats import LoadResult, summarize

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "zkv.lua"
WRK_MARKER = "ZKV_BENCH "
WRK_TIMEOUT = "5s"  # wrk's per-request timeout, counted as an error
HTTP_TIMEOUT_S = 5.0  # the fallback's per-request timeout
EXTRA_WAIT_S = 30.0  # how much longer than its duration a wrk run may take before it is killed
MAX_OPS_PER_CONNECTION = 5_000_000  # the fallback's bound in count, whatever the duration


@dataclass(frozen=True, slots=True)
class HttpWorkload:
    """What to send; the fields are the Lua script's arguments, in its order.

    Attributes:
        mode: ``seed``, ``rest-put``, ``rest-get`` or ``webdis-get``.
        set_percent: seed mode: the share of ``/set`` requests, in percent.
        key_prefix: keys are ``key_prefix + str(n)``, or ``key_prefix + "hot"``.
        key_count: the uniform key space; 0 for the single hot key.
        value_bytes: size of written values.
        ttl_s: timeout of written keys.
    """

    mode: str
    set_percent: int = 0
    key_prefix: str = "bench:"
    key_count: int = 0
    value_bytes: int = 16
    ttl_s: int = 3600

    def script_args(self) -> list[str]:
        """The arguments of bench/wrk/zkv.lua."""
        return [
            self.mode,
            str(self.set_percent),
            self.key_prefix,
            str(self.key_count),
            str(self.value_bytes),
            str(self.ttl_s),
        ]


def request_for(workload: HttpWorkload, rng: random.Random) -> tuple[str, str, bytes | None]:
    """The next ``(method, path, body)``, exactly as the Lua script's ``request()`` makes it."""
    if workload.key_count == 0:
        key = f"{workload.key_prefix}hot"
    else:
        key = f"{workload.key_prefix}{rng.randrange(workload.key_count)}"
    value = "v" * workload.value_bytes
    match workload.mode:
        case "seed":
            if workload.set_percent > 0 and rng.randint(1, 100) <= workload.set_percent:
                return "GET", f"/set?key={key}&value={value}&timeout={workload.ttl_s}", None
            return "GET", f"/get?key={key}", None
        case "rest-put":
            return "PUT", f"/v1/keys/{key}?ttl={workload.ttl_s}", value.encode()
        case "rest-get":
            return "GET", f"/v1/keys/{key}", None
        case "webdis-get":
            return "GET", f"/GET/{key}", None
    raise ValueError(f"unknown HTTP mode {workload.mode!r}")


# --- wrk --------------------------------------------------------------------------------------


def wrk_path() -> str | None:
    """The wrk binary, or None when it is not installed."""
    return shutil.which("wrk")


def wrk_command(
    wrk: str, base_url: str, workload: HttpWorkload, connections: int, duration_s: float
) -> list[str]:
    """wrk's command line. Its duration is whole seconds (at least 1); threads are at most one
    per core and never more than connections."""
    threads = max(1, min(connections, os.cpu_count() or 1))
    seconds = max(1, round(duration_s))
    return [
        wrk,
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        f"--timeout={WRK_TIMEOUT}",
        f"--script={WRK_SCRIPT}",
        base_url,
        "--",
        *workload.script_args(),
    ]


def parse_wrk_output(text: str) -> LoadResult:
    """The result of one wrk run, from the ``ZKV_BENCH {...}`` line our ``done()`` prints.

    Raises:
        ValueError: the line is missing or is not the JSON the script writes.
    """
    for line in text.splitlines():
        if line.startswith(WRK_MARKER):
            summary = json.loads(line[len(WRK_MARKER) :])
            break
    else:
        raise ValueError(f"no {WRK_MARKER.strip()} line in wrk's output:\n{text[-2000:]}")
    errors = summary["errors"]
    error_count = sum(int(errors[kind]) for kind in errors)
    # wrk counts a request that got an error status in "requests" too; timeouts and socket
    # errors it does not.
    requests = int(summary["requests"])
    ok = max(0, requests - int(errors.get("status", 0)))
    elapsed_s = int(summary["duration_us"]) / 1e6
    return LoadResult(
        generator="wrk",
        ops=ok,
        errors=error_count,
        elapsed_s=elapsed_s,
        p50_ms=float(summary["p50_us"]) / 1000,
        p99_ms=float(summary["p99_us"]) / 1000,
        p999_ms=float(summary["p999_us"]) / 1000,
        count=requests,
        details={"wrk_errors": {k: int(v) for k, v in errors.items() if int(v)}}
        if error_count
        else {},
    )


def run_wrk(
    wrk: str, base_url: str, workload: HttpWorkload, connections: int, duration_s: float
) -> LoadResult:
    """Run wrk once and parse its summary."""
    command = wrk_command(wrk, base_url, workload, connections, duration_s)
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=max(1, round(duration_s)) + EXTRA_WAIT_S,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"wrk exited {completed.returncode}: {completed.stderr.strip()[-500:]}")
    return parse_wrk_output(completed.stdout)


# --- the Python fallback ----------------------------------------------------------------------


def run_python(
    host: str, port: int, workload: HttpWorkload, connections: int, duration_s: float
) -> LoadResult:
    """``connections`` threads, each looping over one keep-alive connection until the deadline."""
    latencies: list[list[int]] = [[] for _ in range(connections)]
    errors: list[Counter[str]] = [Counter() for _ in range(connections)]
    start_line = threading.Barrier(connections + 1)
    deadline_box: list[int] = []

    def loop(index: int) -> None:
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        mine, failed = latencies[index], errors[index]
        connection = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT_S)
        try:
            start_line.wait()
            deadline = deadline_box[0]
            while len(mine) < MAX_OPS_PER_CONNECTION:
                method, path, body = request_for(workload, rng)
                began = time.perf_counter_ns()
                if began >= deadline:
                    break
                try:
                    connection.request(method, path, body=body)
                    response = connection.getresponse()
                    response.read()
                    if response.status >= 400:
                        failed[f"status {response.status}"] += 1
                except (OSError, http.client.HTTPException) as exc:
                    failed[type(exc).__name__] += 1
                    connection.close()  # reconnects on the next request
                mine.append(time.perf_counter_ns() - began)
        finally:
            connection.close()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    start = time.perf_counter_ns()
    deadline_box.append(start + int(duration_s * 1e9))
    start_line.wait()
    for thread in threads:
        thread.join(timeout=duration_s + HTTP_TIMEOUT_S + 5)
    elapsed_s = (time.perf_counter_ns() - start) / 1e9
    all_latencies = [latency for per_thread in latencies for latency in per_thread]
    all_errors: Counter[str] = sum(errors, Counter())
    error_count = sum(all_errors.values())
    return summarize(
        "python-http",
        all_latencies,
        ops=len(all_latencies) - error_count,
        errors=error_count,
        elapsed_s=max(elapsed_s, 1e-9),
        details={"error_kinds": dict(all_errors)} if all_errors else {},
    )
