"""Starting and stopping what the scenarios load: zkv clusters, the bare chain, Redis, webdis.

:func:`open_target` is a context manager per target name (see ``bench/scenarios.py``): it starts
the processes on free loopback ports, waits until they answer (polling with a deadline, never a
fixed sleep), fills the key space the scenarios read, yields a :class:`Target` saying where to
send load, and stops everything on the way out: terminate, wait, kill. zkv clusters are
``tests/cluster.py``'s :class:`Cluster`, the one the process tests use.

Key spaces: ``bench:0`` .. ``bench:<keys-1>`` and ``bench:hot`` hold 16-byte values,
``big:0`` .. ``big:255`` and ``big:hot`` 64 KiB ones, all with a one-hour timeout. Against a
running cluster (``--frontend``), the benchmark writes these keys there too.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import expiry_wave, interleaved, issue12, paired, peers
from bench.scenarios import (
    CLIENT_PROCESSES,
    INTERLEAVED_CHAINS,
    LARGE_BYTES,
    REDIS_FLOOR_CLIENTS,
    SMALL_BYTES,
    Scenario,
    paired_id,
)
from bench.stats import LoadResult
from bench.zmq_load import preload
from tests.cluster import Cluster, free_port
from zkv import defaults
from zkv.client import Client

ROOT = Path(__file__).resolve().parent.parent
LARGE_KEYS = 256  # size of the big:N key space (64 KiB values)
READY_TIMEOUT_S = 20.0
INTERLEAVED_SHARE = 0.25  # of --duration per interleaved row (the default run's budget)
INTERLEAVED_KEYS = 1_000  # one request at a time reads few keys: a small space fills fast
# Of --duration per turn of the paired target: 3 rounds x 2 operations x 2 systems, 12 turns of
# 0.5 s by default; each of zkv's turns also starts its 2 load processes anew (~0.25 s) and
# overruns by up to one execute() call, and the cluster takes ~3 s to start and fill: about
# 10-11 s in all (8 s with --duration 1), what the default run's two minutes have room for.
PAIRED_SHARE = 0.25
READ_OPS = frozenset({"get", "mix", "rest-get", "webdis-get"})


@dataclass(slots=True)
class Target:
    """Where to send load, and what to record about the system under test.

    Attributes:
        frontend: the ZeroMQ endpoint of a zkv-protocol broker (zkv or the bare chain).
        http: ``(host, port)`` of an HTTP server (the gateway or webdis).
        redis_port: the port of a redis-server.
        settings: what the JSON records about this target (shards, fsync policy, ...).
        expiry: the expiry-wave target: bench/expiry_wave.py's result, run when it opened.
        measured: the interleaved and paired targets: each scenario's result by id, measured
            when it opened (every chain's or system's turns run together, so no row can run
            alone).
    """

    frontend: str | None = None
    http: tuple[str, int] | None = None
    redis_port: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    expiry: dict[str, Any] | None = None
    measured: dict[str, LoadResult] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line says about targets.

    Attributes:
        keys: size of the uniform key space.
        frontend: a running zkv broker to load instead of starting a cluster.
        http: ``(host, port)`` of a running gateway to load instead of starting one.
        workdir: where children keep their logs and data for this run.
        full_keys: keys written by the memory and expiry-wave scenarios.
        duration_s: seconds per scenario (the interleaved target runs its rows together).
    """

    keys: int
    frontend: str | None
    http: tuple[str, int] | None
    workdir: Path
    full_keys: int = 1_000_000
    duration_s: float = 2.0

    @property
    def external(self) -> bool:
        return self.frontend is not None or self.http is not None


def small_keys(count: int) -> list[bytes]:
    """The 16-byte key space, with the hot key last."""
    return [b"bench:%d" % i for i in range(count)] + [b"bench:hot"]


def large_keys() -> list[bytes]:
    """The 64 KiB key space, with the hot key last."""
    return [b"big:%d" % i for i in range(LARGE_KEYS)] + [b"big:hot"]


