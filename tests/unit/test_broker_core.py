"""The broker's routing logic, driven by scripted event histories and a fake clock.

No sockets: each test feeds frames into :class:`broker.core.Broker` as the poll loop would and
reads what it put in its outbox.
"""

from __future__ import annotations

import dataclasses
import json
from binascii import crc_hqx

import pytest

from broker import core
from broker.core import CLAIM_WINDOW_HEARTBEATS, Broker, BrokerConfig, Side
from broker.tokens import SEQUENCE_BITS
from zkv.hashing import key_shard
from zkv.protocol import (
    Assign,
    Batch,
    BatchReply,
    Disconnect,
    Dispatch,
    DispatchBatch,
    Entry,
    Heartbeat,
    Kind,
    Ready,
    Reply,
    Request,
    Status,
    batch_frames,
    decode_batch_reply,
    decode_entries,
    decode_from_broker,
    decode_reply,
    encode_batch,
    encode_batch_reply,
    encode_control,
    encode_entries,
    encode_reply,
    encode_request,
    pack_request,
)

pytestmark = pytest.mark.unit

CONFIG = BrokerConfig(
    shards=2,
    shard_wait_s=3.0,
    worker_timeout_s=4.0,
    heartbeat_interval_s=1.0,
    heartbeat_liveness=3,
)
CLIENT = b"client-1"
HEARTBEAT = encode_control(Heartbeat())


def key_for(shard: int, prefix: str = "k") -> bytes:
    """A key that hashes to ``shard`` of CONFIG.shards."""
    for i in range(10_000):
        key = f"{prefix}{i}".encode()
        if key_shard(key, CONFIG.shards) == shard:
            return key
    raise AssertionError("no key found")


class Harness:
    """A broker plus helpers to play clients and workers against it."""

    def __init__(self, config: BrokerConfig = CONFIG, claims_open: bool = False) -> None:
        self.now = 0.0
        self.broker = Broker(config, self.now, epoch=100)
        if not claims_open:  # most tests start after the window for shard claims
            self.advance(CLAIM_WINDOW_HEARTBEATS * config.heartbeat_interval_s)

    def take(self) -> list[tuple[Side, list[bytes]]]:
        """The outbox, less the broker's heartbeats (tested on their own)."""
        out, self.broker.outbox = self.broker.outbox, []
        return [(side, frames) for side, frames in out if frames[1:] != HEARTBEAT]

    def advance(self, seconds: float, silent: tuple[bytes, ...] = ()) -> None:
        """Let time pass; every registered worker but the ``silent`` ones heartbeats first."""
        self.now += seconds
        for worker in self.broker.registry.identities():
            if worker not in silent:
                self.broker.on_worker([worker, *HEARTBEAT], self.now)
        self.broker.on_timer(self.now)

    def register(self, worker: bytes, claimed: int | None = None, last_token: int = 0) -> Assign:
        """Register ``worker``; returns its Assign and leaves the rest of the outbox in place."""
        self.broker.on_worker([worker, *encode_control(Ready(claimed, last_token))], self.now)
        for index, (_, frames) in enumerate(self.broker.outbox):
            if frames[0] == worker and frames[1][1] == Kind.ASSIGN:
                del self.broker.outbox[index]
                message = decode_from_broker(frames[1:])
                assert isinstance(message, Assign)
                return message
        raise AssertionError("no ASSIGN sent")

    def send(self, request: Request, client: bytes = CLIENT) -> None:
        self.broker.on_client([client, *encode_request(request)], self.now)

    def dispatched(self) -> list[tuple[bytes, Dispatch, list[bytes]]]:
        """Take the outbox, expecting only dispatches; returns (worker, dispatch, frames)."""
        result = []
        for side, frames in self.take():
            assert side is Side.BACKEND, frames
            message = decode_from_broker(frames[1:])
            assert isinstance(message, Dispatch)
            result.append((frames[0], message, frames[1:]))
        return result

    def answer(self, worker: bytes, dispatch: Dispatch, reply: Reply) -> None:
        self.broker.on_worker([worker, *encode_reply(reply)], self.now)

    def replies(self, client: bytes = CLIENT) -> list[Reply]:
        out = self.take()
        assert all(side is Side.FRONTEND and frames[0] == client for side, frames in out), out
        return [decode_reply(frames[1:]) for _, frames in out]


def ok(dispatch: Dispatch, body: bytes | None = None, deadline_ms: int | None = None) -> Reply:
    return Reply(Status.OK, dispatch.request.request_id, dispatch.token, deadline_ms, body)


def answer_all(run: DispatchBatch, status: Status = Status.OK) -> BatchReply:
    """A worker's BATCH_REPLY answering every sub-request of ``run`` with ``status``."""
    return BatchReply(run.token, tuple(Reply(status, op[1], run.token) for op in run.ops))


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    assert harness.register(b"w0").shard == 0
    assert harness.register(b"w1").shard == 1
    return harness


def test_request_goes_to_the_owner_of_its_shard_and_the_reply_comes_back_untouched(h):
    key = key_for(1)
    h.send(Request(Kind.SET, 7, key, b"\x00binary\xff", ttl_ms=1500))
    [(worker, dispatch, frames)] = h.dispatched()
    assert worker == b"w1"
    assert dispatch.request == Request(Kind.SET, 7, key, b"\x00binary\xff", ttl_ms=1500)
    assert frames[1] == b"\x00binary\xff"  # the value frame travels as sent
    h.answer(worker, dispatch, ok(dispatch, deadline_ms=123))
    [reply] = h.replies()
    assert reply == Reply(Status.OK, 7, dispatch.token, 123, None)


def tagged_keys_for(shard: int, count: int) -> list[bytes]:
    """Hash-tagged keys of ``shard`` whose whole bytes hash to another shard: routed right only
    if their tag is honoured (the broker hashes untagged keys inline, without key_shard)."""
    keys = []
    for i in range(10_000):
        key = f"{{t{i}}}:x".encode()
        untagged = (crc_hqx(key, 0) % 16384) * CONFIG.shards // 16384
        if key_shard(key, CONFIG.shards) == shard != untagged:
            keys.append(key)
            if len(keys) == count:
                return keys
    raise AssertionError("no key found")


def test_a_hash_tagged_key_goes_to_the_shard_of_its_tag_alone_and_in_a_batch(h):
    for shard in (0, 1):
        alone, batched = tagged_keys_for(shard, 2)
        h.send(Request(Kind.GET, 1 + shard, alone))
        [(worker, _, _)] = h.dispatched()
        assert worker == b"w%d" % shard
        send_batch(h, [Request(Kind.GET, 10 + shard, batched)])
        [(worker, _, _)] = batch_dispatches(h)
        assert worker == b"w%d" % shard


