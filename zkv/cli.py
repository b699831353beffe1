"""``zkv`` (or ``python -m zkv``): talk to a zkv broker from the shell.

Examples::

    zkv set greeting hello --ttl 10
    zkv set greeting hello --nx  # only if absent (--xx: only if present)
    zkv get greeting
    zkv get greeting --meta      # one JSON line: value, expires_at_ms, version
    zkv delete greeting          # or: zkv del greeting; --if-version N: only that version
    zkv incr visits 5 --ttl 60   # prints the new value
    zkv expire session 30; zkv persist session; zkv ttl session   # ttl: milliseconds left
    zkv lock nightly --ttl 30 --wait 10 -- ./backup.sh   # as flock(1)
    zkv all
    zkv ping
    zkv get greeting --frontend tcp://10.0.0.5:5555
    zkv keygen /path/to/keys     # a cluster's CURVE keys, for other hosts
    zkv watch user:              # change events of keys starting with user:, one JSON line each

As redis-cli and etcdctl, the options go anywhere on the line, before or after the command
(for ``lock``, before the ``--`` that starts the command it runs).
Exit status: 0 done; 1 the answer is no (the key does not exist, a condition of ``set`` or
``delete`` does not hold, the store refused the write as conflicting, e.g. ``incr`` of a value
that is not an integer, ``lock`` did not get the lock in time, ``ping`` finds a shard without a
worker); 2 an error (bad usage, unreachable broker, timeout, a request refused as wrong). ``zkv
lock`` exits with its command's status (see :func:`run_locked`). A closed standard output
(``zkv all | head -1``) ends any command quietly with status 141, as SIGPIPE ends Unix tools
(128 + 13).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from zkv import defaults
from zkv.calls import MAX_I64, MAX_U64, MIN_I64
from zkv.client import Client, NotFound
from zkv.config import endpoints, env_default, positive_float, program_name, whole_number
from zkv.errors import Conflict, LockLost, PreconditionFailed, ZkvError
from zkv.keys import KeysError, create_keys
from zkv.protocol import MAX_LOCK_WAIT_MS
from zkv.watch import Gap

EXIT_OK = 0
EXIT_NO = 1  # the key does not exist, a condition failed, the lock is held, or degraded
EXIT_ERROR = 2  # as argparse's usage errors
EXIT_NOT_RUN = 127  # zkv lock: the command could not be started (as a shell says)
EXIT_PIPE = 128 + signal.SIGPIPE  # stdout closed by its reader (zkv all | head): as SIGPIPE
TTL_COMMANDS = ("set", "incr", "lock")  # the commands that take --ttl


def _deadline(deadline_ms: int | None) -> str:
    return "never" if deadline_ms is None else str(deadline_ms)


def _increment(text: str) -> int:
    """argparse type of ``incr``'s BY: a signed 64-bit integer, in words if not."""
    return whole_number(text, MIN_I64, MAX_I64)


def _version(text: str) -> int:
    """argparse type of ``--if-version``: a version, 0 to 2**64 - 1."""
    return whole_number(text, 0, MAX_U64)


