"""``python -m zkv`` (or ``zkv``): talk to a zkv broker from the shell.

Examples::

    python -m zkv set greeting hello --ttl 10
    python -m zkv get greeting
    python -m zkv del greeting
    python -m zkv all
    python -m zkv ping
    python -m zkv keygen /path/to/keys    # a cluster's CURVE keys, for other hosts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zkv import defaults
from zkv.client import Client, NotFound
from zkv.config import add_flag, endpoints, positive_float
from zkv.errors import ZkvError
from zkv.keys import KeysError, create_keys


def _deadline(deadline_ms: int | None) -> str:
    return "never" if deadline_ms is None else str(deadline_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zkv", description="zkv command-line client")
    add_flag(
        parser,
        "--frontend",
        "ZKV_FRONTEND",
        defaults.FRONTEND,
        endpoints,
        "broker endpoint, or several separated by commas (tried in turn)",
    )
    add_flag(
        parser,
        "--timeout",
        "ZKV_TIMEOUT",
        defaults.REQUEST_TIMEOUT_S,
        positive_float,
        "seconds to wait for a reply",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        default=None,
        help="talk CURVE to a broker started with --frontend-curve, with client.key, "
        "client.key_secret and broker.key from this directory (without it: CURVE only if "
        "ZKV_FRONTEND_CURVE=1, keys from ZKV_KEYS)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    set_ = commands.add_parser("set", help="store a value")
    set_.add_argument("key")
    set_.add_argument("value")
    set_.add_argument("--ttl", type=positive_float, help="seconds until the key expires")
    for name, text in (("get", "print a value"), ("del", "delete a key")):
        commands.add_parser(name, help=text).add_argument("key")
    commands.add_parser(
        "all", help="print every live key as JSON lines, read in pages (not a snapshot)"
    )
    commands.add_parser("ping", help="print the cluster's state")
    keygen = commands.add_parser(
        "keygen", help="write a new cluster key set (CURVE) into DIR, which must not exist"
    )
    keygen.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "keygen":
        try:
            create_keys(args.dir)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(
            f"OK keys in {args.dir}: give the broker the whole directory, each worker host "
            f"broker.key, worker.key and worker.key_secret, each CURVE client host broker.key, "
            f"client.key and client.key_secret (keep the modes: 0700, 0600)"
        )
        return 0

    try:
        client = Client(args.frontend, timeout_s=args.timeout, keys=args.keys)
    except KeysError as exc:
        print(f"error: keys: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            match args.command:
                case "set":
                    deadline = client.set(args.key, args.value, args.ttl)
                    print(f"OK expires_at_ms={_deadline(deadline)}")
                case "get":
                    item = client.get(args.key)
                    sys.stdout.buffer.write(item.value + b"\n")
                case "del":
                    if not client.delete(args.key):
                        print("not found", file=sys.stderr)
                        return 1
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
                case "ping":
                    print(json.dumps(client.ping()))
        except NotFound:
            print("not found", file=sys.stderr)
            return 1
        except ZkvError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0