def unavailable(target: str, options: Options) -> str | None:
    """Why ``target`` cannot run here ("skipped: ..."), or None if it can."""
    if (target.startswith("zkv-") or target in ("interleaved", "paired", "issue12")) and (
        options.external
    ):
        return "skipped: needs a cluster of its own (not started with --frontend/--http)"
    if target in ("redis", "paired"):
        return peers.missing("redis-server", "redis-benchmark")
    if target == "webdis":
        return peers.missing("redis-server", "webdis")
    return None


def fsync_honoured() -> bool:
    """Whether this tree's workers know ZKV_FSYNC (their --help names it)."""
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "workers", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "ZKV_FSYNC" in completed.stdout


@contextlib.contextmanager
def open_target(target: str, rows: Sequence[Scenario], options: Options) -> Iterator[Target]:
    """Start ``target`` for ``rows`` (the scenarios about to run on it) and stop it after."""
    needs_http = any(row.load == "http" for row in rows)
    # Only reads need their keys written first; the pure-write targets skip the fill.
    reads = [row for row in rows if row.op in READ_OPS]
    needs_small = any(row.value_bytes == SMALL_BYTES for row in reads)
    needs_large = any(row.value_bytes == LARGE_BYTES for row in reads)
    workdir = options.workdir / target
    workdir.mkdir(parents=True, exist_ok=True)
    if target == "zkv" and options.external:
        found = Target(options.frontend, options.http, settings={"external": True})
        if options.frontend is not None:
            _fill(options.frontend, options.keys, needs_small, needs_large)
        yield found
    elif target.startswith("zkv"):
        shards = {"zkv-shards1": 1, "zkv-shards4": 4}.get(target, defaults.SHARDS)
        fsync = "no" if target == "zkv-fsync-no" else "always"
        ipc = target == "zkv-ipc"
        with _zkv_cluster(workdir, shards, fsync, needs_http, ipc) as cluster:
            _fill(cluster.frontend, options.keys, needs_small, needs_large)
            settings = {"shards": shards, "workers": shards, "ZKV_FSYNC": fsync}
            if ipc:
                settings["transport"] = "ipc"
            if needs_http:
                settings["gateway"] = {
                    "processes": defaults.HTTP_PROCESSES,
                    "threads": defaults.HTTP_THREADS,
                }
            http = ("127.0.0.1", cluster.http_port) if needs_http else None
            yield Target(cluster.frontend, http, settings=settings)
    elif target in ("bare-tcp", "bare-ipc"):
        with _bare_chain(workdir, target.removeprefix("bare-")) as frontend:
            _fill(frontend, options.keys, needs_small, large=False)
            yield Target(frontend, settings={"transport": target.removeprefix("bare-")})
    elif target == "redis":
        server = peers.RedisServer(free_port(), workdir)
        try:
            yield Target(redis_port=server.port, settings={"persistence": "none"})
        finally:
            server.stop()
    elif target == "webdis":
        webdis = peers.Webdis(free_port(), free_port(), workdir)
        try:
            keys = small_keys(options.keys)
            peers.redis_set_many(webdis.redis.port, keys, b"v" * SMALL_BYTES)
            yield Target(http=("127.0.0.1", webdis.port), redis_port=webdis.redis.port)
        finally:
            webdis.stop()
    elif target == "interleaved":
        with contextlib.ExitStack() as stack:
            endpoints = _start_together(stack, workdir, min(options.keys, INTERLEAVED_KEYS))
            # All rows at once, a quarter of --duration per row: the turns cancel the drift
            # that longer runs would average out, and a row still gets hundreds of samples.
            found = interleaved.run_interleaved(
                endpoints,
                small_keys(min(options.keys, INTERLEAVED_KEYS)),
                b"v" * SMALL_BYTES,
                options.duration_s * len(rows) * INTERLEAVED_SHARE,
            )
            measured = {f"interleaved.{chain}.{op}.16B.c1": r for (chain, op), r in found.items()}
            fsync = {c.name: c.fsync for c in INTERLEAVED_CHAINS if c.fsync is not None}
            settings = {"chains": endpoints, "shards": defaults.SHARDS, "ZKV_FSYNC": fsync}
            yield Target(settings=settings, measured=measured)
    elif target == "paired":
        (workdir / "zkv").mkdir(exist_ok=True)
        (workdir / "redis").mkdir(exist_ok=True)
        keys = small_keys(options.keys)[:-1]  # the uniform keys, as client.pipeline.*.uniform
        value = b"v" * SMALL_BYTES
        turn_s = options.duration_s * PAIRED_SHARE
        ops = tuple(op for op in paired.OPS if any(row.op == op for row in rows))
        with _zkv_cluster(workdir / "zkv", defaults.SHARDS, "always", False) as cluster:
            _fill(cluster.frontend, options.keys, small=True, large=False)
            redis = peers.RedisServer(free_port(), workdir / "redis")
            try:
                found = paired.run_paired(
                    cluster.frontend,
                    redis.port,
                    keys,
                    value,
                    turn_s,
                    CLIENT_PROCESSES,
                    REDIS_FLOOR_CLIENTS,
                    ops=ops,
                    say=lambda line: _say(line, "paired"),
                )
            finally:
                redis.stop()
        measured = {paired_id(system, op): row for (system, op), row in found.items()}
        settings = {
            "shards": defaults.SHARDS,
            "workers": defaults.SHARDS,
            "ZKV_FSYNC": "always",
            "redis": {"persistence": "none"},
            "rounds": paired.ROUNDS,
            "turn_s": turn_s,
            "turns": [f"{t.op} {t.system}" for t in paired.schedule(paired.ROUNDS, ops)],
        }
        yield Target(settings=settings, measured=measured)
    elif target == "issue12":  # every row measured together (bench/issue12.py)
        (workdir / "redis").mkdir(exist_ok=True)
        with _zkv_cluster(workdir, defaults.SHARDS, "always", False) as cluster:
            _fill(cluster.frontend, options.keys, small=True, large=False)
            redis = None if peers.missing("redis-server", "redis-benchmark") else True
            server = peers.RedisServer(free_port(), workdir / "redis") if redis else None
            try:
                found = issue12.run(
                    cluster.frontend,
                    None if server is None else server.port,
                    small_keys(options.keys)[:-1],
                    b"v" * SMALL_BYTES,
                    options.duration_s,
                    say=lambda line: _say(line, "issue12"),
                    wanted={row.id for row in rows},
                )
            finally:
                if server is not None:
                    server.stop()
        settings = {"shards": defaults.SHARDS, "workers": defaults.SHARDS, "ZKV_FSYNC": "always"}
        yield Target(settings=settings, measured=found)
    elif target == "memory":  # each scenario starts what it measures
        yield Target(settings={"keys": options.full_keys})
    elif target == "expiry-wave":
        found = expiry_wave.run(options.full_keys, say=_say)
        yield Target(settings={"keys": options.full_keys, "in_memory": True}, expiry=found)
    else:
        raise ValueError(f"unknown target {target!r}")


