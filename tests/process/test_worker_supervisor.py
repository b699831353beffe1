"""``python -m workers`` as real processes: one worker, the supervisor, bad configuration.

A fake broker ROUTER in the test process stands in for the broker. Every wait has a deadline,
and teardown kills whatever a failed test left running, children of the supervisor included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from tests.fakes import bare
from zkv.protocol import Disconnect, FromWorker, Heartbeat, Ready, decode_from_worker

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc for children"),
]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 10.0  # a Python process importing pyzmq, on a loaded machine
# Fast heartbeats, but a patient liveness: the fake broker never heartbeats, and a worker
# re-registering in the middle of a test would look like a restart.
WORKER_FLAGS = ["--heartbeat-interval", "0.05", "--heartbeat-liveness", "200"]
STOP_WAIT_S = 6.0  # the supervisor kills children after 5 s; it should never come to that


class FakeBroker:
    """A ROUTER socket on a port the OS chose; receives with deadlines, skipping heartbeats."""

    def __init__(self, context: zmq.Context) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def recv(self, timeout_s: float) -> tuple[bytes, FromWorker]:
        deadline_s = time.monotonic() + timeout_s
        while (remaining_s := deadline_s - time.monotonic()) > 0:
            if not self.socket.poll(int(remaining_s * 1000) + 1, zmq.POLLIN):
                break
            identity, *frames = self.socket.recv_multipart()
            message = decode_from_worker(frames)
            if not isinstance(message, Heartbeat):
                return identity, message
        pytest.fail(f"no message from a worker within {timeout_s} s")


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``, read from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline_s:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.02)


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    context = zmq.Context()
    broker = FakeBroker(context)
    try:
        yield broker
    finally:
        broker.socket.close(linger=0)
        context.term()


class Spawner:
    """Starts ``python -u -m workers ARGS``; :meth:`cleanup` leaves no process behind."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.children: set[int] = set()  # pids of supervised workers seen by a test

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log_path = self.tmp_path / f"workers-{len(self.started)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-u", "-m", "workers", *args],
                cwd=ROOT,
                # The fake broker is a plain ROUTER: no CURVE (tests/process/test_security.py
                # tests the keys).
                env={
                    **os.environ,
                    "ZKV_DATA_DIR": str(self.tmp_path / "data"),
                    "ZKV_INSECURE": "1",
                    **(env or {}),
                },
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.started.append((process, log_path))
        return process

    def children_of(self, process: subprocess.Popen[bytes]) -> set[int]:
        """The live children of ``process``, remembered for cleanup."""
        found = children_of(process.pid)
        self.children.update(found)
        return found

    def cleanup(self) -> None:
        for process, log_path in self.started:
            self.children.update(children_of(process.pid))
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            print(f"--- {log_path.name}\n{log_path.read_text()}")
        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.cleanup()


def test_one_worker_registers_and_leaves_cleanly_on_sigterm(
    broker: FakeBroker, spawn: Spawner
) -> None:
    process = spawn("--backend", broker.endpoint, *WORKER_FLAGS)
    identity, message = broker.recv(START_TIMEOUT_S)
    assert bare(message) == Ready(None, 0)
    process.send_signal(signal.SIGTERM)
    assert broker.recv(5.0) == (identity, Disconnect())
    assert process.wait(5) == 0


def test_flags_default_from_the_environment(broker: FakeBroker, spawn: Spawner) -> None:
    process = spawn(env={"ZKV_BACKEND": broker.endpoint, "ZKV_HEARTBEAT_INTERVAL": "0.05"})
    assert bare(broker.recv(START_TIMEOUT_S)[1]) == Ready(None, 0)
    process.send_signal(signal.SIGINT)
    assert process.wait(5) == 0


def test_supervisor_restarts_a_dead_child_and_stops_them_all(
    broker: FakeBroker, spawn: Spawner
) -> None:
    supervisor = spawn("--processes", "2", "--backend", broker.endpoint, *WORKER_FLAGS)
    identities = {broker.recv(START_TIMEOUT_S)[0] for _ in range(2)}
    assert len(identities) == 2
    wait_until(lambda: len(spawn.children_of(supervisor)) == 2, "two children")
    first = spawn.children_of(supervisor)

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    identity, message = broker.recv(START_TIMEOUT_S)  # the replacement (after 0.5 s backoff)
    assert bare(message) == Ready(None, 0)
    assert identity not in identities
    identities.add(identity)
    now = spawn.children_of(supervisor)
    assert len(now) == 2 and victim not in now

    supervisor.send_signal(signal.SIGTERM)
    goodbyes = {broker.recv(5.0) for _ in range(2)}
    assert {message for _, message in goodbyes} == {Disconnect()}
    assert {sender for sender, _ in goodbyes} <= identities
    assert supervisor.wait(STOP_WAIT_S) == 0
    assert not any(alive(pid) for pid in now)


def test_children_stop_when_the_supervisor_is_killed(broker: FakeBroker, spawn: Spawner) -> None:
    supervisor = spawn("--processes", "2", "--backend", broker.endpoint, *WORKER_FLAGS)
    for _ in range(2):
        broker.recv(START_TIMEOUT_S)
    wait_until(lambda: len(spawn.children_of(supervisor)) == 2, "two children")
    children = spawn.children_of(supervisor)
    supervisor.kill()
    supervisor.wait(5)
    # Each child got SIGTERM from the kernel (PR_SET_PDEATHSIG) and said goodbye.
    assert {broker.recv(5.0)[1] for _ in range(2)} == {Disconnect()}
    wait_until(lambda: not any(alive(pid) for pid in children), "orphaned children exiting")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--processes", "0"], {}, "must be a whole number of at least 1"),
        (["--heartbeat-interval", "-1"], {}, "must be a positive number"),
        (["--backend", "not an endpoint"], {}, "is not a ZeroMQ endpoint"),
        (["--backend", "tcp://127.0.0.1:0"], {}, "needs a port between 1 and 65535"),
        ([], {"ZKV_HEARTBEAT_LIVENESS": "often"}, "ZKV_HEARTBEAT_LIVENESS"),
        ([], {"ZKV_WORKER_PROCESSES": "-3"}, "ZKV_WORKER_PROCESSES"),
    ],
)
def test_bad_configuration_exits_nonzero_with_a_message(
    tmp_path: Path,
    spawn: Spawner,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    process = spawn(*args, env=env)
    assert process.wait(START_TIMEOUT_S) != 0
    output = (tmp_path / "workers-0.log").read_text()
    assert message in output
