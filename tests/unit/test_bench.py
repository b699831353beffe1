"""The pure parts of the benchmark: percentiles, ratios, the table, parsing wrk and redis-benchmark.

No load and no timing here: speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench import expiry_wave, paired, report, targets
from bench.client_pipeline import build_ops
from bench.http_load import HttpWorkload, parse_wrk_output, request_for, wrk_command
from bench.peers import (
    parse_redis_csv,
    redis_benchmark_command,
    redis_benchmark_requests,
    resp_command,
    webdis_config,
)
from bench.report import (
    Outcome,
    cpu_model,
    format_ms,
    format_ratio,
    format_table,
    ratio,
    ratios_of,
    table_rows,
)
from bench.runner import http_workload, progress_line, zmq_workload
from bench.scenarios import (
    INTERLEAVED_CHAINS,
    TARGETS,
    Peer,
    Scenario,
    all_scenarios,
    run_order,
    select,
    size_label,
)
from bench.stats import LoadResult, percentile, summarize
from zkv import defaults
from zkv.protocol import Kind

pytestmark = pytest.mark.unit


def result(ops_per_s: float, p50_ms: float | None = 1.0, generator: str = "wrk") -> LoadResult:
    return LoadResult(
        generator=generator,
        ops=int(ops_per_s),
        errors=0,
        elapsed_s=1.0,
        p50_ms=p50_ms,
        p99_ms=2.0,
        p999_ms=3.0,
        count=int(ops_per_s),
    )


# --- percentiles ------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 50) == 50
    assert percentile(samples, 99) == 99
    assert percentile(samples, 99.9) == 100
    assert percentile(samples, 100) == 100
    assert percentile(samples, 0.5) == 1


def test_percentile_of_a_thousand_samples_does_not_round_up_by_float_error() -> None:
    samples = list(range(1, 1001))
    assert percentile(samples, 99.9) == 999  # 99.9 / 100 * 1000 is 999.0000000000001
    assert percentile(samples, 99) == 990


def test_percentile_of_one_sample_is_that_sample() -> None:
    assert percentile([7.5], 50) == 7.5
    assert percentile([7.5], 99.9) == 7.5


@pytest.mark.parametrize("p", [0, -1, 100.1])
def test_percentile_refuses_out_of_range(p: float) -> None:
    with pytest.raises(ValueError):
        percentile([1, 2, 3], p)


def test_percentile_refuses_no_samples() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_converts_nanoseconds_and_sorts() -> None:
    latencies = [3_000_000, 1_000_000, 2_000_000, 4_000_000]
    summary = summarize("zkv.Client", latencies, ops=4, errors=0, elapsed_s=2.0)
    assert (summary.p50_ms, summary.p99_ms, summary.p999_ms) == (2.0, 4.0, 4.0)
    assert summary.ops_per_s == 2.0
    assert summary.count == 4


def test_summarize_without_samples_has_no_percentiles() -> None:
    summary = summarize("dealer-pipeline", [], ops=0, errors=3, elapsed_s=1.0)
    assert summary.p50_ms is None and summary.p999_ms is None
    assert summary.ops_per_s == 0.0


# --- ratios and the table ---------------------------------------------------------------------


def test_ratio_of_throughput_and_of_median_latency() -> None:
    zkv, redis = result(1_000, p50_ms=2.0), result(40_000, p50_ms=0.5)
    assert ratio(zkv, redis, "ops") == pytest.approx(0.025)
    assert ratio(zkv, redis, "p50") == pytest.approx(4.0)


def test_ratio_of_tail_latency_and_of_memory_per_key() -> None:
    zkv, redis = result(1_000), result(1_000)
    zkv.p99_ms, redis.p99_ms = 3.0, 2.0
    zkv.bytes_per_key, redis.bytes_per_key = 150.0, 100.0
    assert ratio(zkv, redis, "p99") == 1.5
    assert ratio(zkv, redis, "bytes") == 1.5
    assert ratio(result(1_000), result(1_000), "bytes") is None  # no memory measured


def test_ratio_is_none_when_the_peer_has_nothing() -> None:
    assert ratio(result(10), result(0), "ops") is None
    assert ratio(result(10, p50_ms=None), result(10), "p50") is None
    with pytest.raises(ValueError):
        ratio(result(1), result(1), "p90")


def test_paired_ratio_is_the_median_of_the_per_round_ratios() -> None:
    zkv, redis = result(100), result(100)
    zkv.round_ops_per_s, redis.round_ops_per_s = [100.0, 300.0, 90.0], [50.0, 100.0, 100.0]
    assert report.round_ratios(zkv, redis) == [2.0, 3.0, 0.9]
    assert ratio(zkv, redis, "paired") == 2.0  # the medians' ratio would be 100 / 100
    redis.round_ops_per_s = [50.0, 0.0, 100.0]  # a round where the peer did nothing
    assert ratio(zkv, redis, "paired") == pytest.approx((2.0 + 0.9) / 2)
    redis.round_ops_per_s = [50.0]  # not the same rounds
    assert report.round_ratios(zkv, redis) == [] and ratio(zkv, redis, "paired") is None
    assert ratio(result(10), result(10), "paired") is None  # not paired rows


def test_ratios_only_against_peers_of_the_same_run() -> None:
    row = Scenario(
        "client.get.16B.c1",
        "zkv",
        "client",
        "get",
        peers=(Peer("redis", "redis.get.16B.c1"), Peer("bare p50", "bare.tcp.get.16B.c1", "p50")),
    )
    peer = Scenario("redis.get.16B.c1", "redis", "redis-benchmark", "get")
    outcomes = [Outcome(row, result(2_000, p50_ms=0.5)), Outcome(peer, result(40_000))]
    by_id = {o.scenario.id: o for o in outcomes}
    found = ratios_of(outcomes[0], by_id)
    assert [(r.label, r.value) for r in found] == [
        ("redis", pytest.approx(0.05)),
        ("bare p50", None),
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.04321, "0.043x"), (1.0, "1x"), (1.54, "1.5x"), (12.4, "12x"), (250.2, "250x")],
)
def test_format_ratio(value: float, text: str) -> None:
    assert format_ratio(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0.0234, "0.023"), (1.234, "1.23"), (12.34, "12.3"), (1234.5, "1234")],
)
def test_format_ms(value: float | None, text: str) -> None:
    assert format_ms(value) == text


def test_table_has_a_row_per_measured_scenario_and_ratios_in_one_column() -> None:
    zkv = Scenario(
        "http.get.16B.uniform.c64",
        "zkv",
        "http",
        "get",
        connections=64,
        peers=(Peer("redis", "redis.get.16B.c64"), Peer("webdis", "webdis.get.16B.uniform.c64")),
    )
    redis = Scenario("redis.get.16B.c64", "redis", "redis-benchmark", "get")
    webdis = Scenario("webdis.get.16B.uniform.c64", "webdis", "http", "webdis-get")
    outcomes = [
        Outcome(zkv, result(5_000)),
        Outcome(redis, result(100_000, generator="redis-benchmark")),
        Outcome(webdis, skipped="skipped: webdis not installed (apt-get install webdis)"),
    ]
    rows = table_rows(outcomes)
    assert [row["scenario"] for row in rows] == ["http.get.16B.uniform.c64", "redis.get.16B.c64"]
    assert rows[0]["vs peers"] == "redis 0.05x"  # webdis did not run: no ratio, no noise
    assert rows[0]["ops/s"] == "5,000"
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| scenario ")
    assert set(lines[1]) <= {"|", "-", ":"}
    assert len({len(line) for line in lines}) == 1  # padded to equal widths
    assert "redis 0.05x" in lines[2]


def test_notes_column_only_when_a_row_has_notes() -> None:
    plain = Scenario("redis.get.16B.c1", "redis", "redis-benchmark", "get")
    rows = table_rows([Outcome(plain, result(10))])
    assert "notes" not in format_table(rows).splitlines()[0]
    noted = result(10)
    noted.notes = "64 B/key used_memory"
    memory = Scenario("memory.redis.16B.ttl", "memory", "memory", "redis")
    text = format_table(table_rows([Outcome(plain, result(10)), Outcome(memory, noted)]))
    assert text.splitlines()[0].split("|")[-2].strip() == "notes"
    assert "64 B/key used_memory" in text.splitlines()[3]
    assert len({len(line) for line in text.splitlines()}) == 1


def test_expiry_wave_phases_become_rows_with_the_floors_in_the_notes() -> None:
    phase = {"p50": 0.3, "p99": 1.0, "p999": 2.0, "worst_window_p99": 1.2, "gets": 500}
    found = {
        "keys": 1000,
        "waves": 1,
        "removed": 1000,
        "late_ms": 12,
        "gone_ok": True,
        "floor_ok": True,
        "phases": {
            "baseline": {**phase, "windows": 10, "cpu": ""},
            "wave": {**phase, "p99": 1.5, "worst_window_p99": 1.8, "windows": 5, "cpu": ""},
        },
    }
    wave = expiry_wave.phase_result(found, "wave")
    assert (wave.p50_ms, wave.p99_ms, wave.ops_per_s) == (0.3, 1.5, 1000.0)
    assert wave.notes.startswith("worst 100 ms p99 1.80 ms = 1.80x baseline p99")
    assert "the last 12 ms after its deadline" in wave.notes
    assert expiry_wave.phase_result(found, "baseline").notes == ""
    with pytest.raises(expiry_wave.Failed):
        expiry_wave.phase_result(found, "pre-wave")  # no samples in that phase
    with pytest.raises(expiry_wave.Failed):
        expiry_wave.phase_result({"keys": 1000, "waves": 0}, "wave")


def test_client_pipeline_operations_draw_keys_or_repeat_the_hot_one() -> None:
    rng = random.Random(1)
    uniform = build_ops("get", [b"a", b"b", b"c"], b"v", 300, rng)
    assert len(uniform) == 300 and {op[1] for op in uniform} == {b"a", b"b", b"c"}
    assert {(op[0], op[2], op[3]) for op in uniform} == {(int(Kind.GET), None, None)}
    hot = build_ops("set", [b"hot"], b"v" * 16, 5, rng)
    assert hot == [(int(Kind.SET), b"hot", b"v" * 16, 3_600_000)] * 5
    with pytest.raises(ValueError):
        build_ops("mix", [b"a"], b"v", 1, rng)


def test_errors_unknown_to_the_generator_show_as_na() -> None:
    scenario = Scenario("redis.get.16B.c1", "redis", "redis-benchmark", "get")
    unknown = result(10)
    unknown.errors = None
    assert table_rows([Outcome(scenario, unknown)])[0]["errors"] == "n/a"


def test_progress_line_names_the_generator_or_the_reason() -> None:
    scenario = Scenario("pipe.get.16B.uniform.s64", "zkv", "pipeline", "get")
    line = progress_line(3, 40, Outcome(scenario, result(12_345, generator="dealer-pipeline")))
    assert line.startswith("[ 3/40] pipe.get.16B.uniform.s64")
    assert "dealer-pipeline" in line and "12,345 ops/s" in line
    skipped = Outcome(scenario, skipped="skipped: wrk not installed (apt-get install wrk)")
    assert progress_line(4, 40, skipped).endswith(
        "skipped: wrk not installed (apt-get install wrk)"
    )


def test_filesystem_of_takes_the_longest_mount_point() -> None:
    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /tmp tmpfs rw 0 0\n"
        "tmpfs /tmpfoo tmpfs rw 0 0\n"
        "/dev/vdb /work xfs rw 0 0\n"
    )
    assert report.filesystem_of(Path("/tmp/zkv-bench-1"), mounts) == "tmpfs"
    assert report.filesystem_of(Path("/work/main"), mounts) == "xfs"
    assert report.filesystem_of(Path("/var/tmp"), mounts) == "ext4"


def test_cpu_model_from_proc_cpuinfo() -> None:
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) @ 2.50GHz\n"
    assert cpu_model(text) == "Intel(R) Xeon(R) @ 2.50GHz"
    assert cpu_model("") == "unknown"


# --- wrk --------------------------------------------------------------------------------------

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:5000
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.31ms    3.10ms  45.00ms   80.00%
    Req/Sec     2.60k   200.00     3.00k    70.00%
  10400 requests in 2.00s, 2.10MB read
  Non-2xx or 3xx responses: 4
Requests/sec:   5200.00
Transfer/sec:      1.05MB
ZKV_BENCH {"requests": 10400, "duration_us": 2000000, "bytes": 2200000, "errors": \
{"connect": 0, "read": 1, "write": 0, "status": 4, "timeout": 2}, "p50_us": 11800.0, \
"p99_us": 30500.5, "p999_us": 44100.0, "mean_us": 12310.2, "max_us": 45000.0}
"""