def _say(line: str, target: str = "expiry-wave") -> None:
    print(f"  {target}: {line}", file=sys.stderr, flush=True)


def _fill(frontend: str, keys: int, small: bool, large: bool) -> None:
    """Write every key the scenarios read, so that no GET misses."""
    failures = 0
    if small:
        failures += preload(frontend, small_keys(keys), b"v" * SMALL_BYTES)
    if large:
        failures += preload(frontend, large_keys(), b"v" * LARGE_BYTES, depth=16)
    if failures:
        raise RuntimeError(f"{failures} SETs failed while filling the key space at {frontend}")


def _start_together(stack: contextlib.ExitStack, workdir: Path, keys: int) -> dict[str, str]:
    """Start and fill every chain of the interleaved target at once (threads: each mostly
    waits for its processes), each stopped when ``stack`` closes; returns their endpoints."""
    managers: dict[str, contextlib.AbstractContextManager[Any]] = {}
    for chain in INTERLEAVED_CHAINS:
        place = workdir / chain.name
        place.mkdir()
        if chain.system == "zkv":
            assert chain.fsync is not None, "a zkv chain has a fsync policy"
            managers[chain.name] = _zkv_cluster(
                place, defaults.SHARDS, chain.fsync, False, ipc=chain.transport == "ipc"
            )
        else:
            managers[chain.name] = _bare_chain(place, chain.transport, chain.fsync == "always")

    def start(chain: str) -> str:
        entered = managers[chain].__enter__()
        endpoint = entered.frontend if isinstance(entered, Cluster) else entered
        _fill(endpoint, keys, small=True, large=False)
        return endpoint

    endpoints, failures = {}, []
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = {chain: pool.submit(start, chain) for chain in managers}
    for chain, future in futures.items():
        try:
            endpoints[chain] = future.result()
        except Exception as exc:
            failures.append(f"{chain}: {exc}")
        # A chain whose start failed after its processes began is stopped by its __exit__ too.
        stack.push(managers[chain].__exit__)
    if failures:
        raise RuntimeError("; ".join(failures))
    return endpoints


