"""Every scenario the benchmark knows, as data: what load, against what, compared with whom.

A scenario id reads left to right: ``<family>.<operation>.<value size>.<keys>.<concurrency>``,
e.g. ``http.get.16B.hot.c64`` is the seed ``/get`` route, 16-byte values, every request on one
hot key, 64 connections. ``s64`` is 64 ZeroMQ sockets, ``c64.P16`` is 64 connections with 16
requests pipelined on each (redis-benchmark's ``-P``), ``p2`` is 2 client processes each
handing ``zkv.Client.execute`` many operations at once.

Targets are the systems a scenario runs against; the runner starts each target once, runs all of
its selected scenarios, and stops it before the next (see ``bench/targets.py``):

    zkv           broker, 2 shard workers, gateway (ZKV_FSYNC=always)   -- or --frontend/--http
    zkv-fsync-no  the same with ZKV_FSYNC=no
    zkv-shards1   broker and 1 worker (no gateway)
    zkv-shards4   broker and 4 workers (no gateway)
    zkv-ipc       broker and 2 workers over ipc:// endpoints in the run's temporary directory
    interleaved   zkv over tcp:// and ipc:// (2 shards each, ZKV_FSYNC=always), zkv over tcp://
                  with ZKV_FSYNC=no, and the bare chain over both (and over tcp:// with its
                  worker fsyncing each SET), all running at once; one client per chain takes
                  turns (bench/interleaved.py)
    paired        zkv (2 shards, ZKV_FSYNC=always) and redis-server, both running; the pipelined
                  client and redis-benchmark -c 50 take turns, round after round
                  (bench/paired.py)
    bare-tcp      bench/bare.py over tcp://;  bare-ipc: the same over ipc://
    redis         redis-server, loaded by redis-benchmark
    webdis        webdis in front of its own redis-server, loaded like the gateway
    memory        nothing of its own: each scenario starts a cluster or a redis-server, writes
                  ``--full-keys`` keys and measures memory per key (bench/memory.py)
    expiry-wave   one run of bench/expiry_wave.py (``--full-keys`` keys due in one second);
                  its scenarios are the phases of that run

Full-only scenarios (``full``) are long or repeat what others show; they run with ``--full``, or
when an ``--only`` pattern names them from the start of their id (see :func:`select`).

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
CLIENT_PROCESSES = (
    2  # load processes of the client.pipeline rows (one Python process is not enough)
)
CLIENT_WINDOW = 8000  # operations a zkv.Client pipeline keeps in flight (zkv.client.WINDOW_OPS)
REDIS_FLOOR_CLIENTS = 50  # redis-benchmark -c of the pipelining floor's peer (the issue's)

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
    "interleaved",
    "paired",
    "zkv-ipc",
    "redis",
    "webdis",
    "memory",
    "expiry-wave",
    "issue12",
)


@dataclass(frozen=True, slots=True)
class Peer:
    """A scenario to compare with.

    Attributes:
        label: how the table names the peer (``redis``, ``bare p50``, ``1 shard``...).
        scenario: the id of the peer's scenario.
        metric: ``ops`` (ratio of operations per second: above 1 means faster than the peer),
            ``p50`` or ``p99`` (ratio of that latency percentile: above 1 means slower than the
            peer), ``bytes`` (ratio of memory per key: above 1 means more memory) or ``paired``
            (rows measured in the same rounds, bench/paired.py: the median of each round's
            ratio of ops per second).
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
            client, one request at a time), ``client-pipeline`` (``zkv.Client.execute`` in
            ``connections`` processes, bench/client_pipeline.py), ``interleaved`` (one
            request at a time, taking turns with other chains), ``paired``
            (``client-pipeline`` or ``redis-benchmark`` -c 50, taking turns, bench/paired.py),
            ``pipeline`` (raw DEALER sockets, one request per message, many in flight),
            ``redis-benchmark``, ``memory``
            (bench/memory.py), ``expiry-wave`` (a phase of bench/expiry_wave.py's run).
        op: ``get``, ``set``, ``mix`` (90/10 get/set), ``rest-put``, ``rest-get`` or
            ``webdis-get``.
        value_bytes: size of the values read or written.
        hot: every request on one key instead of keys drawn uniformly from the key space.
        connections: HTTP connections, ZeroMQ sockets, redis-benchmark clients or client
            processes (``client-pipeline``).
        depth: requests in flight per connection (pipelines, redis ``-P``, the client's window
            of operations); 1 otherwise.
        peers: the scenarios this one is compared with.
        quick: part of the ``--quick`` smoke run.
        full: only with ``--full`` (or named by ``--only`` from the start of the id).
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
    full: bool = False
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
                    full=hot and op != "get",  # the hot GET row stays, beside webdis's
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
                    full=connections == MANY,
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
                # The default run keeps the s64 uniform 16-byte rows (the bare chain's, shard
                # scaling's and fsync=no's points); client.pipeline.* shows pipelining.
                full=hot or sockets == 1 or value_bytes == LARGE_BYTES,
                about=f"DEALER pipeline {op.upper()} of {size}, {sockets} socket(s) x {depth} "
                f"in flight, {'one hot key' if hot else 'uniform keys'} (2 shards)",
            )
        )
    return rows


