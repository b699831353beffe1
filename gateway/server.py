"""Serves the gateway app with gunicorn: worker processes, each with one event loop.

gunicorn is run programmatically (a :class:`gunicorn.app.base.BaseApplication`). Its master
binds the port, forks the worker processes and restarts any that dies. Two worker classes:

* ``event`` (the default): gateway/worker.py, one asyncio loop per process serving every
  connection, each request's app call in a greenlet, and the zkv calls of requests that arrive
  together sent in one BATCH message. Measured on the whole path (docs/performance.md), it
  serves several times the requests of ``gthread`` on the same cores.
* ``gthread``: gunicorn's own threads, one zkv client (one ZeroMQ socket) per thread; a
  request costs a thread's round trip to the broker. Kept for comparison and as a fallback.

The app is not preloaded: each forked worker process builds its own app and its own zkv
clients, so no ZeroMQ context or socket ever crosses a fork or a thread. On SIGTERM (honcho's
stop) the workers finish in-flight requests for at most ``GRACEFUL_TIMEOUT_S`` and exit, well
before honcho's SIGKILL five seconds later; SIGINT (Ctrl-C) stops at once.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bottle import Bottle
from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from gateway import fastlane
from gateway.app import ClientPlugin, make_app
from gateway.auth import Tokens, TokensFileError, load_tokens
from gateway.bridge import LoopClient
from gateway.http11 import ServerConfig, Shortcut, set_target_limit
from gateway.metrics import CountedWsgi, HttpStats
from gateway.watch import Watches
from zkv import defaults, protocol
from zkv.client import Client
from zkv.config import (
    add_flag,
    boolean,
    endpoints,
    env_default,
    keys_default,
    positive_float,
    positive_int,
    program_name,
    whole_number,
)
from zkv.keys import KeysError, client_curve
from zkv.watch import events_endpoints

log = logging.getLogger(__name__)

GRACEFUL_TIMEOUT_S = 3  # under honcho's 5 s between SIGTERM and SIGKILL
LIMIT_REQUEST_LINE_BYTES = 8190  # gunicorn's maximum: seed /set carries its value in the URL
LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"  # as gunicorn's own lines
# gthread is gunicorn's thread worker with zkv's request line and JSON errors (gateway/gthread.py)
WORKER_CLASSES = {
    "event": "gateway.worker.EventLoopWorker",
    "gthread": "gateway.gthread.ThreadWorker",
}


# --- flag types: argparse reports their ValueError/ArgumentTypeError with the flag's name ----


def port(text: str) -> int:
    """A TCP port; 0 lets the OS choose (gunicorn logs the one it got)."""
    return whole_number(text, 0, 65535)


def host(text: str) -> str:
    """A host name or address to listen on."""
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be a host name or address, got {text!r}")
    return text


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        return whole_number(text, low, high)

    parse.__name__ = "integer"
    return parse


def worker_class(text: str) -> str:
    """One of :data:`WORKER_CLASSES`."""
    if text not in WORKER_CLASSES:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(sorted(WORKER_CLASSES))}, got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line; each flag's default comes from its environment variable."""
    parser = argparse.ArgumentParser(
        prog=program_name("gateway"),
        description="zkv HTTP gateway: the seed API and the REST API over the zkv broker.",
    )
    add_flag(parser, "--host", "ZKV_HOST", defaults.HTTP_HOST, host, "address to listen on")
    add_flag(parser, "--port", "PORT", defaults.HTTP_PORT, port, "TCP port to listen on")
    add_flag(
        parser,
        "--frontend",
        "ZKV_FRONTEND",
        defaults.FRONTEND,
        endpoints,
        "the broker's frontend, or several brokers' separated by commas (tried in turn)",
    )
    add_flag(
        parser,
        "--events",
        "ZKV_EVENTS",
        defaults.EVENTS,
        endpoints,
        "the broker's events endpoint(s) for GET /v1/watch (comma-separated: several brokers)",
    )
    add_flag(
        parser,
        "--processes",
        "ZKV_HTTP_PROCESSES",
        defaults.HTTP_PROCESSES,
        positive_int,
        "gunicorn worker processes",
    )
    add_flag(
        parser,
        "--worker-class",
        "ZKV_HTTP_WORKER",
        defaults.HTTP_WORKER,
        worker_class,
        "event (one event loop per process, batched zkv calls) or gthread (gunicorn's threads)",
    )
    add_flag(
        parser,
        "--threads",
        "ZKV_HTTP_THREADS",
        defaults.HTTP_THREADS,
        positive_int,
        "gthread only: threads per process, each with its own ZeroMQ socket",
    )
    add_flag(
        parser,
        "--max-connections",
        "ZKV_HTTP_MAX_CONNECTIONS",
        defaults.HTTP_MAX_CONNECTIONS,
        positive_int,
        "event only: open connections per process; more are answered 503",
    )
    add_flag(
        parser,
        "--max-connections-per-client",
        "ZKV_HTTP_MAX_CONNECTIONS_PER_CLIENT",
        defaults.HTTP_MAX_CONNECTIONS_PER_CLIENT,
        positive_int,
        "event only: open connections per process from one client IP address; more are "
        "answered 503 (behind a reverse proxy all clients share its address: raise it)",
    )
    add_flag(
        parser,
        "--evict-after",
        "ZKV_HTTP_EVICT_AFTER",
        defaults.HTTP_EVICT_AFTER_S,
        positive_float,
        "event only: over a connection limit, close the connection that has waited longest "
        "(on an unfinished request, or idle) if over this many seconds, instead of refusing "
        "the new one",
    )
    add_flag(
        parser,
        "--fast-lane",
        "ZKV_HTTP_FAST_LANE",
        defaults.HTTP_FAST_LANE,
        boolean,
        "event only: answer plain seed /get, /set and /delete on the event loop, without "
        "Bottle (gateway/fastlane.py); off sends every request through the Bottle app",
    )
    add_flag(
        parser,
        "--timeout",
        "ZKV_TIMEOUT",
        defaults.REQUEST_TIMEOUT_S,
        positive_float,
        "seconds to wait for the broker's reply before answering 504",
    )
    add_flag(
        parser,
        "--connect-timeout",
        "ZKV_CONNECT_TIMEOUT",
        defaults.CONNECT_TIMEOUT_S,
        positive_float,
        "seconds to keep trying an unreachable broker before answering 503",
    )
    add_flag(
        parser,
        "--max-key-bytes",
        "ZKV_MAX_KEY_BYTES",
        defaults.MAX_KEY_BYTES,
        bounded_int(1, protocol.MAX_KEY_BYTES),
        "largest key accepted, in UTF-8 bytes",
    )
    add_flag(
        parser,
        "--max-value-bytes",
        "ZKV_MAX_VALUE_BYTES",
        defaults.MAX_VALUE_BYTES,
        bounded_int(1, protocol.MAX_VALUE_BYTES),
        "largest value accepted, in bytes",
    )
    parser.add_argument(
        "--frontend-curve",
        action=argparse.BooleanOptionalAction,
        default=env_default("ZKV_FRONTEND_CURVE", False, boolean, "--frontend-curve", parser.prog),
        help="talk CURVE to a broker started with --frontend-curve (keys from --keys)"
        " (env ZKV_FRONTEND_CURVE, default false)",
    )
    parser.add_argument(
        "--keys",
        default=keys_default(),
        help="with --frontend-curve: the directory holding broker.key, client.key and "
        "client.key_secret (env ZKV_KEYS, default <ZKV_DATA_DIR>/keys)",
    )
    parser.add_argument(
        "--tokens",
        default=env_default("ZKV_HTTP_TOKENS", None),
        metavar="FILE",
        help="a file of 'ROLE TOKEN' lines (roles read, write, admin): every request then needs "
        "'Authorization: Bearer TOKEN' of a role its route allows, else 401 or 403; the file "
        "must be private to its owner (chmod 600) (env ZKV_HTTP_TOKENS, default none: anyone "
        "who can connect may read and write)",
    )
    parser.add_argument(
        "--certfile",
        default=env_default("ZKV_TLS_CERTFILE", None),
        metavar="FILE",
        help="serve HTTPS with this certificate chain (PEM); needs --keyfile "
        "(env ZKV_TLS_CERTFILE, default none: plain HTTP)",
    )
    parser.add_argument(
        "--keyfile",
        default=env_default("ZKV_TLS_KEYFILE", None),
        metavar="FILE",
        help="the private key of --certfile (PEM) (env ZKV_TLS_KEYFILE, default none)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        default=env_default("ZKV_ACCESS_LOG", False, boolean, "--access-log", parser.prog),
        help="log one line per request to stderr (env ZKV_ACCESS_LOG, default off)",
    )
    return parser


