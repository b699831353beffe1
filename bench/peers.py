"""The peers: Redis (loaded with redis-benchmark) and webdis (Redis over HTTP).

Each is started by the benchmark on a free loopback port, as a child in its own session that
``stop()`` terminates, waits for and, if need be, kills; never as a daemon, never persisting
anything (``--save '' --appendonly no``). Missing binaries are reported, not fatal: see
:func:`missing`.

redis-benchmark has no duration flag, only a request count (``-n``): the runner sizes ``-n`` from
a rough rate for each shape so that a run takes about the scenario's duration, and a timeout
bounds it in time whatever happens. Its ``--csv`` output gives requests per second, p50 and p99,
not p99.9 (the table shows "-" there).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.stats import LoadResult

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
RESP_TIMEOUT_S = 10.0
REDIS_KEYS = 10_000  # -r for 16-byte values: redis-benchmark's keys are key:000000000000..9999
REDIS_LARGE_KEYS = 256  # -r for 64 KiB values
EXTRA_WAIT_S = 60.0  # a redis-benchmark run may take this much longer than planned
# Rough requests per second per shape on a small machine: only used to size -n.
RATE_GUESS = {
    (False, False): 40_000,  # one client, no pipelining
    (True, False): 60_000,  # many clients
    (False, True): 200_000,  # one client, pipelined
    (True, True): 150_000,  # many clients, pipelined
}
LARGE_RATE_DIVISOR = 8  # 64 KiB values go this many times slower (memory copies)
INSTALL = {
    "redis-server": "redis-server",
    "redis-benchmark": "redis-server",
    "webdis": "webdis",
    "wrk": "wrk",
}


def missing(*binaries: str) -> str | None:
    """A "skipped: ..." reason if any binary is not installed, else None."""
    for binary in binaries:
        if shutil.which(binary) is None:
            package = INSTALL.get(binary, binary)
            return f"skipped: {binary} not installed (apt-get install {package})"
    return None


def tool_version(command: list[str]) -> str | None:
    """The first line a ``--version``-like command prints, or None if it fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


class Child:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, command: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                # Anything it writes by a relative path lands beside its log, unless told.
                cwd=cwd or log_path.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=STOP_TIMEOUT_S)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


# --- RESP, just enough to check and fill a Redis ----------------------------------------------


def resp_command(*parts: bytes) -> bytes:
    """One command in the Redis serialization protocol."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def redis_set_many(port: int, keys: list[bytes], value: bytes) -> None:
    """SET every key to ``value``, pipelined on one connection.

    Raises:
        RuntimeError: Redis answered something else than +OK.
    """
    payload = b"".join(resp_command(b"SET", key, value) for key in keys)
    expected = b"+OK\r\n" * len(keys)
    with socket.create_connection(("127.0.0.1", port), timeout=RESP_TIMEOUT_S) as conn:
        conn.sendall(payload)
        received = b""
        while len(received) < len(expected):
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
    if received != expected:
        raise RuntimeError(f"redis SET answered {received[:200]!r}")


def redis_ping(port: int) -> bool:
    """True once Redis answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.sendall(resp_command(b"PING"))
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait(check: Callable[[], bool], what: str, child: Child) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{what} exited at start:\n{child.log_tail()}")
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S} s:\n{child.log_tail()}")


# --- Redis -----------------------------------------------------------------------------------


