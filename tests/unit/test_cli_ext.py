"""Issue 12 in the zkv CLI (zkv/cli.py): incr, expire, persist, ttl, set --nx/--xx/--if-version,
get --meta and lock, with their conventions (options anywhere, errors in words, exit codes),
on an in-memory fake of zkv.Client (``zkv lock`` runs a real child process)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from zkv import cli
from zkv.calls import Item, Lock, NotFound
from zkv.errors import Conflict, LockLost, PreconditionFailed
from zkv.protocol import Entry

pytestmark = pytest.mark.unit


class FakeHeld:
    def __init__(self, client: FakeClient, name: str, ttl_s: float, wait_s: float) -> None:
        self.client = client
        self.args = (name, ttl_s, wait_s)

    def __enter__(self) -> Lock:
        if self.client.held_by_another:
            raise Conflict("lock is held", 1_800_000_000_000)
        self.client.events.append(("acquired", *self.args))
        return Lock(self.args[0].encode(), 41, 2_000_000_000_000)

    def __exit__(self, *exc: object) -> None:
        self.client.events.append(("released", self.args[0]))
        if self.client.lose:
            error = LockLost("lock 'job' lost (token 41): refused")
            # as zkv.client's refresh thread reports it, before the release raises it
            logging.getLogger("zkv.client").warning("%s", error)
            raise error


class FakeClient:
    """What the CLI uses of zkv.Client, in memory."""

    held_by_another: ClassVar[bool] = False
    lose: ClassVar[bool] = False
    last: ClassVar[FakeClient | None] = None

    def __init__(self, endpoint: str, timeout_s: float, keys: Path | None) -> None:
        self.data: dict[bytes, tuple[bytes, int | None, int]] = {b"k": (b"v", None, 5)}
        self.events: list[tuple] = []
        FakeClient.last = self

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get(self, key: str) -> Item:
        if key.encode() not in self.data:
            raise NotFound(key)
        return Item(*self.data[key.encode()])

    def set(self, key: str, value: str, ttl_s: float | None = None, **conditions: Any) -> None:
        self.events.append(("set", key, value, ttl_s, conditions))
        exists = key.encode() in self.data
        if (conditions["nx"] and exists) or (conditions["xx"] and not exists):
            raise PreconditionFailed("key exists" if exists else "key does not exist")
        return None

    def incr(self, key: str, by: int = 1, ttl_s: float | None = None) -> int:
        self.events.append(("incr", key, by, ttl_s))
        if key == "word":
            raise Conflict("value is not an integer")
        return 10 + by

    def delete(self, key: str, if_version: int | None = None) -> bool:
        self.events.append(("delete", key, if_version))
        if if_version is not None and if_version != self.data[key.encode()][2]:
            raise PreconditionFailed(f"version is {self.data[key.encode()][2]}, not {if_version}")
        return self.data.pop(key.encode(), None) is not None

    def pages(self) -> Any:
        yield [Entry(b"k", b"v", None)]

    def expire(self, key: str, ttl_s: float) -> int:
        if key.encode() not in self.data:
            raise NotFound(key)
        return 1_800_000_000_123

    def persist(self, key: str) -> int:
        if key.encode() not in self.data:
            raise NotFound(key)
        return 6

    def ttl_ms(self, key: str) -> int | None:
        if key.encode() not in self.data:
            raise NotFound(key)
        return None if key == "k" else 1500

    def lock(self, name: str, ttl_s: float, wait_s: float, refresh: bool) -> FakeHeld:
        assert refresh  # zkv lock always keeps its lock
        return FakeHeld(self, name, ttl_s, wait_s)


@pytest.fixture(autouse=True)
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(cli, "Client", FakeClient)
    monkeypatch.setattr(FakeClient, "held_by_another", False)
    monkeypatch.setattr(FakeClient, "lose", False)
    monkeypatch.setattr(sys, "argv", ["/src/__main__.py"])
    return FakeClient


def events() -> list[tuple]:
    assert FakeClient.last is not None
    return FakeClient.last.events


def test_incr_prints_the_new_value_with_by_and_ttl_anywhere(capsys):
    assert cli.main(["incr", "n"]) == 0
    assert cli.main(["--ttl", "60", "incr", "n", "-5"]) == 0
    assert cli.main(["incr", "--ttl", "2", "n", "7", "--timeout", "3"]) == 0
    assert capsys.readouterr().out == "11\n5\n17\n"
    assert events() == [("incr", "n", 7, 2.0)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["incr", "n", "abc"], "argument BY: must be a whole number from"),
        (["incr", "n", str(2**63)], "argument BY: must be a whole number from"),
        (["set", "k", "v", "--if-version", "-1"], "argument --if-version: must be a whole"),
        (["set", "k", "v", "--nx", "--xx"], "not allowed with argument"),
        (["expire", "k", "0"], "argument SECONDS: must be a positive number"),
        (["lock", "job", "--", "true"], "lock needs a time to live"),
        (["lock", "job", "--ttl", "5"], "lock needs a command to run"),
        (["lock", "job", "--ttl", "5", "--wait", "-1", "--", "true"], "argument --wait: must be"),
        (["lock", "job", "--ttl", "5", "--wait", "301", "--", "true"], "from 0 to 300"),
        (["--ttl", "5", "expire", "k", "3"], "only set, incr and lock take a time to live"),
    ],
)
def test_new_usage_errors_are_in_words(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err, err
    assert "invalid" not in err and "Traceback" not in err


def test_set_conditions_reach_the_client_and_a_refusal_exits_1(capsys):
    assert cli.main(["set", "new", "v", "--nx"]) == 0
    assert cli.main(["set", "k", "v", "--nx"]) == cli.EXIT_NO
    assert "not written: key exists" in capsys.readouterr().err
    assert cli.main(["set", "k", "v", "--if-version", "5", "--ttl", "9"]) == 0
    assert events()[-1] == ("set", "k", "v", 9.0, {"nx": False, "xx": False, "if_version": 5})


def test_get_meta_shows_the_version(capsys):
    assert cli.main(["get", "k", "--meta"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "key": "k",
        "value": "v",
        "expires_at_ms": None,
        "version": 5,
    }
    assert cli.main(["get", "k"]) == 0
    assert capsys.readouterr().out == "v\n"


def test_expire_persist_and_ttl(capsys):
    assert cli.main(["expire", "k", "30"]) == 0
    assert cli.main(["persist", "k"]) == 0
    assert cli.main(["ttl", "k"]) == 0
    assert capsys.readouterr().out == "OK expires_at_ms=1800000000123\nOK\nnever\n"
    for command in (["expire", "nope", "3"], ["persist", "nope"], ["ttl", "nope"]):
        assert cli.main(command) == cli.EXIT_NO
        assert capsys.readouterr().err == "not found\n"


def child(code: str) -> list[str]:
    return ["--", sys.executable, "-c", code]


def test_lock_runs_the_command_with_the_token_and_exits_with_its_status(tmp_path, capsys):
    out = tmp_path / "env"
    code = (
        "import os, sys; open(sys.argv[1], 'w').write(os.environ['ZKV_LOCK_NAME'] + ' ' + "
        "os.environ['ZKV_LOCK_TOKEN']); sys.exit(3)"
    )
    argv = ["lock", "job", "--ttl", "5", "--wait", "2", "--", sys.executable, "-c", code, str(out)]
    assert cli.main(argv) == 3
    assert out.read_text() == "job 41"
    assert events() == [("acquired", "job", 5.0, 2.0), ("released", "job")]


def test_lock_options_after_the_double_dash_belong_to_the_command(tmp_path):
    out = tmp_path / "argv"
    code = "import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))"
    argv = ["lock", "job", "--ttl", "5", *child(code), str(out), "--ttl", "9", "--", "x"]
    assert cli.main(argv) == 0
    assert out.read_text() == "--ttl 9 -- x"


def test_lock_held_by_another_exits_1_without_running(fake_client, tmp_path, capsys):
    fake_client.held_by_another = True
    out = tmp_path / "ran"
    code = "import sys; open(sys.argv[1], 'w').write('ran')"
    assert cli.main(["lock", "job", "--ttl", "5", *child(code), str(out)]) == cli.EXIT_NO
    assert not out.exists()
    assert "is held by another" in capsys.readouterr().err


def test_lock_lost_while_the_command_ran_is_an_error_even_if_it_succeeded(fake_client, capsys):
    fake_client.lose = True
    assert cli.main(["lock", "job", "--ttl", "5", *child("pass")]) == cli.EXIT_ERROR
    assert "lost" in capsys.readouterr().err
    assert cli.main(["lock", "job", "--ttl", "5", *child("raise SystemExit(4)")]) == 4


def test_lock_of_a_command_that_cannot_start_exits_127_and_releases(tmp_path, capsys):
    missing = str(tmp_path / "no-such-program")
    assert cli.main(["lock", "job", "--ttl", "5", "--", missing]) == cli.EXIT_NOT_RUN
    assert "cannot run" in capsys.readouterr().err
    assert events()[-1] == ("released", "job")


def test_a_double_dash_outside_lock_keeps_its_argparse_meaning():
    assert cli.main(["set", "--", "-k", "-v"]) == 0  # a key and a value starting with '-'
    assert events()[-1][:3] == ("set", "-k", "-v")


# --- a newcomer's findings (README/CLI fixes) ---------------------------------------------------


class ClosedStdout:
    """A standard output whose reader went away (zkv all | head -1)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    @property
    def buffer(self) -> ClosedStdout:
        return self


