"""A short coverage-guided fuzz run (atheris) of every target, as the test suite's bound run.

``python -m tests.fuzz --seconds 5 --jobs 3`` fuzzes the protocol decoders, the gateway's HTTP
server and its Bottle app at once, each in its own process for 8 s (tests/fuzz/__main__.py);
it exits 1 and names the input if any target found something. Longer runs by hand:
docs/testing.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT

pytestmark = pytest.mark.process

FUZZ_SECONDS = 5  # each target, all at once (on 2 cores: about 3 s of CPU each)
RUN_TIMEOUT_S = 120.0  # the run plus each target's start (instrumenting its imports)


def test_a_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    findings = tmp_path / "findings"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz",
            "--seconds",
            str(FUZZ_SECONDS),
            "--jobs",
            "3",
            "--artifacts",
            str(findings),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    output = result.stdout[-10000:] + result.stderr[-10000:]
    assert result.returncode == 0, output
    assert list(findings.iterdir()) == [], output
    # Each target ran and executed inputs (libFuzzer's closing statistics, one per target).
    assert result.stderr.count("stat::number_of_executed_units") == 3, output
