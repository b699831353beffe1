"""``python -m bench.etcd_client``: zkv.etcd (http.client) against etcd3gw (requests) on a
get/put loop against one local etcd. Figures and the choice: docs/cluster.md, "The etcd client".

etcd3gw is not a dependency of zkv: install it into a scratch virtual environment and put its
site-packages on the path of the project's Python, e.g.::

    python3 -m venv /tmp/etcd3gw && /tmp/etcd3gw/bin/pip install etcd3gw
    PYTHONPATH=/tmp/etcd3gw/lib/python3.11/site-packages .venv/bin/python -m bench.etcd_client

It starts its own etcd (tests/etcd.py) with its data directory on tmpfs (/dev/shm) when there is
one, so that etcd's fsync does not hide the clients' own costs, and runs the clients in
alternating rounds so that both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.etcd import EtcdServer
from zkv.etcd import Etcd

Op = Callable[[int], object]


def zkv_ops(url: str) -> tuple[Op, Op]:
    etcd = Etcd([url], timeout_s=2.0)
    return (lambda n: etcd.put(f"/bench/zkv/{n % 100}", b"v" * 100)), (
        lambda n: etcd.get(f"/bench/zkv/{n % 100}")
    )


def etcd3gw_ops(url: str) -> tuple[Op, Op]:
    import etcd3gw  # type: ignore[import-not-found]

    host, port = url.removeprefix("http://").rsplit(":", 1)
    client = etcd3gw.client(host=host, port=int(port), timeout=2.0, api_path="/v3/")
    return (lambda n: client.put(f"/bench/gw/{n % 100}", b"v" * 100)), (
        lambda n: client.get(f"/bench/gw/{n % 100}")
    )


def timed_round(op: Op, count: int) -> list[float]:
    """Seconds per call of ``count`` calls."""
    took = []
    for n in range(count):
        started = time.perf_counter()
        op(n)
        took.append(time.perf_counter() - started)
    return took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000, help="calls per round and op")
    args = parser.parse_args(argv)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as tmp, EtcdServer(Path(tmp)) as server:
        clients = {"zkv.etcd": zkv_ops(server.url)}
        try:
            clients["etcd3gw"] = etcd3gw_ops(server.url)
        except ImportError:
            print("etcd3gw is not importable: measuring zkv.etcd only (see this module's doc)")
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, (put_op, get_op) in clients.items():
                for kind, op in (("put", put_op), ("get", get_op)):
                    samples.setdefault((name, kind), []).extend(timed_round(op, args.calls))
    print(f"{'client':10} {'op':4} {'calls/s':>9} {'p50 us':>8} {'p99 us':>8}")
    for (name, kind), took in samples.items():
        took.sort()
        rate = len(took) / sum(took)
        p50 = statistics.median(took) * 1e6
        p99 = took[int(len(took) * 0.99)] * 1e6
        print(f"{name:10} {kind:4} {rate:9.0f} {p50:8.0f} {p99:8.0f}")


if __name__ == "__main__":
    main()
