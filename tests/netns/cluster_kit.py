"""A cluster-mode zkv on test hosts (tests/hosts.py), as an operator would lay it out: etcd on
one host listening on that host's address, brokers on others (all sharing the broker keypair,
copied from the first), one worker per worker host, an optional gateway; CURVE on every socket
another host reaches (key files copied per host: the whole key directory to each broker host,
:data:`zkv.keys.WORKER_FILES` to a worker-only host, :data:`zkv.keys.CLIENT_FILES` to the
gateway's host and to the scenario, which is a client machine on the hosts' switch:
``Hosts(..., operator=True)``).

Shared by the cluster scenarios (tests/netns/cluster_*.py), ``python -m tests.chaos --cluster``
and ``python -m bench.cluster``. Short leases (1 s: etcd runs with a 100 ms election timeout so
that it grants them) and 0.2 s heartbeats, so that a failover takes about two seconds.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.cluster import wait_for
from tests.etcd import ELECTION_MS, HEARTBEAT_MS, etcd_binary
from tests.hosts import Host, Hosts, copy_files
from workers.aof import DelRecord, LogReader, SetRecord
from zkv.client import Client
from zkv.coordination import Coordinator, Isr, Leader
from zkv.etcd import Etcd, EtcdError
from zkv.keys import CLIENT_FILES, WORKER_FILES, complete, create_keys

ETCD_PORT = 2379
ETCD_PEER_PORT = 2380  # on the etcd host's loopback: a one-member cluster has no peers
FRONTEND_PORT = 5555
BACKEND_PORT = 5556
HTTP_PORT = 5000
LEASE_TTL_S = 1  # the workers' and brokers' etcd leases (etcd's minimum with ELECTION_MS)
HEARTBEAT_S = 0.2  # broker <-> worker heartbeats: a silent peer is dead after 0.6 s
REQUEST_TIMEOUT_S = 5.0  # clients' and the gateway's deadline (a failover takes ~2 s)
READY_TIMEOUT_S = 30.0  # from the first process started to every shard led and followed
ETCD_READY_TIMEOUT_S = 15.0
ETCD_CALL_TIMEOUT_S = 1.0


class ClusterOnHosts:
    """Processes of one cluster-mode zkv on test hosts; what each host runs, to restart it.

    Args:
        hosts: the hosts (built with ``operator=True``: the scenario talks to them directly).
        etcd: the host of etcd (alone there unless a test wants otherwise).
        brokers: the hosts of the brokers, one each, in frontend order.
        workers: the hosts of the workers, one worker each.
        gateway: the host of an HTTP gateway (given every broker's frontend), or None.
        shards: ZKV_SHARDS.
        replicas: ZKV_REPLICAS.
        env: more environment for every zkv process (ZKV_FSYNC, say).
    """

    def __init__(
        self,
        hosts: Hosts,
        etcd: Host,
        brokers: Sequence[Host],
        workers: Sequence[Host],
        gateway: Host | None = None,
        shards: int = 2,
        replicas: int = 1,
        env: dict[str, str] | None = None,
        name: str = "zkv",
    ) -> None:
        self.hosts = hosts
        self.etcd_host = etcd
        self.broker_hosts = list(brokers)
        self.worker_hosts = list(workers)
        self.gateway_host = gateway
        self.shards = shards
        self.name = name
        self.etcd_url = f"http://{etcd.address}:{ETCD_PORT}"
        self.frontends = [f"tcp://{h.address}:{FRONTEND_PORT}" for h in self.broker_hosts]
        self.client_keys = hosts.workdir / "client-keys"
        self.env = {
            "ZKV_COORDINATOR": self.etcd_url,
            "ZKV_CLUSTER_NAME": name,
            "ZKV_SHARDS": str(shards),
            "ZKV_REPLICAS": str(replicas),
            "ZKV_LEASE_TTL": str(LEASE_TTL_S),
            "ZKV_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
            "ZKV_FRONTEND_CURVE": "1",
            "ZKV_TIMEOUT": str(REQUEST_TIMEOUT_S),
            "ZKV_FSYNC": "always",
            **(env or {}),
        }
        self.brokers: dict[str, subprocess.Popen[bytes]] = {}  # host name -> process
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.killed_ms: dict[str, float] = {}  # log file name -> when its process was killed
        self._clients: list[Client] = []
        self._etcd: Etcd | None = None

    # --- starting ---------------------------------------------------------------------------

    def start(self) -> ClusterOnHosts:
        """etcd, the keys made once, the first broker, the keys copied, the rest; then wait
        until every broker routes every shard and every shard has its followers."""
        self.start_etcd()
        first = self.broker_hosts[0]
        keys = first.disk / "keys"
        if not complete(keys):  # made once, as docs/cluster.md says (`zkv keygen DIR`)
            create_keys(keys)
        self.start_broker(first)
        wait_for(lambda: complete(keys) and (keys / "client.key_secret").exists(), "keys")
        for host in self.broker_hosts[1:]:
            if not (host.disk / "keys").exists():
                shutil.copytree(keys, host.disk / "keys")
        for host in self.worker_hosts:
            if not (host.disk / "keys").exists():
                copy_files(keys, host.disk / "keys", WORKER_FILES)
        copy_files(keys, self.client_keys, CLIENT_FILES)
        if self.gateway_host is not None and not (self.gateway_host.disk / "keys").exists():
            copy_files(keys, self.gateway_host.disk / "keys", CLIENT_FILES)
        for host in self.broker_hosts[1:]:
            self.start_broker(host)
        for host in self.worker_hosts:
            self.start_worker(host)
        if self.gateway_host is not None:
            self.start_gateway(self.gateway_host)
        self.wait_ready()
        return self

    def start_etcd(self) -> None:
        host = self.etcd_host
        peer = f"http://127.0.0.1:{ETCD_PEER_PORT}"
        host.spawn(
            [
                etcd_binary(),
                "--name",
                "etcd",
                "--data-dir",
                str(host.disk / "etcd"),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"etcd={peer}",
                "--heartbeat-interval",
                str(HEARTBEAT_MS),
                "--election-timeout",
                str(ELECTION_MS),
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ],
            log_name="etcd",
        )
        wait_for(self._etcd_healthy, "etcd on " + self.etcd_url, ETCD_READY_TIMEOUT_S)

    def _etcd_healthy(self) -> bool:
        connection = http.client.HTTPConnection(self.etcd_host.address, ETCD_PORT, timeout=0.5)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            return response.status == 200 and json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def start_broker(self, host: Host) -> subprocess.Popen[bytes]:
        process = host.python(
            "broker",
            "--frontend",
            f"tcp://{host.address}:{FRONTEND_PORT}",
            "--backend",
            f"tcp://{host.address}:{BACKEND_PORT}",
            env=self.env,
        )
        self.brokers[host.name] = process
        return process

    def start_worker(self, host: Host) -> subprocess.Popen[bytes]:
        process = host.python("workers", env=self.env)
        self.workers[host.name] = process
        return process

    def start_gateway(self, host: Host) -> subprocess.Popen[bytes]:
        self.gateway = host.python(
            "gateway",
            "--host",
            host.address,
            "--port",
            str(HTTP_PORT),
            "--processes",
            "1",
            env={**self.env, "ZKV_FRONTEND": ",".join(self.frontends)},  # either broker
        )
        return self.gateway

    def restart(self, host: Host) -> None:
        """Start again what ``host`` ran (after :meth:`kill_host`), on the disk it kept."""
        if host in self.broker_hosts:
            self.start_broker(host)
        if host in self.worker_hosts:
            self.start_worker(host)
        if host is self.gateway_host:
            self.start_gateway(host)

    # --- waiting ----------------------------------------------------------------------------

    def wait_ready(
        self, timeout_s: float = READY_TIMEOUT_S, frontends: Sequence[str] | None = None
    ) -> None:
        """Every shard routed by every broker of ``frontends`` (default all) and its in-sync
        set full (leader + ZKV_REPLICAS followers, as far as the live workers allow)."""
        replicas = int(self.env["ZKV_REPLICAS"])
        for frontend in frontends or self.frontends:
            probe = self.client(frontend, timeout_s=1.0)
            wait_for(
                lambda p=probe: all(p.ping()["owned"]), "every shard led via " + frontend, timeout_s
            )
        wanted = min(replicas + 1, len(self.worker_hosts) // self.shards)
        wait_for(
            lambda: all(len(self.isr(n).members) >= wanted for n in range(self.shards)),
            f"every shard's in-sync set of {wanted}",
            timeout_s,
        )

    # --- looking -----------------------------------------------------------------------------

    def client(self, frontend: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> Client:
        """A zkv client of the scenario (CURVE with the client keys); closed with the cluster."""
        client = Client(
            frontend or self.frontends[0], timeout_s=timeout_s, keys=str(self.client_keys)
        )
        self._clients.append(client)
        return client

    def coordinator(self) -> Coordinator:
        if self._etcd is None:
            self._etcd = Etcd([self.etcd_url], ETCD_CALL_TIMEOUT_S)
        return Coordinator(self._etcd, self.name)

    def leaders(self) -> dict[int, Leader]:
        return self.coordinator().leaders()

    def isr(self, shard: int) -> Isr:
        found = self.coordinator().read_isr(shard)
        return found if found is not None else Isr((), 0, 0)

    def host_of(self, worker_id: str) -> Host:
        """The host of a worker id (``<host>-<member>``)."""
        name = worker_id.rsplit("-", 1)[0]
        return next(h for h in self.hosts if h.name == name)

    def leader_host(self, shard: int) -> Host:
        return self.host_of(self.leaders()[shard].worker)

    def frontend_off(self, *hosts: Host) -> str:
        """A broker frontend on none of ``hosts``."""
        return next(
            f for f, h in zip(self.frontends, self.broker_hosts, strict=True) if h not in hosts
        )

    # --- failures ---------------------------------------------------------------------------

    def kill_host(self, host: Host, wipe: bool = False) -> float:
        """SIGKILL everything on ``host``; the wall-clock ms of the kill (for ownership)."""
        killed_ms = time.time() * 1000
        for process in host.processes:
            log = host.log_paths.get(process.pid)
            if log is not None and process.poll() is None:
                self.killed_ms[log.name] = killed_ms
        host.kill(wipe=wipe)
        return killed_ms

    def kill_process(self, host: Host, process: subprocess.Popen[bytes]) -> float:
        killed_ms = time.time() * 1000
        log = host.log_paths.get(process.pid)
        if log is not None:
            self.killed_ms[log.name] = killed_ms
        host.stop(process, signal.SIGKILL)
        return killed_ms

    def worker_logs(self) -> dict[str, str]:
        """Every worker's log by file name (the dead incarnations' too)."""
        return {
            path.name: path.read_text(errors="replace")
            for path in sorted((self.hosts.workdir / "logs").glob("h*-workers-*.log"))
        }

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


def replay(log: Path, now_ms: float | None = None) -> dict[bytes, bytes]:
    """A shard's log file replayed as the worker would: the live keys and their values."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    state: dict[bytes, tuple[bytes, int | None]] = {}
    with LogReader(log) as reader:
        for _, record in reader.records():
            if isinstance(record, SetRecord):
                state[bytes(record.key)] = (bytes(record.value), record.deadline_ms)
            elif isinstance(record, DelRecord):
                state.pop(bytes(record.key), None)
    return {k: v for k, (v, d) in state.items() if d is None or d > now_ms}


def poll(check: Callable[[], Any], what: str, timeout_s: float) -> Any:
    """:func:`tests.cluster.wait_for`, swallowing etcd's hiccups as not-yet."""

    def attempt() -> Any:
        try:
            return check()
        except EtcdError:
            return None

    return wait_for(attempt, what, timeout_s)
