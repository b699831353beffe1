"""Fixtures for the process tests: one shared cluster per module, or a fresh one per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A running cluster (broker, one worker per shard, gateway) shared by a test module.

    A module may run its tests on several clusters with an indirect parametrization, each
    parameter a dict of environment variables for the cluster's processes::

        pytestmark = pytest.mark.parametrize(
            "cluster", [{}, {"ZKV_HTTP_FAST_LANE": "off"}], indirect=True, scope="module"
        )
    """
    path: Path = tmp_path_factory.mktemp("cluster")
    env: dict[str, str] = getattr(request, "param", {})
    with Cluster(path, **env) as running:
        try:
            running.start()
        except BaseException:
            print(running.logs())
            raise
        yield running
        dead = [p.args for p in running._all if p.poll() is not None]
        assert not dead, f"processes died during the tests: {dead}\n{running.logs()}"


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of the test's own, not started: the test starts what it needs."""
    with Cluster(tmp_path) as new:
        yield new
