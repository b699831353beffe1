"""Issue 12 in the blocking client's own logic, without sockets: what a Pipeline queues and
how it turns raw outcomes into results (fence pre-checks, put's Item, lock's Lock), and how
``with kv.lock(...)`` releases and reports a lost lock, with a fake client underneath."""

from __future__ import annotations

from typing import Any

import pytest

from zkv import calls as c
from zkv.calls import Item, Lock, NotFound
from zkv.client import HeldLock, Pipeline
from zkv.errors import Conflict, LockLost, Timeout

pytestmark = pytest.mark.unit

V = 1_765_000_000_000_000


class FakeClient:
    """What Pipeline and HeldLock use of a Client: ``_execute``, and the lock calls."""

    def __init__(self, newest: dict[bytes, int] | None = None) -> None:
        self.newest = newest or {}  # lock name -> newest token (for FENCE_CHECK)
        self.batches: list[tuple[list, bool, float]] = []
        self.released: list[tuple[bytes, int]] = []
        self.release_error: Exception | None = None

    def _execute(
        self, ops: list, raise_on_error: bool, plain: bool = True, patience_s: float = 0.0
    ) -> list[Any]:
        self.batches.append((ops, plain, patience_s))
        return [self._answer(op) for op in ops]

    def _answer(self, op: tuple) -> Any:
        code, key, spec, _ = op
        if code == c.C_FENCE_CHECK:
            return self.newest.get(key) == spec[2]["token"]
        if code == c.C_PUT:
            return (V, 1234)
        if code == c.C_LOCK:
            return (V, 5000)
        if code == c.C_META:
            return None if key == b"gone" else Item(b"", None, V)
        if code == c.C_EXPIRE:
            return None
        return ("sent", key)

    # HeldLock's part
    def acquire_lock(self, name: Any, ttl_s: float, wait_s: float = 0) -> Lock:
        return Lock(c.lock_name(name), 7, 10_000)

    def release_lock(self, name: bytes, token: int) -> None:
        if self.release_error is not None:
            raise self.release_error
        self.released.append((name, token))


def test_a_pipeline_of_plain_ops_takes_the_hot_path():
    client = FakeClient()
    pipe = Pipeline(client)  # type: ignore[arg-type]
    pipe.set("a", "1").delete("a")
    pipe.execute()
    ((ops, plain, _),) = client.batches
    assert plain and ops == [
        (int(c.Kind.SET), b"a", b"1", None),
        (int(c.Kind.DEL), b"a", None, None),
    ]


def test_a_pipeline_checks_each_fence_once_and_sends_only_the_writes_that_passed():
    client = FakeClient({b"job": 5})
    pipe = Pipeline(client)  # type: ignore[arg-type]
    pipe.set("a", "1", fence=("job", 5)).set("b", "2", fence=("job", 4)).incr("c", fence=("job", 5))
    pipe.get("d")
    results = pipe.execute(raise_on_error=False)
    checks, sent = client.batches
    assert [op[0] for op in checks[0]] == [c.C_FENCE_CHECK, c.C_FENCE_CHECK]  # (job, 5), (job, 4)
    assert [op[1] for op in sent[0]] == [b"a", b"c", b"d"]
    assert results[0] == ("sent", b"a") and results[2] == ("sent", b"c")
    assert isinstance(results[1], Conflict) and "fence token 4" in str(results[1])
    with pytest.raises(Conflict):
        Pipeline(client).set("b", "2", fence=("job", 4)).execute()  # type: ignore[arg-type]


def test_a_pipeline_turns_raw_outcomes_into_what_each_method_promises():
    client = FakeClient()
    pipe = Pipeline(client)  # type: ignore[arg-type]
    pipe.put("p", "val").acquire_lock("job", 10, wait_s=3).ttl_ms("k").ttl_ms("gone").expire("x", 5)
    put, lock, ttl, gone, expired = pipe.execute(raise_on_error=False)
    assert put == Item(b"val", 1234, V)
    assert isinstance(lock, Lock) and (lock.name, lock.token, lock.expires_at_ms) == (
        b"job",
        V,
        5000,
    )
    assert ttl is None  # no deadline
    assert isinstance(gone, NotFound)
    assert expired is None  # missing, as a pipelined get
    ((_, plain, patience_s),) = client.batches
    assert not plain and patience_s == 3.0
    assert len(pipe) == 0  # forgotten once executed


def test_leaving_a_lock_block_releases_it():
    client = FakeClient()
    with HeldLock(client, "job", 10, 0, False) as lock:  # type: ignore[arg-type]
        assert lock.token == 7
    assert client.released == [(b"job", 7)]


def test_a_block_that_raises_still_releases_and_its_error_is_not_masked():
    client = FakeClient()
    client.release_error = Timeout("no reply")
    with pytest.raises(KeyError), HeldLock(client, "job", 10, 0, False):  # type: ignore[arg-type]
        raise KeyError("the block's own")


def test_a_lock_lost_while_held_is_raised_when_the_block_ends():
    client = FakeClient()
    client.release_error = Conflict("token 7 is not current")
    with pytest.raises(LockLost, match="lost while held"):
        with HeldLock(client, "job", 10, 0, False):  # type: ignore[arg-type]
            pass


def test_a_lock_the_refresher_lost_is_not_released_and_is_raised_at_the_end():
    client = FakeClient()
    with pytest.raises(LockLost, match="refused"):
        with HeldLock(client, "job", 10, 0, False) as lock:  # type: ignore[arg-type]
            lock.error = LockLost("refused")
    assert client.released == []
