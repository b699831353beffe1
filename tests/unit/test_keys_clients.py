"""Client keys for the optional frontend CURVE (zkv/keys.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zkv.keys import Keys, KeysError, client_curve, create_keys, ensure_client_keys, frontend_curve


def test_a_new_key_set_has_a_client_keypair_authorised_on_the_frontend(tmp_path: Path) -> None:
    create_keys(tmp_path / "keys")
    keys = Keys(tmp_path / "keys")
    curve = client_curve(keys.directory)
    assert curve.server_key == keys.broker().public
    public = (keys.directory / "client.key").read_bytes()
    assert (keys.clients / "client.key").read_bytes() == public
    assert not (keys.authorized / "client.key").exists()  # a client key is no worker key
    assert (keys.clients.stat().st_mode & 0o777) == 0o700


def test_an_older_key_set_gets_client_keys_at_the_broker_start(tmp_path: Path) -> None:
    create_keys(tmp_path / "keys")
    keys = Keys(tmp_path / "keys")
    shutil.rmtree(keys.clients)
    for name in ("client.key", "client.key_secret"):
        (keys.directory / name).unlink()
    with pytest.raises(KeysError):
        client_curve(keys.directory)
    ensure_client_keys(keys)
    assert client_curve(keys.directory).public == keys.client().public
    assert list(keys.clients.iterdir()) == [keys.clients / "client.key"]


def test_clients_are_plain_unless_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    create_keys(tmp_path / "keys")
    monkeypatch.setenv("ZKV_KEYS", str(tmp_path / "keys"))
    monkeypatch.delenv("ZKV_FRONTEND_CURVE", raising=False)
    assert frontend_curve() is None  # keys present, but the frontend is plain by default
    monkeypatch.setenv("ZKV_FRONTEND_CURVE", "1")
    assert frontend_curve() == client_curve(tmp_path / "keys")
