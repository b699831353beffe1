"""Cluster mode on five test hosts (as tests/netns/cluster_chaos.py lays them out): shard 0's
leader's host cut off for CUT_S under a recorded workload, then healed; then a broker killed
under clients that know both frontends.

1. The chaos workload (writers owning their keys, readers; client, seed API, REST API) runs
   while the script cuts shard 0's leader's host off CUT_AT_S in, for CUT_S, and heals it.
   tests/chaos.py's checker judges every read and the final reads (no acknowledged write
   lost, no read older than the last acknowledged write), and the workers' logs, on the
   hosts' shared clock, give each leader's interval: from "took shard N epoch E" to "no
   longer leader of shard N" (or its kill). None may overlap another's on the same shard,
   and no (shard, epoch) may be taken twice.
2. A client given both frontends (ZKV_FRONTEND=a,b as a list) writes one key at a time while
   the broker it uses is killed (SIGKILL of the process) and started again: it must see
   latency, not errors.

Prints what it saw as JSON (tests/process/test_cluster_hosts.py judges it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.hosts import Hosts, scenario
from tests.netns.cluster_chaos import ClusterChaos, ClusterChaosConfig
from zkv.client import Client

CUT_AT_S = 1.5
CUT_S = 10.0
LOAD_S = CUT_AT_S + CUT_S + 2.0  # the workload goes on a little after the heal
BROKER_PHASE_S = 4.0  # writes through two frontends while one broker dies
CONFIG = ClusterChaosConfig(
    duration_s=LOAD_S,
    seed=20261206,
    script="cut-leader",
    cut_at_s=CUT_AT_S,
    cut_s=CUT_S,
    final_kill=False,
    writers=3,
    readers=3,
    keys_per_writer=6,
    timeout_s=5.0,
)


def broker_death(chaos: ClusterChaos) -> dict[str, Any]:
    """Writes through a client with both frontends while the first broker is killed."""
    cluster = chaos.cluster
    found: dict[str, Any] = {"errors": [], "error_count": 0, "acked": 0, "max_latency_s": 0.0}
    try:
        client = Client(",".join(cluster.frontends), timeout_s=5.0, keys=str(cluster.client_keys))
    except Exception as exc:  # the single-frontend client refuses a list
        found["errors"].append(f"{type(exc).__name__}: {exc}")
        found["error_count"] += 1
        return found
    victim = cluster.broker_hosts[0]
    killed = False
    started = time.monotonic()
    n = 0
    try:
        while time.monotonic() - started < BROKER_PHASE_S:
            if not killed and time.monotonic() - started > 0.5:
                cluster.kill_process(victim, cluster.brokers[victim.name])
                killed = True
            n += 1
            sent = time.monotonic()
            try:
                client.set(f"b{n}", "v")
                found["acked"] += 1
            except Exception as exc:
                found["error_count"] += 1
                if len(found["errors"]) < 5:
                    found["errors"].append(f"{type(exc).__name__}: {exc}")
            found["max_latency_s"] = max(found["max_latency_s"], time.monotonic() - sent)
        cluster.start_broker(victim)
        missing = [k for k in range(1, n + 1) if _missing(client, f"b{k}")]
        found["checked"] = n
        found["missing"] = len(missing)
    finally:
        client.close()
    found["max_latency_s"] = round(found["max_latency_s"], 3)
    return found


def _missing(client: Client, key: str) -> bool:
    try:
        client.get(key)
        return False
    except Exception:
        return True


@scenario
def main(workdir: Path) -> dict[str, Any]:
    """A leader's host cut off and healed under a checked workload; a broker killed."""
    with Hosts(5, workdir, operator=True) as hosts:
        chaos = ClusterChaos(CONFIG, hosts)
        report = chaos.run()
        cut = [e for e in report["nemesis"] if e["action"] == "cut"]
        result: dict[str, Any] = {"summary": report["summary"], "cut": cut}
        result["lost"] = report["lost"][:5]
        result["invalid"] = report["invalid"][:5]
        result["double_owner"] = report["double_owner"][:5]
        result["shared_epochs"] = report["shared_epochs"]
        result["shard0"] = [
            [i["log"], i["epoch"], i["start_ms"], i["end_ms"], i["ended_by"]]
            for i in sorted(report["ownership"], key=lambda i: i["start_ms"])
            if i["shard"] == 0
        ]
        result["broker"] = broker_death(chaos)
        chaos.cluster.close()
    (workdir / "report.json").write_text(json.dumps(report) + "\n")
    return result


if __name__ == "__main__":
    main()