SCALE_PIPELINE_1 = "scale.client.pipeline.get.16B.uniform.shards1"


def _client_pipeline_id(op: str, hot: bool, processes: int, prefix: str = "") -> str:
    return f"{prefix}client.pipeline.{op}.16B.{_keys(hot)}.p{processes}"


def _client_pipeline_scenarios() -> list[Scenario]:
    """zkv.Client.execute with many operations in flight, against redis-benchmark -c 50: the
    issue's pipelining floor (at least 1.0x)."""
    shapes = [
        ("get", False, CLIENT_PROCESSES),
        ("get", False, 1),
        ("get", True, CLIENT_PROCESSES),
        ("set", False, CLIENT_PROCESSES),
        ("set", True, CLIENT_PROCESSES),
    ]
    rows = []
    for op, hot, processes in shapes:
        peers = [Peer("redis c50", _redis_id(op, SMALL_BYTES, 50))]
        if processes != CLIENT_PROCESSES:
            peers.append(
                Peer(f"p{CLIENT_PROCESSES}", _client_pipeline_id(op, hot, CLIENT_PROCESSES))
            )
        if op == "set" and not hot:
            peers.append(Peer("fsync=no", _client_pipeline_id(op, hot, processes, "fsync-no.")))
        if (op, hot, processes) == ("get", False, CLIENT_PROCESSES):
            peers.append(Peer("1 shard", SCALE_PIPELINE_1))  # the 2-shard point of scaling
        rows.append(
            Scenario(
                id=_client_pipeline_id(op, hot, processes),
                target="zkv",
                load="client-pipeline",
                op=op,
                hot=hot,
                connections=processes,
                depth=CLIENT_WINDOW,
                peers=tuple(peers),
                quick=(op, hot, processes) == ("get", False, CLIENT_PROCESSES),
                # One process against two: is one Python client the limit? (docs/benchmarks.md)
                full=processes != CLIENT_PROCESSES,
                about=f"zkv.Client.execute {op.upper()}s of 16 bytes (BATCH messages), "
                f"{processes} process(es), {'one hot key' if hot else 'uniform keys'} (2 shards)",
            )
        )
    return rows


def paired_id(system: str, op: str) -> str:
    """The id of a paired target's row: ``zkv`` (the pipelined client) or ``redis``."""
    if system == "zkv":
        return _client_pipeline_id(op, False, CLIENT_PROCESSES, "paired.")
    return "paired." + _redis_id(op, SMALL_BYTES, REDIS_FLOOR_CLIENTS)


