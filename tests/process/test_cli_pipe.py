"""``zkv`` writing to a pipe whose reader is gone (``zkv all | head -1``): a real process, so
the interpreter's own flush of stdout at exit is covered too (no broker needed: ``keygen``
prints without one; ``--help`` was already quiet, argparse ignores its write errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT

pytestmark = pytest.mark.process


def test_a_closed_stdout_ends_zkv_quietly_with_status_141(tmp_path: Path) -> None:
    argv = ["keygen", str(tmp_path / "keys")]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before zkv wrote
    try:
        result = subprocess.run(
            [sys.executable, "-m", "zkv", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, b"")