def test_requests_for_one_key_go_one_dispatch_at_a_time_in_arrival_order(h):
    key = key_for(0)
    for request_id in (1, 2, 3):
        h.send(Request(Kind.SET, request_id, key, b"v"))
    [(worker, dispatch, _)] = h.dispatched()
    assert dispatch.request.request_id == 1  # alone: a plain DISPATCH, as it always was
    h.answer(worker, dispatch, ok(dispatch))
    out = h.take()
    assert [side for side, _ in out] == [Side.FRONTEND, Side.BACKEND]  # the reply goes first
    # The requests that waited for the key's token go on together, in order, under one
    # token (a hot key moves a run per round trip), and only once the first is answered.
    run = decode_from_broker(out[1][1][1:])
    assert isinstance(run, DispatchBatch)
    assert [op[1] for op in run.ops] == [2, 3] and run.token > dispatch.token
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(run))], h.now)
    replies = h.replies()
    assert [r.request_id for r in replies] == [2, 3]  # single requests get plain REPLYs
    assert h.broker.tokens.held(key) is False


def test_a_busy_key_does_not_hold_up_other_keys_on_the_same_shard(h):
    hot, cold = key_for(0, "hot"), key_for(0, "cold")
    h.send(Request(Kind.GET, 1, hot))
    h.send(Request(Kind.GET, 2, hot))  # waits for the token
    h.send(Request(Kind.GET, 3, cold))  # must not wait
    dispatched = [d.request.request_id for _, d, _ in h.dispatched()]
    assert dispatched == [1, 3]


def test_tokens_increase_across_keys_and_shards(h):
    for i in range(20):
        h.send(Request(Kind.GET, i + 1, f"key{i}".encode()))
    tokens = [d.token for _, d, _ in h.dispatched()]
    assert tokens == sorted(tokens) and len(set(tokens)) == 20
    assert tokens[0] >> SEQUENCE_BITS == 100  # the epoch


def test_tokens_skip_past_what_a_registering_worker_already_accepted():
    h = Harness()
    accepted = (500 << SEQUENCE_BITS) + 9
    h.register(b"w0", claimed=0, last_token=accepted)
    h.register(b"w1")
    h.send(Request(Kind.GET, 1, key_for(0)))
    [(_, dispatch, _)] = h.dispatched()
    assert dispatch.token > accepted


def test_request_for_a_shard_without_owner_waits_then_fails_naming_the_shard():
    h = Harness()
    h.register(b"w0")  # shard 1 has no owner
    h.send(Request(Kind.GET, 1, key_for(1)))
    assert h.take() == []
    h.advance(2.9)
    assert h.take() == []
    h.advance(0.2)
    [reply] = h.replies()
    assert reply.status == Status.UNAVAILABLE
    assert b"shard 1 has no worker" in reply.body


def test_waiting_requests_are_served_when_a_worker_arrives():
    h = Harness()
    h.register(b"w0")
    key = key_for(1)
    h.send(Request(Kind.SET, 1, key, b"a"))
    h.send(Request(Kind.GET, 2, key))
    h.advance(1.0)
    assert h.take() == []
    assert h.register(b"w1").shard == 1
    [(worker, dispatch, _)] = h.dispatched()  # only one: the key's token is still out
    assert worker == b"w1" and dispatch.request.request_id == 1
    h.answer(worker, dispatch, ok(dispatch))
    out = h.take()
    assert [side for side, _ in out] == [Side.FRONTEND, Side.BACKEND]


def test_a_worker_that_does_not_answer_fails_the_request_and_frees_the_key():
    # A shard wait longer than the worker timeout, so the GET waiting for the key outlives
    # the SET's dispatch (its own wait is bounded by the shard wait: see below).
    h = Harness(dataclasses.replace(CONFIG, shard_wait_s=5.0))
    h.register(b"w0")
    h.register(b"w1")
    key = key_for(0)
    h.send(Request(Kind.SET, 1, key, b"a"))
    h.send(Request(Kind.GET, 2, key))
    [(worker, first, _)] = h.dispatched()
    h.advance(3.9)  # alive (it heartbeats), just slow
    assert h.take() == []
    h.advance(0.2)
    out = h.take()
    front = [decode_reply(f[1:]) for side, f in out if side is Side.FRONTEND]
    back = [decode_from_broker(f[1:]) for side, f in out if side is Side.BACKEND]
    assert len(front) == 1 and front[0].request_id == 1
    assert front[0].status == Status.UNAVAILABLE and b"outcome unknown" in front[0].body
    dispatches = [m for m in back if isinstance(m, Dispatch)]
    assert [d.request.request_id for d in dispatches] == [2]
    # The late answer to the first request is dropped, not sent to the client twice.
    h.answer(worker, first, ok(first))
    assert h.take() == []


def test_a_reply_from_the_wrong_worker_is_dropped(h):
    h.send(Request(Kind.GET, 1, key_for(0)))
    [(_, dispatch, _)] = h.dispatched()
    h.answer(b"w1", dispatch, ok(dispatch, body=b"forged"))
    assert h.take() == []


def test_all_gathers_every_shard(h):
    h.send(Request(Kind.ALL, 9))
    parts = h.dispatched()
    assert sorted(w for w, _, _ in parts) == [b"w0", b"w1"]
    for worker, dispatch, _ in parts:
        entry = Entry(b"from-" + worker, b"v", 42)
        h.answer(worker, dispatch, ok(dispatch, body=encode_entries([entry])))
    [reply] = h.replies()
    assert reply.status == Status.OK and reply.request_id == 9
    assert sorted(e.key for e in decode_entries(reply.body)) == [b"from-w0", b"from-w1"]


def test_all_fails_whole_when_a_shard_has_no_owner():
    h = Harness()
    h.register(b"w0")
    h.send(Request(Kind.ALL, 9))
    [(worker, dispatch, _)] = h.dispatched()
    h.answer(worker, dispatch, ok(dispatch, body=encode_entries([Entry(b"k", b"v", None)])))
    assert h.take() == []  # no partial answer
    h.advance(3.1)
    [reply] = h.replies()
    assert reply.status == Status.UNAVAILABLE and b"shard 1" in reply.body
    h.advance(10)
    assert [f for s, f in h.take() if s is Side.FRONTEND] == []  # failed once only


def test_alls_are_bounded_per_client_and_the_excess_is_busy_at_once(h):
    for request_id in (1, 2, 3):  # the limit is 2 per client socket
        h.send(Request(Kind.ALL, request_id))
    out = h.take()
    parts = [(f[0], decode_from_broker(f[1:])) for s, f in out if s is Side.BACKEND]
    assert sorted(p.request.request_id for _, p in parts) == [1, 1, 2, 2]
    [busy] = [decode_reply(f[1:]) for s, f in out if s is Side.FRONTEND]
    assert (busy.request_id, busy.status) == (3, Status.BUSY) and b"ALL" in busy.body
    h.send(Request(Kind.ALL, 4), b"other")  # another socket has its own bound
    assert len(h.dispatched()) == 2
    h.send(Request(Kind.ALL, 1), b"retry-socket")  # a retry joins its original: no new ALL
    assert h.take() == []
    for worker, part in parts:  # answer ALL 1: its client may send another
        if part.request.request_id == 1:
            h.answer(worker, part, ok(part, body=b""))
    [done] = h.replies(b"retry-socket")
    assert (done.request_id, done.status) == (1, Status.OK)
    h.send(Request(Kind.ALL, 5))
    assert len(h.dispatched()) == 2


