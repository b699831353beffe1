"""Flags whose defaults come from the environment: flag > environment variable > default."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from zkv import defaults
from zkv.coordination import check_id
from zkv.etcd import parse_endpoint


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


# Bound there, a socket is reachable from this machine only: a loopback address, the name
# localhost, or the loopback interface (ZeroMQ binds an interface by its name too). Anything
# else (a wildcard, another address or interface, a host name, a multicast transport) counts as
# reachable from other hosts, the safe side of the rule below.
_LOOPBACK_NAMES = frozenset({"localhost", "lo"})
_LOCAL_TRANSPORTS = frozenset({"ipc", "inproc"})  # a path or a name inside this machine
_HOST_TRANSPORTS = frozenset({"tcp", "ws", "wss"})  # HOST:PORT, then a path for ws
_WILDCARDS = frozenset({"*", "0.0.0.0", "::"})


def endpoint_host(text: str) -> str | None:
    """The host of a tcp://, ws:// or wss:// endpoint, IPv6 brackets removed; else None."""
    transport, sep, address = text.partition("://")
    if not sep or transport not in _HOST_TRANSPORTS:
        return None
    host = address.split("/", 1)[0].rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(text: str) -> bool:
    """Whether a socket bound at endpoint ``text`` is reachable from this machine only."""
    transport = text.partition("://")[0]
    if transport in _LOCAL_TRANSPORTS:
        return True
    host = endpoint_host(text)
    if host is None:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def advertise_host(text: str) -> str:
    """argparse type: the address (or host name) other hosts reach this one at, without a
    scheme or port; an IPv6 address with or without brackets."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or "://" in host or any(c.isspace() or c in "/[]" for c in host):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host: write an address, e.g. 10.0.0.1")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a host: write the address alone, without a port"
            ) from None
    if host in _WILDCARDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a wildcard, not an address other hosts can reach: give this host's own"
        )
    return host


def tcp_endpoint(host: str, port: int) -> str:
    """``tcp://host:port``, an IPv6 host in brackets."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def advertised(bound: str, advertise: str) -> str:
    """The endpoint other hosts connect to for a socket bound at ``bound``: a wildcard host
    (``*``, ``0.0.0.0``, ``::``) becomes ``advertise``; any other endpoint is its own."""
    host = endpoint_host(bound)
    if host not in _WILDCARDS:
        return bound
    port = bound.partition("://")[2].split("/", 1)[0].rpartition(":")[2]
    return tcp_endpoint(advertise, int(port))


def bind_refusal(
    what: str, bound: str, source: str, curve: bool, insecure: bool, cure: str
) -> str | None:
    """Why a service must not bind ``bound`` (its ``what``, set by ``source``), or None.

    The rule (issue 11): a socket that other hosts can reach uses CURVE, or the operator says
    ``--insecure``. Without it a plain socket on a non-loopback address would serve anyone who
    can reach the address (a worker joining the backend, a client reading every key) and carry
    every value in clear. ``cure`` names the flag that gives this socket CURVE.
    """
    if curve or insecure or is_loopback(bound):
        return None
    return (
        f"the {what} would bind {bound} ({source}), an address other hosts can reach, without "
        f"CURVE: add {cure}, or --insecure (ZKV_INSECURE=1) to serve it in plain text anyway, "
        f"or bind a loopback address"
    )


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


def bind_endpoint(text: str) -> str:
    """argparse type: an endpoint to bind, as :func:`endpoint` (``tcp://HOST:*`` allowed)."""
    return endpoint(text, bind=True)


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


def add_advertise_flag(parser: argparse.ArgumentParser) -> None:
    """``--advertise``: the address other hosts reach this service at (zkv.defaults.ADVERTISE)."""
    add_flag(
        parser,
        "--advertise",
        "ZKV_ADVERTISE",
        defaults.ADVERTISE,
        advertise_host,
        "the address other hosts reach this host at; what it binds by default (not loopback: "
        "CURVE or --insecure)",
    )


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
        help="no CURVE on the backend: any process that reaches it can join as a worker; "
        "also lets a socket without CURVE bind a non-loopback address "
        "(env ZKV_INSECURE, default false)",
    )


def coordinator_urls(text: str) -> list[str]:
    """argparse/environment type: etcd client URLs, comma-separated (``http://HOST:PORT``);
    empty means no coordinator (single-host mode)."""
    urls = [part.strip() for part in text.split(",") if part.strip()]
    if len(urls) > 16:
        raise argparse.ArgumentTypeError(f"at most 16 etcd endpoints, got {len(urls)}")
    for url in urls:
        try:
            parse_endpoint(url)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return urls


def _identifier(what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            return check_id(text, what)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a {what} of letters, digits and _.:@- (starting with a letter or "
                f"digit, at most 128 characters), got {text!r}"
            ) from None

    check.__name__ = what.replace(" ", "_")
    return check


def _bounded(
    kind: Callable[[str], Any], low: float, high: float, unit: str
) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        if kind is int:
            return whole_number(text, int(low), int(high))
        value = kind(text)  # positive_float: its own readable errors
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}{unit}, got {text}")
        return value

    check.__name__ = kind.__name__
    return check


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of cluster mode (docs/cluster.md), shared by the broker and the workers.

    ``--coordinator`` set (a list of etcd client URLs) puts a service in cluster mode; unset, it
    runs on one host as ever. Every value is checked here, so a typo stops the service at once
    with a message that names the flag (or the environment variable).
    """
    add_flag(
        parser,
        "--coordinator",
        "ZKV_COORDINATOR",
        defaults.COORDINATOR,
        coordinator_urls,
        "etcd client URLs, comma-separated (http://HOST:PORT,...): cluster mode; empty: one host",
    )
    add_flag(
        parser,
        "--cluster-name",
        "ZKV_CLUSTER_NAME",
        defaults.CLUSTER_NAME,
        _identifier("cluster name"),
        "this cluster's name: its keys in etcd live under /zkv/<name>/",
    )
    add_flag(
        parser,
        "--replicas",
        "ZKV_REPLICAS",
        defaults.REPLICAS,
        _bounded(int, 0, defaults.MAX_REPLICAS, ""),
        f"followers per shard in cluster mode (0 to {defaults.MAX_REPLICAS})",
    )
    add_flag(
        parser,
        "--host-id",
        "ZKV_HOST_ID",
        socket.gethostname(),
        _identifier("host id"),
        "this machine's name for placement: two copies of a shard go to different hosts",
    )
    add_flag(
        parser,
        "--lease-ttl",
        "ZKV_LEASE_TTL",
        defaults.LEASE_TTL_S,
        _bounded(int, 1, defaults.MAX_LEASE_TTL_S, " s"),
        "seconds of an etcd lease: how long a dead leader holds its shard",
    )
    add_flag(
        parser,
        "--replica-lag",
        "ZKV_REPLICA_LAG",
        defaults.REPLICA_LAG_S,
        _bounded(positive_float, 0.001, defaults.MAX_REPLICA_LAG_S, " s"),
        "seconds a follower may be silent or behind before it leaves the in-sync set",
    )
