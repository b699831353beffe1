"""The chaos test's cluster mode (``python -m tests.chaos --cluster``): a cluster-mode zkv on
test hosts under a nemesis of host kills, partitions (cut, heal) and broker kills, checked by
tests/chaos.py's exact history checker, plus the ownership checks of cluster mode.

Hosts (tests/netns/cluster_kit.py): h1 etcd and the gateway (never harmed: etcd's own failure
is tests/process/test_cluster_mode.py's), h2 and h3 a broker and a worker each, h4 and h5 a
worker each; 2 shards, ZKV_REPLICAS=1, CURVE everywhere, 1 s leases, 0.2 s heartbeats, fsync
always. The workload is tests/chaos.py's (writers owning their keys, readers, through the
client, the seed API and the REST API); every client and the gateway know both brokers.

The nemesis (seeded), one fault at a time, a pause of up to ``fault_interval_s`` between:

* ``kill``: SIGKILL every process of a worker host (a broker host's broker too); started again
  on its disk after up to RESTART_DELAY_MAX_S;
* ``cut``: a host's link down for ``cut_s`` (a partition: its processes live on), then healed;
* ``broker``: SIGKILL a broker process, started again after up to RESTART_DELAY_MAX_S;
* once, with ``away_s``: a worker host killed and kept down that long while the other faults
  go on, so that it must catch up from a snapshot and the log tail when it returns.

Or a script instead (``script="cut-leader"``, the suite's partition scenario): shard 0's
leader's host cut off for ``cut_s`` at ``cut_at_s``, then healed.

At the end: everything healed and started again; optionally (``final_kill``) every worker
host killed at once and started again, so each key's last value must come back from the disks;
once every shard is led and in sync, every key is read once more and the history is checked.
Ownership, from the workers' logs on the hosts' shared clock: an interval runs from "took shard
N epoch E" to "no longer leader of shard N" (or the process's kill); ``double_owner`` counts
overlapping intervals of one shard in different processes, ``shared_epochs`` (shard, epoch)
pairs taken by two processes.

Run as a scenario (``python -m tests.chaos --cluster`` does it through tests.hosts.run_scenario):
the report goes to ``<workdir>/report.json``; the scenario prints its summary as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chaos import (
    Api,
    Op,
    Recorder,
    _final_reads,
    _reader,
    _summarize,
    _writer,
    check_history,
    double_owners,
    now_ms,
    parse_ownership,
    shared_epochs,
    writer_keys,
)
from tests.cluster import logs_of
from tests.hosts import Host, Hosts
from tests.netns.cluster_kit import HTTP_PORT, ClusterOnHosts

RESTART_DELAY_MAX_S = 1.0  # a killed host or broker is started again after up to this long
JOIN_GRACE_S = 8.0  # after the load: the threads' last requests (timeout + HTTP grace)
RECOVERY_TIMEOUT_S = 40.0  # every shard led through every broker and in sync again


@dataclass(frozen=True, slots=True)
class ClusterChaosConfig:
    """One cluster chaos run (see the module docstring).

    Attributes:
        duration_s: how long the workload and the nemesis run.
        seed: seeds the workload's and the nemesis's choices.
        faults: the nemesis's kinds of fault, among ``kill``, ``cut``, ``broker``.
        fault_interval_s: the longest pause between two faults.
        cut_s: how long a cut lasts (random: from half of it to all of it; script: exactly).
        away_s: 0, or a worker host kept down this long once (while other faults go on).
        script: ``random`` (the nemesis above) or ``cut-leader``.
        cut_at_s: the script's cut, this long after the load starts.
        final_kill: kill every worker host at once after the load, then start them again.
        writers, readers, keys_per_writer, timeout_s: the workload (tests/chaos.py).
    """

    duration_s: float = 60.0
    seed: int = 1
    faults: tuple[str, ...] = ("kill", "cut", "broker")
    fault_interval_s: float = 3.0
    cut_s: float = 4.0
    away_s: float = 0.0
    script: str = "random"
    cut_at_s: float = 2.0
    final_kill: bool = True
    writers: int = 4
    readers: int = 4
    keys_per_writer: int = 8
    timeout_s: float = 5.0


class HostNemesis:
    """Kills hosts, cuts them off, kills brokers; restores whatever it harmed when stopped."""

    def __init__(self, cluster: ClusterOnHosts, config: ClusterChaosConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.rng = random.Random(f"{config.seed}-nemesis")
        self.events: list[dict[str, Any]] = []
        self.counts = {"host_kills": 0, "cuts": 0, "broker_kills": 0, "away": 0}
        self.away: dict[str, Any] | None = None
        self._down: set[str] = set()  # hosts killed, not yet started again
        self._cut: set[str] = set()
        self._lock = threading.Lock()

    # --- one fault each ---

    def kill_host(self, host: Host, final: bool = False) -> None:
        with self._lock:
            self.cluster.kill_host(host)
            self._down.add(host.name)
        if not final:
            self.counts["host_kills"] += 1
        self._event("kill host (final)" if final else "kill host", host)

    def start_host(self, host: Host) -> None:
        with self._lock:
            if host.name in self._down:
                self.cluster.restart(host)
                self._down.discard(host.name)
                self._event("start host", host)

    def cut(self, host: Host) -> None:
        with self._lock:
            host.cut()
            self._cut.add(host.name)
        self.counts["cuts"] += 1
        self._event("cut", host)

    def heal(self, host: Host) -> None:
        with self._lock:
            if host.name in self._cut:
                host.heal()
                self._cut.discard(host.name)
                self._event("heal", host)

    def kill_broker(self, host: Host, stop: threading.Event) -> None:
        with self._lock:
            if host.name in self._down:
                return
            self.cluster.kill_process(host, self.cluster.brokers[host.name])
        self.counts["broker_kills"] += 1
        self._event("kill broker", host)
        stop.wait(self.rng.uniform(0.2, RESTART_DELAY_MAX_S))
        with self._lock:
            if host.name not in self._down:
                self.cluster.start_broker(host)
                self._event("start broker", host)

    def _event(self, action: str, host: Host) -> None:
        self.events.append({"at_ms": now_ms(), "action": action, "host": host.name})

    # --- schedules ---

    def run(self, stop: threading.Event, deadline: float) -> None:
        try:
            if self.config.script == "cut-leader":
                self._cut_leader(stop)
            else:
                self._random(stop, deadline)
        finally:
            self.restore()

    def _cut_leader(self, stop: threading.Event) -> None:
        if stop.wait(self.config.cut_at_s):
            return
        victim = self.cluster.leader_host(0)
        self.cut(victim)
        stop.wait(self.config.cut_s)
        self.heal(victim)

    def _random(self, stop: threading.Event, deadline: float) -> None:
        cluster, config, rng = self.cluster, self.config, self.rng
        started = time.monotonic()
        away_at = started + 0.2 * config.duration_s if config.away_s > 0 else float("inf")
        away_host: Host | None = None
        away_until = float("inf")
        while not stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            if away_host is None and now >= away_at:
                away_host = rng.choice(cluster.worker_hosts)
                self.kill_host(away_host)
                self.counts["away"] += 1
                away_until, away_at = now + config.away_s, float("inf")
            if away_host is not None and now >= away_until:
                self.start_host(away_host)
                self.away = {"host": away_host.name, "back_ms": now_ms()}
                away_host, away_until = None, float("inf")
            if stop.wait(rng.uniform(0.3, 1.0) * config.fault_interval_s):
                return
            spared = {away_host.name} if away_host is not None else set()
            fault = rng.choice(config.faults)
            if fault == "kill":
                candidates = [h for h in cluster.worker_hosts if h.name not in spared]
                if away_host is not None:
                    # Never both copies of a shard down: the host away holds one of each.
                    continue
                victim = rng.choice(candidates)
                self.kill_host(victim)
                stop.wait(rng.uniform(0.2, RESTART_DELAY_MAX_S))
                self.start_host(victim)
            elif fault == "cut":
                hosts = {h.name: h for h in [*cluster.broker_hosts, *cluster.worker_hosts]}
                if away_host is not None:
                    continue  # as for kills: a cut host is as good as down for its shards
                victim = hosts[rng.choice(sorted(hosts))]
                self.cut(victim)
                stop.wait(rng.uniform(0.5, 1.0) * config.cut_s)
                self.heal(victim)
            elif fault == "broker":
                live = [h for h in cluster.broker_hosts if h.name not in spared]
                self.kill_broker(rng.choice(live), stop)
        if away_host is not None:
            self.start_host(away_host)
            self.away = {"host": away_host.name, "back_ms": now_ms()}

    def restore(self) -> None:
        """Heal every cut, start every host that is down."""
        for host in self.cluster.hosts:
            self.heal(host)
            self.start_host(host)


class ClusterChaos:
    """One run: start, load under the nemesis, restore, (final kill), recover, read, check."""

    def __init__(self, config: ClusterChaosConfig, hosts: Hosts) -> None:
        self.config = config
        h1, h2, h3, h4, h5 = hosts
        self.cluster = ClusterOnHosts(
            hosts, etcd=h1, brokers=[h2, h3], workers=[h2, h3, h4, h5], gateway=h1
        )
        self.nemesis = HostNemesis(self.cluster, config)
        self.keys = [
            key for w in range(config.writers) for key in writer_keys(w, config.keys_per_writer)
        ]
        self.recorders: list[Recorder] = []
        self.apis: list[Api] = []
        self.threads: list[threading.Thread] = []
        self.crashes: list[str] = []
        self.stop = threading.Event()
        self.final_ops: list[Op] = []
        self.timings: dict[str, float] = {}

    def _api(self, n: int) -> Api:
        cluster = self.cluster
        # Every broker, each thread's list starting with another: both carry load, and a
        # client whose broker dies moves to the other.
        k = n % len(cluster.frontends)
        frontend = ",".join(cluster.frontends[k:] + cluster.frontends[:k])
        api = Api(
            frontend,
            HTTP_PORT,
            self.config.timeout_s,
            http_host=cluster.gateway_host.address if cluster.gateway_host else "127.0.0.1",
            keys=str(cluster.client_keys),
        )
        self.apis.append(api)
        return api

    def _spawn(self, name: str, n: int, body: Any, *args: Any) -> None:
        recorder, api = Recorder(name), self._api(n)
        self.recorders.append(recorder)
        rng = random.Random(f"{self.config.seed}-{name}")

        def target() -> None:
            try:
                body(recorder, api, rng, *args)
            except Exception as exc:  # a bug of this script, not of the cluster
                self.crashes.append(f"{name}: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=target, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def run(self) -> dict[str, Any]:
        config, cluster = self.config, self.cluster
        t0 = time.monotonic()
        cluster.start()
        self.timings["start_s"] = time.monotonic() - t0
        deadline = time.monotonic() + config.duration_s
        for n in range(config.writers):
            own = writer_keys(n, config.keys_per_writer)
            self._spawn(f"writer-{n}", n, _writer, n, own, self.stop, deadline)
        for n in range(config.readers):
            self._spawn(f"reader-{n}", n, _reader, self.keys, self.stop, deadline)
        nemesis = threading.Thread(
            target=self.nemesis.run, args=(self.stop, deadline), name="nemesis", daemon=True
        )
        nemesis.start()
        self.stop.wait(config.duration_s)
        self.stop.set()
        join_by = time.monotonic() + config.timeout_s + JOIN_GRACE_S
        for thread in [nemesis, *self.threads]:
            thread.join(max(0.0, join_by - time.monotonic()))
        stuck = sum(t.is_alive() for t in [nemesis, *self.threads])
        self.nemesis.restore()
        t1 = time.monotonic()
        final_kills = 0
        if config.final_kill:
            for host in cluster.worker_hosts:
                self.nemesis.kill_host(host, final=True)
                final_kills += 1
            for host in cluster.worker_hosts:
                self.nemesis.start_host(host)
        recovered = True
        try:
            cluster.wait_ready(RECOVERY_TIMEOUT_S)
        except AssertionError:
            recovered = False
        self.timings["recovery_s"] = time.monotonic() - t1
        if recovered:
            self.final_ops = _final_reads(self._api(0), self.keys, RECOVERY_TIMEOUT_S)
        run_end_ms = now_ms()
        for api in self.apis:
            api.close()
        cluster.close()
        return self._report(stuck, final_kills, recovered, run_end_ms)

    def _report(
        self, stuck: int, final_kills: int, recovered: bool, run_end_ms: float
    ) -> dict[str, Any]:
        history = [op for recorder in self.recorders for op in recorder.ops]
        checked = check_history([*history, *self.final_ops], keys=self.keys)
        intervals = parse_ownership(self.cluster.worker_logs(), self.ends(), run_end_ms) or []
        overlaps = double_owners(intervals)
        shared = shared_epochs(intervals)
        counts = self.nemesis.counts
        tally = argparse.Namespace(
            kills=counts["host_kills"], broker_restarts=counts["broker_kills"], unexpected_exits=0
        )
        summary = _summarize(history, checked, overlaps, tally, stuck)  # type: ignore[arg-type]
        summary.update(
            counts,
            final_kills=final_kills,
            retries=sum(getattr(api.client, "retries", 0) for api in self.apis),
            final_reads=len(self.final_ops),
            recovered=recovered,
            recovery_s=round(self.timings.get("recovery_s", 0.0), 3),
            start_s=round(self.timings.get("start_s", 0.0), 3),
            shared_epochs=len(shared),
            epochs=len({(i.shard, i.epoch) for i in intervals}),
            away=self.nemesis.away,
            crashes=self.crashes,
        )
        summary["passed"] = (
            summary["lost"] == 0
            and summary["invalid"] == 0
            and not overlaps
            and not shared
            and recovered
            and summary["unverified_keys"] == 0
            and stuck == 0
            and not self.crashes
        )
        all_ops = [*history, *self.final_ops]
        return {
            "config": dataclasses.asdict(self.config),
            "summary": summary,
            "lost": [f.as_json() for f in checked.lost],
            "invalid": [f.as_json() for f in checked.invalid],
            "unverified_keys": checked.unverified_keys,
            "double_owner": overlaps,
            "shared_epochs": shared,
            "ownership": [dataclasses.asdict(i) for i in intervals],
            "nemesis": self.nemesis.events,
            "origin_ms": min((op.start_ms for op in all_ops), default=0.0),
            "history": [op.as_json() for op in all_ops],
        }

    def ends(self) -> dict[str, tuple[float, str]]:
        return {name: (at_ms, "killed") for name, at_ms in self.cluster.killed_ms.items()}


def run(config: ClusterChaosConfig, workdir: Path) -> dict[str, Any]:
    """The run inside the test's namespaces; writes the report, returns its summary."""
    with Hosts(5, workdir, operator=True) as hosts:
        report = ClusterChaos(config, hosts).run()
    (workdir / "report.json").write_text(json.dumps(report) + "\n")
    return report["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", required=True, help="ClusterChaosConfig as JSON")
    args = parser.parse_args()
    fields = json.loads(args.config)
    fields["faults"] = tuple(fields.get("faults", ClusterChaosConfig.faults))
    try:
        summary = run(ClusterChaosConfig(**fields), args.workdir)
    except BaseException:
        traceback.print_exc()
        print(logs_of(args.workdir / "logs"), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
