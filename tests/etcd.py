"""A real etcd for the tests: one member on free loopback ports with a temporary data directory.

etcd runs as Debian's ``etcd-server`` installs it (``/usr/bin/etcd``, 3.4); .ci/run installs it on
a fresh machine. A test that needs etcd where there is none FAILS with a message that says how to
install it, never skips: a suite that silently skipped the coordination tests would pass on a
machine where cluster mode was never tested.

The member is started with a 10 ms heartbeat and a 100 ms election timeout, so that it elects
itself within a fraction of a second and its minimum lease TTL is 1 s (etcd raises any TTL below
``ceil(1.5 * election timeout)``; with its defaults that is 2 s), which keeps the lease tests
short. etcd checks for expired leases every 500 ms, so a 1 s lease is gone within about 1.5 s of
its last renewal.

Readiness is polled on ``/health`` with a deadline; :meth:`EtcdServer.close` kills the whole
process group and reaps it, so no etcd outlives its test.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import free_port
from zkv.etcd import Etcd

READY_TIMEOUT_S = 15.0
START_ATTEMPTS = 3  # new ports each time: another process may take a free port before etcd binds
HEARTBEAT_MS = 10
ELECTION_MS = 100
MIN_LEASE_TTL_S = 1  # what etcd grants at least, with the election timeout above
DEBIAN_ETCD = "/usr/bin/etcd"  # where etcd-server installs it, should PATH not include it


def etcd_binary() -> str:
    """The etcd executable; fails the calling test, with how to install it, when missing."""
    path = shutil.which("etcd") or (DEBIAN_ETCD if os.path.exists(DEBIAN_ETCD) else None)
    if path is None:
        pytest.fail(
            "etcd is not installed, and the coordination tests need a real one: "
            "apt-get install etcd-server (.ci/run does this)",
            pytrace=False,
        )
    return path


class EtcdServer:
    """One etcd member. Use as a context manager; ``url`` is its client URL once started."""

    def __init__(self, tmp_path: Path, name: str = "etcd") -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = tmp_path / f"{name}.log"

    def start(self) -> EtcdServer:
        """Start the member and wait until it answers ``/health`` as healthy."""
        binary = etcd_binary()
        for attempt in range(START_ATTEMPTS):
            client_port, peer_port = free_port(), free_port()
            self.url = f"http://127.0.0.1:{client_port}"
            peer = f"http://127.0.0.1:{peer_port}"
            data_dir = self.tmp_path / f"{self.name}-data-{attempt}"
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [
                        binary,
                        "--name",
                        self.name,
                        "--data-dir",
                        str(data_dir),
                        "--listen-client-urls",
                        self.url,
                        "--advertise-client-urls",
                        self.url,
                        "--listen-peer-urls",
                        peer,
                        "--initial-advertise-peer-urls",
                        peer,
                        "--initial-cluster",
                        f"{self.name}={peer}",
                        "--heartbeat-interval",
                        str(HEARTBEAT_MS),
                        "--election-timeout",
                        str(ELECTION_MS),
                        "--logger",
                        "zap",
                        "--log-level",
                        "warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            if self._wait_healthy():
                return self
            self.close()  # it exited (a port was taken meanwhile): try new ports
        raise AssertionError(f"etcd did not start:\n{self.logs()}")

    def _wait_healthy(self) -> bool:
        """True once /health says healthy; False if the process exited; fails at the deadline."""
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self.healthy():
                return True
            time.sleep(0.02)
        raise AssertionError(f"etcd not healthy after {READY_TIMEOUT_S} s:\n{self.logs()}")

    def healthy(self) -> bool:
        """One /health probe (0.5 s at most)."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=0.5)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            return response.status == 200 and json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def client(self, timeout_s: float = 1.0) -> Etcd:
        return Etcd([self.url], timeout_s)

    def pause(self) -> None:
        """Stop the process (SIGSTOP): connections are accepted by the kernel, never answered."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Kill the member's process group and reap it (a paused one too)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd member shared by a test module (tests keep apart by key prefix)."""
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server