def _wait(text: str) -> float:
    """argparse type of ``--wait``: seconds from 0 to MAX_LOCK_WAIT_MS / 1000."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= MAX_LOCK_WAIT_MS / 1000:  # NaN too
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_LOCK_WAIT_MS // 1000}, got {text!r}"
        )
    return value


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


def build_parser(
    prog: str | None = None, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """The command line: a command (set, get, delete, incr, expire, persist, ttl, lock, all,
    ping, keygen) and options anywhere."""
    prog = prog or program_name("zkv")
    parser = parser_class(
        prog=prog,
        description="zkv command-line client: read and write keys through a zkv broker.",
        epilog="Options may come before or after the command. Exit status: 0 done, 1 no "
        "(no such key, a condition that does not hold, a write refused as conflicting, a lock "
        "held; for ping, a shard without a worker), 2 error, 141 standard output closed.",
    )
    values = {
        "frontend": env_default("ZKV_FRONTEND", defaults.FRONTEND, endpoints, "--frontend", prog),
        "timeout": env_default(
            "ZKV_TIMEOUT", defaults.REQUEST_TIMEOUT_S, positive_float, "--timeout", prog
        ),
        "keys": None,
    }
    _add_connection_options(parser, values)
    ttl_help = (
        "seconds until the key expires, e.g. 10 or 0.25 (default: never; incr: keep the "
        "deadline); lock: how long the lock is held before it frees itself (required); set, "
        "incr and lock only"
    )
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
    condition = set_.add_mutually_exclusive_group()
    condition.add_argument(
        "--nx",
        action="store_true",
        help="only if the key does not exist (exit status 1 if it does)",
    )
    condition.add_argument(
        "--xx", action="store_true", help="only if the key exists (exit status 1 if not)"
    )
    condition.add_argument(
        "--if-version",
        type=_version,
        metavar="VERSION",
        help="only if the key exists with this version (get --meta shows it; exit status 1 if not)",
    )
    get = command("get", "print a key's value")
    get.add_argument("key", help="the key to read")
    get.add_argument(
        "--meta",
        action="store_true",
        help="print one JSON line with the value, expires_at_ms and version instead",
    )
    delete = command("delete", "delete a key", aliases=("del",))
    delete.add_argument("key", help="the key to delete")
    delete.add_argument(
        "--if-version",
        type=_version,
        metavar="VERSION",
        help="only if the key has this version (get --meta shows it; exit status 1 if not)",
    )
    incr = command(
        "incr",
        "add BY (default 1, may be negative) to a key's integer value and print the result; "
        "an absent key counts as 0",
    )
    incr.add_argument("key", help="the counter's key")
    incr.add_argument(
        "by", type=_increment, nargs="?", default=1, metavar="BY", help="the increment (64-bit)"
    )
    incr.add_argument(
        "--ttl", type=positive_float, metavar="SECONDS", default=argparse.SUPPRESS, help=ttl_help
    )
    expire = command("expire", "give a key a new deadline SECONDS from now and print it")
    expire.add_argument("key", help="the key")
    expire.add_argument("seconds", type=positive_float, metavar="SECONDS", help="the new TTL")
    command("persist", "remove a key's deadline").add_argument("key", help="the key")
    command(
        "ttl", "print the milliseconds a key has left, or 'never' if it has no deadline"
    ).add_argument("key", help="the key")
    lock = command(
        "lock",  # usage: zkv lock NAME --ttl S [--wait S] -- COMMAND... (split off in main)
        "run COMMAND while holding lock NAME, as flock(1): the lock is refreshed in the "
        "background, released when COMMAND ends, and its token is in COMMAND's environment "
        "as ZKV_LOCK_TOKEN; exit status: COMMAND's (1 if the lock was not taken in time)",
    )
    lock.usage = (
        f"{lock.prog} NAME --ttl SECONDS [--wait SECONDS] [--frontend ENDPOINT] "
        "[--timeout SECONDS] [--keys DIR] -- COMMAND [ARG ...]"
    )
    lock.add_argument("name", help="the lock's name")
    lock.add_argument(
        "--ttl", type=positive_float, metavar="SECONDS", default=argparse.SUPPRESS, help=ttl_help
    )
    lock.add_argument(
        "--wait",
        type=_wait,
        default=0.0,
        metavar="SECONDS",
        help=f"wait up to SECONDS for the lock, in line (default 0; at most "
        f"{MAX_LOCK_WAIT_MS // 1000})",
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
    missed (zkv/watch.py); ends after ``idle_s`` without an event, or at Ctrl-C. Warns on
    stderr when it ends having had neither an event nor a connection (nothing listens)."""
    printed = False
    try:
        with client.watch(prefix, events, timeout_s=idle_s) as watching:
            for item in watching:
                printed = True
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
            if not printed and not watching.connected:
                print(
                    f"zkv watch: warning: no connection to {events} within {idle_s} s"
                    " (is the broker's events endpoint there?)",
                    file=sys.stderr,
                )
    except KeyboardInterrupt:
        pass


class _NotParsed(Exception):
    """The probe parser of :func:`_split_lock` refused the line."""


