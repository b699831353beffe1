"""The pipelined client and redis-benchmark -c 50 taking turns, so their ratio is not the drift's.

The issue's pipelining floor compares ``zkv.Client.execute`` in 2 processes with
``redis-benchmark -c 50``. As separate rows (``client.pipeline.*.p2``, ``redis.*.c50``) they run
about a minute apart, and this shared 2-core machine drifts more than that in a minute: in three
runs of one day Redis alone did 63k to 117k ops/s and the SET ratio came out 0.75x, 1.03x and
1.2x. Here one zkv cluster and one redis-server run during the whole measurement and take turns,
each loaded alone for ``turn_s``, SET then GET in every round:

    round 0:  SET zkv, SET redis;  GET redis, GET zkv
    round 1:  SET redis, SET zkv;  GET zkv, GET redis
    round 2:  as round 0, and so on

Which system goes first alternates from pair to pair and from round to round, so that neither
always runs first: a drift within a round, or what a turn leaves behind (zkv's workers finishing
their fsyncs, a load process exiting), falls on each side in turn. A round's two turns of one
operation are a second or two apart, so their ratio compares the systems under the same load of
the machine; the row's ratio is the median of the rounds' ratios (the ``paired`` metric of
bench/report.py), which one round hit by a hiccup does not move. Each row's ops/s and
percentiles are the median over its rounds, and every round is kept in the JSON.

zkv's turns are bench/client_pipeline.py's runs (load processes started anew for each turn, until
a deadline); Redis's are redis-benchmark runs, which have no duration flag, so each is sized from
the rate of Redis's previous turn to last about ``turn_s`` too (its SETs and GETs go about as
fast at -c 50; only the first turn is sized from bench/peers.py's guess, about half the rate on
this machine). The idle system costs little while the other runs: the zkv cluster's heartbeats,
nothing for Redis. Used by the ``paired`` target (bench/targets.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench import client_pipeline, peers
from bench.stats import LoadResult

ROUNDS = 3  # an odd count: the median is one round's ratio, not the mean of two
OPS = ("set", "get")
SYSTEMS = ("zkv", "redis")


@dataclass(frozen=True, slots=True)
class Turn:
    """One system loaded alone with one operation, within a round.

    Attributes:
        round: 0-based.
        op: ``set`` or ``get``.
        system: ``zkv`` (the pipelined client) or ``redis`` (redis-benchmark).
        first: whether this turn opens its pair (the two systems' turns of ``op`` in ``round``).
    """

    round: int
    op: str
    system: str
    first: bool


@dataclass(frozen=True, slots=True)
class Measured:
    """One turn's result, and its wall time from start to end (load processes started and
    stopped, keys written: what the turn costs the run, beyond its measured part)."""

    turn: Turn
    result: LoadResult
    wall_s: float


def schedule(rounds: int, ops: Sequence[str] = OPS) -> list[Turn]:
    """Every turn in the order they run: per round, SET's pair then GET's; the system that
    opens a pair alternates from one pair to the next and from one round to the next."""
    turns = []
    for round_index in range(rounds):
        for op_index, op in enumerate(ops):
            order = SYSTEMS if (round_index + op_index) % 2 == 0 else SYSTEMS[::-1]
            turns += [Turn(round_index, op, system, system == order[0]) for system in order]
    return turns


def run_paired(
    frontend: str,
    redis_port: int,
    keys: Sequence[bytes],
    value: bytes,
    turn_s: float,
    processes: int,
    redis_clients: int,
    rounds: int = ROUNDS,
    ops: Sequence[str] = OPS,
    say: Callable[[str], None] | None = None,
) -> dict[tuple[str, str], LoadResult]:
    """Run every turn of :func:`schedule` against a running cluster and redis-server.

    Args:
        frontend: the zkv cluster's broker, with ``keys`` written (its GETs must all hit).
        redis_port: the redis-server's port (redis-benchmark writes its GETs' keys itself).
        keys: what the pipelined client draws its keys from, uniformly.
        value: what every SET writes, zkv and Redis alike (its length is redis-benchmark's -d).
        turn_s: how long each turn loads its system.
        processes: the pipelined client's load processes.
        redis_clients: redis-benchmark's -c.
        ops: the operations to pair (those of the rows selected).
        say: told one line per turn (progress while the target opens).

    Returns:
        One row per (system, operation), see :func:`rows`.
    """
    measured = []
    redis_rate: float | None = None  # ops/s of Redis's last turn
    for turn in schedule(rounds, ops):
        began = time.monotonic()
        if turn.system == "zkv":
            result = client_pipeline.run_client_pipeline(
                frontend, turn.op, keys, value, processes, turn_s
            )
        else:
            result = peers.run_redis_benchmark(
                redis_port, turn.op, redis_clients, 1, len(value), turn_s, redis_rate
            )
            redis_rate = result.ops_per_s or redis_rate
        measured.append(Measured(turn, result, time.monotonic() - began))
        if say is not None:
            say(
                f"round {turn.round + 1}/{rounds} {turn.op} {turn.system:<5} "
                f"{result.ops_per_s or 0:>9,.0f} ops/s in {result.elapsed_s:.2f} s"
            )
    return rows(measured)


def rows(measured: Sequence[Measured]) -> dict[tuple[str, str], LoadResult]:
    """One row per (system, operation) from its turns, in round order.

    ops/s and the latency percentiles are each the median over the rounds, so one round hit by
    a hiccup does not move them; operations, errors, samples and measured time are summed
    (errors unknown if a round's are: redis-benchmark does not count them). ``round_ops_per_s``
    keeps each round's ops/s for the ``paired`` ratio, which divides round by round, and
    ``details["rounds"]`` every round's numbers, so the spread is in the JSON.
    """
    grouped: dict[tuple[str, str], list[Measured]] = {}
    for one in sorted(measured, key=lambda m: m.turn.round):
        grouped.setdefault((one.turn.system, one.turn.op), []).append(one)
    found = {}
    for pair, turns in grouped.items():
        results = [one.result for one in turns]
        errors = [r.errors for r in results]
        found[pair] = LoadResult(
            generator=results[0].generator,
            ops=sum(r.ops for r in results),
            errors=None if None in errors else sum(e for e in errors if e is not None),
            elapsed_s=sum(r.elapsed_s for r in results),
            p50_ms=_median([r.p50_ms for r in results]),
            p99_ms=_median([r.p99_ms for r in results]),
            p999_ms=_median([r.p999_ms for r in results]),
            count=sum(r.count for r in results),
            ops_per_s=_median([r.ops_per_s for r in results]),
            details={"of_rounds": "median", "rounds": [_round_record(one) for one in turns]},
            round_ops_per_s=[r.ops_per_s or 0.0 for r in results],
        )
    return found


def _median(values: Sequence[float | None]) -> float | None:
    """The median, or None if any value is unknown (a percentile the generator lacks)."""
    known = [value for value in values if value is not None]
    if not known or len(known) != len(values):
        return None
    return statistics.median(known)


def _round_record(one: Measured) -> dict[str, Any]:
    result = one.result
    return {
        "round": one.turn.round,
        "first": one.turn.first,
        "ops_per_s": None if result.ops_per_s is None else round(result.ops_per_s, 1),
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "ops": result.ops,
        "errors": result.errors,
        "elapsed_s": round(result.elapsed_s, 3),
        "turn_wall_s": round(one.wall_s, 3),
        "details": result.details,
    }
