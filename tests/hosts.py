"""Test hosts: Linux network namespaces on one bridge, to test zkv across machines on one.

Isolation. A pytest test stays in the machine's real namespaces and calls :func:`run_scenario`,
which runs a scenario module (``tests/netns/<name>.py``) under ``unshare`` (:data:`UNSHARE`):

- a network namespace of its own, holding only ``lo``: the bridge, the hosts and their
  addresses (10.77.0.0/24, :data:`SUBNET`) exist only in there, with no route to the machine's
  real network, so no packet of the test can leave it;
- a private mount namespace, where :class:`Hosts` mounts a tmpfs over ``/run`` before
  ``ip netns add`` pins its namespaces under ``/run/netns``: nothing is left on the machine;
- a pid namespace whose init is the scenario, with its own ``/proc``: when the scenario exits,
  however it exits, the kernel kills every process left in it, and ``--kill-child`` kills the
  scenario when the test kills ``unshare`` at its deadline. ``ip netns pids`` (which reads
  ``/proc``) sees only the scenario's processes, so :meth:`Host.kill` can kill nothing else.

Inside, ``Hosts(n, workdir)`` builds hosts ``h1``..``hn``: a network namespace each, with a
veth pair whose outer end (``vh<i>``) is a port of one bridge, the address ``10.77.0.<10+i>``,
loopback up, a disk of its own (``workdir/h<i>``: its data directory, ``ZKV_DATA_DIR``) and
its processes' logs in ``workdir/logs`` (on the machine's file system: the test reports them).
Processes run in a host through ``ip netns exec``, with ``ZKV_ADVERTISE``, ``ZKV_HOST_ID`` and
``ZKV_DATA_DIR`` set to the host's (no other ``ZKV_*`` variable is inherited): the same command
line on every host, only the environment differs, as on real machines.

A scenario module prints one JSON object on stdout and exits 0, or exits non-zero with the
traceback and every log on stderr (:func:`scenario` does both)::

    from tests.hosts import Hosts, scenario

    @scenario
    def main(workdir: Path) -> dict[str, Any]:
        with Hosts(2, workdir) as (server, client):
            plain = {"ZKV_INSECURE": "1", "ZKV_BACKEND": f"tcp://{server.address}:5556"}
            broker = server.python("broker", env=plain)  # binds its address: 10.77.0.11
            server.python("workers", "--processes", "2", env=plain)  # 2 shards
            agent = client.agent()  # makes requests from inside the client host
            frontend = f"tcp://{server.address}:5555"
            wait_for(lambda: all(agent.client("ping", frontend=frontend).result()["owned"]),
                     "an owner for every shard")
            agent.client("set", "k", "v", frontend=frontend).result()
            server.cut()     # its link down: a partition
            failed = agent.client("get", "k", frontend=frontend)  # an Outcome: .error
            server.heal()
            server.stop(broker)  # one process (its group) killed, the host lives on
            server.kill()    # SIGKILL every process of the host (wipe=True: and its disk)
            return {"failed": failed.error}

    if __name__ == "__main__":
        main()

and its test: ``result = run_scenario("tests.netns.mine", tmp_path, timeout_s=30)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cluster import ROOT, HttpResponse, kill_group, logs_of, spawn_logged, wait_for
from zkv.keys import DIR_MODE, FILE_MODE

SUBNET = "10.77.0"  # the hosts' /24, private, existing only inside the scenario's namespace
PREFIX_LEN = 24
HOST_OFFSET = 10  # host i is SUBNET.(HOST_OFFSET + i): h1 is 10.77.0.11
OPERATOR_ADDRESS = f"{SUBNET}.1"  # the scenario's own address on the bridge, if it asks for one
MAX_HOSTS = 200
BRIDGE = "zkvbr0"
IP = shutil.which("ip") or "/usr/sbin/ip"
UNSHARE = (
    "unshare",
    "--net",
    "--mount",
    "--propagation",
    "private",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
)
IP_COMMAND_TIMEOUT_S = 10.0  # one `ip` command (they take milliseconds)
KILL_TIMEOUT_S = 5.0  # until a host's every process is gone after SIGKILL
LINK_TIMEOUT_S = 5.0  # until a healed link is up again
AGENT_TIMEOUT_S = 30.0  # an agent's answer to one request, unless the caller says otherwise
RUN_TIMEOUT_S = 30.0  # Host.run's default
SCENARIO_TIMEOUT_S = 60.0  # run_scenario's default


class HostsError(Exception):
    """The hosts cannot be built or used (not isolated, an `ip` command failed)."""


def ip(*args: str) -> str:
    """Run ``ip ARGS`` with a deadline; its output. Raises HostsError with ip's message."""
    try:
        done = subprocess.run(
            [IP, *args], capture_output=True, text=True, timeout=IP_COMMAND_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise HostsError(f"ip {' '.join(args)}: no answer in {IP_COMMAND_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def check_isolated() -> None:
    """Refuse to build hosts outside the namespaces :func:`run_scenario` makes: in the
    machine's own network namespace a bridge and routes would touch its real network."""
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        raise HostsError(
            f"this network namespace has interfaces {names}, not just lo: run the scenario "
            f"through tests.hosts.run_scenario (unshare --net --mount --pid), never directly"
        )
    if Path("/proc/self").resolve().name != str(os.getpid()):
        raise HostsError("/proc is not this pid namespace's: unshare needs --mount-proc")
    with open("/proc/self/mountinfo") as mounts:  # a mount of ours must not reach the machine
        if any(" / / " in line and "shared:" in line for line in mounts):
            raise HostsError("the root mount propagates to the machine: unshare --mount needed")


def base_env() -> dict[str, str]:
    """The environment of every host's processes, before the host's own variables: this one
    without any ``ZKV_*`` (a developer's shell must not change what a scenario runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZKV_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def copy_files(source: Path, destination: Path, names: Iterable[str]) -> Path:
    """Copy ``names`` from ``source`` into ``destination`` as an operator does (``scp -p``
    of the files a host needs, into a directory of the owner's only); returns ``destination``."""
    destination.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, destination / name)
        os.chmod(destination / name, FILE_MODE)
    return destination


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request made by an :class:`Agent` came to: a value, or an error's class name
    (``Unavailable``, ``Timeout``, ``NotFound``, ...) and message; and how long it took."""

    ok: bool
    value: Any
    error: str | None
    message: str | None
    elapsed_s: float

    def result(self) -> Any:
        """The value; AssertionError naming the error if there was one."""
        if not self.ok:
            raise AssertionError(f"{self.error}: {self.message}")
        return self.value


class TimedResponse(HttpResponse):
    """An HTTP response, and how long its request took (measured by the agent)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, elapsed_s: float) -> None:
        super().__init__(status, headers, body)
        self.elapsed_s = elapsed_s


class AgentTimeout(AssertionError):
    """An agent gave no answer in time: a request hung past its deadline."""


class Agent:
    """A process inside a host that makes requests for the scenario, one at a time: HTTP
    requests (to the host's gateway on its loopback, say) and zkv client calls, each with a
    deadline. A scenario process lives outside every host, so it asks an agent; one process
    for many requests spares a Python start (~0.3 s) per request. Requests and answers are
    JSON lines on its stdin and stdout (tests/netns/agent.py); bytes travel as latin-1 text.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self._pending = b""

    def ask(self, request: dict[str, Any], timeout_s: float = AGENT_TIMEOUT_S) -> dict[str, Any]:
        """Send one request; its answer. Raises AgentTimeout after ``timeout_s``."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        deadline_s = time.monotonic() + timeout_s
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            left_s = deadline_s - time.monotonic()
            if left_s <= 0:
                raise AgentTimeout(f"no answer in {timeout_s} s to {request}")
            ready, _, _ = select.select([descriptor], [], [], left_s)
            if ready:
                chunk = os.read(descriptor, 65536)
                if not chunk:
                    raise AssertionError(f"the agent exited ({self.process.poll()}) at {request}")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def http(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> TimedResponse:
        """One HTTP request on a fresh connection; AgentTimeout if no answer by ``timeout_s``
        (plus a second for the agent), an AssertionError if the connection failed."""
        answer = self.ask(
            {
                "op": "http",
                "method": method,
                "url": url,
                "body": None if body is None else body.decode("latin-1"),
                "headers": headers or {},
                "timeout_s": timeout_s,
            },
            timeout_s + 1.0,
        )
        if not answer["ok"]:
            raise AssertionError(f"{method} {url}: {answer['error']}: {answer['message']}")
        status, response_headers, text = answer["value"]
        return TimedResponse(status, response_headers, text.encode("latin-1"), answer["elapsed_s"])

    def client(
        self,
        call: str,
        *args: Any,
        frontend: str,
        keys: Path | None = None,
        timeout_s: float = 5.0,
    ) -> Outcome:
        """``zkv.client.Client(frontend, timeout_s, keys=keys).<call>(*args)`` in the agent
        (one client per frontend, keys and timeout, kept between calls). Values: ``get`` gives
        ``[value, deadline_ms]``, ``all`` ``[[key, value, deadline_ms], ...]`` (latin-1 text).
        """
        answer = self.ask(
            {
                "op": "client",
                "call": call,
                "args": list(args),
                "frontend": frontend,
                "keys": None if keys is None else str(keys),
                "timeout_s": timeout_s,
            },
            timeout_s + 1.0,
        )
        return Outcome(
            answer["ok"],
            answer.get("value"),
            answer.get("error"),
            answer.get("message"),
            answer["elapsed_s"],
        )

    def close(self) -> None:
        """Ask it to stop (end of its input); the host's kill ends it otherwise."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass


class Host:
    """One test host: a network namespace with one link to the bridge, and a disk."""

    def __init__(self, index: int, workdir: Path) -> None:
        self.index = index
        self.name = f"h{index}"
        self.address = f"{SUBNET}.{HOST_OFFSET + index}"
        self.link = f"vh{index}"  # the outer end of its veth pair: a port of the bridge
        self.disk = workdir / self.name
        self.log_dir = workdir / "logs"
        self.processes: list[subprocess.Popen[bytes]] = []
        self._agents: list[Agent] = []
        self._started = 0  # processes ever started here: names their logs (never reused)
        self.log_paths: dict[int, Path] = {}  # each process's log, by pid

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address})"

    # --- processes --------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process on this host: :func:`base_env`, the host's own
        ``ZKV_ADVERTISE``, ``ZKV_HOST_ID`` and ``ZKV_DATA_DIR``, then ``extra``."""
        return {
            **base_env(),
            "ZKV_ADVERTISE": self.address,
            "ZKV_HOST_ID": self.name,
            "ZKV_DATA_DIR": str(self.disk),
            **(extra or {}),
        }

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host."""
        return [IP, "netns", "exec", self.name, *argv]

    def spawn(
        self, argv: list[str], env: dict[str, str] | None = None, log_name: str = "process"
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host, its output in ``logs/h<i>-<log_name>-<n>.log``."""
        log = self.log_dir / f"{self.name}-{log_name}-{self._count()}.log"
        process = spawn_logged(self.command(argv), self.env(env), log)
        self.processes.append(process)
        self.log_paths[process.pid] = log
        return process

    def python(
        self, module: str, *args: str, env: dict[str, str] | None = None, log_name: str = ""
    ) -> subprocess.Popen[bytes]:
        """``python -u -m module args`` on this host (the test's interpreter)."""
        argv = [sys.executable, "-u", "-m", module, *args]
        return self.spawn(argv, env, log_name or module)

    def run(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        timeout_s: float = RUN_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to its end (killed at ``timeout_s``); its output."""
        return subprocess.run(
            self.command(argv),
            cwd=ROOT,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def agent(self, env: dict[str, str] | None = None) -> Agent:
        """A new :class:`Agent` on this host."""
        log = self.log_dir / f"{self.name}-agent-{self._count()}.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                self.command([sys.executable, "-u", "-m", "tests.netns.agent"]),
                cwd=ROOT,
                env=self.env(env),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self.processes.append(process)
        agent = Agent(process)
        self._agents.append(agent)
        return agent

    def _count(self) -> int:
        """The next process's number on this host: a restarted host's processes log to new
        files, so the logs of the ones that died (their last lines) survive for the checks."""
        self._started += 1
        return self._started - 1

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal one process of this host (its process group) and reap it: a broker killed,
        say, while its host lives on. A workers supervisor's children, in groups of their own,
        get SIGTERM at its death; :meth:`kill` kills everything."""
        kill_group(process, sig)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (children of children too)."""
        return [int(pid) for pid in ip("netns", "pids", self.name).split()]

    def kill(self, wipe: bool = False) -> None:
        """The host dies: SIGKILL every process in it, until none is left (and, with ``wipe``,
        its disk is lost: an empty data directory in its place)."""
        deadline_s = time.monotonic() + KILL_TIMEOUT_S
        # Our own children too: one started a moment ago may still be `ip netns exec` that has
        # not entered the namespace yet, so `ip netns pids` misses it (and it would live on).
        while pids := set(self.pids()) | {p.pid for p in self.processes if p.poll() is None}:
            if time.monotonic() > deadline_s:
                raise HostsError(f"{self.name}: processes {pids} survive SIGKILL")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        for process in self.processes:
            process.wait(timeout=KILL_TIMEOUT_S)  # reap our own children
        for agent in self._agents:
            agent.close()
        self.processes.clear()
        self._agents.clear()
        if wipe:
            shutil.rmtree(self.disk, ignore_errors=True)
            self.disk.mkdir(parents=True)

    # --- the network ------------------------------------------------------------------------

    def cut(self) -> None:
        """Cut the host off: its link to the bridge goes down (the cable pulled at the switch).
        Its processes live on and see their peers fall silent, as in a partition."""
        ip("link", "set", self.link, "down")

    def heal(self) -> None:
        """Put the link back and wait until it carries packets again."""
        ip("link", "set", self.link, "up")
        wait_for(
            lambda: self._link_up(), f"{self.name}'s link to come up", timeout_s=LINK_TIMEOUT_S
        )

    def _link_up(self) -> bool:
        ours = json.loads(ip("-json", "link", "show", "dev", self.link))
        theirs = json.loads(ip("-json", "-netns", self.name, "link", "show", "dev", "eth0"))
        return ours[0]["operstate"] == "UP" and theirs[0]["operstate"] == "UP"


class Hosts:
    """``n`` test hosts on one bridge (see the module's docstring). A context manager: on
    exit, however it exits, every process of every host is killed, every namespace deleted.
    Iterable, and indexable from 0 (``hosts[0]`` is ``h1``).

    With ``operator``, the bridge itself gets :data:`OPERATOR_ADDRESS`: the scenario process
    is then a machine on the hosts' switch (clients, load, etcd reads straight from it, no
    agent); a cut host is cut off from it too. Still nothing outside the test's namespace."""

    def __init__(self, n: int, workdir: Path, operator: bool = False) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"1 to {MAX_HOSTS} hosts, not {n}")
        self.workdir = Path(workdir).absolute()
        self.hosts = [Host(i, self.workdir) for i in range(1, n + 1)]
        self._made: list[Host] = []
        self.operator = operator
        self._bridge = False
        self._run_mounted = False

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> Hosts:
        check_isolated()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        # /run/netns holds a bind mount per namespace: on a tmpfs of this mount namespace,
        # they vanish with it; and nothing is created on the machine's /run.
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "zkv-hosts", "/run"],
            check=True,
            timeout=IP_COMMAND_TIMEOUT_S,
        )
        self._run_mounted = True
        ip("link", "set", "lo", "up")
        ip("link", "add", BRIDGE, "type", "bridge")
        self._bridge = True
        ip("link", "set", BRIDGE, "up")
        if self.operator:  # the scenario reaches every host (and they it) as a client machine
            ip("addr", "add", f"{OPERATOR_ADDRESS}/{PREFIX_LEN}", "dev", BRIDGE)
        for host in self.hosts:
            host.disk.mkdir(parents=True, exist_ok=True)
            ip("netns", "add", host.name)
            self._made.append(host)
            ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            ip("link", "set", host.link, "master", BRIDGE, "up")
            inside = ("-netns", host.name)
            ip(*inside, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0")
            ip(*inside, "link", "set", "eth0", "up")
            ip(*inside, "link", "set", "lo", "up")
        for host in self.hosts:
            wait_for(host._link_up, f"{host.name}'s link", timeout_s=LINK_TIMEOUT_S)

    def close(self) -> None:
        """Kill every process, delete every namespace and the bridge; raise the first error
        after trying everything."""
        errors: list[BaseException] = []
        for host in reversed(self._made):
            for step in (host.kill, functools.partial(ip, "netns", "delete", host.name)):
                try:
                    step()
                except BaseException as exc:
                    errors.append(exc)
        self._made.clear()
        if self._bridge:
            try:
                ip("link", "delete", BRIDGE)
            except BaseException as exc:
                errors.append(exc)
            self._bridge = False
        if self._run_mounted:
            subprocess.run(["umount", "--lazy", "/run"], timeout=IP_COMMAND_TIMEOUT_S)
            self._run_mounted = False
        if errors:
            raise errors[0]

    def logs(self) -> str:
        """Every process's log (its end), for a failure's report."""
        return logs_of(self.workdir / "logs")


# --- scenarios --------------------------------------------------------------------------------


def scenario(run: Callable[[Path], dict[str, Any]]) -> Callable[[], None]:
    """Make ``run(workdir) -> result`` a scenario's ``main``: parses ``--workdir``, prints the
    result as one JSON line and exits 0; or, if it raises, prints the traceback and every log
    under ``workdir/logs`` on stderr and exits 1."""

    @functools.wraps(run)
    def main() -> None:
        parser = argparse.ArgumentParser(description=run.__doc__)
        parser.add_argument("--workdir", type=Path, required=True)
        args = parser.parse_args()
        try:
            result = run(args.workdir)
        except BaseException:
            traceback.print_exc()
            print(logs_of(args.workdir / "logs"), file=sys.stderr)
            sys.exit(1)
        print(json.dumps(result), flush=True)
        sys.exit(0)

    return main


def can_run_scenarios() -> str | None:
    """Why scenarios cannot run on this machine (a skip reason), or None."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, mounts)"
    missing = [tool for tool in ("unshare", "mount") if shutil.which(tool) is None]
    missing += [] if Path(IP).exists() else ["ip"]
    if missing:
        return f"test hosts need {', '.join(missing)} (.ci/run installs them)"
    return None


def run_scenario(
    module: str,
    workdir: Path,
    timeout_s: float = SCENARIO_TIMEOUT_S,
    args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run scenario ``module`` in namespaces of its own (:data:`UNSHARE`), with ``--workdir``
    and ``args``; its JSON result.

    Raises:
        AssertionError: it failed, or was still running at ``timeout_s`` (then killed, with
            every process it started): the message holds its output and its hosts' logs.
    """
    command = [*UNSHARE, sys.executable, "-u", "-m", module, "--workdir", str(workdir), *args]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{module} still running after {timeout_s} s (killed)\n{exc.stderr or ''}\n"
            f"{logs_of(workdir / 'logs')}"
        ) from None
    if done.returncode != 0:
        raise AssertionError(f"{module} failed ({done.returncode}):\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise AssertionError(f"{module} printed no result\n{done.stderr}")
    return json.loads(lines[-1])
