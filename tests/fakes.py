"""Test doubles shared by the test tiers."""

START_MS = 1_700_000_000_000


class FakeClock:
    """Unix milliseconds that move only when a test says so."""

    def __init__(self, now: int = START_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms
