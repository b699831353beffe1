"""A TTL that is not a positive, finite number of seconds is refused by the clients, before
anything is sent (issue 10, item 12): ``ttl_s=0`` or a negative one used to become 1 ms, a
value gone before anyone could read it. No broker is needed: the refusal comes first (a client
that tried to send would fail only after its connect timeout, with Unavailable)."""

from __future__ import annotations

import asyncio
import math

import pytest

from zkv.aio import AsyncClient
from zkv.calls import ttl_to_ms
from zkv.client import Client
from zkv.errors import RequestError

pytestmark = pytest.mark.unit

ENDPOINT = "tcp://127.0.0.1:9"  # nothing listens: a send would time out, not be refused
BAD_TTLS = [0, 0.0, -1, -0.001, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("ttl_s", BAD_TTLS)
def test_ttl_to_ms_refuses_what_is_not_a_positive_finite_number(ttl_s: float) -> None:
    with pytest.raises(RequestError, match="ttl_s must be a positive, finite number"):
        ttl_to_ms(ttl_s)


def test_ttl_to_ms_keeps_never_and_rounds_a_positive_ttl_to_at_least_one_ms() -> None:
    assert ttl_to_ms(None) is None
    assert ttl_to_ms(0.0001) == 1
    assert ttl_to_ms(2.5) == 2500


@pytest.fixture
def client() -> Client:
    kv = Client(ENDPOINT, timeout_s=0.2, connect_timeout_s=0.1)
    yield kv
    kv.close()


@pytest.mark.parametrize("ttl_s", BAD_TTLS)
def test_the_sync_client_refuses_a_bad_ttl_in_set_set_many_and_pipelines(
    client: Client, ttl_s: float
) -> None:
    with pytest.raises(RequestError):
        client.set(b"k", b"v", ttl_s=ttl_s)
    with pytest.raises(RequestError):
        client.set_many({b"k": b"v"}, ttl_s=ttl_s)
    with pytest.raises(RequestError), client.pipeline() as pipe:
        pipe.set(b"k", b"v", ttl_s=ttl_s)
    assert client.retries == 0  # nothing was sent


@pytest.mark.parametrize("ttl_s", BAD_TTLS)
def test_the_asyncio_client_refuses_a_bad_ttl(ttl_s: float) -> None:
    async def run() -> None:
        kv = AsyncClient(ENDPOINT, timeout_s=0.2, connect_timeout_s=0.1)
        try:
            with pytest.raises(RequestError):
                await kv.set(b"k", b"v", ttl_s=ttl_s)
            assert kv.batches == 0  # nothing was queued
        finally:
            await kv.close()

    asyncio.run(run())


def test_ttl_to_ms_names_seconds_and_the_type_in_its_errors() -> None:
    # "5" gave "'<' not supported between int and str", and a TTL over ten years a message
    # in milliseconds for an argument given in seconds.
    with pytest.raises(TypeError, match="ttl_s must be a number of seconds, not str"):
        ttl_to_ms("5")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="at most 315360000 seconds"):
        ttl_to_ms(400_000_000)
