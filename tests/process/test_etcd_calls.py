"""zkv.etcd against a real etcd (tests/etcd.py starts one): the calls do what etcd does, and a
member that stops answering makes a call fail within its timeout, not hang."""

from __future__ import annotations

import time

import pytest

from tests.etcd import MIN_LEASE_TTL_S, EtcdServer, etcd_server
from zkv.etcd import Compare, Etcd, EtcdUnavailable, LeaseNotFound, delete, get, put

__all__ = ["etcd_server"]  # the fixture, imported for pytest

pytestmark = pytest.mark.process


def test_the_calls_against_a_real_etcd(etcd_server: EtcdServer) -> None:
    etcd = etcd_server.client()
    first = etcd.put("/t/calls/a", "1")
    found = etcd.get("/t/calls/a")
    assert found is not None and found.value == b"1"
    assert found.create_revision == found.mod_revision == first and found.version == 1
    assert etcd.get("/t/calls/none") is None
    etcd.put("/t/calls/b", b"\x00\xff")  # any bytes: the gateway's base64 carries them
    assert [kv.value for kv in etcd.range_prefix("/t/calls/")] == [b"1", b"\x00\xff"]
    assert etcd.delete("/t/calls/b") == 1 and etcd.delete("/t/calls/b") == 0

    won = etcd.txn(
        [Compare.absent("/t/calls/c")],
        [put("/t/calls/c", "x"), get("/t/calls/c"), delete("/t/calls/a")],
        [],
    )
    assert won.succeeded and won.responses[2] == 1
    created = won.responses[1]
    assert isinstance(created, list) and created[0].create_revision == won.revision
    lost = etcd.txn([Compare.absent("/t/calls/c")], [put("/t/calls/c", "y")], [get("/t/calls/c")])
    assert not lost.succeeded and isinstance(lost.responses[0], list)
    assert lost.responses[0][0].value == b"x"


def test_leases_against_a_real_etcd(etcd_server: EtcdServer) -> None:
    etcd = etcd_server.client()
    lease_id, ttl_s = etcd.lease_grant(MIN_LEASE_TTL_S)
    assert ttl_s == MIN_LEASE_TTL_S
    etcd.put("/t/leases/k", "v", lease_id)
    assert etcd.lease_keepalive(lease_id) == ttl_s
    etcd.lease_revoke(lease_id)
    assert etcd.get("/t/leases/k") is None  # revoking deletes the lease's keys
    assert etcd.lease_keepalive(lease_id) == 0
    etcd.lease_revoke(lease_id)  # twice: not an error
    with pytest.raises(LeaseNotFound):
        etcd.put("/t/leases/k", "v", lease_id)


def test_etcds_minimum_ttl_is_what_a_shorter_ask_gets(etcd_server: EtcdServer) -> None:
    """etcd raises a TTL below its minimum instead of refusing it (the tests rely on 1 s)."""
    with pytest.raises(ValueError):
        etcd_server.client().lease_grant(0)
    _, ttl_s = etcd_server.client().lease_grant(1)
    assert ttl_s == 1


def test_a_member_that_stops_answering_is_unavailable_within_the_timeout(
    etcd_server: EtcdServer,
) -> None:
    etcd = etcd_server.client(timeout_s=0.3)
    etcd.put("/t/paused", "v")  # a live keep-alive connection, then the member freezes
    etcd_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="timed out"):
            etcd.get("/t/paused")
        assert time.monotonic() - started < 5.0  # 0.3 s; with no deadline, forever
    finally:
        etcd_server.resume()
    found = etcd.get("/t/paused")  # a new connection once the member answers again
    assert found is not None and found.value == b"v"


def test_no_endpoint_listening_is_unavailable_at_once(etcd_server: EtcdServer) -> None:
    from tests.cluster import free_port

    etcd = Etcd([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"], 0.5)
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="refused"):
        etcd.get("/t/none")
    assert time.monotonic() - started < 5.0


def test_a_dead_endpoint_before_a_live_one_is_skipped(etcd_server: EtcdServer) -> None:
    from tests.cluster import free_port

    etcd = Etcd([f"http://127.0.0.1:{free_port()}", etcd_server.url], 0.5)
    etcd.put("/t/second", "v")
    assert etcd.get("/t/second") is not None