def test_alls_are_bounded_in_total():
    h = Harness(dataclasses.replace(CONFIG, max_pending_alls=3))
    h.register(b"w0")
    h.register(b"w1")
    for index in range(4):
        h.send(Request(Kind.ALL, index + 1), f"c{index}".encode())
    out = h.take()
    assert len([f for s, f in out if s is Side.BACKEND]) == 6
    [(client, busy)] = [(f[0], decode_reply(f[1:])) for s, f in out if s is Side.FRONTEND]
    assert (client, busy.status) == (b"c3", Status.BUSY)


def test_an_all_is_charged_with_its_gathered_parts_until_answered(h):
    h.send(Request(Kind.ALL, 9))
    parts = h.dispatched()
    assert h.broker.held_ops == 1 and h.broker.held_alls == 1
    charged = h.broker.held_bytes
    body = encode_entries([Entry(b"k", b"v" * 1000, None)])
    worker, dispatch, _ = parts[0]
    h.answer(worker, dispatch, ok(dispatch, body=body))
    assert h.broker.held_bytes == charged + len(body)  # the part held is charged
    worker, dispatch, _ = parts[1]
    h.answer(worker, dispatch, ok(dispatch, body=body))
    [reply] = h.replies()
    assert reply.status == Status.OK
    assert (h.broker.held_ops, h.broker.held_bytes, h.broker.held_alls) == (0, 0, 0)
    assert h.broker._accounts == {} and h.broker._alls_by_client == {}


def test_an_all_failed_by_one_part_releases_everything_and_a_late_part_is_not_held(h):
    h.send(Request(Kind.ALL, 9))
    [(w0, first, _), (w1, second, _)] = h.dispatched()
    h.answer(w0, first, Reply(Status.BUSY, 9, first.token, body=b"reply too large"))
    [reply] = h.replies()
    assert reply.status == Status.BUSY
    assert (h.broker.held_ops, h.broker.held_bytes, h.broker.held_alls) == (0, 0, 0)
    h.answer(w1, second, ok(second, body=encode_entries([Entry(b"k", b"v", None)])))
    assert h.take() == [] and h.broker.held_bytes == 0


def test_malformed_client_messages_get_an_error_reply(h):
    cases = [
        [b""],
        [b"\x09\x01"],  # unknown version
        [encode_request(Request(Kind.GET, 5, b"k"))[0], b"extra"],
        [b"\x01\x7f" + b"\x00" * 18],  # unknown command
    ]
    for frames in cases:
        h.broker.on_client([CLIENT, *frames], h.now)
        [reply] = h.replies()
        assert reply.status == Status.ERROR
        assert reply.body.startswith(b"bad request")
    # The request id is echoed when it was readable.
    h.broker.on_client([CLIENT, cases[2][0], b"extra"], h.now)
    assert h.replies()[0].request_id == 5


def test_malformed_worker_messages_are_dropped(h):
    for frames in ([b"junk"], [b"\x01\x10short"], [b"\x01\x05"]):
        h.broker.on_worker([b"w0", *frames], h.now)
    assert h.take() == []
    h.send(Request(Kind.GET, 1, key_for(0)))
    assert len(h.dispatched()) == 1


def test_silent_worker_is_removed_and_a_standby_takes_over_its_requests():
    h = Harness(dataclasses.replace(CONFIG, worker_timeout_s=10.0, shard_wait_s=10.0))
    h.register(b"w0")
    h.register(b"w1")
    assert h.register(b"standby").shard is None
    key = key_for(0)
    h.send(Request(Kind.SET, 1, key, b"a"))
    h.send(Request(Kind.GET, 2, key))
    [(worker, first, _)] = h.dispatched()
    assert worker == b"w0"
    for _ in range(8):  # w1 and the standby beat; w0 is silent, found dead at t=4
        h.advance(0.5, silent=(b"w0",))
    out = h.take()
    assert [f for s, f in out if s is Side.FRONTEND] == []  # nothing failed
    back = [(f[0], decode_from_broker(f[1:])) for s, f in out if s is Side.BACKEND]
    [(_, assign)] = [(w, m) for w, m in back if isinstance(m, Assign)]
    assert (assign.shard, assign.shards) == (0, 2)
    redispatched = [(w, m) for w, m in back if isinstance(m, Dispatch)]
    # The SET in flight on the dead worker is retried on the standby, with the same request
    # id (so the new owner can recognise it) and a new, larger token; the GET still waits.
    assert [(w, m.request) for w, m in redispatched] == [(b"standby", first.request)]
    assert redispatched[0][1].token > first.token
    h.answer(b"standby", redispatched[0][1], ok(redispatched[0][1]))
    out = h.take()
    assert [decode_reply(f[1:]).request_id for s, f in out if s is Side.FRONTEND] == [1]
    assert [decode_from_broker(f[1:]).request.request_id for s, f in out if s is Side.BACKEND] == [
        2
    ]


def test_a_worker_that_registers_again_hands_its_requests_back_to_be_routed_anew():
    # A worker that finds its shard moved (or that holds none) answers nothing and sends
    # READY: the requests it had are routed to the shard's owner, never failed.
    h = Harness()
    h.register(b"w0")
    h.register(b"w1")
    assert h.register(b"standby").shard is None
    h.send(Request(Kind.SET, 1, key_for(0), b"a"))
    [(worker, first, _)] = h.dispatched()
    assert worker == b"w0"
    h.broker.on_worker([b"w0", *encode_control(Ready(None, first.token))], h.now)
    out = h.take()
    assert [f for s, f in out if s is Side.FRONTEND] == []  # nothing failed
    back = [(f[0], decode_from_broker(f[1:])) for s, f in out if s is Side.BACKEND]
    [(owner, _)] = [(w, m) for w, m in back if isinstance(m, Assign) and m.shard == 0]
    [(again, dispatch)] = [(w, m) for w, m in back if isinstance(m, Dispatch)]
    assert again == owner and dispatch.request == first.request
    assert dispatch.token > first.token
    h.answer(again, dispatch, ok(dispatch))
    assert [r.status for r in h.replies()] == [Status.OK]


