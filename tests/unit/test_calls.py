"""The clients' sans-I/O core (zkv/calls.py): packing, cutting, matching, outcomes, and when
to resend or give up, on a fake clock (every ``now`` is passed in; nothing sleeps)."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re

import pytest

from zkv import calls as calls_module
from zkv.calls import Calls, Item, cut, gave_up, new_item, outcome, pack, replies
from zkv.errors import RequestError, Timeout, Unavailable
from zkv.protocol import (
    MAX_BATCH_BYTES,
    MAX_KEY_BYTES,
    MAX_TTL_MS,
    BatchReply,
    Kind,
    ProtocolError,
    Reply,
    Status,
    encode_batch_reply,
    encode_reply,
    pack_request,
    split_batch,
    stamp_of,
)

pytestmark = pytest.mark.unit

GET, SET, DEL = int(Kind.GET), int(Kind.SET), int(Kind.DEL)
ENDPOINT = "tcp://broker:1"
WALL_S = 1_700_000_000.75  # the fake wall clock's time, Unix seconds


def make(now: float = 100.0, **options: object) -> Calls:
    ids = itertools.count(1)

    def new_ids(count: int) -> list[int]:
        return [next(ids) for _ in range(count)]

    options.setdefault("wall", lambda: WALL_S)
    return Calls(ENDPOINT, 5.0, 1.0, new_ids, now, **options)  # type: ignore[arg-type]


def batch_reply(*replies_: Reply) -> list[bytes]:
    return encode_batch_reply(BatchReply(0, tuple(replies_)))


# --- pure functions -----------------------------------------------------------------------------


def test_pack_refuses_what_the_broker_would_refuse_as_a_request_error():
    assert pack((SET, b"k", b"v", 10), 7)
    with pytest.raises(RequestError, match="non-empty key"):
        pack((GET, b"", None, None), 7)
    with pytest.raises(RequestError, match="ttl_ms"):
        pack((SET, b"k", b"v", 0), 7)


def test_cut_keeps_to_the_op_limit_and_half_the_byte_limit_but_takes_at_least_one():
    assert cut([b"x"] * 10, 4) == 4
    assert cut([b"x"] * 3, 4) == 3
    third = b"x" * (MAX_BATCH_BYTES // 6 + 1)
    assert cut([third] * 5, 100) == 2  # three thirds of a half would pass the half
    assert cut([b"x" * MAX_BATCH_BYTES] * 2, 100) == 1  # too big alone: sent alone


def test_replies_reads_a_single_reply_and_a_batch_reply_alike():
    single = encode_reply(Reply(Status.OK, 9, 0, 123, b"v"))
    assert replies(single) == [(Status.OK, 9, 123, b"v")]
    batch = batch_reply(Reply(Status.NOT_FOUND, 1), Reply(Status.OK, 2, 0, None, b"w"))
    assert [(status, rid, body) for status, rid, _, body in replies(batch)] == [
        (Status.NOT_FOUND, 1, None),
        (Status.OK, 2, b"w"),
    ]


def test_outcome_per_kind_and_status():
    assert outcome(GET, Status.OK, 5, b"v") == Item(b"v", 5)
    assert outcome(GET, Status.NOT_FOUND, None, None) is None
    assert outcome(SET, Status.OK, 5, None) == 5
    assert outcome(DEL, Status.OK, None, None) is True
    assert outcome(DEL, Status.NOT_FOUND, None, None) is False
    refused = outcome(SET, Status.ERROR, None, b"bad ttl")
    assert isinstance(refused, RequestError) and str(refused) == "bad ttl"
    assert isinstance(outcome(GET, Status.UNAVAILABLE, None, b"no owner"), Unavailable)


def test_new_item_is_an_item_like_any_other():
    """new_item skips the frozen dataclass's __init__: what it makes must be indistinguishable
    from Item(...), frozen included."""
    for value, deadline_ms in [(b"v", 5), (b"", None), (b"x" * 100, 2**63)]:
        made, built = new_item(value, deadline_ms), Item(value, deadline_ms)
        assert type(made) is Item and made == built and hash(made) == hash(built)
        assert (made.value, made.deadline_ms, repr(made)) == (value, deadline_ms, repr(built))
        with pytest.raises(dataclasses.FrozenInstanceError):
            made.value = b"other"  # type: ignore[misc]


def test_gave_up_is_a_timeout_once_sent_and_unavailable_before():
    assert isinstance(gave_up("x", True), Timeout) and "outcome unknown" in str(gave_up("x", True))
    assert isinstance(gave_up("x", False), Unavailable)


# --- Calls: sending and matching ----------------------------------------------------------------


def test_batches_carry_the_queue_in_order_and_replies_find_their_handles():
    calls = make()
    ids = [calls.add((SET, b"k%d" % n, b"v", None), f"h{n}", 100.0) for n in range(5)]
    first = calls.next_batch(3)
    assert first is not None and first.request_ids == ids[:3]
    assert [sub[1] for sub in split_batch(first.frames)[1]] == ids[:3]
    again = calls.next_batch(3)  # not sent yet: offered again
    assert again is not None and again.request_ids == first.request_ids
    calls.sent(first, 100.5)
    second = calls.next_batch(3)
    assert second is not None and second.request_ids == ids[3:]
    assert (calls.in_flight, calls.queued, len(calls)) == (3, 2, 5)

    answered = calls.receive(
        batch_reply(Reply(Status.OK, ids[1], 0, 7), Reply(Status.OK, 999)), 101
    )
    assert answered == [("h1", 7)]
    assert calls.receive(batch_reply(Reply(Status.OK, ids[1], 0, 7)), 101) == []  # late: ignored
    assert (calls.in_flight, len(calls)) == (2, 4)


def test_a_refused_operation_never_enters_and_a_refused_batch_fails_all_its_calls():
    calls = make()
    with pytest.raises(RequestError):
        calls.add((GET, b"", None, None), "bad", 100.0)
    ids = [calls.add((GET, b"k%d" % n, None, None), n, 100.0) for n in range(2)]
    batch = calls.next_batch(10)
    assert batch is not None and batch.request_ids == ids
    calls.sent(batch, 100.0)
    refusal = encode_reply(Reply(Status.ERROR, batch.batch_id, 0, None, b"bad batch"))
    failed = calls.receive(refusal, 100.1)
    assert [handle for handle, _ in failed] == [0, 1]
    assert all(isinstance(err, RequestError) and str(err) == "bad batch" for _, err in failed)
    assert len(calls) == 0 and calls.in_flight == 0


def test_forgotten_calls_are_skipped_when_sending(monkeypatch):
    calls = make()
    ids = [calls.add((GET, b"k%d" % n, None, None), n, 100.0) for n in range(3)]
    calls.forget(ids[0])
    batch = calls.next_batch(10)
    assert batch is not None and batch.request_ids == ids[1:]


def test_the_byte_limit_is_read_when_cutting(monkeypatch):
    monkeypatch.setattr(calls_module, "MAX_BATCH_BYTES", 4_000)
    calls = make()
    for n in range(4):
        calls.add((SET, b"k%d" % n, b"v" * 1024, None), n, 100.0)
    batch = calls.next_batch(100)
    assert batch is not None and len(batch.request_ids) == 1


# --- Calls: the clock ---------------------------------------------------------------------------


def send_all(calls: Calls, now: float) -> None:
    while (batch := calls.next_batch(1000)) is not None:
        calls.sent(batch, now)


def test_resend_after_attempt_s_of_silence_with_the_same_ids_in_creation_order():
    calls = make(now=0.0)
    ids = [calls.add((GET, b"k%d" % n, None, None), n, 0.0) for n in range(3)]
    assert not calls.resend_due(5.0)  # nothing left yet: nothing can be lost
    send_all(calls, 0.2)
    assert calls.resend_in(0.2) == pytest.approx(1.0)
    assert not calls.resend_due(1.1)
    calls.receive(batch_reply(Reply(Status.OK, ids[1], 0, None, b"v")), 1.1)  # progress
    assert not calls.resend_due(2.0) and calls.resend_due(2.1)
    calls.resend(2.1)
    batch = calls.next_batch(1000)
    assert batch is not None and batch.request_ids == [ids[0], ids[2]]
    assert not calls.resend_due(3.0)  # the resend counts as a message leaving
    assert calls.silent_s(3.0) == pytest.approx(1.9)  # but not as a reply


def test_per_call_deadline_timeout_if_sent_unavailable_if_never():
    calls = make(now=0.0)
    sent_id = calls.add((GET, b"a", None, None), "sent", 0.0)
    send_all(calls, 0.0)
    calls.add((GET, b"b", None, None), "queued", 0.5)
    assert calls.due_in(0.0) == pytest.approx(1.0)  # the resend comes before any deadline
    assert calls.expire(4.9) == []
    ((handle, err),) = calls.expire(5.0)
    assert handle == "sent" and isinstance(err, Timeout) and "within 5.0 s" in str(err)
    ((handle, err),) = calls.expire(5.5)
    assert handle == "queued" and isinstance(err, Unavailable)
    assert len(calls) == 0 and calls.due_in(6.0) is None
    assert calls.receive(batch_reply(Reply(Status.OK, sent_id)), 6.0) == []


def test_a_pipeline_has_no_per_call_deadline():
    calls = make(now=0.0, per_call_deadline=False)
    calls.add((GET, b"a", None, None), 0, 0.0)
    send_all(calls, 0.0)
    assert calls.expire(1e9) == []
    assert calls.silent_s(7.0) == 7.0


def test_calls_that_never_left_are_stuck_after_the_connect_timeout():
    calls = make(now=0.0)
    calls.add((GET, b"a", None, None), "old", 0.0)
    calls.add((GET, b"b", None, None), "new", 1.0)
    assert calls.stuck(1.4, 1.5) == []
    ((handle, err),) = calls.stuck(1.5, 1.5)
    assert handle == "old" and isinstance(err, Unavailable) and "1.5 s" in str(err)
    assert calls.queued == 1


def test_a_call_queued_again_for_a_resend_is_never_stuck_but_times_out_outcome_unknown():
    calls = make(now=0.0)  # timeout 5 s
    calls.add((SET, b"a", b"v", None), "sent", 0.0)
    send_all(calls, 0.0)
    calls.resend(1.0)  # queued again; the broker is now unreachable, so it cannot leave
    assert calls.queued == 1
    assert calls.stuck(4.0, 1.5) == []  # it left once: it may have been applied
    ((handle, err),) = calls.expire(5.0)
    assert handle == "sent" and isinstance(err, Timeout)


def test_unreachable_counts_failed_sends_in_a_row():
    calls = make(now=0.0)
    calls.add((GET, b"a", None, None), 0, 0.0)
    assert calls.unreachable_s(1.0) == 0.0
    assert calls.unreachable_s(2.5) == 1.5
    send_all(calls, 3.0)
    assert calls.sent_any and calls.unreachable_s(4.0) == 0.0


def test_fail_all_empties_the_table():
    calls = make()
    for n in range(3):
        calls.add((GET, b"k%d" % n, None, None), n, 100.0)
    send_all(calls, 100.0)
    error = Unavailable("closed")
    assert calls.fail(None, error) == [
        (0, error),
        (1, error),
        (2, error),
    ]
    assert (len(calls), calls.queued, calls.in_flight) == (0, 0, 0)


def test_random_ids_are_never_zero(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(calls_module.os, "urandom", lambda size: bytes(size))
    assert calls_module.random_ids(3) == [1, 1, 1]


def test_new_ids_are_fresh_and_64_bit():
    ids = calls_module.new_ids(1000) + calls_module.new_ids(3) + [calls_module.new_id()]
    assert len(set(ids)) == len(ids)
    assert all(0 < rid < 2**64 for rid in ids)


def test_add_many_packs_every_op_as_pack_request_does_or_refuses_it_alike():
    big = b"k" * (MAX_KEY_BYTES + 1)
    ops = [
        (SET, b"k", b"v", None),
        (SET, b"k", b"", None),
        (SET, b"k", b"v", 5),
        (SET, b"k", None, None),
        (SET, b"", b"v", None),
        (SET, big, b"v", None),
        (GET, b"k", None, None),
        (SET, b"k", b"v", MAX_TTL_MS),
        (SET, b"k", b"v", MAX_TTL_MS + 1),
        (SET, b"k", b"v", 0),
        (GET, b"", None, None),
        (GET, big, None, None),
        (DEL, b"k", None, None),
    ]
    calls = make()
    refused = dict(calls.add_many(ops, 0, len(ops), 100.0))
    assert sorted(refused) == [3, 4, 5, 8, 9, 10, 11]
    for position, rid in enumerate(calls._queue):  # request ids 1, 2, ... in order
        kind, key, value, ttl = ops[[p for p in range(len(ops)) if p not in refused][position]]
        stamp = stamp_of(WALL_S)
        assert calls._calls[rid][1] == pack_request(kind, rid, key, value, ttl, stamp)
    for position in refused:
        kind, key, value, ttl = ops[position]
        with pytest.raises(ProtocolError, match=re.escape(str(refused[position]))):
            pack_request(kind, 1, key, value, ttl)


def test_add_many_queues_in_order_with_positions_and_returns_the_refused():
    calls = make()
    ops = [(GET, b"a", None, None), (SET, b"b", b"v", 0), (DEL, b"c", None, None)]
    refused = calls.add_many(ops, 0, 3, 100.0)
    assert [(position, type(err)) for position, err in refused] == [(1, RequestError)]
    batch = calls.next_batch(10)
    assert batch is not None and len(batch.request_ids) == 2
    calls.sent(batch, 100.0)
    answer = batch_reply(*(Reply(Status.OK, rid) for rid in batch.request_ids))
    assert calls.receive(answer, 100.1) == [
        (0, Item(b"", None)),
        (2, True),
    ]


def test_in_flight_and_errors_follow_each_calls_sent_flag_through_random_histories():
    """Whether each call left is kept as one set of request ids, not per call: on random
    histories of every operation, in_flight, the refusal errors and who gets Timeout rather
    than Unavailable must match a model that keeps a flag per call."""
    rng = random.Random(99)
    for _ in range(200):
        calls = make(now=0.0)
        model: dict[int, bool] = {}  # request id -> left at least once
        handles: dict[object, int] = {}  # handle -> request id
        all_ops: list = []
        now = 0.0
        for step in range(60):
            now += rng.choice([0.0, 0.1, 0.5, 2.0])
            roll = rng.random()
            if roll < 0.3:
                ops = [(SET, b"k%d" % n, b"v", None) for n in range(rng.randint(1, 4))]
                if rng.random() < 0.2:
                    ops.append((GET, b"", None, None))  # refused: never enters
                if rng.random() < 0.5:
                    for op in ops:
                        handle = f"{step}:{len(handles)}"
                        try:
                            handles[handle] = calls.add(op, handle, now)
                        except RequestError:
                            continue
                        model[handles[handle]] = False
                else:  # handles: positions in all_ops, so unique
                    before = set(calls._calls)
                    all_ops.extend(ops)
                    calls.add_many(all_ops, len(all_ops) - len(ops), len(all_ops), now)
                    for rid in set(calls._calls) - before:
                        model[rid] = False
                        handles[calls._calls[rid][2]] = rid
            elif roll < 0.5:
                batch = calls.next_batch(rng.randint(1, 5))
                if batch is not None and rng.random() < 0.8:
                    calls.sent(batch, now)
                    for rid in batch.request_ids:
                        model[rid] = True
            elif roll < 0.65:
                rids = rng.sample(sorted(model), min(len(model), rng.randint(0, 3)))
                subs = [Reply(Status.OK, rid) for rid in rids] + [Reply(Status.OK, 12345)]
                answered = calls.receive(batch_reply(*subs), now)
                assert sorted(handles[handle] for handle, _ in answered) == sorted(rids)
                for rid in rids:
                    del model[rid]
            elif roll < 0.75:
                for handle, err in calls.expire(now):
                    rid = handles[handle]
                    assert isinstance(err, Timeout if model.pop(rid) else Unavailable)
            elif roll < 0.85:
                for handle, err in calls.stuck(now, 1.0):
                    assert isinstance(err, Unavailable) and not model.pop(handles[handle])
            elif roll < 0.9 and model:
                rid = rng.choice(sorted(model))
                calls.forget(rid)
                del model[rid]
            elif roll < 0.95:
                calls.resend(now)
            elif model:
                rids = [rng.choice(sorted(model)), 777]  # and one unknown
                assert [handles[h] for h, _ in calls.fail(rids, Unavailable("x"))] == rids[:1]
                del model[rids[0]]
            assert len(calls) == len(model)
            assert calls.in_flight == sum(model.values())
