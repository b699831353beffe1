"""STATS and REPORT (issue 13, metrics): the wire format, what the broker counts and keeps, what
a worker reports. No sockets, fake clock, as test_broker_core.py."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import core
from tests.fakes import FakeClock
from tests.unit.test_broker_core import CONFIG, Harness, key_for
from tests.unit.test_disk_full import Disk, disk, durability, seconds, tokens
from tests.unit.test_disk_full import batch as full_batch
from tests.unit.test_disk_full import set_ as full_set
from workers.aof import AppendLog, FsyncPolicy, create_log
from workers.figures import WorkerCounters, figures
from workers.persist import Durability
from workers.shard import Shard, take_shard
from workers.store import TTLStore
from zkv.protocol import (
    EXTENDED_OP,
    FSYNC_BUCKETS_S,
    MAX_FIGURE,
    MAX_REPORT_BYTES,
    REPORT_COMMANDS,
    Disconnect,
    DispatchBatch,
    Kind,
    ProtocolError,
    Report,
    Request,
    Status,
    check_report,
    decode_from_worker,
    decode_report,
    decode_request,
    encode_control,
    encode_report,
    encode_request,
)

pytestmark = pytest.mark.unit
__all__ = ["disk", "durability", "seconds", "tokens"]  # fixtures of test_disk_full.py, reused


def report(**changes: object) -> dict[str, object]:
    """A valid worker report, with ``changes``."""
    figures_: dict[str, object] = {
        "shard": 0,
        "epoch": 7,
        "keys": 3,
        "keys_with_ttl": 1,
        "expired": 2,
        "log_bytes": 100,
        "fsync_count": 1,
        "fsync_seconds": 0.001,
        "fsync_buckets": [0, 1] + [0] * (len(FSYNC_BUCKETS_S) - 1),
        "compactions": 0,
        "broker_silences": 0,
        "ops_per_s": 1.5,
        "requests": {"GET": {"OK": 4, "NOT_FOUND": 1}},
    }
    figures_.update(changes)
    return figures_


# --- the wire format ---------------------------------------------------------------------------


def test_stats_request_round_trips_and_refuses_a_key() -> None:
    request = Request(Kind.STATS, 42)
    assert decode_request(encode_request(request)) == request
    frames = encode_request(Request(Kind.PING, 42))
    header = bytearray(frames[0])
    header[1] = Kind.STATS
    with pytest.raises(ProtocolError, match="STATS takes no key"):
        decode_request([bytes(header) + b"key"])


def test_report_round_trips() -> None:
    frames = encode_report(report())
    assert len(frames) == 2 and frames[0] == bytes([1, Kind.REPORT])
    message = decode_from_worker(frames)
    assert isinstance(message, Report)
    assert message.figures["requests"] == {"GET": {"OK": 4, "NOT_FOUND": 1}}
    assert message.figures["fsync_seconds"] == 0.001


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xff", "not UTF-8 JSON"),
        (b"[1]", "not a JSON object"),
        (b"{" * 3000 + b"}" * 3000, "exceeds"),
        (b'"' + b"x" * MAX_REPORT_BYTES + b'"', "exceeds"),
        (json.dumps({k: v for k, v in report().items() if k != "keys"}).encode(), "lacks 'keys'"),
        (json.dumps(report(keys=-1)).encode(), "'keys' is not an integer"),
        (json.dumps(report(keys=True)).encode(), "'keys' is not an integer"),
        (json.dumps(report(keys=2**64)).encode(), "'keys' is not an integer"),
        (json.dumps(report(epoch=-5)).encode(), "'epoch' is not an integer"),
        (json.dumps(report(keys="3")).encode(), "'keys' is not an integer"),
        (json.dumps(report(shard=1.5)).encode(), "'shard' is not an integer"),
        (json.dumps(report(ops_per_s=float("nan"))).encode(), "'ops_per_s' is not a finite"),
        (json.dumps(report(ops_per_s=-1)).encode(), "'ops_per_s' is not a finite"),
        (json.dumps(report(fsync_buckets=[1])).encode(), "'fsync_buckets' is not"),
        (json.dumps(report(requests={"FLUSH": {"OK": 1}})).encode(), "bad command"),
        (json.dumps(report(requests={"GET": {"MAYBE": 1}})).encode(), "bad status"),
        (json.dumps(report(requests={"GET": {"OK": -1}})).encode(), "'requests' is not"),
        (json.dumps(report(requests=[])).encode(), "'requests' is not an object"),
    ],
)
def test_a_hostile_report_is_refused_with_a_reason(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode_report([bytes([1, Kind.REPORT]), body])


def test_a_report_carries_any_u64_epoch() -> None:
    # Epochs are fencing numbers from the token sequence: u64, past 2**63 after a damaged
    # owner file is taken over in a new era (a report refused that once stopped a worker).
    assert check_report(report(epoch=2**64 - 1))["epoch"] == 2**64 - 1


def test_a_report_keeps_only_the_fields_it_knows() -> None:
    checked = check_report(report(extra="x" * 100, shard=None, log_bytes=None))
    assert "extra" not in checked
    assert checked["shard"] is None and checked["log_bytes"] is None


def test_a_report_of_the_wrong_frame_count_is_refused() -> None:
    with pytest.raises(ProtocolError, match="REPORT takes 2 frame"):
        decode_from_worker([bytes([1, Kind.REPORT])])


# --- the broker --------------------------------------------------------------------------------


def stats(harness: Harness) -> dict:
    harness.send(Request(Kind.STATS, 9))
    (reply,) = harness.replies()
    assert reply.status == Status.OK and reply.request_id == 9
    return json.loads(reply.body or b"")


def test_stats_answers_the_brokers_figures_and_each_workers_last_report() -> None:
    harness = Harness()
    harness.register(b"w0", 0)
    harness.register(b"w1", 1)
    harness.register(b"w2")  # a standby
    harness.broker.on_worker([b"w0", *encode_report(report(shard=0, keys=5))], harness.now)
    harness.broker.on_worker([b"w0", *encode_report(report(shard=0, keys=6))], harness.now)
    harness.broker.on_worker([b"w2", *encode_report(report(shard=None))], harness.now)
    harness.take()
    harness.send(Request(Kind.GET, 1, key_for(0)))
    harness.send(Request(Kind.PING, 2))
    harness.take()
    body = stats(harness)
    broker = body["broker"]
    assert broker["shards"] == 2 and broker["owned"] == [True, True]
    assert broker["workers"] == 3 and broker["standbys"] == 1
    assert broker["messages"]["GET"] == 1 and broker["messages"]["PING"] == 1
    assert broker["messages"]["STATS"] == 1
    assert broker["requests_at_workers"] == 1 and broker["held_requests"] == 1
    assert broker["keys_in_flight"] == 1 and broker["requests_waiting_for_token"] == 0
    by_shard = {worker["assigned"]: worker for worker in body["workers"]}
    assert by_shard[0]["keys"] == 6  # the last report
    assert by_shard[None]["shard"] is None  # the standby's
    assert 1 not in by_shard  # w1 has not reported


def test_a_workers_report_is_dropped_with_the_worker() -> None:
    harness = Harness()
    harness.register(b"w0", 0)
    harness.broker.on_worker([b"w0", *encode_report(report())], harness.now)
    harness.broker.on_worker([b"w0", *encode_control(Disconnect())], harness.now)
    harness.take()
    body = stats(harness)
    assert body["workers"] == []
    assert body["broker"]["workers_removed"] == {"disconnected": 1}
    assert body["broker"]["owner_losses"] == [1, 0]


def test_a_malformed_report_is_dropped_and_the_last_good_one_kept(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker's peer lines are rate-limited per kind and window (zkv.logs.LogLimiter):
    # earlier tests may have used this window's lines up, so this one starts afresh.
    monkeypatch.setattr(core.peer_log, "_windows", {})
    harness = Harness()
    harness.register(b"w0", 0)
    harness.broker.on_worker([b"w0", *encode_report(report(keys=5))], harness.now)
    for body in (b"{", json.dumps(report(keys=-1)).encode(), b"x" * (MAX_REPORT_BYTES + 1)):
        harness.broker.on_worker([b"w0", bytes([1, Kind.REPORT]), body], harness.now)
    harness.take()
    (worker,) = stats(harness)["workers"]
    assert worker["keys"] == 5
    assert "bad message from worker" in caplog.text


def test_a_report_from_an_unknown_worker_is_not_kept() -> None:
    harness = Harness()
    harness.broker.on_worker([b"stranger", *encode_report(report())], harness.now)
    harness.take()
    assert stats(harness)["workers"] == []


def test_a_failover_and_missed_heartbeats_are_counted() -> None:
    harness = Harness()
    harness.register(b"w0", 0)
    harness.register(b"w1", 1)
    harness.register(b"spare")
    harness.take()
    # w0 falls silent for the liveness: removed, and the standby takes shard 0 over.
    for _ in range(4):
        harness.advance(CONFIG.heartbeat_interval_s, silent=(b"w0",))
    harness.take()
    broker = stats(harness)["broker"]
    assert broker["workers_removed"] == {"missed heartbeats": 1}
    assert broker["owner_losses"] == [1, 0]
    assert broker["failovers"] == [1, 0]  # the first owners were not failovers
    assert broker["owned"] == [True, True]


def test_busy_and_malformed_answers_are_counted_by_status() -> None:
    config = dataclasses.replace(CONFIG, max_client_ops=1, max_pending_ops=1)
    harness = Harness(config)
    harness.register(b"w0", 0)
    harness.register(b"w1", 1)
    harness.take()
    harness.send(Request(Kind.GET, 1, key_for(0)))
    harness.send(Request(Kind.GET, 2, key_for(1)))  # over the limit of one held request
    harness.broker.on_client([b"client-1", b"\x01\x07"], harness.now)  # malformed
    harness.take()
    broker = stats(harness)["broker"]
    assert broker["answered"]["BUSY"] == 1 and broker["answered"]["ERROR"] == 1
    assert broker["messages"]["malformed"] == 1


def test_stats_lists_at_most_the_bound_of_workers_owners_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(core, "MAX_STATS_WORKERS", 2)
    harness = Harness()
    for name in (b"s1", b"s2", b"s3"):
        harness.register(name)
        harness.broker.on_worker([name, *encode_report(report(shard=None))], harness.now)
    harness.register(b"w0", 0)
    harness.broker.on_worker([b"w0", *encode_report(report())], harness.now)
    harness.take()
    workers = stats(harness)["workers"]
    assert len(workers) == 2 and workers[0]["assigned"] == 0


# --- the worker --------------------------------------------------------------------------------


def test_a_shard_tallies_its_answers_by_command_and_status() -> None:
    clock = [1_000_000]
    shard = Shard(0, TTLStore(lambda: clock[0]))
    ops = [
        (Kind.SET, 1, b"a", b"1", None, None),
        (Kind.GET, 2, b"a", None, None, None),
        (Kind.GET, 3, b"missing", None, None, None),
        (Kind.DEL, 4, b"a", None, None, None),
        (Kind.DEL, 5, b"a", None, None, None),
    ]
    shard.handle_batch([DispatchBatch(10, ops)])
    shard.handle_batch([(11, int(Kind.GET), 6, b"nope", None, None, None)])
    counters = WorkerCounters()
    made = figures(shard, counters, 100.0)
    assert made["requests"] == {
        "GET": {"OK": 1, "NOT_FOUND": 2},
        "SET": {"OK": 1},
        "DEL": {"OK": 1, "NOT_FOUND": 1},
    }
    assert made["shard"] == 0 and made["keys"] == 0 and made["log_bytes"] is None
    shard.handle_batch([DispatchBatch(12, [(Kind.SET, 7, b"b", b"2", 5000, None)] * 1)])
    later = figures(shard, counters, 102.0)
    assert later["ops_per_s"] == 0.5  # one request in the two seconds since the last report
    assert later["keys_with_ttl"] == 1
    check_report(later)  # what the worker sends, the broker accepts


def test_a_shard_tallies_the_issue12_commands_in_its_report() -> None:
    """INCR, EXPIRE and the lock commands are counted in the report too (REPORT_COMMANDS
    listed only GET, SET, DEL, ALL and PING: their answers were tallied but never reported)."""
    clock = [1_000_000]
    shard = Shard(0, TTLStore(lambda: clock[0]))

    def op(request_id: int, request: Request) -> tuple:
        return (EXTENDED_OP, request_id, request.key, request, request.ttl_ms, request.stamp)

    ops = [
        op(1, Request(Kind.INCR, 1, b"n", by=2)),
        op(2, Request(Kind.INCR, 2, b"n", by=3)),
        op(3, Request(Kind.EXPIRE, 3, b"n", ttl_ms=5000)),
        op(4, Request(Kind.EXPIRE, 4, b"gone", ttl_ms=5000)),
        op(5, Request(Kind.LOCK, 5, b"L", ttl_ms=5000)),
        op(6, Request(Kind.REFRESH, 6, b"L", ttl_ms=5000, token=999)),
        op(7, Request(Kind.FENCE_CHECK, 7, b"L", token=999)),
        op(8, Request(Kind.SET, 8, b"n", b"x", nx=True)),
    ]
    shard.handle_batch([DispatchBatch(10, ops)])
    made = figures(shard, WorkerCounters(), 1.0)
    requests = made["requests"]
    assert isinstance(requests, dict)
    assert requests["INCR"] == {"OK": 2}
    assert requests["EXPIRE"] == {"OK": 1, "NOT_FOUND": 1}
    assert requests["LOCK"] == {"OK": 1}
    assert set(requests["REFRESH"]) <= {"CONFLICT", "NOT_FOUND"}
    assert sum(requests["FENCE_CHECK"].values()) == 1
    assert requests["SET"] == {"PRECONDITION": 1}
    check_report(made)  # what the worker sends, the broker accepts


def test_a_report_with_every_command_and_status_at_its_largest_fits() -> None:
    """The longest requests figure a worker can send (every command, every status, each
    count at MAX_FIGURE) stays under MAX_REPORT_BYTES with the rest of a full report."""
    full = {command: {s.name: MAX_FIGURE for s in Status} for command in REPORT_COMMANDS}
    figures_ = report(requests=full, log_bytes=MAX_FIGURE, ops_per_s=1.2345678901234567e18)
    figures_["fsync_buckets"] = [MAX_FIGURE] * (len(FSYNC_BUCKETS_S) + 1)
    frames = encode_report(figures_)
    assert len(frames[1]) <= MAX_REPORT_BYTES
    assert decode_report(frames).figures["requests"] == full


def test_a_stale_batch_is_tallied_unavailable() -> None:
    shard = Shard(0, last_token=50)
    shard.handle_batch([DispatchBatch(10, [(Kind.GET, 1, b"a", None, None, None)])])
    assert figures(shard, WorkerCounters(), 1.0)["requests"] == {"GET": {"UNAVAILABLE": 1}}


def test_a_standby_reports_no_shard() -> None:
    made = figures(None, WorkerCounters(), 1.0)
    assert made["shard"] is None and made["requests"] == {}
    check_report(made)


def test_the_log_times_each_fsync_into_its_bucket(tmp_path: Path) -> None:
    path = tmp_path / "log"
    create_log(path, fsync=lambda fd: None)
    log = AppendLog(path, FsyncPolicy.ALWAYS, fsync=lambda fd: None)
    log.append(b"x")
    log.commit()
    log.append(b"y")
    log.commit()
    assert sum(log.fsync_buckets) == 2 and log.fsync_buckets[0] == 2  # well under 0.5 ms
    assert len(log.fsync_buckets) == len(FSYNC_BUCKETS_S) + 1
    log.close()


def test_writes_refused_on_a_full_disk_are_tallied_no_space(
    durability: Durability, disk: Disk, tokens: Iterator[int]
) -> None:
    shard = take_shard(0, 1, None, durability, FakeClock()).shard
    full_batch(shard, tokens, full_set(1, b"a"))
    disk.fill()
    full_batch(shard, tokens, full_set(2, b"b"))  # refused, nothing applied
    full_batch(shard, tokens, full_set(3, b"c"))  # refused up front, before any write
    full_batch(shard, tokens, Request(Kind.GET, 0, b"a"))
    made = figures(shard, WorkerCounters(), 1.0)
    assert made["requests"]["SET"]["NO_SPACE"] == 2
    assert made["requests"]["GET"] == {"OK": 1}
    assert made["log_bytes"] is not None and made["fsync_count"] >= 1
