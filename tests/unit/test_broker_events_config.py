"""The broker's events flags (--events, --events-backend; broker/events.py) and the events
backend in the broker's etcd record, so cluster workers find every broker's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.__main__ import bind_refusal_of, parse_args
from zkv.coordination import BrokerInfo, Coordinator, parse_broker
from zkv.etcd import KV


def test_events_bind_next_to_the_frontend_by_default_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = parse_args([])
    assert (args.events, args.events_backend) == ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558")
    args = parse_args(["--events", "none"])
    assert (args.events, args.events_backend) == (None, None)
    monkeypatch.setenv("ZKV_EVENTS", "tcp://127.0.0.1:7557")
    monkeypatch.setenv("ZKV_EVENTS_BACKEND", "ipc:///tmp/zkv-events")
    args = parse_args([])
    assert (args.events, args.events_backend) == ("tcp://127.0.0.1:7557", "ipc:///tmp/zkv-events")


def test_bad_or_clashing_events_endpoints_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--events", "127.0.0.1:5557"])
    assert "argument --events" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--events", "tcp://127.0.0.1:5555"])  # the frontend's
    assert "must differ" in capsys.readouterr().err


def test_events_sit_beside_the_frontend_and_backend_unless_told() -> None:
    args = parse_args(["--advertise", "10.77.0.11", "--frontend", "tcp://127.0.0.1:5555"])
    assert (args.events, args.events_backend) == ("tcp://127.0.0.1:5557", "tcp://10.77.0.11:5558")
    assert bind_refusal_of(args) is None  # loopback like the frontend; the backend is CURVE
    args = parse_args(["--frontend", "ipc:///tmp/f", "--backend", "tcp://*:7001"])
    assert (args.events, args.events_backend) == ("tcp://127.0.0.1:5557", "tcp://*:5558")


def test_a_plain_events_endpoint_other_hosts_reach_is_refused_like_the_frontend() -> None:
    args = parse_args(["--events", "tcp://10.77.0.11:5557"])
    refusal = bind_refusal_of(args)
    assert refusal is not None and "events endpoint would bind tcp://10.77.0.11:5557" in refusal
    assert "(--events/ZKV_EVENTS)" in refusal and "--events none" in refusal
    assert bind_refusal_of(parse_args(["--advertise", "10.77.0.11", "--frontend-curve"])) is None
    assert bind_refusal_of(parse_args(["--advertise", "10.77.0.11", "--insecure"])) is None
    args = parse_args(
        ["--frontend", "tcp://127.0.0.1:5555", "--events", "none", "--advertise", "10.77.0.11"]
    )
    assert bind_refusal_of(args) is None  # no events endpoint, and the backends are CURVE


class Recorder:
    """An etcd that keeps what it is given (Coordinator.register_broker's put)."""

    def __init__(self) -> None:
        self.puts: dict[str, bytes] = {}

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        self.puts[key] = value


def test_the_broker_record_carries_its_events_backend_and_old_records_still_parse() -> None:
    etcd = Recorder()
    info = BrokerInfo("tcp://h:5556", "tcp://h:5555", None, "tcp://h:5558")
    Coordinator(etcd, "zkv").register_broker("b1", info, 7)  # type: ignore[arg-type]
    ((key, value),) = etcd.puts.items()
    assert json.loads(value)["events_backend"] == "tcp://h:5558"
    record: Any = KV(key.encode(), value, 1, 1, 1, 7)
    assert parse_broker(record) == info
    old = json.dumps({"backend": "b", "frontend": "f", "public_key": None}).encode()
    assert parse_broker(KV(key.encode(), old, 1, 1, 1, 7)).events_backend is None
