"""The token table (one request per key at the workers, FIFO) and the fencing token issuer."""

import pytest

from broker.tokens import SEQUENCE_BITS, TokenIssuer, TokenTable

pytestmark = pytest.mark.unit


def test_free_token_is_taken_at_once():
    table: TokenTable[str] = TokenTable()
    assert table.acquire(b"k", "first") is True
    assert table.held(b"k")


def test_waiters_get_the_token_in_arrival_order():
    table: TokenTable[str] = TokenTable()
    table.acquire(b"k", "first")
    assert table.acquire(b"k", "second") is False
    assert table.acquire(b"k", "third") is False
    assert table.waiting(b"k") == 2
    assert table.release(b"k") == "second"
    assert table.release(b"k") == "third"
    assert table.release(b"k") is None
    assert not table.held(b"k")
    assert len(table) == 0


def test_a_busy_key_never_blocks_another_key():
    table: TokenTable[str] = TokenTable()
    table.acquire(b"hot", "a")
    for i in range(5):
        table.acquire(b"hot", f"queued{i}")
    assert table.acquire(b"cold", "b") is True
    assert len(table) == 2


def test_release_without_acquire_is_a_bug():
    table: TokenTable[str] = TokenTable()
    with pytest.raises(KeyError):
        table.release(b"never")


def test_tokens_strictly_increase_and_carry_the_epoch():
    issuer = TokenIssuer(epoch=1000)
    tokens = [issuer.issue() for _ in range(100)]
    assert tokens == sorted(set(tokens))
    assert tokens[0] >> SEQUENCE_BITS == 1000


def test_sequence_overflow_moves_to_the_next_epoch_still_increasing():
    issuer = TokenIssuer(epoch=7)
    issuer.advance_past((7 << SEQUENCE_BITS) - 1)  # no effect: already past it
    issuer._next = (8 << SEQUENCE_BITS) - 1  # last sequence number of epoch 7
    last_of_epoch = issuer.issue()
    first_of_next = issuer.issue()
    assert first_of_next > last_of_epoch
    assert first_of_next >> SEQUENCE_BITS == 8


def test_a_restarted_broker_issues_past_what_a_worker_accepted():
    # The old broker ran in epoch 2000; the new one starts with an older clock (epoch 1999).
    seen_by_worker = (2000 << SEQUENCE_BITS) + 12345
    issuer = TokenIssuer(epoch=1999)
    issuer.advance_past(seen_by_worker)
    token = issuer.issue()
    assert token > seen_by_worker
    assert token >> SEQUENCE_BITS == 2001


def test_advance_past_never_goes_backwards():
    issuer = TokenIssuer(epoch=50)
    before = issuer.issue()
    issuer.advance_past(5)
    assert issuer.issue() > before


def test_a_released_token_goes_to_the_whole_run_of_waiters_that_fits():
    table: TokenTable[int] = TokenTable()
    table.acquire(b"k", 0)
    for waiter in (1, 2, 3):
        table.acquire(b"k", waiter)
    table.acquire(b"free", 9)
    assert table.release_many([b"k", b"free"], 3, 100, lambda w: w) == [(b"k", [1, 2, 3])]
    assert table.held(b"k") and table.waiting(b"k") == 0 and not table.held(b"free")
    assert table.release_run(b"k", 3, 100, lambda w: w) == ()
    assert len(table) == 0


@pytest.mark.parametrize(
    ("max_count", "max_weight", "runs"),
    [
        (2, 100, [[1, 2], [3, 4], [5]]),  # cut by count
        (10, 7, [[1, 2, 3], [4], [5]]),  # cut by weight
        (10, 0, [[1], [2], [3], [4], [5]]),  # never less than one waiter, whatever it weighs
        (5, 15, [[1, 2, 3, 4, 5]]),  # exactly at both limits: all of them
    ],
)
def test_a_run_is_cut_at_the_limits_and_the_rest_waits_in_order(max_count, max_weight, runs):
    table: TokenTable[int] = TokenTable()
    table.acquire(b"k", 0)
    for waiter in range(1, 6):
        table.acquire(b"k", waiter)
    taken = [list(table.release_run(b"k", max_count, max_weight, lambda w: w))]
    table.acquire(b"k", 99)  # a newcomer waits behind the rest
    while run := table.release_run(b"k", max_count, max_weight, lambda w: w):
        taken.append(list(run))
    assert taken[: len(runs)] == runs
    assert taken[len(runs) :] == [[99]]
    assert len(table) == 0
