"""Change events without sockets: the worker's sequence numbers and publisher (fake socket),
the watchers' gap tracking, the gateway hub's history ring and its SSE text, and when the
worker's loop wakes for the next expiry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from gateway.watch import (
    HubState,
    Watcher,
    format_event,
    format_reset,
    parse_event_id,
)
from tests.fakes import FakeClock
from workers.cluster import ClusterWorker
from workers.events import SEQ_N_MASK, EventPublisher, Sequencer
from workers.shard import Shard
from workers.store import TTLStore
from workers.worker import Worker, WorkerConfig
from zkv.protocol import Event, EventKind, decode_event, event_stream
from zkv.watch import REPLACED_STREAMS, Gap, SeqTracker

pytestmark = pytest.mark.unit

SET, DELETE, EXPIRE = int(EventKind.SET), int(EventKind.DELETE), int(EventKind.EXPIRE)


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.options: dict[int, Any] = {}
        self.connected: list[str] = []
        self.closed = False
        self.more = False
        self.inbox: list[bytes] = []  # subscription messages from the brokers

    def get(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.inbox else 0

    def recv(self, flags: int = 0) -> bytes:
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.pop(0)

    def setsockopt(self, option: int, value: Any) -> None:
        self.options[option] = value

    def connect(self, endpoint: str) -> None:
        self.connected.append(endpoint)

    def disconnect(self, endpoint: str) -> None:
        self.connected.remove(endpoint)

    def send(self, frame: bytes, flags: int = 0) -> None:
        assert flags & zmq.NOBLOCK, "an event send must never block the worker's loop"
        if self.more:
            self.sent[-1].append(frame)
        else:
            self.sent.append([frame])
        self.more = bool(flags & zmq.SNDMORE)

    def close(self, linger: int | None = None) -> None:
        self.closed = True


class FakeContext:
    def __init__(self) -> None:
        self.sockets: list[FakeSocket] = []

    def socket(self, kind: int) -> FakeSocket:
        assert kind == zmq.XPUB
        socket = FakeSocket()
        self.sockets.append(socket)
        return socket


def publisher(watched: bool = True) -> tuple[EventPublisher, FakeSocket]:
    context = FakeContext()
    events = EventPublisher(context, ["tcp://127.0.0.1:5558"])  # type: ignore[arg-type]
    socket = context.sockets[0]
    if watched:
        socket.inbox.append(b"\x01")  # a subscriber to every key, through a broker
    return events, socket


# --- sequence numbers ------------------------------------------------------------------------


def test_each_shard_numbers_its_events_from_one_within_its_owners_epoch() -> None:
    sequencer = Sequencer()
    assert sequencer.take(0, 7, 3) == 7 << 32 | 1
    assert sequencer.take(0, 7, 2) == 7 << 32 | 4  # continues: 1, 2, 3 were taken
    assert sequencer.take(1, 7, 1) == 7 << 32 | 1  # another shard: its own count
    assert sequencer.take(0, 8, 1) == 8 << 32 | 1  # a new owner epoch: a new stream
    assert Sequencer.after(7 << 32 | 5) == 7 << 32 | 6


def test_an_owner_under_a_restarted_broker_gets_another_stream() -> None:
    # An ownership epoch is broker_epoch << 32 | sequence: after a broker restart the low half
    # starts again, so the stream must come from both halves (zkv.protocol.event_stream).
    sequencer = Sequencer()
    before = sequencer.take(1, 1 << 32 | 9, 1)
    after = sequencer.take(1, 2 << 32 | 9, 1)
    assert before >> 32 == event_stream(1 << 32 | 9) and after >> 32 == event_stream(2 << 32 | 9)
    assert before >> 32 != after >> 32 and after & SEQ_N_MASK == 1


def test_a_list_that_crosses_the_wrap_is_numbered_across_it() -> None:
    events, socket = publisher()
    events.sequencer.take(1, 2, SEQ_N_MASK - 1)
    events.publish(1, 2, [(SET, b"a", 1, 0), (SET, b"b", 2, 0), (SET, b"c", 3, 0)])
    seqs = [decode_event(frames).seq & SEQ_N_MASK for frames in socket.sent]
    assert seqs == [SEQ_N_MASK, 1, 2]


def test_the_number_wraps_to_one_not_zero_nor_into_the_stream() -> None:
    sequencer = Sequencer()
    first = sequencer.take(0, 3, SEQ_N_MASK - 1)
    assert first == 3 << 32 | 1
    assert sequencer.take(0, 3, 2) == 3 << 32 | SEQ_N_MASK  # then wraps
    assert sequencer.take(0, 3, 1) == 3 << 32 | 2
    assert Sequencer.after(3 << 32 | SEQ_N_MASK) == 3 << 32 | 1


def test_the_publisher_sends_one_decodable_message_per_change_and_empties_the_list() -> None:
    events, socket = publisher()
    assert socket.options[zmq.SNDHWM] == 100_000 and socket.options[zmq.LINGER] == 0
    pending = [(SET, b"a", 10, 5000), (DELETE, b"b", 11, 0), (EXPIRE, b"c", 9, 4000)]
    events.publish(2, 5, pending)
    assert pending == []
    got = [decode_event(frames) for frames in socket.sent]
    assert got == [
        Event(b"a", EventKind.SET, 2, 5 << 32 | 1, 10, 5000),
        Event(b"b", EventKind.DELETE, 2, 5 << 32 | 2, 11, None),
        Event(b"c", EventKind.EXPIRE, 2, 5 << 32 | 3, 9, 4000),
    ]
    assert socket.sent[0][0] == b"a"  # the key first: ZeroMQ's prefix subscriptions filter
    events.publish(2, 5, [(SET, b"d", 12, 0)])
    assert decode_event(socket.sent[-1]).seq == 5 << 32 | 4
    assert events.published == 4


def test_while_nobody_watches_nothing_is_sent_but_the_changes_are_numbered() -> None:
    events, socket = publisher(watched=False)
    pending = [(SET, b"a", 1, 0), (SET, b"b", 2, 0)]
    events.publish(0, 3, pending)
    assert socket.sent == [] and pending == []
    socket.inbox += [b"\x01user:", b"\x01"]  # two prefixes subscribed
    events.publish(0, 3, [(SET, b"c", 3, 0)])
    assert [decode_event(frames).seq for frames in socket.sent] == [3 << 32 | 3]
    socket.inbox += [b"\x00user:"]
    events.publish(0, 3, [(SET, b"d", 4, 0)])
    assert len(socket.sent) == 2  # one prefix still subscribed
    socket.inbox += [b"\x00"]  # the last one left (or its broker's connection ended)
    events.publish(0, 3, [(SET, b"e", 5, 0)])
    assert len(socket.sent) == 2 and events.subscriptions == 0
    socket.inbox += [b"\x01a", b"\x00a"] * 5  # read by the timer without any write
    events.poll_subscriptions()
    assert socket.inbox == [] and events.subscriptions == 0


def test_the_publisher_follows_the_brokers_it_is_given() -> None:
    events, socket = publisher()
    events.connect(["tcp://b:1", "tcp://c:1"])
    assert sorted(socket.connected) == ["tcp://b:1", "tcp://c:1"]
    events.connect([])
    assert socket.connected == []


# --- gaps, as watchers see them ------------------------------------------------------------------


def test_the_tracker_reports_gaps_new_streams_and_drops_duplicates() -> None:
    tracker = SeqTracker()
    assert tracker.check(0, 5 << 32 | 10) is None  # the first of a shard: nothing expected yet
    assert tracker.check(0, 5 << 32 | 11) is None
    assert tracker.check(0, 5 << 32 | 11) is False  # the same event through a second broker
    gap = tracker.check(0, 5 << 32 | 15)
    assert gap == Gap(0, 5 << 32 | 12, 5 << 32 | 15, False)
    assert isinstance(gap, Gap) and gap.missed == 3
    assert tracker.check(1, 5 << 32 | 1) is None  # shards are independent
    new = tracker.check(0, 6 << 32 | 1)
    assert isinstance(new, Gap) and new.new_stream and new.missed is None
    assert tracker.check(0, 5 << 32 | 16) is False  # late, from the old owner
    assert tracker.check(0, 6 << 32 | 2) is None


def test_a_stream_never_seen_is_new_even_when_its_number_is_smaller() -> None:
    # A restarted broker's owners may have smaller streams: their events are delivered.
    tracker = SeqTracker()
    assert tracker.check(1, 9 << 32 | 40) is None
    new = tracker.check(1, 3 << 32 | 1)
    assert isinstance(new, Gap) and new.new_stream
    assert tracker.check(1, 3 << 32 | 2) is None
    assert tracker.check(1, 9 << 32 | 41) is False  # the replaced stream's late event
    for stream in range(10, 10 + 2 * REPLACED_STREAMS):  # bounded memory of replaced streams
        assert isinstance(tracker.check(1, stream << 32 | 1), Gap)
    assert len(tracker.replaced[1]) == REPLACED_STREAMS


def test_a_prefix_watcher_sees_only_stream_changes_not_the_other_keys_numbers() -> None:
    # ZeroMQ sends a prefix watcher its keys only: seq jumps over the other keys' events.
    tracker = SeqTracker(exact=False)
    assert tracker.check(0, 5 << 32 | 1) is None
    assert tracker.check(0, 5 << 32 | 22) is None  # 20 writes of other keys between
    assert tracker.check(0, 5 << 32 | 22) is False
    new = tracker.check(0, 6 << 32 | 4)
    assert isinstance(new, Gap) and new.new_stream


# --- the gateway's hub ---------------------------------------------------------------------------


def event(key: bytes, n: int, shard: int = 0, kind: EventKind = EventKind.SET) -> Event:
    return Event(key, kind, shard, 1 << 32 | n, 100 + n, None)


def test_an_event_is_formatted_as_one_sse_message() -> None:
    text = format_event(Event(b"a\xffb", EventKind.EXPIRE, 3, 1 << 32 | 2, 77, 1234)).decode()
    head, _, rest = text.partition("data: ")
    assert head == "event: expire\nid: 3:4294967298\n"
    assert rest.endswith("\n\n")
    assert json.loads(rest) == {"key": "a\udcffb", "version": 77, "expires_at_ms": 1234}
    assert format_reset("slow").startswith(b"event: reset\ndata: ")


def test_a_last_event_id_is_shard_colon_seq() -> None:
    assert parse_event_id("3:4294967298") == (3, 4294967298)
    for bad in ("", "3", "a:1", "1:-2", "1:2:3", "1" * 50 + ":1"):
        with pytest.raises(ValueError, match="Last-Event-ID"):
            parse_event_id(bad)


def test_a_watcher_gets_only_its_prefix() -> None:
    hub = HubState()
    watcher = Watcher(b"user:")
    assert hub.join(watcher, None)
    hub.add(event(b"user:1", 1))
    hub.add(event(b"other", 2))
    assert [chunk.split(b"\n")[1] for chunk in watcher.queue] == [b"id: 0:4294967297"]


def test_a_resume_replays_what_followed_the_last_id_and_a_lost_id_gets_a_reset() -> None:
    hub = HubState(history=3)
    for n in range(1, 6):
        hub.add(event(f"k{n}".encode(), n))
    assert len(hub.ring) == 3 and len(hub.where) == 3  # bounded, index too
    resumed = Watcher(b"")
    hub.join(resumed, (0, 1 << 32 | 3))
    assert [json.loads(c.split(b"data: ")[1])["key"] for c in resumed.queue] == ["k4", "k5"]
    lost = Watcher(b"")
    hub.join(lost, (0, 1 << 32 | 1))  # fell out of the ring
    assert list(lost.queue) == [format_reset("history", 0)]
    hub.add(event(b"k6", 6))
    assert len(resumed.queue) == 3 and len(lost.queue) == 2  # and then live


def test_a_gap_or_a_new_stream_seen_by_the_hub_resets_every_watcher() -> None:
    hub = HubState()
    watcher = Watcher(b"x")
    hub.join(watcher, None)
    hub.add(event(b"x1", 1))
    hub.add(event(b"y", 3))  # n = 2 was lost: everyone is told, whatever their prefix
    hub.add(Event(b"x2", EventKind.SET, 0, 2 << 32 | 1, 1, None))
    kinds = [chunk.split(b"\n")[0] for chunk in watcher.queue]
    assert kinds == [b"event: set", b"event: reset", b"event: reset", b"event: set"]
    assert json.loads(watcher.queue[1].split(b"data: ")[1]) == {"reason": "gap", "shard": 0}
    assert b'"stream"' in watcher.queue[2]
    hub.add(Event(b"x3", EventKind.SET, 0, 1 << 32 | 2, 1, None))  # the replaced stream's
    hub.add(Event(b"x4", EventKind.SET, 0, 0 << 32 | 1, 1, None))  # smaller, never seen: new
    assert [chunk.split(b"\n")[0] for chunk in list(watcher.queue)[4:]] == [
        b"event: reset",
        b"event: set",
    ]


def test_a_slow_watcher_is_cut_off_with_a_reset_and_holds_no_more() -> None:
    hub = HubState()
    watcher = Watcher(b"", limit=3)
    hub.join(watcher, None)
    for n in range(1, 10):
        hub.add(event(b"k", n))
    assert watcher.overflowed
    assert list(watcher.queue) == [format_reset("slow")]


def test_the_hub_refuses_watchers_past_its_bound() -> None:
    hub = HubState(max_watchers=2)
    assert hub.join(Watcher(b""), None) and hub.join(Watcher(b""), None)
    assert not hub.join(Watcher(b""), None)


# --- the worker's loop ---------------------------------------------------------------------------


def test_the_worker_wakes_for_expiry_at_the_next_deadline_not_a_cycle_later() -> None:
    clock = FakeClock()
    worker = Worker(WorkerConfig(expire_cycle_s=0.05), context=zmq.Context.instance(), clock=clock)
    worker.shard = Shard(0, TTLStore(clock))
    worker.shard.store.set(b"k", b"v", 7)  # due in 7 ms
    worker._next_expire_s = 100.05  # the cycle's next pass
    assert worker._expire_due_s(100.0) == pytest.approx(100.007)
    assert worker._next_expire_s == pytest.approx(100.007)


@pytest.fixture
def cluster_worker() -> Iterator[ClusterWorker]:
    context = zmq.Context()
    worker = ClusterWorker(WorkerConfig(), "h1-aaaa", FakeControl(), context=context)  # type: ignore[arg-type]
    yield worker
    worker.close_links()
    context.term()


class FakeControl:
    view = None
    reachable = True
    readings = 1
    brokers: dict[str, str] = {}  # noqa: RUF012
    events_backends: frozenset[str] = frozenset()

    def lease_valid(self) -> bool:
        return True

    def ask(self, *args: object, **kwargs: object) -> None:
        pass

    def outcomes(self) -> list:
        return []


def test_a_cluster_worker_publishes_to_the_events_backends_etcd_lists(cluster_worker) -> None:
    events, socket = publisher()
    events.connect([])
    cluster_worker.events = events
    cluster_worker.control.events_backends = frozenset({"tcp://b1:5558", "tcp://b2:5558"})
    cluster_worker._control_pass()
    assert sorted(socket.connected) == ["tcp://b1:5558", "tcp://b2:5558"]
    cluster_worker.control.events_backends = frozenset({"tcp://b2:5558"})  # b1 left etcd
    cluster_worker._control_pass()
    assert socket.connected == ["tcp://b2:5558"]


class HoldingReplicator:
    full = False

    def __init__(self) -> None:
        self.held: list[Any] = []

    def hold(self, item: Any, nbytes: int) -> None:
        self.held.append(item)

    def drain_held(self) -> list[Any]:
        held, self.held = self.held, []
        return held


class ChangingShard(Shard):
    def handle_batch(self, dispatches: Any, early: Any = None, room: Any = None) -> list[Any]:
        assert self.events is not None
        self.events.append((SET, b"k", 1, 0))
        return []


def test_a_leaders_events_wait_with_its_held_replies_for_the_followers(cluster_worker) -> None:
    # Cluster mode: an event must not announce a write before the in-sync followers have it,
    # nor may an expiry pass in between send it early.
    worker = cluster_worker
    events, socket = publisher()
    worker.events = events
    shard = ChangingShard(0, TTLStore(FakeClock()), epoch=9)
    worker.shard = shard
    worker._arm_events(shard)
    replicator = HoldingReplicator()
    worker.replicator = replicator  # type: ignore[assignment]
    worker.role = "leader"
    link = type("FakeLink", (), {"broker": "b1"})()
    worker._current_link = lambda: link  # type: ignore[method-assign]
    worker._serve([object()])  # type: ignore[list-item]
    worker._publish(shard)  # what an expiry pass does
    assert socket.sent == []
    worker._release(replicator.held.pop())
    assert [decode_event(frames).seq for frames in socket.sent] == [9 << 32 | 1]
    # A pass dropped unreleased (stepping down) still uses its numbers: the gap shows.
    worker._serve([object()])  # type: ignore[list-item]
    worker._step_down("test")
    assert events.sequencer.take(0, 9, 1) == 9 << 32 | 3
