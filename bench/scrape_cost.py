"""What a Prometheus scrape once a second costs the HTTP benchmark (issue 13, docs/operations.md).

One cluster (2 shards, ZKV_FSYNC=always, the gateway with its production defaults) runs for
the whole measurement, loaded by wrk with the ``http.mix.16B.uniform.c64`` workload (90% /get,
10% /set, 64 connections) in turns of ``turn_s``: a turn with a scraper (a thread fetching
``GET /metrics`` once a second, as Prometheus would, on its own connection) and a turn
without, ROUNDS rounds, the order alternating from round to round so that neither always
runs first (this shared machine drifts by more than the effect within a minute; see
bench/paired.py). The result is the median over rounds of (ops/s with) / (ops/s without), and
every turn is printed.

Because that ratio is noisy on a shared machine (single rounds range from 0.7 to 1.5), the
cost is also measured directly, in CPU time: the cluster's processes (every process of each
service's session, read from /proc) idle for CPU_PHASE_S without scrapes and for as long with
SCRAPES_PER_S scrapes a second; the difference per scrape is what one scrape costs the whole
cluster, and against the CPU the cluster spends per second under the benchmark's load it is the
share of throughput that one scrape a second takes. Run it as
``.venv/bin/python -m bench.scrape_cost [turn_s] [rounds]``.
"""

from __future__ import annotations

import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

from bench import http_load
from bench.scenarios import MIX_SET_PERCENT
from bench.targets import _zkv_cluster
from gateway.metrics import HttpStats

ROUNDS = 5  # an odd count: the median is one round's ratio
TURN_S = 10.0
# Prometheus's usual 15 s scrapes would cost 15 times less; ZKV_SCRAPE_INTERVAL overrides it
# (a shorter one makes the effect, if any, easier to see above the noise).
SCRAPE_INTERVAL_S = float(os.environ.get("ZKV_SCRAPE_INTERVAL", "1.0"))
SCRAPE_PATH = os.environ.get("ZKV_SCRAPE_PATH", "/metrics")  # another route, for comparison
CONNECTIONS = 64
KEYS = 10_000
CPU_PHASE_S = 10.0
SCRAPES_PER_S = 10  # in the CPU phase: ten times Prometheus's densest usual rate, for precision
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cluster_cpu_s(sessions: set[int]) -> float:
    """User + system CPU seconds of every live process in ``sessions`` (the cluster's services
    run each in its own session, so their forked children are counted too)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) in sessions:  # session id (field 6 of stat, 4th after the name)
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def cpu_rate(sessions: set[int], seconds: float, scrape_port: int | None) -> tuple[float, int]:
    """Cluster CPU seconds per second over ``seconds``, scraping SCRAPES_PER_S times a second
    if ``scrape_port``; and how many scrapes were made."""
    before = cluster_cpu_s(sessions)
    started = time.monotonic()
    scrapes = 0
    while time.monotonic() - started < seconds:
        if scrape_port is not None:
            connection = http.client.HTTPConnection("127.0.0.1", scrape_port, timeout=5)
            connection.request("GET", "/metrics")
            connection.getresponse().read()
            connection.close()
            scrapes += 1
        time.sleep(1 / SCRAPES_PER_S)
    return (cluster_cpu_s(sessions) - before) / (time.monotonic() - started), scrapes


def scraper(port: int, stop: threading.Event, sizes: list[int]) -> None:
    """GET /metrics once a second until ``stop``; each answer's size goes in ``sizes``."""
    while not stop.is_set():
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", SCRAPE_PATH)
            response = connection.getresponse()
            sizes.append(len(response.read()) if response.status == 200 else -response.status)
        finally:
            connection.close()
        stop.wait(max(0.0, SCRAPE_INTERVAL_S - (time.monotonic() - started)))


def main(argv: list[str]) -> int:
    turn_s = float(argv[0]) if argv else TURN_S
    rounds = int(argv[1]) if len(argv) > 1 else ROUNDS
    wrk = http_load.wrk_path()
    if wrk is None:
        print("wrk is not installed", file=sys.stderr)
        return 1
    workload = http_load.HttpWorkload("seed", set_percent=MIX_SET_PERCENT, key_count=KEYS)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="zkv-scrape-") as tmp:
        with _zkv_cluster(Path(tmp), shards=2, fsync="always", gateway=True) as cluster:
            url = f"http://127.0.0.1:{cluster.http_port}"
            for i in range(KEYS):  # every key present, as the benchmark preloads them
                cluster.http("GET", f"/set?key=bench:{i}&value=x&timeout=3600")
            http_load.run_wrk(wrk, url, workload, CONNECTIONS, 2.0)  # warm-up, not recorded
            sessions = {process.pid for process in cluster._all}
            idle, _ = cpu_rate(sessions, CPU_PHASE_S, None)
            scraping, scrapes = cpu_rate(sessions, CPU_PHASE_S, cluster.http_port)
            per_scrape_s = (scraping - idle) * CPU_PHASE_S / max(1, scrapes)
            before = cluster_cpu_s(sessions)
            loaded = http_load.run_wrk(wrk, url, workload, CONNECTIONS, turn_s)
            busy = (cluster_cpu_s(sessions) - before) / loaded.elapsed_s
            print(
                f"CPU: idle {idle:.4f} s/s, scraping {SCRAPES_PER_S}/s {scraping:.4f} s/s: "
                f"{per_scrape_s * 1000:.2f} ms of cluster CPU per scrape; under load "
                f"{busy:.3f} s/s for {loaded.ops / loaded.elapsed_s:,.0f} ops/s; one scrape a "
                f"second takes {per_scrape_s / busy:.4%} of that"
            )
            # And the counting itself, on the gateway's hot path: HttpStats.record per request.
            stats = HttpStats()
            record_s = (
                min(
                    timeit.repeat(
                        lambda: stats.record(b"GET", b"/get?key=bench:1234", 200, 0.003),
                        number=100_000,
                        repeat=5,
                    )
                )
                / 100_000
            )
            per_request_s = busy / (loaded.ops / loaded.elapsed_s)
            print(
                f"counting: HttpStats.record {record_s * 1e6:.2f} us a request, against "
                f"{per_request_s * 1e6:.0f} us of cluster CPU a request: "
                f"{record_s / per_request_s:.3%}"
            )
            for round_ in range(rounds):
                results = {}
                for scraped in (False, True) if round_ % 2 == 0 else (True, False):
                    stop = threading.Event()
                    sizes: list[int] = []
                    thread = threading.Thread(
                        target=scraper, args=(cluster.http_port, stop, sizes), daemon=True
                    )
                    if scraped:
                        thread.start()
                    result = http_load.run_wrk(wrk, url, workload, CONNECTIONS, turn_s)
                    stop.set()
                    if scraped:
                        thread.join()
                    rate = result.ops / result.elapsed_s
                    results[scraped] = rate
                    print(
                        f"round {round_} {'with' if scraped else 'without'} scraper: "
                        f"{rate:,.0f} ops/s, p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, "
                        f"errors {result.errors}"
                        + (
                            f", {len(sizes)} scrapes of {max(sizes, default=0)} bytes"
                            if scraped
                            else ""
                        )
                    )
                ratios.append(results[True] / results[False])
                print(f"round {round_} ratio with/without: {ratios[-1]:.4f}", flush=True)
    print(f"median ratio over {rounds} rounds: {statistics.median(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
