"""The test hosts themselves (tests/hosts.py), before any zkv runs on them: hosts reach each
other and nothing else, a cut host is unreachable until healed, a killed host has no process
left (children in other process groups included), and a wiped disk is empty.
Prints what it saw as JSON (tests/process/test_hosts.py judges it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.cluster import wait_for
from tests.hosts import Agent, Hosts, scenario

PORT = 7000
PROBE_TIMEOUT_S = 1.0
KILL_AT_START = 5  # hosts killed right after a process is started in them
# A process that leaves a child in a process group of its own: a group kill misses it.
ESCAPER = (
    "import os, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
    " start_new_session=True)\n"
    "time.sleep(300)\n"
)


def reaches(agent: Agent, url: str) -> bool | str:
    """True if ``url`` answers; else the failure's text."""
    try:
        return agent.http("GET", url, timeout_s=PROBE_TIMEOUT_S).status == 200
    except AssertionError as exc:
        return str(exc)


@scenario
def main(workdir: Path) -> dict[str, Any]:
    """Two hosts: reachability, isolation, cut, heal, kill, wipe."""
    result: dict[str, Any] = {}
    with Hosts(2, workdir) as hosts:
        h1, h2 = hosts
        result["addresses"] = [h1.address, h2.address]
        h1.spawn(
            [sys.executable, "-m", "http.server", str(PORT), "--bind", h1.address],
            log_name="http",
        )
        agent = h2.agent()
        url = f"http://{h1.address}:{PORT}/"
        wait_for(lambda: reaches(agent, url) is True, "h1's server from h2")
        # Only the hosts' network exists: another address has no route at all.
        result["outside"] = reaches(agent, "http://192.0.2.1:80/")
        result["loopback_is_its_own"] = reaches(agent, f"http://127.0.0.1:{PORT}/")
        h1.cut()
        result["cut"] = reaches(agent, url)
        h1.heal()
        result["healed"] = wait_for(lambda: reaches(agent, url) is True, "h1 after the heal")
        h1.spawn([sys.executable, "-c", ESCAPER], log_name="escaper")
        wait_for(lambda: len(h1.pids()) >= 3, "the escaper's child")
        result["pids_before_kill"] = len(h1.pids())
        (h1.disk / "data").write_text("acknowledged")
        h1.kill(wipe=True)
        result["pids_after_kill"] = len(h1.pids())
        result["disk_after_wipe"] = sorted(p.name for p in h1.disk.iterdir())
        result["h2_lives"] = len(h2.pids())
        # A host killed the instant after a start: the child may not be in the namespace yet
        # (still `ip netns exec`), so only our own list of children finds it.
        for _ in range(KILL_AT_START):
            h1.spawn([sys.executable, "-c", "import time; time.sleep(300)"], log_name="young")
            h1.kill()
        result["pids_after_young_kills"] = len(h1.pids())
    return result


if __name__ == "__main__":
    main()