def test_requests_of_a_dead_worker_fail_as_unknown_if_no_owner_comes():
    h = Harness()
    h.register(b"w0")
    h.register(b"w1")
    h.send(Request(Kind.SET, 1, key_for(1), b"v"))
    h.take()
    h.broker.on_unroutable(b"w1", h.now)
    assert h.take() == []
    h.advance(3.1)
    [reply] = h.replies()
    assert reply.status == Status.UNAVAILABLE
    assert b"shard 1 has no worker" in reply.body and b"outcome unknown" in reply.body


def test_ownership_epochs_increase_with_every_assignment():
    h = Harness()
    epochs = [h.register(name).epoch for name in (b"w0", b"w1")]
    h.register(b"standby")
    h.broker.on_worker([b"w0", *encode_control(Disconnect())], h.now)
    out = [decode_from_broker(f[1:]) for _, f in h.broker.outbox]
    epochs += [m.epoch for m in out if isinstance(m, Assign)]
    assert len(epochs) == 3 and epochs == sorted(set(epochs))
    assert h.register(b"late").epoch == 0  # a standby owns nothing: no epoch


def test_a_retry_joins_its_original_and_is_answered_once_on_the_new_socket(h):
    key = key_for(0)
    h.send(Request(Kind.SET, 77, key, b"v"), client=b"old-socket")
    [(worker, dispatch, _)] = h.dispatched()
    h.send(Request(Kind.SET, 77, key, b"v"), client=b"new-socket")  # the client retried
    assert h.take() == []  # not dispatched twice
    h.answer(worker, dispatch, ok(dispatch))
    [reply] = h.replies(client=b"new-socket")
    assert reply.request_id == 77
    # Once answered, the same id is a new request (the worker's memory dedups it).
    h.send(Request(Kind.SET, 77, key, b"v"), client=b"new-socket")
    assert len(h.dispatched()) == 1


def test_same_id_for_another_key_is_another_request(h):
    h.send(Request(Kind.GET, 5, key_for(0, "a")))
    h.send(Request(Kind.GET, 5, key_for(0, "b")))
    assert len(h.dispatched()) == 2


def test_retries_of_two_requests_sharing_an_id_each_join_their_own_original(h):
    a, b = key_for(0, "a"), key_for(1, "b")
    send_batch(h, [Request(Kind.SET, 9, a, b"v")], client=b"old-a", batch_id=1)
    send_batch(h, [Request(Kind.SET, 9, b, b"v")], client=b"old-b", batch_id=2)
    out = {d.ops[0][2]: (w, d) for w, d, _ in batch_dispatches(h)}
    assert set(out) == {a, b}  # same id, another key: another request
    send_batch(h, [Request(Kind.SET, 9, a, b"v")], client=b"new-a", batch_id=3)
    send_batch(h, [Request(Kind.SET, 9, b, b"v")], client=b"new-b", batch_id=4)
    assert h.take() == []  # each retry joined its original
    worker, dispatch = out[a]  # the first one remembered is answered first
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(dispatch))], h.now)
    assert list(by_client(h)) == [b"new-a"]
    send_batch(h, [Request(Kind.SET, 9, b, b"v")], client=b"newer-b", batch_id=5)
    assert h.take() == []  # still joins the one left
    worker, dispatch = out[b]
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(dispatch))], h.now)
    assert list(by_client(h)) == [b"newer-b"]
    assert h.broker.idle() and not h.broker._by_request and not h.broker._by_identity


def test_an_unknown_worker_is_told_to_register():
    h = Harness()
    h.broker.on_worker([b"stranger", *HEARTBEAT], h.now)
    [(side, frames)] = h.broker.outbox
    assert side is Side.BACKEND and frames[0] == b"stranger"
    assert decode_from_broker(frames[1:]) == Disconnect()
    assert h.broker.registry.get(b"stranger") is None


def test_shutdown_refuses_new_requests_and_answers_those_in_flight(h):
    h.send(Request(Kind.GET, 1, key_for(0)))
    [(worker, dispatch, _)] = h.dispatched()
    h.broker.begin_shutdown()
    assert not h.broker.idle()
    h.send(Request(Kind.GET, 2, key_for(1)))
    [refused] = h.replies()
    assert refused.status == Status.UNAVAILABLE and b"shutting down" in refused.body
    h.answer(worker, dispatch, ok(dispatch, body=b"v"))
    [answered] = h.replies()
    assert (answered.request_id, answered.body) == (1, b"v")
    assert h.broker.idle()


def test_disconnect_frees_the_shard_at_once(h):
    h.broker.on_worker([b"w1", *encode_control(Disconnect())], h.now)
    assert h.broker.registry.owner(1) is None
    h.send(Request(Kind.GET, 1, key_for(1)))
    assert h.take() == []  # waits for an owner


def test_unroutable_worker_is_removed(h):
    h.broker.on_unroutable(b"w1", h.now)
    assert h.broker.registry.owner(1) is None


def test_heartbeats_go_to_every_worker_each_interval(h):
    def beats() -> list[bytes]:
        out, h.broker.outbox = h.broker.outbox, []
        return sorted(f[0] for _, f in out if f[1:] == HEARTBEAT)

    h.advance(1.0)
    assert beats() == [b"w0", b"w1"]
    h.advance(0.5)
    assert beats() == []
    h.advance(0.5)
    assert beats() == [b"w0", b"w1"]


def test_ping_reports_the_cluster():
    h = Harness()
    h.register(b"w0")
    h.send(Request(Kind.PING, 3))
    [reply] = h.replies()
    info = json.loads(reply.body)
    assert reply.request_id == 3
    assert info["status"] == "degraded"
    assert info["owned"] == [True, False]


def test_next_timer_is_the_nearest_deadline(h):
    assert h.broker.next_timer(h.now) == pytest.approx(1.0)
    h.send(Request(Kind.GET, 1, key_for(0)))
    h.take()
    h.advance(2.5)  # heartbeats went out at 2.5; the next at 3.5; the worker deadline is 4.0
    assert h.broker.next_timer(h.now) == pytest.approx(1.0)
    h.advance(1.0)
    assert h.broker.next_timer(h.now) == pytest.approx(0.5)


def test_a_new_broker_gives_shards_back_to_their_holders_before_handing_out_the_rest():
    h = Harness(claims_open=True)  # the broker just (re)started
    assert h.register(b"fresh").shard is None  # waits: a holder may still claim
    h.send(Request(Kind.GET, 1, key_for(1)))
    assert h.register(b"holder-of-0", claimed=0).shard == 0  # claims go through at once
    assert h.take() == []
    h.advance(CLAIM_WINDOW_HEARTBEATS * CONFIG.heartbeat_interval_s)  # the window closes
    out = h.take()
    assigns = [(f[0], decode_from_broker(f[1:])) for _, f in out if f[1][1] == Kind.ASSIGN]
    assert [(w, a.shard) for w, a in assigns] == [(b"fresh", 1)]
    dispatched = [f[0] for _, f in out if f[1][1] == Kind.DISPATCH]
    assert dispatched == [b"fresh"]  # the request that waited for shard 1