def test_parse_wrk_output_reads_the_done_line() -> None:
    parsed = parse_wrk_output(WRK_OUTPUT)
    assert parsed.generator == "wrk"
    assert parsed.ops == 10_396  # error statuses are counted in requests; they are not ops
    assert parsed.errors == 7
    assert parsed.elapsed_s == 2.0
    assert parsed.ops_per_s == pytest.approx(5198.0)
    assert (parsed.p50_ms, parsed.p99_ms, parsed.p999_ms) == (11.8, 30.5005, 44.1)
    assert parsed.details == {"wrk_errors": {"read": 1, "status": 4, "timeout": 2}}


def test_parse_wrk_output_without_the_line_fails_clearly() -> None:
    with pytest.raises(ValueError, match="ZKV_BENCH"):
        parse_wrk_output("Running 2s test @ http://127.0.0.1:5000\nRequests/sec: 10\n")


def test_wrk_command_rounds_duration_and_passes_the_script_arguments() -> None:
    workload = HttpWorkload("seed", set_percent=10, key_prefix="bench:", key_count=100)
    command = wrk_command("/usr/bin/wrk", "http://127.0.0.1:5000", workload, 1, 0.4)
    assert command[1:4] == ["--threads=1", "--connections=1", "--duration=1s"]
    assert command[-7:] == ["--", "seed", "10", "bench:", "100", "16", "3600"]


