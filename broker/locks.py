"""Lock waits: LOCK requests the broker parks while their lock is held (issue 12).

A LOCK carries ``wait_ms`` (0 to MAX_LOCK_WAIT_MS, 300 s): how long its sender is willing to
wait for a held lock. The worker owning the lock's shard answers at once, OK (taken) or
CONFLICT (held; the header's deadline is the holder's expiry). Waiting happens here, in the
broker, never at the worker (whose loop must not hold requests) nor at the client (which
would poll). The algorithm, in one place:

* Parking. A LOCK with ``wait_ms > 0`` answered CONFLICT before its wait ran out is not
  answered: it is parked at the back of its lock name's FIFO. A new LOCK with a wait for a
  name whose FIFO is not empty is parked at once, without a dispatch (FIFO: it must not take
  the lock before those already waiting). Each waiter keeps its request id registered with
  the broker, so a client's retry merges with it, and its bytes charged to its client.
* Waking. A name's oldest waiter is dispatched again (alone: only one can win) when

  - an UNLOCK of that name is answered OK by the worker (the common case: at once);
  - the holder's lease ends: the deadline of the last CONFLICT, of the winner's OK or of a
    REFRESH answered OK (wall-clock milliseconds, turned into a monotonic instant by the
    core, which has the wall clock);
  - LOCK_RECHECK_S (1 s) passed since the last dispatch or CONFLICT for the name: a lock
    released through another broker, or a reply lost with a worker, costs at most that.

  A timed dispatch comes at least LOCK_RETRY_MIN_S (5 ms) after the reply that set it, so
  clocks that disagree about the holder's expiry cost at most 200 dispatches a second per
  name, not a busy loop.
  A woken waiter answered CONFLICT again goes back to the FRONT (it keeps its place); one
  answered OK holds the lock and is answered, and the rest wait for that holder.
* Giving up. A waiter whose wait runs out (``wait_ms`` after its arrival at the broker) while
  parked is answered with the CONFLICT it last got (or, if it never got one because it was
  parked on arrival, the name's last CONFLICT under its own request id).

Bounds: MAX_LOCK_WAITERS (10,000) parked in total, and MAX_CLIENT_LOCK_WAITERS (1,000) per
client socket (so one client cannot take every place and have every other client's waits
answered BUSY); a LOCK that would be one more is answered BUSY at once (not applied: send it
again later), never parked. The bytes a parked LOCK keeps (its request, its name, its last
CONFLICT: ``Waiter.held``) count against the broker's pending-bytes limits, in total and per
client, for as long as it is parked (broker/core.py charges and refunds them).

Timers are two heaps, with stale entries skipped when they come up and the heaps rebuilt
when stale entries outnumber live ones (so they stay within a few times the parked count); no
thread or timer per waiter. A name's FIFO drops its answered waiters once they outnumber its
parked ones (FIFO_SLACK), so a waiter that left keeps nothing for long.

This module keeps the state only (names, FIFOs, due times); broker/core.py decides what to do
with a reply and dispatches or answers what :meth:`LockWaits.due` hands back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from itertools import count
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_LOCK_WAITERS = 10_000  # LOCKs parked in the broker, all names together; more: BUSY
MAX_CLIENT_LOCK_WAITERS = 1_000  # LOCKs parked for one client socket; more: BUSY
LOCK_RETRY_MIN_S = 0.005  # the least time between two dispatches of one name's oldest waiter
LOCK_RECHECK_S = 1.0  # the most: a release the broker did not see costs at most this
# The heaps are rebuilt from the live waiters when they hold this many times more entries
# (plus a floor, so a handful of waiters never rebuilds).
HEAP_SLACK = 4
HEAP_FLOOR = 1024
# A name's FIFO is rebuilt without its answered waiters when they outnumber its parked ones
# (plus this many), so what a waiter keeps is gone soon after it leaves.
FIFO_SLACK = 8


@dataclass(slots=True, eq=False)
class Waiter(Generic[T]):
    """One parked LOCK.

    Attributes:
        item: what the broker holds for it (its op).
        name: the lock's name (the request's key).
        give_up: monotonic seconds when its wait runs out.
        conflict: the last CONFLICT it got (a sub-reply record), None if parked on arrival.
        client: whose place it takes (MAX_CLIENT_LOCK_WAITERS).
        held: the bytes charged to its client while it is parked (the broker refunds them
            when it leaves, whichever way).
        parked: in its name's FIFO; False once dispatched again or answered.
    """

    item: T
    name: bytes
    give_up: float
    conflict: bytes | None
    client: bytes = b""
    held: int = 0
    parked: bool = True


@dataclass(slots=True)
class _Name:
    """The FIFO of one lock name, and when to dispatch its oldest waiter again."""

    waiters: deque[Waiter] = field(default_factory=deque)  # type: ignore[type-arg]
    live: int = 0  # parked waiters in ``waiters`` (answered ones stay until they reach the front)
    retry_at: float = 0.0  # monotonic
    deadline_ms: int = 0  # the holder's expiry, wall-clock ms, as last heard (0: unknown)
    reason: bytes = b"lock is held"  # the last CONFLICT's message


class LockWaits(Generic[T]):
    """The parked LOCKs of a broker, by lock name (see the module docstring).

    Args:
        limit: the most waiters parked at once (MAX_LOCK_WAITERS).
        client_limit: the most parked at once for one client (MAX_CLIENT_LOCK_WAITERS).
    """

    def __init__(
        self, limit: int = MAX_LOCK_WAITERS, client_limit: int = MAX_CLIENT_LOCK_WAITERS
    ) -> None:
        self.limit = limit
        self.client_limit = client_limit
        self.count = 0  # parked waiters, all names
        self.by_client: dict[bytes, int] = {}  # parked waiters per client (none: absent)
        self._names: dict[bytes, _Name] = {}
        self._give_ups: list[tuple[float, int, Waiter[T]]] = []
        self._retries: list[tuple[float, int, bytes]] = []
        self._seq = count()

    def waiting(self, name: bytes) -> bool:
        """Whether LOCKs wait for ``name`` (a new LOCK with a wait then joins the back)."""
        return name in self._names

    def park(
        self,
        item: T,
        name: bytes,
        give_up: float,
        now: float,
        conflict: bytes | None = None,
        holder_expiry: float | None = None,
        deadline_ms: int = 0,
        reason: bytes = b"",
        front: bool = False,
        client: bytes = b"",
        held: int = 0,
    ) -> bool:
        """Park a LOCK; False if MAX_LOCK_WAITERS are parked already, or
        MAX_CLIENT_LOCK_WAITERS for ``client`` (answer it BUSY).

        Args:
            conflict: the CONFLICT it just got (None: parked on arrival, not dispatched).
            holder_expiry: with ``conflict``: monotonic seconds when the holder's lease ends
                by that CONFLICT's deadline (None: not said).
            deadline_ms, reason: that CONFLICT's deadline (wall ms) and message, answered to
                waiters of this name that give up without a CONFLICT of their own.
            front: it was the oldest waiter, dispatched again and refused again: it keeps
                its place.
            client, held: see :class:`Waiter`.
        """
        mine = self.by_client.get(client, 0)
        if self.count >= self.limit or mine >= self.client_limit:
            return False
        self.by_client[client] = mine + 1
        entry = self._names.get(name)
        if entry is None:
            entry = self._names[name] = _Name()
        if conflict is not None:
            entry.deadline_ms = deadline_ms
            entry.reason = reason or entry.reason
            self._schedule(name, entry, now, holder_expiry)
        elif not entry.live and not entry.retry_at:
            self._schedule(name, entry, now, None)
        waiter = Waiter(item, name, give_up, conflict, client, held)
        if front:
            entry.waiters.appendleft(waiter)
        else:
            entry.waiters.append(waiter)
        entry.live += 1
        self.count += 1
        heappush(self._give_ups, (give_up, next(self._seq), waiter))
        self._compact()
        return True

    def held(self, name: bytes, now: float, holder_expiry: float | None) -> None:
        """A LOCK of ``name`` was answered OK: its waiters wait for that holder's expiry."""
        entry = self._names.get(name)
        if entry is not None:
            self._schedule(name, entry, now, holder_expiry)

    def released(self, name: bytes, now: float) -> Waiter[T] | None:
        """An UNLOCK of ``name`` was answered OK: the oldest waiter to dispatch, if any."""
        entry = self._names.get(name)
        if entry is None:
            return None
        return self._pop(name, entry, now)

    def due(self, now: float) -> tuple[list[Waiter[T]], list[Waiter[T]]]:
        """What the timers say at ``now``: (waiters to dispatch again, waiters whose wait ran
        out, to answer with :meth:`give_up_reply`'s CONFLICT). Both leave the FIFOs."""
        expired: list[Waiter[T]] = []
        give_ups = self._give_ups
        while give_ups and give_ups[0][0] <= now:
            waiter = heappop(give_ups)[2]
            if waiter.parked:
                self._left(waiter)
                entry = self._names[waiter.name]
                entry.live -= 1
                if not entry.live:
                    del self._names[waiter.name]
                elif len(entry.waiters) > 2 * entry.live + FIFO_SLACK:
                    # Answered waiters stay in the FIFO until they reach its front, with
                    # their requests: drop them once they outnumber the parked ones.
                    entry.waiters = deque(w for w in entry.waiters if w.parked)
                expired.append(waiter)
        woken: list[Waiter[T]] = []
        retries = self._retries
        while retries and retries[0][0] <= now:
            retry_at, _, name = heappop(retries)
            entry = self._names.get(name)
            if entry is None or entry.retry_at != retry_at:
                continue  # stale: rescheduled since, or nobody waits any more
            waiter = self._pop(name, entry, now)
            if waiter is not None:
                woken.append(waiter)
        return woken, expired

    def next_due(self) -> float | None:
        """Monotonic seconds of the next timer (maybe a stale one: then :meth:`due` finds
        nothing to do), or None."""
        due = None
        if self._give_ups:
            due = self._give_ups[0][0]
        if self._retries and (due is None or self._retries[0][0] < due):
            due = self._retries[0][0]
        return due

    def last_conflict(self, name: bytes) -> tuple[int, bytes]:
        """The deadline (wall ms, 0 unknown) and message of the last CONFLICT for ``name``,
        for a waiter that gives up without one of its own (or its name's entry is gone)."""
        entry = self._names.get(name)
        return (0, b"lock is held") if entry is None else (entry.deadline_ms, entry.reason)

    def drain(self) -> Iterator[Waiter[T]]:
        """Every parked waiter, oldest first per name, taken out (the broker stops)."""
        names, self._names = self._names, {}
        self._give_ups.clear()
        self._retries.clear()
        for entry in names.values():
            for waiter in entry.waiters:
                if waiter.parked:
                    self._left(waiter)
                    yield waiter

    # --- internals --------------------------------------------------------------------------

    def _pop(self, name: bytes, entry: _Name, now: float) -> Waiter[T] | None:
        """Take the oldest parked waiter of ``name`` out to dispatch it; the next dispatch of
        the name is due LOCK_RECHECK_S later, unless a reply says sooner."""
        waiters = entry.waiters
        while waiters and not waiters[0].parked:
            waiters.popleft()  # answered when its wait ran out
        if not waiters:
            return None
        waiter = waiters.popleft()
        self._left(waiter)
        entry.live -= 1
        if entry.live:
            self._schedule(name, entry, now, None)
        else:
            del self._names[name]
        return waiter

    def _left(self, waiter: Waiter[T]) -> None:
        """``waiter`` leaves the parked ones (its FIFO entry may stay until it reaches the
        front): its place, and its client's, are free again."""
        waiter.parked = False
        self.count -= 1
        client = waiter.client
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]

    def _schedule(self, name: bytes, entry: _Name, now: float, holder_expiry: float | None) -> None:
        """Set when ``name``'s oldest waiter is dispatched next: at the holder's expiry, but
        no later than LOCK_RECHECK_S from now and no sooner than LOCK_RETRY_MIN_S (each call
        follows a reply, itself a round trip after the dispatch it answers)."""
        retry_at = now + LOCK_RECHECK_S
        if holder_expiry is not None and holder_expiry < retry_at:
            retry_at = max(holder_expiry, now + LOCK_RETRY_MIN_S)
        entry.retry_at = retry_at
        heappush(self._retries, (retry_at, next(self._seq), name))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps when stale entries outnumber the live ones HEAP_SLACK to one."""
        bound = HEAP_SLACK * self.count + HEAP_FLOOR
        if len(self._give_ups) > bound:
            self._give_ups = [item for item in self._give_ups if item[2].parked]
            heapify(self._give_ups)
        if len(self._retries) > bound:
            names = self._names
            self._retries = [
                item
                for item in self._retries
                if (entry := names.get(item[2])) is not None and entry.retry_at == item[0]
            ]
            heapify(self._retries)
