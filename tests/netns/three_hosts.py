"""Today's single-broker zkv across three test hosts (tests/hosts.py), CURVE on every socket
another host reaches: the broker on h1 binds its address (frontend and backend), two workers
on h2, the gateway and the client on h3. Keys travel as an operator copies them: the files a
worker host needs to h2, those a client host needs to h3.

Checks: a plain broker frontend on h1's address is refused; the seed API through the gateway
and the Python client from h3 work; a client without keys gets no answer; while h2 is cut off
for CUT_S, requests fail cleanly (503 / Unavailable within the gateway's and the client's
deadline, never a hang), and after the heal they work again with the data written before.
Prints what it saw as JSON (tests/process/test_hosts.py judges it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.cluster import wait_for
from tests.hosts import Agent, Hosts, copy_files, scenario
from zkv.keys import CLIENT_FILES, WORKER_FILES, complete

SHARDS = 2
HTTP_PORT = 5000
REQUEST_TIMEOUT_S = 5.0  # the gateway's and the client's deadline (ZKV_TIMEOUT's default)
CUT_S = 3.0  # how long h2 stays cut off
HEAL_TIMEOUT_S = 15.0  # until requests work again after the heal
# Heartbeats every 0.2 s (a silent peer is dead after 0.6 s) and requests wait 1.5 s for a
# shard's owner: the cut's failures come in about 1.5 to 2.1 s, well inside REQUEST_TIMEOUT_S.
# Not a whole number of seconds: a client resends each second on a fresh socket, and a wait of
# whole seconds (the default 3 s too, on one host as well) fails the request just as the client
# drops the socket its answer goes to; the resend then waits again and the client gets Timeout
# (504) at its deadline rather than Unavailable (503). Reported to the lead, not fixed here.
TIMINGS = {
    "ZKV_SHARDS": str(SHARDS),
    "ZKV_HEARTBEAT_INTERVAL": "0.2",
    "ZKV_SHARD_WAIT": "1.5",
    "ZKV_TIMEOUT": str(REQUEST_TIMEOUT_S),
}


def seed(agent: Agent, path: str, **params: str) -> tuple[int, Any, float]:
    """GET a seed route of h3's gateway: (status, JSON body, seconds)."""
    url = f"http://127.0.0.1:{HTTP_PORT}{path}?{urlencode(params)}"
    response = agent.http("GET", url, timeout_s=REQUEST_TIMEOUT_S + 2)
    return response.status, response.json(), response.elapsed_s


@scenario
def main(workdir: Path) -> dict[str, Any]:
    """Three hosts, one broker with CURVE on both sides, a cut and a heal."""
    result: dict[str, Any] = {}
    with Hosts(3, workdir) as (h1, h2, h3):
        frontend = f"tcp://{h1.address}:5555"
        backend = f"tcp://{h1.address}:5556"

        # The rule: a plain frontend where other hosts reach it is refused, naming the flag.
        refused = h1.python("broker", env=TIMINGS, log_name="plain-broker")
        result["plain_broker_exit"] = refused.wait(timeout=REQUEST_TIMEOUT_S * 2)
        result["plain_broker_says"] = [
            line
            for line in (h1.log_dir / "h1-plain-broker-0.log").read_text().splitlines()
            if "cannot start" in line
        ]

        h1.python("broker", env={**TIMINGS, "ZKV_FRONTEND_CURVE": "1"})
        keys = h1.disk / "keys"
        wait_for(lambda: complete(keys) and (keys / "client.key_secret").exists(), "keys")
        worker_keys = copy_files(keys, h2.disk / "keys", WORKER_FILES)
        client_keys = copy_files(keys, h3.disk / "keys", CLIENT_FILES)
        for _ in range(SHARDS):
            h2.python("workers", "--processes", "1", env={**TIMINGS, "ZKV_BACKEND": backend})
        h3.python(
            "gateway",
            "--port",
            str(HTTP_PORT),
            "--processes",
            "1",
            env={**TIMINGS, "ZKV_FRONTEND": frontend, "ZKV_FRONTEND_CURVE": "1"},
        )
        result["files"] = {
            "h2": sorted(p.name for p in worker_keys.iterdir()),
            "h3": sorted(p.name for p in client_keys.iterdir()),
        }
        agent = h3.agent()

        def call(name: str, *args: Any, keys: Path | None = client_keys) -> Any:
            return agent.client(
                name, *args, frontend=frontend, keys=keys, timeout_s=REQUEST_TIMEOUT_S
            )

        wait_for(lambda: all(call("ping").result()["owned"]), "every shard to have a worker")
        wait_for(lambda: seed(agent, "/get", key="none")[0] == 200, "h3's gateway")

        # The seed API through the gateway, then the client, both from h3.
        seen: dict[str, Any] = {}
        seen["set"] = seed(agent, "/set", key="a", value="1", timeout="60")[:2]
        seen["get"] = seed(agent, "/get", key="a")[:2]
        seed(agent, "/set", key="b", value="2", timeout="60")
        seen["all"] = sorted(seed(agent, "/all")[1])
        seen["delete"] = seed(agent, "/delete", key="b")[:2]
        seen["get_deleted"] = seed(agent, "/get", key="b")[:2]
        call("set", "c", "3", 60).result()
        seen["client_get"] = call("get", "c").result()[0]
        seen["client_all"] = [entry[:2] for entry in call("all").result()]
        seen["client_delete"] = call("delete", "c").result()
        plain = agent.client("get", "a", frontend=frontend, timeout_s=2.0)
        seen["plain_client"] = [plain.error, plain.elapsed_s]
        result["seen"] = seen

        # A partition: h2 (both workers) cut off for CUT_S; every request fails cleanly. The
        # requests start once the broker has seen the workers fall silent: one sent in the
        # instant of the cut waits for an owner from the moment they are dropped, which can
        # end on a whole second and meet the resend race above.
        h2.cut()
        cut_s = time.monotonic()
        cut_until_s = cut_s + CUT_S
        wait_for(lambda: not any(call("ping").result()["owned"]), "the broker to see the cut")
        result["noticed_after_s"] = round(time.monotonic() - cut_s, 2)
        failures: list[list[Any]] = []
        while time.monotonic() < cut_until_s:
            status, body, elapsed_s = seed(agent, "/set", key="a", value="cut", timeout="60")
            failures.append(["http", status, body.get("error"), elapsed_s])
            outcome = call("get", "a")
            failures.append(["client", outcome.error, outcome.message, outcome.elapsed_s])
        h2.heal()
        healed_s = time.monotonic()
        wait_for(
            lambda: seed(agent, "/get", key="a")[0] == 200 and call("get", "a").ok,
            "requests to work after the heal",
            timeout_s=HEAL_TIMEOUT_S,
        )
        result["recovered_after_s"] = round(time.monotonic() - healed_s, 2)
        result["cut"] = failures
        result["after_heal"] = {
            "http": seed(agent, "/get", key="a")[:2],
            "client": call("get", "a").result()[0],
        }
    return result


if __name__ == "__main__":
    main()
