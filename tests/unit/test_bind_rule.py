"""The rule for sockets other hosts can reach (issue 11): CURVE, or ``--insecure`` said aloud;
and ``--advertise``, the address a broker binds unless told (zkv/config.py, broker/__main__.py).
No sockets: the broker refuses before it binds anything."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from broker.__main__ import bind_refusal_of, main, parse_args
from zkv.config import advertise_host, advertised, bind_refusal, is_loopback

pytestmark = pytest.mark.unit

CLUSTER_ENV = (
    "ZKV_FRONTEND",
    "ZKV_BACKEND",
    "ZKV_ADVERTISE",
    "ZKV_INSECURE",
    "ZKV_FRONTEND_CURVE",
    "ZKV_KEYS",
)


@pytest.fixture(autouse=True)
def _no_cluster_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://lo:5555", True),  # the loopback interface, by name
        ("tcp://[::1]:5555", True),
        ("tcp://[::ffff:127.0.0.1]:5555", True),
        ("ws://127.0.0.1:8080/zkv", True),
        ("ipc:///tmp/zkv.sock", True),
        ("inproc://broker", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://10.77.0.11:5555", False),
        ("tcp://eth0:5555", False),  # another interface
        ("tcp://db.example:5555", False),  # a name: not known to be loopback, so not
        ("ws://0.0.0.0:8080/zkv", False),
        ("epgm://eth0;239.192.1.1:5555", False),
    ],
)
def test_which_endpoints_only_this_machine_reaches(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


def test_a_socket_other_hosts_reach_needs_curve_or_insecure() -> None:
    refuse = bind_refusal("frontend", "tcp://10.0.0.1:5555", "--frontend", False, False, "--x")
    assert refuse is not None
    assert "tcp://10.0.0.1:5555" in refuse and "--x" in refuse and "--insecure" in refuse
    assert bind_refusal("frontend", "tcp://10.0.0.1:5555", "--frontend", True, False, "--x") is None
    assert bind_refusal("frontend", "tcp://10.0.0.1:5555", "--frontend", False, True, "--x") is None
    assert bind_refusal("frontend", "tcp://127.0.0.1:1", "--frontend", False, False, "--x") is None


def test_the_advertised_endpoint_of_a_wildcard_bind_is_the_advertised_address() -> None:
    assert advertised("tcp://*:5556", "10.0.0.2") == "tcp://10.0.0.2:5556"
    assert advertised("tcp://0.0.0.0:5556", "10.0.0.2") == "tcp://10.0.0.2:5556"
    assert advertised("tcp://[::]:5556", "fd00::2") == "tcp://[fd00::2]:5556"
    assert advertised("tcp://10.0.0.9:5556", "10.0.0.2") == "tcp://10.0.0.9:5556"
    assert advertised("ipc:///run/zkv", "10.0.0.2") == "ipc:///run/zkv"


@pytest.mark.parametrize("bad", ["", "tcp://10.0.0.1", "10.0.0.1:5555", "*", "0.0.0.0", "a b"])
def test_an_advertised_address_is_a_host_alone(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        advertise_host(bad)


def test_an_advertised_address_may_be_a_name_or_ipv6() -> None:
    assert advertise_host("node-1.example") == "node-1.example"
    assert advertise_host("[fd00::1]") == "fd00::1"


def test_the_broker_binds_the_advertised_address_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = parse_args([])
    assert (args.frontend, args.backend) == ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556")
    monkeypatch.setenv("ZKV_ADVERTISE", "10.77.0.11")
    args = parse_args(["--frontend-curve"])
    assert (args.frontend, args.backend) == ("tcp://10.77.0.11:5555", "tcp://10.77.0.11:5556")
    assert bind_refusal_of(args) is None  # CURVE on both sides
    monkeypatch.setenv("ZKV_FRONTEND", "tcp://127.0.0.1:7000")
    args = parse_args(["--backend", "tcp://*:7001"])
    assert (args.frontend, args.backend) == ("tcp://127.0.0.1:7000", "tcp://*:7001")
    assert bind_refusal_of(args) is None  # the backend is CURVE: a wildcard is fine


def test_the_broker_refuses_a_plain_frontend_other_hosts_reach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, it created the keys and served the frontend in clear to whoever reached it."""
    keys = tmp_path / "keys"
    with caplog.at_level(logging.ERROR):
        assert main(["--advertise", "10.77.0.11", "--keys", str(keys)]) == 2
    line = caplog.text
    assert "cannot start: the frontend would bind tcp://10.77.0.11:5555" in line
    assert "--advertise/ZKV_ADVERTISE 10.77.0.11" in line
    assert "--frontend-curve" in line and "--insecure (ZKV_INSECURE=1)" in line
    assert not keys.exists()  # refused before doing anything
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["--frontend", "tcp://*:5555", "--keys", str(keys)]) == 2
    assert "tcp://*:5555 (--frontend/ZKV_FRONTEND)" in caplog.text


def test_insecure_lets_a_plain_socket_bind_other_addresses() -> None:
    args = parse_args(["--advertise", "10.77.0.11", "--insecure"])
    assert bind_refusal_of(args) is None


def test_a_broker_given_the_clients_list_of_frontends_binds_its_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.__main__ import parse_args

    monkeypatch.setenv("ZKV_FRONTEND", "tcp://10.0.0.1:5555,tcp://10.0.0.2:5555")
    assert parse_args(["--advertise", "10.0.0.2"]).frontend == "tcp://10.0.0.2:5555"
    with pytest.raises(SystemExit):
        parse_args(["--advertise", "10.0.0.3"])
    assert "lists 2 endpoints" in capsys.readouterr().err


def test_in_cluster_mode_a_request_waits_through_a_failover_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.__main__ import parse_args

    monkeypatch.delenv("ZKV_SHARD_WAIT", raising=False)
    monkeypatch.setenv("ZKV_COORDINATOR", "http://127.0.0.1:2379")
    assert parse_args(["--lease-ttl", "3"]).shard_wait == 5.0
    assert parse_args(["--lease-ttl", "3", "--shard-wait", "1"]).shard_wait == 1.0  # as told
    monkeypatch.delenv("ZKV_COORDINATOR")
    assert parse_args([]).shard_wait == 3.0  # one host: as before
