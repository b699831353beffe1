"""Flags whose defaults come from the environment: flag > environment variable > default."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from zkv import defaults


def program_name(module: str) -> str:
    """The name a service's usage and error lines give it: the console script's own name
    (``zkv``, ``zkv-broker``, ...) when started as one, else ``python -m <module>``.

    argparse's default is the basename of ``sys.argv[0]``, which under ``-m`` is
    ``__main__.py``: a name nobody can type.
    """
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name == "-c":
        return f"python -m {module}"
    return name


def env_default(
    name: str,
    default: Any,
    kind: Callable[[str], Any] = str,
    flag: str | None = None,
    prog: str | None = None,
) -> Any:
    """The value of environment variable ``name`` converted by ``kind``, else ``default``.

    Args:
        flag: the command-line flag this variable is the default of, named in the error.
        prog: the program, named in the error as argparse does.

    Raises:
        SystemExit: status 2 (as argparse's errors), after a message naming the variable, its
            flag and what it expects, when its value cannot be converted.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        where = f"{prog}: error: " if prog else "error: "
        of_flag = f" (the default of {flag})" if flag else ""
        print(f"{where}environment variable {name}={raw!r}{of_flag}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


_TRANSPORTS = ("tcp", "ipc", "inproc", "ws", "wss", "pgm", "epgm", "tipc", "vmci")


def endpoint(text: str, bind: bool = False) -> str:
    """argparse type: an endpoint ZeroMQ accepts for connect, e.g. ``tcp://127.0.0.1:5556``.

    Checked by its form (transport, then a host and port for tcp), so that a typo fails at
    startup with a clear message rather than later, or in a child restarted forever. Not by
    connecting a throwaway socket, as before: that reached the broker, whose CURVE backend
    logged a refused handshake for every worker that started.

    Args:
        bind: the endpoint is bound, where ZeroMQ also takes ``*`` for any port.
    """
    transport, sep, address = text.partition("://")
    if not sep:
        host, colon, port = text.rpartition(":")
        if colon and host and port.isdigit():  # HOST:PORT, the usual slip: say what to write
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a ZeroMQ endpoint: write tcp://{text}"
            )
    if not sep or transport not in _TRANSPORTS or not address:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ZeroMQ endpoint: write tcp://HOST:PORT (or ipc://PATH, "
            "inproc://NAME)"
        )
    if transport == "tcp":
        host, colon, port = address.rpartition(":")
        if not colon or not host:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a ZeroMQ endpoint: no HOST:PORT (write tcp://HOST:PORT)"
            )
        if bind and port == "*":
            return text
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r} needs a port between 1 and 65535")
    return text


def bind_endpoint(text: str) -> str:
    """argparse type: an endpoint to bind, as :func:`endpoint` (``tcp://HOST:*`` allowed)."""
    return endpoint(text, bind=True)


def endpoints(text: str) -> str:
    """argparse type: one endpoint, or several separated by commas (brokers to try in turn);
    each is checked as :func:`endpoint`. Returns the text as given."""
    for part in text.split(","):
        endpoint(part.strip())
    return text


def boolean(text: str) -> bool:
    """argparse/environment type: a yes/no value (1/0, true/false, yes/no, on/off)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be one of 1/0, true/false, yes/no, on/off: {text!r}")


# The number types below raise ArgumentTypeError with a sentence: argparse prints a bare
# ValueError as "invalid positive_int value: 'abc'", and env_default would print Python's
# "invalid literal for int() with base 10".


def whole_number(text: str, low: int, high: int | None = None) -> int:
    """``text`` as an integer from ``low`` to ``high`` (None: no upper bound).

    Raises:
        argparse.ArgumentTypeError: saying what is expected and what was given.
    """
    expected = (
        f"a whole number of at least {low}"
        if high is None
        else (f"a whole number from {low} to {high}")
    )
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return whole_number(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0, in any form Python's float reads (``0.5``, ``1e3``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text!r}")
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
        default=env_default(env, default, kind, flag=flag, prog=parser.prog),
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
        default=env_default("ZKV_INSECURE", False, boolean, "--insecure", parser.prog),
        help="no CURVE on the backend: any local process can join as a worker "
        "(env ZKV_INSECURE, default false)",
    )
