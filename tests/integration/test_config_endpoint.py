"""zkv.config.endpoint: endpoints checked by their form, without reaching the peer."""

from __future__ import annotations

import argparse
import socket

import pytest

from zkv.config import endpoint

pytestmark = pytest.mark.integration


def test_checking_an_endpoint_does_not_connect_to_it() -> None:
    # A throwaway socket connected to check the endpoint reached the broker, whose CURVE
    # backend then logged a refused handshake each time a worker started.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        assert endpoint(f"tcp://127.0.0.1:{port}") == f"tcp://127.0.0.1:{port}"
        with pytest.raises(TimeoutError):
            listener.accept()


@pytest.mark.parametrize(
    "text",
    ["localhost:5555", "tcp://", "tcp://127.0.0.1", "tcp://:5555", "tcp://h:0", "udp://h:1", ""],
)
def test_malformed_endpoints_are_refused_with_the_form_expected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        endpoint(text)
    assert "endpoint" in str(refused.value) or "port between" in str(refused.value)


@pytest.mark.parametrize(
    "text", ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "ipc:///tmp/x", "inproc://x"]
)
def test_well_formed_endpoints_pass(text: str) -> None:
    assert endpoint(text) == text
