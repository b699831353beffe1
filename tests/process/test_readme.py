"""Every example in README.md runs as printed, against a live cluster, and prints what the README
says it prints.

Why a harness of our own: pytest-markdown-docs and pytest-examples run Python fences only
(pytest-markdown-docs collected 3 of the README's 9 examples, none of its curl or shell ones).
This one runs every fenced block whose language is ``python``, ``sh`` or ``console``:

* ``python``: the block, as a file, with this venv's Python. A ``print(...)`` whose line ends in
  ``# text`` must print ``text`` (the block's output is exactly those lines, in order).
* ``sh``: the block with ``bash -e``; it must exit 0.
* ``console``: each ``$ command`` with bash; its standard output must be the lines printed
  under it (up to the next ``$``), with HTTP-dates and Unix-millisecond times compared as
  placeholders (they change with every run), a line ``...`` standing for any lines and
  ``...`` within a line for any text.

A block is left out only with a reason, in an HTML comment on the line before its fence (not
shown on GitHub): ``<!-- not run by tests/process/test_readme.py: REASON -->``. A block without
a language (a diagram) is not an example.

What the harness changes, and nothing else: the cluster runs on free ports, so
``localhost:5000`` is rewritten to the gateway's port and ``tcp://127.0.0.1:5555`` to the
broker's frontend, and ``ZKV_FRONTEND`` is set to it for the examples that use the default.
Each block starts from an empty store, in a fresh working directory (not the checkout) holding
``photo.jpg`` (random bytes) and ``.venv``, a link to the venv running the tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import ROOT, Cluster

pytestmark = pytest.mark.process

README = ROOT / "README.md"
RUN = ("python", "sh", "console")
SKIP = re.compile(r"<!-- not run by tests/process/test_readme\.py: (.+?) -->")
FENCE = re.compile(r"^```(\S*)\s*$")
EXAMPLE_TIMEOUT_S = 60.0
PLACEHOLDERS = [
    (re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT"), "<HTTP-date>"),
    (re.compile(r"\b\d{13}\b"), "<Unix ms>"),
]


@dataclass(frozen=True)
class Example:
    """One fenced block of the README."""

    language: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: str | None  # why it is not run, from the comment before it

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.language}"


def examples(text: str) -> list[Example]:
    """The README's fenced blocks that have a language."""
    found = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start = index
        end = lines.index("```", start + 1)
        skip = SKIP.search(lines[start - 1]) if start else None
        if match.group(1):
            code = "\n".join(lines[start + 1 : end]) + "\n"
            found.append(Example(match.group(1), code, start + 1, skip and skip.group(1)))
        index = end + 1
    return found


EXAMPLES = examples(README.read_text())


def normalize(text: str) -> str:
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    for pattern, placeholder in PLACEHOLDERS:
        text = pattern.sub(placeholder, text)
    return text.strip("\n")


def matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` is ``expected`` once normalized, ``...`` lines standing for any."""
    parts = [
        r"(?:[^\n]*\n)*?"
        if line == "..."
        else r"[^\n]*".join(re.escape(part) for part in line.split("...")) + r"\n"
        for line in normalize(expected).split("\n")
    ]
    return re.fullmatch("".join(parts), normalize(actual) + "\n") is not None


def console_commands(code: str) -> list[tuple[str, str]]:
    """(command, expected output) of each ``$`` line of a console block."""
    commands: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            assert commands, f"output before the first command: {line!r}"
            commands[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in commands]


def printed(code: str) -> list[str]:
    """What a Python block says it prints: the ``# text`` ending each ``print(...)`` line."""
    return re.findall(r"^\s*print\(.*\)\s+#\s?(.*)$", code, flags=re.MULTILINE)


def test_the_harness_compares_as_documented() -> None:
    expected = 'HTTP/1.1 400 Bad Request\n...\n{"t": "Fri, 27 Nov 2026 00:20:07 GMT"}'
    actual = (
        'HTTP/1.1 400 Bad Request\r\nA: 1\r\nB: 2\r\n\r\n{"t": "Sun, 06 Dec 2026 23:00:00 GMT"}'
    )
    assert matches(expected, actual)
    assert not matches(expected, actual.replace("400", "404"))
    assert matches("OK expires_at_ms=1796599336000", "OK expires_at_ms=1796600000123\n")
    assert not matches("hello", "hello\nworld")
    assert matches('{"a": 1, ...}', '{"a": 1, "b": [2], "c": 3}')
    assert not matches('{"a": 1, ...}', '{"a": 2, "b": 1}')
    assert printed("    print(sum(x))  # 1000\nprint(y)\n") == ["1000"]
    assert console_commands("$ a\nx\n\n$ b\n") == [("a", "x\n"), ("b", "")]


def test_every_example_is_run_or_says_why_not() -> None:
    languages = {example.language for example in EXAMPLES}
    assert languages <= set(RUN), f"unknown example languages: {languages - set(RUN)}"
    run = {example.language for example in EXAMPLES if not example.skip}
    assert run >= {"python", "console"}, f"the harness found no example to run of {run}"


def rewrite(code: str, cluster: Cluster) -> str:
    return code.replace("localhost:5000", f"localhost:{cluster.http_port}").replace(
        "tcp://127.0.0.1:5555", cluster.frontend
    )


def empty(cluster: Cluster) -> None:
    client = cluster.client()
    for entry in client.all():
        client.delete(entry.key)


RUNNABLE = [example for example in EXAMPLES if not example.skip]


def test_the_examples_not_run_are_few_and_each_says_why() -> None:
    # Each carries its reason in the comment before it (checked above); they are not tests
    # skipped at run time, and their number is pinned so none is excluded by accident.
    assert sorted(example.skip for example in EXAMPLES if example.skip) == sorted(
        [
            "make test would run the suite within itself; tests/process/test_procfile.py runs "
            "make run's honcho",
            "make test would run the suite within itself",
            "needs a gateway started with --tokens (tests/process/test_gateway_auth_tls.py "
            "tests them)",
            "starts a second cluster on the default ports",
        ]
    )


@pytest.mark.parametrize("example", RUNNABLE, ids=[example.id for example in RUNNABLE])
def test_the_readme_example_runs_as_printed(
    example: Example, cluster: Cluster, tmp_path: Path
) -> None:
    empty(cluster)
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "photo.jpg").write_bytes(os.urandom(100_000))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["ZKV_FRONTEND"] = cluster.frontend

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S
        )

    code = rewrite(example.code, cluster)
    if example.language == "python":
        (tmp_path / "example.py").write_text(code)
        result = run([sys.executable, "example.py"])
        assert result.returncode == 0, result.stderr
        expected = printed(code)
        if expected:
            assert result.stdout.splitlines() == expected
    elif example.language == "sh":
        result = run(["bash", "-e", "-c", code])
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    else:
        for command, expected in console_commands(code):
            result = run(["bash", "-e", "-c", command])
            assert result.returncode == 0, f"$ {command}\n{result.stdout}\n{result.stderr}"
            assert matches(expected, result.stdout), (
                f"$ {command}\nREADME:\n{expected}\nprinted:\n{result.stdout}"
            )
