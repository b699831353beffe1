"""Running the selected scenarios: target by target, one line of progress each.

For each target in order (bench/scenarios.py ``TARGETS``) that has selected scenarios: say why
it is skipped if it cannot run here (a peer not installed, no cluster of its own with
``--frontend``), else start it, run its scenarios one after the other, stop it. A scenario that
fails is recorded with its error and the run goes on; a target that does not start fails its
scenarios the same way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench import client_pipeline, expiry_wave, http_load, memory, peers, zmq_load
from bench.report import Outcome, format_ms, format_ops
from bench.scenarios import LARGE_BYTES, MIX_SET_PERCENT, TARGETS, Scenario, run_order
from bench.stats import LoadResult
from bench.targets import LARGE_KEYS, Options, Target, large_keys, open_target, small_keys
from bench.targets import unavailable as target_unavailable

# redis-benchmark runs are sized to last this share of --duration: Redis's numbers settle fast,
# and the whole default run has to stay under two minutes.
REDIS_SHARE = 0.25
# Except redis-benchmark -c 50: the denominator of the pipelining floor (client.pipeline.*), which
# a short run on a shared machine can halve with one scheduling hiccup.
REDIS_C50_SHARE = 0.5
WARMUP_S = 1.0  # HTTP warm-up before a gateway's first scenario (not recorded)
WARMUP_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How long each scenario runs, and with which HTTP generator."""

    duration_s: float
    wrk: str | None  # the wrk binary, None: the Python fallback


Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_all(
    scenarios: Sequence[Scenario],
    options: Options,
    settings: RunSettings,
    progress: Progress = stderr_progress,
) -> list[Outcome]:
    """Run every scenario (in :func:`run_order`); returns one outcome per scenario, in the
    given order."""
    outcomes = {scenario.id: Outcome(scenario) for scenario in scenarios}
    ordered = run_order(scenarios)
    total = len(scenarios)
    done = 0
    for target in TARGETS:
        rows = [scenario for scenario in ordered if scenario.target == target]
        if not rows:
            continue
        reason = target_unavailable(target, options)
        if reason is not None:
            progress(f"{target}: {reason}")
            for row in rows:
                outcomes[row.id].skipped = reason
                done += 1
            continue
        external = target == "zkv" and options.external
        progress(f"{target}: {'using the running cluster' if external else 'starting'}")
        began = time.monotonic()
        try:
            with open_target(target, rows, options) as running:
                progress(f"{target}: ready in {time.monotonic() - began:.1f} s")
                warmed = False
                for row in rows:
                    done += 1
                    outcome = outcomes[row.id]
                    outcome.settings = dict(running.settings)
                    missing = _missing_address(row, running)
                    if missing is not None:
                        outcome.skipped = missing
                        progress(progress_line(done, total, outcome))
                        continue
                    if row.load == "http" and not warmed:
                        _warm_up(running, settings)
                        warmed = True
                    try:
                        outcome.result = run_one(row, running, options, settings)
                    except Exception as exc:
                        outcome.skipped = f"failed: {type(exc).__name__}: {exc}"
                    progress(progress_line(done, total, outcome))
        except Exception as exc:
            reason = f"failed: {target} did not run: {exc}"
            progress(reason)
            for row in rows:
                if outcomes[row.id].result is None and outcomes[row.id].skipped is None:
                    outcomes[row.id].skipped = reason.splitlines()[0]
                    done += 1
    return [outcomes[scenario.id] for scenario in scenarios]


def _missing_address(scenario: Scenario, target: Target) -> str | None:
    """Why a scenario cannot run on a running cluster given by only one of the two flags."""
    if scenario.load == "http" and target.http is None:
        return "skipped: no --http given for the HTTP scenarios"
    if scenario.load in ("client", "client-pipeline", "pipeline") and target.frontend is None:
        return "skipped: no --frontend given for the ZeroMQ scenarios"
    return None


def progress_line(index: int, total: int, outcome: Outcome) -> str:
    """``[ 3/40] http.get.16B.uniform.c64  wrk  5,321 ops/s  p50 11.2 ms  p99 ...``."""
    head = f"[{index:>2}/{total}] {outcome.scenario.id:<36}"
    result = outcome.result
    if result is None:
        return f"{head} {outcome.skipped}"
    errors = "n/a" if result.errors is None else str(result.errors)
    return (
        f"{head} {result.generator:<15} {format_ops(result.ops_per_s):>9} ops/s  "
        f"p50 {format_ms(result.p50_ms)} ms  p99 {format_ms(result.p99_ms)} ms  errors {errors}"
    )


