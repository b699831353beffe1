"""The cluster's schema in etcd: its configuration, members, shard leaders, in-sync sets.

Everything lives under ``/zkv/<cluster-name>/`` (the name from ``--cluster-name``, so one etcd
serves several clusters); values are JSON written and read only here::

    config                        {"shards": N, "replicas": R, "cluster_id": "<16 hex>"}
    brokers/<broker-id>           {"backend", "frontend", "public_key"}    under the broker's lease
    workers/<worker-id>           {"host", "replication", "durable"}      under the worker's lease
    shards/<n>/leader             {"worker", "replication"}               under the leader's lease
    shards/<n>/isr                {"members": [ids, leader first], "epoch": E}       no lease
    shards/<n>/replica/<worker>   ""                                     under the follower's lease

**A shard's epoch is the create_revision of its leader key.** etcd's revision is one counter
for the whole store that every write raises, so a leader key created later has a larger
create_revision than any before it: the epoch increases strictly across every failover,
restart and broker change, and no clock is involved (Kleppmann's fencing token, taken from the
store). A leader's lease lapsing makes etcd delete the key, so the next campaign can only
create a new one, with a new, larger revision.

Every write that depends on what was read is one transaction whose compares fence it (the
leader key's create_revision equals my epoch; the in-sync set's mod_revision is the one I
read), so two processes can never both succeed on one view. Since zkv/etcd.py sends a write
again to the next endpoint when an answer is lost, each write here also recognises its own
earlier success in the failure branch (the leader key holds my lease; the in-sync set already
holds what I wrote) instead of mistaking it for a lost race.

Values read from etcd are checked like any answer from a peer: a malformed one raises
:class:`BadValue` (an EtcdError) naming the key; the listings (:meth:`Coordinator.leaders`,
:meth:`Coordinator.brokers`, :meth:`Coordinator.workers`) leave such an entry out and log it
once, so one bad key cannot hide the others.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from zkv.etcd import KV, Compare, Etcd, EtcdError, EtcdUnavailable, delete, get, put

log = logging.getLogger(__name__)

LEASE_MARGIN = 0.10  # valid_until ends this fraction of the TTL early (clock-rate drift)
KEEPALIVES_PER_TTL = 3  # a lease is renewed every TTL / 3
KEEPALIVE_RETRY_S = 0.2  # after a failed renewal, the next attempt comes this much later
CONFIG_POLL_S = 0.2  # read_config polls this often while the config is not there yet
CLAIM_ATTEMPTS = 3  # claim_replica retries a claim that lost a race this many times
MAX_ID_CHARS = 128  # cluster names, broker, worker and host ids
MAX_SHARD = 1_000_000  # shard numbers in keys are below this
MAX_MEMBERS = 64  # workers in one in-sync set (a leader and its followers)
_REPORTED_MAX = 1000  # malformed keys remembered so that each is logged once

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")


def check_id(text: str, what: str) -> str:
    """``text`` if it can be one segment of a key (a cluster name, broker, worker or host id):
    letters, digits and ``_.:@-``, starting with a letter or digit, at most MAX_ID_CHARS.

    Raises:
        ValueError: naming ``what``.
    """
    if not isinstance(text, str) or len(text) > MAX_ID_CHARS or not _ID.fullmatch(text):
        raise ValueError(
            f"{what} {text!r}: use letters, digits and _.:@- (starting with a letter or digit), "
            f"at most {MAX_ID_CHARS} characters"
        )
    return text


class ConfigMismatch(Exception):
    """This process was started with a shard count or replication factor other than the
    cluster's (as the first broker wrote them into etcd)."""


class ConfigMissing(Exception):
    """No cluster configuration appeared in etcd within the wait (no broker has started)."""


class BadValue(EtcdError):
    """A value in etcd under the cluster's prefix is not what this module writes there."""


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster's fixed shape, written once by the first broker."""

    shards: int
    replicas: int
    cluster_id: str

    def check(self, shards: int, replicas: int) -> None:
        """Raise ConfigMismatch unless this process's ``shards`` and ``replicas`` are the
        cluster's; the message names both values of each, so the operator sees what to fix."""
        wrong = []
        if shards != self.shards:
            wrong.append(f"ZKV_SHARDS is {shards} here but {self.shards} in the cluster")
        if replicas != self.replicas:
            wrong.append(f"ZKV_REPLICAS is {replicas} here but {self.replicas} in the cluster")
        if wrong:
            raise ConfigMismatch(
                f"cluster {self.cluster_id}: {'; '.join(wrong)} (a cluster's shape is fixed "
                "at its first start: start with the cluster's values)"
            )