class StderrLogger(glogging.Logger):
    """gunicorn's logger with the access log on stderr, where every other line of zkv goes."""

    def setup(self, cfg: Any) -> None:
        """Configure as gunicorn does, then move the access log's stdout handler to stderr."""
        super().setup(cfg)
        for handler in self.access_log.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)


class GatewayServer(BaseApplication):
    """gunicorn, configured from a dict instead of its own command line.

    Args:
        app_factory: builds the WSGI app; called in each worker process after the fork.
        options: gunicorn settings by name.
    """

    def __init__(
        self,
        app_factory: Callable[[], Bottle],
        options: dict[str, Any],
        http_config: ServerConfig | None = None,
        fast_lane: bool = defaults.HTTP_FAST_LANE,
    ) -> None:
        self.app_factory = app_factory
        self.options = options
        self.http_config = http_config  # read by the event worker (gateway/worker.py)
        self.fast_lane = fast_lane
        self._app: Bottle | None = None
        super().__init__()

    def load_config(self) -> None:
        """Apply ``options``; gunicorn validates each one."""
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        """The app of one worker process; under ``gthread``, wrapped to count its requests
        for /metrics (the event worker's server counts them itself)."""
        self._app = self.app_factory()
        stats = None if self.http_config is None else self.http_config.stats
        if self.options.get("worker_class") == WORKER_CLASSES["gthread"] and stats is not None:
            return CountedWsgi(self._app, stats)
        return self._app

    def shortcut(self) -> Shortcut | None:
        """The fast lane of this process's app for the event worker, None when it is off."""
        if not self.fast_lane or self._app is None:
            return None
        return fastlane.for_app(self._app)

    async def close_clients(self) -> None:
        """Close this process's event-loop zkv client, if it made one (the event worker)."""
        if self._app is None:
            return
        for plugin in self._app.plugins:
            if isinstance(plugin, ClientPlugin):
                client = plugin.current()
                if isinstance(client, LoopClient):
                    await client.close()


