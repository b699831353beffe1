"""Locks with fencing tokens through real processes: a worker killed with SIGKILL while a lock
is held (the next holder's token is larger, and the old holder's fenced write is refused, by
the client's pre-check and by the data shard itself), and ``zkv lock -- COMMAND`` (flock(1)).

One durable shard (fsync always), so that the worker started after the kill takes over the
killed one's data: the lock record and the fence memory come back from the log."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, wait_for
from zkv import Conflict
from zkv.protocol import Kind, Request, Status

pytestmark = pytest.mark.process

COMMAND_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path: Path = tmp_path_factory.mktemp("locks")
    with Cluster(path, shards=1, ZKV_DATA_DIR=str(path / "data"), ZKV_FSYNC="always") as running:
        running.start_broker()
        running.start_worker()
        try:
            running.wait_ready(gateway=False)
        except BaseException:
            print(running.logs())
            raise
        yield running


def test_tokens_keep_growing_and_the_old_holder_is_fenced_out_after_a_kill_9(cluster):
    kv = cluster.client(timeout_s=10.0)
    first = kv.acquire_lock("job", 0.5)  # the holder pauses: its hold lapses
    kv.set("result", b"first holder", fence=first)
    cluster.kill(cluster.workers[-1])  # SIGKILL, while the lock is held
    cluster.start_worker()
    cluster.wait_ready(gateway=False)
    second = kv.acquire_lock("job", 30, wait_s=10)
    assert second.token > first.token
    kv.set("result", b"second holder", fence=second)
    with pytest.raises(Conflict, match=f"fence token {first.token}"):
        kv.set("result", b"first holder, late", fence=first)
    # Past the client's pre-check (a write already in flight): the shard refuses it too.
    late = Request(Kind.SET, 0, b"result", b"first holder, later", fence=(b"job", first.token))
    assert kv.request(late, checked=False).status == Status.CONFLICT
    assert kv.get("result").value == b"second holder"
    # Once more through a kill: the fence memory and the token counter survive it too.
    cluster.kill(cluster.workers[-1])
    cluster.start_worker()
    cluster.wait_ready(gateway=False)
    assert kv.request(late, checked=False).status == Status.CONFLICT
    kv.release_lock("job", second.token)
    third = kv.acquire_lock("job", 30)
    assert third.token > second.token
    kv.release_lock("job", third.token)


def test_a_lock_wait_survives_a_broker_kill_9_and_restart(cluster):
    """The broker's queue of waiters lives in memory: the client resends its waiting LOCK
    every attempt interval, so the restarted broker gets it again (before: a Timeout after
    the whole wait, although the lock was free since the holder's TTL)."""
    holder = cluster.client(timeout_s=5.0)
    held = holder.acquire_lock("restart-job", 2.0)
    waiter = cluster.client(timeout_s=5.0)
    got: list[object] = []
    thread = threading.Thread(
        target=lambda: got.append(_try(lambda: waiter.acquire_lock("restart-job", 30, wait_s=20)))
    )
    thread.start()
    try:
        wait_for(lambda: holder.stats()["broker"]["lock_waiters"] == 1, "the LOCK to wait")
        cluster.kill(cluster.broker)
        cluster.start_broker()
        thread.join(COMMAND_TIMEOUT_S)
    finally:
        thread.join(COMMAND_TIMEOUT_S)
    [lock] = got
    assert not isinstance(lock, BaseException), lock
    assert lock.token > held.token
    waiter.release_lock("restart-job", lock.token)


def _try(call: Callable[[], object]) -> object:
    """``call()``'s result, or the exception it raised (a thread's, for the test to report)."""
    try:
        return call()
    except Exception as exc:
        return exc


def zkv(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in cluster.env.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "zkv", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def test_zkv_lock_runs_a_command_holding_the_lock_and_releases_it_after(cluster, tmp_path):
    kv = cluster.client()
    report = tmp_path / "report"
    # The command: record its token, try the lock itself (held: zkv lock exits 1), exit 3.
    child = (
        "import os, subprocess, sys; "
        "inner = subprocess.run([sys.executable, '-m', 'zkv', 'lock', 'cli', '--ttl', '5', "
        "'--', 'true']).returncode; "
        "open(sys.argv[1], 'w').write(os.environ['ZKV_LOCK_TOKEN'] + ' ' + str(inner)); "
        "sys.exit(3)"
    )
    result = zkv(
        cluster, "lock", "cli", "--ttl", "5", "--", sys.executable, "-c", child, str(report)
    )
    assert result.returncode == 3, result.stderr
    token, inner = report.read_text().split()
    assert int(token) > 0 and inner == "1"
    after = kv.acquire_lock("cli", 5)  # released when the command ended: no wait
    assert after.token > int(token)
    kv.release_lock("cli", after.token)


LONG_COMMAND = """
import pathlib, sys, time
pathlib.Path(sys.argv[1]).touch()
end = time.monotonic() + 20
while not pathlib.Path(sys.argv[2]).exists() and time.monotonic() < end:
    time.sleep(0.05)
"""


def test_zkv_lock_refreshes_a_lock_its_command_outlives(cluster, tmp_path):
    kv = cluster.client()
    started, done = tmp_path / "started", tmp_path / "done"
    script = tmp_path / "long.py"
    script.write_text(LONG_COMMAND)  # runs until told to stop, past several of its lock's TTLs
    env = {k: v for k, v in cluster.env.items() if k != "PYTHONPATH"}
    argv = [sys.executable, "-m", "zkv", "lock", "long", "--ttl", "0.6", "--", sys.executable]
    process = subprocess.Popen([*argv, str(script), str(started), str(done)], env=env)
    try:
        wait_for(lambda: started.exists() or None, "the command to start")
        for _ in range(3):  # each try waits past one TTL: only a refresh keeps it held
            with pytest.raises(Conflict) as held:
                kv.acquire_lock("long", 5, wait_s=0.7)
            assert held.value.deadline_ms is not None
        done.touch()
        assert process.wait(COMMAND_TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    kv.release_lock("long", kv.acquire_lock("long", 5).token)
