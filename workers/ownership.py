"""Ownership fencing on disk: the ``owner`` file of a shard and the flock that guards it.

The file holds one number, the shard's ownership epoch: 8 bytes, unsigned big-endian. Whoever
wrote the largest value owns the shard. Epochs are the broker's fencing tokens, so they stay
below MAX_REPORTED_TOKEN; a file holding one at or above it (written by hand, or by a broker
before READY was validated) would leave no room to grow. Then the next takeover starts a new
*era*: the file becomes 24 bytes, ``ERA_MARKER:u64 era:u64 epoch:u64``, whose value is
``era << 64 | epoch`` and so above every 8-byte value. The 8-byte prefix of a 24-byte file is the
marker, all ones, so a crash that persists the new bytes but not the new length leaves an 8-byte
file reading 2**64 - 1: still above every earlier value, never backwards.

A file of any other shape (corrupt) is refused by :meth:`OwnerFile.read` (so a serving owner
applies nothing), and read by :meth:`OwnerFile.read_for_takeover` as a value above anything it
could have held: one era above every u64 word left in it (a truncated word read as if its
missing bytes were all ones), so the takeover that rewrites it still moves forward.

A worker taking a shard writes a value larger than the one stored; before every batch it
re-reads the file under the lock and stops if the number is no longer its own.
docs/persistence.md ("Why two owners are impossible") gives the argument.

flock(2) locks belong to an open file description, not to a process: two OwnerFile objects in
one process (two separate ``open`` calls) exclude each other exactly as two processes do, which
is what lets unit tests play both owners. The lock is released by ``LOCK_UN``, by closing the
descriptor, or by the kernel when the process dies (even by SIGKILL), so a crashed owner never
leaves the shard locked. A *stopped* process (SIGSTOP) keeps its lock, which is why the lock is
held only for the few microseconds of a check and an append, and why every wait for it has a
deadline.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from zkv.protocol import MAX_REPORTED_TOKEN, U64_MAX

log = logging.getLogger(__name__)

EPOCH_BYTES = 8
ERA_MARKER = U64_MAX  # the first 8 bytes of a 24-byte (era) file
ERA_FILE_BYTES = 24
ERA_UNIT = 1 << 64  # a value is era * ERA_UNIT + epoch
# A takeover writes an epoch below this; a stored one at or above it starts a new era.
EPOCH_LIMIT = MAX_REPORTED_TOKEN
LOCK_POLL_MIN_S = 0.0005  # first pause between two LOCK_NB attempts; doubles up to the max
LOCK_POLL_MAX_S = 0.02


class OwnershipError(Exception):
    """The owner file cannot be used (unreadable, or a length that is not 0 or 8 bytes)."""


class LockTimeout(OwnershipError):
    """Another open file description held the lock past the deadline: a process stopped
    while holding it, or one taking the shard over with a slow disk."""


class OwnerFile:
    """One open description of a shard's ``owner`` file.

    Args:
        path: the file; created (empty, epoch 0) if missing.
        fsync: the fsync function; tests pass a counter.
        monotonic: seconds, for lock deadlines.
        sleep: the pause between lock attempts; tests may pass a fake.
    """

    def __init__(
        self,
        path: str | Path,
        fsync: Callable[[int], None] = os.fsync,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = str(path)
        self._fsync = fsync
        self._monotonic = monotonic
        self._sleep = sleep
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.locked = False

    def lock(self, timeout_s: float) -> None:
        """Take the exclusive lock, polling with LOCK_NB until ``timeout_s`` has passed.

        Never a blocking flock: a process stopped while holding the lock would block this one
        forever, heartbeats included.

        Raises:
            LockTimeout: not obtained in time.
        """
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:  # free, as for nearly every batch: no clock read
            self.locked = True
            return
        deadline_s = self._monotonic() + timeout_s
        pause_s = LOCK_POLL_MIN_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                remaining_s = deadline_s - self._monotonic()
                if remaining_s <= 0:
                    raise LockTimeout(
                        f"{self.path} stayed locked by another process for {timeout_s} s"
                    ) from None
                self._sleep(min(pause_s, remaining_s))
                pause_s = min(pause_s * 2, LOCK_POLL_MAX_S)
                continue
            self.locked = True
            return

    def unlock(self) -> None:
        """Release the lock (a no-op if not held)."""
        if self.locked:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.locked = False

    def read(self) -> int:
        """The stored value (``era << 64 | epoch``), 0 for an empty (new) file.

        Raises:
            OwnershipError: the file is neither empty, 8 bytes, nor 24 bytes with the marker.
                An owner serving the shard must not guess, so it applies nothing.
        """
        raw = os.pread(self.fd, ERA_FILE_BYTES + 1, 0)
        value = _decode(raw)
        if value is None:
            raise OwnershipError(
                f"{self.path} holds {len(raw)} bytes, expected {EPOCH_BYTES} or "
                f"{ERA_FILE_BYTES}: not an owner file (the next takeover rewrites it)"
            )
        return value

    def read_for_takeover(self) -> int:
        """The stored value, or for a corrupt file, a value above any it can have held (see
        the module docstring), with a warning: a takeover then still moves forward.

        Raises:
            OwnershipError: a corrupt file whose words leave no era above them.
        """
        raw = os.pread(self.fd, 4096, 0)
        value = _decode(raw)
        if value is not None:
            return value
        words = [
            int.from_bytes(raw[i : i + EPOCH_BYTES].ljust(EPOCH_BYTES, b"\xff"), "big")
            for i in range(0, min(len(raw), ERA_FILE_BYTES), EPOCH_BYTES)
        ]
        if words and words[0] == ERA_MARKER:
            if len(words) < 2:  # an era file cut inside its era: no bound is left to go above
                raise OwnershipError(f"{self.path} is an owner file cut short, its era lost")
            words = words[1:2]  # the era word; the marker and epoch say nothing more
        era = max(words) + 1
        if era > U64_MAX:
            raise OwnershipError(f"{self.path} is corrupt and leaves no era above it")
        log.warning(
            "%s holds %d bytes that are not an owner file: taking it over in era %d",
            self.path,
            len(raw),
            era,
        )
        return era * ERA_UNIT

    def write(self, value: int) -> None:
        """Store ``value`` durably (pwrite, then fsync); the caller holds the lock.

        Era 0 is written as 8 bytes, a later era as 24 (see the module docstring); either
        pwrite at offset 0 lies within one disk sector, so a crash leaves the old or the new
        number. A file longer than what was written (a corrupt one) is cut to it.
        """
        era, epoch = divmod(value, ERA_UNIT)
        if era == 0:
            data = epoch.to_bytes(EPOCH_BYTES, "big")
        else:
            data = b"".join(n.to_bytes(EPOCH_BYTES, "big") for n in (ERA_MARKER, era, epoch))
        os.pwrite(self.fd, data, 0)
        if os.fstat(self.fd).st_size > len(data):
            os.ftruncate(self.fd, len(data))
        self._fsync(self.fd)

    def close(self) -> None:
        """Close the descriptor, which also releases the lock. Closing twice is harmless."""
        self.locked = False
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _decode(raw: bytes) -> int | None:
    """The value of an owner file's bytes, or None if they are not an owner file."""
    if not raw:
        return 0
    if len(raw) == EPOCH_BYTES:
        return int.from_bytes(raw, "big")
    if len(raw) == ERA_FILE_BYTES and raw[:EPOCH_BYTES] == ERA_MARKER.to_bytes(EPOCH_BYTES, "big"):
        return int.from_bytes(raw[8:16], "big") * ERA_UNIT + int.from_bytes(raw[16:], "big")
    return None


def next_epoch(stored: int, assigned: int) -> int:
    """The value a takeover writes: above ``stored``, and the broker's ``assigned`` epoch
    when that is larger, so epochs follow the broker's order.

    An epoch part that would reach EPOCH_LIMIT starts the next era instead (epoch ``assigned``,
    bounded by the limit), so what a worker holds always fits the wire format.

    Raises:
        OwnershipError: no era is left (the file was corrupted to all ones).
    """
    era, epoch = divmod(stored, ERA_UNIT)
    if epoch + 1 < EPOCH_LIMIT:
        return era * ERA_UNIT + max(assigned, epoch + 1)
    if era + 1 > U64_MAX:
        raise OwnershipError("the owner file's epochs are exhausted")
    log.warning(
        "stored epoch %d is at the limit %d: starting era %d", epoch, EPOCH_LIMIT - 1, era + 1
    )
    return (era + 1) * ERA_UNIT + min(max(assigned, 1), EPOCH_LIMIT - 1)


def reportable(value: int) -> int:
    """The part of an owner value or token a worker may report in READY: the epoch of its
    era, bounded below MAX_REPORTED_TOKEN (which the broker refuses)."""
    return min(value % ERA_UNIT, MAX_REPORTED_TOKEN - 1)