def slot_hooks(stats: HttpStats) -> dict[str, Any]:
    """gunicorn hooks that give each worker process its own slot of the shared HTTP counts
    (gateway/metrics.py): the master claims one before each fork and frees it when that
    worker exits; the worker counts into it."""

    def pre_fork(server: Any, worker: Any) -> None:
        worker.zkv_slot = stats.claim()

    def post_fork(server: Any, worker: Any) -> None:
        stats.use(worker.zkv_slot)

    def child_exit(server: Any, worker: Any) -> None:
        stats.release(getattr(worker, "zkv_slot", -1))

    return {"pre_fork": pre_fork, "post_fork": post_fork, "child_exit": child_exit}


def gunicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """gunicorn settings for the parsed flags."""
    address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    tls = {"certfile": args.certfile, "keyfile": args.keyfile} if args.certfile else {}
    return {
        **tls,
        "bind": [address],
        "worker_class": WORKER_CLASSES[args.worker_class],
        "workers": args.processes,
        "threads": args.threads,
        "worker_connections": args.max_connections,
        "preload_app": False,  # sockets must be created after the fork, by each process
        "graceful_timeout": GRACEFUL_TIMEOUT_S,
        "limit_request_line": LIMIT_REQUEST_LINE_BYTES,
        "errorlog": "-",  # stderr
        "accesslog": "-" if args.access_log else None,
        "logger_class": StderrLogger,
        "loglevel": "info",
        "proc_name": "zkv-gateway",
        "control_socket_disable": True,  # one fixed path per user: two gateways would collide
    }


