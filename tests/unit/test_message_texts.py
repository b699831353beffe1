"""What the error messages a person reads say (a newcomer's findings): lock names as text, not
Python bytes; a fence on a lock never taken not blamed on a lapse; the gateway's token and
If-Match wording true to what it accepts."""

from __future__ import annotations

import pytest

from gateway.app import BadRequest, parse_etags, parse_token
from tests.fakes import FakeClock
from tests.unit.test_shard_commands import Wire
from workers.shard import Shard
from workers.store import TTLStore
from zkv.calls import stale_fence
from zkv.protocol import Kind, Status

pytestmark = pytest.mark.unit


def test_the_worker_names_a_lock_as_quoted_text() -> None:
    wire = Wire(Shard(0, TTLStore(FakeClock())))
    reply = wire.send(Kind.UNLOCK, b"job", token=1)
    assert reply.status == Status.CONFLICT
    assert reply.body == (
        b'token 1 is not the current token of lock "job" (the lock is not held, newest token 0)'
    )
    odd = wire.send(Kind.REFRESH, b"j\xffb", token=1, ttl_ms=100)
    assert odd.body.startswith(b'token 1 is not the current token of lock "j\\xffb" (')
    check = wire.send(Kind.FENCE_CHECK, b"job", token=3)
    assert check.body == b'token 3 is not the newest of lock "job" (0)'


def test_a_refused_fence_does_not_claim_the_lock_lapsed() -> None:
    message = str(stale_fence((b"nolock", 5)))
    assert message == (
        'fence token 5 of lock "nolock" is not the lock\'s newest token (never issued, or the '
        "lock was taken again since): not written"
    )


def test_the_gateway_token_range_is_the_one_the_client_accepts() -> None:
    with pytest.raises(BadRequest, match="an integer from 1 to 18446744073709551615"):
        parse_token("token", "x")


def test_the_if_match_wording_offers_no_list_it_would_refuse() -> None:
    with pytest.raises(BadRequest) as refused:
        parse_etags("If-Match", "five")
    message = str(refused.value)
    assert 'or "5", "7"' not in message and "If-None-Match may list several" in message