@pytest.mark.parametrize("argv", [["all"], ["get", "k"], ["get", "k", "--meta"], ["ttl", "k"]])
def test_a_closed_stdout_ends_any_command_quietly_with_141(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosedStdout())
    assert cli.main(argv) == cli.EXIT_PIPE == 141
    assert capsys.readouterr().err == ""


def test_incr_of_a_non_integer_is_refused_with_exit_1_as_set_nx(fake_client, capsys):
    assert cli.main(["incr", "word"]) == cli.EXIT_NO
    assert capsys.readouterr().err == "refused: value is not an integer\n"


def test_delete_if_version(capsys):
    assert cli.main(["delete", "k", "--if-version", "6"]) == cli.EXIT_NO
    assert capsys.readouterr().err == "not deleted: version is 5, not 6\n"
    assert cli.main(["del", "--if-version", "5", "k"]) == 0
    assert events() == [("delete", "k", 5)]


def test_lock_help_shows_the_command_after_the_double_dash(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["lock", "--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage.startswith("usage: python -m zkv lock NAME --ttl SECONDS [--wait SECONDS]")
    assert usage.endswith(" -- COMMAND [ARG ...]")


def test_a_lost_lock_is_reported_once(fake_client, caplog, capsys):
    fake_client.lose = True
    assert cli.main(["lock", "job", "--ttl", "5", *child("pass")]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.count("lost") == 1
    assert not [record for record in caplog.records if "lost" in record.getMessage()]
