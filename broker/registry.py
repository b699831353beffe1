"""Workers and the shard each owns: plain state, no sockets.

A shard is in one of two states:

* UNOWNED: no worker holds it; requests for it wait in the broker, for a bounded time.
* OWNED: exactly one worker holds it; requests for it are dispatched to that worker.

A worker is either an owner (of exactly one shard) or a standby waiting for a shard to free up.
Ownership changes only in :meth:`Registry.register`, :meth:`Registry.remove` and
:meth:`Registry.promote`, which keep the per-shard index in step with the worker records (the
records are the single source of truth; the index only makes ``owner()`` O(1)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from zkv.logs import peer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerRecord:
    """One registered worker. ``shard`` None: a standby. ``last_seen`` is monotonic seconds.

    ``durable`` and ``cluster`` are what its READY said of its storage (see
    :meth:`Registry.refusal`); ``refused`` why it may not own a shard, or None.
    """

    identity: bytes
    shard: int | None
    last_seen: float
    durable: bool = False
    cluster: int = 0
    refused: str | None = None


class Registry:
    """Registered workers and shard ownership."""

    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        self.shards = shards
        self._workers: dict[bytes, WorkerRecord] = {}  # insertion order = standby seniority
        self._owners: list[bytes | None] = [None] * shards
        # The cluster id of the first durable worker that owned a shard (None until then): from
        # then on only durable workers of this cluster may own one. See refusal().
        self.cluster: int | None = None

    def owner(self, shard: int) -> bytes | None:
        """The worker owning ``shard``, or None while it is UNOWNED."""
        return self._owners[shard]

    def get(self, identity: bytes) -> WorkerRecord | None:
        """The record of a registered worker."""
        return self._workers.get(identity)

    def register(
        self,
        identity: bytes,
        claimed: int | None,
        now: float,
        hand_out: bool = True,
        durable: bool = False,
        cluster: int = 0,
    ) -> int | None:
        """Register a worker (again) and give it a shard.

        A worker that already holds a shard's data claims it back (after a broker restart) and
        gets it if nobody else owns it; otherwise it gets the lowest unowned shard, unless
        ``hand_out`` is False (claims are still coming in), and else it becomes a standby. A
        worker that may not own a shard of this cluster (:meth:`refusal`) stays a standby
        that is never promoted; :attr:`WorkerRecord.refused` says why.

        Returns:
            The shard assigned, or None for a standby.
        """
        self.remove(identity)
        record = WorkerRecord(identity, None, now, durable, cluster)
        record.refused = self.refusal(durable, cluster)
        shard: int | None = None
        if record.refused is not None:
            pass
        elif claimed is not None and 0 <= claimed < self.shards and self._owners[claimed] is None:
            shard = claimed
        elif hand_out:
            shard = next((s for s, owner in enumerate(self._owners) if owner is None), None)
        self._workers[identity] = record
        if shard is not None:
            self._own(record, shard)
        return shard

    def refusal(self, durable: bool, cluster: int) -> str | None:
        """Why a worker with this storage may not own a shard here, or None if it may.

        Nothing ties a shard to a worker but the data directory it reads: a worker in memory,
        or one whose data directory is another (another cluster id in its manifest, or a new
        empty directory, which gets a new id), would take a durable shard over from an empty
        log, and every acknowledged write would vanish. So once a durable worker has owned a
        shard, only durable workers of its cluster may own one. Until then (a new cluster, or
        a broker just restarted: workers holding shards claim them first), anyone may.
        """
        if self.cluster is None:
            return None
        if not durable:
            return (
                f"it keeps data in memory only, and this cluster (id {self.cluster:016x}) keeps "
                f"its shards on disk: it would take a shard over from an empty log"
            )
        if cluster != self.cluster:
            return (
                f"its data directory belongs to cluster {cluster:016x}, not to this cluster "
                f"({self.cluster:016x}): it cannot see the shards' data (another --data-dir?)"
            )
        return None

    def _own(self, record: WorkerRecord, shard: int) -> None:
        record.shard = shard
        self._owners[shard] = record.identity
        if record.durable and self.cluster is None:
            self.cluster = record.cluster

    def remove(self, identity: bytes) -> WorkerRecord | None:
        """Forget a worker; its shard, if any, becomes UNOWNED. Returns its last record."""
        record = self._workers.pop(identity, None)
        if record is not None and record.shard is not None:
            self._owners[record.shard] = None
        return record

    def unowned(self) -> list[int]:
        """The shards without an owner, lowest first."""
        return [shard for shard, owner in enumerate(self._owners) if owner is None]

    def promote(self, shard: int) -> bytes | None:
        """Give an UNOWNED ``shard`` to the longest-waiting standby, if there is one."""
        if self._owners[shard] is not None:
            return None
        for record in self._workers.values():
            if record.shard is None and record.refused is None:
                record.refused = self.refusal(record.durable, record.cluster)
                if record.refused is not None:  # the cluster's identity was settled since
                    log.warning(
                        "worker %s may own no shard: %s", peer(record.identity), record.refused
                    )
                    continue
                self._own(record, shard)
                return record.identity
        return None

    def set_owner(self, shard: int, identity: bytes | None) -> None:
        """Cluster mode: make ``identity`` (a registered worker) the owner of ``shard``, or
        leave the shard UNOWNED (None). etcd, not this broker, decides who leads a shard
        (broker/cluster.py); this only mirrors that decision for routing. A worker owns at
        most one shard: one it owned before is left UNOWNED."""
        old = self._owners[shard]
        if old is not None:
            record = self._workers.get(old)
            if record is not None:
                record.shard = None
            self._owners[shard] = None
        if identity is None:
            return
        record = self._workers[identity]
        if record.shard is not None:
            self._owners[record.shard] = None
        record.shard = shard
        self._owners[shard] = identity

    def seen(self, identity: bytes, now: float) -> None:
        """Note that a worker is alive."""
        record = self._workers.get(identity)
        if record is not None:
            record.last_seen = now

    def silent_since(self, cutoff: float) -> list[bytes]:
        """Workers not heard from since ``cutoff``."""
        return [r.identity for r in self._workers.values() if r.last_seen < cutoff]

    def identities(self) -> list[bytes]:
        """Every registered worker."""
        return list(self._workers)

    def owned(self) -> list[bool]:
        """For each shard, whether it has an owner."""
        return [owner is not None for owner in self._owners]

    def standbys(self) -> int:
        """How many workers wait for a shard (refused ones not counted)."""
        return sum(1 for r in self._workers.values() if r.shard is None and r.refused is None)
