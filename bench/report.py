"""Ratios, the table and the JSON document of a run, and the machine it ran on.

Ratios compare a row with a peer measured in the same run (see ``Peer`` in bench/scenarios.py):

* ``ops``: this row's ops/s divided by the peer's. ``redis 0.05x`` means zkv did 5% of what
  Redis did; above 1 means faster than the peer.
* ``p50``: this row's median latency divided by the peer's. ``bare p50 3.1x`` means zkv's median
  request took 3.1 times as long as the bare chain's; above 1 means slower. ``p99`` the same
  with the 99th percentile.
* ``bytes``: this row's memory per key divided by the peer's; above 1 means more memory.
* ``paired``: rows measured in turns, round by round (bench/paired.py): each round's ops/s of
  this row divided by the peer's in the same round, seconds apart, and the median of these
  ratios. ``redis c50 (paired) 1.1x``: in the median round zkv did 1.1 times what Redis did.
  Not the ratio of the two rows' ops/s: each is a median over rounds and may come from a
  different round than the other's, that is from another moment of a drifting machine.

Only ratios within one run mean anything on a shared, noisy machine: absolute numbers move from
run to run, ratios much less.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bench.peers import tool_version
from bench.scenarios import Scenario
from bench.stats import LoadResult

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("scenario", "generator", "ops/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "vs peers")
NOTES = "notes"  # a last column, shown only when some row has notes (memory, expiry wave)
FSYNC_PROBES = 20  # fsyncs timed to describe the disk under the clusters' data
RIGHT_ALIGNED = {"ops/s", "p50 ms", "p99 ms", "p99.9 ms", "errors"}


@dataclass(slots=True)
class Outcome:
    """What became of one selected scenario: a result, or the reason it did not run."""

    scenario: Scenario
    result: LoadResult | None = None
    skipped: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ratio:
    """One comparison of a row with a peer; ``value`` None when the peer did not run.

    ``by_round``: for the ``paired`` metric, each round's ratio (``value`` is their median).
    """

    label: str
    peer: str
    metric: str
    value: float | None
    by_round: tuple[float | None, ...] = ()


def round_ratios(row: LoadResult, peer: LoadResult) -> list[float | None]:
    """Each round's ops/s of ``row`` over ``peer``'s, for rows measured in the same rounds
    (bench/paired.py); None for a round where the peer did nothing, and no rounds at all if the
    two do not have the same number (not one paired run)."""
    if len(row.round_ops_per_s) != len(peer.round_ops_per_s):
        return []
    pairs = zip(row.round_ops_per_s, peer.round_ops_per_s, strict=True)
    return [mine / theirs if theirs else None for mine, theirs in pairs]


def ratio(row: LoadResult, peer: LoadResult, metric: str) -> float | None:
    """``row`` over ``peer`` in ``metric`` (``ops``, ``p50``, ``p99``, ``bytes`` or
    ``paired``: the median of the per-round ratios); None if either is unknown or 0."""
    if metric == "paired":
        known = [value for value in round_ratios(row, peer) if value is not None]
        return statistics.median(known) if known else None
    if metric == "ops":
        mine, theirs = row.ops_per_s, peer.ops_per_s
    elif metric == "p50":
        mine, theirs = row.p50_ms, peer.p50_ms
    elif metric == "p99":
        mine, theirs = row.p99_ms, peer.p99_ms
    elif metric == "bytes":
        mine, theirs = row.bytes_per_key, peer.bytes_per_key
    else:
        raise ValueError(f"unknown metric {metric!r}")
    if mine is None or not theirs:
        return None
    return mine / theirs


def ratios_of(outcome: Outcome, by_id: dict[str, Outcome]) -> list[Ratio]:
    """Every peer comparison of ``outcome``, computed against the results of the same run."""
    found = []
    for peer in outcome.scenario.peers:
        other = by_id.get(peer.scenario)
        value = None
        by_round: tuple[float | None, ...] = ()
        if outcome.result is not None and other is not None and other.result is not None:
            value = ratio(outcome.result, other.result, peer.metric)
            if peer.metric == "paired":
                by_round = tuple(round_ratios(outcome.result, other.result))
        found.append(Ratio(peer.label, peer.scenario, peer.metric, value, by_round))
    return found


# --- formatting -------------------------------------------------------------------------------


def format_ms(value: float | None) -> str:
    """Milliseconds with about three significant digits; "-" when unknown."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value:.3f}"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def format_ops(value: float | None) -> str:
    """Operations per second as a whole number with thousands separators."""
    return "-" if value is None else f"{value:,.0f}"


def format_ratio(value: float) -> str:
    """Two significant digits and an ``x``: 0.043x, 1.5x, 12x, 250x."""
    if value >= 10:
        return f"{value:.0f}x"
    return f"{value:.2g}x"


def format_ratios(ratios: Sequence[Ratio]) -> str:
    """``redis 0.05x, bare p50 3.1x``; peers that did not run are left out."""
    return ", ".join(f"{r.label} {format_ratio(r.value)}" for r in ratios if r.value is not None)


