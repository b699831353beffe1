"""Real processes for the process tests: a broker, workers and a gateway on free loopback ports.

Every process runs as ``python -u -m <service>`` in its own session with its stderr in a log file
under the test's temporary directory; readiness is polled with a deadline (never a fixed sleep);
``close()`` terminates, waits, then kills, so no process outlives the test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from zkv.client import Client

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 20.0

T = TypeVar("T")


_GIVEN_PORTS: set[int] = set()  # every port free_port handed out in this process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and never one this process
    was given before: a port handed out is usually bound only later (a broker's four endpoints
    are chosen before it starts), and the kernel may offer a released port again at once (CI:
    a second broker's frontend and events port were the same, and it refused to start)."""
    held: list[socket.socket] = []
    try:
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)  # kept bound while searching, so the kernel offers another one
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _GIVEN_PORTS:
                _GIVEN_PORTS.add(port)
                return port
    finally:
        for sock in held:
            sock.close()


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = READY_TIMEOUT_S) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after the deadline.

    Exceptions from ``check`` count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last_error!r})")


def spawn_logged(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (a signal to its group reaches nothing else) from the
    project's root, stdout and stderr into ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def logs_of(directory: Path, tail_chars: int = 4000) -> str:
    """The end of every ``*.log`` file in ``directory``, for a failing test's report."""
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-tail_chars:]}"
        for path in sorted(directory.glob("*.log"))
    )


def kill_group(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    """Signal a process started by :func:`spawn_logged` (its whole group) and reap it."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


class HttpResponse:
    """What a test needs of an HTTP response."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


class Cluster:
    """Processes of one zkv cluster. Use as a context manager."""

    def __init__(self, tmp_path: Path, shards: int = 2, **env: str) -> None:
        self.tmp_path = tmp_path
        self.shards = shards
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        # The broker's events proxy (broker/events.py) on ports of its own too: its default
        # ports are fixed, and the suite runs many brokers.
        self.events = f"tcp://127.0.0.1:{free_port()}"
        self.events_backend = f"tcp://127.0.0.1:{free_port()}"
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "ZKV_FRONTEND": self.frontend,
            "ZKV_BACKEND": self.backend,
            "ZKV_EVENTS": self.events,
            "ZKV_EVENTS_BACKEND": self.events_backend,
            "ZKV_SHARDS": str(shards),
            "ZKV_HEARTBEAT_INTERVAL": "0.2",
            "ZKV_DATA_DIR": str(tmp_path / "data"),  # each cluster its own shard files
            **env,
        }
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self._all: list[subprocess.Popen[bytes]] = []
        self._clients: list[Client] = []

    # --- processes --------------------------------------------------------------------------

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        process = spawn_logged(
            [sys.executable, "-u", "-m", *args],
            self.env,
            self.tmp_path / f"{name}-{len(self._all)}.log",
        )
        self._all.append(process)
        return process

    def start_broker(self, *args: str) -> subprocess.Popen[bytes]:
        self.broker = self.spawn("broker", "broker", *args)
        return self.broker

    def start_worker(self, *args: str) -> subprocess.Popen[bytes]:
        worker = self.spawn("worker", "workers", "--processes", "1", *args)
        self.workers.append(worker)
        return worker

    def start_gateway(self, *args: str) -> subprocess.Popen[bytes]:
        self.gateway = self.spawn(
            "gateway",
            "gateway",
            "--port",
            str(self.http_port),
            "--processes",
            "1",
            "--threads",
            "8",
            *args,
        )
        return self.gateway

    def start(self, workers: int | None = None, gateway: bool = True) -> Cluster:
        """Start everything and wait until every shard has an owner and the gateway answers."""
        self.start_broker()
        for _ in range(self.shards if workers is None else workers):
            self.start_worker()
        if gateway:
            self.start_gateway()
        self.wait_ready(gateway=gateway)
        return self

    def wait_ready(self, gateway: bool = True) -> None:
        client = self.client(timeout_s=1.0)
        wait_for(lambda: all(client.ping()["owned"]), "every shard to have a worker")
        if gateway:
            wait_for(lambda: self.http("GET", "/v1/health").status == 200, "the gateway")

    def kill(self, process: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        """Signal a process (its whole session) and reap it."""
        kill_group(process, sig)

    def logs(self) -> str:
        """Every process's output, for a failing test's report."""
        return logs_of(self.tmp_path)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for process in self._all:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for process in self._all:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=5)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- talking to it ----------------------------------------------------------------------

    def client(self, timeout_s: float = 5.0) -> Client:
        client = Client(self.frontend, timeout_s=timeout_s)
        self._clients.append(client)
        return client

    def http(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> HttpResponse:
        """One HTTP request to the gateway on a fresh connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout_s)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return HttpResponse(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()


@contextlib.contextmanager
def one_worker(
    prefix: str, durable: bool
) -> Iterator[tuple[Cluster, subprocess.Popen[bytes], Path]]:
    """A broker and one worker in a temporary directory, ready, for the benchmarks that watch
    one worker (bench/memory.py, bench/expiry_wave.py): the cluster, the worker's process and
    its log file. The worker keeps a data directory with ``ZKV_FSYNC=no`` when ``durable``,
    nothing on disk otherwise; heartbeats every second."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        with Cluster(workdir, shards=1, ZKV_FSYNC="no", ZKV_HEARTBEAT_INTERVAL="1") as cluster:
            cluster.start_broker()
            worker = cluster.start_worker(*([] if durable else ["--in-memory"]))
            cluster.wait_ready(gateway=False)
            yield cluster, worker, next(workdir.glob("worker-*.log"))