def test_the_claim_window_delays_nothing_once_every_shard_is_claimed():
    h = Harness(claims_open=True)
    h.register(b"a", claimed=0)
    h.register(b"b", claimed=1)
    h.send(Request(Kind.GET, 1, key_for(1)))
    assert [w for w, _, _ in h.dispatched()] == [b"b"]


def test_a_refusal_after_a_retry_says_the_outcome_is_unknown(h):
    h.register(b"standby")
    h.send(Request(Kind.SET, 1, key_for(0), b"v"))
    h.take()
    h.broker.on_unroutable(b"w0", h.now)  # w0 had it: it may have applied it
    out = h.take()
    [frames] = [f for _, f in out if f[1][1] == Kind.DISPATCH]
    worker, retry = frames[0], decode_from_broker(frames[1:])
    assert worker == b"standby"
    refusal = Reply(Status.UNAVAILABLE, 1, retry.token, body=b"shard 0 moved to a newer owner")
    h.answer(worker, retry, refusal)
    [reply] = h.replies()
    assert reply.status == Status.UNAVAILABLE
    assert reply.body == b"shard 0 moved to a newer owner; outcome unknown"


# --- batches ----------------------------------------------------------------------------------


def send_batch(h: Harness, requests: list[Request], client: bytes = CLIENT, batch_id: int = 1):
    h.broker.on_client([client, *encode_batch(Batch(batch_id, tuple(requests)))], h.now)


def batch_dispatches(h: Harness) -> list[tuple[bytes, DispatchBatch, list[bytes]]]:
    """Take the outbox, expecting only BATCH_DISPATCHes."""
    result = []
    for side, frames in h.take():
        assert side is Side.BACKEND, frames
        message = decode_from_broker(frames[1:])
        assert isinstance(message, DispatchBatch), message
        result.append((frames[0], message, frames[1:]))
    return result


def by_client(h: Harness) -> dict[bytes, list[Reply]]:
    """Take the outbox, expecting only replies (REPLY or BATCH_REPLY); grouped by client."""
    result: dict[bytes, list[Reply]] = {}
    for side, frames in h.take():
        assert side is Side.FRONTEND, frames
        if frames[1][1] == Kind.BATCH_REPLY:
            replies = list(decode_batch_reply(frames[1:]).replies)
        else:
            replies = [decode_reply(frames[1:])]
        result.setdefault(frames[0], []).extend(replies)
    return result


def test_a_batch_is_split_by_shard_into_one_dispatch_per_shard_with_one_token_each(h):
    keys = [key_for(0, "a"), key_for(1, "b"), key_for(0, "c"), key_for(1, "d")]
    send_batch(h, [Request(Kind.SET, i + 1, k, b"v%d" % i) for i, k in enumerate(keys)])
    out = batch_dispatches(h)
    assert sorted(w for w, _, _ in out) == [b"w0", b"w1"]
    for worker, dispatch, _ in out:
        expected = [keys[0], keys[2]] if worker == b"w0" else [keys[1], keys[3]]
        assert [op[2] for op in dispatch.ops] == expected  # in the batch's order
        assert all(op[3].startswith(b"v") for op in dispatch.ops)  # values travel as sent
    assert len({d.token for _, d, _ in out}) == 2
    assert len(h.broker.tokens) == 4  # every key's token is out


def test_a_batch_reply_for_one_client_is_forwarded_untouched_and_frees_the_tokens(h):
    key = key_for(1)
    send_batch(h, [Request(Kind.SET, 1, key, b"v"), Request(Kind.GET, 2, key)])
    [(worker, dispatch, _)] = batch_dispatches(h)
    assert [op[1] for op in dispatch.ops] == [1, 2]  # the same key twice: one flight, in order
    reply = encode_batch_reply(
        BatchReply(
            dispatch.token,
            (ok_sub(1, dispatch.token, deadline_ms=5), ok_sub(2, dispatch.token, b"v")),
        )
    )
    h.broker.on_worker([worker, *reply], h.now)
    [(side, frames)] = h.take()
    assert side is Side.FRONTEND and frames == [CLIENT, *reply]  # not even re-encoded
    assert len(h.broker.tokens) == 0 and h.broker.idle()


def ok_sub(request_id: int, token: int, body: bytes | None = None, deadline_ms=None) -> Reply:
    return Reply(Status.OK, request_id, token, deadline_ms, body)


def test_a_busy_key_in_a_batch_waits_and_the_rest_of_the_batch_goes_on(h):
    hot, cold = key_for(0, "hot"), key_for(0, "cold")
    h.send(Request(Kind.SET, 1, hot, b"first"))  # holds hot's token
    [(worker, first, _)] = h.dispatched()
    send_batch(h, [Request(Kind.GET, 2, hot), Request(Kind.GET, 3, cold)])
    [(_, dispatch, _)] = batch_dispatches(h)
    assert [op[1] for op in dispatch.ops] == [3]  # cold goes, hot waits for its token
    h.answer(worker, first, ok(first))
    out = h.take()
    assert decode_reply(out[0][1][1:]).request_id == 1
    waiter = decode_from_broker(out[1][1][1:])
    assert isinstance(waiter, DispatchBatch) and [op[1] for op in waiter.ops] == [2]
    assert waiter.token > dispatch.token


def test_a_hot_key_sends_all_its_waiters_in_one_dispatch_under_one_token(h):
    hot = key_for(1, "hot")
    send_batch(h, [Request(Kind.SET, 1, hot, b"0")], client=b"a", batch_id=1)
    [(worker, first, _)] = batch_dispatches(h)
    # While the first is out, three clients queue requests for the same key.
    send_batch(h, [Request(Kind.GET, 10, hot), Request(Kind.SET, 11, hot, b"1")], b"a", 2)
    h.send(Request(Kind.GET, 12, hot), client=b"b")
    send_batch(h, [Request(Kind.DEL, 13, hot), Request(Kind.GET, 14, hot)], b"c", 3)
    assert h.take() == []  # all wait for the token
    assert h.broker.tokens.waiting(hot) == 5
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(first))], h.now)
    out = h.take()
    [run_frames] = [f for side, f in out if side is Side.BACKEND]
    run = decode_from_broker(run_frames[1:])
    assert isinstance(run, DispatchBatch)
    assert [op[1] for op in run.ops] == [10, 11, 12, 13, 14]  # arrival order, one token
    assert h.broker.tokens.waiting(hot) == 0 and h.broker.tokens.held(hot)
    # Each client gets its own answers: b came alone and gets a plain REPLY.
    subs = tuple(Reply(Status.OK, op[1], run.token, None, b"r%d" % op[1]) for op in run.ops)
    h.broker.on_worker([worker, *encode_batch_reply(BatchReply(run.token, subs))], h.now)
    replies = by_client(h)
    assert {c: [(r.request_id, r.body) for r in rs] for c, rs in replies.items()} == {
        b"a": [(10, b"r10"), (11, b"r11")],
        b"b": [(12, b"r12")],
        b"c": [(13, b"r13"), (14, b"r14")],
    }
    assert not h.broker.tokens.held(hot) and h.broker.idle()


