"""Several brokers (zkv.calls.Brokers and its use by Calls): which broker a request goes to,
when it goes again through another, how long a failed broker is avoided, and that a resend
carries the same request ids and first-send stamps. A fake clock: every ``now`` is passed in."""

from __future__ import annotations

import argparse
import itertools

import pytest

from zkv import cli
from zkv.calls import (
    BROKER_BACKOFF_MAX_S,
    BROKER_BACKOFF_MIN_S,
    RESEND_JITTER,
    UNSENDABLE_GRACE_S,
    Brokers,
    Calls,
    frontends,
)
from zkv.config import MAX_FRONTENDS, endpoint_list, endpoints
from zkv.protocol import BatchReply, Kind, Reply, Status, encode_batch_reply, split_batch

pytestmark = pytest.mark.unit

GET, SET, DEL = int(Kind.GET), int(Kind.SET), int(Kind.DEL)
A, B, C = "tcp://a:1", "tcp://b:1", "tcp://c:1"


def brokers(*endpoints_: str, jitter: float = 0.0, first: int = 0) -> Brokers:
    return Brokers(endpoints_ or (A, B, C), 1.0, 5.0, first=first, jitter=lambda: jitter)


def make_calls(brokers_: Brokers, wall: list[float], now: float = 0.0) -> Calls:
    ids = itertools.count(1)
    return Calls(
        brokers_,
        5.0,
        1.0,
        lambda count: [next(ids) for _ in range(count)],
        now,
        wall=lambda: wall[0],
    )


def send_all(calls: Calls, now: float) -> list[list[bytes]]:
    """Send everything queued (as a client would); the frames of each batch."""
    sent = []
    while (batch := calls.next_batch(1000)) is not None:
        calls.sent(batch, now)
        sent.append(batch.frames)
    return sent


def ok(*request_ids: int) -> list[bytes]:
    return encode_batch_reply(BatchReply(0, tuple(Reply(Status.OK, rid) for rid in request_ids)))


# --- the list of frontends -------------------------------------------------------------------


def test_one_endpoint_is_a_list_of_one_and_spaces_around_entries_are_ignored():
    assert frontends("tcp://127.0.0.1:5555") == ("tcp://127.0.0.1:5555",)
    assert frontends(" tcp://a:1 , ipc:///tmp/b ") == ("tcp://a:1", "ipc:///tmp/b")
    assert frontends(["tcp://a:1", "tcp://b:2"]) == ("tcp://a:1", "tcp://b:2")
    assert endpoints("tcp://a:1, tcp://b:2") == "tcp://a:1,tcp://b:2"


def test_the_environment_gives_the_list_when_no_endpoint_is_passed(monkeypatch):
    monkeypatch.setenv("ZKV_FRONTEND", "tcp://a:1,tcp://b:2")
    assert frontends(None) == ("tcp://a:1", "tcp://b:2")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("tcp://a:1,tcp://b", "entry 2 of 'tcp://a:1,tcp://b': 'tcp://b'"),
        ("tcp://a:1,,tcp://b:2", "entry 2 of 'tcp://a:1,,tcp://b:2' is empty"),
        ("tcp://a:1,", "entry 2 of 'tcp://a:1,' is empty"),
        ("tcp://a:1,tcp://a:1", "entry 2 of 'tcp://a:1,tcp://a:1': 'tcp://a:1' is listed twice"),
        ("localhost:5555,tcp://b:2", "entry 1 of 'localhost:5555,tcp://b:2': 'localhost:5555'"),
        ("tcp://b:99999", "'tcp://b:99999' needs a port"),
    ],
)
def test_a_bad_entry_is_refused_by_name(text: str, named: str):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        endpoints(text)
    assert named in str(refused.value)
    with pytest.raises(ValueError, match="frontend: ") as refused_by_client:
        frontends(text)
    assert named in str(refused_by_client.value)


def test_the_list_is_bounded():
    many = ",".join(f"tcp://h:{port}" for port in range(1, MAX_FRONTENDS + 2))
    with pytest.raises(argparse.ArgumentTypeError, match=f"at most {MAX_FRONTENDS}"):
        endpoint_list(many)
    assert len(endpoint_list(many.rsplit(",", 1)[0])) == MAX_FRONTENDS


