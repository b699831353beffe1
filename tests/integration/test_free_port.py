"""tests/cluster.py's free_port: ports chosen before anything binds them must all differ."""

from __future__ import annotations

import pytest

from tests.cluster import free_port

pytestmark = pytest.mark.integration


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    # The kernel offers released ports again (about 2,000 draws from the ephemeral range repeat
    # some with near certainty): a broker's endpoints, all chosen before it binds any, clashed.
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
