"""The gateway's figures, and the cluster's as Prometheus metrics and as the status page's JSON.

Counting (the hot path). The gateway runs several processes (gunicorn workers), and a scrape
reaches one of them, so each process publishes its HTTP counts in its own *slot* of one
anonymous shared memory map that the master makes before it forks (:class:`HttpStats`); any
process reads every slot. A request costs a path lookup, a bisect and three increments of a
plain list (:meth:`HttpStats.record`); the list is copied into the process's slot in one C
call by :meth:`HttpStats.flush`, which the server's timeout sweep runs every 0.5 s and every
read runs first, so another process's figures are at most FLUSH_S old and a slot has one
writer (no lock). The master hands slots out as it forks workers and takes them back when one
exits (gunicorn's ``pre_fork``/``child_exit`` hooks): a respawned worker continues its
predecessor's counts, so counters never go down (a worker that dies loses its last half
second). Only the event worker class counts (its server, gateway/http11.py); under
``gthread`` the HTTP series stay at zero.

Exposition (once a scrape). ``/metrics`` asks the broker for STATS (zkv/protocol.py: its own
figures and each worker's last REPORT, kept by the broker, so a scrape asks no worker
anything) and renders everything with prometheus-client's own collector types and text
format. docs/operations.md lists every metric. Everything the broker sends is checked: a
malformed STATS answer gives ``zkv_broker_up 0`` and the HTTP series, never an error page.

The status page (``/v1/status``): the same STATS, shaped for gateway/page.py, plus the recent
latency of data requests. Each process samples the shared histograms when it serves a status
(at most once per STATUS_SAMPLE_S, the last HISTORY_S kept): since every process samples the
same shared counts, a page polling any of them gets a consistent history.
"""

from __future__ import annotations

import bisect
import mmap
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from zkv.protocol import FSYNC_BUCKETS_S, REPORT_COMMANDS, REPORT_STATUSES, Kind