@contextlib.contextmanager
def _zkv_cluster(
    workdir: Path, shards: int, fsync: str, gateway: bool, ipc: bool = False
) -> Iterator[Cluster]:
    """A broker, one worker per shard and, if asked, a gateway with its production defaults;
    with ``ipc`` the broker's frontend and backend are ipc:// endpoints in ``workdir``."""
    endpoints = {}
    if ipc:
        endpoints = {
            "ZKV_FRONTEND": f"ipc://{workdir}/frontend.ipc",
            "ZKV_BACKEND": f"ipc://{workdir}/backend.ipc",
        }
    cluster = Cluster(
        workdir,
        shards=shards,
        ZKV_FSYNC=fsync,
        ZKV_DATA_DIR=str(workdir / "data"),
        ZKV_HEARTBEAT_INTERVAL=str(defaults.HEARTBEAT_INTERVAL_S),
        **endpoints,
    )
    if ipc:  # the processes read the environment; the benchmark's side uses these fields
        cluster.frontend, cluster.backend = endpoints["ZKV_FRONTEND"], endpoints["ZKV_BACKEND"]
    with cluster:
        try:
            cluster.start_broker()
            for _ in range(shards):
                cluster.start_worker()
            if gateway:
                # Later flags win: the production defaults, not the test cluster's small gateway.
                cluster.start_gateway(
                    "--processes",
                    str(defaults.HTTP_PROCESSES),
                    "--threads",
                    str(defaults.HTTP_THREADS),
                )
            cluster.wait_ready(gateway=gateway)
        except Exception as exc:  # not KeyboardInterrupt: Ctrl-C stops the whole run
            raise RuntimeError(f"zkv cluster did not start: {exc}\n{cluster.logs()}") from None
        yield cluster
        dead = [f"{p.args!s} exited {p.returncode}" for p in cluster._all if p.poll() is not None]
        if dead:
            print(f"warning: zkv processes died during the run: {dead}", file=sys.stderr)


@contextlib.contextmanager
def _bare_chain(workdir: Path, transport: str, fsync: bool = False) -> Iterator[str]:
    """bench/bare.py's broker and worker (with ``fsync``, the worker appends and fsyncs each
    SET to a file in ``workdir``); yields the frontend endpoint."""
    if transport == "ipc":
        frontend, backend = f"ipc://{workdir}/frontend.ipc", f"ipc://{workdir}/backend.ipc"
    else:
        frontend = f"tcp://127.0.0.1:{free_port()}"
        backend = f"tcp://127.0.0.1:{free_port()}"
    python = [sys.executable, "-u", "-m", "bench.bare"]
    children = [
        peers.Child(
            [*python, "broker", "--frontend", frontend, "--backend", backend],
            workdir / "bare-broker.log",
            cwd=ROOT,
        ),
        peers.Child(
            [*python, "worker", "--backend", backend]
            + (["--log", str(workdir / "bare-sets.log")] if fsync else []),
            workdir / "bare-worker.log",
            cwd=ROOT,
        ),
    ]
    try:
        _wait_answers(frontend, children)
        yield frontend
    finally:
        for child in children:
            child.stop()


def _wait_answers(frontend: str, children: list[peers.Child]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with Client(frontend, timeout_s=1.0, attempt_s=0.5) as client:
        while True:
            try:
                client.ping()
                return
            except Exception as exc:
                dead = [c for c in children if not c.alive()]
                if dead or time.monotonic() > deadline:
                    logs = "\n".join(c.log_tail() for c in children)
                    raise RuntimeError(f"bare chain did not answer: {exc}\n{logs}") from None
