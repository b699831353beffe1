"""The chaos checker (tests/chaos.py) on small hand-written histories: each count is exact.

Times are milliseconds after T0; every write has a 60 s TTL unless a test says otherwise, and
an acknowledged write's deadline is its end plus its TTL, as a worker would report it.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tests.chaos import (
    Kind,
    Op,
    Outcome,
    Verdict,
    check_history,
    client_failure,
    double_owners,
    http_failure,
    parse_ownership,
    shared_epochs,
)
from zkv.errors import RequestError, Timeout, Unavailable

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000.0
KEY = "chaos-w0-k0"
LONG_MS = 60_000


def write(
    value: str,
    start: float,
    end: float,
    outcome: Outcome = Outcome.OK,
    ttl_ms: int = LONG_MS,
    late: bool = False,
    key: str = KEY,
) -> Op:
    """A SET by writer-0; acknowledged ones carry the deadline from their reply."""
    acked = outcome is Outcome.OK
    deadline = T0 + end + ttl_ms if acked else None
    return Op(
        "writer-0",
        "client",
        Kind.SET,
        key,
        value,
        ttl_ms,
        start_ms=T0 + start,
        end_ms=T0 + end,
        outcome=outcome,
        error=None if acked else "test",
        deadline_lo_ms=deadline,
        deadline_hi_ms=deadline,
        may_apply_late=late,
    )


def delete(start: float, end: float, outcome: Outcome = Outcome.OK, key: str = KEY) -> Op:
    return Op(
        "writer-0",
        "rest",
        Kind.DELETE,
        key,
        start_ms=T0 + start,
        end_ms=T0 + end,
        outcome=outcome,
        error=None if outcome in (Outcome.OK, Outcome.NOT_FOUND) else "test",
        may_apply_late=False,
    )


def read(
    value: str | None,
    start: float,
    end: float,
    deadline: float | None = None,
    final: bool = False,
    key: str = KEY,
) -> Op:
    """A GET that returned ``value`` (None: not found) with ``deadline`` (ms after T0)."""
    at = None if deadline is None else T0 + deadline
    return Op(
        "final" if final else "reader-0",
        "seed",
        Kind.GET,
        key,
        value,
        start_ms=T0 + start,
        end_ms=T0 + end,
        outcome=Outcome.NOT_FOUND if value is None else Outcome.OK,
        error=None,
        deadline_lo_ms=at,
        deadline_hi_ms=at,
        may_apply_late=False,
        final=final,
    )


def counts(*ops: Op) -> tuple[int, int]:
    result = check_history(ops)
    return len(result.lost), len(result.invalid)


def verdicts(*ops: Op) -> list[Verdict]:
    result = check_history(ops)
    return [finding.verdict for finding in [*result.lost, *result.invalid]]


# --- a clean history ----------------------------------------------------------------------


def test_a_clean_history_has_no_findings():
    history = [
        write("v1", 0, 10),
        read("v1", 20, 30, deadline=10 + LONG_MS),
        write("v2", 40, 50),
        read("v1", 41, 49, deadline=10 + LONG_MS),  # concurrent with v2: either value
        read("v2", 45, 55, deadline=50 + LONG_MS),
        read(None, 0, 5),  # before the first write was acknowledged
        delete(60, 70),
        read("v2", 55, 65, deadline=50 + LONG_MS),  # concurrent with the delete
        read(None, 80, 90),
        write("v3", 100, 110, ttl_ms=1000),
        read("v3", 1000, 1050, deadline=1110),  # just before its deadline
        read(None, 1100, 1130),  # expired, within the margin
        read(None, 2000, 2010, final=True),
    ]
    result = check_history(history, keys=[KEY])
    assert (result.lost, result.invalid, result.unverified_keys) == ([], [], [])
    assert result.reads_checked == 9


def test_the_last_acknowledged_write_read_back_at_the_end_is_not_lost():
    history = [write("v1", 0, 10), write("v2", 20, 30), read("v2", 40, 50, 30 + LONG_MS, True)]
    assert counts(*history) == (0, 0)


# --- lost writes ----------------------------------------------------------------------------


def test_an_acknowledged_write_missing_at_the_end_is_lost():
    history = [write("v1", 0, 10), write("v2", 20, 30), read(None, 5000, 5010, final=True)]
    result = check_history(history)
    assert (len(result.lost), len(result.invalid)) == (1, 0)
    assert result.lost[0].verdict is Verdict.MISSING
    assert "'v2'" in result.lost[0].reason


def test_an_older_value_back_at_the_end_is_a_lost_write():
    history = [
        write("v1", 0, 10),
        write("v2", 20, 30),
        read("v1", 5000, 5010, deadline=10 + LONG_MS, final=True),
    ]
    assert verdicts(*history) == [Verdict.STALE]
    assert counts(*history) == (1, 0)


def test_a_lost_delete_is_a_lost_write():
    history = [write("v1", 0, 10), delete(20, 30), read("v1", 40, 50, 10 + LONG_MS, final=True)]
    assert counts(*history) == (1, 0)


def test_an_expired_write_missing_at_the_end_is_not_lost():
    history = [write("v1", 0, 10, ttl_ms=1000), read(None, 5000, 5010, final=True)]
    assert counts(*history) == (0, 0)


def test_a_key_without_an_answered_final_read_is_unverified():
    result = check_history([write("v1", 0, 10)], keys=[KEY, "other"])
    assert result.unverified_keys == [KEY, "other"]


# --- invalid reads ---------------------------------------------------------------------------


def test_a_superseded_value_is_a_stale_read():
    history = [write("v1", 0, 10), write("v2", 20, 30), read("v1", 40, 50, 10 + LONG_MS)]
    assert verdicts(*history) == [Verdict.STALE]
    assert counts(*history) == (0, 1)


def test_a_value_after_an_acknowledged_delete_is_stale():
    history = [write("v1", 0, 10), delete(20, 30), read("v1", 40, 50, 10 + LONG_MS)]
    assert verdicts(*history) == [Verdict.STALE]


def test_a_value_read_after_its_deadline_is_invalid():
    history = [write("v1", 0, 10, ttl_ms=1000), read("v1", 1100, 1110, deadline=1010)]
    assert verdicts(*history) == [Verdict.EXPIRED]
    assert counts(*history) == (0, 1)


def test_a_value_never_written_is_invalid():
    assert verdicts(write("v1", 0, 10), read("v9", 20, 30, 10 + LONG_MS)) == [Verdict.NEVER_WRITTEN]
    other_key = write("x1", 0, 10, key="chaos-w1-k0")
    assert verdicts(other_key, read("x1", 20, 30, 10 + LONG_MS)) == [Verdict.NEVER_WRITTEN]


def test_the_value_of_a_definitely_failed_write_is_invalid():
    history = [write("v1", 0, 10, outcome=Outcome.FAIL), read("v1", 20, 30, 10 + LONG_MS)]
    assert verdicts(*history) == [Verdict.FAILED_WRITE]


def test_a_value_written_after_the_read_ended_is_invalid():
    assert verdicts(write("v1", 40, 50), read("v1", 20, 30, 50 + LONG_MS)) == [Verdict.FUTURE]


def test_not_found_while_an_acknowledged_write_must_be_there_is_invalid():
    history = [write("v1", 0, 10), read(None, 20, 30)]
    assert verdicts(*history) == [Verdict.MISSING]
    assert counts(*history) == (0, 1)  # not a final read: invalid, not lost


def test_a_deadline_other_than_the_acknowledged_one_is_invalid():
    history = [write("v1", 0, 10), read("v1", 20, 30, deadline=1010 + LONG_MS)]
    assert verdicts(*history) == [Verdict.DEADLINE]
    # A key that lost its TTL is caught too.
    assert verdicts(write("v1", 0, 10), read("v1", 20, 30, deadline=None)) == [Verdict.DEADLINE]


# --- indeterminate writes -------------------------------------------------------------------


def test_after_an_indeterminate_write_either_value_is_valid():
    for final_value, deadline in (("v1", 10 + LONG_MS), ("v2", 25 + LONG_MS)):
        history = [
            write("v1", 0, 10),
            write("v2", 20, 2020, outcome=Outcome.UNKNOWN),
            read("v1", 3000, 3010, 10 + LONG_MS),
            read("v2", 3020, 3030, 25 + LONG_MS),
            read(final_value, 5000, 5010, deadline, final=True),
        ]
        assert counts(*history) == (0, 0)


def test_an_indeterminate_write_cannot_remove_the_acknowledged_value():
    history = [
        write("v1", 0, 10),
        write("v2", 20, 2020, outcome=Outcome.UNKNOWN),
        read(None, 5000, 5010, final=True),
    ]
    assert counts(*history) == (1, 0)


def test_an_indeterminate_delete_excuses_not_found():
    history = [write("v1", 0, 10), delete(20, 2020, Outcome.UNKNOWN), read(None, 3000, 3010)]
    assert counts(*history) == (0, 0)


def test_an_indeterminate_write_does_not_come_back_after_a_later_acknowledged_one():
    history = [
        write("v1", 0, 2000, outcome=Outcome.UNKNOWN),
        write("v2", 2010, 2020),
        read("v1", 3000, 3010, 1000 + LONG_MS),
    ]
    assert verdicts(*history) == [Verdict.STALE]


def test_a_write_abandoned_by_our_http_client_may_apply_later():
    history = [
        write("v1", 0, 5000, outcome=Outcome.UNKNOWN, late=True),
        write("v2", 5010, 5020),
        read("v1", 6000, 6010, 5500 + LONG_MS),
        read("v1", 7000, 7010, 5500 + LONG_MS, final=True),
    ]
    assert counts(*history) == (0, 0)


def test_a_short_indeterminate_write_may_have_expired():
    history = [
        write("v1", 0, 10),
        write("v2", 20, 2020, outcome=Outcome.UNKNOWN, ttl_ms=1000),
        read(None, 3000, 3010, final=True),
    ]
    assert counts(*history) == (0, 0)


# --- classifying errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "resent", "outcome"),
    [
        (RequestError("bad request: key too long"), False, Outcome.FAIL),
        (RequestError("internal worker error"), False, Outcome.UNKNOWN),
        (Unavailable("broker at tcp://x is not reachable (tried for 1.5 s)"), False, Outcome.FAIL),
        (
            Unavailable("broker at tcp://x is not reachable (tried for 2.6 s)"),
            True,
            Outcome.UNKNOWN,
        ),
        (Unavailable("shard 1 has no worker (waited 3.0 s)"), False, Outcome.FAIL),
        (
            Unavailable("shard 1 has no worker (waited 3.0 s); outcome unknown: it went away"),
            False,
            Outcome.UNKNOWN,
        ),
        (Unavailable("stale token 5: this shard already accepted 6"), False, Outcome.UNKNOWN),
        (Unavailable("broker is shutting down; retry on its successor"), False, Outcome.UNKNOWN),
        (Timeout("no reply within 2.0 s; outcome unknown"), False, Outcome.UNKNOWN),
    ],
)
def test_client_errors_are_definite_only_when_nothing_can_have_been_applied(
    exc: Exception, resent: bool, outcome: Outcome
):
    assert client_failure(exc, resent).outcome is outcome


@pytest.mark.parametrize(
    ("status", "message", "outcome"),
    [
        (400, "parameter 'timeout' must be a positive number of seconds", Outcome.FAIL),
        (413, "value is 9 bytes, more than the limit", Outcome.FAIL),
        (503, "broker at tcp://x is not reachable (tried for 1.5 s)", Outcome.UNKNOWN),
        (503, "shard 0 has no worker (waited 3.0 s)", Outcome.UNKNOWN),
        (504, "no reply within 2.0 s; outcome unknown", Outcome.UNKNOWN),
        (500, "internal server error", Outcome.UNKNOWN),
    ],
)
def test_http_errors_are_definite_only_for_refused_input(
    status: int, message: str, outcome: Outcome
):
    body = json.dumps({"error": message}).encode()
    assert http_failure(status, body).outcome is outcome


# --- ownership -------------------------------------------------------------------------------


def log_line(at_ms: float, message: str) -> str:
    when = datetime.fromtimestamp(at_ms / 1000).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    return f"{when} workers.worker[123] INFO {message}"


def test_no_ownership_lines_means_not_checked():
    logs = {"worker-1.log": log_line(T0, "assigned shard 0 of 2")}
    assert parse_ownership(logs, {}, T0 + 10_000) is None


def test_a_killed_owner_ends_at_its_kill_and_a_clean_handover_does_not_overlap():
    logs = {
        "worker-1.log": log_line(T0, "took shard 0 epoch 5 (0 keys replayed from memory)"),
        "worker-2.log": "\n".join(
            [
                log_line(T0 + 2000, "took shard 0 epoch 9 (3 keys replayed from log)"),
                log_line(T0 + 5000, "left shard 0 epoch 9: stopping"),
            ]
        ),
    }
    intervals = parse_ownership(logs, {"worker-1.log": (T0 + 1500, "killed")}, T0 + 9000)
    assert intervals is not None
    assert [(i.log, i.epoch, i.end_ms - T0, i.ended_by) for i in intervals] == [
        ("worker-1.log", 5, 1500, "killed"),
        ("worker-2.log", 9, 5000, "left"),
    ]
    assert double_owners(intervals) == []


def test_two_processes_owning_a_shard_at_once_are_counted_with_both_epochs():
    logs = {
        "worker-1.log": "\n".join(
            [
                log_line(T0, "took shard 1 epoch 5 (0 keys replayed from memory)"),
                log_line(T0 + 3000, "left shard 1 epoch 5: given to another worker"),
            ]
        ),
        "worker-2.log": log_line(T0 + 2000, "took shard 1 epoch 9 (0 keys replayed from log)"),
        "worker-3.log": log_line(T0 + 2500, "took shard 0 epoch 10 (0 keys replayed from log)"),
    }
    intervals = parse_ownership(logs, {}, T0 + 9000)
    assert intervals is not None
    [overlap] = double_owners(intervals)
    assert overlap["shard"] == 1
    assert (overlap["first"]["epoch"], overlap["second"]["epoch"]) == (5, 9)
    assert overlap["overlap_ms"] == pytest.approx(1000, abs=1)


def test_a_cluster_leader_ends_when_it_logs_no_longer_leader_not_when_it_leaves_later():
    """A cut-off cluster leader stops acknowledging when it logs "no longer leader"; its
    "left" line comes after its files are closed. The new leader's "took" lies between: no
    overlap. Had it logged nothing, its interval would run on and overlap."""
    stepped = log_line(T0 + 2000, "no longer leader of shard 0: its lease is no longer valid")
    old = [
        log_line(T0, "took shard 0 epoch 5 (0 keys replayed from log)"),
        stepped,
        log_line(T0 + 2600, "left shard 0 epoch 5: its lease is no longer valid"),
    ]
    new = log_line(T0 + 2300, "took shard 0 epoch 9 (7 keys replayed from log)")
    intervals = parse_ownership(
        {"h1-workers-1.log": "\n".join(old), "h2-workers-2.log": new}, {}, T0 + 9000
    )
    assert intervals is not None
    assert [(i.epoch, i.end_ms - T0, i.ended_by) for i in intervals] == [
        (5, 2000, "left"),
        (9, 9000, "end of run"),
    ]
    assert double_owners(intervals) == [] and shared_epochs(intervals) == []
    old.remove(stepped)
    late = parse_ownership(
        {"h1-workers-1.log": "\n".join(old), "h2-workers-2.log": new}, {}, T0 + 9000
    )
    assert late is not None and len(double_owners(late)) == 1


def test_two_processes_taking_one_epoch_are_found():
    line = log_line(T0, "took shard 1 epoch 12 (0 keys replayed from log)")
    intervals = parse_ownership(
        {"a.log": line, "b.log": line}, {"a.log": (T0 + 1, "killed")}, T0 + 9000
    )
    assert intervals is not None
    assert shared_epochs(intervals) == [{"shard": 1, "epoch": 12, "logs": ["a.log", "b.log"]}]
