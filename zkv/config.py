"""Flags whose defaults come from the environment: flag > environment variable > default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from zkv import defaults


def env_default(name: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    """The value of environment variable ``name`` converted by ``kind``, else ``default``.

    Raises:
        SystemExit: with a message naming the variable, when its value cannot be converted.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise SystemExit(f"error: environment variable {name}={raw!r}: {exc}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: Any,
    kind: Callable[[str], Any] = str,
    help: str = "",
) -> None:
    """Add ``flag`` whose default is ``$env`` if set, else ``default``; the help says both."""
    parser.add_argument(
        flag,
        type=kind,
        default=env_default(env, default, kind),
        help=f"{help} (env {env}, default {default})",
    )


def add_heartbeat_flags(parser: argparse.ArgumentParser) -> None:
    """The heartbeat flags, shared by the broker and the workers so both sides agree."""
    add_flag(
        parser,
        "--heartbeat-interval",
        "ZKV_HEARTBEAT_INTERVAL",
        defaults.HEARTBEAT_INTERVAL_S,
        positive_float,
        "seconds between heartbeats",
    )
    add_flag(
        parser,
        "--heartbeat-liveness",
        "ZKV_HEARTBEAT_LIVENESS",
        defaults.HEARTBEAT_LIVENESS,
        positive_int,
        "heartbeat intervals of silence before a peer counts as dead",
    )
