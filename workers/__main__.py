"""``python -m workers``: run one shard worker, or supervise several.

With ``--processes 1`` (the default) this process is the worker. With ``--processes N`` it is a
tiny supervisor in the spirit of gunicorn's arbiter: it starts N worker processes, forwards
SIGTERM and SIGINT to them, restarts any that dies unexpectedly (with exponential backoff, so a
worker that crashes at start does not spin), and exits once all of them have exited after a stop
signal. It does not daemonize: run it under honcho or systemd.

Why children get their own process group: honcho stops a process by signalling its whole group
(``killpg``), and a terminal's Ctrl-C reaches the whole foreground group. If the workers shared
the supervisor's group they would get each stop signal twice, once directly and once forwarded,
and a worker takes a second signal as "exit at once, without DISCONNECT". In their own group
they get exactly the signals the supervisor forwards. So that none outlives a supervisor killed
with SIGKILL, on Linux each child asks the kernel for SIGTERM when its parent dies.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from workers.aof import FsyncPolicy
from workers.cluster import cluster_argv, run_cluster
from workers.events import DISABLED
from workers.idempotency import MAX_WINDOW_S, MIN_MAX_BYTES, MIN_WINDOW_S
from workers.manifest import durable_data
from workers.worker import WorkerConfig, run
from zkv import defaults
from zkv.config import (
    add_advertise_flag,
    add_cluster_flags,
    add_flag,
    add_heartbeat_flags,
    add_security_flags,
    boolean,
    endpoint,
    env_default,
    non_negative_int,
    positive_int,
    program_name,
    whole_number,
)
from zkv.keys import KeysError, wait_for_keys

# Not __name__: run with -m, this module is "__main__", which says nothing in a log line.
log = logging.getLogger("workers.supervisor")

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"

EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration: restarting cannot help (argparse uses 2 as well)

RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
BACKOFF_RESET_AFTER_S = 30.0  # a child that lived this long starts again from the minimum
STOP_GRACE_S = 5.0  # after a stop signal, children still alive this long are killed
SUPERVISOR_TICK_S = 0.05  # how often the supervisor looks at its children and signals

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def fsync_policy(text: str) -> FsyncPolicy:
    """argparse type: one of the fsync policies, by the names Redis uses."""
    try:
        return FsyncPolicy(text.strip().lower())
    except ValueError:
        names = ", ".join(policy.value for policy in FsyncPolicy)
        raise argparse.ArgumentTypeError(f"must be one of {names}, got {text!r}") from None


def idempotency_window(text: str) -> float:
    """argparse type: an idempotency window in seconds, MIN_WINDOW_S to MAX_WINDOW_S (stamps
    are read modulo 194 days, and a longer window would hold a day of writes in memory)."""
    expected = f"must be {MIN_WINDOW_S:.0f} to {MAX_WINDOW_S:.0f} seconds, got {text!r}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(expected) from None
    if not MIN_WINDOW_S <= value <= MAX_WINDOW_S:  # NaN fails too
        raise argparse.ArgumentTypeError(expected)
    return value


def idempotency_max_bytes(text: str) -> int:
    """argparse type: a bound of at least MIN_MAX_BYTES bytes."""
    return whole_number(text, MIN_MAX_BYTES)


def events_backend(text: str) -> str:
    """argparse type: an endpoint to connect to, or ``none`` (no events)."""
    if text.strip().lower() == DISABLED:
        return DISABLED
    return endpoint(text)


def retry_reach_s() -> float:
    """How late a retry can reach a worker with the default timings: the client's timeout
    plus the broker's wait for a shard and for a worker (docs/persistence.md section 6)."""
    return defaults.REQUEST_TIMEOUT_S + defaults.SHARD_WAIT_S + defaults.WORKER_REPLY_TIMEOUT_S


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default comes from an environment variable, then zkv.defaults."""
    parser = argparse.ArgumentParser(
        prog=program_name("workers"),
        description="zkv shard worker: holds one shard's keys, served through the broker.",
    )
    add_flag(
        parser,
        "--backend",
        "ZKV_BACKEND",
        defaults.BACKEND,
        endpoint,
        help="the broker's backend endpoint to connect to",
    )
    add_heartbeat_flags(parser)
    add_flag(
        parser,
        "--processes",
        "ZKV_WORKER_PROCESSES",
        defaults.WORKER_PROCESSES,
        positive_int,
        help="worker processes; above 1 this process supervises them",
    )
    add_flag(
        parser,
        "--data-dir",
        "ZKV_DATA_DIR",
        defaults.DATA_DIR,
        help="directory of the shards' files (created if missing)",
    )
    add_flag(
        parser,
        "--fsync",
        "ZKV_FSYNC",
        defaults.FSYNC,
        fsync_policy,
        help="when writes reach the disk: always (before the reply), everysec, or no",
    )
    add_flag(
        parser,
        "--disk-reserve",
        "ZKV_DISK_RESERVE",
        defaults.DISK_RESERVE_BYTES,
        non_negative_int,
        help="bytes of free disk that writes (SET) leave for deletes and compaction; below "
        "it SETs get NO_SPACE (see docs/persistence.md, section 9)",
    )
    # A switch (no value), so not add_flag; same rule: flag > environment > default.
    parser.add_argument(
        "--in-memory",
        action=argparse.BooleanOptionalAction,
        default=env_default("ZKV_IN_MEMORY", False, boolean, "--in-memory", parser.prog),
        help="a pure cache: no files, no locks, nothing survives a restart "
        "(env ZKV_IN_MEMORY, default false)",
    )
    add_flag(
        parser,
        "--idempotency-window",
        "ZKV_IDEMPOTENCY_WINDOW",
        defaults.IDEMPOTENCY_WINDOW_S,
        idempotency_window,
        help="seconds each shard remembers writes, so that a retry is not applied twice; a "
        "stamped retry older than this gets 'outcome unknown' (1 to 86400)",
    )
    add_flag(
        parser,
        "--idempotency-max-bytes",
        "ZKV_IDEMPOTENCY_MAX_BYTES",
        defaults.IDEMPOTENCY_MAX_BYTES,
        idempotency_max_bytes,
        help="bound of each shard's memory of writes (estimated bytes); past it, new writes "
        "inside the window are answered BUSY",
    )
    add_flag(
        parser,
        "--events-backend",
        "ZKV_EVENTS_BACKEND",
        defaults.EVENTS_BACKEND,
        events_backend,
        help="the broker's events backend, where change events are published (cluster "
        "mode: the brokers' from etcd); 'none' publishes no events",
    )
    add_security_flags(parser)
    add_cluster_flags(parser)
    add_advertise_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m workers``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    data_dir: Path | None = None
    directory = Path(args.data_dir).absolute()
    if args.in_memory:
        # The broker refuses a worker in memory a durable cluster's shard only while it knows a
        # durable worker of that cluster; on a full restart in memory it does not, so refuse here.
        refusal = durable_data(directory)
        if refusal is not None:
            log.error("cannot start: %s", refusal)
            return EXIT_CONFIG
    else:
        data_dir = directory
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--data-dir {args.data_dir}: cannot create it: {exc}")
        if not os.access(data_dir, os.W_OK | os.X_OK):
            parser.error(f"--data-dir {data_dir}: not writable by this user")
    keys = None
    if not args.insecure:
        try:
            # Waits for the broker's keys rather than making its own: see zkv/keys.py.
            keys = wait_for_keys(args.keys)
        except (KeysError, OSError) as exc:
            parser.error(f"--keys {args.keys}: {exc}")
    else:
        log.warning("connecting without CURVE (--insecure)")
    if args.idempotency_window < retry_reach_s():
        log.warning(
            "--idempotency-window %.1f s is shorter than a retry can take with the default "
            "timings (%.0f s: client timeout, shard wait, worker timeout): late retries will "
            "fail as 'outcome unknown'",
            args.idempotency_window,
            retry_reach_s(),
        )
    config = WorkerConfig(
        keys=keys,
        backend=args.backend,
        data_dir=data_dir,
        fsync=args.fsync,
        disk_reserve_bytes=args.disk_reserve,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_liveness=args.heartbeat_liveness,
        idempotency_window_s=args.idempotency_window,
        idempotency_max_bytes=args.idempotency_max_bytes,
        events_backend=None if args.events_backend == DISABLED else args.events_backend,
    )
    if args.processes == 1:
        if args.coordinator:
            return run_cluster(config, args)
        return run(config)
    child_argv = [
        sys.executable,
        "-u",
        "-m",
        "workers",
        "--processes",
        "1",
        "--backend",
        config.backend,
        "--heartbeat-interval",
        repr(config.heartbeat_interval_s),
        "--heartbeat-liveness",
        str(config.heartbeat_liveness),
        "--fsync",
        config.fsync.value,
        "--idempotency-window",
        repr(config.idempotency_window_s),
        "--idempotency-max-bytes",
        str(config.idempotency_max_bytes),
        "--disk-reserve",
        str(config.disk_reserve_bytes),
        "--events-backend",
        args.events_backend,
        *(["--insecure"] if keys is None else ["--no-insecure", "--keys", str(keys.directory)]),
        "--in-memory" if data_dir is None else "--no-in-memory",
        "--data-dir",  # in memory too: a child checks it holds no durable data
        str(directory),
        *cluster_argv(args),
    ]
    return Supervisor(args.processes, child_argv).run()


@dataclass
class Child:
    """One worker slot of the supervisor.

    Attributes:
        slot: 0-based slot number, stable across restarts, for the logs.
        process: the running process, None while waiting to (re)start.
        started_s: monotonic time of the last start.
        restart_s: monotonic time at which to start it again, while process is None.
        backoff_s: the delay before the next restart after an unexpected exit.
    """

    slot: int
    process: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0
    restart_s: float = 0.0
    backoff_s: float = RESTART_BACKOFF_MIN_S


class Supervisor:
    """Keeps ``count`` worker processes running until a stop signal, then stops them.

    Args:
        count: how many workers.
        argv: the command line of one worker.
    """

    def __init__(self, count: int, argv: list[str]) -> None:
        self.argv = argv
        self.children = [Child(slot) for slot in range(count)]
        self._signals: list[int] = []  # received, not yet handled (handlers only append)
        self._stopping = False
        self._kill_at_s = 0.0
        self._exit_code = EXIT_OK

    def run(self) -> int:
        """Supervise until stopped; returns the exit code (0, or 2 if a child refused its
        configuration)."""
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        log.info("supervising %d worker processes", len(self.children))
        try:
            while True:
                now_s = time.monotonic()
                self._handle_signals(now_s)
                self._reap(now_s)
                if self._stopping:
                    if all(child.process is None for child in self.children):
                        log.info("all workers exited")
                        return self._exit_code
                    if now_s >= self._kill_at_s:
                        self._kill_all(f"still running {STOP_GRACE_S:.0f} s after the stop")
                else:
                    for child in self.children:
                        if child.process is None and now_s >= child.restart_s:
                            self._start(child, now_s)
                time.sleep(SUPERVISOR_TICK_S)
        finally:
            self._kill_all("left behind by a supervisor error")  # only after an exception
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: the loop forwards it within SUPERVISOR_TICK_S, which keeps Popen
        # calls (which take locks) out of signal handlers.
        self._signals.append(signum)

    def _handle_signals(self, now_s: float) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if not self._stopping:
                log.info("%s: stopping %d worker processes", name, self._alive())
                self._stop(now_s)
            else:
                log.info("%s again: forwarding, workers exit at once", name)
            for child in self.children:
                if child.process is not None:
                    child.process.send_signal(signum)

    def _stop(self, now_s: float) -> None:
        self._stopping = True
        self._kill_at_s = now_s + STOP_GRACE_S

    def _reap(self, now_s: float) -> None:
        for child in self.children:
            process = child.process
            if process is None:
                continue
            status = process.poll()
            if status is None:
                continue
            child.process = None
            lived_s = now_s - child.started_s
            if self._stopping:
                log.info(
                    "worker %d (pid %d) exited with %s", child.slot, process.pid, _status(status)
                )
                continue
            if status == EXIT_CONFIG:
                log.error(
                    "worker %d (pid %d) exited with status %d (bad configuration): stopping all",
                    child.slot,
                    process.pid,
                    status,
                )
                self._exit_code = EXIT_CONFIG
                self._stop(now_s)
                for other in self.children:
                    if other.process is not None:
                        other.process.send_signal(signal.SIGTERM)
                continue
            if lived_s >= BACKOFF_RESET_AFTER_S:
                child.backoff_s = RESTART_BACKOFF_MIN_S
            child.restart_s = now_s + child.backoff_s
            log.warning(
                "worker %d (pid %d) exited with %s after %.1f s: restarting in %.1f s",
                child.slot,
                process.pid,
                _status(status),
                lived_s,
                child.backoff_s,
            )
            child.backoff_s = min(child.backoff_s * 2, RESTART_BACKOFF_MAX_S)

    def _start(self, child: Child, now_s: float) -> None:
        try:
            child.process = subprocess.Popen(
                self.argv, process_group=0, preexec_fn=_die_with_parent()
            )
        except OSError as exc:
            child.restart_s = now_s + child.backoff_s
            log.error(
                "cannot start worker %d: %s; retrying in %.1f s", child.slot, exc, child.backoff_s
            )
            child.backoff_s = min(child.backoff_s * 2, RESTART_BACKOFF_MAX_S)
            return
        child.started_s = now_s
        log.info("started worker %d (pid %d)", child.slot, child.process.pid)

    def _kill_all(self, reason: str) -> None:
        for child in self.children:
            process = child.process
            if process is None:
                continue
            log.warning("worker %d (pid %d) %s: killing it", child.slot, process.pid, reason)
            process.kill()
            process.wait()
            child.process = None

    def _alive(self) -> int:
        return sum(child.process is not None for child in self.children)


def _status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"status {returncode}"


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send the child SIGTERM when the supervisor dies, or None
    where prctl does not exist. libc is loaded here, in the parent, not between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return set_death_signal


if __name__ == "__main__":
    sys.exit(main())