def _paired_scenarios() -> list[Scenario]:
    """The pipelining floor's two uniform 16-byte rows measured in turns, seconds apart
    (bench/paired.py): their ratio is the systems', not the drift's between two targets run a
    minute apart, as client.pipeline.* and redis.*.c50 are."""
    zkv = [
        Scenario(
            id=paired_id("zkv", op),
            target="paired",
            load="paired",
            op=op,
            connections=CLIENT_PROCESSES,
            depth=CLIENT_WINDOW,
            peers=(
                Peer(f"redis c{REDIS_FLOOR_CLIENTS} (paired)", paired_id("redis", op), "paired"),
            ),
            about=f"as {_client_pipeline_id(op, False, CLIENT_PROCESSES)} (2 shards, "
            f"ZKV_FSYNC=always), in turns with {paired_id('redis', op)}; ops/s and ratio: "
            "medians over rounds",
        )
        for op in ("get", "set")
    ]
    redis = [
        Scenario(
            id=paired_id("redis", op),
            target="paired",
            load="paired",
            op=op,
            connections=REDIS_FLOOR_CLIENTS,
            about=f"redis-benchmark -t {op} -d 16 -c {REDIS_FLOOR_CLIENTS}, in turns with "
            f"{paired_id('zkv', op)}",
        )
        for op in ("get", "set")
    ]
    return zkv + redis