# --- the policy ------------------------------------------------------------------------------


def test_one_broker_keeps_todays_rule_attempt_s_and_never_moves():
    one = Brokers((A,), 1.0, 5.0, jitter=lambda: 0.9)
    assert one.resend_s == 1.0 and one.endpoint == A
    assert not one.failed(10.0) and not one.unsendable(10.0)
    assert one.endpoint == A and one.moves == 0 and one.avoided(10.0) == []


def test_the_resend_interval_is_at_most_a_third_of_the_timeout_with_jitter():
    assert brokers(A, B, jitter=0.0).resend_s == 1.0  # min(1 s, 5 s / 3)
    assert brokers(A, B, jitter=0.999).resend_s == pytest.approx(1.0 - RESEND_JITTER, abs=1e-3)
    short = Brokers((A, B), 1.0, 0.6, jitter=lambda: 0.0)
    assert short.resend_s == pytest.approx(0.2)  # three tries fit in a 0.6 s timeout


def test_the_first_broker_is_drawn_at_random_so_clients_spread():
    seen = {Brokers((A, B, C), 1.0, 5.0).current for _ in range(200)}
    assert seen == {0, 1, 2}


def test_a_failed_broker_is_avoided_for_a_back_off_and_the_next_one_becomes_current():
    three = brokers()
    assert three.endpoint == A
    assert three.failed(10.0) and three.endpoint == B and three.moves == 1
    assert three.avoided(10.0) == [A] and three.avoided(10.0 + BROKER_BACKOFF_MIN_S) == []
    assert three.failed(10.5) and three.endpoint == C  # A still avoided: skipped
    # Every broker avoided: the one free first (A, until 11.0) is tried again.
    assert three.failed(10.6) and three.endpoint == A
    assert three.avoided(10.6) == [A, B, C]


def test_the_back_off_doubles_with_failures_in_a_row_is_bounded_and_an_answer_resets_it():
    two = brokers(A, B)
    now = 0.0
    for failure in range(1, 10):
        assert two.endpoint == A
        two.failed(now)  # A fails again
        expected = min(BROKER_BACKOFF_MAX_S, BROKER_BACKOFF_MIN_S * 2 ** (failure - 1))
        assert two.avoided(now + expected - 0.01) == [A] and two.avoided(now + expected) == []
        two.answered()  # B answers: B is fine
        now += expected
        two.failed(now)  # B fails once: back to A, whose back-off is over
        now += BROKER_BACKOFF_MIN_S
    assert expected == BROKER_BACKOFF_MAX_S
    two.answered()  # A answers at last
    two.failed(now)
    assert two.avoided(now + BROKER_BACKOFF_MIN_S) == []  # its count started again


def test_an_unreachable_broker_is_left_only_after_its_socket_had_time_to_connect():
    two = brokers(A, B)
    two.opened(0.0)
    assert not two.unsendable(UNSENDABLE_GRACE_S / 2)  # still connecting
    assert two.endpoint == A
    assert two.unsendable(UNSENDABLE_GRACE_S) and two.endpoint == B
    assert not two.unsendable(UNSENDABLE_GRACE_S)  # B's socket is made now: young
    two.opened(UNSENDABLE_GRACE_S)
    assert not two.unsendable(UNSENDABLE_GRACE_S * 1.5)
    assert two.unsendable(UNSENDABLE_GRACE_S * 2) and two.endpoint == A


# --- Calls over several brokers --------------------------------------------------------------


def test_a_silent_broker_is_left_and_the_unanswered_calls_go_through_the_next_unchanged():
    """The resend carries the same records: same request ids, same first-send stamps, though
    the wall clock moved on (the worker's memory then answers a write that did get through)."""
    wall = [1_700_000_000.0]
    calls = make_calls(brokers(A, B), wall)
    ids = [calls.add((SET, b"k%d" % n, b"v", None), n, 0.0) for n in range(3)]
    deleted = calls.add((DEL, b"gone", None, None), "del", 0.0)
    first = send_all(calls, 0.0)
    calls.receive(ok(ids[1]), 0.5)
    assert calls.brokers.endpoint == A and not calls.resend_due(1.4)
    wall[0] += 3600.0  # an hour later by the wall clock: stamps must not follow it
    assert calls.resend_due(1.5)  # a whole resend interval without a message from A
    calls.resend(1.5)
    assert calls.brokers.endpoint == B and calls.brokers.avoided(1.5) == [A]
    again = send_all(calls, 1.5)
    old = {sub[1]: sub for sub in split_batch(first[0])[1]}
    new = {sub[1]: sub for sub in split_batch(again[0])[1]}
    assert list(new) == [ids[0], ids[2], deleted]  # the unanswered, in creation order
    assert all(new[rid] == old[rid] for rid in new)  # stamps included


