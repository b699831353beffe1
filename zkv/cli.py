"""``zkv`` (or ``python -m zkv``): talk to a zkv broker from the shell.

Examples::

    zkv set greeting hello --ttl 10
    zkv get greeting
    zkv delete greeting          # or: zkv del greeting
    zkv all
    zkv ping
    zkv get greeting --frontend tcp://10.0.0.5:5555
    zkv keygen /path/to/keys     # a cluster's CURVE keys, for other hosts
    zkv watch user:              # change events of keys starting with user:, one JSON line each

As redis-cli and etcdctl, the options go anywhere on the line, before or after the command.
Exit status: 0 done; 1 the answer is no (the key does not exist, ``ping`` finds a shard
without a worker); 2 an error (bad usage, unreachable broker, timeout, refused request).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from zkv import defaults
from zkv.client import Client, NotFound
from zkv.config import endpoints, env_default, positive_float, program_name
from zkv.errors import ZkvError
from zkv.keys import KeysError, create_keys
from zkv.watch import Gap

EXIT_OK = 0
EXIT_NO = 1  # the key does not exist, or the cluster is degraded
EXIT_ERROR = 2  # as argparse's usage errors


def _deadline(deadline_ms: int | None) -> str:
    return "never" if deadline_ms is None else str(deadline_ms)


def _add_connection_options(parser: argparse.ArgumentParser, values: dict[str, Any] | None) -> None:
    """The options that say how to reach the broker, on the main parser (with their defaults)
    and again on every command's (``values`` None: defaults suppressed, so an option given
    after the command overrides the main parser's value and an absent one leaves it)."""

    def default(name: str) -> Any:
        return argparse.SUPPRESS if values is None else values[name]

    parser.add_argument(
        "--frontend",
        type=endpoints,
        default=default("frontend"),
        metavar="ENDPOINT",
        help="the broker's frontend, tcp://HOST:PORT, or several brokers separated by commas "
        f"(tried in turn) (env ZKV_FRONTEND, default {defaults.FRONTEND})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=default("timeout"),
        metavar="SECONDS",
        help="the most a command may take, retries included "
        f"(env ZKV_TIMEOUT, default {defaults.REQUEST_TIMEOUT_S})",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        default=default("keys"),
        metavar="DIR",
        help="talk CURVE to a broker started with --frontend-curve, with client.key, "
        "client.key_secret and broker.key from DIR (without it: CURVE only if "
        "ZKV_FRONTEND_CURVE=1, keys from ZKV_KEYS)",
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line: a command (set, get, delete, all, ping, keygen) and options anywhere."""
    prog = prog or program_name("zkv")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="zkv command-line client: read and write keys through a zkv broker.",
        epilog="Options may come before or after the command. Exit status: 0 done, 1 no "
        "such key (or, for ping, a shard without a worker), 2 error.",
    )
    values = {
        "frontend": env_default("ZKV_FRONTEND", defaults.FRONTEND, endpoints, "--frontend", prog),
        "timeout": env_default(
            "ZKV_TIMEOUT", defaults.REQUEST_TIMEOUT_S, positive_float, "--timeout", prog
        ),
        "keys": None,
    }
    _add_connection_options(parser, values)
    ttl_help = "seconds until the key expires, e.g. 10 or 0.25 (default: never); set only"
    parser.add_argument("--ttl", type=positive_float, metavar="SECONDS", help=ttl_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, aliases=list(aliases))
        _add_connection_options(sub, None)
        return sub

    set_ = command("set", "store a value under a key, replacing the one it had")
    set_.add_argument("key", help="the key (text, stored as UTF-8)")
    set_.add_argument("value", help="the value (text, stored as UTF-8)")
    # As the connection options, --ttl may come before the command too (the main parser's
    # value stands unless it is given again after the command).
    set_.add_argument(
        "--ttl", type=positive_float, metavar="SECONDS", default=argparse.SUPPRESS, help=ttl_help
    )
    command("get", "print a key's value").add_argument("key", help="the key to read")
    command("delete", "delete a key", aliases=("del",)).add_argument(
        "key", help="the key to delete"
    )
    command("all", "print every live key as JSON lines, read in pages (not a snapshot)")
    command("ping", "print the cluster's state as JSON; exit status 1 if a shard has no worker")
    watch = command("watch", "print change events of keys starting with PREFIX, one JSON line each")
    watch.add_argument("prefix", nargs="?", default="", help="the key prefix (default: all keys)")
    watch.add_argument(
        "--events",
        type=endpoints,
        default=env_default("ZKV_EVENTS", defaults.EVENTS, endpoints, "--events", prog),
        metavar="ENDPOINT",
        help=f"the broker's events endpoint(s) (env ZKV_EVENTS, default {defaults.EVENTS})",
    )
    watch.add_argument(
        "--idle",
        type=positive_float,
        metavar="SECONDS",
        help="exit after this long without an event (default: watch until interrupted)",
    )
    keygen = command("keygen", "write a new cluster key set (CURVE) into DIR, which must not exist")
    keygen.add_argument("dir", type=Path, metavar="DIR", help="the directory to create")
    return parser


def _watch(client: Client, prefix: str, events: str, idle_s: float | None) -> None:
    """``zkv watch``: one JSON line per event, a ``{"gap": ...}`` line where events were
    missed (zkv/watch.py); ends after ``idle_s`` without an event, or at Ctrl-C."""
    try:
        with client.watch(prefix, events, timeout_s=idle_s) as watching:
            for item in watching:
                if isinstance(item, Gap):
                    line: dict[str, Any] = {
                        "gap": {"shard": item.shard, "missed": item.missed, "seq": item.got}
                    }
                else:
                    line = {
                        "event": item.event.name.lower(),
                        "key": item.key.decode("utf-8", errors="surrogateescape"),
                        "shard": item.shard,
                        "seq": item.seq,
                        "version": item.version,
                        "expires_at_ms": item.deadline_ms or None,
                    }
                print(json.dumps(line), flush=True)
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zkv`` and ``python -m zkv``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ttl is not None and args.command != "set":
        parser.error(f"argument --ttl: only set takes a time to live, not {args.command}")
    if args.command == "keygen":
        try:
            create_keys(args.dir)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        print(
            f"OK keys in {args.dir}: give the broker the whole directory, each worker host "
            f"broker.key, worker.key and worker.key_secret, each CURVE client host broker.key, "
            f"client.key and client.key_secret (keep the modes: 0700, 0600)"
        )
        return EXIT_OK

    try:
        client = Client(args.frontend, timeout_s=args.timeout, keys=args.keys)
    except KeysError as exc:
        print(f"error: keys: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with client:
        try:
            match args.command:
                case "set":
                    deadline = client.set(args.key, args.value, args.ttl)
                    print(f"OK expires_at_ms={_deadline(deadline)}")
                case "get":
                    item = client.get(args.key)
                    sys.stdout.buffer.write(item.value + b"\n")
                case "delete" | "del":
                    if not client.delete(args.key):
                        print("not found", file=sys.stderr)
                        return EXIT_NO
                    print("OK")
                case "all":
                    # Page by page (Client.pages), printed as it comes: bounded memory for any
                    # store, and not a snapshot (keys written meanwhile may or may not show).
                    for page in client.pages():
                        for entry in page:
                            line = {
                                "key": entry.key.decode(errors="replace"),
                                "value": entry.value.decode(errors="replace"),
                                "expires_at_ms": entry.deadline_ms,
                            }
                            print(json.dumps(line))
                case "watch":
                    _watch(client, args.prefix, args.events, args.idle)
                case "ping":
                    info = client.ping()
                    print(json.dumps(info))
                    if info.get("status") != "ok":
                        return EXIT_NO
        except NotFound:
            print("not found", file=sys.stderr)
            return EXIT_NO
        except ZkvError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_OK