def run_one(
    scenario: Scenario, target: Target, options: Options, settings: RunSettings
) -> LoadResult:
    """Run one scenario's load against a running target."""
    duration_s = settings.duration_s
    match scenario.load:
        case "http":
            assert target.http is not None, "an HTTP target has an address"
            host, port = target.http
            workload = http_workload(scenario, options.keys)
            if settings.wrk is not None:
                url = f"http://{host}:{port}"
                return http_load.run_wrk(
                    settings.wrk, url, workload, scenario.connections, duration_s
                )
            return http_load.run_python(host, port, workload, scenario.connections, duration_s)
        case "client":
            assert target.frontend is not None, "a ZeroMQ target has an endpoint"
            return zmq_load.run_client(
                target.frontend, zmq_workload(scenario, options.keys), duration_s
            )
        case "client-pipeline":
            assert target.frontend is not None, "a ZeroMQ target has an endpoint"
            workload = zmq_workload(scenario, options.keys)
            return client_pipeline.run_client_pipeline(
                target.frontend,
                workload.op,
                workload.keys,
                workload.value,
                scenario.connections,
                duration_s,
            )
        case "memory":
            return memory.scenario_result(scenario.op, options.full_keys)
        case "interleaved" | "paired" | "issue12":
            if scenario.id not in target.measured:
                raise RuntimeError(f"the {scenario.load} run measured no {scenario.id}")
            return target.measured[scenario.id]
        case "expiry-wave":
            assert target.expiry is not None, "the expiry-wave target ran the wave"
            return expiry_wave.phase_result(target.expiry, scenario.op)
        case "pipeline":
            assert target.frontend is not None, "a ZeroMQ target has an endpoint"
            return zmq_load.run_pipeline(
                target.frontend,
                zmq_workload(scenario, options.keys),
                scenario.connections,
                scenario.depth,
                duration_s,
            )
        case "redis-benchmark":
            assert target.redis_port is not None, "a Redis target has a port"
            return peers.run_redis_benchmark(
                target.redis_port,
                scenario.op,
                scenario.connections,
                scenario.depth,
                scenario.value_bytes,
                duration_s * (REDIS_C50_SHARE if scenario.connections == 50 else REDIS_SHARE),
            )
    raise ValueError(f"unknown load {scenario.load!r}")


def http_workload(scenario: Scenario, keys: int) -> http_load.HttpWorkload:
    """The HTTP requests of a scenario (the arguments of bench/wrk/zkv.lua)."""
    large = scenario.value_bytes == LARGE_BYTES
    key_count = 0 if scenario.hot else (LARGE_KEYS if large else keys)
    set_percent = {"get": 0, "set": 100, "mix": MIX_SET_PERCENT}.get(scenario.op, 0)
    mode = "seed" if scenario.op in ("get", "set", "mix") else scenario.op
    return http_load.HttpWorkload(
        mode=mode,
        set_percent=set_percent,
        key_prefix="big:" if large else "bench:",
        key_count=key_count,
        value_bytes=scenario.value_bytes,
    )


def zmq_workload(scenario: Scenario, keys: int) -> zmq_load.Workload:
    """The requests of a client or pipeline scenario."""
    space = large_keys() if scenario.value_bytes == LARGE_BYTES else small_keys(keys)
    chosen = space[-1:] if scenario.hot else space[:-1]  # the hot key is the last one
    return zmq_load.Workload(scenario.op, chosen, b"v" * scenario.value_bytes)


def _warm_up(target: Target, settings: RunSettings) -> None:
    """A second of seed GETs, so every gateway thread has its socket before the clock runs."""
    if target.http is None:
        return
    host, port = target.http
    warm = http_load.HttpWorkload(mode="seed", key_prefix="bench:", key_count=1)
    if target.redis_port is not None:  # webdis
        warm = http_load.HttpWorkload(mode="webdis-get", key_prefix="bench:", key_count=1)
    try:
        if settings.wrk is not None:
            http_load.run_wrk(
                settings.wrk, f"http://{host}:{port}", warm, WARMUP_CONNECTIONS, WARMUP_S
            )
        else:
            http_load.run_python(host, port, warm, WARMUP_CONNECTIONS, WARMUP_S)
    except Exception as exc:  # the scenarios themselves will report what is wrong
        stderr_progress(f"warm-up failed: {exc}")
