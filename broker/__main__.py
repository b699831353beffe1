"""``python -m broker``: the zkv broker."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

import zmq

from broker.cluster import join_cluster
from broker.core import BrokerConfig
from broker.events import EVENTS_OFF
from broker.server import ServerConfig, Stopper, serve
from zkv import defaults
from zkv.config import (
    add_advertise_flag,
    add_cluster_flags,
    add_flag,
    add_heartbeat_flags,
    add_security_flags,
    advertised,
    bind_endpoint,
    bind_refusal,
    boolean,
    endpoint_host,
    env_default,
    is_loopback,
    positive_float,
    positive_int,
    program_name,
    tcp_endpoint,
)
from zkv.coordination import BrokerInfo, ConfigMismatch
from zkv.etcd import EtcdError
from zkv.keys import KeysError, complete, ensure_client_keys, ensure_keys

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
# The cyclic GC's first generation is collected when allocations outnumber frees by this many
# (CPython's default: 700). The broker allocates a few objects per sub-request of a client's
# batch and frees most at its reply, so with 700 a 1000-request batch alone set off collections,
# each walking the young requests in flight: 17% of the broker's CPU under pipelined load
# (about 1 us of 6 per SET). Above one batch's churn, collections are rare; reference counting
# frees the broker's garbage anyway (it makes almost no cycles).
GC_THRESHOLD = 10_000
# Cluster mode: by default a request waits for a shard without a leader this long past the
# lease's TTL (the next leader is found by an etcd poll of 0.2 s and takes the shard over).
FAILOVER_MARGIN_S = 2.0


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default comes from an environment variable, then zkv.defaults."""
    parser = argparse.ArgumentParser(
        prog=program_name("broker"),
        description="zkv broker: routes client requests to the worker owning each key's shard.",
    )
    # No fixed default: without the flag or its variable, tcp://<advertise>:<port> (see below).
    for flag, env, default, whom in (
        ("--frontend", "ZKV_FRONTEND", f"tcp://<advertise>:{defaults.FRONTEND_PORT}", "clients"),
        ("--backend", "ZKV_BACKEND", f"tcp://<advertise>:{defaults.BACKEND_PORT}", "workers"),
        (
            "--events",
            "ZKV_EVENTS",
            f"port {defaults.EVENTS_PORT} on the frontend's host",
            "change-event subscribers, XPUB ('none': no events proxy)",
        ),
        (
            "--events-backend",
            "ZKV_EVENTS_BACKEND",
            f"port {defaults.EVENTS_BACKEND_PORT} on the backend's host",
            "the workers' change-event publishers, XSUB",
        ),
    ):
        parser.add_argument(
            flag,
            default=env_default(env, None),
            help=f"endpoint to bind for {whom} (env {env}, default {default})",
        )
    add_advertise_flag(parser)
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
    add_cluster_flags(parser)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit_wait = "ZKV_SHARD_WAIT" in os.environ or any(
        arg == "--shard-wait" or arg.startswith("--shard-wait=") for arg in (argv or sys.argv[1:])
    )
    if args.coordinator and args.shard_wait < args.lease_ttl + FAILOVER_MARGIN_S:
        # A request for a shard whose leader died waits for the next one: that takes the
        # lease's TTL plus an etcd poll and a takeover (docs/cluster.md).
        if explicit_wait:
            logging.getLogger("broker").warning(
                "--shard-wait %.1f s is shorter than a failover (--lease-ttl %d s + %.0f s): "
                "requests for a shard whose leader died will fail before the next one leads",
                args.shard_wait,
                args.lease_ttl,
                FAILOVER_MARGIN_S,
            )
        else:
            args.shard_wait = args.lease_ttl + FAILOVER_MARGIN_S
    if args.frontend and "," in args.frontend:
        args.frontend = own_frontend(parser, args.frontend, args.advertise)
    # Where each endpoint came from, for the refusal's message: a flag, or --advertise.
    advertised = f"from --advertise/ZKV_ADVERTISE {args.advertise}"
    args.frontend_source = "--frontend/ZKV_FRONTEND" if args.frontend else advertised
    args.backend_source = "--backend/ZKV_BACKEND" if args.backend else advertised
    args.events_source = "--events/ZKV_EVENTS" if args.events else "beside --frontend"
    args.frontend = args.frontend or tcp_endpoint(args.advertise, defaults.FRONTEND_PORT)
    args.backend = args.backend or tcp_endpoint(args.advertise, defaults.BACKEND_PORT)
    # Events beside the socket of the same peers: subscribers (clients) on the frontend's host,
    # publishers (workers) on the backend's, so each is exposed exactly as its neighbour is.
    args.events = args.events or beside(args.frontend, defaults.EVENTS_PORT)
    args.events_backend = args.events_backend or beside(args.backend, defaults.EVENTS_BACKEND_PORT)
    if args.events.strip().lower() == EVENTS_OFF:  # no events proxy at all
        args.events = args.events_backend = None
    for flag, value in (
        ("--frontend", args.frontend),
        ("--backend", args.backend),
        ("--events", args.events),
        ("--events-backend", args.events_backend),
    ):
        if value is None:
            continue
        try:
            bind_endpoint(value)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {flag}: {exc}")
    bound = [v for v in (args.frontend, args.backend, args.events, args.events_backend) if v]
    if len(set(bound)) != len(bound):
        parser.error(f"--frontend, --backend, --events and --events-backend must differ: {bound}")
    return args


