"""What a worker says when it cannot be the cluster's (issue 10, items 9 and 13): the handshake
explanations (workers/handshake.py), the wait for the broker's keys (zkv/keys.py) and the
in-memory worker's refusal of a durable data directory (workers/manifest.py). No sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from workers.handshake import (
    PROTOCOL_ERROR_CRYPTOGRAPHIC,
    PROTOCOL_ERROR_MECHANISM_MISMATCH,
    explain,
)
from workers.manifest import durable_data, open_manifest
from zkv.keys import KeysError, create_keys, wait_for_keys

BACKEND = "tcp://127.0.0.1:5556"
KEYS = Path("/srv/other/keys")


def test_a_success_needs_no_explanation() -> None:
    assert explain(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0, BACKEND, KEYS) is None


@pytest.mark.parametrize(
    ("event", "value", "says"),
    [
        (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, "refused this worker's CURVE key"),
        (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32, "its broker.key is not the broker's key"),
        (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, PROTOCOL_ERROR_CRYPTOGRAPHIC, "not the cluster's"),
    ],
)
def test_a_refused_key_names_the_keys_directory_and_what_to_do(
    event: int, value: int, says: str
) -> None:
    line = explain(event, value, BACKEND, KEYS)
    assert line is not None
    assert says in line and str(KEYS) in line and BACKEND in line
    assert "--keys/ZKV_KEYS" in line and "python -m zkv keygen" in line and "cp -rp" in line


def test_curve_on_one_side_only_says_so() -> None:
    mismatch = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, PROTOCOL_ERROR_MECHANISM_MISMATCH
    line = explain(*mismatch, BACKEND, KEYS)
    assert line is not None and "runs without CURVE (--insecure)" in line
    line = explain(*mismatch, BACKEND, None)
    assert line is not None and "requires CURVE and this worker runs --insecure" in line


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def test_a_worker_waits_for_the_brokers_keys_and_never_makes_its_own(tmp_path: Path) -> None:
    clock = FakeClock()
    directory = tmp_path / "data" / "keys"
    with pytest.raises(KeysError, match="Workers do not create keys") as caught:
        wait_for_keys(directory, 10.0, clock, clock.sleep)
    assert clock.now_s == pytest.approx(10.0, abs=0.1)
    assert str(directory) in str(caught.value) and "ZKV_DATA_DIR" in str(caught.value)
    assert not directory.exists()  # before: a worker made a key set the broker did not know


def test_a_worker_takes_the_keys_the_broker_made_meanwhile(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    clock = FakeClock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now_s > 1.0 and not directory.exists():
            create_keys(directory)  # the broker, starting beside it

    keys = wait_for_keys(directory, 10.0, clock, sleep)
    assert keys.worker().secret is not None and clock.now_s < 1.2


def test_a_worker_host_needs_only_the_three_files_the_readme_lists(tmp_path: Path) -> None:
    """An operator copies broker.key, worker.key and worker.key_secret to a worker host (README,
    Keys); before, the worker also waited for the broker's secret and authorized/, never came."""
    create_keys(tmp_path / "broker")
    directory = tmp_path / "worker-host"
    directory.mkdir(mode=0o700)
    for name in ("broker.key", "worker.key", "worker.key_secret"):
        (directory / name).write_bytes((tmp_path / "broker" / name).read_bytes())
    clock = FakeClock()
    keys = wait_for_keys(directory, 10.0, clock, clock.sleep)
    assert clock.now_s == 0.0
    assert keys.worker().secret is not None and keys.broker().secret is None


def test_a_durable_data_directory_is_refused_to_a_worker_in_memory(tmp_path: Path) -> None:
    assert durable_data(tmp_path / "missing") is None
    assert durable_data(tmp_path) is None
    (tmp_path / "keys").mkdir()  # an in-memory cluster writes its keys there: fine
    assert durable_data(tmp_path) is None
    open_manifest(tmp_path)
    refusal = durable_data(tmp_path)
    assert refusal is not None
    assert f"data directory {tmp_path} holds a durable cluster's data" in refusal
    assert "use another --data-dir" in refusal and "drop --in-memory" in refusal


def test_shard_directories_of_an_earlier_version_count_as_durable_data(tmp_path: Path) -> None:
    (tmp_path / "shard-1").mkdir()
    refusal = durable_data(tmp_path)
    assert refusal is not None and "shard-1" in refusal
