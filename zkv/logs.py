"""Logging of what peers send: rate-limited warnings and short, non-reversible peer tags.

Every byte from a peer is hostile, and so is every log line it can cause: one WARNING per
malformed message let a fuzzer write 10,260 lines. :class:`LogLimiter` lets through at most
``burst`` lines per kind of event in each window of ``window_s`` seconds and counts the rest;
the first line of that kind after the window says how many were suppressed. Kinds are the
call sites' fixed strings (never a peer's identity or input), so the table stays small.

:func:`peer` names a ZeroMQ routing id in logs without revealing it: a worker's routing id is
a secret (whoever knows it can take over its route), so logs carry a hash of it, not the id.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOW_S = 10.0  # length of one rate-limiting window, seconds
BURST = 5  # lines of one kind let through per window; the rest are counted
PEER_TAG_BYTES = 4  # bytes of the hash of a routing id shown in logs (8 hex digits)


def peer(identity: bytes) -> str:
    """A short tag for a routing id: the same id always gives the same tag, and the tag does
    not give the id back (BLAKE2b, 4 bytes)."""
    return hashlib.blake2b(identity, digest_size=PEER_TAG_BYTES).hexdigest()


@dataclass(slots=True)
class _Window:
    start_s: float
    emitted: int = 0
    suppressed: int = 0


class LogLimiter:
    """Rate-limited logging of events caused by peers.

    Args:
        logger: where lines go.
        window_s: the length of a window, seconds.
        burst: lines of one kind let through per window.
        clock: monotonic seconds; tests inject a fake.
    """

    def __init__(
        self,
        logger: logging.Logger,
        window_s: float = WINDOW_S,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.window_s = window_s
        self.burst = burst
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, kind: str, message: str, *args: object, exc_info: Any = None) -> bool:
        """Log ``message % args`` at ``level`` unless ``kind`` used up its window.

        Args:
            kind: the event's kind (a fixed string of the call site, never peer input).
            exc_info: as for :meth:`logging.Logger.log` (a traceback, for a bug's line).

        Returns:
            Whether the line was written.
        """
        if not self.logger.isEnabledFor(level):
            return False
        now_s = self._clock()
        window = self._windows.get(kind)
        if window is None:
            window = self._windows[kind] = _Window(now_s)
        elif now_s - window.start_s >= self.window_s:
            if window.suppressed:
                message += " (%d similar message(s) suppressed in the last %.0f s)"
                args = (*args, window.suppressed, now_s - window.start_s)
            window.start_s, window.emitted, window.suppressed = now_s, 0, 0
        if window.emitted >= self.burst:
            window.suppressed += 1
            return False
        window.emitted += 1
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, kind: str, message: str, *args: object) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args: object, exc_info: Any = None) -> bool:
        """:meth:`log` at ERROR."""
        return self.log(logging.ERROR, kind, message, *args, exc_info=exc_info)

    def info(self, kind: str, message: str, *args: object) -> bool:
        """:meth:`log` at INFO."""
        return self.log(logging.INFO, kind, message, *args)
