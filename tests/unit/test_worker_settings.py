"""The idempotency settings of a worker: flags, environment, validation, and how they reach
each shard's memory (issue 10, item 1: the window is configurable and documented)."""

from __future__ import annotations

import logging

import pytest

from tests.fakes import FakeClock
from workers import __main__ as worker_main
from workers.idempotency import DEFAULT_MAX_BYTES, DEFAULT_WINDOW_S, keep_ms
from workers.shard import take_shard
from workers.worker import Worker, WorkerConfig

pytestmark = pytest.mark.unit


def test_the_flags_default_to_the_environment_then_to_the_defaults(monkeypatch) -> None:
    args = worker_main.build_parser().parse_args([])
    assert (args.idempotency_window, args.idempotency_max_bytes) == (15.0, 256 * 1024 * 1024)
    monkeypatch.setenv("ZKV_IDEMPOTENCY_WINDOW", "60")
    monkeypatch.setenv("ZKV_IDEMPOTENCY_MAX_BYTES", "2000000")
    args = worker_main.build_parser().parse_args([])
    assert (args.idempotency_window, args.idempotency_max_bytes) == (60.0, 2_000_000)
    args = worker_main.build_parser().parse_args(["--idempotency-window", "45.5"])
    assert args.idempotency_window == 45.5  # a flag beats its variable


@pytest.mark.parametrize(
    "argv",
    [
        ["--idempotency-window", "0.5"],
        ["--idempotency-window", "86401"],
        ["--idempotency-window", "nan"],
        ["--idempotency-window", "soon"],
        ["--idempotency-max-bytes", "1000"],
        ["--idempotency-max-bytes", "-1"],
    ],
)
def test_a_bad_setting_is_refused_with_a_message(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        worker_main.build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: " in err  # refused for its value, not as an unknown flag


def test_the_settings_reach_every_shards_memory(tmp_path) -> None:
    config = WorkerConfig(idempotency_window_s=12.0, idempotency_max_bytes=5_000_000)
    worker = Worker(config, clock=FakeClock())
    try:
        shard = take_shard(0, 1, None, None, FakeClock(), memory=worker._new_memory).shard
    finally:
        worker._context.term()
    assert shard.memory.window_ms == 12_000 and shard.memory.keep_ms == keep_ms(12.0)
    assert shard.memory.max_bytes == 5_000_000
    default = take_shard(1, 1, None, None, FakeClock()).shard.memory
    assert default.window_ms == DEFAULT_WINDOW_S * 1000 and default.max_bytes == DEFAULT_MAX_BYTES


def test_a_window_shorter_than_a_retry_can_take_is_warned_about(
    monkeypatch, caplog, tmp_path
) -> None:
    started: list[WorkerConfig] = []
    monkeypatch.setattr(worker_main, "run", lambda config: started.append(config) or 0)
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)
    # A data directory of its own: the checkout's ./data (the default) may hold a durable
    # cluster after `make run`, which a worker --in-memory refuses (a newcomer's make test).
    argv = ["--in-memory", "--insecure", "--idempotency-max-bytes", "3000000"]
    argv += ["--data-dir", str(tmp_path)]
    with caplog.at_level(logging.WARNING, logger="workers.supervisor"):
        assert worker_main.main([*argv, "--idempotency-window", "8"]) == 0
    assert "shorter than a retry can take" in caplog.text
    assert started[0].idempotency_window_s == 8.0
    assert started[0].idempotency_max_bytes == 3_000_000
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.supervisor"):
        assert worker_main.main([*argv, "--idempotency-window", "30"]) == 0
    assert "shorter than a retry" not in caplog.text
