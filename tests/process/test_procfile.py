"""The Procfile under honcho, the two ways the README starts it: ``.venv/bin/honcho start`` from
the checkout without activating the venv (so ``python`` on PATH is some other Python, without
zkv's dependencies), and ``honcho start`` in an activated venv. Ports, endpoints and the data
directory come from the environment, on free ports and in the test's directory."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ROOT, free_port, wait_for

pytestmark = pytest.mark.process

VENV = ROOT / ".venv"
STOP_TIMEOUT_S = 15.0  # honcho's own grace (5 s) before it kills, plus margin


def health(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/v1/health")
        return connection.getresponse().status
    finally:
        connection.close()


def ready(honcho: subprocess.Popen[bytes], port: int) -> bool:
    """Whether the gateway answers healthy; fails at once if honcho has stopped (a process
    of the Procfile exited, so honcho stopped them all)."""
    if honcho.poll() is not None:
        pytest.fail(f"honcho exited with status {honcho.returncode}")
    return health(port) == 200


def honcho_env(tmp_path: Path, activated: bool, other: Path | None = None) -> dict[str, str]:
    """The environment of a shell: PATH without the venv unless it is activated; ``other``:
    another (empty) virtual environment is activated instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(str(VENV))]
    path = [p for p in path if not p.startswith(sys.prefix)]
    if activated:  # what bin/activate does
        env["VIRTUAL_ENV"] = str(VENV)
        path.insert(0, str(VENV / "bin"))
    elif other is not None:
        env["VIRTUAL_ENV"] = str(other)
        path.insert(0, str(other / "bin"))
    env.update(
        PATH=os.pathsep.join(path),
        PORT=str(free_port()),
        ZKV_FRONTEND=f"tcp://127.0.0.1:{free_port()}",
        ZKV_BACKEND=f"tcp://127.0.0.1:{free_port()}",
        ZKV_EVENTS=f"tcp://127.0.0.1:{free_port()}",
        ZKV_EVENTS_BACKEND=f"tcp://127.0.0.1:{free_port()}",
        ZKV_DATA_DIR=str(tmp_path / "data"),
        ZKV_SHARDS="1",
        ZKV_HTTP_PROCESSES="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.mark.skipif(not (VENV / "bin" / "honcho").exists(), reason="no .venv: run `make test`")
@pytest.mark.parametrize(
    ("activated", "another"),
    [(False, False), (True, False), (False, True)],
    ids=["venv-honcho", "activated-venv", "venv-honcho-another-venv-active"],
)
def test_honcho_starts_the_cluster(tmp_path: Path, activated: bool, another: bool) -> None:
    other = None
    if another:  # a newcomer's unrelated venv, active: its python has no zmq
        other = tmp_path / "other-venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True)
    env = honcho_env(tmp_path, activated, other)
    command = ["honcho", "start"] if activated else [str(VENV / "bin" / "honcho"), "start"]
    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        port = int(env["PORT"])
        wait_for(lambda: ready(honcho, port), "the cluster under honcho")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/set?key=k&value=v&timeout=10")
        assert connection.getresponse().status == 200
        connection.close()
    except AssertionError:
        print(log_path.read_text(errors="replace"))
        raise
    finally:
        stop(honcho, log_path)


def stop(honcho: subprocess.Popen[bytes], log_path: Path) -> None:
    """SIGTERM to honcho, which stops its processes (each in a session of its own); then make
    sure none of them is left, killing any that is."""
    if honcho.poll() is None:
        honcho.send_signal(signal.SIGTERM)
        try:
            honcho.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
    pids = [int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", log_path.read_text())]
    assert len(pids) == 3, log_path.read_text()  # gateway, broker, workers
    left = []
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)  # each honcho process leads its own session
            left.append(pid)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind by honcho: {left}"