def test_python_requests_match_the_lua_script() -> None:
    rng = random.Random(1)
    get = HttpWorkload("seed", key_prefix="bench:", key_count=0)
    assert request_for(get, rng) == ("GET", "/get?key=bench:hot", None)
    put = HttpWorkload("rest-put", key_prefix="big:", key_count=0, value_bytes=4, ttl_s=60)
    assert request_for(put, rng) == ("PUT", "/v1/keys/big:hot?ttl=60", b"vvvv")
    sets = HttpWorkload("seed", set_percent=100, key_prefix="bench:", key_count=10)
    _, path, _ = request_for(sets, rng)
    assert path.startswith("/set?key=bench:") and path.endswith(
        "&value=" + "v" * 16 + "&timeout=3600"
    )
    mix = HttpWorkload("seed", set_percent=10, key_prefix="bench:", key_count=10)
    paths = [request_for(mix, rng)[1] for _ in range(2000)]
    share = sum(p.startswith("/set") for p in paths) / len(paths)
    assert 0.05 < share < 0.15
    webdis = HttpWorkload("webdis-get", key_prefix="bench:", key_count=0)
    assert request_for(webdis, rng) == ("GET", "/GET/bench:hot", None)


# --- redis-benchmark and webdis ---------------------------------------------------------------