def app_factory(
    args: argparse.Namespace,
    tokens: Tokens | None = None,
    http_stats: HttpStats | None = None,
) -> Callable[[], Bottle]:
    """What each worker process calls to build its app; no client is made until a request."""
    client_class = LoopClient if args.worker_class == "event" else Client
    client_factory = functools.partial(
        client_class,
        endpoint=args.frontend,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        keys=args.keys if args.frontend_curve else None,
    )
    try:
        curve = client_curve(args.keys) if args.frontend_curve else None
    except KeysError as exc:
        raise SystemExit(f"argument --keys {args.keys}: {exc}") from None
    watches = Watches(
        events_endpoints(args.events),
        curve,
        threads=args.threads if args.worker_class == "gthread" else None,
    )
    return functools.partial(
        make_app,
        client_factory,
        max_key_bytes=args.max_key_bytes,
        max_value_bytes=args.max_value_bytes,
        tokens=tokens,
        http_stats=http_stats,
        watches=watches,
    )


def loopback_only(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {info[4][0].partition("%")[0] for info in found}
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        return False


def exposure_warning(host: str, tokens: Tokens | None, tls: bool) -> str | None:
    """What to warn about the address the gateway listens on, given its tokens and TLS."""
    if loopback_only(host):
        return None
    if tokens is None:
        return (
            f"listening on {host}, beyond loopback, without tokens: anyone who can reach it "
            "may read and write every key (set --tokens / ZKV_HTTP_TOKENS)"
        )
    if not tls:
        return (
            f"listening on {host}, beyond loopback, without TLS: bearer tokens cross the "
            "network in clear text (set --certfile and --keyfile)"
        )
    return None


def check_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse at start a half-given or unloadable certificate, naming the flag."""
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("arguments --certfile and --keyfile: give both or neither")
    if args.certfile:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.certfile, args.keyfile
            )
        except (OSError, ssl.SSLError) as exc:
            parser.error(
                f"arguments --certfile/--keyfile: cannot load {args.certfile} with "
                f"{args.keyfile}: {exc}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gateway until stopped; the exit status of gunicorn's master."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        parser.error(f"argument --host: cannot listen on {args.host!r}: {exc}")
    tokens: Tokens | None = None
    if args.tokens:
        try:
            tokens = load_tokens(args.tokens)
        except TokensFileError as exc:
            parser.error(f"argument --tokens: {exc}")
    check_tls(parser, args)
    logging.basicConfig(
        level=logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, stream=sys.stderr
    )
    warning = exposure_warning(args.host, tokens, bool(args.certfile))
    if warning is not None:
        log.warning("%s", warning)
    log.info(
        "gateway on %s://%s:%d, broker %s, %d %s process(es)%s, %s",
        "https" if args.certfile else "http",
        args.host,
        args.port,
        args.frontend,
        args.processes,
        args.worker_class,
        f" x {args.threads} thread(s)" if args.worker_class == "gthread" else "",
        f"{len(tokens)} token(s) from {args.tokens}" if tokens else "no tokens: open to all",
    )
    # Made before the fork: every worker process counts into its slot of the same memory.
    http_stats = HttpStats(2 * args.processes)  # see HttpStats.claim
    http_config = ServerConfig(
        max_body_bytes=args.max_value_bytes,
        max_connections_per_client=args.max_connections_per_client,
        evict_after_s=args.evict_after,
        access_log=args.access_log,
        max_set_target_bytes=set_target_limit(args.max_key_bytes, args.max_value_bytes),
        stats=http_stats,
    )
    options = {**gunicorn_options(args), **slot_hooks(http_stats)}
    try:
        GatewayServer(
            app_factory(args, tokens, http_stats), options, http_config, args.fast_lane
        ).run()
    except SystemExit as exc:  # gunicorn's master ends with sys.exit(status)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0