def test_hot_key_runs_are_cut_at_the_batch_limit(h, monkeypatch):
    monkeypatch.setattr(core, "MAX_BATCH_OPS", 3)
    hot = key_for(0, "hot")
    send_batch(h, [Request(Kind.GET, 1, hot)])
    [(worker, first, _)] = batch_dispatches(h)
    send_batch(h, [Request(Kind.GET, i, hot) for i in range(2, 9)], batch_id=2)
    assert h.take() == []
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(first))], h.now)
    [run] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    assert [op[1] for op in run.ops] == [2, 3, 4]  # the rest waits for this run's answer
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(run))], h.now)
    [run] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    assert [op[1] for op in run.ops] == [5, 6, 7]


def test_a_full_flight_is_closed_and_a_key_it_holds_waits_for_its_answer(h, monkeypatch):
    monkeypatch.setattr(core, "MAX_BATCH_OPS", 2)
    a, b, c = key_for(0, "a"), key_for(0, "b"), key_for(0, "c")
    send_batch(h, [Request(Kind.GET, 1, a), Request(Kind.GET, 2, b), Request(Kind.GET, 3, a)])
    send_batch(h, [Request(Kind.GET, 4, c)], batch_id=2)
    out = batch_dispatches(h)
    assert [[op[1] for op in d.ops] for _, d, _ in out] == [[1, 2], [4]]
    assert h.broker.tokens.waiting(a) == 1  # request 3 waits: a's token is in a full flight
    h.broker.on_worker([b"w0", *encode_batch_reply(answer_all(out[0][1]))], h.now)
    [run] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    assert [op[1] for op in run.ops] == [3]


def test_a_flight_full_by_bytes_is_closed_and_a_key_it_holds_waits_for_its_answer(h, monkeypatch):
    a, b = key_for(0, "a"), key_for(0, "b")
    sizes = [len(pack_request(Kind.SET, i, k, b"v" * 10)) for i, k in ((1, a), (2, b))]
    monkeypatch.setattr(core, "MAX_BATCH_BYTES", sum(sizes) - 1)  # two records do not fit
    requests = [
        Request(Kind.SET, 1, a, b"v" * 10),
        Request(Kind.SET, 2, b, b"v" * 10),
        Request(Kind.SET, 3, a, b"v" * 10),
    ]
    send_batch(h, requests)
    out = batch_dispatches(h)
    assert [[op[1] for op in d.ops] for _, d, _ in out] == [[1], [2]]
    assert h.broker.tokens.waiting(a) == 1  # request 3 waits: a's token is in a full flight
    h.broker.on_worker([b"w0", *encode_batch_reply(answer_all(out[0][1]))], h.now)
    [run] = [decode_from_broker(f[1:]) for s, f in h.take() if s is Side.BACKEND]
    assert [op[1] for op in run.ops] == [3]


def test_batches_that_meet_open_flights_still_keep_every_flight_within_the_limits(h, monkeypatch):
    # Between events no flight is open, so _on_batch skips its limit checks for a batch within
    # the limits. Should a batch ever meet open flights (two in one event), the checks apply:
    # every flight stays within MAX_BATCH_OPS, and a key in a full flight waits its turn.
    monkeypatch.setattr(core, "MAX_BATCH_OPS", 3)
    keys = [key_for(0, str(i)) for i in range(5)]
    first = encode_batch(Batch(1, tuple(Request(Kind.GET, i, k) for i, k in enumerate(keys[:2]))))
    second = encode_batch(Batch(2, tuple(Request(Kind.GET, 10 + i, k) for i, k in enumerate(keys))))
    h.broker._on_batch(CLIENT, first, h.now)
    h.broker._on_batch(CLIENT, second, h.now)  # meets the open flight of the first
    h.broker._flush(h.now)
    out = batch_dispatches(h)
    # Request 10 follows its key's holder into the open flight, which is then full: request
    # 11 (key 1) waits behind the token in it, and 12-14 open a flight of their own.
    assert [[op[1] for op in d.ops] for _, d, _ in out] == [[0, 1, 10], [12, 13, 14]]
    assert h.broker.tokens.waiting(keys[1]) == 1 and h.broker.tokens.waiting(keys[0]) == 0


def test_malformed_sub_requests_are_refused_alone_and_a_malformed_batch_whole(h):
    good = pack_request(Kind.GET, 1, key_for(0))
    bad = pack_request(Kind.GET, 2, b"k")[:1] + b"\x80" + pack_request(Kind.GET, 2, b"k")[2:]
    h.broker.on_client([CLIENT, *batch_frames(5, [good, bad])], h.now)
    out = h.take()
    [refusal] = [decode_batch_reply(f[1:]) for s, f in out if s is Side.FRONTEND]
    [reply] = refusal.replies
    assert (reply.request_id, reply.status) == (2, Status.ERROR)
    assert reply.body.startswith(b"bad request: flag RETURN_OLD does not apply to GET")
    assert len([f for s, f in out if s is Side.BACKEND]) == 1  # the good one went on
    h.broker.on_client([CLIENT, batch_frames(6, [good])[0], b"\x01"], h.now)
    [whole] = h.replies()
    assert (whole.request_id, whole.status) == (6, Status.ERROR)  # the batch id
    assert whole.body.startswith(b"bad request:")


def test_the_request_that_came_second_with_an_id_is_answered_first_the_first_still_merges(h):
    # The reply's forgetting of the second (remembered under its whole identity, its id being
    # taken) must leave the first remembered under the id.
    a, b = key_for(0, "a"), key_for(1, "b")
    send_batch(h, [Request(Kind.SET, 9, a, b"v")], client=b"old-a", batch_id=1)
    send_batch(h, [Request(Kind.SET, 9, b, b"v")], client=b"old-b", batch_id=2)
    out = {d.ops[0][2]: (w, d) for w, d, _ in batch_dispatches(h)}
    worker, dispatch = out[b]
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(dispatch))], h.now)
    assert list(by_client(h)) == [b"old-b"]
    send_batch(h, [Request(Kind.SET, 9, a, b"v")], client=b"new-a", batch_id=3)
    assert h.take() == []  # the retry of the first joined it
    worker, dispatch = out[a]
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(dispatch))], h.now)
    assert list(by_client(h)) == [b"new-a"]
    assert h.broker.idle() and not h.broker._by_identity