REDIS_CSV = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","69662.14","13.377","0.632","9.575","33.439","79.743","128.831"
"GET","94384.15","9.435","0.536","6.639","28.463","48.991","59.999"
"""


def test_parse_redis_csv() -> None:
    rows = parse_redis_csv(REDIS_CSV)
    assert rows["GET"]["rps"] == 94384.15
    assert rows["SET"]["p99_latency_ms"] == 79.743


def test_parse_redis_csv_refuses_other_output() -> None:
    with pytest.raises(ValueError):
        parse_redis_csv("SET: 69662.14 requests per second\n")


def test_redis_benchmark_command_pipelines_only_when_asked() -> None:
    plain = redis_benchmark_command(6400, "get", 1, 1, 16, 1000)
    assert "-P" not in plain and plain[plain.index("-t") + 1] == "get"
    assert plain[plain.index("-h") + 1] == "127.0.0.1"
    piped = redis_benchmark_command(6400, "set", 64, 16, 65536, 1000)
    assert piped[-2:] == ["-P", "16"]
    assert piped[piped.index("-r") + 1] == "256"


def test_redis_benchmark_requests_from_a_known_rate_or_the_guess() -> None:
    assert redis_benchmark_requests(50, 1, 16, 0.5) == 30_000  # RATE_GUESS: 60,000/s
    assert redis_benchmark_requests(50, 1, 16, 0.5, rate=110_000.0) == 55_000
    assert redis_benchmark_requests(50, 1, 16, 0.0001, rate=110_000.0) == 500  # 10 per client


def test_resp_command() -> None:
    assert resp_command(b"SET", b"k", b"vv") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n"


def test_webdis_config_listens_on_loopback_in_the_foreground(tmp_path: Path) -> None:
    config = webdis_config(6400, 7400, tmp_path / "w.log")
    assert config["http_host"] == "127.0.0.1" and config["redis_host"] == "127.0.0.1"
    assert config["daemonize"] is False


# --- scenarios and the command line -----------------------------------------------------------


def test_scenario_ids_are_unique_and_every_peer_exists() -> None:
    scenarios = all_scenarios()
    ids = [s.id for s in scenarios]
    assert len(ids) == len(set(ids))
    for scenario in scenarios:
        assert scenario.target in TARGETS
        for peer in scenario.peers:
            assert peer.scenario in ids, (scenario.id, peer.scenario)
            assert peer.metric in ("ops", "p50", "p99", "bytes", "paired")


def test_select_by_glob_substring_and_quick() -> None:
    scenarios = all_scenarios()
    assert {s.id for s in select(scenarios, "http.*.c1", quick=False)} >= {
        "http.get.16B.uniform.c1",
        "http.rest-put.64K.uniform.c1",
    }
    assert all("pipe.get" in s.id for s in select(scenarios, "pipe.get", quick=False))
    exact = select(scenarios, "redis.get.16B.c1", quick=False)
    assert [s.id for s in exact] == ["redis.get.16B.c1"]  # not redis.get.16B.c1.P64
    quick = select(scenarios, None, quick=True)
    assert 0 < len(quick) < len(scenarios) / 2
    assert select(scenarios, "nothing-like-this", quick=False) == []


def test_full_only_scenarios_need_full_or_a_pattern_that_names_them() -> None:
    scenarios = all_scenarios()
    default = {s.id for s in select(scenarios, None, quick=False)}
    everything = {s.id for s in select(scenarios, None, quick=False, full=True)}
    assert everything == {s.id for s in scenarios}
    assert "memory.zkv.16B.ttl" not in default and "expiry.get.wave" not in default
    assert "pipe.get.64K.uniform.s64" not in default and "pipe.get.16B.uniform.s64" in default
    # --only memory,expiry runs them without --full: the pattern names them from the start.
    named = {s.id for s in select(scenarios, "memory,expiry", quick=False)}
    assert named == {s.id for s in scenarios if s.target in ("memory", "expiry-wave")}
    # A substring inside an id does not start a minute-long run ...
    assert "memory.redis.16B.ttl" not in {s.id for s in select(scenarios, "redis", False)}
    # ... but with --full it matches as everywhere, and globs and exact ids always do.
    assert "memory.redis.16B.ttl" in {s.id for s in select(scenarios, "redis", False, full=True)}
    assert {s.id for s in select(scenarios, "*.64K.*.s64", False)} == {
        "pipe.get.64K.uniform.s64",
        "pipe.set.64K.uniform.s64",
    }
    assert [s.id for s in select(scenarios, "expiry.get.wave", False)] == ["expiry.get.wave"]
    # Every peer of a default row runs by default too: no ratio goes missing without --full.
    by_id = {s.id: s for s in scenarios}
    for scenario_id in default:
        for peer in by_id[scenario_id].peers:
            assert peer.scenario in default, (scenario_id, peer.scenario)


def test_pipelining_floor_rows_compare_with_redis_c50_under_both_fsync_policies() -> None:
    by_id = {s.id: s for s in all_scenarios()}
    for scenario_id in (
        "client.pipeline.get.16B.uniform.p2",
        "client.pipeline.set.16B.uniform.p2",
        "client.pipeline.set.16B.hot.p2",
        "fsync-no.client.pipeline.set.16B.uniform.p2",
    ):
        scenario = by_id[scenario_id]
        assert scenario.load == "client-pipeline" and scenario.connections == 2
        op = scenario.op
        assert Peer("redis c50", f"redis.{op}.16B.c50") in scenario.peers
    assert by_id["fsync-no.client.pipeline.set.16B.uniform.p2"].target == "zkv-fsync-no"
    ipc = by_id["ipc.client.get.16B.c1"]
    assert ipc.target == "zkv-ipc"
    assert [(p.scenario, p.metric) for p in ipc.peers][:2] == [
        ("bare.ipc.get.16B.c1", "p50"),
        ("bare.tcp.get.16B.c1", "p50"),
    ]


def test_interleaved_rows_compare_zkv_over_ipc_with_both_bare_chains_of_the_same_run() -> None:
    by_id = {s.id: s for s in all_scenarios()}
    for op in ("get", "set"):
        zkv = by_id[f"interleaved.zkv-ipc.{op}.16B.c1"]
        assert zkv.target == "interleaved" and zkv.load == "interleaved"
        assert {(p.label, p.scenario, p.metric) for p in zkv.peers} >= {
            ("bare ipc p50", f"interleaved.bare-ipc.{op}.16B.c1", "p50"),
            ("bare tcp p50", f"interleaved.bare-tcp.{op}.16B.c1", "p50"),
            ("zkv tcp p50", f"interleaved.zkv-tcp.{op}.16B.c1", "p50"),
        }
        assert all(by_id[p.scenario].target == "interleaved" for p in zkv.peers[:3])
    default = {s.id for s in select(all_scenarios(), None, quick=False)}
    assert {s.id for s in all_scenarios() if s.target == "interleaved"} <= default


def test_interleaved_rows_compare_set_with_fsync_no_with_the_bare_chains_of_the_same_run() -> None:
    """SET with ZKV_FSYNC=no against the bare chain, both in the same turns (the sequential
    fsync-no.client.set row is minutes away from bare.tcp.set's), and against zkv-tcp, which
    differs only by its fsync policy."""
    by_id = {s.id: s for s in all_scenarios()}
    for op in ("get", "set"):
        row = by_id[f"interleaved.zkv-tcp-fsync-no.{op}.16B.c1"]
        assert row.target == "interleaved" and row.load == "interleaved"
        assert [(p.label, p.scenario, p.metric) for p in row.peers] == [
            ("bare ipc p50", f"interleaved.bare-ipc.{op}.16B.c1", "p50"),
            ("bare tcp p50", f"interleaved.bare-tcp.{op}.16B.c1", "p50"),
            ("fsync=always p50", f"interleaved.zkv-tcp.{op}.16B.c1", "p50"),
        ]
        assert "ZKV_FSYNC=no" in row.about and "tcp://" in row.about
        assert "ZKV_FSYNC=always" in by_id[f"interleaved.zkv-tcp.{op}.16B.c1"].about
    default = {s.id for s in select(all_scenarios(), None, quick=False)}
    assert "interleaved.zkv-tcp-fsync-no.set.16B.c1" in default
    chains = {c.name: (c.system, c.transport, c.fsync) for c in INTERLEAVED_CHAINS}
    assert chains == {
        "zkv-ipc": ("zkv", "ipc", "always"),
        "zkv-tcp": ("zkv", "tcp", "always"),
        "zkv-tcp-fsync-no": ("zkv", "tcp", "no"),
        "bare-ipc": ("bare", "ipc", None),
        "bare-tcp": ("bare", "tcp", None),
        "bare-tcp-fsync": ("bare", "tcp", "always"),
    }


def test_interleaved_durable_sets_are_compared_with_the_bare_chain_paying_an_fsync_too() -> None:
    by_id = {s.id: s for s in all_scenarios()}
    fsynced = ("bare tcp+fsync p50", "interleaved.bare-tcp-fsync.set.16B.c1", "p50")
    for chain in ("zkv-tcp", "zkv-ipc"):
        row = by_id[f"interleaved.{chain}.set.16B.c1"]
        assert fsynced in {(p.label, p.scenario, p.metric) for p in row.peers}
        get = by_id[f"interleaved.{chain}.get.16B.c1"]
        assert "bare tcp+fsync p50" not in {p.label for p in get.peers}
    no = by_id["interleaved.zkv-tcp-fsync-no.set.16B.c1"]
    assert "bare tcp+fsync p50" not in {p.label for p in no.peers}
    bare_fsync = by_id["interleaved.bare-tcp-fsync.set.16B.c1"]
    assert "fsyncing each SET" in bare_fsync.about
    assert [p.label for p in bare_fsync.peers] == ["bare tcp p50"]


def test_interleaved_chains_start_with_their_transport_and_fsync_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_start_together starts each chain as INTERLEAVED_CHAINS says (no process here: the
    cluster and the bare chain are replaced by recorders)."""
    started: dict[str, tuple[object, ...]] = {}

    @contextlib.contextmanager
    def zkv_cluster(
        workdir: Path, shards: int, fsync: str, gateway: bool, ipc: bool = False
    ) -> Iterator[str]:
        started[workdir.name] = ("zkv", shards, fsync, gateway, ipc)
        yield f"endpoint of {workdir.name}"

    @contextlib.contextmanager
    def bare_chain(workdir: Path, transport: str, fsync: bool = False) -> Iterator[str]:
        started[workdir.name] = ("bare", transport, fsync)
        yield f"endpoint of {workdir.name}"

    monkeypatch.setattr(targets, "_zkv_cluster", zkv_cluster)
    monkeypatch.setattr(targets, "_bare_chain", bare_chain)
    monkeypatch.setattr(targets, "_fill", lambda *args, **kwargs: None)
    with contextlib.ExitStack() as stack:
        endpoints = targets._start_together(stack, tmp_path, 10)
    assert endpoints == {c.name: f"endpoint of {c.name}" for c in INTERLEAVED_CHAINS}
    shards = defaults.SHARDS
    assert started == {
        "zkv-ipc": ("zkv", shards, "always", False, True),
        "zkv-tcp": ("zkv", shards, "always", False, False),
        "zkv-tcp-fsync-no": ("zkv", shards, "no", False, False),
        "bare-ipc": ("bare", "ipc", False),
        "bare-tcp": ("bare", "tcp", False),
        "bare-tcp-fsync": ("bare", "tcp", True),
    }


def test_command_line_full_flags() -> None:
    args = cli.build_parser().parse_args(["--full", "--full-keys", "5000"])
    assert args.full and args.full_keys == 5000
    assert cli.build_parser().parse_args([]).full_keys == 1_000_000
    assert cli.main(["--full-keys", "10", "--list"]) == 2


def test_run_order_keeps_compared_rows_close_in_time() -> None:
    ordered = [s.id for s in run_order(all_scenarios())]
    assert sorted(ordered) == sorted(s.id for s in all_scenarios())
    targets = [s.target for s in run_order(all_scenarios())]
    assert targets == sorted(targets, key=TARGETS.index)  # each target started once
    main = [s.id for s in run_order(all_scenarios()) if s.target == "zkv"]
    # The 2-shard point comes first, right after the 1- and 4-shard clusters ...
    assert set(main[:2]) == {"pipe.get.16B.uniform.s64", "client.pipeline.get.16B.uniform.p2"}
    assert targets.index("zkv") == len(targets) - targets[::-1].index("zkv-shards1")
    # ... and the rows compared with fsync=no come last, right before the fsync=no cluster.
    by_id = {s.id: s for s in all_scenarios()}
    assert any(p.label == "fsync=no" for p in by_id[main[-1]].peers)
    assert main[-1] == "pipe.set.16B.uniform.s64"
    assert targets[len(targets) - targets[::-1].index("zkv")] == "zkv-fsync-no"


def test_workloads_follow_the_scenario() -> None:
    hot = Scenario("http.get.16B.hot.c64", "zkv", "http", "get", hot=True, connections=64)
    assert http_workload(hot, 10_000).key_count == 0
    mix = Scenario("http.mix.16B.uniform.c1", "zkv", "http", "mix")
    assert (http_workload(mix, 500).set_percent, http_workload(mix, 500).key_count) == (10, 500)
    put = Scenario("http.rest-put.64K.uniform.c1", "zkv", "http", "rest-put", value_bytes=65536)
    assert (http_workload(put, 10).mode, http_workload(put, 10).key_prefix) == ("rest-put", "big:")
    pipe = Scenario("pipe.set.16B.hot.s64", "zkv", "pipeline", "set", hot=True)
    assert zmq_workload(pipe, 100).keys == [b"bench:hot"]
    uniform = Scenario("pipe.get.16B.uniform.s1", "zkv", "pipeline", "get")
    assert len(zmq_workload(uniform, 100).keys) == 100


def test_size_label() -> None:
    assert (size_label(16), size_label(65536)) == ("16B", "64K")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:5555", True),
        ("ipc:///tmp/zkv", True),
        ("tcp://10.0.0.5:5555", False),
        ("tcp://example.com:5555", False),
        ("tcp://127.0.0.1", False),
    ],
)
def test_frontend_must_be_loopback(text: str, ok: bool) -> None:
    if ok:
        assert cli.frontend_endpoint(text) == text
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            cli.frontend_endpoint(text)