def test_a_late_reply_from_the_left_broker_for_a_call_answered_since_is_dropped():
    calls = make_calls(brokers(A, B), [1_700_000_000.0])
    rid = calls.add((SET, b"k", b"v", None), "handle", 0.0)
    send_all(calls, 0.0)
    calls.resend(1.0)  # A silent: through B
    send_all(calls, 1.0)
    assert calls.receive(ok(rid), 1.1) == [("handle", None)]  # B's answer settles it
    assert calls.receive(ok(rid), 1.2) == []  # A's, late: dropped, nothing settled twice
    assert len(calls) == 0


def test_an_unsendable_broker_is_left_with_its_calls_in_flight_after_the_grace():
    calls = make_calls(brokers(A, B), [1_700_000_000.0])
    calls.brokers.opened(0.0)
    sent = calls.add((GET, b"x", None, None), "x", 0.0)
    send_all(calls, 0.0)
    queued = calls.add((GET, b"y", None, None), "y", 0.05)
    assert not calls.unsendable(0.05)  # A's socket is young: still connecting, perhaps
    assert calls.brokers.endpoint == A and calls.queued == 1
    assert calls.unsendable(0.2) and calls.brokers.endpoint == B
    batch = calls.next_batch(1000)
    assert batch is not None and batch.request_ids == [sent, queued]  # the one out on A too


def test_one_broker_the_calls_keep_todays_rules():
    calls = make_calls(Brokers((A,), 1.0, 5.0), [1_700_000_000.0])
    calls.add((GET, b"x", None, None), "x", 0.0)
    assert not calls.unsendable(10.0)  # kept trying for the connect timeout, as ever
    send_all(calls, 0.0)
    assert not calls.resend_due(0.99) and calls.resend_due(1.0)
    calls.resend(1.0)
    assert calls.brokers.endpoint == A and calls.brokers.moves == 0


def test_with_several_brokers_sends_that_keep_leaving_do_not_hide_a_silent_broker():
    """A gateway under steady load sends a call every few milliseconds: with several brokers
    the silence counts from the first send after the last reply, so a broker that takes
    everything and answers nothing (its host cut off) is left after one resend interval."""
    calls = make_calls(brokers(A, B), [1_700_000_000.0])
    now = 0.0
    while now < 0.99:
        calls.add((GET, b"k%d" % int(now * 100), None, None), now, now)
        send_all(calls, now)
        assert not calls.resend_due(now)
        now = round(now + 0.05, 2)
    calls.add((GET, b"last", None, None), "last", 1.0)
    send_all(calls, 1.0)
    assert calls.resend_due(1.0) and calls.due_in(1.0) == 0.0
    calls.resend(1.0)
    assert calls.brokers.endpoint == B
    calls.receive(ok(1), 1.1)  # B answers one: the silence starts again from its next send
    send_all(calls, 1.2)
    assert not calls.resend_due(2.09) and calls.resend_due(2.2)


def test_with_one_broker_the_silence_counts_from_the_last_send_as_ever():
    calls = make_calls(Brokers((A,), 1.0, 5.0), [1_700_000_000.0])
    for step in range(40):
        calls.add((GET, b"k%d" % step, None, None), step, step * 0.05)
        send_all(calls, step * 0.05)
        assert not calls.resend_due(step * 0.05)
    assert calls.resend_due(39 * 0.05 + 1.0)


def test_the_command_line_client_takes_the_list_and_names_a_bad_entry(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--frontend", "tcp://a:1,localhost:1", "ping"])
    assert exited.value.code == 2
    assert "entry 2 of 'tcp://a:1,localhost:1': 'localhost:1'" in capsys.readouterr().err
