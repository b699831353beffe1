"""The gateway's /metrics, /v1/status and status page (issue 13), through WSGI with a fake
client, and its shared HTTP counts. No sockets."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.app import make_app
from gateway.metrics import BadStats, HttpStats, cluster_view, render, status_document
from tests.unit.test_gateway import call
from zkv.errors import Unavailable
from zkv.protocol import FSYNC_BUCKETS_S

pytestmark = pytest.mark.unit


def worker(shard: int | None, assigned: int | None, **changes: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "worker": f"w{assigned}",
        "age_s": 0.5,
        "assigned": assigned,
        "shard": shard,
        "epoch": 9,
        "keys": 10,
        "keys_with_ttl": 4,
        "internal_keys": 2,
        "internal_bytes": 90,
        "expired": 3,
        "log_bytes": 2048,
        "fsync_count": 2,
        "fsync_seconds": 0.002,
        "fsync_buckets": [1, 1] + [0] * (len(FSYNC_BUCKETS_S) - 1),
        "compactions": 1,
        "broker_silences": 0,
        "ops_per_s": 12.5,
        "requests": {"GET": {"OK": 5, "NOT_FOUND": 2}, "SET": {"OK": 3}},
    }
    report.update(changes)
    return report


def stats(owned: tuple[bool, bool] = (True, True), **broker: Any) -> dict[str, Any]:
    workers = [worker(0, 0), worker(None, None)]
    if owned[1]:
        workers.append(worker(1, 1, keys=20))
    return {
        "broker": {
            "uptime_s": 5.0,
            "shards": 2,
            "epoch": 1,
            "owned": list(owned),
            "owners": ["aaaa0000" if owned[0] else None, "bbbb1111" if owned[1] else None],
            "workers": 2 + owned[1],
            "standbys": 1,
            "messages": {"GET": 4, "BATCH": 1, "malformed": 0},
            "batched_requests": 10,
            "answered": {"OK": 0, "BUSY": 2},
            "held_requests": 1,
            "held_bytes": 30,
            "requests_at_workers": 1,
            "dispatches_at_workers": 1,
            "keys_in_flight": 1,
            "requests_waiting_for_token": 0,
            "waiting_for_owner": [0, 3],
            "owner_losses": [0, 1],
            "failovers": [0, 1],
            "workers_removed": {"missed heartbeats": 1},
            **broker,
        },
        "workers": workers,
    }


class StatsClient:
    """What the routes need of a client: stats(), or the error it raises."""

    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer = answer

    def stats(self) -> dict[str, Any]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text answer, parsed by prometheus-client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


# --- the shared HTTP counts ---------------------------------------------------------------------


def test_requests_are_counted_by_route_method_and_code() -> None:
    http = HttpStats()
    http.record(b"GET", b"/get?key=a", 200, 0.0007)
    http.record(b"GET", b"/get?key=b", 200, 0.0030)
    http.record(b"PUT", b"/v1/keys/a/b", 200, 0.002)
    http.record(b"HEAD", b"/v1/health", 503, 0.001)
    http.record(b"GET", b"/no/such/route/" + b"x" * 100, 404, 0.0001)
    http.record(b"BREW", b"/get", 418, 0.0001)
    found = samples(render(http, None))
    assert (
        found[("zkv_http_requests_total", (("code", "200"), ("method", "GET"), ("route", "/get")))]
        == 2
    )
    put = (("code", "200"), ("method", "PUT"), ("route", "/v1/keys/{key}"))
    assert found[("zkv_http_requests_total", put)] == 1
    health = (("code", "503"), ("method", "GET"), ("route", "/v1/health"))
    assert found[("zkv_http_requests_total", health)] == 1
    # Anything unknown is one bounded series, never a new label value.
    other = (("code", "other"), ("method", "other"), ("route", "other"))
    assert found[("zkv_http_requests_total", other)] == 1
    get = (("method", "GET"), ("route", "/get"))
    assert found[("zkv_http_request_duration_seconds_count", get)] == 2
    assert found[("zkv_http_request_duration_seconds_bucket", (("le", "0.001"), *get))] == 1
    assert found[("zkv_http_request_duration_seconds_sum", get)] == pytest.approx(0.0037)
    assert found[("zkv_broker_up", ())] == 0


def test_the_routes_of_issue_12_have_their_own_labels_and_codes() -> None:
    """Counters, deadlines and locks each a route of their own (they were "other"), and their
    refusals (304, 409, 412) each a code of their own."""
    http = HttpStats()
    http.record(b"POST", b"/v1/keys/a/b/incr?by=2", 200, 0.001)
    http.record(b"POST", b"/v1/keys/a/incr", 409, 0.001)
    http.record(b"PATCH", b"/v1/keys/a?ttl=none", 200, 0.001)
    http.record(b"PUT", b"/v1/keys/a/incr", 412, 0.001)  # a key ending in /incr: a PUT
    http.record(b"GET", b"/v1/keys/a", 304, 0.001)
    http.record(b"POST", b"/v1/locks/jobs/x?ttl=1", 200, 0.001)
    http.record(b"POST", b"/v1/locks/jobs/x/refresh?token=1&ttl=1", 409, 0.001)
    http.record(b"DELETE", b"/v1/locks/jobs/x?token=1", 200, 0.001)
    http.record(b"POST", b"/v1/keys/a", 405, 0.001)  # no such route: one bounded series
    found = samples(render(http, None))

    def count(method: str, route: str, code: str) -> float:
        labels = (("code", code), ("method", method), ("route", route))
        return found.get(("zkv_http_requests_total", labels), 0)

    assert count("POST", "/v1/keys/{key}/incr", "200") == 1
    assert count("POST", "/v1/keys/{key}/incr", "409") == 1
    assert count("PATCH", "/v1/keys/{key}", "200") == 1
    assert count("PUT", "/v1/keys/{key}", "412") == 1
    assert count("GET", "/v1/keys/{key}", "304") == 1
    assert count("POST", "/v1/locks/{name}", "200") == 1
    assert count("POST", "/v1/locks/{name}/refresh", "409") == 1
    assert count("DELETE", "/v1/locks/{name}", "200") == 1
    assert count("other", "other", "405") == 1


def test_every_process_counts_into_its_own_slot_of_one_shared_map() -> None:
    http = HttpStats(slots=2)
    first = http.claim()
    second = http.claim()
    assert (first, second) == (0, 1)
    pid = os.fork()
    if pid == 0:  # the child: a worker process counting into its slot
        try:
            http.use(second)
            for _ in range(3):
                http.record(b"GET", b"/set?key=a&value=b", 200, 0.001)
            http.flush()  # as the server's sweep does every 0.5 s
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    http.use(first)
    http.record(b"GET", b"/set?key=a&value=b", 200, 0.001)
    found = samples(render(http, None))
    set_ok = (("code", "200"), ("method", "GET"), ("route", "/set"))
    assert found[("zkv_http_requests_total", set_ok)] == 4
    # A slot freed by an exited worker is handed to the next one, its counts kept.
    http.release(second)
    assert http.claim() == second
    # With no slot free, a process counts without publishing: never two writers of a slot.
    assert http.claim() == -1
    http.use(-1)
    http.record(b"GET", b"/set?key=a", 200, 0.001)
    http.use(first)
    assert samples(render(http, None))[("zkv_http_requests_total", set_ok)] == 4


# --- the cluster's metrics ------------------------------------------------------------------------


def test_the_cluster_is_rendered_from_stats() -> None:
    found = samples(render(HttpStats(), cluster_view(stats())))
    assert found[("zkv_broker_up", ())] == 1
    assert found[("zkv_zmq_messages_total", (("kind", "GET"),))] == 4
    assert found[("zkv_broker_answered_requests_total", (("status", "BUSY"),))] == 2
    assert found[("zkv_shard_owned", (("shard", "1"),))] == 1
    assert found[("zkv_shard_failovers_total", (("shard", "1"),))] == 1
    assert found[("zkv_shard_keys", (("shard", "1"),))] == 20
    assert found[("zkv_shard_log_bytes", (("shard", "0"),))] == 2048
    assert found[("zkv_shard_internal_keys", (("shard", "0"),))] == 2
    assert found[("zkv_shard_internal_bytes", (("shard", "0"),))] == 90
    assert found[("zkv_shard_expired_keys_total", (("shard", "0"),))] == 3
    assert found[("zkv_shard_compactions_total", (("shard", "0"),))] == 1
    assert found[("zkv_shard_requests_waiting_for_owner", (("shard", "1"),))] == 3
    assert found[("zkv_broker_workers_removed_total", (("reason", "missed heartbeats"),))] == 1
    served = (("command", "GET"), ("shard", "0"), ("status", "NOT_FOUND"))
    assert found[("zkv_shard_requests_total", served)] == 2
    fsync = (("le", "0.001"), ("shard", "0"))
    assert found[("zkv_shard_fsync_duration_seconds_bucket", fsync)] == 2
    assert found[("zkv_broker_requests_waiting_for_token", ())] == 0


def test_the_message_kinds_of_issue_12_are_counted() -> None:
    """The broker counts every request kind by name; INCR, EXPIRE and the lock kinds made the
    gateway refuse the whole STATS (zkv_broker_up 0) while its list of kinds was fixed."""
    kinds = {"GET": 1, "INCR": 2, "EXPIRE": 3, "LOCK": 4, "REFRESH": 5, "UNLOCK": 6}
    found = samples(render(HttpStats(), cluster_view(stats(messages={**kinds, "FENCE_CHECK": 7}))))
    assert found[("zkv_broker_up", ())] == 1
    for kind, count in [*kinds.items(), ("FENCE_CHECK", 7)]:
        assert found[("zkv_zmq_messages_total", (("kind", kind),))] == count
    assert found[("zkv_broker_lock_waiters", ())] == 0  # a broker that reports none
    found = samples(render(HttpStats(), cluster_view(stats(lock_waiters=3))))
    assert found[("zkv_broker_lock_waiters", ())] == 3
    with pytest.raises(BadStats):
        cluster_view(stats(lock_waiters=-1))


def test_a_former_owners_report_makes_no_series() -> None:
    answer = stats()
    answer["workers"].append(worker(0, 0, keys=999))  # a second report for shard 0
    answer["workers"].append(worker(1, 0, keys=777))  # serving a shard it was not assigned
    view = cluster_view(answer)
    assert view["owners"][0]["keys"] == 10 and view["owners"][1]["keys"] == 20


@pytest.mark.parametrize(
    "bad",
    [
        {"broker": []},
        {"broker": {**stats()["broker"], "owned": [True]}},
        {"broker": {**stats()["broker"], "shards": 0}},
        {"broker": {**stats()["broker"], "held_requests": -1}},
        {"broker": {**stats()["broker"], "held_requests": "1"}},
        {**stats(), "workers": [worker(0, 0, keys=True)]},
        {**stats(), "workers": [worker(0, 0, fsync_buckets=[1])]},
        {**stats(), "workers": "x"},
        {"broker": {**stats()["broker"], "messages": {f"kind{i}": 1 for i in range(1000)}}},
        {"broker": {**stats()["broker"], "workers_removed": {"eaten": 1}}},
    ],
)
def test_a_malformed_stats_answer_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(BadStats):
        cluster_view(bad)


# --- the routes ---------------------------------------------------------------------------------


def test_metrics_route_answers_prometheus_text() -> None:
    app = make_app(lambda: StatsClient(stats()))  # type: ignore[arg-type, return-value]
    response = call(app, "GET", "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert samples(response.body)[("zkv_broker_up", ())] == 1


@pytest.mark.parametrize(
    "answer", [Unavailable("broker unreachable"), {"broker": {"shards": "two"}}]
)
def test_metrics_without_a_usable_broker_still_answer(answer: Any) -> None:
    app = make_app(lambda: StatsClient(answer))  # type: ignore[arg-type, return-value]
    response = call(app, "GET", "/metrics")
    assert response.status == 200
    assert samples(response.body)[("zkv_broker_up", ())] == 0
    status = call(app, "GET", "/v1/status")
    assert status.status == 200 and status.json()["status"] == "unavailable"


def test_status_shows_each_shard_its_owner_and_the_standbys() -> None:
    app = make_app(lambda: StatsClient(stats(owned=(True, False))), clock=lambda: 1000.0)  # type: ignore[arg-type, return-value]
    document = call(app, "GET", "/v1/status").json()
    assert document["status"] == "degraded"
    assert document["shards"][0] == {
        "shard": 0,
        "owned": True,
        "owner": "aaaa0000",
        "keys": 10,
        "ops_per_s": 12.5,
        "log_bytes": 2048,
        "epoch": 9,
        "failovers": 0,
    }
    assert document["shards"][1]["owner"] is None and document["shards"][1]["keys"] is None
    assert document["standbys"] == [{"worker": "wNone", "age_s": 0.5}]
    assert set(document["latency"]) == {"window_s", "requests", "p50_ms", "p99_ms", "history"}


def test_status_latency_is_the_recent_quantiles_and_their_history() -> None:
    http = HttpStats()
    for t in range(5):
        for _ in range(100):
            http.record(b"GET", b"/get?key=a", 200, 0.002)  # 1 .. 2.5 ms
        for _ in range(2):
            http.record(b"GET", b"/get?key=a", 200, 0.2)  # two slow ones a second: 2%
        http.record(b"GET", b"/v1/status", 200, 3.0)  # the page's own polls are left out
        status_document(http, None, "down", now=1000.0 + t)
    latency = status_document(http, None, "down", now=1005.0)["latency"]
    # Samples at 1000 .. 1005: what was counted after the first of them.
    assert latency["requests"] == 408 and latency["window_s"] == 5.0
    assert 1.0 < latency["p50_ms"] < 2.5 and 100 < latency["p99_ms"] <= 250
    assert len(latency["history"]) == 5
    assert [point["rps"] for point in latency["history"]] == [102.0] * 4 + [0.0]
    assert latency["history"][-1]["p50_ms"] is None


def test_status_history_is_bounded() -> None:
    http = HttpStats()
    for t in range(2000):
        status_document(http, None, None, now=float(t))
    assert len(http._samples) <= metrics.HISTORY_S / metrics.STATUS_SAMPLE_S + 1
    assert len(http.latency(2000.0)["history"]) <= metrics.MAX_HISTORY_POINTS


def test_the_status_page_is_self_contained() -> None:
    app = make_app(lambda: StatsClient(stats()))  # type: ignore[arg-type, return-value]
    response = call(app, "GET", "/")
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.body.decode()
    assert "/v1/status" in page and "<svg" in page
    # Nothing loaded from elsewhere: no src or href attributes, no URL but the SVG namespace.
    assert not re.search(r"\b(src|href)\s*=", page)
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]
