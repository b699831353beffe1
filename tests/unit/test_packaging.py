"""What ``pip install .`` installs: every third-party module the services import is a declared
dependency of the project (else a fresh install cannot start them: ``No module named
'greenlet'``), and requirements.txt pins each declared dependency for development and CI."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]


def name_of(requirement: str) -> str:
    """A requirement's distribution name, normalized as PEP 503 does (``PyZMQ>=27`` -> pyzmq)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def imported_modules(package: Path) -> dict[str, Path]:
    """Top-level modules imported anywhere in ``package`` that are neither the standard library
    nor the project's own packages, each with one file that imports it."""
    found: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PACKAGES:
                    found.setdefault(top, path)
    return found


def test_every_imported_distribution_is_a_declared_dependency() -> None:
    declared = {name_of(requirement) for requirement in PYPROJECT["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    imported = {
        module: path
        for package in PACKAGES
        for module, path in imported_modules(ROOT / package).items()
    }
    assert imported, "no third-party import found: the scan is broken"
    missing = {
        f"{module} (imported by {path.relative_to(ROOT)})": distributions.get(module)
        for module, path in imported.items()
        if not {name_of(d) for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"pyproject.toml [project] dependencies lack: {missing}"


def test_requirements_txt_pins_every_declared_dependency() -> None:
    pinned = {
        name_of(line): line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert all("==" in line for line in pinned.values()), pinned
    declared = [
        *PYPROJECT["project"]["dependencies"],
        *PYPROJECT["project"]["optional-dependencies"]["dev"],
    ]
    unpinned = [requirement for requirement in declared if name_of(requirement) not in pinned]
    assert not unpinned, f"requirements.txt does not pin {unpinned}"


def test_the_services_have_console_scripts() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts == {
        "zkv": "zkv.cli:main",
        "zkv-broker": "broker.__main__:main",
        "zkv-worker": "workers.__main__:main",
        "zkv-gateway": "gateway.server:main",
    }