# What a request is, for its labels: (method, route), route being the path template. Anything
# else is ("other", "other"), so a client cannot make new series (bounded label values).
ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/get"),
    ("GET", "/set"),
    ("GET", "/delete"),
    ("GET", "/all"),
    ("GET", "/v1/keys/{key}"),
    ("PUT", "/v1/keys/{key}"),
    ("DELETE", "/v1/keys/{key}"),
    ("GET", "/v1/keys"),
    # Issue 12: counters, deadlines, locks (README.md, REST API).
    ("POST", "/v1/keys/{key}/incr"),
    ("PATCH", "/v1/keys/{key}"),
    ("POST", "/v1/locks/{name}/refresh"),
    ("DELETE", "/v1/locks/{name}"),
    ("POST", "/v1/locks/{name}"),  # waits up to ?wait= by design: not a data route's latency
    ("GET", "/v1/watch"),  # a stream: its "latency" is how long it was watched
    ("GET", "/v1/health"),
    ("GET", "/v1/status"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("other", "other"),
)
# The label values the broker's counts may have (docs/protocol.md, STATS).
# Every client request kind of the protocol (issue 12 added INCR, EXPIRE and the lock kinds:
# a fixed list here refused the whole STATS, and /metrics said zkv_broker_up 0), as the broker
# counts them (broker/core.py), and the malformed ones.
MESSAGE_KINDS = (*(kind.name for kind in Kind if kind < Kind.REPLY), "malformed")
REMOVAL_REASONS = ("missed heartbeats", "disconnected", "unreachable", "registered again")
# The routes whose latency the status page shows: the data routes (not the page's own polls).
DATA_ROUTES = tuple(range(12))  # up to DELETE /v1/locks/{name}
# Status codes counted each on its own; any other is counted as "other".
# fmt: off
CODES = (
    200, 304, 400, 401, 403, 404, 405, 408, 409, 411, 412, 413, 414, 415, 429, 431,
    500, 501, 503, 504, 507,
)
# fmt: on
# Latency buckets, upper bounds in seconds (then +Inf).
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_ROUTE_OF = {(m.encode(), r.encode()): i for i, (m, r) in enumerate(ROUTES) if "{" not in r}
_KEYS_ROUTE = {
    method.encode(): ROUTES.index((method, "/v1/keys/{key}")) for method in ("GET", "PUT", "DELETE")
}
_KEYS_ROUTE[b"HEAD"] = _KEYS_ROUTE[b"GET"]
_KEYS_ROUTE[b"PATCH"] = ROUTES.index(("PATCH", "/v1/keys/{key}"))
_INCR_ROUTE = ROUTES.index(("POST", "/v1/keys/{key}/incr"))
_LOCK_ROUTE = {
    b"POST": ROUTES.index(("POST", "/v1/locks/{name}")),
    b"DELETE": ROUTES.index(("DELETE", "/v1/locks/{name}")),
}
_REFRESH_ROUTE = ROUTES.index(("POST", "/v1/locks/{name}/refresh"))
_OTHER_ROUTE = len(ROUTES) - 1
_CODE_OF = {code: i for i, code in enumerate(CODES)}
_NCODES = len(CODES) + 1  # and "other"
_NBUCKETS = len(LATENCY_BUCKETS_S) + 1  # and +Inf
# One slot: counts[route][code], then buckets[route][bucket] (not cumulative), then the
# latency sum per route in microseconds; unsigned 64-bit integers.
_COUNTS = 0
_BUCKETS = _COUNTS + len(ROUTES) * _NCODES
_SUMS = _BUCKETS + len(ROUTES) * _NBUCKETS
SLOT_WORDS = _SUMS + len(ROUTES)
# Per route: where its counts, its buckets and its sum start in a slot.
_OFFSETS = [
    (route * _NCODES, _BUCKETS + route * _NBUCKETS, _SUMS + route) for route in range(len(ROUTES))
]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # Prometheus's text format, as prometheus-client writes it
FLUSH_S = 0.5  # the server's sweep (gateway/http11.SWEEP_S) publishes a process's counts
STATUS_SAMPLE_S = 1.0  # the status page's latency samples: at most one a second per process
HISTORY_S = 600.0  # ... kept for ten minutes (600 samples at most)
RECENT_S = 60.0  # the "recent" latency of /v1/status: over about the last minute
MAX_HISTORY_POINTS = 120  # points of the latency graph in one /v1/status answer


class CountedWsgi:
    """The ``gthread`` worker class's HTTP counts: a WSGI wrapper that records each answered
    request as the event worker's server does (gateway/http11.py), under a lock (the app runs
    on several threads), publishing the process's counts at most every FLUSH_S. The latency is
    the app's time, from the call to its return (the body is sent after)."""

    FLUSH_S = 0.5

    def __init__(self, app: Any, stats: HttpStats) -> None:
        self.app = app
        self.stats = stats
        self._lock = threading.Lock()
        self._next_flush = 0.0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        started = time.monotonic()
        code = [500]

        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            code[0] = int(status[:3]) if status[:3].isdigit() else 500
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, start)
        finally:
            now = time.monotonic()
            method = str(environ.get("REQUEST_METHOD", "")).encode("latin-1", "replace")
            path = str(environ.get("PATH_INFO", "")).encode("latin-1", "replace")
            with self._lock:
                self.stats.record(method, path, code[0], now - started)
                if now >= self._next_flush:
                    self._next_flush = now + self.FLUSH_S
                    self.stats.flush()