def test_http_address_must_be_loopback() -> None:
    assert cli.http_address("http://127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert cli.http_address("localhost:8080") == ("localhost", 8080)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.http_address("http://192.168.1.2:5000")


def test_json_document_has_every_scenario_with_ratios_or_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(report, "git_state", lambda: {"commit": "abc"})
    zkv = Scenario(
        "client.get.16B.c1", "zkv", "client", "get", peers=(Peer("redis", "redis.get.16B.c1"),)
    )
    redis = Scenario("redis.get.16B.c1", "redis", "redis-benchmark", "get")
    outcomes = [
        Outcome(zkv, result(1_000), settings={"ZKV_FSYNC": "always"}),
        Outcome(
            redis, skipped="skipped: redis-server not installed (apt-get install redis-server)"
        ),
    ]
    doc = report.document(outcomes, {"nproc": 2}, {"duration_s": 2.0})
    first, second = doc["scenarios"]
    assert first["ops_per_s"] == 1000.0 and first["settings"] == {"ZKV_FSYNC": "always"}
    assert first["ratios"] == {
        "redis": {"peer": "redis.get.16B.c1", "metric": "ops", "ratio": None}
    }
    assert second["skipped"].startswith("skipped: redis-server not installed")
    assert "ops_per_s" not in second
    assert doc["zkv"] == {"commit": "abc"} and doc["machine"] == {"nproc": 2}


# --- the paired target ------------------------------------------------------------------------


def test_paired_turns_alternate_which_system_opens_each_pair() -> None:
    """Neither system always goes first: a drift within a round, or what a turn leaves behind,
    falls on each side in turn."""
    turns = paired.schedule(3)
    assert len(turns) == 3 * 2 * 2
    assert [(t.op, t.system) for t in turns[:8]] == [
        ("set", "zkv"),
        ("set", "redis"),
        ("get", "redis"),
        ("get", "zkv"),
        ("set", "redis"),
        ("set", "zkv"),
        ("get", "zkv"),
        ("get", "redis"),
    ]
    for opening, closing in zip(turns[::2], turns[1::2], strict=True):  # a pair is two turns
        assert (opening.round, opening.op) == (closing.round, closing.op)
        assert {opening.system, closing.system} == {"zkv", "redis"}
        assert opening.first and not closing.first
    # Over two rounds, each system opens each operation's pair once; one operation alone too.
    openers = [(t.op, t.system) for t in paired.schedule(2) if t.first]
    assert sorted(openers) == [("get", "redis"), ("get", "zkv"), ("set", "redis"), ("set", "zkv")]
    assert [t.system for t in paired.schedule(2, ["get"]) if t.first] == ["zkv", "redis"]


def _turn(round_index: int, system: str, ops_per_s: float, p50_ms: float) -> paired.Measured:
    redis = system == "redis"
    found = LoadResult(
        generator="redis-benchmark" if redis else "zkv.Client.execute",
        ops=int(ops_per_s),
        errors=None if redis else 1,
        elapsed_s=1.0,
        p50_ms=p50_ms,
        p99_ms=2 * p50_ms,
        p999_ms=None if redis else 3 * p50_ms,
        count=10,
        ops_per_s=ops_per_s,
        details={"round": round_index},
    )
    return paired.Measured(paired.Turn(round_index, "set", system, round_index == 1), found, 1.5)


def test_paired_rows_are_medians_over_rounds_with_every_round_kept() -> None:
    measured = [
        _turn(1, "zkv", 300.0, 2.0),  # out of order: rounds are sorted
        _turn(0, "zkv", 100.0, 1.0),
        _turn(2, "zkv", 90.0, 4.0),
        _turn(0, "redis", 50.0, 0.1),
        _turn(1, "redis", 100.0, 0.2),
        _turn(2, "redis", 100.0, 0.3),
    ]
    rows = paired.rows(measured)
    assert set(rows) == {("zkv", "set"), ("redis", "set")}
    zkv, redis = rows[("zkv", "set")], rows[("redis", "set")]
    assert (zkv.ops_per_s, zkv.p50_ms, zkv.p99_ms, zkv.p999_ms) == (100.0, 2.0, 4.0, 6.0)
    assert (zkv.ops, zkv.errors, zkv.count, zkv.elapsed_s) == (490, 3, 30, 3.0)
    assert zkv.round_ops_per_s == [100.0, 300.0, 90.0]
    assert zkv.generator == "zkv.Client.execute"
    assert [r["round"] for r in zkv.details["rounds"]] == [0, 1, 2]
    assert [r["first"] for r in zkv.details["rounds"]] == [False, True, False]
    assert zkv.details["rounds"][1]["details"] == {"round": 1}
    assert zkv.details["rounds"][1]["turn_wall_s"] == 1.5
    # redis-benchmark counts no errors and has no p99.9: unknown, not 0.
    assert (redis.errors, redis.p999_ms, redis.ops_per_s) == (None, None, 100.0)
    assert ratio(zkv, redis, "paired") == 2.0


def test_paired_run_takes_the_turns_in_order_and_sizes_redis_from_its_last_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run_paired without processes: both loads are replaced by recorders."""
    calls: list[tuple[str, str, float | None]] = []
    zkv_rates = iter([200.0, 300.0, 100.0, 400.0])
    redis_rates = iter([100.0, 150.0, 200.0, 100.0])

    def client_pipeline(
        endpoint: str, op: str, keys: list[bytes], value: bytes, processes: int, seconds: float
    ) -> LoadResult:
        assert (endpoint, keys, value, processes, seconds) == ("tcp://zkv", [b"k"], b"v", 2, 0.5)
        calls.append(("zkv", op, None))
        return result(next(zkv_rates), generator="zkv.Client.execute")

    def redis_benchmark(
        port: int,
        op: str,
        clients: int,
        pipeline: int,
        value_bytes: int,
        seconds: float,
        rate: float | None = None,
    ) -> LoadResult:
        assert (port, clients, pipeline, value_bytes, seconds) == (6400, 50, 1, 1, 0.5)
        calls.append(("redis", op, rate))
        return result(next(redis_rates), generator="redis-benchmark")

    monkeypatch.setattr(paired.client_pipeline, "run_client_pipeline", client_pipeline)
    monkeypatch.setattr(paired.peers, "run_redis_benchmark", redis_benchmark)
    said: list[str] = []
    rows = paired.run_paired("tcp://zkv", 6400, [b"k"], b"v", 0.5, 2, 50, rounds=2, say=said.append)
    assert calls == [
        ("zkv", "set", None),
        ("redis", "set", None),  # the first Redis turn: bench/peers.py's guess
        ("redis", "get", 100.0),  # then the rate of Redis's last turn, whatever its operation
        ("zkv", "get", None),
        ("redis", "set", 150.0),
        ("zkv", "set", None),
        ("zkv", "get", None),
        ("redis", "get", 200.0),
    ]
    assert len(said) == 8 and said[0].startswith("round 1/2 set zkv")
    assert rows[("zkv", "set")].round_ops_per_s == [200.0, 100.0]
    assert rows[("redis", "set")].round_ops_per_s == [100.0, 200.0]
    assert ratio(rows[("zkv", "set")], rows[("redis", "set")], "paired") == pytest.approx(1.25)
    assert ratio(rows[("zkv", "get")], rows[("redis", "get")], "paired") == pytest.approx(3.0)


def test_paired_rows_compare_the_pipelined_client_with_redis_c50_of_the_same_rounds() -> None:
    scenarios = all_scenarios()
    by_id = {s.id: s for s in scenarios}
    ids = set()
    for op in ("get", "set"):
        zkv, redis = f"paired.client.pipeline.{op}.16B.uniform.p2", f"paired.redis.{op}.16B.c50"
        ids |= {zkv, redis}
        row = by_id[zkv]
        assert (row.target, row.load, row.op, row.connections) == ("paired", "paired", op, 2)
        assert row.peers == (Peer("redis c50 (paired)", redis, "paired"),)
        assert (by_id[redis].target, by_id[redis].connections) == ("paired", 50)
    assert {s.id for s in scenarios if s.target == "paired"} == ids
    assert ids <= {s.id for s in select(scenarios, None, quick=False)}  # in the default run
    assert {s.id for s in select(scenarios, "paired", quick=False)} == ids
    assert [s.id for s in select(scenarios, "paired.redis.set.16B.c50", False)] == [
        "paired.redis.set.16B.c50"
    ]
    assert not any(s.target == "paired" for s in select(scenarios, None, quick=True))


def test_paired_target_needs_redis_and_a_cluster_of_its_own(tmp_path: Path) -> None:
    external = targets.Options(10, "tcp://127.0.0.1:5555", None, tmp_path)
    assert targets.unavailable("paired", external) == (
        "skipped: needs a cluster of its own (not started with --frontend/--http)"
    )
    own = targets.Options(10, None, None, tmp_path)
    assert targets.unavailable("paired", own) == targets.peers.missing(
        "redis-server", "redis-benchmark"
    )


def test_paired_ratio_in_the_table_and_each_round_in_the_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(report, "git_state", lambda: {"commit": "abc"})
    by_id = {s.id: s for s in all_scenarios()}
    zkv, redis = result(100), result(100)
    zkv.round_ops_per_s, redis.round_ops_per_s = [100.0, 300.0, 90.0], [50.0, 100.0, 100.0]
    outcomes = [
        Outcome(by_id["paired.client.pipeline.set.16B.uniform.p2"], zkv),
        Outcome(by_id["paired.redis.set.16B.c50"], redis),
    ]
    assert table_rows(outcomes)[0]["vs peers"] == "redis c50 (paired) 2x"
    first = report.document(outcomes, {}, {})["scenarios"][0]
    assert first["ratios"] == {
        "redis c50 (paired)": {
            "peer": "paired.redis.set.16B.c50",
            "metric": "paired",
            "ratio": 2.0,
            "by_round": [2.0, 3.0, 0.9],
        }
    }
    assert first["round_ops_per_s"] == [100.0, 300.0, 90.0]