class RedisServer:
    """redis-server on a free loopback port, persisting nothing."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.child = Child(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(workdir),
            ],
            workdir / f"redis-{port}.log",
        )
        try:
            _wait(lambda: redis_ping(port), "redis-server", self.child)
        except BaseException:
            self.child.stop()
            raise

    def stop(self) -> None:
        self.child.stop()


def benchmark_keys(value_bytes: int) -> int:
    """The -r of a redis-benchmark run with values of this size."""
    return REDIS_LARGE_KEYS if value_bytes > 1024 else REDIS_KEYS


def redis_benchmark_requests(
    clients: int, pipeline: int, value_bytes: int, seconds: float, rate: float | None = None
) -> int:
    """The -n that should keep redis-benchmark busy for about ``seconds``, at ``rate``
    requests per second if known (a previous run's), else at the shape's RATE_GUESS."""
    if rate is None:
        rate = RATE_GUESS[(clients > 1, pipeline > 1)]
        if value_bytes > 1024:
            rate //= LARGE_RATE_DIVISOR
    return max(clients * pipeline * 10, int(rate * seconds))


def redis_benchmark_command(
    port: int, op: str, clients: int, pipeline: int, value_bytes: int, requests: int
) -> list[str]:
    """The redis-benchmark command line of one scenario."""
    command = [
        "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-c",
        str(clients),
        "-n",
        str(requests),
        "-r",
        str(benchmark_keys(value_bytes)),
        "-d",
        str(value_bytes),
        "-t",
        op,
        "--csv",
    ]
    if pipeline > 1:
        command += ["-P", str(pipeline)]
    return command


def parse_redis_csv(text: str) -> dict[str, dict[str, float]]:
    """redis-benchmark ``--csv`` output as {test name: {column: number}}.

    Raises:
        ValueError: no header line, or a row that is not numbers.
    """
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise ValueError(f"not redis-benchmark CSV output: {text[:300]!r}")
    header = rows[0]
    return {row[0]: {header[i]: float(row[i]) for i in range(1, len(header))} for row in rows[1:]}


def run_redis_benchmark(
    port: int,
    op: str,
    clients: int,
    pipeline: int,
    value_bytes: int,
    seconds: float,
    rate: float | None = None,
) -> LoadResult:
    """One redis-benchmark run of one command; GETs find their keys (preloaded first).

    ``rate``: the requests per second to size -n with (see :func:`redis_benchmark_requests`).
    """
    if op == "get":
        keys = [b"key:%012d" % i for i in range(benchmark_keys(value_bytes))]
        redis_set_many(port, keys, b"v" * value_bytes)
    requests = redis_benchmark_requests(clients, pipeline, value_bytes, seconds, rate)
    command = redis_benchmark_command(port, op, clients, pipeline, value_bytes, requests)
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + EXTRA_WAIT_S, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited {completed.returncode}: {completed.stderr}")
    row = parse_redis_csv(completed.stdout)[op.upper()]
    rps = row["rps"]
    return LoadResult(
        generator="redis-benchmark",
        ops=requests,
        errors=None,
        elapsed_s=requests / rps if rps else 0.0,
        p50_ms=row["p50_latency_ms"],
        p99_ms=row["p99_latency_ms"],
        p999_ms=None,
        count=requests,
        ops_per_s=rps,
        details={"command": " ".join(command[:1] + command[5:])},
    )


# --- webdis ----------------------------------------------------------------------------------


def webdis_config(redis_port: int, http_port: int, log_path: Path) -> dict[str, object]:
    """webdis's JSON configuration: loopback only, in the foreground, quiet."""
    return {
        "redis_host": "127.0.0.1",
        "redis_port": redis_port,
        "redis_auth": None,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "threads": os.cpu_count() or 2,
        "pool_size": 20,
        "daemonize": False,
        "database": 0,
        "verbosity": 1,
        "logfile": str(log_path),
    }


class Webdis:
    """webdis on a free loopback port, in front of a :class:`RedisServer` of its own."""

    def __init__(self, redis_port: int, http_port: int, workdir: Path) -> None:
        self.redis = RedisServer(redis_port, workdir)
        self.port = http_port
        config_path = workdir / "webdis.json"
        config = webdis_config(redis_port, http_port, workdir / "webdis-own.log")
        config_path.write_text(json.dumps(config, indent=2))
        try:
            self.child = Child(["webdis", str(config_path)], workdir / "webdis.log")
            _wait(self._answers, "webdis", self.child)
        except BaseException:
            self.redis.stop()
            raise

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                conn.sendall(b"GET /PING HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                return conn.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        self.child.stop()
        self.redis.stop()