@dataclass(frozen=True)
class BrokerInfo:
    """What workers need to reach a broker (``public_key``: its CURVE key, z85, or None;
    ``events_backend``: where workers publish change events, None if it has none)."""

    backend: str
    frontend: str
    public_key: str | None
    events_backend: str | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as others see it: its host (placement), replication endpoint, durability."""

    host: str
    replication: str
    durable: bool


class Leader(NamedTuple):
    """A shard's leader: who, in which epoch, and where its followers connect."""

    worker: str
    epoch: int
    endpoint: str


@dataclass(frozen=True)
class Isr:
    """A shard's in-sync set as read from etcd.

    Attributes:
        members: worker ids, the leader that wrote it first.
        epoch: the epoch of the leader that wrote it. (A campaign writes the set in the same
            transaction that creates the leader key, before it can know that key's revision;
            it stores 0, which reads as the set's own mod_revision: the same transaction, so
            the same revision as the leader key's create_revision.)
        mod_revision: the revision of that write: what a change must compare against.
    """

    members: tuple[str, ...]
    epoch: int
    mod_revision: int


# --- values: written and read only here ------------------------------------------------------


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _load(kv: KV) -> dict[str, Any]:
    try:
        value = json.loads(kv.value)
    except (ValueError, UnicodeDecodeError):
        raise BadValue(f"etcd key {_key_text(kv.key)}: the value is not JSON") from None
    if not isinstance(value, dict):
        raise BadValue(f"etcd key {_key_text(kv.key)}: the value is not a JSON object")
    return value


def _key_text(key: bytes) -> str:
    return repr(key[:200].decode("utf-8", "replace"))