class _ProbeParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _NotParsed(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _NotParsed(message or "")


def _split_lock(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``(options and arguments, command)`` of a ``zkv lock ... -- COMMAND ...`` line: what
    follows the first ``--`` is the command to run, untouched (its own options too); None
    for any other line (where ``--`` keeps argparse's meaning: what follows is positional)."""
    if "--" not in argv:
        return argv, None
    cut = argv.index("--")
    try:
        head = build_parser(parser_class=_ProbeParser).parse_args(argv[:cut])
    except _NotParsed:
        return argv, None
    if head.command != "lock":
        return argv, None
    return argv[:cut], argv[cut + 1 :]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``zkv`` and ``python -m zkv``; returns the exit status.

    A reader that closes zkv's standard output early (``zkv all | head -1``, ``zkv watch |
    head``) ends the command quietly with EXIT_PIPE, the status a shell shows for a tool that
    SIGPIPE ended, rather than with a BrokenPipeError traceback."""
    try:
        try:
            return _main(argv)
        finally:  # --help's SystemExit too: a closed pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        # Python would flush stdout again at exit and print "Exception ignored ...": point
        # the descriptor at /dev/null first (the recipe of Python's signal module docs).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
            pass
        return EXIT_PIPE


def _main(argv: list[str] | None) -> int:
    """:func:`main`, with a closed standard output raising BrokenPipeError."""
    parser = build_parser()
    argv, command_line = _split_lock(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    if args.ttl is not None and args.command not in TTL_COMMANDS:
        parser.error(
            f"argument --ttl: only set, incr and lock take a time to live, not {args.command}"
        )
    if args.command == "lock":
        if args.ttl is None:
            parser.error("argument --ttl: lock needs a time to live (--ttl SECONDS)")
        if not command_line:
            parser.error("lock needs a command to run, after --: zkv lock NAME --ttl S -- CMD")
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
                    deadline = client.set(
                        args.key,
                        args.value,
                        args.ttl,
                        nx=args.nx,
                        xx=args.xx,
                        if_version=args.if_version,
                    )
                    print(f"OK expires_at_ms={_deadline(deadline)}")
                case "get":
                    item = client.get(args.key)
                    if args.meta:
                        line = {
                            "key": args.key,
                            "value": item.value.decode(errors="replace"),
                            "expires_at_ms": item.deadline_ms,
                            "version": item.version,
                        }
                        print(json.dumps(line))
                    else:
                        sys.stdout.buffer.write(item.value + b"\n")
                case "incr":
                    print(client.incr(args.key, args.by, args.ttl))
                case "expire":
                    print(f"OK expires_at_ms={client.expire(args.key, args.seconds)}")
                case "persist":
                    client.persist(args.key)
                    print("OK")
                case "ttl":
                    print(_deadline(client.ttl_ms(args.key)))
                case "lock":
                    assert command_line is not None  # checked above
                    return run_locked(client, args.name, args.ttl, args.wait, command_line)
                case "delete" | "del":
                    if not client.delete(args.key, if_version=args.if_version):
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
        except PreconditionFailed as exc:
            done = "deleted" if args.command in ("delete", "del") else "written"
            print(f"not {done}: {exc}", file=sys.stderr)
            return EXIT_NO
        except Conflict as exc:  # e.g. incr of a non-integer: refused as set --nx is, exit 1
            print(f"refused: {exc}", file=sys.stderr)
            return EXIT_NO
        except ZkvError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_OK


def run_locked(client: Client, name: str, ttl_s: float, wait_s: float, command: list[str]) -> int:
    """``zkv lock``: run ``command`` while holding lock ``name``, as flock(1) does.

    The lock is taken (waiting up to ``wait_s`` in line), refreshed every ``ttl_s / 3`` by a
    background thread, and released when the command ends. The command gets
    ``ZKV_LOCK_NAME`` and ``ZKV_LOCK_TOKEN`` (the fencing token, for its own fenced writes) in
    its environment. SIGTERM, SIGINT and SIGHUP sent to zkv are passed on to the command; zkv
    waits for it and then releases the lock.

    Returns:
        The command's exit status (128 + N if signal N ended it); 1 if the lock was still
        held by another when the wait ran out; 127 if the command could not be started; 2
        if the lock was lost while the command ran (refresh refused or failed until the hold
        expired) and the command itself exited 0.
    """
    try:
        held = client.lock(name, ttl_s=ttl_s, wait_s=wait_s, refresh=True)
        lock = held.__enter__()
    except Conflict as exc:
        print(f"lock {name!r} is held by another: {exc}", file=sys.stderr)
        return EXIT_NO
    status = EXIT_ERROR
    # The refresh thread logs the loss (zkv.client) and the release below raises it again,
    # which this function prints: one line, not two.
    client_log = logging.getLogger("zkv.client")
    client_log.addFilter(_not_lock_lost)
    try:
        env = dict(os.environ, ZKV_LOCK_NAME=name, ZKV_LOCK_TOKEN=str(lock.token))
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            print(f"error: cannot run {command[0]!r}: {exc}", file=sys.stderr)
            status = EXIT_NOT_RUN
        else:
            status = _wait_passing_signals(child)
    finally:
        try:
            held.__exit__(None, None, None)
        except LockLost as exc:
            print(f"error: {exc}", file=sys.stderr)
            if status == EXIT_OK:
                status = EXIT_ERROR
        except ZkvError as exc:  # the release failed: the lock frees itself at its TTL
            print(
                f"warning: releasing the lock failed ({exc}); it expires by itself", file=sys.stderr
            )
        finally:
            client_log.removeFilter(_not_lock_lost)
    return status


def _not_lock_lost(record: logging.LogRecord) -> bool:
    """Log filter of :func:`run_locked`: drops the refresh thread's report of a lost lock
    (run_locked prints it itself when the lock is released)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not any(isinstance(arg, LockLost) for arg in args)


PASSED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _wait_passing_signals(child: subprocess.Popen[bytes]) -> int:
    """Wait for ``child``, passing it the signals zkv gets meanwhile (then zkv can release
    the lock after it ends, instead of dying with the lock held); its exit status, 128 + N
    if signal N ended it."""

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {number: signal.signal(number, forward) for number in PASSED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 128 - code if code < 0 else code
