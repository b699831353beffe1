"""Flags whose defaults come from the environment: flag > environment variable > default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from zkv import defaults


def env_default(name: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    """The value of environment variable ``name`` converted by ``kind``, else ``default``.

    Raises:
        SystemExit: with a message naming the variable, when its value cannot be converted.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise SystemExit(f"error: environment variable {name}={raw!r}: {exc}") from None


_TRANSPORTS = ("tcp", "ipc", "inproc", "ws", "wss", "pgm", "epgm", "tipc", "vmci")


def endpoint(text: str) -> str:
    """argparse type: an endpoint ZeroMQ accepts for connect, e.g. ``tcp://127.0.0.1:5556``.

    Checked by its form (transport, then a host and port for tcp), so that a typo fails at
    startup with a clear message rather than later, or in a child restarted forever. Not by
    connecting a throwaway socket, as before: that reached the broker, whose CURVE backend
    logged a refused handshake for every worker that started.
    """
    transport, sep, address = text.partition("://")
    if not sep or transport not in _TRANSPORTS or not address:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ZeroMQ endpoint: write tcp://HOST:PORT (or ipc://PATH, "
            "inproc://NAME)"
        )
    if transport == "tcp":
        host, colon, port = address.rpartition(":")
        if not colon or not host:
            raise argparse.ArgumentTypeError(f"{text!r} is not a ZeroMQ endpoint: no HOST:PORT")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r} needs a port between 1 and 65535")
    return text


MAX_FRONTENDS = 64  # brokers one client or gateway may be given in a list (--frontend a,b,...)


def endpoint_list(text: str) -> list[str]:
    """The endpoints of a comma-separated list (``tcp://a:5555,tcp://b:5555``), each checked
    by :func:`endpoint`; spaces around an entry are ignored. One entry is a list of one.

    Raises:
        argparse.ArgumentTypeError: an entry is empty, malformed or listed twice, or there are
            more than MAX_FRONTENDS; the message names the entry.
    """
    entries = [entry.strip() for entry in text.split(",")]
    if len(entries) > MAX_FRONTENDS:
        raise argparse.ArgumentTypeError(
            f"{len(entries)} endpoints listed, at most {MAX_FRONTENDS} are allowed"
        )
    seen: set[str] = set()
    for number, entry in enumerate(entries, 1):
        where = f"entry {number} of {text!r}"
        if not entry:
            raise argparse.ArgumentTypeError(f"{where} is empty (a stray comma?)")
        try:
            endpoint(entry)
        except argparse.ArgumentTypeError as exc:
            if len(entries) == 1:
                raise
            raise argparse.ArgumentTypeError(f"{where}: {exc}") from None
        if entry in seen:
            raise argparse.ArgumentTypeError(f"{where}: {entry!r} is listed twice")
        seen.add(entry)
    return entries


def endpoints(text: str) -> str:
    """argparse type: one endpoint, or several separated by commas (a client's or a gateway's
    brokers, tried in turn: zkv/calls.py), each checked by :func:`endpoint_list`; returns the
    list joined again with commas, without spaces."""
    return ",".join(endpoint_list(text))


def boolean(text: str) -> bool:
    """argparse/environment type: a yes/no value (1/0, true/false, yes/no, on/off)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be one of 1/0, true/false, yes/no, on/off: {text!r}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: Any,
    kind: Callable[[str], Any] = str,
    help: str = "",
) -> None:
    """Add ``flag`` whose default is ``$env`` if set, else ``default``; the help says both."""
    parser.add_argument(
        flag,
        type=kind,
        default=env_default(env, default, kind),
        help=f"{help} (env {env}, default {default})",
    )


def add_heartbeat_flags(parser: argparse.ArgumentParser) -> None:
    """The heartbeat flags, shared by the broker and the workers so both sides agree."""
    add_flag(
        parser,
        "--heartbeat-interval",
        "ZKV_HEARTBEAT_INTERVAL",
        defaults.HEARTBEAT_INTERVAL_S,
        positive_float,
        "seconds between heartbeats",
    )
    add_flag(
        parser,
        "--heartbeat-liveness",
        "ZKV_HEARTBEAT_LIVENESS",
        defaults.HEARTBEAT_LIVENESS,
        positive_int,
        "heartbeat intervals of silence before a peer counts as dead",
    )


def keys_default() -> str:
    """Where every service looks for the cluster's keys unless told: ``$ZKV_KEYS``, else
    ``keys`` inside ``$ZKV_DATA_DIR`` (so a cluster with its own data directory, as the tests
    and the benchmark start, has its own keys), else ``./data/keys``."""
    data_dir = os.environ.get("ZKV_DATA_DIR") or defaults.DATA_DIR
    return os.environ.get("ZKV_KEYS") or os.path.join(data_dir, defaults.KEYS_SUBDIR)


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    """``--keys`` and ``--insecure``, shared by the broker and the workers (zkv/keys.py)."""
    parser.add_argument(
        "--keys",
        default=keys_default(),
        help="directory of the cluster's CURVE keys, created by the broker's first start "
        "(env ZKV_KEYS, default <ZKV_DATA_DIR>/keys)",
    )
    parser.add_argument(
        "--insecure",
        action=argparse.BooleanOptionalAction,
        default=env_default("ZKV_INSECURE", False, boolean),
        help="no CURVE on the backend: any local process can join as a worker "
        "(env ZKV_INSECURE, default false)",
    )
