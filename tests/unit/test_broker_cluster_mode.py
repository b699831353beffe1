"""The broker in cluster mode (docs/cluster.md): etcd, not the broker, says which worker leads
each shard (Broker.set_leaders, fed by broker/cluster.py); the broker only routes to it.

No sockets: frames in, outbox out, as tests/unit/test_broker_core.py does.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from broker.core import Broker, Side
from tests.unit.test_broker_core import CLIENT, CONFIG, HEARTBEAT, key_for
from zkv.protocol import (
    Dispatch,
    Kind,
    Ready,
    Reply,
    Request,
    Status,
    decode_from_broker,
    decode_reply,
    encode_control,
    encode_reply,
    encode_request,
)

pytestmark = pytest.mark.unit

CLUSTER = dataclasses.replace(CONFIG, cluster_mode=True)


class Cluster:
    def __init__(self) -> None:
        self.now = 0.0
        self.broker = Broker(CLUSTER, self.now, epoch=100)

    def ready(self, worker: bytes, claimed: int | None = None) -> None:
        self.broker.on_worker([worker, *encode_control(Ready(claimed, 0))], self.now)

    def take(self) -> list[tuple[Side, list[bytes]]]:
        out, self.broker.outbox = self.broker.outbox, []
        return [(side, frames) for side, frames in out if frames[1:] != HEARTBEAT]

    def get(self, key: bytes, request_id: int = 1) -> None:
        request = Request(Kind.GET, request_id, key)
        self.broker.on_client([CLIENT, *encode_request(request)], self.now)

    def dispatched(self) -> list[tuple[bytes, Dispatch]]:
        found = []
        for side, frames in self.take():
            assert side is Side.BACKEND, frames
            message = decode_from_broker(frames[1:])
            assert isinstance(message, Dispatch), message
            found.append((frames[0], message))
        return found


def test_a_ready_worker_gets_no_assign_and_no_shard_until_etcd_names_it_leader() -> None:
    c = Cluster()
    c.ready(b"w-a", claimed=0)  # a claim is not enough: etcd decides
    assert c.take() == []  # no ASSIGN in cluster mode
    assert c.broker.registry.owner(0) is None
    c.get(key_for(0))
    assert c.dispatched() == []  # waits for a leader
    c.broker.set_leaders({0: b"w-a"}, c.now)
    [(worker, dispatch)] = c.dispatched()
    assert worker == b"w-a" and dispatch.request.key == key_for(0)


def test_a_leader_named_before_it_registers_gets_its_shard_when_it_does() -> None:
    c = Cluster()
    c.broker.set_leaders({1: b"w-b"}, c.now)
    c.get(key_for(1))
    assert c.dispatched() == []
    c.ready(b"w-b")  # registered, not yet claiming: it has not taken the shard over
    assert c.dispatched() == []
    c.ready(b"w-b", claimed=1)  # its takeover is done
    [(worker, _)] = c.dispatched()
    assert worker == b"w-b"


def test_a_new_leader_gets_what_the_old_one_had_in_flight_and_the_old_one_gets_nothing() -> None:
    c = Cluster()
    c.ready(b"old", claimed=0)
    c.ready(b"new", claimed=0)
    c.broker.set_leaders({0: b"old"}, c.now)
    c.get(key_for(0), request_id=7)
    [(worker, first)] = c.dispatched()
    assert worker == b"old"
    c.broker.set_leaders({0: b"new"}, c.now)  # etcd: a failover
    [(worker, again)] = c.dispatched()
    assert worker == b"new" and again.request.request_id == 7
    # The old leader's late answer to its token is not forwarded; the new one's is.
    late = Reply(Status.OK, 7, first.token, None, b"stale")
    c.broker.on_worker([b"old", *encode_reply(late)], c.now)
    assert c.take() == []
    fresh = Reply(Status.OK, 7, again.token, None, b"v")
    c.broker.on_worker([b"new", *encode_reply(fresh)], c.now)
    [(side, frames)] = c.take()
    assert side is Side.FRONTEND and decode_reply(frames[1:]).body == b"v"


def test_a_silent_leader_is_dropped_from_routing_but_no_standby_is_promoted() -> None:
    c = Cluster()
    c.ready(b"leader", claimed=0)
    c.ready(b"standby")
    c.broker.set_leaders({0: b"leader"}, c.now)
    c.now += CLUSTER.heartbeat_interval_s * (CLUSTER.heartbeat_liveness + 1)
    c.broker.on_worker([b"standby", *HEARTBEAT], c.now)
    c.broker.on_timer(c.now)
    assert c.broker.registry.get(b"leader") is None
    assert c.broker.registry.owner(0) is None  # etcd names the next leader, not the broker
    c.take()
    # The leader comes back (a long pause): etcd still says it leads, so it is routed again.
    c.ready(b"leader", claimed=0)
    assert c.broker.registry.owner(0) == b"leader"


def test_info_says_degraded_while_etcd_is_unreachable() -> None:
    c = Cluster()
    c.ready(b"a", claimed=0)
    c.ready(b"b", claimed=1)
    c.broker.set_leaders({0: b"a", 1: b"b"}, c.now)
    ping = Request(Kind.PING, 9)
    c.broker.on_client([CLIENT, *encode_request(ping)], c.now)
    [(_, frames)] = c.take()
    info = json.loads(decode_reply(frames[1:]).body)
    assert info["status"] == "ok" and info["coordinator"] == "ok"
    c.broker.coordinator_ok = False
    c.broker.on_client([CLIENT, *encode_request(ping)], c.now)
    [(_, frames)] = c.take()
    info = json.loads(decode_reply(frames[1:]).body)
    assert info["status"] == "degraded" and info["coordinator"] == "unreachable"


def test_leaders_outside_the_shard_range_are_ignored() -> None:
    c = Cluster()
    c.ready(b"a")
    c.broker.set_leaders({5: b"a", -1: b"a"}, c.now)
    assert c.broker.registry.owned() == [False, False]


def test_a_leader_that_steps_down_is_unrouted_before_etcd_says_so_and_nothing_is_lost() -> None:
    c = Cluster()
    c.ready(b"a", claimed=0)
    c.broker.set_leaders({0: b"a"}, c.now)
    c.get(key_for(0), request_id=3)
    [(worker, first)] = c.dispatched()
    assert worker == b"a"
    c.ready(b"a")  # its lease lapsed: it claims nothing now; etcd's reading is not here yet
    assert c.broker.registry.owner(0) is None
    assert c.dispatched() == []  # the request waits for the next leader
    c.ready(b"b", claimed=0)
    c.broker.set_leaders({0: b"b"}, c.now)
    [(worker, again)] = c.dispatched()
    assert worker == b"b" and again.request.request_id == 3 and again.token != first.token
