"""Latency percentiles and the record of one measured scenario.

Percentiles use the nearest-rank method: the p-th percentile of n sorted samples is the sample
at rank ``ceil(p / 100 * n)`` (1-based). It always returns a latency that was really observed,
never an interpolation between two, and it is what wrk and HdrHistogram report too. With fewer
than 1,000 samples the p99.9 is simply the largest one, so short runs overstate the tail: the
table is meant to be read with ``count`` beside it (it is in the JSON).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NS_PER_MS = 1_000_000
PERCENTILES = (50.0, 99.0, 99.9)


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of samples already sorted ascending.

    Args:
        sorted_samples: at least one sample, in ascending order.
        p: the percentile, 0 < p <= 100.

    Raises:
        ValueError: no samples, or ``p`` out of range.
    """
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    # The small epsilon keeps 99.9 / 100 * 1000 = 999.0000000000001 at rank 999, not 1000.
    rank = math.ceil(p / 100 * len(sorted_samples) - 1e-9)
    return sorted_samples[max(1, rank) - 1]


@dataclass(slots=True)
class LoadResult:
    """What one load generator measured against one target.

    Attributes:
        generator: which tool produced the numbers (``wrk``, ``python-http``, ``zkv.Client``,
            ``dealer-pipeline``, ``redis-benchmark``).
        ops: operations that succeeded.
        errors: operations that failed (error statuses, exceptions, lost replies); None when the
            generator does not report them.
        elapsed_s: wall time of the measured part of the run.
        p50_ms, p99_ms, p999_ms: latency percentiles in milliseconds; None when unknown.
        count: how many latencies the percentiles come from.
        details: anything else worth keeping in the JSON (error kinds, tool output).
        bytes_per_key: memory scenarios: what the system under test holds per key.
        notes: one short line for the table's notes column (floors met or missed, ...).
        round_ops_per_s: paired rows (bench/paired.py): the ops/s of each round, in order, so
            that a ``paired`` ratio divides round by round; empty otherwise.
    """

    generator: str
    ops: int
    errors: int | None
    elapsed_s: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    count: int = 0
    ops_per_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    bytes_per_key: float | None = None
    notes: str = ""
    round_ops_per_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.ops_per_s is None:
            self.ops_per_s = self.ops / self.elapsed_s if self.elapsed_s > 0 else 0.0


def summarize(
    generator: str,
    latencies_ns: list[int],
    ops: int,
    errors: int,
    elapsed_s: float,
    details: dict[str, Any] | None = None,
) -> LoadResult:
    """A :class:`LoadResult` from raw per-operation latencies in nanoseconds (sorted in place)."""
    latencies_ns.sort()
    p50: float | None
    p99: float | None
    p999: float | None
    if latencies_ns:
        p50, p99, p999 = (percentile(latencies_ns, p) / NS_PER_MS for p in PERCENTILES)
    else:
        p50 = p99 = p999 = None
    return LoadResult(
        generator=generator,
        ops=ops,
        errors=errors,
        elapsed_s=elapsed_s,
        p50_ms=p50,
        p99_ms=p99,
        p999_ms=p999,
        count=len(latencies_ns),
        details=details or {},
    )