def table_rows(outcomes: Sequence[Outcome]) -> list[dict[str, str]]:
    """One dict per measured scenario, keyed by COLUMNS; skipped scenarios are not rows."""
    by_id = {outcome.scenario.id: outcome for outcome in outcomes}
    rows = []
    for outcome in outcomes:
        result = outcome.result
        if result is None:
            continue
        rows.append(
            {
                "scenario": outcome.scenario.id,
                "generator": result.generator,
                "ops/s": format_ops(result.ops_per_s),
                "p50 ms": format_ms(result.p50_ms),
                "p99 ms": format_ms(result.p99_ms),
                "p99.9 ms": format_ms(result.p999_ms),
                "errors": "n/a" if result.errors is None else str(result.errors),
                "vs peers": format_ratios(ratios_of(outcome, by_id)),
                NOTES: result.notes,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, str]]) -> str:
    """A Markdown table, padded so it also reads well in a terminal; the notes column only
    when some row has notes."""
    columns = COLUMNS + ((NOTES,) if any(row.get(NOTES) for row in rows) else ())
    widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}

    def line(cells: dict[str, str]) -> str:
        padded = (
            cells[c].rjust(widths[c]) if c in RIGHT_ALIGNED else cells[c].ljust(widths[c])
            for c in columns
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (widths[c] + 1) + ":" if c in RIGHT_ALIGNED else "-" * (widths[c] + 2)
        for c in columns
    )
    return "\n".join([line({c: c for c in columns}), rule + "|", *(line(row) for row in rows)])


# --- the machine ------------------------------------------------------------------------------


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` of /proc/cpuinfo's text, or "unknown"."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers depend on: cores, CPU, load, Python, pyzmq, peers' versions."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(cpuinfo),
        "loadavg_at_start": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "tmp_filesystem": filesystem_of(Path(tempfile.gettempdir())),
        "tmp_fsync_p50_ms": fsync_p50_ms(Path(tempfile.gettempdir())),
        "wrk": tool_version(["wrk", "--version"]),
        "redis": tool_version(["redis-server", "--version"]),
        "webdis": _package_version("webdis"),
    }


def filesystem_of(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (the longest mount point above it), from
    /proc/mounts' text. The zkv clusters keep their data under the temporary directory."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, found = "", None
    resolved = str(path.resolve())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point, kind = fields[1], fields[2]
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, found = mount_point, kind
    return found


def fsync_p50_ms(directory: Path, count: int = FSYNC_PROBES) -> float | None:
    """Median time of an fsync after a small write there: what ZKV_FSYNC=always waits for."""
    samples = []
    try:
        with tempfile.NamedTemporaryFile(dir=directory) as probe:
            for _ in range(count):
                probe.write(b"x" * 64)
                probe.flush()
                began = time.perf_counter()
                os.fsync(probe.fileno())
                samples.append((time.perf_counter() - began) * 1000)
    except OSError:
        return None
    return round(sorted(samples)[len(samples) // 2], 4)


def machine_line(info: dict[str, Any]) -> str:
    """One line for the terminal and the docs."""
    load = info.get("loadavg_at_start")
    return (
        f"machine: {info['nproc']} cores, {info['cpu_model']}, Python {info['python']}, "
        f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']})"
        + (f", load average {load[0]:.1f} at start" if load else "")
    )


def git_state() -> dict[str, Any]:
    """The commit measured, and how many files differ from it (others work in the same tree)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit": commit or None, "changed_files": len(status.splitlines())}


def _package_version(package: str) -> str | None:
    try:
        completed = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout.strip() or None


# --- the JSON document ------------------------------------------------------------------------


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio_entry(found: Ratio) -> dict[str, Any]:
    entry = {"peer": found.peer, "metric": found.metric, "ratio": _rounded(found.value, 4)}
    if found.by_round:
        entry["by_round"] = [_rounded(value, 4) for value in found.by_round]
    return entry


def document(
    outcomes: Sequence[Outcome],
    info: dict[str, Any],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Everything about the run, one entry per selected scenario, ratios included."""
    by_id = {outcome.scenario.id: outcome for outcome in outcomes}
    scenarios = []
    for outcome in outcomes:
        entry: dict[str, Any] = {
            "id": outcome.scenario.id,
            "target": outcome.scenario.target,
            "about": outcome.scenario.about,
            "load": outcome.scenario.load,
            "op": outcome.scenario.op,
            "value_bytes": outcome.scenario.value_bytes,
            "hot_key": outcome.scenario.hot,
            "connections": outcome.scenario.connections,
            "in_flight_per_connection": outcome.scenario.depth,
            "settings": outcome.settings,
        }
        if outcome.result is None:
            entry["skipped"] = outcome.skipped
        else:
            result = asdict(outcome.result)
            entry.update(
                {
                    "generator": result.pop("generator"),
                    "ops_per_s": _rounded(result.pop("ops_per_s"), 1),
                    "p50_ms": _rounded(result.pop("p50_ms"), 4),
                    "p99_ms": _rounded(result.pop("p99_ms"), 4),
                    "p999_ms": _rounded(result.pop("p999_ms"), 4),
                    "errors": result.pop("errors"),
                    **result,
                    "elapsed_s": _rounded(result["elapsed_s"], 3),
                }
            )
            entry["ratios"] = {r.label: _ratio_entry(r) for r in ratios_of(outcome, by_id)}
        scenarios.append(entry)
    return {
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "run": run,
        "machine": info,
        "zkv": git_state(),
        "ratios": "ops: this row's ops/s / the peer's (above 1: faster); "
        "p50: this row's median latency / the peer's (above 1: slower); "
        "paired: the median over rounds of this row's ops/s / the peer's in the same round "
        "(by_round: each round's)",
        "scenarios": scenarios,
    }
