"""The idempotency memory of a shard: replies to recent writes, by request id.

Why: a client that gets no reply (a timeout, a worker that died, a broker that restarted)
cannot know whether its SET or DEL was applied, so it sends the same request again with the
same request id. Applying it twice is wrong: a retried SET would overwrite a newer value written
in between by someone else, a retried DEL would delete it. So the shard remembers the reply to
each recent write and answers a retry from memory.

What is remembered: for each request id, the request's kind, key and value fingerprint (the
value's CRC-32; 0 for DEL), and the reply's status and deadline. A retry is recognised only if
kind, key and fingerprint match too, not just the id, because ids are chosen by clients. With a
badly chosen id (a counter starting at 1 in every process), a wrong answer from memory needs
the same id on the same kind, key and value: a SET answered that way leaves the value it would
have written (only its deadline is the first one's); a DEL answered that way may leave a value
written since. Random 64-bit ids, as the Python client picks, make either a 2**-64 event.

Bounds: the last MAX_REMEMBERED_REQUESTS writes, oldest forgotten first, so a retry is
recognised if fewer than that many writes reached the shard since the original. An entry costs
about 300 bytes (tracemalloc, 100,000 random ids; the key itself is shared with the store while
the key lives), so a full memory holds about 30 MB per shard. A DEL that found nothing changed
nothing, so it is not remembered (its retry is answered NOT_FOUND again, or deletes a value
written since, as if the first attempt had been lost). Request id 0 means "do not remember"
(compaction writes its snapshot with it).

The memory is rebuilt on takeover: every SET and DEL record in the log carries its request id,
and compaction writes the memory itself into the new log as MEMO records, so a request applied
by a worker that then died is answered from memory by its successor, not applied twice.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

MAX_REMEMBERED_REQUESTS = 100_000  # request ids per shard


class Memo(NamedTuple):
    """A remembered write and its reply (a tuple: 100,000 of them must stay small)."""

    kind: int  # Kind.SET or Kind.DEL
    key: bytes
    fingerprint: int  # CRC-32 of a SET's value, 0 for DEL
    status: int  # Status of the reply
    deadline_ms: int | None  # the reply's deadline (SET), None for never or DEL


class RequestMemory:
    """Replies to the last ``capacity`` remembered writes, by request id.

    Args:
        capacity: how many request ids to keep; the oldest is forgotten first.
    """

    def __init__(self, capacity: int = MAX_REMEMBERED_REQUESTS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._memos: OrderedDict[int, Memo] = OrderedDict()

    def recall(self, request_id: int, kind: int, key: bytes, fingerprint: int) -> Memo | None:
        """The remembered reply if this request (same id, kind, key and value) was applied."""
        if not request_id:
            return None
        memo = self._memos.get(request_id)
        if memo is None or memo.kind != kind or memo.key != key or memo.fingerprint != fingerprint:
            return None
        return memo

    def remember(self, request_id: int, memo: Memo) -> None:
        """Remember a write applied under ``request_id`` (0: not remembered)."""
        if not request_id:
            return
        memos = self._memos
        if request_id in memos:
            # An id reused for another write: the newest one is what a retry would repeat.
            memos.move_to_end(request_id)
        memos[request_id] = memo
        if len(memos) > self.capacity:
            memos.popitem(last=False)

    def snapshot(self) -> list[tuple[int, Memo]]:
        """The remembered writes, oldest first: a copy another thread may read (compaction)."""
        return list(self._memos.items())

    def __len__(self) -> int:
        return len(self._memos)