def test_two_requests_sharing_an_id_in_one_flight_are_both_forgotten_at_its_reply(h):
    a, b = key_for(0, "a"), key_for(0, "b")
    send_batch(h, [Request(Kind.SET, 9, a, b"v"), Request(Kind.GET, 9, b)])
    [(worker, dispatch, _)] = batch_dispatches(h)
    assert [op[2] for op in dispatch.ops] == [a, b]
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(dispatch))], h.now)
    assert [r.request_id for r in by_client(h)[CLIENT]] == [9, 9]
    assert h.broker.idle() and not h.broker._by_identity


def test_a_retried_batch_is_merged_and_answered_on_the_new_socket(h):
    keys = [key_for(0, "a"), key_for(1, "b")]
    requests = [Request(Kind.SET, i + 1, k, b"v") for i, k in enumerate(keys)]
    send_batch(h, requests, client=b"old", batch_id=1)
    out = batch_dispatches(h)
    send_batch(h, requests, client=b"new", batch_id=2)  # the client resent on a fresh socket
    assert h.take() == []  # nothing dispatched twice
    for worker, dispatch, _ in out:
        h.broker.on_worker([worker, *encode_batch_reply(answer_all(dispatch))], h.now)
    replies = by_client(h)
    assert list(replies) == [b"new"] and sorted(r.request_id for r in replies[b"new"]) == [1, 2]


def test_a_dead_workers_batch_goes_back_whole_and_is_dispatched_again(h):
    h.register(b"standby")
    keys = [key_for(0, "a"), key_for(0, "b")]
    send_batch(h, [Request(Kind.SET, i + 1, k, b"v") for i, k in enumerate(keys)])
    [(_, first, _)] = batch_dispatches(h)
    h.broker.on_unroutable(b"w0", h.now)
    out = h.take()
    [(worker, again)] = [
        (f[0], decode_from_broker(f[1:])) for s, f in out if f[1][1] == Kind.BATCH_DISPATCH
    ]
    assert worker == b"standby" and again.ops == first.ops and again.token > first.token
    refusal = BatchReply(
        again.token,
        tuple(Reply(Status.UNAVAILABLE, op[1], again.token, None, b"moved") for op in again.ops),
    )
    h.broker.on_worker([worker, *encode_batch_reply(refusal)], h.now)
    [reply, _] = by_client(h)[CLIENT]
    assert reply.body == b"moved; outcome unknown"  # the dead worker may have applied it
    assert h.broker.idle() and len(h.broker.tokens) == 0


def test_a_batch_whose_worker_does_not_answer_fails_whole_and_frees_its_keys():
    h = Harness(dataclasses.replace(CONFIG, shard_wait_s=5.0))  # request 3 outwaits the first
    h.register(b"w0")
    h.register(b"w1")
    key = key_for(1)
    send_batch(h, [Request(Kind.SET, 1, key, b"v"), Request(Kind.GET, 2, key_for(1, "x"))])
    send_batch(h, [Request(Kind.GET, 3, key)], batch_id=2)  # waits for the first flight
    [(worker, first, _)] = batch_dispatches(h)
    h.advance(4.1)
    out = h.take()
    failed = [r for s, f in out if s is Side.FRONTEND for r in decode_batch_reply(f[1:]).replies]
    assert sorted(r.request_id for r in failed) == [1, 2]
    assert all(r.status == Status.UNAVAILABLE and b"outcome unknown" in r.body for r in failed)
    [next_run] = [decode_from_broker(f[1:]) for s, f in out if f[1][1] == Kind.BATCH_DISPATCH]
    assert [op[1] for op in next_run.ops] == [3]
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(first))], h.now)
    assert h.take() == []  # the late answer is dropped


def test_a_batch_for_a_shard_without_owner_waits_then_fails(h):
    h.broker.on_worker([b"w1", *encode_control(Disconnect())], h.now)
    send_batch(h, [Request(Kind.GET, 1, key_for(1)), Request(Kind.GET, 2, key_for(0))])
    [(worker, _, _)] = batch_dispatches(h)
    assert worker == b"w0"
    h.advance(3.1)
    [failed] = by_client(h)[CLIENT]
    assert failed.request_id == 1 and b"shard 1 has no worker" in failed.body
    assert not h.broker.tokens.held(key_for(1))


def test_shutdown_refuses_a_batch(h):
    h.broker.begin_shutdown()
    send_batch(h, [Request(Kind.GET, 1, key_for(0)), Request(Kind.GET, 2, key_for(1))])
    replies = by_client(h)[CLIENT]
    assert [(r.request_id, r.status) for r in replies] == [
        (1, Status.UNAVAILABLE),
        (2, Status.UNAVAILABLE),
    ]


def test_a_batch_reply_with_the_wrong_count_is_dropped(h):
    send_batch(h, [Request(Kind.GET, 1, key_for(0)), Request(Kind.GET, 2, key_for(0, "z"))])
    [(worker, dispatch, _)] = batch_dispatches(h)
    short = BatchReply(dispatch.token, (ok_sub(1, dispatch.token),))
    h.broker.on_worker([worker, *encode_batch_reply(short)], h.now)
    assert h.take() == []
    assert not h.broker.idle()  # still waiting: it times out like an unanswered dispatch


def test_a_run_of_lone_sets_is_weighed_by_the_records_it_is_sent_as(h, monkeypatch):
    # A lone SET travels in a run as a batch record, 4 bytes longer than its request header:
    # weighed by its header, three records "fit" in a limit that only two do, and the worker
    # refused the whole dispatch as over MAX_BATCH_BYTES.
    hot = key_for(0, "hot")
    record = len(pack_request(Kind.SET, 1, hot, b"v" * 100))
    monkeypatch.setattr(core, "MAX_BATCH_BYTES", 3 * record - 1)
    for request_id in range(1, 6):
        h.send(Request(Kind.SET, request_id, hot, b"v" * 100))
    [(worker, first, _)] = h.dispatched()
    h.answer(worker, first, ok(first))
    out = h.take()
    [reply] = [decode_reply(f[1:]) for s, f in out if s is Side.FRONTEND]
    assert reply.request_id == 1
    [frames] = [f for s, f in out if s is Side.BACKEND]
    run = decode_from_broker(frames[1:])
    assert [op[1] for op in run.ops] == [2, 3]
    assert len(frames[2]) <= core.MAX_BATCH_BYTES


def test_a_dispatch_the_worker_refuses_whole_fails_at_once_as_not_applied(h):
    a, b = key_for(0, "a"), key_for(0, "b")
    send_batch(h, [Request(Kind.SET, 1, a, b"x"), Request(Kind.SET, 2, b, b"y")])
    [(worker, dispatch, _)] = batch_dispatches(h)
    refusal = Reply(Status.ERROR, 0, dispatch.token, None, b"malformed request: too big")
    h.broker.on_worker([worker, *encode_reply(refusal)], h.now)
    [answers] = by_client(h).values()
    assert sorted((r.request_id, r.status) for r in answers) == [
        (1, Status.ERROR),
        (2, Status.ERROR),
    ]
    assert all(b"not applied" in r.body and b"unknown" not in r.body for r in answers)
    assert h.broker.idle() and not h.broker.tokens.held(a)


