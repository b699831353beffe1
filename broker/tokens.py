"""Per-key tokens and the fencing numbers they carry.

Two separate ideas live here:

* :class:`TokenTable` makes sure at most one dispatch per key is out at the workers. A key whose
  token is out has a FIFO of requests waiting behind it; when the worker answers, the token
  passes straight to the oldest waiter (so the waiters run in arrival order) or, if nobody
  waits, goes back to the table. :meth:`TokenTable.release_run` passes it to a whole run of
  waiters at once, which then travel to the worker in one message and are applied there in
  order: that is how a hot key keeps up (one round trip per run, not per request). Keys are
  independent: a busy key never holds up another one, and there is no global lock.

* :class:`TokenIssuer` numbers every dispatch. Numbers are unique and strictly increasing, so a
  worker can refuse anything not newer than what it last accepted (a fencing token, as in
  Kleppmann's "How to do distributed locking"). A token is ``epoch << 32 | sequence``: the epoch
  starts at the broker's start time in Unix seconds and is pushed past any token a worker
  reports when it registers, so a restarted broker never reissues a number a worker has seen.
  Reports are bounded (the caller refuses a token at or above ``MAX_REPORTED_TOKEN``, and
  :meth:`TokenIssuer.advance_past` ignores one), so the epoch never passes
  ``MAX_REPORTED_EPOCH`` (2**32 - 2**16) through a report. Above it lie 2**16 epochs of
  headroom: the sequence overflows into the next epoch once per 2**32 tokens, so the u64 of
  the wire format holds for 2**48 more tokens (89 years at 100,000 dispatches a second). The
  start epoch is the Unix time (1.8e9 in 2027), so about 2.5e9 epochs remain before the limit,
  each broker restart using one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from zkv.protocol import MAX_REPORTED_EPOCH, MAX_REPORTED_TOKEN

T = TypeVar("T")

SEQUENCE_BITS = 32
SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1


class TokenTable(Generic[T]):
    """Which keys have their token out, and who waits for each, in arrival order.

    A key is in ``_queues`` exactly while its token is out; a list holds the waiters, oldest
    first, and a key nobody waits for holds the empty tuple instead (most keys: nothing to
    allocate). A list, not a deque: a deque costs 0.24 us to make against 0.05, and a run of
    waiters leaves from the front together (usually all of them: then the list itself is the
    run), so the broker pops none of them one by one (:meth:`release`, which does, serves
    tests and tools). The broker's batch loop (broker/core.py, ``Broker._on_batch``) reads
    ``_queues`` and takes tokens in it directly, :meth:`acquire` written out: that loop relies
    on this meaning.
    """

    def __init__(self) -> None:
        self._queues: dict[bytes, list[T] | tuple[()]] = {}

    def acquire(self, key: bytes, waiter: T) -> bool:
        """Take the token of ``key`` for ``waiter``.

        Returns:
            True if the token was free and ``waiter`` now holds it (dispatch it); False if it
            was queued behind the current holder.
        """
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = ()
            return True
        if queue:
            queue.append(waiter)  # type: ignore[union-attr]  # non-empty: a list
        else:
            self._queues[key] = [waiter]
        return False

    def release(self, key: bytes) -> T | None:
        """Give back the token of ``key``.

        Returns:
            The next waiter, which now holds the token and must be dispatched, or None when
            nobody waited and the token is free again.
        """
        queue = self._queues.get(key)
        if queue is None:
            raise KeyError(key)  # a release without an acquire is a broker bug, not input
        if queue:
            return queue.pop(0)  # type: ignore[union-attr]  # non-empty: a list
        del self._queues[key]
        return None

    def release_run(
        self, key: bytes, max_count: int, max_weight: int, weight: Callable[[T], int]
    ) -> Sequence[T]:
        """Give back the token of ``key`` and pass it to the run of waiters at the front.

        The run is the oldest waiters, in order, at most ``max_count`` of them and as many as
        fit in ``max_weight`` (by ``weight``), but always at least one: they now hold the
        token together and must be dispatched together, in this order. Waiters beyond the
        run keep waiting for the run's answer.

        Returns:
            The run, or an empty sequence when nobody waited and the token is free again.
        """
        queue = self._queues.pop(key)  # KeyError: a release without an acquire, a broker bug
        if not queue:
            return ()
        return _take_run(self._queues, key, queue, max_count, max_weight, weight)  # type: ignore[arg-type]

    def release_many(
        self, keys: Iterable[bytes], max_count: int, max_weight: int, weight: Callable[[T], int]
    ) -> list[tuple[bytes, Sequence[T]]]:
        """:meth:`release_run` for each of ``keys`` (each once), in one call: the keys of an
        answered flight.

        Returns:
            ``(key, run)`` for each key someone waited for, in the order of ``keys``; the
            tokens of the other keys are free again.
        """
        queues = self._queues
        pop = queues.pop
        runs: list[tuple[bytes, Sequence[T]]] = []
        for key in keys:
            queue = pop(key)  # KeyError: a release without an acquire, a broker bug
            if queue:  # someone waits: the token stays out, passed to the run
                runs.append((key, _take_run(queues, key, queue, max_count, max_weight, weight)))  # type: ignore[arg-type]
        return runs

    def held(self, key: bytes) -> bool:
        """Whether the token of ``key`` is out."""
        return key in self._queues

    def waiting(self, key: bytes) -> int:
        """How many requests wait for ``key``'s token."""
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def __len__(self) -> int:
        """The number of keys whose token is out."""
        return len(self._queues)


def _take_run(
    queues: dict[bytes, list[T] | tuple[()]],
    key: bytes,
    queue: list[T],
    max_count: int,
    max_weight: int,
    weight: Callable[[T], int],
) -> list[T]:
    """Cut the run at the front of ``key``'s non-empty ``queue``, popped from ``queues``, and
    put back what keeps waiting (see :meth:`TokenTable.release_run`)."""
    if len(queue) == 1 or (len(queue) <= max_count and sum(map(weight, queue)) <= max_weight):
        queues[key] = ()  # the whole queue goes, usually: the list itself is the run
        return queue
    total = weight(queue[0])
    end = 1
    limit = min(len(queue), max_count)
    while end < limit:
        size = weight(queue[end])
        if total + size > max_weight:
            break
        total += size
        end += 1
    run = queue[:end]
    del queue[:end]
    queues[key] = queue
    return run


class TokenIssuer:
    """Issues fencing tokens: unique, strictly increasing, across broker restarts too."""

    def __init__(self, epoch: int) -> None:
        # A clock decades ahead must not start the issuer past the headroom (see the module).
        self._next = min(epoch, MAX_REPORTED_EPOCH - 1) << SEQUENCE_BITS

    @property
    def epoch(self) -> int:
        """The epoch of the next token."""
        return self._next >> SEQUENCE_BITS

    def issue(self) -> int:
        """A new token, greater than every token issued or reported before."""
        token = self._next
        # The sequence overflowing into the epoch bits is exactly "start the next epoch".
        self._next += 1
        return token

    def advance_past(self, token: int) -> None:
        """Make every future token greater than ``token`` (one a worker says it accepted).

        A token at or above MAX_REPORTED_TOKEN is ignored (the broker refuses the READY that
        carries it before this): following it would leave no room in the u64 to issue from.
        """
        if self._next <= token < MAX_REPORTED_TOKEN:
            self._next = ((token >> SEQUENCE_BITS) + 1) << SEQUENCE_BITS
