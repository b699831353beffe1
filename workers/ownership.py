"""Ownership fencing on disk: the ``owner`` file of a shard and the flock that guards it.

The file holds one number, the shard's ownership epoch: 8 bytes, unsigned big-endian. Whoever
wrote the largest epoch owns the shard. A worker taking a shard writes an epoch larger than the
one stored; before every batch it re-reads the file under the lock and stops if the number is
no longer its own. docs/persistence.md ("Why two owners are impossible") gives the argument.

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

log = logging.getLogger(__name__)

EPOCH_BYTES = 8
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
        """The stored epoch, 0 for an empty (new) file.

        Raises:
            OwnershipError: the file has a length other than 0 or 8 bytes. Guessing a number
                could hand out an epoch that a live owner already holds, so a person decides.
        """
        raw = os.pread(self.fd, EPOCH_BYTES + 1, 0)
        if not raw:
            return 0
        if len(raw) != EPOCH_BYTES:
            raise OwnershipError(
                f"{self.path} holds {len(raw)} bytes, expected {EPOCH_BYTES}: not an owner file "
                f"(if no worker is running for this shard, delete it and restart)"
            )
        return int.from_bytes(raw, "big")

    def write(self, epoch: int) -> None:
        """Store ``epoch`` durably (pwrite of 8 bytes, then fsync); the caller holds the lock.

        An 8-byte pwrite at offset 0 lies within one disk sector, so a crash leaves either the
        old or the new number, never a mix.
        """
        os.pwrite(self.fd, epoch.to_bytes(EPOCH_BYTES, "big"), 0)
        self._fsync(self.fd)

    def close(self) -> None:
        """Close the descriptor, which also releases the lock. Closing twice is harmless."""
        self.locked = False
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
