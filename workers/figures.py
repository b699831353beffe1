"""What a worker reports to the broker once a heartbeat interval (REPORT, zkv/protocol.py).

The figures are read from what the worker keeps anyway (the store's sizes, the log's size and
fsync timings, the shard's tally of answers), so making a report costs a few dict entries and
one small JSON encoding a second, and nothing on the request path. The broker keeps the last
report of each worker and answers STATS from them (docs/operations.md lists the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.shard import TALLY_SIZE, Shard
from zkv.protocol import FSYNC_BUCKETS_S, REPORT_COMMANDS, REPORT_STATUSES, Kind, Status

_COMMAND_KINDS = [(name, int(Kind[name])) for name in REPORT_COMMANDS]
_STATUS_CODES = [(name, int(Status[name])) for name in REPORT_STATUSES]


@dataclass(slots=True)
class WorkerCounters:
    """The worker's own counts, beyond its shard's (which go with the shard).

    Attributes:
        broker_silences: times the broker was silent for the liveness and the worker
            reconnected (heartbeats missed, seen from this side).
        last_ops: the tally total at the last report, and ``last_s`` its monotonic time, for
            the report's ops_per_s.
    """

    broker_silences: int = 0
    last_ops: int = 0
    last_s: float = 0.0
    last_shard: Shard | None = None


def figures(shard: Shard | None, counters: WorkerCounters, now_s: float) -> dict[str, object]:
    """The worker's report now (the fields of zkv.protocol.check_report)."""
    tally = shard.tally if shard is not None else [0] * TALLY_SIZE
    served = sum(tally)
    if shard is not counters.last_shard:  # another shard (or none): its tally starts anew
        counters.last_shard = shard
        counters.last_ops = 0
    elapsed_s = now_s - counters.last_s
    ops_per_s = (served - counters.last_ops) / elapsed_s if counters.last_s and elapsed_s > 0 else 0
    counters.last_ops = served
    counters.last_s = now_s
    requests: dict[str, dict[str, int]] = {}
    for command, kind in _COMMAND_KINDS:
        counts = {name: tally[kind << 3 | code] for name, code in _STATUS_CODES}
        counts = {name: count for name, count in counts.items() if count}
        if counts:
            requests[command] = counts
    files = None if shard is None else shard.files
    log_ = None if files is None else files.log
    store = None if shard is None else shard.store
    return {
        "shard": None if shard is None else shard.number,
        "epoch": 0 if shard is None else shard.epoch,
        "keys": 0 if store is None else len(store) - store.reserved,  # clients' keys only
        "keys_with_ttl": 0 if store is None else store._timed,
        "internal_keys": 0 if store is None else store.reserved,  # locks, fence tokens
        "internal_bytes": 0 if store is None else store.reserved_bytes,
        "expired": 0 if shard is None else shard.expired,
        "log_bytes": None if log_ is None else log_.size,
        "fsync_count": 0 if log_ is None else sum(log_.fsync_buckets),
        "fsync_seconds": 0.0 if log_ is None else round(log_.fsync_seconds, 6),
        "fsync_buckets": [0] * (len(FSYNC_BUCKETS_S) + 1)
        if log_ is None
        else list(log_.fsync_buckets),
        "compactions": 0 if files is None else files.compactions,
        "broker_silences": counters.broker_silences,
        "ops_per_s": round(max(0.0, ops_per_s), 3),
        "requests": requests,
    }
