"""Optional CURVE on the broker's frontend (--frontend-curve): only clients holding a key listed
in <keys>/clients/ are answered; a plain client, or one with any other key (a worker's key
included), gets no connection and fails Unavailable after its connect timeout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT, Cluster, wait_for
from zkv import Client, Unavailable
from zkv.keys import create_keys

pytestmark = pytest.mark.process

G = ("get", "k")  # the CLI command
CONNECT_TIMEOUT_S = 0.5  # how long a refused client keeps trying before Unavailable


def client_dir(target: Path, broker_key: Path, public: Path, secret: Path) -> Path:
    """A client's keys directory: the broker's public key and one client keypair."""
    target.mkdir(mode=0o700)
    shutil.copyfile(broker_key, target / "broker.key")
    shutil.copyfile(public, target / "client.key")
    shutil.copyfile(secret, target / "client.key_secret")
    return target


def test_with_frontend_curve_only_authorised_client_keys_are_answered(tmp_path: Path) -> None:
    with Cluster(tmp_path, shards=1) as cluster:
        cluster.start_broker("--frontend-curve")
        cluster.start_worker()
        keys = tmp_path / "data" / "keys"
        wait_for(lambda: (keys / "clients" / "client.key").is_file(), "the clients' keys")
        good = Client(cluster.frontend, timeout_s=2.0, keys=keys)
        try:
            wait_for(lambda: all(good.ping()["owned"]), "the shard owned, over CURVE")
            good.set("k", b"v", ttl_s=60)
            assert good.get("k").value == b"v"
        finally:
            good.close()

        other = tmp_path / "other"
        create_keys(other)  # a whole other cluster's keys: its client key is not authorised
        strangers = {
            "plain": None,
            "unauthorised key": client_dir(
                tmp_path / "stranger",
                keys / "broker.key",
                other / "client.key",
                other / "client.key_secret",
            ),
            "worker key": client_dir(  # authorised on the backend, not on the frontend
                tmp_path / "workerkey",
                keys / "broker.key",
                keys / "worker.key",
                keys / "worker.key_secret",
            ),
        }
        for name, directory in strangers.items():
            client = Client(
                cluster.frontend,
                timeout_s=2.0,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                keys=directory,
            )
            try:
                with pytest.raises(Unavailable, match="not reachable"):
                    client.get("k")
                with pytest.raises(Unavailable):
                    client.set("k", b"forged", ttl_s=60)
            finally:
                client.close()
            assert name  # (named for the failure report)

        cli = subprocess.run(
            [sys.executable, "-m", "zkv", "--frontend", cluster.frontend, "--keys", str(keys), *G],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert (cli.returncode, cli.stdout) == (0, b"v\n"), cli.stderr

        cluster.start_gateway("--frontend-curve", "--keys", str(keys))
        wait_for(lambda: cluster.http("GET", "/v1/health").status == 200, "the gateway")
        assert cluster.http("GET", "/get?key=k").json()["value"] == "v"
        assert cluster.http("GET", "/all").json()["k"]["value"] == "v"
