"""The cluster-mode flags (zkv.config.add_cluster_flags): flag > environment > default, and a bad
value stops the service with a message naming the flag or the variable."""

from __future__ import annotations

import argparse
import socket

import pytest

from zkv import defaults
from zkv.config import add_cluster_flags

pytestmark = pytest.mark.unit

VARIABLES = (
    "ZKV_COORDINATOR",
    "ZKV_CLUSTER_NAME",
    "ZKV_REPLICAS",
    "ZKV_HOST_ID",
    "ZKV_LEASE_TTL",
    "ZKV_REPLICA_LAG",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    return parser.parse_args(list(argv))


def test_the_defaults_are_single_host_mode() -> None:
    args = parse()
    assert args.coordinator == []  # no coordinator: one host, as before
    assert args.cluster_name == defaults.CLUSTER_NAME == "zkv"
    assert args.replicas == defaults.REPLICAS == 1
    assert args.host_id == socket.gethostname()
    assert args.lease_ttl == defaults.LEASE_TTL_S == 3
    assert args.replica_lag == defaults.REPLICA_LAG_S == 1.0


def test_the_environment_sets_them_and_a_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZKV_COORDINATOR", "http://10.0.0.1:2379, http://10.0.0.2:2379")
    monkeypatch.setenv("ZKV_CLUSTER_NAME", "prod")
    monkeypatch.setenv("ZKV_REPLICAS", "2")
    monkeypatch.setenv("ZKV_HOST_ID", "rack1-host3")
    monkeypatch.setenv("ZKV_LEASE_TTL", "5")
    monkeypatch.setenv("ZKV_REPLICA_LAG", "0.5")
    args = parse()
    assert args.coordinator == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert (args.cluster_name, args.replicas, args.host_id) == ("prod", 2, "rack1-host3")
    assert (args.lease_ttl, args.replica_lag) == (5, 0.5)
    assert parse("--replicas", "0", "--coordinator", "https://e:2379").replicas == 0
    assert parse("--coordinator", "https://e:2379").coordinator == ["https://e:2379"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--coordinator", "10.0.0.1:2379"], "argument --coordinator: '10.0.0.1:2379' is not"),
        (["--coordinator", "http://e"], "argument --coordinator: 'http://e' needs a port"),
        (
            ["--cluster-name", "a/b"],
            "argument --cluster-name: must be a cluster name of letters, digits and _.:@-",
        ),
        (["--replicas", "-1"], "argument --replicas: must be a whole number from 0 to 8"),
        (["--replicas", "9"], "argument --replicas: must be a whole number from 0 to 8"),
        (
            ["--replicas", "two"],
            "argument --replicas: must be a whole number from 0 to 8, got 'two'",
        ),
        (["--host-id", "my host"], "argument --host-id: must be a host id of letters"),
        (["--lease-ttl", "0"], "argument --lease-ttl: must be a whole number from 1 to 300"),
        (
            ["--lease-ttl", "1.5"],
            "argument --lease-ttl: must be a whole number from 1 to 300, got '1.5'",
        ),
        (["--replica-lag", "0"], "argument --replica-lag: must be a positive number"),
        (["--replica-lag", "61"], "argument --replica-lag: must be 0.001 to 60.0 s"),
    ],
)
def test_a_bad_flag_is_refused_naming_it(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ZKV_COORDINATOR", "etcd:2379"),
        ("ZKV_REPLICAS", "100"),
        ("ZKV_HOST_ID", "-x"),
        ("ZKV_LEASE_TTL", "0"),
        ("ZKV_REPLICA_LAG", "nan"),
    ],
)
def test_a_bad_variable_is_refused_naming_it(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        parse()
    assert exited.value.code == 2
    assert f"environment variable {name}=" in capsys.readouterr().err
