"""Test doubles shared by the test tiers."""

from __future__ import annotations

import dataclasses

from zkv.protocol import Ready

START_MS = 1_700_000_000_000


class FakeClock:
    """Unix milliseconds that move only when a test says so."""

    def __init__(self, now: int = START_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def bare(message: object) -> object:
    """A READY without its storage fields (``durable``, and ``cluster``, random per data
    directory), so tests compare what it claims; anything else unchanged."""
    if isinstance(message, Ready):
        return dataclasses.replace(message, durable=False, cluster=0)
    return message
