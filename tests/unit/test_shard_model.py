"""A model test of the issue-12 commands in the worker: random sequences of SET (plain, NX,
XX, IF_VERSION, RETURN_OLD), DEL (IF_VERSION), INCR, EXPIRE/persist, GET (touch), LOCK,
REFRESH, UNLOCK and fenced writes, with the clock moving, retries of earlier requests (same id:
answered as the first time, applied once; refused ones too, typically after the state changed
so that they would now succeed, and touches, which must not move the deadline again) and
restarts (the shard replayed from its log) in the middle, checked after every step against a
sequential model of each key and lock.

Also checked: every version a key gets is larger than any it had (and than any the shard gave
before: the versions are one counter), across restarts; every token of a lock larger than the
lock's earlier tokens. Our own generator with fixed seeds and a bounded count (Hypothesis is
not a dependency): a failure names its seed and step, and replays exactly.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from workers.aof import FsyncPolicy
from workers.persist import Durability
from workers.shard import Shard, take_shard
from zkv.protocol import (
    Dispatch,
    Kind,
    Reply,
    Request,
    Status,
    decode_from_broker,
    decode_old_item,
    dispatch_frames,
    encode_request,
    split_incr_body,
    split_versioned,
)

pytestmark = pytest.mark.unit

SEEDS = (1, 2, 3, 4)
STEPS = 500
KEYS = (b"a", b"b", b"c")
LOCKS = (b"x", b"y")
I64 = (-(2**63), 2**63 - 1)
# The answers a write gets for good (a retry must repeat them): applied, or refused.
DEFINITE = (Status.OK, Status.PRECONDITION, Status.CONFLICT, Status.NOT_FOUND)


@dataclass
class Item:
    value: bytes
    version: int
    deadline: int | None


@dataclass
class Lock:
    held: bool
    token: int
    expires: int


@dataclass
class Model:
    """What the shard must hold: live items, locks, the newest fence token per lock."""

    items: dict[bytes, Item] = field(default_factory=dict)
    locks: dict[bytes, Lock] = field(default_factory=dict)
    fences: dict[bytes, int] = field(default_factory=dict)
    versions: dict[bytes, int] = field(default_factory=dict)  # the last version per key
    tokens: dict[bytes, list[int]] = field(default_factory=dict)  # every token per lock
    last_version: int = 0  # the largest version the shard answered

    def live(self, key: bytes, now: int) -> Item | None:
        item = self.items.get(key)
        if item is not None and item.deadline is not None and now >= item.deadline:
            del self.items[key]
            return None
        return item

    def new_version(self, key: bytes, version: int) -> None:
        assert version > self.versions.get(key, 0), (key, version, self.versions.get(key))
        assert version > self.last_version
        self.versions[key] = self.last_version = version


class Run:
    def __init__(self, seed: int, tmp_path: Path) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.durability = Durability(tmp_path / "data", FsyncPolicy.ALWAYS, fsync=lambda fd: None)
        self.epoch = 1
        self.shard: Shard = take_shard(0, self.epoch, None, self.durability, self.clock).shard
        self.tokens = itertools.count(1)
        self.ids = itertools.count(1)
        self.model = Model()
        # Writes answered for good that may be retried: (request, the reply it got, when).
        # Refusals included: a late copy must repeat the refusal, never apply.
        self.sent: list[tuple[Request, Reply, int]] = []

    def deliver(self, request: Request) -> Reply:
        frames = dispatch_frames(next(self.tokens), encode_request(request))
        message = decode_from_broker(frames)
        assert isinstance(message, Dispatch)
        [reply] = self.shard.handle_batch([message])
        assert isinstance(reply, Reply)
        return reply

    def restart(self) -> None:
        self.shard.close()
        self.epoch += 1
        self.shard = take_shard(0, self.epoch, None, self.durability, self.clock).shard
        self.tokens = itertools.count(1)

    # --- one step ---------------------------------------------------------------------------

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.08:
            self.clock.advance(rng.choice((1, 5, 50, 300)))
        elif roll < 0.10:
            self.restart()
        elif roll < 0.18:
            self.retry()
        elif roll < 0.40:
            self.set_()
        elif roll < 0.48:
            self.delete()
        elif roll < 0.60:
            self.incr()
        elif roll < 0.68:
            self.expire()
        elif roll < 0.78:
            self.get()
        else:
            self.lock_op()
        self.check_all()

    def request(self, kind: Kind, key: bytes, **fields: object) -> Request:
        return Request(kind, next(self.ids), key, **fields)  # type: ignore[arg-type]

    def send(self, request: Request, remember: bool = True) -> Reply:
        reply = self.deliver(request)
        if reply.status in DEFINITE and remember:
            self.sent.append((request, reply, self.clock()))
        return reply

    def ttl(self) -> int | None:
        return self.rng.choice((None, 20, 200, 1000))

    def condition(self, key: bytes, item: Item | None) -> dict[str, object]:
        choice = self.rng.random()
        if choice < 0.15:
            return {"nx": True}
        if choice < 0.3:
            return {"xx": True}
        if choice < 0.45:
            right = item.version if item is not None else self.model.versions.get(key, 1)
            return {"if_version": right if self.rng.random() < 0.7 else right + 1}
        return {}

    def refused_by(self, fields: dict[str, object], item: Item | None) -> bytes | None:
        if fields.get("nx") and item is not None:
            return b"key exists"
        if fields.get("xx") and item is None:
            return b"key does not exist"
        if "if_version" in fields:
            if item is None:
                return b"key does not exist"
            if item.version != fields["if_version"]:
                return f"version is {item.version}, not {fields['if_version']}".encode()
        return None

    def fence(self) -> tuple[bytes, int] | None:
        """A fence for a write: a lock's newest token, an older one, or none."""
        name = self.rng.choice(LOCKS)
        tokens = self.model.tokens.get(name)
        if not tokens or self.rng.random() < 0.6:
            return None
        return name, self.rng.choice(tokens[-2:])

    def fenced_out(self, fence: tuple[bytes, int] | None) -> Reply | None:
        return None

    def apply_fence(self, fence: tuple[bytes, int] | None) -> None:
        if fence is not None:
            self.model.fences[fence[0]] = max(self.model.fences.get(fence[0], 0), fence[1])

    def fence_refuses(self, fence: tuple[bytes, int] | None) -> bool:
        # The locks live on this shard: a fence is checked exactly against the lock's current
        # token (the model's fences only matter for a lock with no record here).
        if fence is None:
            return False
        current = self.model.locks.get(fence[0])
        if current is not None:
            return fence[1] != current.token
        return fence[1] < self.model.fences.get(fence[0], 0)

    def set_(self) -> None:
        now = self.clock()
        key = self.rng.choice(KEYS)
        model = self.model
        item = model.live(key, now)
        value = self.rng.choice((b"1", b"-5", b"text", b"", b"%d" % self.rng.randrange(100)))
        fields = self.condition(key, item)
        fence = self.fence()
        return_old = self.rng.random() < 0.3
        ttl = self.ttl()
        request = self.request(
            Kind.SET,
            key,
            value=value,
            ttl_ms=ttl,
            fence=fence,
            versioned=not return_old,
            return_old=return_old,
            **fields,
        )
        reply = self.send(request)
        if self.fence_refuses(fence):
            assert reply.status == Status.CONFLICT, reply
            return
        reason = self.refused_by(fields, item)
        if reason is not None:
            assert (reply.status, reply.body) == (Status.PRECONDITION, reason)
            return
        assert reply.status == Status.OK, (request, reply)
        if return_old:
            version, old = decode_old_item(reply.body)
            assert old == (None if item is None else (item.version, item.deadline, item.value))
        else:
            version = split_versioned(reply.body)[0]
        assert reply.deadline_ms == (None if ttl is None else now + ttl)
        model.new_version(key, version)
        model.items[key] = Item(value, version, reply.deadline_ms)
        self.apply_fence(fence)

    def delete(self) -> None:
        now = self.clock()
        key = self.rng.choice(KEYS)
        model = self.model
        item = model.live(key, now)
        fields = self.condition(key, item)
        fields.pop("nx", None)
        fields.pop("xx", None)
        fence = self.fence()
        reply = self.send(self.request(Kind.DEL, key, versioned=True, fence=fence, **fields))
        if self.fence_refuses(fence):
            assert reply.status == Status.CONFLICT, reply
            return
        if item is None and "if_version" not in fields:
            assert reply.status == Status.NOT_FOUND
            return
        reason = self.refused_by(fields, item)
        if reason is not None:
            assert (reply.status, reply.body) == (Status.PRECONDITION, reason)
            return
        assert reply.status == Status.OK, reply
        model.new_version(key, split_versioned(reply.body)[0])
        del model.items[key]
        self.apply_fence(fence)

    def incr(self) -> None:
        now = self.clock()
        key = self.rng.choice(KEYS)
        model = self.model
        item = model.live(key, now)
        by = self.rng.choice((1, -1, 7, 2**62, -(2**62)))
        ttl = self.rng.choice((None, None, 100))
        fence = self.fence()
        reply = self.send(self.request(Kind.INCR, key, by=by, ttl_ms=ttl, fence=fence))
        if self.fence_refuses(fence):
            assert reply.status == Status.CONFLICT, reply
            return
        if item is None:
            current, deadline = 0, None if ttl is None else now + ttl
        else:
            try:
                current = int(item.value)
                if not item.value.lstrip(b"-").isdigit():
                    raise ValueError
            except ValueError:
                assert (reply.status, reply.body) == (Status.CONFLICT, b"value is not an integer")
                return
            deadline = item.deadline if ttl is None else now + ttl
        result = current + by
        if not I64[0] <= result <= I64[1]:
            assert (reply.status, reply.body) == (Status.CONFLICT, b"increment would overflow")
            return
        assert reply.status == Status.OK, reply
        version, value = split_incr_body(reply.body)
        assert value == result and reply.deadline_ms == deadline
        model.new_version(key, version)
        model.items[key] = Item(b"%d" % result, version, deadline)
        self.apply_fence(fence)

    def expire(self) -> None:
        now = self.clock()
        key = self.rng.choice(KEYS)
        model = self.model
        item = model.live(key, now)
        ttl = self.rng.choice((None, 30, 500))
        reply = self.send(self.request(Kind.EXPIRE, key, ttl_ms=ttl, versioned=True))
        if item is None:
            assert reply.status == Status.NOT_FOUND
            return
        assert reply.status == Status.OK and reply.deadline_ms == (
            None if ttl is None else now + ttl
        )
        version = split_versioned(reply.body)[0]
        model.new_version(key, version)
        model.items[key] = Item(item.value, version, reply.deadline_ms)

    def get(self) -> None:
        now = self.clock()
        key = self.rng.choice(KEYS)
        model = self.model
        item = model.live(key, now)
        touch = self.rng.choice((None, None, 100))
        reply = self.send(self.request(Kind.GET, key, ttl_ms=touch, versioned=True), bool(touch))
        if item is None:
            assert reply.status == Status.NOT_FOUND
            return
        version, value = split_versioned(reply.body)
        assert value == item.value
        if touch is None:
            assert (version, reply.deadline_ms) == (item.version, item.deadline)
            return
        assert reply.deadline_ms == now + touch
        model.new_version(key, version)
        model.items[key] = Item(item.value, version, reply.deadline_ms)

    def lock_op(self) -> None:
        now = self.clock()
        name = self.rng.choice(LOCKS)
        model = self.model
        current = model.locks.get(name)
        roll = self.rng.random()
        ttl = self.rng.choice((10, 100, 400))
        if roll < 0.5:
            reply = self.send(self.request(Kind.LOCK, name, ttl_ms=ttl))
            if current is not None and current.held and current.expires > now:
                assert (reply.status, reply.deadline_ms) == (Status.CONFLICT, current.expires)
                return
            assert reply.status == Status.OK and reply.deadline_ms == now + ttl
            token = split_versioned(reply.body)[0]
            tokens = model.tokens.setdefault(name, [])
            assert not tokens or token > tokens[-1], (name, token, tokens)
            assert token > model.last_version
            model.last_version = token
            tokens.append(token)
            model.locks[name] = Lock(True, token, now + ttl)
            return
        tokens = model.tokens.get(name) or [1]
        token = self.rng.choice(tokens[-2:])
        valid = current is not None and current.held and current.token == token
        if roll < 0.75:
            reply = self.send(self.request(Kind.REFRESH, name, token=token, ttl_ms=ttl))
            if not valid:
                assert reply.status == Status.CONFLICT, reply
                return
            assert reply.status == Status.OK and reply.deadline_ms == now + ttl
            model.locks[name] = Lock(True, token, now + ttl)
        elif roll < 0.9:
            reply = self.send(self.request(Kind.UNLOCK, name, token=token))
            if not valid:
                assert reply.status == Status.CONFLICT, reply
                return
            assert reply.status == Status.OK
            model.locks[name] = Lock(False, token, now)
        else:
            reply = self.send(self.request(Kind.FENCE_CHECK, name, token=token), False)
            newest = current is not None and current.token == token
            assert reply.status == (Status.OK if newest else Status.CONFLICT)

    def retry(self) -> None:
        """Send a write answered for good again: the same reply, and nothing changes (a touch
        that moved the deadline: the same reply if the key still holds what it wrote, else
        CONFLICT; the deadline is not moved again either way)."""
        now = self.clock()
        recent = [(r, a) for r, a, at in self.sent if now - at < 15_000]
        if not recent:
            return
        request, first = self.rng.choice(recent)
        again = self.deliver(request)
        if request.kind == Kind.GET and first.status == Status.OK:
            item = self.model.live(request.key, now)
            if item is None or item.version != split_versioned(first.body)[0]:
                assert (again.status, again.deadline_ms) == (Status.CONFLICT, first.deadline_ms)
                return
        assert (again.status, again.deadline_ms, again.body) == (
            first.status,
            first.deadline_ms,
            first.body,
        ), request

    # --- the check after every step ------------------------------------------------------------

    def check_all(self) -> None:
        now = self.clock()
        store = self.shard.store
        for key in KEYS:
            item = self.model.live(key, now)
            held = None
            try:
                held = store.item(key)
            except KeyError:
                pass
            expected = None if item is None else (item.value, item.version, item.deadline)
            assert held == expected, (key, held, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences_match_the_model_through_retries_and_restarts(
    seed: int, tmp_path: Path
) -> None:
    run = Run(seed, tmp_path)
    for number in range(STEPS):
        try:
            run.step()
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, step {number}: {exc}") from exc
    run.shard.close()
    assert run.epoch > 2  # restarts happened
    assert any(len(tokens) > 2 for tokens in run.model.tokens.values())