def _ipc_scenarios() -> list[Scenario]:
    """One request at a time over ipc://, next to the bare chain (ipc and tcp) and Redis."""
    rows = []
    for op in ("get", "set"):
        peers = [
            Peer("bare ipc p50", f"bare.ipc.{op}.16B.c1", "p50"),
            Peer("bare tcp p50", f"bare.tcp.{op}.16B.c1", "p50"),
            Peer("zkv tcp p50", f"client.{op}.16B.c1", "p50"),
            Peer("redis p50", _redis_id(op, SMALL_BYTES, 1), "p50"),
        ]
        rows.append(
            Scenario(
                id=f"ipc.client.{op}.16B.c1",
                target="zkv-ipc",
                load="client",
                op=op,
                peers=tuple(peers),
                full=True,  # interleaved.zkv-ipc.* measures the same beside its peers
                about=f"zkv.Client {op.upper()} of 16 bytes, one at a time, frontend and backend "
                "over ipc:// (2 shards, ZKV_FSYNC=always)",
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class Chain:
    """One chain of the interleaved target.

    Attributes:
        name: how its row ids name it: ``interleaved.<name>.<op>.16B.c1``.
        system: ``zkv`` (a cluster of 2 shards) or ``bare`` (bench/bare.py).
        transport: ``tcp`` or ``ipc``, for both the frontend and the backend.
        fsync: a zkv cluster's ZKV_FSYNC; for the bare chain None, or ``always`` for its
            worker appending and fsyncing each SET before the reply (bench/bare.py ``--log``).
    """

    name: str
    system: str
    transport: str
    fsync: str | None = None


# zkv-tcp-fsync-no runs over tcp://, as the sequential fsync-no.* rows and the zkv-tcp chain do:
# it differs from zkv-tcp by the fsync policy alone, and from bare-tcp as the sequential
# fsync-no.client.set.16B.c1 differs from bare.tcp.set.16B.c1, whose ratio it replaces.
INTERLEAVED_CHAINS = (
    Chain("zkv-ipc", "zkv", "ipc", "always"),
    Chain("zkv-tcp", "zkv", "tcp", "always"),
    Chain("zkv-tcp-fsync-no", "zkv", "tcp", "no"),
    Chain("bare-ipc", "bare", "ipc"),
    Chain("bare-tcp", "bare", "tcp"),
    Chain("bare-tcp-fsync", "bare", "tcp", "always"),
)


def _interleaved_id(chain: str, op: str) -> str:
    return f"interleaved.{chain}.{op}.16B.c1"


def _interleaved_scenarios() -> list[Scenario]:
    """One request at a time on five chains taking turns: the latency floor's comparison
    (zkv's p50 within 1.3x of the bare chain's, SET under both fsync policies) without the
    machine's drift in between."""
    rows = []
    for chain in INTERLEAVED_CHAINS:
        name = chain.name
        for op in ("get", "set"):
            peers = []
            if chain.system == "zkv":
                peers.append(Peer("bare ipc p50", _interleaved_id("bare-ipc", op), "p50"))
                peers.append(Peer("bare tcp p50", _interleaved_id("bare-tcp", op), "p50"))
            if chain.system == "zkv" and chain.fsync == "always" and op == "set":
                # The same chain paying one write and one fsync per SET: the disk's part.
                fsynced = _interleaved_id("bare-tcp-fsync", op)
                peers.append(Peer("bare tcp+fsync p50", fsynced, "p50"))
            if name == "bare-tcp-fsync":
                peers.append(Peer("bare tcp p50", _interleaved_id("bare-tcp", op), "p50"))
            if name == "zkv-ipc":
                peers.append(Peer("zkv tcp p50", _interleaved_id("zkv-tcp", op), "p50"))
                peers.append(Peer("redis p50", _redis_id(op, SMALL_BYTES, 1), "p50"))
            if name == "zkv-tcp-fsync-no":
                peers.append(Peer("fsync=always p50", _interleaved_id("zkv-tcp", op), "p50"))
            if name == "bare-ipc":
                peers.append(Peer("bare tcp p50", _interleaved_id("bare-tcp", op), "p50"))
            what = "bare chain"
            if chain.fsync == "always" and chain.system == "bare":
                what = "bare chain, its worker appending and fsyncing each SET"
            if chain.system == "zkv":
                what = f"zkv (2 shards, ZKV_FSYNC={chain.fsync})"
            rows.append(
                Scenario(
                    id=_interleaved_id(name, op),
                    target="interleaved",
                    load="interleaved",
                    op=op,
                    peers=tuple(peers),
                    quick=op == "get",
                    about=f"zkv.Client {op.upper()} of 16 bytes one at a time, {what} over "
                    f"{chain.transport}://, taking turns with the other chains",
                )
            )
    return rows


def _memory_scenarios() -> list[Scenario]:
    """Memory per key with a TTL (bench/memory.py), zkv next to Redis's used_memory."""
    redis = "memory.redis.16B.ttl"
    return [
        Scenario(
            id="memory.zkv.16B.ttl",
            target="memory",
            load="memory",
            op="memory",
            peers=(Peer("redis", redis, "bytes"),),
            full=True,
            about="RSS growth per key of an --in-memory worker after --full-keys SETs of "
            "16-byte keys and values with a 1 h TTL, request ids remembered as the client sends",
        ),
        Scenario(
            id="memory.zkv-durable.16B.ttl",
            target="memory",
            load="memory",
            op="durable",
            peers=(Peer("redis", redis, "bytes"),),
            full=True,
            about="the same with a data directory (ZKV_FSYNC=no; the page cache is not in RSS)",
        ),
        Scenario(
            id=redis,
            target="memory",
            load="memory",
            op="redis",
            full=True,
            about="the same keys and values with SET PX into redis-server: used_memory growth",
        ),
    ]


def _expiry_scenarios() -> list[Scenario]:
    """Phases of one bench/expiry_wave.py run: GETs one at a time while keys expire at once."""
    baseline = Peer("baseline p99", "expiry.get.baseline", "p99")
    return [
        Scenario(
            id="expiry.get.baseline",
            target="expiry-wave",
            load="expiry-wave",
            op="baseline",
            full=True,
            about="GETs one at a time with --full-keys keys loaded and nothing due yet",
        ),
        Scenario(
            id="expiry.get.pre-wave",
            target="expiry-wave",
            load="expiry-wave",
            op="pre-wave",
            peers=(baseline,),
            full=True,
            about="the 6 s before the wave's second, when its keys are refined into fine buckets",
        ),
        Scenario(
            id="expiry.get.wave",
            target="expiry-wave",
            load="expiry-wave",
            op="wave",
            peers=(baseline,),
            full=True,
            about="from the wave's second until its last key is gone: --full-keys keys due in "
            "one second",
        ),
    ]


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
    ] + [
        Scenario(
            id=f"scale.client.pipeline.get.16B.uniform.shards{shards}",
            target=f"zkv-shards{shards}",
            load="client-pipeline",
            op="get",
            connections=CLIENT_PROCESSES,
            depth=CLIENT_WINDOW,
            peers=(Peer("1 shard", SCALE_PIPELINE_1),) if shards > 1 else (),
            about=f"as client.pipeline.get.16B.uniform.p{CLIENT_PROCESSES} (BATCH messages) with "
            f"{shards} shard(s) and {shards} worker(s): where the broker, not the workers, caps",
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
            full=True,  # interleaved.bare-ipc.* measures it beside zkv-ipc
            load="client",
            op="get",
            peers=(Peer("bare tcp p50", "bare.tcp.get.16B.c1", "p50"),),
            about="bare chain over ipc://, zkv.Client GET",
        ),
        Scenario(
            id="bare.ipc.set.16B.c1",
            target="bare-ipc",
            full=True,  # interleaved.bare-ipc.* measures it beside zkv-ipc
            load="client",
            op="set",
            peers=(Peer("bare tcp p50", "bare.tcp.set.16B.c1", "p50"),),
            about="bare chain over ipc://, zkv.Client SET",
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
                    # Peers of full-only pipe rows are full-only too.
                    full=(clients, pipeline) == (1, 64)
                    or (value_bytes, clients) == (LARGE_BYTES, MANY),
                    quick=value_bytes == SMALL_BYTES
                    and op == "get"
                    and (clients, pipeline) in {(1, 1), (50, 1), (MANY, 16)},
                    about=f"redis-benchmark -t {op} -d {value_bytes} -c {clients}"
                    + (f" -P {pipeline}" if pipeline > 1 else ""),
                )
            )
    return rows


def _fsync_scenarios() -> list[Scenario]:
    return [
        *(
            Scenario(
                id=_client_pipeline_id("set", hot, CLIENT_PROCESSES, "fsync-no."),
                target="zkv-fsync-no",
                load="client-pipeline",
                op="set",
                hot=hot,
                connections=CLIENT_PROCESSES,
                depth=CLIENT_WINDOW,
                peers=(Peer("redis c50", _redis_id("set", SMALL_BYTES, 50)),),
                full=hot,  # the hot key's SETs are coalesced: the fsync policy matters less
                about=f"as {_client_pipeline_id('set', hot, CLIENT_PROCESSES)} on a cluster "
                "with ZKV_FSYNC=no",
            )
            for hot in (False, True)
        ),
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


def _issue12_scenarios() -> list[Scenario]:
    """The issue-12 floors, all measured in one run of one cluster (bench/issue12.py):
    pipelined INCR and conditional SETs at least 0.8x pipelined SET, a lock acquired and
    released within 1.5x a lone SET's round trip (p50), and Redis's SET NX and INCRBY."""
    p = f"p{CLIENT_PROCESSES}"
    set_row = f"issue12.client.pipeline.set.16B.{p}"
    lone = "issue12.client.set.16B.c1"
    redis = {op: f"issue12.redis.{op}.c50" for op in ("set.16B", "set-nx.16B", "incrby")}
    rows = [
        (
            "client.pipeline.set.16B." + p,
            "set",
            (Peer("redis SET c50", redis["set.16B"]),),
            f"zkv.Client.execute SETs of 16 bytes, {CLIENT_PROCESSES} processes, uniform keys: "
            "2 rounds with the rows below, the second in reverse order",
        ),
        (
            "client.pipeline.incr." + p,
            "incr",
            (Peer("SET", set_row), Peer("redis INCRBY c50", redis["incrby"])),
            "INCR by 1 of keys of each process's own, pipelined as the SETs",
        ),
        (
            "client.pipeline.set-nx.16B." + p,
            "set-nx",
            (Peer("SET", set_row), Peer("redis SET NX c50", redis["set-nx.16B"])),
            "SET NX of 16 bytes on keys never written, pipelined as the SETs",
        ),
        (
            "client.pipeline.set-ifv.16B." + p,
            "set-ifv",
            (Peer("SET", set_row),),
            "SET IF_VERSION VERSIONED, a compare-and-set loop (each key's next write carries "
            "the version its last returned), pipelined as the SETs",
        ),
        (
            "client.set.16B.c1",
            "set",
            (),
            "zkv.Client SET of 16 bytes one at a time, in turns with the two rows below",
        ),
        (
            "client.lock-unlock.c1",
            "lock-unlock",
            (
                Peer("SET p50", lone, "p50"),
                Peer("SET+SET p50", "issue12.client.set-set.16B.c1", "p50"),
            ),
            "acquire_lock + release_lock one at a time: two round trips, two durable writes",
        ),
        (
            "client.set-set.16B.c1",
            "set-set",
            (Peer("SET p50", lone, "p50"),),
            "two SETs one after the other: the lock's two writes without the lock",
        ),
        ("redis.set.16B.c50", "redis-set", (), "redis-benchmark -t set -d 16 -c 50, same run"),
        (
            "redis.set-nx.16B.c50",
            "redis-set-nx",
            (),
            "redis-benchmark -c 50 SET nx:__rand_int__ <16 B> NX (10^9 keys), same run",
        ),
        ("redis.incrby.c50", "redis-incrby", (), "redis-benchmark -c 50 INCRBY n:__rand_int__ 1"),
    ]
    return [
        Scenario(
            id="issue12." + name,
            target="issue12",
            load="issue12",
            op=op,
            connections=CLIENT_PROCESSES if ".pipeline." in name else 1,
            depth=CLIENT_WINDOW if ".pipeline." in name else 1,
            peers=peers,
            # The smoke run: the floors' rows and their SET peers.
            quick=op in ("set", "incr", "set-nx", "lock-unlock", "set-set"),
            about=about,
        )
        for name, op, peers, about in rows
    ]


def all_scenarios() -> list[Scenario]:
    """Every scenario, in the order of the table: zkv first, then its peers."""
    return (
        _http_scenarios()
        + _client_scenarios()
        + _client_pipeline_scenarios()
        + _paired_scenarios()
        + _ipc_scenarios()
        + _interleaved_scenarios()
        + _pipeline_scenarios()
        + _scaling_scenarios()
        + _fsync_scenarios()
        + _bare_scenarios()
        + _redis_scenarios()
        + _webdis_scenarios()
        + _memory_scenarios()
        + _expiry_scenarios()
        + _issue12_scenarios()
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


def select(
    scenarios: Iterable[Scenario], only: str | None, quick: bool, full: bool = False
) -> list[Scenario]:
    """The scenarios to run.

    Args:
        only: comma-separated patterns matched against ids: a pattern with ``*``, ``?`` or
            ``[`` is a shell glob (``http.*.c64``); the id of a scenario selects exactly that
            one (``redis.get.16B.c1``, not ``redis.get.16B.c1.P64``); anything else is a
            substring (``pipe.get``). None or empty: everything (but the full-only ones).
        quick: keep only the smoke-run subset (combined with ``only``).
        full: include the full-only scenarios. Without it, ``only`` still selects a full-only
            scenario by glob, by exact id, or by a substring the id starts with (``memory``,
            ``expiry``, ``pipe.get.64K``): a substring inside an id (``redis``) does not start
            a minute-long memory run.
    """
    rows = list(scenarios)
    ids = {row.id for row in rows}
    patterns = [p.strip() for p in (only or "").split(",") if p.strip()]

    def matches(pattern: str, scenario: Scenario) -> bool:
        if any(c in pattern for c in "*?["):
            return fnmatch.fnmatchcase(scenario.id, pattern)
        if pattern in ids:
            return scenario.id == pattern
        if scenario.full and not full:
            return scenario.id.startswith(pattern)
        return pattern in scenario.id

    def wanted(scenario: Scenario) -> bool:
        if quick and not scenario.quick:
            return False
        if not patterns:
            return full or not scenario.full
        return any(matches(p, scenario) for p in patterns)

    return [row for row in rows if wanted(row)]
