"""Every scenario the benchmark knows, as data: what load, against what, compared with whom.

A scenario id reads left to right: ``<family>.<operation>.<value size>.<keys>.<concurrency>``,
e.g. ``http.get.16B.hot.c64`` is the seed ``/get`` route, 16-byte values, every request on one
hot key, 64 connections. ``s64`` is 64 ZeroMQ sockets, ``c64.P16`` is 64 connections with 16
requests pipelined on each (redis-benchmark's ``-P``).

Targets are the systems a scenario runs against; the runner starts each target once, runs all of
its selected scenarios, and stops it before the next (see ``bench/targets.py``):

    zkv           broker, 2 shard workers, gateway (ZKV_FSYNC=always)   -- or --frontend/--http
    zkv-fsync-no  the same with ZKV_FSYNC=no
    zkv-shards1   broker and 1 worker (no gateway)
    zkv-shards4   broker and 4 workers (no gateway)
    bare-tcp      bench/bare.py over tcp://;  bare-ipc: the same over ipc://
    redis         redis-server, loaded by redis-benchmark
    webdis        webdis in front of its own redis-server, loaded like the gateway

Peers: a scenario lists the peer scenarios it is compared with. A ratio is only shown when the
peer ran in the same invocation (``--only`` may leave it out).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

SMALL_BYTES = 16
LARGE_BYTES = 64 * 1024
PIPE_DEPTH_ONE_SOCKET = 64  # requests in flight on the single socket of an s1 pipeline
PIPE_DEPTH_MANY_SOCKETS = 16  # requests in flight on each socket of an s64 pipeline
PIPE_DEPTH_LARGE = 4  # the same with 64 KiB values: 256 in flight, 16 MiB on the wire
MANY = 64  # connections or sockets of the "many clients" scenarios
MIX_SET_PERCENT = 10  # the 90/10 get/set mix

# Targets in the order they run. The machine is shared and its load drifts, so rows compared
# across targets should run close together in time: the shard-scaling clusters run just before
# the main cluster, whose first row is the 2-shard point; the main cluster ends with the rows
# compared with the bare chain and with fsync=no, which run right after it. See run_order().
TARGETS = (
    "zkv-shards4",
    "zkv-shards1",
    "zkv",
    "zkv-fsync-no",
    "bare-tcp",
    "bare-ipc",
    "redis",
    "webdis",
)


@dataclass(frozen=True, slots=True)
class Peer:
    """A scenario to compare with.

    Attributes:
        label: how the table names the peer (``redis``, ``bare p50``, ``1 shard``...).
        scenario: the id of the peer's scenario.
        metric: ``ops`` (ratio of operations per second: above 1 means faster than the peer)
            or ``p50`` (ratio of median latency: above 1 means slower than the peer).
    """

    label: str
    scenario: str
    metric: str = "ops"


@dataclass(frozen=True, slots=True)
class Scenario:
    """One measured row of the table.

    Attributes:
        id: unique name, see the module docstring.
        target: which system it loads, one of TARGETS.
        load: which generator drives it: ``http`` (wrk, else Python threads), ``client`` (the zkv
            client, one request at a time), ``pipeline`` (raw DEALER sockets, many requests in
            flight), ``redis-benchmark``.
        op: ``get``, ``set``, ``mix`` (90/10 get/set), ``rest-put``, ``rest-get`` or
            ``webdis-get``.
        value_bytes: size of the values read or written.
        hot: every request on one key instead of keys drawn uniformly from the key space.
        connections: HTTP connections, ZeroMQ sockets or redis-benchmark clients.
        depth: requests in flight per connection (pipelines, redis ``-P``); 1 otherwise.
        peers: the scenarios this one is compared with.
        quick: part of the ``--quick`` smoke run.
        about: one line for the documentation and ``--list``.
    """

    id: str
    target: str
    load: str
    op: str
    value_bytes: int = SMALL_BYTES
    hot: bool = False
    connections: int = 1
    depth: int = 1
    peers: tuple[Peer, ...] = ()
    quick: bool = False
    about: str = ""


def size_label(value_bytes: int) -> str:
    """``16B``, ``64K``: how ids spell a value size."""
    return f"{value_bytes // 1024}K" if value_bytes >= 1024 else f"{value_bytes}B"


def _keys(hot: bool) -> str:
    return "hot" if hot else "uniform"


def _redis_id(op: str, value_bytes: int, clients: int, pipeline: int = 1) -> str:
    suffix = f".P{pipeline}" if pipeline > 1 else ""
    return f"redis.{op}.{size_label(value_bytes)}.c{clients}{suffix}"


def _http_scenarios() -> list[Scenario]:
    rows = []
    for op, what in (("get", "GET /get"), ("set", "GET /set"), ("mix", "90% /get, 10% /set")):
        for hot, connections in ((False, 1), (False, MANY), (True, MANY)):
            peers: list[Peer] = []
            if op in ("get", "set"):
                peers.append(Peer("redis", _redis_id(op, SMALL_BYTES, connections)))
            if op == "get":
                webdis = f"webdis.get.16B.{_keys(hot)}.c{connections}"
                peers.append(Peer("webdis", webdis))
                if connections == 1:
                    peers.append(Peer("bare p50", "bare.tcp.get.16B.c1", "p50"))
            if op == "set" and connections == MANY and not hot:
                peers.append(Peer("fsync=no", "fsync-no.http.set.16B.uniform.c64"))
            rows.append(
                Scenario(
                    id=f"http.{op}.16B.{_keys(hot)}.c{connections}",
                    target="zkv",
                    load="http",
                    op=op,
                    hot=hot,
                    connections=connections,
                    peers=tuple(peers),
                    quick=(op, hot, connections) in {("get", False, MANY), ("mix", False, 1)},
                    about=f"gateway seed API, {what}, {connections} connection(s), "
                    f"{'one hot key' if hot else 'uniform keys'}",
                )
            )
    for op, what in (("rest-put", "PUT /v1/keys/<key>?ttl="), ("rest-get", "GET /v1/keys/<key>")):
        for connections in (1, MANY):
            peers = []
            if connections == 1:
                redis_op = "set" if op == "rest-put" else "get"
                peers.append(Peer("redis", _redis_id(redis_op, LARGE_BYTES, 1)))
            rows.append(
                Scenario(
                    id=f"http.{op}.64K.uniform.c{connections}",
                    target="zkv",
                    load="http",
                    op=op,
                    value_bytes=LARGE_BYTES,
                    connections=connections,
                    peers=tuple(peers),
                    quick=op == "rest-put" and connections == 1,
                    about=f"gateway REST API, {what} of 64 KiB, {connections} connection(s)",
                )
            )
    return rows


def _webdis_scenarios() -> list[Scenario]:
    return [
        Scenario(
            id=f"webdis.get.16B.{_keys(hot)}.c{connections}",
            target="webdis",
            load="http",
            op="webdis-get",
            hot=hot,
            connections=connections,
            quick=connections == MANY and not hot,
            about=f"webdis GET /GET/<key> (Redis over HTTP), {connections} connection(s)",
        )
        for hot, connections in ((False, 1), (False, MANY), (True, MANY))
    ]


def _client_scenarios() -> list[Scenario]:
    rows = []
    for op in ("get", "set"):
        for value_bytes in (SMALL_BYTES, LARGE_BYTES):
            size = size_label(value_bytes)
            peers = [Peer("redis", _redis_id(op, value_bytes, 1))]
            if value_bytes == SMALL_BYTES:
                peers.append(Peer("bare p50", f"bare.tcp.{op}.16B.c1", "p50"))
                if op == "set":
                    peers.append(Peer("fsync=no", "fsync-no.client.set.16B.c1"))
            rows.append(
                Scenario(
                    id=f"client.{op}.{size}.c1",
                    target="zkv",
                    load="client",
                    op=op,
                    value_bytes=value_bytes,
                    peers=tuple(peers),
                    quick=value_bytes == SMALL_BYTES,
                    about=f"zkv.Client {op.upper()} of {size}, one request at a time",
                )
            )
    return rows


def _pipeline_scenarios() -> list[Scenario]:
    rows = []
    shapes = [
        ("get", SMALL_BYTES, False, 1),
        ("get", SMALL_BYTES, False, MANY),
        ("get", SMALL_BYTES, True, MANY),
        ("set", SMALL_BYTES, False, 1),
        ("set", SMALL_BYTES, False, MANY),
        ("set", SMALL_BYTES, True, MANY),
        ("get", LARGE_BYTES, False, MANY),
        ("set", LARGE_BYTES, False, MANY),
    ]
    for op, value_bytes, hot, sockets in shapes:
        if value_bytes == LARGE_BYTES:
            depth = PIPE_DEPTH_LARGE
        elif sockets == 1:
            depth = PIPE_DEPTH_ONE_SOCKET
        else:
            depth = PIPE_DEPTH_MANY_SOCKETS
        size = size_label(value_bytes)
        peers = [Peer("redis", _redis_id(op, value_bytes, sockets, depth))]
        if (op, value_bytes, hot, sockets) == ("get", SMALL_BYTES, False, MANY):
            peers.append(Peer("bare", "bare.tcp.pipe.get.16B.uniform.s64"))
            peers.append(Peer("1 shard", "scale.get.16B.uniform.shards1"))
        if (op, value_bytes, hot, sockets) == ("set", SMALL_BYTES, False, MANY):
            peers.append(Peer("fsync=no", "fsync-no.pipe.set.16B.uniform.s64"))
        rows.append(
            Scenario(
                id=f"pipe.{op}.{size}.{_keys(hot)}.s{sockets}",
                target="zkv",
                load="pipeline",
                op=op,
                value_bytes=value_bytes,
                hot=hot,
                connections=sockets,
                depth=depth,
                peers=tuple(peers),
                quick=(op, value_bytes, hot, sockets) == ("get", SMALL_BYTES, False, MANY),
                about=f"DEALER pipeline {op.upper()} of {size}, {sockets} socket(s) x {depth} "
                f"in flight, {'one hot key' if hot else 'uniform keys'} (2 shards)",
            )
        )
    return rows


def _scaling_scenarios() -> list[Scenario]:
    # The 2-shard point is pipe.get.16B.uniform.s64 on the main cluster.
    return [
        Scenario(
            id=f"scale.get.16B.uniform.shards{shards}",
            target=f"zkv-shards{shards}",
            load="pipeline",
            op="get",
            connections=MANY,
            depth=PIPE_DEPTH_MANY_SOCKETS,
            peers=(Peer("1 shard", "scale.get.16B.uniform.shards1"),) if shards > 1 else (),
            about=f"as pipe.get.16B.uniform.s64 with {shards} shard(s) and {shards} worker(s)",
        )
        for shards in (1, 4)
    ]


def _bare_scenarios() -> list[Scenario]:
    return [
        Scenario(
            id="bare.tcp.get.16B.c1",
            target="bare-tcp",
            load="client",
            op="get",
            quick=True,
            about="bare pyzmq ROUTER/ROUTER broker + dict worker over tcp://, zkv.Client GET",
        ),
        Scenario(
            id="bare.tcp.set.16B.c1",
            target="bare-tcp",
            load="client",
            op="set",
            about="bare chain over tcp://, zkv.Client SET",
        ),
        Scenario(
            id="bare.ipc.get.16B.c1",
            target="bare-ipc",
            load="client",
            op="get",
            peers=(Peer("bare tcp p50", "bare.tcp.get.16B.c1", "p50"),),
            about="bare chain over ipc://, zkv.Client GET",
        ),
        Scenario(
            id="bare.tcp.pipe.get.16B.uniform.s64",
            target="bare-tcp",
            load="pipeline",
            op="get",
            connections=MANY,
            depth=PIPE_DEPTH_MANY_SOCKETS,
            about="bare chain over tcp://, DEALER pipeline GET, 64 sockets x 16 in flight",
        ),
    ]


def _redis_scenarios() -> list[Scenario]:
    rows = []
    shapes = [(SMALL_BYTES, c, p) for c, p in ((1, 1), (50, 1), (MANY, 1), (1, 64), (MANY, 16))]
    shapes += [(LARGE_BYTES, 1, 1), (LARGE_BYTES, MANY, PIPE_DEPTH_LARGE)]
    for value_bytes, clients, pipeline in shapes:
        for op in ("get", "set"):
            rows.append(
                Scenario(
                    id=_redis_id(op, value_bytes, clients, pipeline),
                    target="redis",
                    load="redis-benchmark",
                    op=op,
                    value_bytes=value_bytes,
                    connections=clients,
                    depth=pipeline,
                    quick=value_bytes == SMALL_BYTES
                    and op == "get"
                    and (clients, pipeline) in {(1, 1), (MANY, 16)},
                    about=f"redis-benchmark -t {op} -d {value_bytes} -c {clients}"
                    + (f" -P {pipeline}" if pipeline > 1 else ""),
                )
            )
    return rows


def _fsync_scenarios() -> list[Scenario]:
    return [
        Scenario(
            id="fsync-no.client.set.16B.c1",
            target="zkv-fsync-no",
            load="client",
            op="set",
            quick=True,
            about="as client.set.16B.c1 on a cluster with ZKV_FSYNC=no",
        ),
        Scenario(
            id="fsync-no.pipe.set.16B.uniform.s64",
            target="zkv-fsync-no",
            load="pipeline",
            op="set",
            connections=MANY,
            depth=PIPE_DEPTH_MANY_SOCKETS,
            about="as pipe.set.16B.uniform.s64 on a cluster with ZKV_FSYNC=no",
        ),
        Scenario(
            id="fsync-no.http.set.16B.uniform.c64",
            target="zkv-fsync-no",
            load="http",
            op="set",
            connections=MANY,
            about="as http.set.16B.uniform.c64 on a cluster with ZKV_FSYNC=no",
        ),
    ]


def all_scenarios() -> list[Scenario]:
    """Every scenario, in the order of the table: zkv first, then its peers."""
    return (
        _http_scenarios()
        + _client_scenarios()
        + _pipeline_scenarios()
        + _scaling_scenarios()
        + _fsync_scenarios()
        + _bare_scenarios()
        + _redis_scenarios()
        + _webdis_scenarios()
    )


def run_order(scenarios: Iterable[Scenario]) -> list[Scenario]:
    """The order to run ``scenarios`` in: by target (TARGETS), and within the main cluster the
    shard-scaling point first, then the rest, then rows compared with the bare chain, then rows
    compared with fsync=no, so that each comparison spans as little time as possible."""
    target_index = {target: index for index, target in enumerate(TARGETS)}

    def priority(scenario: Scenario) -> int:
        labels = {peer.label for peer in scenario.peers}
        if "1 shard" in labels:
            return 0
        if "fsync=no" in labels:
            return 3
        if any(label.startswith("bare") for label in labels):
            return 2
        return 1

    # sorted() is stable: rows of equal rank keep the table's order.
    return sorted(scenarios, key=lambda s: (target_index[s.target], priority(s)))


def select(scenarios: Iterable[Scenario], only: str | None, quick: bool) -> list[Scenario]:
    """The scenarios to run.

    Args:
        only: comma-separated patterns matched against ids: a pattern with ``*``, ``?`` or
            ``[`` is a shell glob (``http.*.c64``); the id of a scenario selects exactly that
            one (``redis.get.16B.c1``, not ``redis.get.16B.c1.P64``); anything else is a
            substring (``pipe.get``). None or empty: everything.
        quick: keep only the smoke-run subset (combined with ``only``).
    """
    rows = list(scenarios)
    ids = {row.id for row in rows}
    patterns = [p.strip() for p in (only or "").split(",") if p.strip()]

    def matches(pattern: str, scenario_id: str) -> bool:
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(scenario_id, pattern)
        if pattern in ids:
            return scenario_id == pattern
        return pattern in scenario_id

    def wanted(scenario: Scenario) -> bool:
        if quick and not scenario.quick:
            return False
        return not patterns or any(matches(p, scenario.id) for p in patterns)

    return [row for row in rows if wanted(row)]