def _field(kv: KV, value: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    item = value.get(name)
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise BadValue(f"etcd key {_key_text(kv.key)}: field {name!r} is missing or wrong")
    if isinstance(item, str) and len(item) > 4096:
        raise BadValue(f"etcd key {_key_text(kv.key)}: field {name!r} is too long")
    return item


def _optional(kv: KV, value: dict[str, Any], name: str) -> str | None:
    """A string field that older writers leave out (None then)."""
    return None if value.get(name) is None else _field(kv, value, name, str)


def _count(kv: KV, value: dict[str, Any], name: str, low: int, high: int) -> int:
    number = _field(kv, value, name, int)
    if not low <= number <= high:
        raise BadValue(f"etcd key {_key_text(kv.key)}: {name} {number} is outside {low}..{high}")
    return int(number)


def parse_config(kv: KV) -> ClusterConfig:
    value = _load(kv)
    cluster_id = _field(kv, value, "cluster_id", str)
    if not re.fullmatch(r"[0-9a-f]{16}", cluster_id):
        raise BadValue(f"etcd key {_key_text(kv.key)}: cluster_id is not 16 hex digits")
    return ClusterConfig(
        shards=_count(kv, value, "shards", 1, MAX_SHARD),
        replicas=_count(kv, value, "replicas", 0, MAX_MEMBERS - 1),
        cluster_id=cluster_id,
    )


def parse_broker(kv: KV) -> BrokerInfo:
    value = _load(kv)
    key = value.get("public_key")
    if key is not None and not (isinstance(key, str) and len(key) == 40):
        raise BadValue(f"etcd key {_key_text(kv.key)}: public_key is not a z85 key or null")
    return BrokerInfo(
        backend=_field(kv, value, "backend", str),
        frontend=_field(kv, value, "frontend", str),
        public_key=key,
        events_backend=_optional(kv, value, "events_backend"),
    )


def parse_worker(kv: KV) -> WorkerInfo:
    value = _load(kv)
    return WorkerInfo(
        host=_field(kv, value, "host", str),
        replication=_field(kv, value, "replication", str),
        durable=_field(kv, value, "durable", bool),
    )


def parse_leader(kv: KV) -> Leader:
    value = _load(kv)
    worker = _field(kv, value, "worker", str)
    try:
        check_id(worker, "worker id")
    except ValueError as exc:
        raise BadValue(f"etcd key {_key_text(kv.key)}: {exc}") from None
    return Leader(worker, kv.create_revision, _field(kv, value, "replication", str))


def parse_isr(kv: KV) -> Isr:
    value = _load(kv)
    members = _field(kv, value, "members", list)
    if not 1 <= len(members) <= MAX_MEMBERS or len(set(map(str, members))) != len(members):
        raise BadValue(f"etcd key {_key_text(kv.key)}: members is not 1..{MAX_MEMBERS} ids")
    for member in members:
        if not isinstance(member, str) or not _ID.fullmatch(member) or len(member) > MAX_ID_CHARS:
            raise BadValue(f"etcd key {_key_text(kv.key)}: a member is not a worker id")
    epoch = _count(kv, value, "epoch", 0, 2**63 - 1)
    return Isr(tuple(members), epoch or kv.mod_revision, kv.mod_revision)


# --- the lease keeper --------------------------------------------------------------------------


class Lease:
    """An etcd lease kept alive by a daemon thread, and the time until which its holder may act.

    The timing argument. A keepalive sent at local monotonic time ``t0`` reaches etcd at some
    ``t1 >= t0``; etcd then expires the lease no earlier than ``t1 + TTL`` by its own clock. So
    ``t0 + TTL`` is a lower bound of the expiry, however long the request and its answer took,
    provided the two clocks run at the same rate; ``LEASE_MARGIN`` (10%) absorbs a difference
    of rates (and etcd only ever lengthens a lease, when its leader changes). Hence
    :meth:`valid_until` = ``t0 + TTL * 0.9``, with ``t0`` read BEFORE the request is sent: a
    holder that acts only while ``clock() < valid_until()`` stops before etcd can delete its
    keys and let another process take over. Renewals run every ``TTL / 3``, so two may fail
    (etcd unreachable) before the holder has to stop; each call is bounded by ``TTL / 3``.

    Once etcd says the lease is gone (a renewal answers TTL 0, or the lease was revoked) it
    stays lost: :attr:`lost` is set, :meth:`valid_until` is ``-inf`` and ``on_lost`` runs
    once on the keeper thread. Until then a failed renewal only stops ``valid_until`` from
    moving; a later success moves it on again (etcd still held the lease, so its keys were never
    deleted and nobody else can have taken them over).

    Args:
        etcd: the client to copy (the keeper uses its own connections).
        ttl_s: the TTL to ask for; etcd may grant more (its minimum), never less.
        clock: monotonic seconds (injected by tests).
        on_lost: called once, on the keeper thread, when the lease is found gone.
    """

    def __init__(
        self,
        etcd: Etcd,
        ttl_s: int,
        clock: Callable[[], float] = time.monotonic,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        if ttl_s < 1:
            raise ValueError(f"a lease TTL is at least 1 s, got {ttl_s}")
        self._etcd = etcd.copy(timeout_s=min(etcd.timeout_s, ttl_s / KEEPALIVES_PER_TTL))
        self._asked_ttl_s = ttl_s
        self._clock = clock
        self._on_lost = on_lost
        self.id = 0
        self.ttl_s = 0
        self.lost = False
        self._valid_until = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def grant(self) -> int:
        """Ask etcd for the lease; its id. Raises EtcdError (EtcdUnavailable) on failure."""
        sent_at = self._clock()
        self.id, self.ttl_s = self._etcd.lease_grant(self._asked_ttl_s)
        self._valid_until = sent_at + self.ttl_s * (1 - LEASE_MARGIN)
        log.info("lease %x granted for %d s", self.id, self.ttl_s)
        return self.id

    def renew(self) -> bool:
        """One keepalive; True if etcd renewed the lease, False if it is gone (now lost).

        Raises:
            EtcdError: etcd could not be asked (valid_until stays where it was).
        """
        if self.lost:
            return False
        sent_at = self._clock()
        ttl_s = self._etcd.lease_keepalive(self.id)
        if ttl_s <= 0:
            self._mark_lost()
            return False
        self.ttl_s = ttl_s
        self._valid_until = max(self._valid_until, sent_at + ttl_s * (1 - LEASE_MARGIN))
        return True

    def valid_until(self) -> float:
        """The clock time before which the holder may act on what it holds under this lease."""
        return float("-inf") if self.lost else self._valid_until

    def valid(self) -> bool:
        """Whether the holder may act now."""
        return self._clock() < self.valid_until()

    def start(self) -> Lease:
        """Grant the lease (unless granted) and start renewing it on a daemon thread."""
        if not self.id:
            self.grant()
        self._thread = threading.Thread(target=self._keep, name=f"lease-{self.id:x}", daemon=True)
        self._thread.start()
        return self

    def close(self, revoke: bool = True) -> None:
        """Stop renewing and (by default) revoke the lease, which deletes its keys at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._etcd.timeout_s + KEEPALIVE_RETRY_S)
        if revoke and self.id and not self.lost:
            self._valid_until = float("-inf")
            try:
                self._etcd.lease_revoke(self.id)
            except EtcdError as exc:
                log.warning("lease %x not revoked (it expires on its own): %s", self.id, exc)
            self.lost = True
        self._etcd.close()

    def _mark_lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        self._valid_until = float("-inf")
        log.warning("lease %x is gone: etcd has deleted the keys held under it", self.id)
        if self._on_lost is not None:
            self._on_lost()

    def _keep(self) -> None:
        """The keeper thread: renew every TTL/3, sooner again after a failure, until stopped
        or lost. One log line when renewals start failing and one when they work again."""
        failing = False
        wait_s = self.ttl_s / KEEPALIVES_PER_TTL
        while not self._stop.wait(wait_s):
            try:
                renewed = self.renew()
            except EtcdError as exc:
                if not failing:
                    log.warning("lease %x not renewed, retrying: %s", self.id, exc)
                failing = True
                wait_s = min(KEEPALIVE_RETRY_S, self.ttl_s / KEEPALIVES_PER_TTL)
                continue
            if not renewed:
                return
            if failing:
                log.info("lease %x renewed again", self.id)
                failing = False
            wait_s = self.ttl_s / KEEPALIVES_PER_TTL


def _lease_id(lease: Lease | int) -> int:
    return lease.id if isinstance(lease, Lease) else lease


# --- the schema ---------------------------------------------------------------------------------


class Coordinator:
    """The cluster's state in etcd, for brokers and workers.

    Args:
        etcd: the client (zkv/etcd.py); its errors pass through (EtcdUnavailable: try later).
        cluster_name: the name under which this cluster's keys live (``--cluster-name``).
    """

    def __init__(self, etcd: Etcd, cluster_name: str = "zkv") -> None:
        self.etcd = etcd
        self.prefix = f"/zkv/{check_id(cluster_name, 'cluster name')}/"
        self._reported: set[tuple[bytes, int]] = set()

    # --- keys -----------------------------------------------------------------------------

    def key(self, *parts: object) -> str:
        """The key of ``parts`` under this cluster's prefix."""
        return self.prefix + "/".join(str(part) for part in parts)

    def _shard_key(self, shard: int, *parts: str) -> str:
        if not isinstance(shard, int) or not 0 <= shard < MAX_SHARD:
            raise ValueError(f"shard {shard!r} is not 0..{MAX_SHARD - 1}")
        return self.key("shards", shard, *parts)

    # --- configuration --------------------------------------------------------------------

    def bootstrap(self, shards: int, replicas: int) -> ClusterConfig:
        """Write the cluster's shape if nobody has (one txn: create if absent), else check it.

        Returns:
            The cluster's config (with its cluster_id, new or existing).

        Raises:
            ConfigMismatch: the cluster has another shard count or replication factor.
        """
        if not 1 <= shards < MAX_SHARD or not 0 <= replicas < MAX_MEMBERS:
            raise ValueError(f"shards {shards} or replicas {replicas} out of range")
        key = self.key("config")
        mine = ClusterConfig(shards, replicas, secrets.token_hex(8))
        value = {"shards": shards, "replicas": replicas, "cluster_id": mine.cluster_id}
        result = self.etcd.txn([Compare.absent(key)], [put(key, _dump(value))], [get(key)])
        if result.succeeded:
            log.info(
                "cluster %s created: %d shards, %d replicas", mine.cluster_id, shards, replicas
            )
            return mine
        kvs = result.responses[0]
        if not isinstance(kvs, list) or not kvs:
            raise BadValue(f"etcd key {key!r}: exists, yet reads as absent")
        config = parse_config(kvs[0])
        config.check(shards, replicas)
        return config

    def read_config(
        self,
        timeout_s: float,
        poll_s: float = CONFIG_POLL_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ClusterConfig:
        """The cluster's config, waiting up to ``timeout_s`` for a broker to write it.

        Raises:
            ConfigMissing: not there after ``timeout_s`` (etcd's last error, if any, named).
        """
        deadline = clock() + timeout_s
        last: Exception | None = None
        while True:
            try:
                kv = self.etcd.get(self.key("config"))
            except EtcdUnavailable as exc:
                kv, last = None, exc
            if kv is not None:
                return parse_config(kv)
            if clock() >= deadline:
                why = f" (etcd: {last})" if last else " (start a broker first)"
                raise ConfigMissing(f"no cluster config at {self.key('config')}{why}")
            sleep(poll_s)

    # --- members --------------------------------------------------------------------------

    def register_broker(self, broker_id: str, info: BrokerInfo, lease: Lease | int) -> None:
        """Announce a broker under its lease (gone when the lease lapses)."""
        key = self.key("brokers", check_id(broker_id, "broker id"))
        value = {"backend": info.backend, "frontend": info.frontend, "public_key": info.public_key}
        if info.events_backend is not None:
            value["events_backend"] = info.events_backend
        self.etcd.put(key, _dump(value), _lease_id(lease))

    def register_worker(self, worker_id: str, info: WorkerInfo, lease: Lease | int) -> None:
        """Announce a worker under its lease (gone when the lease lapses)."""
        key = self.key("workers", check_id(worker_id, "worker id"))
        check_id(info.host, "host id")
        value = {"host": info.host, "replication": info.replication, "durable": info.durable}
        self.etcd.put(key, _dump(value), _lease_id(lease))

    def brokers(self) -> dict[str, BrokerInfo]:
        """Every registered broker by id (malformed entries left out and logged once)."""
        return self._listing("brokers", parse_broker)

    def live_brokers(self) -> dict[str, BrokerInfo]:
        """:meth:`brokers`, but of brokers sharing one backend endpoint only the newest
        registration (largest create revision). A broker restarted on its address registers
        under a new id while its predecessor's key lingers until that lease runs out (up to
        the TTL): a worker linked to both holds two sockets with one routing id to one
        ROUTER, which refuses the second; when the first closes, the broker drops the worker
        and the other socket never registers."""
        prefix = self.key("brokers") + "/"
        newest: dict[str, tuple[int, str, BrokerInfo]] = {}
        for kv in self.etcd.range_prefix(prefix):
            name = kv.key[len(prefix) :].decode("utf-8", "replace")
            try:
                info = parse_broker(kv)
                check_id(name, "brokers id")
            except (BadValue, ValueError) as exc:
                self._report(kv, exc)
                continue
            seen = newest.get(info.backend)
            if seen is None or kv.create_revision > seen[0]:
                newest[info.backend] = (kv.create_revision, name, info)
        return {name: info for _, name, info in newest.values()}

    def workers(self) -> dict[str, WorkerInfo]:
        """Every registered worker by id (malformed entries left out and logged once)."""
        return self._listing("workers", parse_worker)

    def _listing(self, kind: str, parse: Callable[[KV], Any]) -> dict[str, Any]:
        prefix = self.key(kind) + "/"
        found: dict[str, Any] = {}
        for kv in self.etcd.range_prefix(prefix):
            name = kv.key[len(prefix) :].decode("utf-8", "replace")
            try:
                found[check_id(name, f"{kind} id")] = parse(kv)
            except (BadValue, ValueError) as exc:
                self._report(kv, exc)
        return found

    def _report(self, kv: KV, exc: Exception) -> None:
        mark = (kv.key, kv.mod_revision)
        if mark in self._reported:
            return
        if len(self._reported) >= _REPORTED_MAX:
            self._reported.clear()
        self._reported.add(mark)
        log.warning("ignoring etcd key %s: %s", _key_text(kv.key), exc)

    # --- shard leadership -----------------------------------------------------------------

    def campaign(self, shard: int, worker_id: str, endpoint: str, lease: Lease | int) -> int | None:
        """Become the shard's leader if it has none and I may: my epoch, or None.

        One txn: the leader key is absent AND the in-sync set is as I just read it (absent, or
        listing me). Only then the leader key is created under my lease and the set becomes
        me first, then its other members but the previous leader (its first member, whose key
        lapsed); the new leader shrinks the rest later if they lag, fenced by its epoch.
        Requiring membership means only a worker holding every acknowledged write can win.

        Returns:
            The epoch (the new leader key's create_revision, which is the txn's revision), or
            None: there is a leader, I am not in the in-sync set, or the set changed meanwhile.

        Raises:
            LeaseNotFound: the lease has expired (a new one is needed).
        """
        check_id(worker_id, "worker id")
        leader_key = self._shard_key(shard, "leader")
        isr_key = self._shard_key(shard, "isr")
        lease_id = _lease_id(lease)
        isr_kv = self.etcd.get(isr_key)
        members: list[str] = [worker_id]
        if isr_kv is not None:
            isr = parse_isr(isr_kv)
            if worker_id not in isr.members:
                return None
            # The set's first member is the leader that wrote it, whose key has lapsed: it is
            # dead or cut off, and waiting for it to be removed for lagging held every first
            # write of the new epoch for --replica-lag. It follows again to come back.
            previous = isr.members[0]
            members += [m for m in isr.members if m not in (worker_id, previous)]
        leader_value = _dump({"worker": worker_id, "replication": endpoint})
        isr_value = _dump({"members": members, "epoch": 0})  # 0: this txn's revision, see Isr
        result = self.etcd.txn(
            [
                Compare.absent(leader_key),
                Compare.mod_revision(isr_key, isr_kv.mod_revision if isr_kv else 0),
            ],
            [put(leader_key, leader_value, lease_id), put(isr_key, isr_value)],
            [get(leader_key)],
        )
        if result.succeeded:
            log.info("shard %d: %s leads in epoch %d", shard, worker_id, result.revision)
            return result.revision
        kvs = result.responses[0]
        if isinstance(kvs, list) and kvs and kvs[0].lease == lease_id and lease_id:
            leader = parse_leader(kvs[0])
            if leader.worker == worker_id:  # my own earlier attempt, whose answer was lost
                return leader.epoch
        return None

    def resign(self, shard: int, epoch: int) -> bool:
        """Give up leading (delete my leader key, only if it is still the one of ``epoch``)."""
        leader_key = self._shard_key(shard, "leader")
        result = self.etcd.txn(
            [Compare.create_revision(leader_key, epoch)], [delete(leader_key)], []
        )
        return result.succeeded

    def leader(self, shard: int) -> Leader | None:
        """The shard's leader now, or None."""
        kv = self.etcd.get(self._shard_key(shard, "leader"))
        return parse_leader(kv) if kv is not None else None

    def leaders(self) -> dict[int, Leader]:
        """Every shard's leader (shards with none, or a malformed key, are left out): the
        brokers' routing table, one range request."""
        prefix = self.key("shards") + "/"
        found: dict[int, Leader] = {}
        for kv in self.etcd.range_prefix(prefix):
            shard_text, slash, rest = kv.key[len(prefix) :].partition(b"/")
            if rest != b"leader":
                continue
            try:
                if not (slash and shard_text.isdigit() and len(shard_text) <= 6):
                    raise BadValue("not a shard number")
                shard = int(shard_text)
                if shard >= MAX_SHARD:
                    raise BadValue("not a shard number")
                found[shard] = parse_leader(kv)
            except BadValue as exc:
                self._report(kv, exc)
        return found

    # --- in-sync sets ---------------------------------------------------------------------

    def read_isr(self, shard: int) -> Isr | None:
        """The shard's in-sync set, or None if no leader ever wrote one."""
        kv = self.etcd.get(self._shard_key(shard, "isr"))
        return parse_isr(kv) if kv is not None else None

    def shrink_isr(self, shard: int, epoch: int, seen: Isr, members: Iterable[str]) -> Isr | None:
        """Remove members from the in-sync set, as the leader of ``epoch``; the new set, or
        None when refused (I no longer lead in ``epoch``, or the set changed since ``seen``).

        The leader must call this, and see it succeed, BEFORE it acknowledges a write without
        a removed follower: a follower outside the set can never win a campaign, so it is
        safe for it to miss acknowledged writes.
        """
        wanted = self._members(members)
        if not set(wanted) <= set(seen.members):
            raise ValueError(f"shrink_isr: {wanted} is not a subset of {list(seen.members)}")
        return self._write_isr(shard, epoch, seen, wanted)

    def expand_isr(self, shard: int, epoch: int, seen: Isr, members: Iterable[str]) -> Isr | None:
        """Add caught-up followers to the in-sync set, as the leader of ``epoch``; the new set,
        or None when refused (as for :meth:`shrink_isr`)."""
        wanted = self._members(members)
        if not set(seen.members) <= set(wanted):
            raise ValueError(f"expand_isr: {wanted} does not contain {list(seen.members)}")
        return self._write_isr(shard, epoch, seen, wanted)

    @staticmethod
    def _members(members: Iterable[str]) -> list[str]:
        wanted = [check_id(m, "worker id") for m in members]
        if not 1 <= len(wanted) <= MAX_MEMBERS or len(set(wanted)) != len(wanted):
            raise ValueError(f"an in-sync set is 1..{MAX_MEMBERS} distinct workers: {wanted}")
        return wanted

    def _write_isr(self, shard: int, epoch: int, seen: Isr, wanted: list[str]) -> Isr | None:
        leader_key = self._shard_key(shard, "leader")
        isr_key = self._shard_key(shard, "isr")
        result = self.etcd.txn(
            [
                Compare.create_revision(leader_key, epoch),
                Compare.mod_revision(isr_key, seen.mod_revision),
            ],
            [put(isr_key, _dump({"members": wanted, "epoch": epoch}))],
            [get(leader_key), get(isr_key)],
        )
        if result.succeeded:
            return Isr(tuple(wanted), epoch, result.revision)
        leader_kvs, isr_kvs = result.responses
        if (
            isinstance(leader_kvs, list)
            and isinstance(isr_kvs, list)
            and leader_kvs
            and isr_kvs
            and leader_kvs[0].create_revision == epoch
        ):
            now = parse_isr(isr_kvs[0])
            if now.members == tuple(wanted) and now.epoch == epoch:  # my earlier, lost answer
                return now
        log.info("shard %d: in-sync set change refused (epoch %d is not current)", shard, epoch)
        return None

    # --- follower slots -------------------------------------------------------------------

    def claim_replica(self, shard: int, worker_id: str, lease: Lease | int, limit: int) -> bool:
        """Take one of the shard's ``limit`` follower slots under my lease; whether I hold one.

        The count is checked in the txn itself: it compares that no slot was created or
        rewritten since the listing was read, so two workers racing for the last slot cannot
        both get it (the loser retries, up to CLAIM_ATTEMPTS times, and then sees it full).
        """
        check_id(worker_id, "worker id")
        prefix = self._shard_key(shard, "replica") + "/"
        mine = prefix + worker_id
        lease_id = _lease_id(lease)
        for _ in range(CLAIM_ATTEMPTS):
            slots = self.etcd.range_prefix(prefix)
            if any(kv.key == mine.encode() and kv.lease == lease_id for kv in slots):
                return True
            others = [kv for kv in slots if kv.key != mine.encode()]
            if len(others) >= limit:
                return False
            newest = max((kv.mod_revision for kv in slots), default=0)
            result = self.etcd.txn(
                [Compare.unchanged_since(prefix, newest)], [put(mine, b"", lease_id)], []
            )
            if result.succeeded:
                return True
        return False

    def release_replica(self, shard: int, worker_id: str) -> None:
        """Give my follower slot back."""
        self.etcd.delete(self._shard_key(shard, "replica", check_id(worker_id, "worker id")))

    def replicas(self, shard: int) -> list[str]:
        """The workers holding the shard's follower slots."""
        prefix = self._shard_key(shard, "replica") + "/"
        found = []
        for kv in self.etcd.range_prefix(prefix):
            name = kv.key[len(prefix) :].decode("utf-8", "replace")
            try:
                found.append(check_id(name, "worker id"))
            except ValueError as exc:
                self._report(kv, exc)
        return found