def beside(bound: str, port: int) -> str:
    """``port`` on the host of tcp endpoint ``bound`` (a wildcard stays one); on loopback if
    ``bound`` is not tcp (ipc://, inproc://)."""
    host = endpoint_host(bound)
    if host is None or not bound.startswith("tcp://"):
        host = "127.0.0.1"
    return tcp_endpoint(host, port)


def own_frontend(parser: argparse.ArgumentParser, listed: str, advertise: str) -> str:
    """The broker's own endpoint out of a list of frontends (clients read ``ZKV_FRONTEND`` as
    every broker's, so one environment may serve a whole cluster): the one entry on this
    broker's --advertise address. None or several: refused, saying what to set."""
    entries = [part.strip() for part in listed.split(",") if part.strip()]
    mine = [e for e in entries if e.partition("://")[2].rpartition(":")[0].strip("[]") == advertise]
    if len(mine) != 1:
        parser.error(
            f"--frontend/ZKV_FRONTEND lists {len(entries)} endpoints ({listed}), for clients; "
            f"a broker binds one, the one on its --advertise address ({advertise}), and "
            f"{len(mine)} are: give this broker --frontend with its own endpoint"
        )
    return mine[0]


def bind_refusal_of(args: argparse.Namespace) -> str | None:
    """Why the broker must not bind its endpoints (zkv.config.bind_refusal), or None. Only the
    frontend and the events endpoint (both for clients) can be refused: the backends are CURVE
    unless --insecure, which allows them."""
    cure = (
        "--frontend-curve (ZKV_FRONTEND_CURVE=1; clients then need broker.key, client.key and "
        "client.key_secret, see the README's Keys)"
    )
    refusal = bind_refusal(
        "frontend", args.frontend, args.frontend_source, args.frontend_curve, args.insecure, cure
    )
    if refusal is None and getattr(args, "events", None) is not None:
        refusal = bind_refusal(
            "events endpoint",
            args.events,
            args.events_source,
            args.frontend_curve,
            args.insecure,
            cure + ", or --events none",
        )
    return refusal


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m broker`` and ``zkv-broker``; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    keys = None
    refusal = bind_refusal_of(args)
    if refusal is not None:
        logging.getLogger("broker").error("cannot start: %s", refusal)
        return 2
    for what, bound in (("frontend", args.frontend), ("events endpoint", args.events)):
        if args.insecure and bound is not None and not is_loopback(bound):  # backend: server
            logging.getLogger("broker").warning(
                "the %s binds %s without CURVE (--insecure): any host that reaches it can "
                "use it, and its traffic is in clear",
                what,
                bound,
            )
    if args.insecure and args.frontend_curve:
        logging.getLogger("broker").error("cannot start: --frontend-curve needs keys")
        return 2
    if not args.insecure:
        if args.coordinator and not complete(Path(args.keys)):
            # On one host the first broker makes the keys; across machines every broker must
            # share one set, made once (a broker given a wrong path made a set of its own, and
            # every worker then blamed its own, correct, keys).
            logging.getLogger("broker").error(
                "cannot start: cluster mode needs the cluster's keys in %s (--keys/ZKV_KEYS): "
                "make them once with `zkv keygen DIR` and copy the directory to every broker "
                "host (docs/cluster.md, step 3)",
                Path(args.keys).absolute(),
            )
            return 2
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
        events=args.events,
        events_backend=args.events_backend,
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
            cluster_mode=bool(args.coordinator),
        ),
    )
    membership = view = None
    if args.coordinator:
        try:
            public = None if keys is None else keys.broker().public.decode()
            membership, view = join_cluster(
                args.coordinator,
                args.cluster_name,
                args.shards,
                args.replicas,
                args.host_id,
                args.lease_ttl,
                BrokerInfo(
                    advertised(args.backend, args.advertise),
                    advertised(args.frontend, args.advertise),
                    public,
                    None
                    if args.events_backend is None
                    else advertised(args.events_backend, args.advertise),
                ),
            )
        except (ConfigMismatch, EtcdError, ValueError) as exc:
            logging.getLogger("broker").error("cannot join the cluster: %s", exc)
            return 2
    stopper = Stopper()
    stopper.install()
    gc.freeze()  # what importing made lives for good: no collection need walk it
    gc.set_threshold(GC_THRESHOLD)
    try:
        return serve(config, stopper, view=view)
    except zmq.ZMQError as exc:  # a bad or busy endpoint is configuration, not a crash to dump
        logging.getLogger("broker").error("cannot start: %s", exc)
        return 2
    finally:
        if view is not None:
            view.stop()
        if membership is not None:
            membership.leave()  # workers drop this broker at once, not after its lease


if __name__ == "__main__":
    sys.exit(main())