def test_a_lone_batched_request_refused_whole_is_not_forwarded_as_a_reply_to_id_0(h):
    key = key_for(0)
    send_batch(h, [Request(Kind.SET, 7, key, b"x")])
    [(worker, dispatch, _)] = batch_dispatches(h)
    refusal = Reply(Status.ERROR, 0, dispatch.token, None, b"malformed request: too big")
    h.broker.on_worker([worker, *encode_reply(refusal)], h.now)
    [[answer]] = by_client(h).values()
    assert (answer.request_id, answer.status) == (7, Status.ERROR)
    assert h.broker.idle()


# --- admission control and the deadlines of waiting requests (issue 10, item 6) -------------


def test_a_request_waiting_for_its_keys_token_fails_after_the_shard_wait_not_applied(h):
    key = key_for(0)
    h.send(Request(Kind.SET, 1, key, b"a"))
    [(worker, first, _)] = h.dispatched()  # at a slow worker (4 s timeout)
    h.advance(0.5)
    h.send(Request(Kind.GET, 2, key))  # waits for the SET's token
    h.advance(2.9)
    assert h.take() == []
    h.advance(0.1)  # 3 s after the GET came: its wait is over, though the SET's is not
    [reply] = h.replies()
    assert (reply.request_id, reply.status) == (2, Status.UNAVAILABLE)
    assert b"not applied" in reply.body
    h.answer(worker, first, ok(first))
    [reply] = h.replies()  # the SET's answer; the GET is not dispatched after its failure
    assert reply.request_id == 1 and h.broker.idle() and not h.broker.tokens.held(key)


def test_every_request_of_a_hot_key_for_a_shard_without_owner_fails_after_one_shard_wait(
    monkeypatch,
):
    # 30,000 GETs of one key to a shard with no worker were answered after up to 12 s: each
    # run of waiters took the token in turn and waited another 3 s for an owner.
    monkeypatch.setattr(core, "MAX_BATCH_OPS", 2)
    h = Harness()
    h.register(b"w0")  # shard 1 has no owner
    key = key_for(1)
    for request_id in range(1, 8):
        h.send(Request(Kind.GET, request_id, key))
    h.advance(2.9)
    assert h.take() == []
    h.advance(0.1)
    replies = h.replies()
    assert sorted(r.request_id for r in replies) == list(range(1, 8))
    assert {r.status for r in replies} == {Status.UNAVAILABLE}
    assert h.broker.idle() and h.broker.next_timer(h.now) > 0.5


def test_a_run_that_takes_its_keys_token_waits_for_an_owner_only_what_is_left_of_its_wait():
    h = Harness()
    h.register(b"w0")  # shard 1 has no owner
    key = key_for(1)
    h.send(Request(Kind.GET, 1, key))
    h.advance(2.5)
    h.send(Request(Kind.GET, 2, key))
    h.advance(0.5)  # the first fails; the second takes the token and waits for an owner
    assert [r.request_id for r in h.replies()] == [1]
    h.advance(2.4)
    assert h.take() == []
    h.advance(0.1)  # 3 s after it came, not 3 s after it took the token
    [reply] = h.replies()
    assert (reply.request_id, reply.status) == (2, Status.UNAVAILABLE)


def limited() -> Harness:
    """Two workers, and limits of 1000 bytes held per client and 2500 in all."""
    h = Harness(dataclasses.replace(CONFIG, max_client_bytes=1000, max_pending_bytes=2500))
    h.register(b"w0")
    h.register(b"w1")
    return h


def test_a_client_over_its_byte_limit_is_answered_busy_and_admitted_again_once_answered():
    h = limited()
    keys = [key_for(0, f"k{i}") for i in range(3)]
    send_batch(h, [Request(Kind.SET, 1, keys[0], b"v" * 600)])  # 600 + header: admitted
    [(worker, first, _)] = batch_dispatches(h)
    send_batch(h, [Request(Kind.SET, 2, keys[1], b"v" * 600)], batch_id=2)  # over 1000 held
    [[busy]] = by_client(h).values()
    assert (busy.request_id, busy.status) == (2, Status.BUSY) and b"busy" in busy.body
    h.send(Request(Kind.SET, 3, keys[2], b"v" * 600))  # a lone request too
    [busy] = h.replies()
    assert (busy.request_id, busy.status) == (3, Status.BUSY)
    send_batch(h, [Request(Kind.SET, 4, keys[1], b"v" * 600)], client=b"other")  # its own bound
    assert len(batch_dispatches(h)) == 1
    h.broker.on_worker([worker, *encode_batch_reply(answer_all(first))], h.now)
    h.take()
    send_batch(h, [Request(Kind.SET, 5, keys[2], b"v" * 600)], batch_id=3)
    assert len(batch_dispatches(h)) == 1  # the first's answer released its bytes


def test_the_total_byte_limit_refuses_any_client_and_a_lone_large_message_still_gets_in():
    h = limited()
    for index in range(4):  # each client under its bound, 4 x 600+ over the total of 2500
        client = f"c{index}".encode()
        h.send(Request(Kind.SET, index + 1, key_for(0, f"k{index}"), b"v" * 600), client)
    out = h.take()
    assert len([f for s, f in out if s is Side.BACKEND]) == 3
    [(client, busy)] = [(f[0], decode_reply(f[1:])) for s, f in out if s is Side.FRONTEND]
    assert (client, busy.status) == (b"c3", Status.BUSY)
    # Alone, a message larger than every limit is admitted: the largest legal one gets through.
    h2 = limited()
    send_batch(h2, [Request(Kind.SET, 1, key_for(0), b"v" * 5000)])
    assert len(batch_dispatches(h2)) == 1


def test_the_broker_holds_nothing_once_everything_is_answered_or_expired(h):
    a, b = key_for(0, "a"), key_for(1, "b")
    send_batch(h, [Request(Kind.SET, 1, a, b"x"), Request(Kind.SET, 2, b, b"y")])
    send_batch(h, [Request(Kind.GET, 3, a), Request(Kind.SET, 1, a, b"x")], batch_id=2)  # 1: retry
    h.send(Request(Kind.GET, 4, b))
    assert h.broker.held_ops == 4 and h.broker.held_bytes > 0
    for worker, dispatch, _ in batch_dispatches(h):
        h.broker.on_worker([worker, *encode_batch_reply(answer_all(dispatch))], h.now)
    h.advance(CONFIG.shard_wait_s + CONFIG.worker_timeout_s)
    h.take()
    assert h.broker.idle()
    assert (h.broker.held_ops, h.broker.held_bytes, h.broker._accounts) == (0, 0, {})
