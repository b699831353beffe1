"""What a worker in cluster mode should do next, decided from a snapshot of etcd: pure logic.

docs/cluster.md tells the whole story; in short, a worker is one of

    STANDBY    holds no shard; waits for a shard that needs a leader or a follower
    FOLLOWER   copies shard N's log from its leader (workers/replication.py); in N's in-sync
               replica set (ISR) once caught up
    LEADER     serves shard N for every broker, under a lease; ships its log to the followers

and moves between them only through etcd transactions (zkv/coordination.py), never on its
own say: a shard's leader is whoever holds its leader key, and the key can only be created by
a worker in the shard's ISR (or by anyone for a shard that has never had data). So a standby
never becomes leader of a shard whose data it lacks, and only a follower that holds every
acknowledged write can succeed a leader.

:func:`next_step` looks at one snapshot (:class:`View`) and names one step; the worker's
control thread carries it out as one etcd transaction, which fails harmlessly when the
snapshot was stale. No clock, no I/O: tested in tests/unit/test_roles.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Leader:
    """A shard's leader key: the worker holding it, its epoch (the key's create revision)
    and where it ships its log from."""

    worker: str
    epoch: int
    replication: str


@dataclass(frozen=True, slots=True)
class View:
    """One reading of the cluster's state in etcd.

    Attributes:
        shards: the cluster's shard count.
        replicas: followers wanted per shard.
        hosts: each live worker's host id (``ZKV_HOST_ID``), by worker id.
        leaders: each led shard's leader.
        isr: each shard's in-sync replica set (absent: the shard never had data).
        followers: the workers holding a follower slot of each shard.
    """

    shards: int
    replicas: int
    hosts: dict[str, str] = field(default_factory=dict)
    leaders: dict[int, Leader] = field(default_factory=dict)
    isr: dict[int, tuple[str, ...]] = field(default_factory=dict)
    followers: dict[int, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """One thing to do: ``campaign`` (become leader of ``shard``), ``follow`` (claim a
    follower slot of ``shard``), ``step_down`` (give up what this worker has: its leader or
    follower role is over), ``resign`` (delete a leader key naming this worker, which leads
    nothing), or ``idle``."""

    action: str
    shard: int | None = None
    why: str = ""


IDLE = Step("idle")


def next_step(view: View, me: str, role: str, shard: int | None) -> Step:
    """The next step for worker ``me``, now ``role`` ("standby", "follower" or "leader") of
    ``shard`` (None for a standby).

    A leader whose key is gone or names someone else steps down (its lease lapsed: it may no
    longer acknowledge anything, whatever it believes). A follower of a shard whose leader key
    is gone campaigns if it is in the ISR; a follower that lost its slot steps down. A standby
    campaigns for a shard that never had data and has no leader (lowest first), else claims a
    follower slot of a led shard that has fewer followers than wanted and no copy on its host:
    two copies of a shard never share a host (a shard short of followers for want of another
    host stays short, and /v1/health shows it).
    """
    if role == "leader":
        leader = view.leaders.get(shard) if shard is not None else None
        if leader is None or leader.worker != me:
            return Step("step_down", shard, "its leader key is gone or names another worker")
        return IDLE
    if role == "follower" and shard is not None:
        leader = view.leaders.get(shard)
        if leader is None:
            if me in view.isr.get(shard, ()):
                return Step("campaign", shard, "its leader is gone and this worker is in sync")
            return IDLE  # wait: an in-sync follower takes it, or the old leader returns
        if me not in view.followers.get(shard, frozenset()):
            return Step("step_down", shard, "its follower slot is gone")
        return IDLE
    host = view.hosts.get(me)
    for number, leader in view.leaders.items():
        if leader.worker == me:
            # It stepped down (its lease seemed to lapse, a stall, a restart of etcd) but the
            # key under its lease lives on: brokers would route to a worker serving nothing.
            return Step("resign", number, "a leader key names this worker, which leads nothing")
    for number in range(view.shards):
        if number not in view.leaders and me in view.isr.get(number, ()):
            # Restarted on the disk that holds every acknowledged write (workers/member.py).
            return Step("campaign", number, "its leader is gone and this worker's data is in sync")
    for number in range(view.shards):
        if number not in view.leaders and not view.isr.get(number):
            return Step("campaign", number, "the shard has no data and no leader yet")
    for number in range(view.shards):
        leader = view.leaders.get(number)
        if leader is None:
            continue
        # A follower that became leader may still hold its follower slot for a moment.
        followers = view.followers.get(number, frozenset()) - {leader.worker}
        if len(followers) >= view.replicas:
            continue
        copies = {view.hosts.get(leader.worker)} | {view.hosts.get(w) for w in followers}
        if host is not None and host in copies:
            continue
        return Step("follow", number, f"shard {number} has {len(followers)} of its followers")
    return IDLE
