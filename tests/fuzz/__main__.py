"""``python -m tests.fuzz``: coverage-guided fuzzing of the targets in tests/fuzz/targets.py.

Each target runs in a process of its own (libFuzzer ends the process when it stops) for its
share of ``--seconds``, on a corpus that starts from the target's seeds (written there first)
and keeps what the run found interesting, so a corpus directory given with ``--corpus`` makes
each run start where the last one stopped. An input that breaks a promise is written to
``--artifacts`` as ``<target>-crash-<sha1>`` (libFuzzer's name) and the command exits 1,
naming it; ``python -m tests.fuzz --replay FILE --target NAME`` runs the target on it alone,
with its traceback, and the input becomes a case of tests/unit/test_fuzz.py once fixed.

The test suite runs it briefly (tests/process/test_fuzz_run.py: the three targets at once for
8 s); by hand::

    .venv/bin/python -m tests.fuzz --seconds 600 --corpus fuzz-corpus

Inputs are at most MAX_INPUT_BYTES (4096); one that takes over PER_INPUT_TIMEOUT_S (10 s) is
a finding too (a hang), and so is a process over RSS_LIMIT_MB (2048 MiB).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_INPUT_TIMEOUT_S = 10
RSS_LIMIT_MB = 2048
NAMES = ("protocol", "http", "wsgi")  # the keys of targets.TARGETS (not imported here: see _child)


def _child(name: str, libfuzzer_args: list[str]) -> None:
    """Fuzz one target in this process, under atheris; never returns."""
    import atheris  # only here: the parent and the replaying tests run without it

    # Instrumented as they are imported, so nothing of ours may be imported before this.
    with atheris.instrument_imports(include=["zkv", "gateway", "tests.fuzz"]):
        from tests.fuzz import targets
    targets.quiet_logs()
    target = targets.TARGETS[name][0]
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()


def run(
    names: Sequence[str], seconds: float, corpus: Path | None, artifacts: Path, jobs: int = 1
) -> int:
    """Fuzz the targets, ``jobs`` at a time, all within about ``seconds``; 0 when none found
    anything. Each gets ``seconds`` divided by the number of rounds the jobs take."""
    from tests.fuzz.targets import MAX_INPUT_BYTES, TARGETS

    rounds = -(-len(names) // jobs)
    share = max(1, round(seconds / rounds))
    artifacts.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="zkv-fuzz-") as scratch:
        for first in range(0, len(names), jobs):
            running: list[tuple[str, set[Path], subprocess.Popen[bytes]]] = []
            for name in names[first : first + jobs]:
                directory = (corpus or Path(scratch)) / name
                directory.mkdir(parents=True, exist_ok=True)
                for number, seed in enumerate(TARGETS[name][1]()):
                    (directory / f"seed-{number}").write_bytes(seed)
                command = [
                    sys.executable,
                    "-m",
                    "tests.fuzz",
                    "--child",
                    name,
                    f"-max_total_time={share}",
                    f"-max_len={MAX_INPUT_BYTES}",
                    f"-timeout={PER_INPUT_TIMEOUT_S}",
                    f"-rss_limit_mb={RSS_LIMIT_MB}",
                    f"-artifact_prefix={artifacts}/{name}-",
                    "-print_final_stats=1",
                    str(directory),
                ]
                print(f"fuzzing {name} for {share} s: {' '.join(command)}", flush=True)
                before = set(artifacts.glob(f"{name}-*"))
                env = {**os.environ, "PYTHONHASHSEED": "0"}
                running.append((name, before, subprocess.Popen(command, cwd=ROOT, env=env)))
            for name, before, process in running:
                status = process.wait()
                found = sorted(set(artifacts.glob(f"{name}-*")) - before)
                if status != 0 or found:
                    failed.append(name)
                    print(
                        f"FUZZ FINDING in {name} (exit status {status}): "
                        + (", ".join(map(str, found)) or "no input saved")
                        + f"; replay: python -m tests.fuzz --target {name} --replay FILE",
                        flush=True,
                    )
    if failed:
        print(f"fuzzing found problems in: {', '.join(failed)}", flush=True)
        return 1
    print(f"fuzzing found nothing in {', '.join(names)}", flush=True)
    return 0


def replay(name: str, path: Path) -> int:
    """Run a target on one saved input, its failure raised with the traceback."""
    from tests.fuzz.targets import TARGETS

    TARGETS[name][0](path.read_bytes())
    print(f"{name}: {path} passes", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2:])
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz",
        description="Coverage-guided fuzzing (atheris) of the protocol decoders and the "
        "gateway's HTTP request handling.",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="about how long the whole run takes, shared by the rounds of --jobs targets",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="targets fuzzed at once, each in its own process"
    )
    parser.add_argument(
        "--target",
        action="append",
        choices=NAMES,
        help="a target to run (repeatable; default: all)",
    )
    parser.add_argument(
        "--corpus", type=Path, help="keep each target's corpus in DIR/<target> between runs"
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path("fuzz-findings"),
        help="where inputs that found a problem are written (default: ./fuzz-findings)",
    )
    parser.add_argument("--replay", type=Path, help="run --target on this one input")
    args = parser.parse_args(argv)
    names = args.target or list(NAMES)
    if args.replay is not None:
        if len(names) != 1:
            parser.error("--replay needs exactly one --target")
        return replay(names[0], args.replay)
    if args.seconds <= 0 or args.jobs < 1:
        parser.error("--seconds and --jobs must be positive")
    return run(names, args.seconds, args.corpus, args.artifacts.resolve(), args.jobs)


if __name__ == "__main__":
    raise SystemExit(main())
