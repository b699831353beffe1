"""``python -m bench``: zkv's benchmark, with Redis and webdis as peers. See docs/benchmarks.md.

Starts its own processes on free loopback ports (or loads a running cluster given by
``--frontend``/``--http``), prints one line per scenario to stderr while it runs, then the
machine and ONE table to stdout, and writes everything to a JSON file.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench import http_load
from bench.report import document, format_table, machine, machine_line, table_rows
from bench.runner import RunSettings, run_all, stderr_progress
from bench.scenarios import Scenario, all_scenarios, select
from bench.targets import Options, fsync_honoured

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
DEFAULT_DURATION_S = 2.0
QUICK_DURATION_S = 1.0
DEFAULT_KEYS = 10_000
QUICK_KEYS = 1_000  # a smaller key space fills faster; the smoke run is about working, not speed
FULL_KEYS = 1_000_000  # keys of the memory and expiry-wave scenarios
LOOPBACK_NAMES = {"localhost"}


def loopback_host(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1: the only load targets allowed."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def frontend_endpoint(text: str) -> str:
    """argparse type: a loopback tcp:// endpoint, or an ipc:// one."""
    if text.startswith("ipc://"):
        return text
    parts = urlsplit(text)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        raise argparse.ArgumentTypeError(f"expected tcp://127.0.0.1:PORT or ipc://PATH: {text!r}")
    if not loopback_host(parts.hostname):
        raise argparse.ArgumentTypeError(f"only loopback targets are allowed: {text!r}")
    return text


def http_address(text: str) -> tuple[str, int]:
    """argparse type: ``http://127.0.0.1:5000`` (or ``127.0.0.1:5000``) -> (host, port)."""
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme != "http" or parts.hostname is None:
        raise argparse.ArgumentTypeError(f"expected http://127.0.0.1:PORT: {text!r}")
    if not loopback_host(parts.hostname):
        raise argparse.ArgumentTypeError(f"only loopback targets are allowed: {text!r}")
    return parts.hostname, parts.port or 80


def positive(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    value = float(text)
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 600 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark zkv (HTTP gateway, client, pipelined DEALERs, shard scaling) "
        "against a bare pyzmq chain, Redis and webdis, on loopback. See docs/benchmarks.md.",
    )
    parser.add_argument(
        "--duration",
        type=positive,
        help=f"seconds per scenario (default {DEFAULT_DURATION_S}, "
        f"{QUICK_DURATION_S} with --quick; wrk rounds to whole seconds)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: one scenario of each kind (~20 s)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="also the full-only scenarios (memory per key, the expiry wave, more pipeline "
        "shapes): several minutes more; see --list --full",
    )
    parser.add_argument(
        "--only",
        metavar="PATTERN",
        help="comma-separated scenario patterns: globs (http.*.c64), exact ids "
        "(redis.get.16B.c1) or substrings (pipe.get); full-only scenarios are matched by globs, "
        "ids or a prefix (memory,expiry); see --list",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help="where to write the results (default bench/results/latest.json)",
    )
    parser.add_argument(
        "--frontend",
        type=frontend_endpoint,
        help="load this running broker instead of starting a cluster (tcp://127.0.0.1:5555)",
    )
    parser.add_argument(
        "--http",
        type=http_address,
        help="load this running gateway instead of starting one (http://127.0.0.1:5000)",
    )
    parser.add_argument(
        "--keys",
        type=int,
        help=f"size of the uniform key space (default {DEFAULT_KEYS}, {QUICK_KEYS} with --quick)",
    )
    parser.add_argument(
        "--full-keys",
        type=int,
        default=FULL_KEYS,
        metavar="N",
        help=f"keys written by the memory and expiry-wave scenarios (default {FULL_KEYS:,})",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead: cluster mode on test hosts (python -m bench.cluster; needs root)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser


def list_scenarios(scenarios: Sequence[Scenario]) -> str:
    width = max(len(s.id) for s in scenarios)
    return "\n".join(
        f"{s.id:<{width}}  {'quick ' if s.quick else 'full  ' if s.full else '      '}{s.about}"
        for s in scenarios
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cluster:  # its own hosts, clusters and table (docs/benchmarks.md)
        from bench import cluster

        return cluster.main([])
    if args.keys is None:
        args.keys = QUICK_KEYS if args.quick else DEFAULT_KEYS
    if not 1 <= args.keys <= 1_000_000:
        print("error: --keys must be between 1 and 1000000", file=sys.stderr)
        return 2
    if not 1_000 <= args.full_keys <= 10_000_000:
        print("error: --full-keys must be between 1000 and 10000000", file=sys.stderr)
        return 2
    scenarios = select(all_scenarios(), args.only, args.quick, args.full)
    if not scenarios:
        print(f"error: no scenario matches {args.only!r} (see --list)", file=sys.stderr)
        return 2
    if args.list:
        print(list_scenarios(scenarios))
        return 0
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    wrk = http_load.wrk_path()
    if wrk is None and any(s.load == "http" for s in scenarios):
        stderr_progress(
            "wrk is missing (apt-get install wrk): HTTP rows use the Python fallback generator "
            "(python-http), much slower than wrk, so compare them only with each other"
        )
    info = machine()
    stderr_progress(machine_line(info))
    honoured = fsync_honoured()
    if not honoured:
        stderr_progress("note: these workers ignore ZKV_FSYNC, so fsync=no rows measure no change")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="zkv-bench-"))
    try:
        options = Options(args.keys, args.frontend, args.http, workdir, args.full_keys, duration_s)
        outcomes = run_all(scenarios, options, RunSettings(duration_s, wrk))
    except KeyboardInterrupt:  # every process started so far was stopped on the way out
        print("interrupted: no table, no JSON", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed_s = time.monotonic() - started

    print(machine_line(info))
    print(f"{len(scenarios)} scenarios, {duration_s:g} s each, {elapsed_s:.0f} s in all")
    print()
    print(format_table(table_rows(outcomes)))
    skipped = [o for o in outcomes if o.result is None]
    if skipped:
        print()
        for outcome in skipped:
            print(f"{outcome.scenario.id}: {outcome.skipped}")
    run = {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "duration_s": duration_s,
        "elapsed_s": round(elapsed_s, 1),
        "keys": args.keys,
        "full": args.full,
        "full_keys": args.full_keys,
        "http_generator": "wrk" if wrk else "python-http",
        "fsync_honoured": honoured,
        "external": {"frontend": args.frontend, "http": args.http},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document(outcomes, info, run), indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    failed = [o for o in skipped if o.skipped and o.skipped.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
