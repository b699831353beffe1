"""``python -m broker``: the zkv broker."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

import zmq

from broker.core import BrokerConfig
from broker.server import ServerConfig, Stopper, serve
from zkv import defaults
from zkv.config import (
    add_flag,
    add_heartbeat_flags,
    add_security_flags,
    bind_endpoint,
    boolean,
    env_default,
    positive_float,
    positive_int,
    program_name,
)
from zkv.keys import KeysError, ensure_client_keys, ensure_keys

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
# The cyclic GC's first generation is collected when allocations outnumber frees by this many
# (CPython's default: 700). The broker allocates a few objects per sub-request of a client's
# batch and frees most at its reply, so with 700 a 1000-request batch alone set off collections,
# each walking the young requests in flight: 17% of the broker's CPU under pipelined load
# (about 1 us of 6 per SET). Above one batch's churn, collections are rare; reference counting
# frees the broker's garbage anyway (it makes almost no cycles).
GC_THRESHOLD = 10_000


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default comes from an environment variable, then zkv.defaults."""
    parser = argparse.ArgumentParser(
        prog=program_name("broker"),
        description="zkv broker: routes client requests to the worker owning each key's shard.",
    )
    add_flag(
        parser,
        "--frontend",
        "ZKV_FRONTEND",
        defaults.FRONTEND,
        bind_endpoint,
        "endpoint to bind for clients, tcp://HOST:PORT",
    )
    add_flag(
        parser,
        "--backend",
        "ZKV_BACKEND",
        defaults.BACKEND,
        bind_endpoint,
        "endpoint to bind for workers, tcp://HOST:PORT",
    )
    add_flag(parser, "--shards", "ZKV_SHARDS", defaults.SHARDS, positive_int, "number of shards")
    add_flag(
        parser,
        "--shard-wait",
        "ZKV_SHARD_WAIT",
        defaults.SHARD_WAIT_S,
        positive_float,
        "seconds a request waits for a shard with no worker before failing",
    )
    add_flag(
        parser,
        "--worker-timeout",
        "ZKV_WORKER_TIMEOUT",
        defaults.WORKER_REPLY_TIMEOUT_S,
        positive_float,
        "seconds to wait for a worker's reply before failing the request",
    )
    for flag, env, default, what in (
        ("--max-pending-bytes", "ZKV_MAX_PENDING_BYTES", defaults.MAX_PENDING_BYTES, "bytes"),
        ("--max-client-bytes", "ZKV_MAX_CLIENT_BYTES", defaults.MAX_CLIENT_BYTES, "bytes"),
        ("--max-pending-ops", "ZKV_MAX_PENDING_OPS", defaults.MAX_PENDING_OPS, "requests"),
        ("--max-client-ops", "ZKV_MAX_CLIENT_OPS", defaults.MAX_CLIENT_OPS, "requests"),
        ("--max-pending-alls", "ZKV_MAX_PENDING_ALLS", defaults.MAX_PENDING_ALLS, "ALL requests"),
        ("--max-client-alls", "ZKV_MAX_CLIENT_ALLS", defaults.MAX_CLIENT_ALLS, "ALL requests"),
    ):
        whose = "all clients together" if "pending" in flag else "one client socket"
        add_flag(
            parser,
            flag,
            env,
            default,
            positive_int,
            f"{what} the broker holds (requests admitted, not yet answered) for {whose}; "
            "more is answered BUSY",
        )
    add_heartbeat_flags(parser)
    add_security_flags(parser)
    parser.add_argument(
        "--frontend-curve",
        action=argparse.BooleanOptionalAction,
        default=env_default("ZKV_FRONTEND_CURVE", False, boolean, "--frontend-curve", parser.prog),
        help="make the frontend a CURVE server: only clients holding a key listed in "
        "<keys>/clients/ are answered (clients: ZKV_FRONTEND_CURVE=1 or keys=)"
        " (env ZKV_FRONTEND_CURVE, default false)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m broker`` and ``zkv-broker``; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    keys = None
    if args.insecure and args.frontend_curve:
        logging.getLogger("broker").error("cannot start: --frontend-curve needs keys")
        return 2
    if not args.insecure:
        try:
            keys = ensure_keys(args.keys)
            if args.frontend_curve:
                keys = ensure_client_keys(keys)
        except (KeysError, OSError) as exc:
            logging.getLogger("broker").error("cannot start: keys: %s", exc)
            return 2
    config = ServerConfig(
        keys=keys,
        frontend_curve=args.frontend_curve,
        frontend=args.frontend,
        backend=args.backend,
        broker=BrokerConfig(
            shards=args.shards,
            shard_wait_s=args.shard_wait,
            worker_timeout_s=args.worker_timeout,
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_liveness=args.heartbeat_liveness,
            max_pending_bytes=args.max_pending_bytes,
            max_client_bytes=args.max_client_bytes,
            max_pending_ops=args.max_pending_ops,
            max_client_ops=args.max_client_ops,
            max_pending_alls=args.max_pending_alls,
            max_client_alls=args.max_client_alls,
        ),
    )
    stopper = Stopper()
    stopper.install()
    gc.freeze()  # what importing made lives for good: no collection need walk it
    gc.set_threshold(GC_THRESHOLD)
    try:
        return serve(config, stopper)
    except zmq.ZMQError as exc:  # a bad or busy endpoint is configuration, not a crash to dump
        logging.getLogger("broker").error("cannot start: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
