"""Issue 12's commands through many clients at once, checked against a sequential model per key.

Four threads, each with its own client, run random conditional SETs, DELs, INCRs, EXPIRE and
persist, touches and GETs on keys of their own (so each key's history is sequential and its
model exact), while all of them count on one shared counter and take one lock to increment a
fenced counter: the totals must come out exact and the lock's tokens all differ."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from tests.integration.test_client_commands import Cluster, cluster  # noqa: F401
from zkv import Conflict, NotFound, PreconditionFailed

pytestmark = pytest.mark.integration

THREADS = 4
STEPS = 150  # per thread
KEYS = 4  # per thread
SHARED_INCRS = 40  # per thread
LOCKED_ROUNDS = 8  # per thread
TTL_S = 300.0  # long: nothing expires during the test, so the model needs no clock


def _run_keys(kv: Any, seed: int, prefix: str) -> None:
    """Random operations on this thread's own keys, each result checked against the model."""
    rng = random.Random(seed)
    model: dict[str, tuple[bytes, int, bool]] = {}  # key -> (value, version, has deadline)
    last: dict[str, int] = {}  # key -> the highest version seen (versions only grow)

    def wrote(key: str, value: bytes, version: int, deadline: bool) -> None:
        assert version > last.get(key, 0), (key, version, last.get(key))
        last[key] = version
        model[key] = (value, version, deadline)

    for step in range(STEPS):
        key = f"{prefix}:{rng.randrange(KEYS)}"
        held = model.get(key)
        op = rng.choice(["put", "nx", "xx", "ifv", "del", "delv", "incr", "exp", "pers", "get"])
        where = (step, op, key, held)
        if op in ("put", "nx", "xx", "ifv"):
            value = rng.choice([b"x%d" % step, b"%d" % rng.randrange(-50, 50)])
            options: dict[str, Any] = {}
            refused = False
            if op == "nx":
                options["nx"] = True
                refused = held is not None
            elif op == "xx":
                options["xx"] = True
                refused = held is None
            elif op == "ifv":
                stale = held is not None and rng.random() < 0.4
                options["if_version"] = held[1] - 1 if stale else (held[1] if held else 1)
                refused = held is None or stale
            if refused:
                with pytest.raises(PreconditionFailed):
                    kv.put(key, value, ttl_s=TTL_S, **options)
            else:
                item = kv.put(key, value, ttl_s=TTL_S, **options)
                assert item.deadline_ms is not None, where
                wrote(key, value, item.version, True)
        elif op == "del":
            assert kv.delete(key) is (held is not None), where
            model.pop(key, None)
        elif op == "delv":
            if held is None:
                with pytest.raises(PreconditionFailed):
                    kv.delete(key, if_version=7)
            else:
                assert kv.delete(key, if_version=held[1]), where
                model.pop(key)
        elif op == "incr":
            by = rng.randrange(-5, 6)
            numeric = held is None or held[0].lstrip(b"-").isdigit()
            if not numeric:
                with pytest.raises(Conflict):
                    kv.incr_item(key, by)
            else:
                value, version, deadline = kv.incr_item(key, by)
                expected = (int(held[0]) if held else 0) + by
                assert value == expected, where
                wrote(key, b"%d" % value, version, deadline is not None)
                assert (deadline is not None) == (held[2] if held else False), where
        elif op in ("exp", "pers"):
            if held is None:
                with pytest.raises(NotFound):
                    kv.expire(key, TTL_S) if op == "exp" else kv.persist(key)
                continue
            if op == "exp":
                kv.expire(key, TTL_S)
            else:
                kv.persist(key)
            item = kv.get(key)
            wrote(key, held[0], item.version, op == "exp")
            assert (item.deadline_ms is not None) == (op == "exp"), where
        else:  # get, sometimes touching
            touch = TTL_S if rng.random() < 0.3 else None
            if held is None:
                with pytest.raises(NotFound):
                    kv.get(key, touch_s=touch)
                continue
            item = kv.get(key, touch_s=touch)
            assert item.value == held[0], where
            if touch is None:
                assert item.version == held[1] and (item.deadline_ms is not None) == held[2]
            else:  # a touch is a write: a new version, and a deadline
                wrote(key, held[0], item.version, True)
    for key, (value, version, _) in model.items():  # the final state is the model's
        item = kv.get(key)
        assert (item.value, item.version) == (value, version), key


def test_many_clients_at_once_agree_with_a_sequential_model_per_key(cluster: Cluster) -> None:  # noqa: F811
    errors: list[BaseException] = []
    tokens: list[int] = []
    guard = threading.Lock()

    def run(n: int) -> None:
        try:
            with cluster.client(timeout_s=10.0) as kv:
                _run_keys(kv, 1000 + n, f"model{n}")
                for _ in range(SHARED_INCRS):
                    kv.incr("model:shared")
                for _ in range(LOCKED_ROUNDS):
                    with kv.lock("model:lock", ttl_s=10, wait_s=20) as lock:
                        try:
                            now = int(kv.get("model:fenced").value)
                        except NotFound:
                            now = 0
                        kv.set("model:fenced", str(now + 1), fence=lock)
                        with guard:
                            tokens.append(lock.token)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    with cluster.client() as kv:
        assert kv.incr("model:shared", 0) == THREADS * SHARED_INCRS  # no INCR lost or doubled
        assert kv.get("model:fenced").value == b"%d" % (THREADS * LOCKED_ROUNDS)  # mutual exclusion
    assert len(set(tokens)) == len(tokens) == THREADS * LOCKED_ROUNDS  # a token per acquisition
