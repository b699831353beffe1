"""zkv installed as a package, as a new user installs it: the wheel built from the project holds
every module and data file, and once installed into a new virtual environment the ``zkv``
command and the three services run from a directory that is not the checkout.

Offline and fast: the wheel is built with the test venv's setuptools (no build isolation, no
index) from a copy of the sources (a build writes build/ and *.egg-info where it runs), into a
venv made ``--without-pip``; that venv sees the test venv's site-packages through a ``.pth``
file, so pip installs the wheel WITH its dependencies and ``--no-index`` (each declared
dependency must be found there, or the install fails), while zkv itself comes only from the
wheel: a directory added by a ``.pth`` line has its own ``.pth`` files (the test venv's
editable zkv) ignored, and the services' working directory is not the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import ROOT, Cluster

pytestmark = pytest.mark.process

PACKAGES = ("zkv", "broker", "workers", "gateway")
STEP_TIMEOUT_S = 60.0  # one build or install step; each takes about a second here


@dataclass
class Installed:
    """A fresh virtual environment with the zkv wheel installed."""

    wheel: Path
    venv: Path
    workdir: Path  # an empty directory to run commands from, not the checkout
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.workdir,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
        )


def run_checked(*argv: str | Path, cwd: Path | None = None) -> None:
    result = subprocess.run(
        [str(arg) for arg in argv], cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run_checked(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                "-w", tmp / "dist", source)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("zkv-*.whl")
    venv = tmp / "venv"
    run_checked(sys.executable, "-m", "venv", "--without-pip", venv)
    site = subprocess.check_output(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        text=True,
    ).strip()
    (Path(site) / "zkv-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run_checked(*pip, "--python", venv / "bin" / "python", "install", "--no-index", "-q", wheel)
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        [str(venv / "bin"), *(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)]
    )
    return Installed(wheel, venv, workdir, env)


def test_the_wheel_holds_every_module_and_data_file(installed: Installed) -> None:
    in_wheel = set(zipfile.ZipFile(installed.wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "--", *PACKAGES], cwd=ROOT, capture_output=True, text=True
    )
    if tracked.returncode == 0:
        in_source = set(tracked.stdout.splitlines())
    else:  # not a git checkout: every file but bytecode
        in_source = {
            path.relative_to(ROOT).as_posix()
            for package in PACKAGES
            for path in (ROOT / package).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }
    assert in_source - in_wheel == set()


def test_zkv_comes_from_the_wheel_not_the_checkout(installed: Installed) -> None:
    result = installed.run(
        installed.bin("python"), "-c", "import zkv, broker, workers, gateway; print(zkv.__file__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(installed.venv)), result.stdout


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        (["zkv"], "usage: zkv "),
        (["zkv-broker"], "usage: zkv-broker "),
        (["zkv-worker"], "usage: zkv-worker "),
        (["zkv-gateway"], "usage: zkv-gateway "),
        (["python", "-m", "zkv"], "usage: python -m zkv "),
        (["python", "-m", "broker"], "usage: python -m broker "),
        (["python", "-m", "workers"], "usage: python -m workers "),
        (["python", "-m", "gateway"], "usage: python -m gateway "),
    ],
)
def test_every_command_runs_and_names_itself(
    installed: Installed, command: list[str], usage: str
) -> None:
    result = installed.run(installed.bin(command[0]), *command[1:], "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage), result.stdout


class InstalledCluster(Cluster):
    """A cluster whose processes are the installed commands, run from ``installed.workdir``:
    the broker and the gateway as console scripts, the workers as ``python -m workers`` (whose
    supervisor starts its children with ``python -m workers`` too)."""

    def __init__(self, tmp_path: Path, installed: Installed) -> None:
        super().__init__(tmp_path)
        self.installed = installed
        self.env = {**installed.env, **{k: v for k, v in self.env.items() if k.startswith("ZKV")}}
        self.env["PYTHONUNBUFFERED"] = "1"

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        module, *rest = args
        command = {
            "broker": [self.installed.bin("zkv-broker")],
            "workers": [self.installed.bin("python"), "-m", "workers"],
            "gateway": [self.installed.bin("zkv-gateway")],
        }[module]
        log = open(self.tmp_path / f"{name}-{len(self._all)}.log", "wb")
        process = subprocess.Popen(
            [*command, *rest],
            cwd=self.installed.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._all.append(process)
        return process


@pytest.fixture
def cluster(tmp_path: Path, installed: Installed) -> Iterator[InstalledCluster]:
    with InstalledCluster(tmp_path, installed) as running:
        running.start_broker()
        running.start_worker()
        running.start_worker("--processes", "2")  # overrides the first --processes 1
        running.start_gateway()
        try:
            running.wait_ready()
        except AssertionError:
            print(running.logs())
            raise
        yield running


def test_the_installed_services_serve_the_installed_cli(
    installed: Installed, cluster: InstalledCluster
) -> None:
    zkv = installed.bin("zkv")
    result = installed.run(zkv, "set", "greeting", "hello", "--frontend", cluster.frontend)
    assert (result.returncode, result.stdout[:3]) == (0, "OK "), result.stderr
    result = installed.run(zkv, "get", "greeting", ZKV_FRONTEND=cluster.frontend)
    assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr
    response = cluster.http("GET", "/get?key=greeting")
    assert response.json()["value"] == "hello"
    result = installed.run(
        installed.bin("python"), "-m", "zkv", "ping", "--frontend", cluster.frontend
    )
    assert result.returncode == 0, result.stderr
