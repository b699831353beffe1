"""The command lines: the zkv CLI's conventions (redis-cli, etcdctl) and every service's flag
errors, which must name the flag (or variable) and say what it expects, in words."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from broker.__main__ import build_parser as broker_parser
from gateway.server import build_parser as gateway_parser
from workers.__main__ import build_parser as workers_parser
from zkv import cli
from zkv.client import Item, NotFound
from zkv.config import endpoint, program_name

pytestmark = pytest.mark.unit

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "zkv": cli.build_parser,
    "broker": broker_parser,
    "workers": workers_parser,
    "gateway": gateway_parser,
}
# What argparse and Python print when a type raises a bare ValueError: never shown to a user.
RAW_ERRORS = re.compile(r"invalid \w+ value|invalid literal|could not convert")


@pytest.fixture(autouse=True)
def started_with_python_m(monkeypatch: pytest.MonkeyPatch) -> None:
    """Program names as under ``python -m``, whatever started pytest."""
    monkeypatch.setattr(sys, "argv", ["/src/__main__.py"])


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parser and its subcommands' parsers, each once."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from walk(sub)


def typed_flags(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str | None]]:
    """(flag, environment variable or None) of every flag taking a value that is converted."""
    for action in parser._actions:
        if action.option_strings and action.type not in (None, str, Path) and action.nargs != 0:
            env = re.search(r"env (ZKV_\w+|PORT)", action.help or "")
            yield action.option_strings[-1], env.group(1) if env else None


def parse_error(
    parser: Callable[[], argparse.ArgumentParser],
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
) -> str | None:
    """stderr of a refused command line (exit status 2), None if it was accepted."""
    try:
        parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2, argv
        return capsys.readouterr().err
    return None


# --- the zkv CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--frontend", "tcp://10.0.0.5:7000", "--timeout", "2", "get", "k"],
        ["get", "k", "--frontend", "tcp://10.0.0.5:7000", "--timeout", "2"],
        ["get", "--timeout", "2", "k", "--frontend", "tcp://10.0.0.5:7000"],
        ["--timeout", "2", "get", "--frontend", "tcp://10.0.0.5:7000", "k"],
    ],
)
def test_options_go_anywhere_on_the_line(argv: list[str]) -> None:
    args = cli.build_parser().parse_args(argv)
    assert (args.command, args.key, args.frontend, args.timeout) == (
        "get",
        "k",
        "tcp://10.0.0.5:7000",
        2.0,
    )


def test_an_option_left_out_keeps_its_environment_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZKV_FRONTEND", "tcp://127.0.0.1:6555")
    args = cli.build_parser().parse_args(["set", "k", "v", "--ttl", "1e3"])
    assert (args.frontend, args.ttl, args.timeout) == ("tcp://127.0.0.1:6555", 1000.0, 5.0)


@pytest.mark.parametrize("name", PARSERS)
def test_every_argument_and_command_has_help(name: str) -> None:
    for parser in walk(PARSERS[name]()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions)
            else:
                assert action.help, f"{parser.prog}: {action.dest} has no help"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set", "k", "v", "--ttl", "abc"], "argument --ttl: must be a positive number, got 'abc'"),
        (["set", "k", "v", "--ttl", "0"], "argument --ttl: must be a positive"),
        (["set", "k", "v", "--ttl", "inf"], "argument --ttl: must be a finite positive number"),
        (["get", "k", "--timeout", "soon"], "argument --timeout: must be a positive number"),
        (
            ["get", "k", "--frontend", "localhost:5555"],
            "'localhost:5555' is not a ZeroMQ endpoint: write tcp://localhost:5555",
        ),
        (["--frontend", "http://x:5555", "ping"], "write tcp://HOST:PORT"),
    ],
)
def test_cli_errors_are_in_words(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error(cli.build_parser, argv, capsys)
    assert err is not None and message in err, err
    assert not RAW_ERRORS.search(err), err


def test_the_usage_line_names_the_program_as_it_was_started(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/zkv", "get"])
    assert program_name("zkv") == "zkv"
    assert parse_error(cli.build_parser, ["get"], capsys).startswith("usage: zkv get ")
    monkeypatch.setattr(sys, "argv", ["/src/zkv/__main__.py"])
    assert program_name("zkv") == "python -m zkv"
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/zkv-broker"])
    assert broker_parser().prog == "zkv-broker"


class FakeClient:
    """What the CLI uses of zkv.Client, in memory, with the cluster state ``ping`` reports."""

    owned: ClassVar[list[bool]] = [True, True]

    def __init__(self, endpoint: str, timeout_s: float, keys: Path | None) -> None:
        self.endpoint = endpoint
        self.data = {b"k": b"v"}

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get(self, key: str) -> Item:
        if key.encode() not in self.data:
            raise NotFound(key)
        return Item(self.data[key.encode()], None)

    def delete(self, key: str, if_version: int | None = None) -> bool:
        return self.data.pop(key.encode(), None) is not None

    def ping(self) -> dict[str, Any]:
        status = "ok" if all(self.owned) else "degraded"
        return {"status": status, "shards": len(self.owned), "owned": self.owned}


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(cli, "Client", FakeClient)
    return FakeClient


@pytest.mark.parametrize("command", ["delete", "del"])
def test_delete_is_the_command_and_del_its_alias(
    fake_client: type[FakeClient], command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([command, "k"]) == 0
    assert capsys.readouterr().out == "OK\n"
    assert cli.main([command, "nope"]) == cli.EXIT_NO


def test_ping_exits_nonzero_when_a_shard_has_no_worker(
    fake_client: type[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["ping"]) == 0
    monkeypatch.setattr(fake_client, "owned", [True, False])
    assert cli.main(["ping"]) == cli.EXIT_NO


# --- every service ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARSERS)
@pytest.mark.parametrize("bad", ["abc", "-1", "0.5x"])
def test_every_flag_error_names_the_flag_and_what_it_expects(
    name: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    checked = 0
    for parser in walk(PARSERS[name]()):
        command = [] if parser.prog.split()[-1] in ("zkv", name) else [parser.prog.split()[-1]]
        for flag, _ in typed_flags(parser):
            argv = [*command, f"{flag}={bad}"]
            err = parse_error(lambda p=parser: p, argv, capsys)  # type: ignore[misc]
            if err is None:
                continue  # the value is valid for this flag
            checked += 1
            assert f"argument {flag}: " in err, err
            assert not RAW_ERRORS.search(err), err
            assert re.search(r"must|write|needs", err), err
    assert checked


@pytest.mark.parametrize("name", PARSERS)
def test_every_environment_error_names_the_variable_and_its_flag(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    variables = {
        env: flag for parser in walk(PARSERS[name]()) for flag, env in typed_flags(parser) if env
    }
    assert variables
    for env, flag in variables.items():
        monkeypatch.setenv(env, "abc")
        err = parse_error(PARSERS[name], [], capsys)
        monkeypatch.delenv(env)
        if err is None:
            continue  # "abc" is a valid value (a host name, say)
        assert f"environment variable {env}='abc' (the default of {flag}): " in err, err
        assert not RAW_ERRORS.search(err), err


def test_zkv_shards_abc_says_what_it_expects(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZKV_SHARDS", "abc")
    err = parse_error(broker_parser, [], capsys)
    assert err is not None
    assert err.endswith(
        "environment variable ZKV_SHARDS='abc' (the default of --shards): "
        "must be a whole number of at least 1, got 'abc'\n"
    ), err


def test_a_host_port_endpoint_is_told_to_add_tcp() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"write tcp://127\.0\.0\.1:5556$"):
        endpoint("127.0.0.1:5556")
    assert endpoint("tcp://*:5555", bind=True) == "tcp://*:5555"
    with pytest.raises(argparse.ArgumentTypeError, match="needs a port"):
        endpoint("tcp://127.0.0.1:*")


def test_the_ttl_may_come_before_the_command_too(capsys: pytest.CaptureFixture[str]) -> None:
    from zkv.cli import build_parser, main

    assert build_parser().parse_args(["--ttl", "10", "set", "k", "v"]).ttl == 10.0
    assert build_parser().parse_args(["--ttl", "10", "set", "k", "v", "--ttl", "2"]).ttl == 2.0
    assert build_parser().parse_args(["set", "k", "v"]).ttl is None
    with pytest.raises(SystemExit) as exited:
        main(["--ttl", "10", "get", "k"])
    assert exited.value.code == 2
    assert "only set, incr and lock take a time to live, not get" in capsys.readouterr().err