class HttpStats:
    """HTTP request counts and latencies of every gateway process, in shared memory.

    Args:
        slots: how many processes may count at once (gunicorn's worker count).
    """

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, max(1, slots) * SLOT_WORDS * 8)  # anonymous, MAP_SHARED
        self._words = memoryview(self._map).cast("Q")
        self._free = list(range(slots))  # the master's bookkeeping (see claim/release)
        self.base = 0  # where this process's slot starts, in words
        # This process's counts since it began using its slot (the slot's value then, plus
        # what record() added), published by flush().
        self._local = [0] * SLOT_WORDS
        self._samples: deque[tuple[float, list[int]]] = deque()

    # --- the master: slots for its workers ---------------------------------------------------

    def claim(self) -> int:
        """A free slot for a worker about to be forked (the master's ``pre_fork``), or -1 when
        none is free: that worker's counts then stay its own, unpublished (two writers of one
        slot would overwrite each other's counts). The gateway makes twice as many slots as
        processes, for the new workers of a reload that overlap the old ones."""
        return self._free.pop(0) if self._free else -1

    def release(self, slot: int) -> None:
        """A worker exited (the master's ``child_exit``): its slot, counts kept, is free."""
        if slot not in self._free and 0 <= slot < self.slots:
            self._free.append(slot)

    def use(self, slot: int) -> None:
        """Count into ``slot`` from now on (the worker process, after the fork), continuing
        from what the slot holds (a respawned worker keeps its predecessor's counts); -1 (no
        slot free): count without publishing."""
        if not 0 <= slot < self.slots:
            self.base = -1
            self._local = [0] * SLOT_WORDS
            return
        self.base = slot * SLOT_WORDS
        self._local = self._words[self.base : self.base + SLOT_WORDS].tolist()

    def flush(self) -> None:
        """Publish this process's counts in its slot (one copy, C speed)."""
        if self.base >= 0:
            self._words[self.base : self.base + SLOT_WORDS] = array("Q", self._local)

    # --- the hot path ------------------------------------------------------------------------

    def record(self, method: bytes, target: bytes, code: int, took_s: float) -> None:
        """Count one answered request (gateway/http11.py, as it writes the response)."""
        end = target.find(b"?")
        path = target if end < 0 else target[:end]
        route = _ROUTE_OF.get((method, path))
        if route is None:
            if path.startswith(b"/v1/keys/"):
                if method == b"POST":  # the one POST under /v1/keys/ (the app routes it so)
                    route = _INCR_ROUTE if path.endswith(b"/incr") else _OTHER_ROUTE
                else:
                    route = _KEYS_ROUTE.get(method, _OTHER_ROUTE)
            elif path.startswith(b"/v1/locks/"):
                if method == b"POST" and path.endswith(b"/refresh"):  # routed first, as here
                    route = _REFRESH_ROUTE
                else:
                    route = _LOCK_ROUTE.get(method, _OTHER_ROUTE)
            else:
                route = (
                    _ROUTE_OF.get((b"GET", path), _OTHER_ROUTE)
                    if method == b"HEAD"
                    else _OTHER_ROUTE
                )
        counts, buckets, sums = _OFFSETS[route]
        local = self._local
        local[counts + _CODE_OF.get(code, _NCODES - 1)] += 1
        local[buckets + bisect.bisect_left(LATENCY_BUCKETS_S, took_s)] += 1
        local[sums] += int(took_s * 1e6)

    # --- reading -----------------------------------------------------------------------------

    def totals(self) -> list[int]:
        """Every slot's words added up: the counts of the whole gateway (this process's own
        published first, so they are current)."""
        self.flush()
        words = self._words.tolist()
        total = words[:SLOT_WORDS]
        for slot in range(1, self.slots):
            start = slot * SLOT_WORDS
            total = [a + b for a, b in zip(total, words[start : start + SLOT_WORDS], strict=True)]
        return total

    def latency_buckets(self, totals: list[int], routes: tuple[int, ...]) -> list[int]:
        """The latency bucket counts (not cumulative) of ``routes`` together."""
        merged = [0] * _NBUCKETS
        for route in routes:
            start = _BUCKETS + route * _NBUCKETS
            merged = [a + b for a, b in zip(merged, totals[start : start + _NBUCKETS], strict=True)]
        return merged

    def sample(self, now: float) -> None:
        """Keep the data routes' latency buckets now, for /v1/status (at most one a second)."""
        samples = self._samples
        if samples and now - samples[-1][0] < STATUS_SAMPLE_S:
            return
        samples.append((now, self.latency_buckets(self.totals(), DATA_ROUTES)))
        while samples and now - samples[0][0] > HISTORY_S:
            samples.popleft()

    def latency(self, now: float) -> dict[str, Any]:
        """The status page's latency: over the last RECENT_S, and its history (after
        :meth:`sample`): quantiles in milliseconds, interpolated within buckets."""
        samples = list(self._samples)
        if not samples:
            return {"window_s": 0, "requests": 0, "p50_ms": None, "p99_ms": None, "history": []}
        last_t, last = samples[-1]
        first_t, first = samples[0]
        for sample_t, sample in samples:
            if last_t - sample_t <= RECENT_S:
                first_t, first = sample_t, sample
                break
        recent = [b - a for a, b in zip(first, last, strict=True)]
        step = max(1, (len(samples) - 1 + MAX_HISTORY_POINTS - 1) // MAX_HISTORY_POINTS)
        history = []
        for index in range(step, len(samples), step):
            (t0, before), (t1, after) = samples[index - step], samples[index]
            counts = [b - a for a, b in zip(before, after, strict=True)]
            requests = sum(counts)
            history.append(
                {
                    "t": round(t1, 3),
                    "rps": round(requests / (t1 - t0), 3) if t1 > t0 else 0.0,
                    "p50_ms": _quantile_ms(counts, 0.5),
                    "p99_ms": _quantile_ms(counts, 0.99),
                }
            )
        return {
            "window_s": round(last_t - first_t, 3),
            "requests": sum(recent),
            "p50_ms": _quantile_ms(recent, 0.5),
            "p99_ms": _quantile_ms(recent, 0.99),
            "history": history,
        }


def _quantile_ms(counts: list[int], q: float) -> float | None:
    """The q-quantile of bucket counts (not cumulative), linearly within its bucket, in ms;
    None without requests. The +Inf bucket answers its lower bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            low = LATENCY_BUCKETS_S[index - 1] if index else 0.0
            if index >= len(LATENCY_BUCKETS_S):
                return round(low * 1000, 3)
            high = LATENCY_BUCKETS_S[index]
            return round((low + (high - low) * (rank - seen) / count) * 1000, 3)
        seen += count
    return round(LATENCY_BUCKETS_S[-1] * 1000, 3)


# --- reading the broker's STATS defensively ----------------------------------------------------


class BadStats(ValueError):
    """The broker's STATS answer is not what docs/protocol.md describes."""


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadStats(f"not a count: {str(value)[:40]!r}")
    return value


def _num(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise BadStats(f"not a number: {str(value)[:40]!r}")
    return float(value)


def _dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadStats("not an object")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise BadStats("not a list")
    return value


def _known(value: object, names: tuple[str, ...]) -> dict[str, int]:
    """The counts of an object whose keys must be among ``names`` (label values are a fixed
    set, whatever the broker sends)."""
    counts = _dict(value)
    if not set(counts) <= set(names):
        raise BadStats(f"unknown names {sorted(map(str, set(counts) - set(names)))[:3]}")
    return {name: _int(count) for name, count in counts.items()}


def cluster_view(stats: dict[str, Any]) -> dict[str, Any]:
    """The broker's STATS checked and reduced to what the metrics and the page use: the
    broker's figures and, per shard, its owner's report (a former owner's stale report is
    left out, so every shard has at most one of each series).

    Raises:
        BadStats: anything out of shape.
    """
    broker = _dict(stats.get("broker"))
    shards = _int(broker.get("shards"))
    if not 1 <= shards <= 1 << 16:
        raise BadStats(f"shards out of range: {shards}")
    owned = [bool(flag) for flag in _list(broker.get("owned"))]
    owner_ids = [None if o is None else str(o)[:16] for o in _list(broker.get("owners"))]
    per_shard = {
        name: [_int(v) for v in _list(broker.get(name))]
        for name in ("owner_losses", "failovers", "waiting_for_owner")
    }
    if (
        len(owned) != shards
        or len(owner_ids) != shards
        or any(len(v) != shards for v in per_shard.values())
    ):
        raise BadStats("per-shard lists of the wrong length")
    owners: dict[int, dict[str, Any]] = {}
    standbys: list[dict[str, Any]] = []
    for report in _list(stats.get("workers")):
        report = _dict(report)
        worker = str(report.get("worker", ""))[:16]
        assigned = report.get("assigned")
        shard = report.get("shard")
        if assigned is None:
            standbys.append({"worker": worker, "age_s": _num(report.get("age_s"))})
            continue
        assigned = _int(assigned)
        if shard != assigned or assigned >= shards or assigned in owners:
            continue  # not (yet) serving what the broker assigned: no series from it
        requests = {}
        for command, by_status in _dict(report.get("requests")).items():
            if command in REPORT_COMMANDS:
                requests[command] = {
                    status: _int(count)
                    for status, count in _dict(by_status).items()
                    if status in REPORT_STATUSES
                }
        buckets = [_int(v) for v in _list(report.get("fsync_buckets"))]
        if len(buckets) != len(FSYNC_BUCKETS_S) + 1:
            raise BadStats("fsync_buckets of the wrong length")
        log_bytes = report.get("log_bytes")
        owners[assigned] = {
            "worker": worker,
            "age_s": _num(report.get("age_s")),
            "epoch": _int(report.get("epoch")),
            "keys": _int(report.get("keys")),
            "keys_with_ttl": _int(report.get("keys_with_ttl")),
            "internal_keys": _int(report.get("internal_keys", 0)),
            "internal_bytes": _int(report.get("internal_bytes", 0)),
            "expired": _int(report.get("expired")),
            "log_bytes": None if log_bytes is None else _int(log_bytes),
            "fsync_buckets": buckets,
            "fsync_seconds": _num(report.get("fsync_seconds")),
            "compactions": _int(report.get("compactions")),
            "broker_silences": _int(report.get("broker_silences")),
            "ops_per_s": _num(report.get("ops_per_s")),
            "requests": requests,
        }
    return {
        "uptime_s": _num(broker.get("uptime_s")),
        "shards": shards,
        "owned": owned,
        "owner_ids": owner_ids,
        "workers": _int(broker.get("workers")),
        "standbys": standbys,
        "standby_count": _int(broker.get("standbys")),
        "messages": _known(broker.get("messages"), MESSAGE_KINDS),
        "batched_requests": _int(broker.get("batched_requests")),
        "answered": _known(broker.get("answered"), REPORT_STATUSES),
        "gauges": {
            name: _int(broker.get(name))
            for name in (
                "held_requests",
                "held_bytes",
                "requests_at_workers",
                "dispatches_at_workers",
                "keys_in_flight",
                "requests_waiting_for_token",
            )
        },
        # LOCKs parked at the broker until their lock frees or their wait runs out (at most
        # MAX_LOCK_WAITERS, 10,000); 0 from a broker that has no lock waits.
        "lock_waiters": _int(broker.get("lock_waiters", 0)),
        "workers_removed": _known(broker.get("workers_removed"), REMOVAL_REASONS),
        **per_shard,
        "owners": owners,
    }


# --- Prometheus --------------------------------------------------------------------------------


class _Snapshot(Collector):
    """A collector over figures already gathered (one scrape's)."""

    def __init__(self, http: HttpStats, cluster: dict[str, Any] | None) -> None:
        self.http = http
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        yield from _http_metrics(self.http)
        yield from _cluster_metrics(self.cluster)


def render(http: HttpStats, cluster: dict[str, Any] | None) -> bytes:
    """The Prometheus text format of the gateway's figures and the cluster's (None: the
    broker did not answer, ``zkv_broker_up 0``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(http, cluster))
    return generate_latest(registry)


def _http_metrics(http: HttpStats) -> Iterator[Metric]:
    totals = http.totals()
    requests = CounterMetricFamily(
        "zkv_http_requests",
        "HTTP requests answered by the gateway, by method, route and status code.",
        labels=["method", "route", "code"],
    )
    latency = HistogramMetricFamily(
        "zkv_http_request_duration_seconds",
        "Time from a request's turn on its connection to its response, by method and route.",
        labels=["method", "route"],
    )
    code_names = [str(code) for code in CODES] + ["other"]
    for route, (method, path) in enumerate(ROUTES):
        for index, name in enumerate(code_names):
            count = totals[_COUNTS + route * _NCODES + index]
            if count:
                requests.add_metric([method, path, name], count)
        buckets = totals[_BUCKETS + route * _NBUCKETS : _BUCKETS + (route + 1) * _NBUCKETS]
        if sum(buckets):
            cumulative = 0
            pairs = []
            for bound, count in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], buckets, strict=True):
                cumulative += count
                pairs.append((bound, cumulative))
            latency.add_metric([method, path], pairs, totals[_SUMS + route] / 1e6)
    yield requests
    yield latency


def _cluster_metrics(cluster: dict[str, Any] | None) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "zkv_broker_up",
        "1 if the broker answered this scrape's STATS, else 0.",
        value=int(bool(cluster)),
    )
    if not cluster:
        return
    yield GaugeMetricFamily(
        "zkv_broker_uptime_seconds", "Seconds since the broker started.", value=cluster["uptime_s"]
    )
    messages = CounterMetricFamily(
        "zkv_zmq_messages",
        "Client messages the broker received, by kind (GET, SET, DEL, ALL, PING, STATS, BATCH, "
        "INCR, EXPIRE, LOCK, REFRESH, UNLOCK, FENCE_CHECK, malformed).",
        labels=["kind"],
    )
    for kind, count in sorted(cluster["messages"].items()):
        messages.add_metric([kind], count)
    yield messages
    yield CounterMetricFamily(
        "zkv_zmq_batched_requests",
        "Requests carried in BATCH messages.",
        value=cluster["batched_requests"],
    )
    answered = CounterMetricFamily(
        "zkv_broker_answered_requests",
        "Requests the broker answered itself, not a worker, by status (BUSY: over a limit; "
        "UNAVAILABLE: no owner or no answer in time; ERROR: malformed).",
        labels=["status"],
    )
    for status, count in sorted(cluster["answered"].items()):
        answered.add_metric([status], count)
    yield answered
    gauges = cluster["gauges"]
    for name, text in (
        ("held_requests", "Requests admitted by the broker and not yet answered."),
        ("held_bytes", "Bytes of the requests the broker holds (as dispatched)."),
        ("requests_at_workers", "Requests dispatched to workers and not yet answered."),
        ("dispatches_at_workers", "Dispatches (DISPATCH, BATCH_DISPATCH) at workers."),
        ("keys_in_flight", "Keys whose token is out (a request for them is at a worker)."),
        ("requests_waiting_for_token", "Requests waiting for their key's token."),
    ):
        yield GaugeMetricFamily(f"zkv_broker_{name}", text, value=gauges[name])
    yield GaugeMetricFamily(
        "zkv_broker_lock_waiters",
        "LOCK requests parked at the broker until their lock frees or their wait runs out.",
        value=cluster["lock_waiters"],
    )
    yield GaugeMetricFamily(
        "zkv_broker_workers", "Workers registered with the broker.", value=cluster["workers"]
    )
    yield GaugeMetricFamily(
        "zkv_broker_standbys",
        "Registered workers that own no shard.",
        value=cluster["standby_count"],
    )
    removed = CounterMetricFamily(
        "zkv_broker_workers_removed",
        "Workers the broker removed, by reason ('missed heartbeats', 'disconnected', "
        "'unreachable', 'registered again').",
        labels=["reason"],
    )
    for reason, count in sorted(cluster["workers_removed"].items()):
        removed.add_metric([reason], count)
    yield removed
    per_shard = (
        ("zkv_shard_owned", GaugeMetricFamily, "1 if the shard has an owner, else 0.", "owned"),
        (
            "zkv_shard_owner_losses",
            CounterMetricFamily,
            "Times the shard's owner was removed (a failover began).",
            "owner_losses",
        ),
        (
            "zkv_shard_failovers",
            CounterMetricFamily,
            "Times the shard got an owner again after losing one (not its first owner).",
            "failovers",
        ),
        (
            "zkv_shard_requests_waiting_for_owner",
            GaugeMetricFamily,
            "Requests of the shard waiting for an owner.",
            "waiting_for_owner",
        ),
    )
    for name, family, text, field in per_shard:
        metric = family(name, text, labels=["shard"])
        for shard, value in enumerate(cluster[field]):
            metric.add_metric([str(shard)], int(value))
        yield metric
    owners = cluster["owners"]
    for name, text, field in (
        ("zkv_shard_keys", "Keys in the shard (expired ones not yet removed included).", "keys"),
        ("zkv_shard_keys_with_ttl", "Keys of the shard that have a deadline.", "keys_with_ttl"),
        ("zkv_shard_internal_keys", "The worker's own lock and fence records.", "internal_keys"),
        ("zkv_shard_internal_bytes", "Their bytes (RESERVED_MAX_BYTES bound).", "internal_bytes"),
        ("zkv_shard_log_bytes", "Size of the shard's log file (absent: in memory).", "log_bytes"),
        (
            "zkv_shard_ops_per_second",
            "Requests the owner served per second, last report.",
            "ops_per_s",
        ),
        ("zkv_shard_report_age_seconds", "Age of the owner's last report at the broker.", "age_s"),
    ):
        metric = GaugeMetricFamily(name, text, labels=["shard"])
        for shard, report in sorted(owners.items()):
            if report[field] is not None:
                metric.add_metric([str(shard)], report[field])
        yield metric
    for name, text, field in (
        (
            "zkv_shard_expired_keys",
            "Keys removed by active expiry since the owner took the shard.",
            "expired",
        ),
        ("zkv_shard_compactions", "Log compactions since the owner took the shard.", "compactions"),
        (
            "zkv_worker_broker_silences",
            "Times the shard's owner heard nothing from the broker for its liveness and "
            "reconnected (heartbeats missed, seen from the worker).",
            "broker_silences",
        ),
    ):
        metric = CounterMetricFamily(name, text, labels=["shard"])
        for shard, report in sorted(owners.items()):
            metric.add_metric([str(shard)], report[field])
        yield metric
    served = CounterMetricFamily(
        "zkv_shard_requests",
        "Requests the shard's owner answered since it took the shard, by command and status.",
        labels=["shard", "command", "status"],
    )
    fsync = HistogramMetricFamily(
        "zkv_shard_fsync_duration_seconds",
        "fsyncs of the shard's log since the owner took it, by duration.",
        labels=["shard"],
    )
    for shard, report in sorted(owners.items()):
        for command, by_status in sorted(report["requests"].items()):
            for status, count in sorted(by_status.items()):
                served.add_metric([str(shard), command, status], count)
        if report["log_bytes"] is not None:
            cumulative = 0
            pairs = []
            bounds = [*map(str, FSYNC_BUCKETS_S), "+Inf"]
            for bound, count in zip(bounds, report["fsync_buckets"], strict=True):
                cumulative += count
                pairs.append((bound, cumulative))
            fsync.add_metric([str(shard)], pairs, report["fsync_seconds"])
    yield served
    yield fsync


# --- the status page's JSON ---------------------------------------------------------------------


def status_document(
    http: HttpStats, cluster: dict[str, Any] | None, error: str | None, now: float | None = None
) -> dict[str, Any]:
    """The body of GET /v1/status (docs/operations.md describes it field by field)."""
    now = time.time() if now is None else now
    http.sample(now)
    latency = http.latency(now)
    if cluster is None:
        return {
            "status": "unavailable",
            "error": error or "no answer from the broker",
            "time": round(now, 3),
            "shards": [],
            "standbys": [],
            "workers": 0,
            "latency": latency,
        }
    owners = cluster["owners"]
    shards = []
    for shard in range(cluster["shards"]):
        report = owners.get(shard)
        owned = cluster["owned"][shard]
        shards.append(
            {
                "shard": shard,
                "owned": owned,
                "owner": cluster["owner_ids"][shard] if owned else None,
                "keys": None if report is None else report["keys"],
                "ops_per_s": None if report is None else report["ops_per_s"],
                "log_bytes": None if report is None else report["log_bytes"],
                "epoch": None if report is None else report["epoch"],
                "failovers": cluster["failovers"][shard],
            }
        )
    return {
        "status": "ok" if all(cluster["owned"]) else "degraded",
        "time": round(now, 3),
        "uptime_s": cluster["uptime_s"],
        "shards": shards,
        "standbys": cluster["standbys"],
        "workers": cluster["workers"],
        "latency": latency,
    }
