"""Which shard owns a key: Redis Cluster's hash slots, so slots can move between shards later.

A key maps to one of 16384 slots by CRC16 (the XMODEM/CCITT variant Redis uses, which is
``binascii.crc_hqx(data, 0)``, implemented in C) of the key bytes, modulo 16384. If the key holds a
hash tag, a ``{...}`` with at least one byte between the first ``{`` and the next ``}``, only the
tag is hashed, so ``{user:1}:name`` and ``{user:1}:mail`` share a slot (and later, a shard
for multi-key operations). These are exactly Redis Cluster's rules: ``key_slot(b"123456789")`` is
12739 (0x31C3), and keys land in the same slots as in Redis.

Slots are split among shards in contiguous, equal ranges: shard ``i`` of ``n`` owns slots
``[ceil(i * 16384 / n), ceil((i + 1) * 16384 / n))``. Contiguous ranges keep a future move of a
slot range between shards a matter of changing one boundary.
"""

from __future__ import annotations

import binascii

SLOTS = 16384


def key_slot(key: bytes) -> int:
    """The hash slot of a key (0..16383), honouring ``{hash tags}``."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) & (SLOTS - 1)


def slot_shard(slot: int, shards: int) -> int:
    """The shard (0..shards-1) that owns a slot."""
    return slot * shards // SLOTS


def key_shard(key: bytes, shards: int) -> int:
    """The shard that owns a key."""
    return key_slot(key) * shards // SLOTS
