"""zkv.client.paged: listings by cursor over fake shards that enforce a shard's bounds."""

from __future__ import annotations

import pytest

from zkv.client import paged
from zkv.errors import RequestError
from zkv.protocol import REPLY_TOO_LARGE, Entry

MAX_KEYS = 10  # a shard's bound per ALL (MAX_LIST_KEYS, scaled down)
MAX_BYTES = 100  # a shard's bound on values per ALL (MAX_REPLY_BYTES, scaled down)


class Shards:
    """Sorted shards answering one ALL as a worker does: refused past MAX_KEYS or MAX_BYTES."""

    def __init__(self, shards: list[dict[bytes, bytes]]) -> None:
        self.shards = shards
        self.limits: list[int] = []

    def all_once(self, after: bytes, limit: int, keys_only: bool) -> list[Entry]:
        self.limits.append(limit)
        entries: list[Entry] = []
        for number, shard in enumerate(self.shards):
            keys = sorted(k for k in shard if k > after)
            if limit > MAX_KEYS or (not limit and len(keys) > MAX_KEYS):
                raise RequestError(f"{REPLY_TOO_LARGE}: shard {number}: too many keys")
            keys = keys[:limit] if limit else keys
            if not keys_only and sum(len(shard[k]) for k in keys) > MAX_BYTES:
                raise RequestError(f"{REPLY_TOO_LARGE}: shard {number}: too many bytes")
            entries += [Entry(k, b"" if keys_only else shard[k], None) for k in keys]
        return sorted(entries, key=lambda entry: entry.key)


def store(keys: int, shards: int, value: bytes) -> Shards:
    parts: list[dict[bytes, bytes]] = [{} for _ in range(shards)]
    for i in range(keys):
        parts[(i * 7) % shards][b"k%04d" % i] = value
    return Shards(parts)


def test_every_key_once_in_order_across_pages_past_a_shards_bound() -> None:
    fake = store(95, 3, b"v")
    pages = list(paged(fake.all_once, page_keys=MAX_KEYS - 1))
    keys = [entry.key for page in pages for entry in page]
    assert keys == [b"k%04d" % i for i in range(95)]
    assert all(len(page) <= MAX_KEYS - 1 for page in pages)
    assert max(fake.limits) <= MAX_KEYS  # never an unbounded ALL, never over the bound


def test_a_page_too_large_is_asked_again_with_half_the_keys() -> None:
    fake = store(40, 2, b"x" * 30)  # 3 values fit a shard's reply, 4 do not
    keys = [e.key for page in paged(fake.all_once, page_keys=9) for e in page]
    assert keys == [b"k%04d" % i for i in range(40)]
    assert fake.limits[:3] == [10, 5, 3]  # halved until each shard's part fits


def test_a_limit_is_global_and_a_cursor_starts_after_its_key() -> None:
    fake = store(95, 3, b"v")
    pages = paged(fake.all_once, after=b"k0009", limit=25, keys_only=True, page_keys=9)
    keys = [entry.key for page in pages for entry in page]
    assert keys == [b"k%04d" % i for i in range(10, 35)]


def test_other_errors_and_one_key_too_large_are_raised() -> None:
    fake = store(5, 1, b"x" * (MAX_BYTES + 1))
    with pytest.raises(RequestError, match=REPLY_TOO_LARGE):
        list(paged(fake.all_once))
    assert fake.limits[-1] == 2  # down to one key a page (plus the one that says "more")


def test_a_negative_limit_is_refused_not_taken_as_a_slice() -> None:
    # limit=-1 listed every key but one, as a Python [:-1] would.
    with pytest.raises(RequestError, match="limit must be 0"):
        list(paged(lambda after, limit, keys_only: [], limit=-1))
