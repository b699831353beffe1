"""A shard's files on disk and this process's hold on them: takeover, fenced appends, compaction.

Layout (docs/persistence.md has the full story)::

    <data-dir>/shard-<n>/owner         the ownership epoch, 8 bytes; the file that is flocked
    <data-dir>/shard-<n>/log           the append-only log (workers/aof.py)
    <data-dir>/shard-<n>/log.rewrite   a compacted log being written, renamed over ``log``

Lifecycle of a :class:`ShardFiles` (one per shard a worker holds)::

    NEW        opened: the owner file is open, nothing is claimed
    TAKEN      take(): our epoch is in the owner file; replay() rebuilt the store from the log
               and opened it for appending
    SERVING    every batch runs inside fenced(): lock, check the epoch is still ours, apply and
               append, unlock; then commit() fsyncs per policy, before any reply goes out
    COMPACTING SERVING, with a thread writing log.rewrite and the loop keeping a rewrite buffer
    MOVED      fenced() found a newer epoch: ShardMoved; the owner drops everything and writes
               nothing more
    CLOSED     close(): fsync and close the descriptors (which also drops any lock)
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from workers import aof
from workers.aof import (
    MAGIC,
    AppendLog,
    DelRecord,
    DurabilityError,
    FsyncPolicy,
    LogReader,
    MemoRecord,
    MemosRecord,
    SetRecord,
    TimeRecord,
    VersionRecord,
)
from workers.idempotency import Memo, Packed, RequestMemory, packed_key
from workers.ownership import OwnerFile, OwnershipError, next_epoch
from workers.store import Clock, HighWaterClock, Snapshot, TTLStore
from zkv import defaults
from zkv.protocol import Kind

log = logging.getLogger(__name__)

# Waiting for the owner file's lock. A takeover may wait longer (the old owner may be finishing
# a batch) but not past the heartbeat liveness (3 s by default), or the broker would count this
# worker dead while it waits; a batch waits less, since the loop is blocked meanwhile.
TAKE_LOCK_TIMEOUT_S = 2.0
BATCH_LOCK_TIMEOUT_S = 0.5

# Compaction: rewrite the log once it is REWRITE_GROWTH times the size the live data had when
# last written compactly (at the last rewrite, or as estimated after a replay), and at least
# REWRITE_MIN_BYTES, as Redis's auto-aof-rewrite-percentage (100) and -min-size do.
REWRITE_GROWTH = 2
REWRITE_MIN_BYTES = 1024 * 1024
REWRITE_RETRY_S = 60.0  # after a failed rewrite, wait this long before the next attempt
REWRITE_CANCEL_WAIT_S = 0.5  # on close, how long to wait for a cancelled rewrite thread

# A full disk (see "a full disk" in ShardFiles). The free space is read with statvfs on the
# timer every NO_SPACE_CHECK_S and, between two readings, estimated as that reading minus the
# bytes appended since. A batch whose SETs would leave less than the reserve free
# (Durability.reserve_bytes, ZKV_DISK_RESERVE) has them refused before anything is applied;
# DELs may use the reserve (they are how users free space) down to DEL_FLOOR_BYTES, and so may
# compaction (it is how the log shrinks). While the estimate is more than TIGHT_MARGIN_BYTES
# above the reserve, batches are not even measured: one comparison per batch.
NO_SPACE_CHECK_S = 1.0
DISK_RESERVE_BYTES = defaults.DISK_RESERVE_BYTES
TIGHT_MARGIN_BYTES = 1024 * 1024 * 1024
DEL_FLOOR_BYTES = 64 * 1024  # DELs stop this far above a full disk (block rounding, metadata)
BATCH_SLACK_BYTES = 4096  # a batch's TIME record, and a block's rounding, on top of its records
# On a short disk, how often a compaction is tried (its thread first measures the compacted
# size and writes nothing unless it fits in the free space and shrinks the log).
NO_SPACE_REWRITE_S = 5.0

# A replay calls its progress callback (the worker heartbeats) once this many monotonic seconds
# have passed since the last call, checked after every record: by time, not by a count of
# records, whose size ranges from bytes to 64 MiB. A third of the default heartbeat interval, so
# a heartbeat due during a replay leaves at most this late; one record is read and applied between
# checks (a 64 MiB SET: tens of milliseconds).
REPLAY_PROGRESS_S = 0.3

# Bytes a record adds to its key and value: the length and CRC, then the body's fixed fields
# (a SETV: type, request id, deadline, version, key length).
SET_OVERHEAD_BYTES = aof.PREFIX_BYTES + 29


class ShardMoved(Exception):
    """The owner file holds an epoch that is not ours: a newer owner took the shard.

    Attributes:
        number: the shard.
        held: the epoch this process wrote.
        found: the epoch now in the file.
    """

    def __init__(self, number: int, held: int, found: int) -> None:
        super().__init__(f"shard {number} moved to a newer owner (epoch {found}, ours {held})")
        self.number = number
        self.held = held
        self.found = found


class RewriteStep(enum.Enum):
    """The steps of a compaction, in order; a crash after any of them loses nothing.

    Until RENAMED, ``log`` is the complete old log (every record still goes to it) and
    log.rewrite is a scratch file that replay ignores and the next takeover deletes. From
    RENAMED on, ``log`` is the new file, which already holds the snapshot and every record
    appended since, fsynced.
    """

    STARTED = 1  # log.rewrite created (empty), the snapshot taken, the thread started
    SNAPSHOT_WRITTEN = 2  # the thread wrote the snapshot to log.rewrite (not fsynced)
    BUFFER_APPENDED = 3  # the loop appended the records written during the rewrite
    SYNCED = 4  # log.rewrite fsynced
    RENAMED = 5  # log.rewrite renamed over log (under the owner lock, epoch checked)
    DIR_SYNCED = 6  # the shard directory fsynced: the rename is durable
    SWITCHED = 7  # appends now go to the new file: done


class SimulatedCrash(Exception):
    """Raised by the test hook :attr:`ShardFiles.crash_at` at a :class:`RewriteStep`."""


@dataclass(frozen=True, slots=True)
class Durability:
    """Where and how shards are stored; one per worker, shared by the shards it takes.

    Attributes:
        data_dir: the directory holding ``shard-<n>/`` directories.
        policy: when appends are fsynced.
        fsync: the fsync function (tests count calls).
        monotonic: seconds, for lock deadlines, EVERYSEC and rewrite retries (tests fake it).
        rewrite_min_bytes: see REWRITE_MIN_BYTES.
        rewrite_growth: see REWRITE_GROWTH.
        write: the write function of appends (tests inject ENOSPC).
        free_bytes: bytes free for this user on the filesystem of a path (tests fake it).
        reserve_bytes: free space writes (SETs) leave for DELs and compaction, see
            DISK_RESERVE_BYTES.
    """

    data_dir: Path
    policy: FsyncPolicy = FsyncPolicy.ALWAYS
    fsync: Callable[[int], None] = os.fsync
    monotonic: Callable[[], float] = time.monotonic
    rewrite_min_bytes: int = REWRITE_MIN_BYTES
    rewrite_growth: float = REWRITE_GROWTH
    write: Callable[[int, memoryview], int] = os.write
    free_bytes: Callable[[Path], int] = lambda path: _free_bytes(path)
    reserve_bytes: int = DISK_RESERVE_BYTES

    def shard_dir(self, number: int) -> Path:
        return self.data_dir / f"shard-{number}"


class ShardFiles:
    """One shard's directory, as held by this process (see the module docstring).

    Args:
        durability: where and how.
        number: the shard.

    Attributes:
        epoch: the epoch this process wrote into the owner file, 0 before :meth:`take`.
        crash_at: test hook: raise SimulatedCrash right after this compaction step.
    """

    def __init__(self, durability: Durability, number: int) -> None:
        self.durability = durability
        self.number = number
        self.dir = durability.shard_dir(number)
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
            aof.fsync_dir(self.dir.parent, durability.fsync)
        self.log_path = self.dir / "log"
        self.rewrite_path = self.dir / "log.rewrite"
        self.owner = OwnerFile(self.dir / "owner", durability.fsync, durability.monotonic)
        self.log: AppendLog | None = None
        self.epoch = 0
        self.base_bytes = 0  # the compact size of the data, see REWRITE_GROWTH
        # The latest time a TIME record in the log vouches for (Unix ms, 0: none): the time
        # replay starts from, and what a batch compares with (see Shard.handle_batch).
        self.time_ms = 0
        self.crash_at: RewriteStep | None = None
        self.compactions = 0  # finished since this process took the shard (its REPORT)
        self._rewrite: _Rewrite | None = None
        self._rewrite_buffer: list[bytes] = []
        self._next_rewrite_s = 0.0
        # A full disk, see "a full disk" below. Why writes are refused (None: they are not),
        # and the free space that ends it.
        self.no_space: str | None = None
        self._resume_bytes = 0
        self._next_space_check_s = 0.0
        self._next_squeeze_s = 0.0
        self._free = 0  # estimated free bytes: the last statvfs minus what was appended since
        self._tight_below = durability.reserve_bytes + TIGHT_MARGIN_BYTES
        self.tight = True  # _free is below _tight_below: batches are measured (refusal())
        # Cluster mode: called with each appended batch of records (workers/replication.py).
        self.tap: Callable[[bytes], None] | None = None

    # --- takeover ---------------------------------------------------------------------------

    def take(self, assigned_epoch: int) -> int:
        """Claim the shard: store an epoch above every earlier one, durably.

        The new epoch is ``max(assigned_epoch, stored + 1)``: the broker's number when it is
        larger (so epochs follow the broker's order), and always larger than the stored one
        (so a broker that restarted with smaller numbers still fences the previous owner out).
        A stored epoch at the limit, or a corrupt file, moves to a new era instead
        (:func:`workers.ownership.next_epoch`): still larger, never backwards.

        Returns:
            The epoch that was stored before; :attr:`epoch` is the new one.

        Raises:
            LockTimeout: the owner file stayed locked (a stopped process holds it).
            OwnershipError: the owner file is damaged.
        """
        self._cancel_rewrite()
        self.owner.lock(TAKE_LOCK_TIMEOUT_S)
        try:
            stored = self.owner.read_for_takeover()
            epoch = next_epoch(stored, assigned_epoch)
            self.owner.write(epoch)
            self.epoch = epoch
            # A compaction an earlier owner left unfinished: its scratch file is worthless.
            # Removing the name cannot hurt a process still writing it (it writes to an inode
            # nobody will ever rename), and that process can no longer rename it (fenced).
            self.rewrite_path.unlink(missing_ok=True)
        finally:
            self.owner.unlock()
        return stored

    def replay(
        self,
        store: TTLStore,
        memory: RequestMemory,
        progress: Callable[[], None] | None = None,
    ) -> int:
        """Rebuild ``store`` and ``memory`` from the log, then open it for appending.

        Keys whose deadline the store's clock has reached are dropped. A torn last record is
        cut off (a warning); damage with valid records after it raises CorruptLog. Afterwards
        the log and the directory are fsynced: what a previous owner appended but had not yet
        fsynced is on disk before this owner serves any of it.

        Args:
            store: an empty store to fill.
            memory: an empty idempotency memory to fill.
            progress: called every REPLAY_PROGRESS_S seconds (the worker heartbeats).

        Returns:
            How many records were replayed.

        Raises:
            aof.CorruptLog: the log is damaged before its end.
            ShardMoved: a newer owner took the shard while this one replayed.
            DurabilityError: a write or fsync failed.
        """
        if self.log is not None:
            self.log.close(sync=False)
            self.log = None
        aof.create_log(self.log_path, self.durability.fsync)
        records = 0
        monotonic = self.durability.monotonic
        next_progress_s = monotonic() + REPLAY_PROGRESS_S
        clock = store.clock
        floor = clock.raise_to if isinstance(clock, HighWaterClock) else None
        time_ms = 0
        with LogReader(self.log_path) as reader:
            for _, record in reader.records():
                if type(record) is TimeRecord:
                    time_ms = max(time_ms, record.now_ms)
                    if floor is not None:
                        floor(time_ms)
                _apply(record, store, memory)
                records += 1
                if progress is not None and (now_s := monotonic()) >= next_progress_s:
                    progress()
                    next_progress_s = now_s + REPLAY_PROGRESS_S
            damage = reader.damage
            size = reader.size
            valid_end = reader.valid_end
        self.time_ms = time_ms
        if damage is not None:
            self._cut_torn_tail(damage, size, valid_end)
        self.log = AppendLog(
            self.log_path,
            self.durability.policy,
            self.durability.fsync,
            self.durability.monotonic,
            self.durability.write,
        )
        self.log.sync()
        aof.fsync_dir(self.dir, self.durability.fsync)
        self.base_bytes = compact_size(store.snapshot(), memory, store.clock())
        self._read_free()
        return records

    def install(
        self,
        path: Path,
        store: TTLStore,
        memory: RequestMemory,
        progress: Callable[[], None] | None = None,
    ) -> int:
        """Replace the log with the whole log at ``path`` (in this directory, written and
        fsynced by the caller: a snapshot a follower got from its leader), then rebuild
        ``store`` and ``memory`` from it as :meth:`replay` does.

        A compaction under way is cancelled first: its rename would put the old data back.
        The rename happens inside :meth:`fenced` and the directory is fsynced after it, so a
        crash leaves either the old log or the new one, never a mix.

        Returns:
            How many records were replayed.

        Raises:
            ShardMoved, LockTimeout: the owner file says another process holds the shard.
            aof.CorruptLog: the new log is damaged (the old one is gone: ask for another).
            DurabilityError: the rename, a write or an fsync failed.
        """
        self._cancel_rewrite()
        if self.log is not None:
            self.log.close(sync=False)  # replaced whole: nothing of it needs to reach the disk
            self.log = None
        with self.fenced(TAKE_LOCK_TIMEOUT_S):
            try:
                os.rename(path, self.log_path)
            except OSError as exc:
                raise DurabilityError(f"renaming {path} over {self.log_path}: {exc}") from exc
        aof.fsync_dir(self.dir, self.durability.fsync)
        return self.replay(store, memory, progress)

    def _cut_torn_tail(self, damage: aof.Damage, size: int, valid_end: int) -> None:
        if size > 0:  # an empty file is one created by a crash before its magic: not worth a word
            log.warning(
                "log %s: the last record, at byte %d, is torn (%s): truncated %d byte(s) left "
                "by a write cut short",
                self.log_path,
                damage.offset,
                damage.reason,
                size - valid_end,
            )
        with self.fenced(TAKE_LOCK_TIMEOUT_S):
            os.truncate(self.log_path, valid_end)
            if valid_end < len(MAGIC):  # the magic itself was cut short: start the file over
                fd = os.open(self.log_path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
                try:
                    aof.write_all(fd, MAGIC)
                finally:
                    os.close(fd)

    # --- serving ----------------------------------------------------------------------------

    @contextmanager
    def fenced(self, timeout_s: float = BATCH_LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the owner lock with our epoch checked: what runs inside is serialised with
        every takeover, so it happens entirely before or entirely after any newer owner's.

        Raises:
            ShardMoved: the epoch is no longer ours; nothing inside ran.
            LockTimeout: the lock stayed held past ``timeout_s``; nothing inside ran.
        """
        self.fence(timeout_s)
        try:
            yield
        finally:
            self.unfence()

    def fence(self, timeout_s: float = BATCH_LOCK_TIMEOUT_S) -> None:
        """Enter :meth:`fenced` by hand (the batch path): lock, check the epoch is ours. On
        success the caller must call :meth:`unfence` (in a ``finally``); on failure the lock
        is already released.

        Raises:
            ShardMoved: the epoch is no longer ours.
            LockTimeout: the lock stayed held past ``timeout_s``.
        """
        owner = self.owner
        owner.lock(timeout_s)
        try:
            found = owner.read()
        except BaseException:
            owner.unlock()
            raise
        if found != self.epoch:
            owner.unlock()
            raise ShardMoved(self.number, self.epoch, found)

    def unfence(self) -> None:
        """Leave :meth:`fenced` entered with :meth:`fence`."""
        self.owner.unlock()

    def time_record(self, now_ms: int) -> bytes:
        """A TIME record of ``now_ms`` for the batch being written (see aof.TimeRecord)."""
        if now_ms > self.time_ms:
            self.time_ms = now_ms
        return aof.encode_time(now_ms)

    def append(self, data: bytes) -> None:
        """Append a batch's records (call inside :meth:`fenced`); not yet durable."""
        if self.log is None:
            raise RuntimeError("append() before replay(): a bug in the caller")
        self.log.append(data)
        if self.tap is not None:  # cluster mode: the leader ships exactly these bytes
            self.tap(data)
        free = self._free - len(data)
        self._free = free
        if free < self._tight_below:
            self.tight = True
        if self._rewrite is not None:
            self._rewrite_buffer.append(data)

    def commit(self) -> None:
        """After :meth:`fenced`: fsync per policy (ALWAYS: now), before the batch's replies.

        The lock is already released: the fsync, the slow part, does not hold it. That is safe
        because the data is in the page cache once written, where a new owner's replay reads
        it, and a new owner fsyncs the log before serving (see :meth:`replay`); it matters
        because a process stopped during an fsync (SIGSTOP) would otherwise keep the lock and
        with it every successor out.
        """
        if self.log is not None:
            self.log.commit()

    def tick(self, store: TTLStore, memory: RequestMemory) -> None:
        """Timers: notice a move; EVERYSEC fsync; start or finish a compaction.

        The epoch is read here too, without the lock (one pread): a former owner resumed after
        a pause learns that the shard moved within one timer pass, even if no request comes
        to make it check. Serving never relies on this read; every batch checks under the lock.

        Raises:
            ShardMoved: a newer epoch is in the owner file.
            DurabilityError: an fsync of the log failed.
        """
        if self.log is None:
            return
        found = self.owner.read()
        if found != self.epoch:
            raise ShardMoved(self.number, self.epoch, found)
        self.log.tick()
        now_s = self.durability.monotonic()
        if now_s >= self._next_space_check_s:
            self._next_space_check_s = now_s + NO_SPACE_CHECK_S
            self._check_space()
        rewrite = self._rewrite
        if rewrite is not None:
            if rewrite.done():
                self._finish_rewrite(rewrite)
        elif self._rewrite_due():
            self.start_rewrite(store, memory)
        elif (self.no_space is not None or self._free < self.durability.reserve_bytes) and (
            now_s >= self._next_squeeze_s
        ):
            # Short of space: expired keys and DELs may have left a log that compacts to far
            # less. The thread measures first and writes only if that fits and is worth it.
            self._next_squeeze_s = now_s + NO_SPACE_REWRITE_S
            self.start_rewrite(store, memory, measure=True)

    def close(self, sync: bool = True) -> None:
        """Stop using the files: cancel a compaction, fsync the log (unless ``sync`` is False,
        for a shard that moved: nothing more may be written) and close every descriptor."""
        self._cancel_rewrite()
        try:
            if self.log is not None:
                self.log.close(sync=sync)
                self.log = None
        finally:
            self.owner.close()

    # --- a full disk -------------------------------------------------------------------------

    # A full disk is not a failed disk: writes are refused (NO_SPACE), reads served, and writes
    # resume by themselves. Three layers (section 9 of docs/persistence.md):
    #
    # 1. Up front (refusal(), called by Shard.handle_batch while `tight`): a batch's records
    #    are bounded from its requests' sizes before anything is applied. If its SETs would
    #    leave less than the reserve free (by the estimate, then by a fresh statvfs), they are
    #    refused and nothing of them is applied: no undo, no replay. DELs may go on into the
    #    reserve. Free space below the reserve itself starts "refusing mode" (no_space).
    # 2. Refusing mode: every SET is refused until the free space is at least the reserve plus
    #    the largest write refused meanwhile (hysteresis: a refused 8 MiB SET does not resume
    #    writes at 1 MiB free only to be refused again), checked by the timer.
    # 3. An ENOSPC the estimate did not foresee (another process filled the disk):
    #    AppendLog.append truncates the log back, Shard._no_space undoes the batch in memory by
    #    a replay (heartbeating), and refuse_writes() starts refusing mode with the same
    #    hysteresis over the failed write, from the real free space; so a replay needs the
    #    disk to be filled behind the worker's back again, never once a second by itself.
    # A failed fsync is different and still stops the worker.

    def refusal(self, set_bytes: int, del_bytes: int) -> tuple[str, bool] | None:
        """Whether a batch whose records are at most ``set_bytes`` (of SETs) plus ``del_bytes``
        (of DELs) may be applied (None), or why its SETs are refused and whether its DELs may
        still be applied (they fit above DEL_FLOOR_BYTES). Reads are never refused."""
        reserve = self.durability.reserve_bytes
        need = set_bytes + del_bytes + BATCH_SLACK_BYTES
        if self.no_space is None:
            if not set_bytes and not del_bytes:
                return None
            if self._free - need >= (reserve if set_bytes else DEL_FLOOR_BYTES):
                return None
            self._read_free()  # near the line: look at the real free space once
            if self._free - need >= (reserve if set_bytes else DEL_FLOOR_BYTES):
                return None
            reason = (
                f"{need} bytes to write, {max(self._free, 0)} free of which {reserve} are kept "
                f"for deletes and compaction"
            )
            if self._free < reserve:
                self._start_refusing(reason, reserve + need)
        else:
            reason = self.no_space
            if set_bytes:
                self._resume_bytes = max(self._resume_bytes, reserve + need)
        deletes = self._free - del_bytes - BATCH_SLACK_BYTES >= DEL_FLOOR_BYTES
        return reason, deletes

    def refuse_writes(self, reason: str, failed_bytes: int) -> None:
        """An append found no room (layer 3 above): refuse writes until the real free space is
        the reserve plus ``failed_bytes``."""
        self._read_free()
        self._start_refusing(reason, self.durability.reserve_bytes + failed_bytes)
        self._next_space_check_s = self.durability.monotonic() + NO_SPACE_CHECK_S

    def _start_refusing(self, reason: str, resume_bytes: int) -> None:
        if self.no_space is None:
            log.error(
                "shard %d: the disk is full (%s): refusing writes, serving reads and deletes; "
                "writes resume once %d bytes are free",
                self.number,
                reason,
                resume_bytes,
            )
            self.no_space = reason
            self._resume_bytes = resume_bytes
        else:
            self._resume_bytes = max(self._resume_bytes, resume_bytes)

    def _read_free(self) -> None:
        """Read the free space (statvfs), less what a running compaction may still write."""
        try:
            free = self.durability.free_bytes(self.dir)
        except OSError as exc:
            log.warning("shard %d: cannot read the free space: %s", self.number, exc)
            return
        rewrite = self._rewrite
        if rewrite is not None:
            free -= rewrite.pending()
        self._free = free
        self.tight = free < self._tight_below

    def _check_space(self) -> None:
        self._read_free()
        reserve = self.durability.reserve_bytes
        if self.no_space is None and self._free < reserve:
            why = f"{max(self._free, 0)} bytes free, less than the {reserve} kept in reserve"
            self._start_refusing(why, reserve + BATCH_SLACK_BYTES)
        if self.no_space is not None and self._free >= self._resume_bytes:
            log.info(
                "shard %d: %d bytes free on the disk: accepting writes again",
                self.number,
                self._free,
            )
            self.no_space = None

    # --- compaction -------------------------------------------------------------------------

    # Compaction (Redis's BGREWRITEAOF, with a thread where Redis forks).
    #
    # The log only grows: every overwrite and delete leaves the older records behind, and keys
    # that expired are still there. Compaction writes a new log holding just the present: the
    # idempotency memory as MEMOS records, then one SET per live key.
    #
    # How, without stopping the loop: the loop takes a snapshot (dict copies, see
    # TTLStore.snapshot and RequestMemory.frozen) and hands it to a thread that encodes and
    # writes log.rewrite. Meanwhile the loop goes on serving and appends each batch's records
    # both to the old log (which therefore stays complete) and to an in-memory rewrite buffer.
    # When the thread is done, the loop, between two batches, appends the buffer to
    # log.rewrite, fsyncs it, renames it over log under the owner lock with the epoch checked,
    # fsyncs the directory, and continues appending to the new file. Steps: RewriteStep.
    #
    # Why nothing is lost at any crash: see RewriteStep. Why a paused former owner cannot
    # spoil it: it creates log.rewrite and renames it only inside fenced(), and a takeover
    # unlinks a stale log.rewrite, so a former owner's thread writes to a file nobody renames.
    #
    # Limits: the buffer holds in memory every record written during the rewrite; the thread
    # competes with the loop for the GIL, so throughput drops while it runs; a failure (disk
    # full) abandons the rewrite, keeps the old log, and retries after REWRITE_RETRY_S.

    def _rewrite_due(self) -> bool:
        log_ = self.log
        if log_ is None or self.durability.monotonic() < self._next_rewrite_s:
            return False
        threshold = max(
            self.durability.rewrite_min_bytes, self.durability.rewrite_growth * self.base_bytes
        )
        return log_.size >= threshold

    def start_rewrite(self, store: TTLStore, memory: RequestMemory, measure: bool = False) -> None:
        """Start compacting the log now (the loop calls it via :meth:`tick` when due).

        With ``measure`` (and whenever the disk is `tight`), the thread first measures the
        compacted size and writes nothing unless it fits in the free space (the reserve
        included: compaction is what frees the disk) and shrinks the log (see _Rewrite.measure).

        Raises:
            ShardMoved: the shard moved; nothing was started.
        """
        if self._rewrite is not None or self.log is None:
            return
        try:
            with self.fenced():
                self.rewrite_path.unlink(missing_ok=True)
                fd = os.open(
                    self.rewrite_path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                    0o644,
                )
        except OwnershipError as exc:
            self._next_rewrite_s = self.durability.monotonic() + REWRITE_RETRY_S
            log.warning("compaction of %s postponed: %s", self.log_path, exc)
            return
        except OSError as exc:
            self._next_rewrite_s = self.durability.monotonic() + REWRITE_RETRY_S
            log.error("compaction of %s not started: %s", self.log_path, exc)
            return
        rewrite = _Rewrite(
            fd,
            store.snapshot(),
            memory.runs(),
            store.clock,
            store.clock(),
            self.durability.write,
        )
        rewrite.log_bytes = self.log.size
        if measure or self.tight:
            rewrite.fits = self._compaction_fits
        self._rewrite = rewrite
        self._rewrite_buffer = []
        log.info(
            "compacting %s (%d bytes): writing %d keys and %d remembered requests to %s",
            self.log_path,
            self.log.size,
            len(rewrite.snapshot),
            rewrite.memo_count,
            self.rewrite_path.name,
        )
        rewrite.start()
        self._reached(RewriteStep.STARTED)

    def wait_rewrite(self, timeout_s: float) -> bool:
        """Wait for the compaction thread (tests); True if none is running any more."""
        rewrite = self._rewrite
        if rewrite is None:
            return True
        rewrite.join(timeout_s)
        return rewrite.done()

    @property
    def rewriting(self) -> bool:
        """Whether a compaction is in progress."""
        return self._rewrite is not None

    def _finish_rewrite(self, rewrite: _Rewrite) -> None:
        if self.log is None:
            raise RuntimeError("a rewrite finished on a closed log: a bug in the caller")
        if rewrite.error is not None:
            self._abandon_rewrite(f"the thread failed: {rewrite.error}")
            return
        if rewrite.skipped is not None:
            self._skip_rewrite(rewrite.skipped)
            return
        self._reached(RewriteStep.SNAPSHOT_WRITTEN)
        fsync = self.durability.fsync
        try:
            aof.write_all(rewrite.fd, b"".join(self._rewrite_buffer), self.durability.write)
            self._reached(RewriteStep.BUFFER_APPENDED)
            fsync(rewrite.fd)
            self._reached(RewriteStep.SYNCED)
            with self.fenced():
                os.rename(self.rewrite_path, self.log_path)
                self._reached(RewriteStep.RENAMED)
        except (DurabilityError, OSError, OwnershipError) as exc:
            self._abandon_rewrite(str(exc))
            return
        except ShardMoved:
            self._abandon_rewrite("the shard moved")
            raise
        # From here the new file is the log: an fsync failure is a failure of the log itself.
        aof.fsync_dir(self.dir, fsync)
        self._reached(RewriteStep.DIR_SYNCED)
        old_size = self.log.size
        size = os.fstat(rewrite.fd).st_size
        self.log.switch(rewrite.take_fd(), size)
        self._rewrite = None
        self._rewrite_buffer = []
        self.base_bytes = size
        self.compactions += 1
        log.info("compacted %s: %d bytes -> %d bytes", self.log_path, old_size, size)
        self._reached(RewriteStep.SWITCHED)
        self._check_space()  # the old log's room is free now: writes may resume at once

    def _compaction_fits(self, size: int, log_bytes: int) -> str | None:
        """For the measuring thread: None if a compacted log of ``size`` bytes fits in the free
        space now (the reserve included) and frees at least an eighth of the ``log_bytes`` log
        (and 64 KiB), else why not. Runs on the thread: a statvfs, nothing of the loop's."""
        try:
            free = self.durability.free_bytes(self.dir)
        except OSError as exc:
            return f"cannot read the free space: {exc}"
        if size + BATCH_SLACK_BYTES + DEL_FLOOR_BYTES > free:
            return f"{size} bytes compacted do not fit in the {free} bytes free"
        if log_bytes - size < max(DEL_FLOOR_BYTES, log_bytes // 8):
            return f"{size} bytes compacted would not shrink the log of {log_bytes} bytes enough"
        return None

    def _skip_rewrite(self, why: str) -> None:
        """A measured compaction that found it would not fit or not help: nothing was written
        but the empty scratch file; no error, the next attempt in NO_SPACE_REWRITE_S."""
        self._drop_rewrite(NO_SPACE_REWRITE_S)
        self._next_squeeze_s = self._next_rewrite_s
        log.info("compaction of %s not done: %s", self.log_path, why)

    def _abandon_rewrite(self, why: str) -> None:
        self._drop_rewrite(REWRITE_RETRY_S)
        log.error(
            "compaction of %s abandoned (%s); the log is unchanged, next attempt in %.0f s",
            self.log_path,
            why,
            REWRITE_RETRY_S,
        )

    def _drop_rewrite(self, retry_s: float) -> None:
        """Stop the compaction under way, if any, and delete its scratch file; the next one
        may start ``retry_s`` from now."""
        rewrite = self._rewrite
        self._rewrite = None
        self._rewrite_buffer = []
        self._next_rewrite_s = self.durability.monotonic() + retry_s
        if rewrite is not None:
            rewrite.cancel(0)
        # The scratch file may be most of a disk that is now full: give the room back. Only
        # inside the fence: a newer owner may be writing a log.rewrite of its own.
        try:
            with self.fenced():
                self.rewrite_path.unlink(missing_ok=True)
        except (OwnershipError, OSError, ShardMoved) as exc:
            log.warning("%s left in place: %s", self.rewrite_path, exc)

    def _cancel_rewrite(self) -> None:
        rewrite = self._rewrite
        self._rewrite = None
        self._rewrite_buffer = []
        if rewrite is not None:
            rewrite.cancel(REWRITE_CANCEL_WAIT_S)

    def _reached(self, step: RewriteStep) -> None:
        if self.crash_at is step:
            self._cancel_rewrite()  # a real crash stops the thread too
            raise SimulatedCrash(step.name)


class _Rewrite:
    """The compaction thread: writes the snapshot to an open log.rewrite.

    The descriptor belongs to whoever finishes last: the loop takes it (take_fd) once the
    thread is done; a cancelled rewrite's descriptor is closed by the thread, or by cancel()
    if the thread already ended. Closing it while the thread may still write could let the
    number be reused by another open file and the thread write into that.
    """

    def __init__(
        self,
        fd: int,
        snapshot: Snapshot,
        runs: list[tuple[int, list[Packed]]],
        clock: Clock,
        now_ms: int,
        write: Callable[[int, memoryview], int] = os.write,
    ) -> None:
        self.fd = fd
        self._write_fn = write
        self.runs = runs
        self.memo_count = sum(len(entries) for _, entries in runs)
        self.now_ms = now_ms  # the store's clock when the snapshot was taken
        self.snapshot = snapshot
        self._clock = clock
        self.error: BaseException | None = None
        # Measuring first (a short disk): the size of the log when started, the check that
        # the compacted size fits and helps (None: no measuring), its size once measured, why
        # it wrote nothing (None: it did not give up), and the bytes written so far.
        self.log_bytes = 0
        self.fits: Callable[[int, int], str | None] | None = None
        self.size: int | None = None
        self.skipped: str | None = None
        self.written = 0
        self._cancelled = threading.Event()
        self._fd_lock = threading.Lock()
        self._fd_open = True
        self._thread = threading.Thread(target=self._run, name="zkv-compaction", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def pending(self) -> int:
        """Bytes the thread may still write: of the measured size; none while it measures or
        once it gave up (it writes only what fits, checked against the real free space); of
        the old log's size if it does not measure (a compacted log is not larger than the
        log it compacts, give or take a few records)."""
        if self.fits is None:
            return max(0, self.log_bytes - self.written)
        if self.size is None or self.skipped is not None:
            return 0
        return max(0, self.size - self.written)

    def take_fd(self) -> int:
        """The finished file's descriptor, now the caller's to close."""
        with self._fd_lock:
            self._fd_open = False
            return self.fd

    def cancel(self, wait_s: float) -> None:
        self._cancelled.set()
        self._thread.join(wait_s)
        if self.done():
            self._close_fd()

    def _close_fd(self) -> None:
        with self._fd_lock:
            if self._fd_open:
                self._fd_open = False
                os.close(self.fd)

    def _run(self) -> None:
        try:
            if self.fits is not None:
                self.size = self._measure()
                self.skipped = self.fits(self.size, self.log_bytes)
                if self.skipped is not None:
                    return
            for data in compacted_log(self.snapshot, self.runs, self._clock, self.now_ms):
                self._write(data)
        except BaseException as exc:  # reported to the loop, which abandons the rewrite
            self.error = exc
        finally:
            if self._cancelled.is_set():
                self._close_fd()

    def _measure(self) -> int:
        """The size of the file :meth:`_run` would write (as compact_size, from the snapshot)."""
        data = sum(
            SET_OVERHEAD_BYTES + len(k) + len(v) for k, v, _ in self.snapshot.live(self._clock())
        )
        memos = 0
        head = aof.PREFIX_BYTES + aof.MEMOS_HEAD_BYTES
        for _, run in self.runs:
            memos += sum(len(e) if type(e) is bytes else len(e[0]) + len(e[1]) for e in run)
            memos += -(-len(run) // aof.MEMOS_PER_RECORD) * head
        times = (len(self.runs) + 2) * len(aof.encode_time(self.now_ms))
        return len(MAGIC) + data + memos + times

    def _write(self, data: bytes) -> None:
        if self._cancelled.is_set():
            raise _Cancelled
        aof.write_all(self.fd, data, self._write_fn)
        self.written += len(data)


def compacted_log(
    snapshot: Snapshot, runs: list[tuple[int, list[Packed]]], clock: Clock, now_ms: int
) -> Iterator[bytes]:
    """The bytes of a compacted log of this data, in pieces of about aof.WRITE_CHUNK_BYTES
    (more for a record larger than that): what compaction writes to log.rewrite, and what a
    leader sends a follower as a SNAPSHOT (workers/replication.py). Lazy, so a large store is
    never encoded whole in memory.

    Args:
        snapshot: the store's records (TTLStore.snapshot), read as ``live(clock())``.
        runs: the idempotency memory (RequestMemory.runs).
        clock: the store's clock, read once the memory is written.
        now_ms: the store's clock when the snapshot was taken.
    """
    # The high-water mark first: the time the snapshot's absence of expired keys shows; then
    # the version counter's, so a replay never gives a version again, deleted keys' included.
    chunk: list[bytes] = [
        MAGIC,
        aof.encode_time(now_ms),
        aof.encode_version(snapshot.last_version),
    ]
    pending = len(MAGIC)
    # The memory, run by run: the time its entries were remembered, then the entries. Never
    # past now_ms: a memory rebuilt by replay (or by a follower) dates its entries at the end
    # of their TIME record's interval, up to TIME_RECORD_INTERVAL_MS ahead of the clock, and a
    # TIME record that far ahead would raise the next replay's clock (HighWaterClock) and
    # expire keys early. Every entry was applied by now_ms, so it is never taken for older.
    for time_ms, entries in runs:
        chunk.append(aof.encode_time(min(time_ms, now_ms)))
        for record in aof.encode_memos(entries):
            chunk.append(record)
            pending += len(record)
            if pending >= aof.WRITE_CHUNK_BYTES:
                yield b"".join(chunk)
                chunk, pending = [], 0
    # The snapshot's time again: what the rewrite buffer appended after it follows it.
    chunk.append(aof.encode_time(now_ms))
    encode_setv = aof.encode_setv
    for key, value, deadline_ms, version in snapshot.versioned(clock()):
        record = encode_setv(0, key, value, deadline_ms, version)
        chunk.append(record)
        pending += len(record)
        if pending >= aof.WRITE_CHUNK_BYTES:
            yield b"".join(chunk)
            chunk, pending = [], 0
    yield b"".join(chunk)


class _Cancelled(Exception):
    """The rewrite thread stops early."""


# --- replay -----------------------------------------------------------------------------------


_SET = int(Kind.SET)
_DEL = int(Kind.DEL)


def _apply(record: aof.Record, store: TTLStore, memory: RequestMemory) -> None:
    """Apply one log record to a store and memory being rebuilt."""
    match record:
        case SetRecord(request_id, key, value, deadline_ms, version):
            store.restore(key, value, deadline_ms, version)
            memory.remember_write(request_id, _SET, key, zlib.crc32(value), deadline_ms)
        case DelRecord(request_id, key, version):
            store.remove(key)
            store.note_version(version)
            memory.remember_write(request_id, _DEL, key, 0, None)
        case VersionRecord(version):
            store.note_version(version)
        case TimeRecord(now_ms):
            # What follows was applied less than an interval after now_ms: remembered as of
            # the end of that interval, so an entry is never taken for older than it is.
            memory.begin(now_ms + aof.TIME_RECORD_INTERVAL_MS)
        case MemosRecord(entries):
            restore = memory.restore
            for entry in entries:
                restore(entry)
        case MemoRecord(request_id, kind, status, deadline_ms, fingerprint, key):  # older logs
            memory.remember(request_id, Memo(kind, key, fingerprint, status, deadline_ms))


# The public name of :func:`_apply`, for a follower applying the records its leader ships
# (workers/replication.py): the same decoding as replay, never a second copy of it.
apply_record = _apply


def _free_bytes(path: Path) -> int:
    """Bytes an unprivileged write may still use on the filesystem holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def compact_size(snapshot: Snapshot, memory: RequestMemory, now_ms: int) -> int:
    """The size a compacted log of this data would have (an estimate within a few bytes)."""
    data = sum(SET_OVERHEAD_BYTES + len(k) + len(v) for k, v, _ in snapshot.live(now_ms))
    entries = memory.packed()
    memos = sum(aof.MEMOS_ENTRY.size + len(packed_key(p)) for _, p in entries)
    records = -(-len(entries) // aof.MEMOS_PER_RECORD)
    versions = aof.PREFIX_BYTES + 9  # the VERSION record
    return (
        len(MAGIC) + data + memos + records * (aof.PREFIX_BYTES + aof.MEMOS_HEAD_BYTES) + versions
    )
