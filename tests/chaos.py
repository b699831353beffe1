"""A Jepsen-style chaos test: real processes, a nemesis that kills them, an exact checker.

``python -m tests.chaos --duration 300 --seed 7`` starts a cluster (broker, ``--workers`` worker
processes for ``--shards`` shards, so some are standbys, and the gateway) with its data in a
temporary directory, then for ``--duration`` seconds runs at once:

* writers, each owning its own keys, setting and deleting them through the zkv client, the seed
  HTTP API (``/set``, ``/delete``) and the REST API (``PUT``/``DELETE /v1/keys/...``);
* readers, reading any key through the same three paths;
* a nemesis that kills a random worker with SIGKILL every ``--kill-interval`` seconds and starts
  a new one as a process manager would, and once kills the broker with SIGKILL and starts it
  again on the same endpoints.

Every operation is recorded (who, what, key, value, TTL, start and end on the host's wall clock,
outcome). When the load stops, every worker is killed at once and as many started (so each
key's last value must come back from disk); once every shard has an owner again, each key is
read one last time through the client and the history is checked; the summary is printed, the
full report written as JSON with ``--json``, and the exit status is 1 if anything was lost or
read wrong.

The history model (the checker is exact only because the workload makes it so)
------------------------------------------------------------------------------------------
Each key is written by one writer thread only, one request at a time, so a key's writes and
deletes form a sequence in program order; values are unique (``w<writer>-k<key>-<seq>``), so a
value read names the one write that produced it. Each update ends in one of four outcomes:

* ``ok`` / ``not_found`` (a DELETE of a missing key): acknowledged, it took effect within its
  [start, end] interval;
* ``fail``: definitely not applied (the client raised before sending, the request was refused,
  the broker had no worker for the shard, HTTP 400);
* ``unknown``: it may or may not have taken effect (a timeout, "outcome unknown", a connection
  lost mid-request). An unknown update that reached the broker takes effect, if at all, before
  the next update of its key does: the broker serves each key's requests one at a time, in
  arrival order, and the writer sends its next request only after giving up on this one. An
  HTTP request abandoned by *our* side (our socket timed out or broke) may still be sitting in
  the gateway, so it may take effect at any later time: it is marked ``may_apply_late``.

A read that ran during [S, E] may observe the state left by any update that could be the most
recent one applied at some moment of [S, E]: the last update acknowledged before S (call it L;
"nothing yet" when there is none), any later update that started before E, and any
``may_apply_late`` update that started before E. Updates before L are *superseded*. The state
an update leaves is its value until its deadline, nothing after it; a DELETE leaves nothing.
Deadlines come from the reply (exact from the client and REST; to the second from the seed
API's HTTP-date) or, when unknown, from [start, end] + TTL. The checker then decides:

* a read of value v is valid iff v was written to this key by a write that was not a definite
  failure, started before the read ended, is not superseded, and whose deadline had not passed
  when the read started; and the deadline the read reports agrees with the write's;
* a read of "not found" is valid iff one of those candidate states can be absent: "nothing
  yet", a DELETE, or a write whose earliest possible deadline is at most ``margin_ms`` after
  the read ended;
* ``lost`` counts keys whose final read is invalid because an acknowledged update is missing
  (not found, or an older value came back); other invalid final reads count as ``invalid``.

Ownership: workers are expected to log ``took shard N epoch E (...)`` and ``left shard N epoch
E: REASON``. Each worker's log gives its ownership intervals; one killed with SIGKILL ends its
interval at the kill. ``double_owner`` counts pairs of intervals of different processes that
overlap on the same shard. Without such lines the check is reported as not done.

Everything is bounded: loops stop at the deadline, each request has a timeout (the client's
``timeout_s``, the HTTP socket timeout), and the cluster is torn down whatever happens, Ctrl-C
included.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import email.utils
import enum
import functools
import http.client
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.cluster import Cluster
from zkv import defaults as zkv_defaults
from zkv.client import Client, NotFound
from zkv.errors import RequestError, Timeout, Unavailable

# --- tunables ---------------------------------------------------------------------------------

MARGIN_MS = 50.0  # clock and expiry precision allowed between this process and the workers
LONG_TTL_MS = 60_000  # long-lived keys: must survive every failure of a run
SHORT_TTL_MS = (1_000, 3_000)  # short-lived keys: must expire
LONG_TTL_FRACTION = 0.5
DELETE_FRACTION = 0.15  # of a writer's operations
HTTP_GRACE_S = 3.0  # our HTTP timeout is the gateway's own timeout plus this
RESTART_DELAY_MAX_S = 1.0  # a killed process is started again after up to this long
BROKER_RESTART_AT = (0.3, 0.6)  # the broker is killed once, in this part of the run
NEMESIS_TICK_S = 0.05
FINAL_READ_BUDGET_S = 5.0  # per key: retries of the last read while the cluster settles
DETAILS_SHOWN = 10  # findings printed in the summary; the JSON report has them all

APIS = ("client", "seed", "rest")


class Kind(enum.StrEnum):
    """What an operation did."""

    SET = "set"
    GET = "get"
    DELETE = "delete"


class Outcome(enum.StrEnum):
    """How an operation ended, in Jepsen's terms: ok, fail (definite) or info (unknown)."""

    OK = "ok"
    NOT_FOUND = "not_found"  # acknowledged: GET or DELETE of a missing key
    FAIL = "fail"  # certainly not applied
    UNKNOWN = "unknown"  # may or may not have been applied


ACKNOWLEDGED = (Outcome.OK, Outcome.NOT_FOUND)


def now_ms() -> float:
    """The host's wall clock in Unix milliseconds: the clock the workers' deadlines use."""
    return time.time() * 1000


@dataclass(slots=True)
class Op:
    """One operation of the history.

    Attributes:
        process: the thread that ran it: ``writer-N``, ``reader-N`` or ``final``.
        api: ``client``, ``seed`` or ``rest``.
        kind: set, get or delete.
        key: the key.
        value: for a set the value written, for a get the value read (None if not found).
        ttl_ms: for a set, its time to live (None: never expires).
        start_ms: wall clock when the request was about to be sent.
        end_ms: wall clock when its answer (or failure) came back.
        outcome: see :class:`Outcome`; ``unknown`` while in flight.
        error: the kind of error, for ``fail`` and ``unknown``.
        deadline_lo_ms: for an acknowledged set, the earliest the key's deadline can be (from
            the reply); for a get, the earliest deadline the reply reported. None: unknown.
        deadline_hi_ms: the latest, likewise.
        may_apply_late: an unknown outcome that may take effect after later requests.
        final: one of the last reads, made after the nemesis stopped.
    """

    process: str
    api: str
    kind: Kind
    key: str
    value: str | None = None
    ttl_ms: int | None = None
    start_ms: float = 0.0
    end_ms: float = math.inf
    outcome: Outcome = Outcome.UNKNOWN
    error: str | None = "in flight"
    deadline_lo_ms: float | None = None
    deadline_hi_ms: float | None = None
    may_apply_late: bool = True
    final: bool = False

    def describe(self, origin_ms: float) -> str:
        """One line for a report, times relative to ``origin_ms`` in seconds."""
        what = f"{self.kind} {self.value!r}" if self.value is not None else str(self.kind)
        text = (
            f"{self.process}/{self.api} {what} "
            f"[{_rel(self.start_ms, origin_ms)}, {_rel(self.end_ms, origin_ms)}] {self.outcome}"
        )
        if self.error:
            text += f" ({self.error})"
        if self.deadline_hi_ms is not None:
            text += f" deadline {_rel(self.deadline_hi_ms, origin_ms)}"
        return text

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if math.isinf(self.end_ms):
            data["end_ms"] = None
        return data


def _rel(t_ms: float | None, origin_ms: float) -> str:
    if t_ms is None or math.isinf(t_ms):
        return "?"
    return f"{(t_ms - origin_ms) / 1000:.3f}s"


# --- outcomes: which errors mean "not applied" -----------------------------------------------


class Failure(Exception):
    """A request that did not succeed, classified.

    Args:
        outcome: FAIL (certainly not applied) or UNKNOWN.
        error: the kind of error, for the report.
        may_apply_late: an UNKNOWN request that may still take effect after later requests.
    """

    def __init__(self, outcome: Outcome, error: str, may_apply_late: bool = False) -> None:
        super().__init__(error)
        self.outcome = outcome
        self.error = error
        self.may_apply_late = may_apply_late


# Since the client resends a request that got no reply (same request id, until its deadline)
# and the broker re-dispatches the requests of a dead worker to the shard's next owner, an
# error only proves "not applied" when it is about the request's first and only attempt and
# says that attempt never reached a worker. These are the messages that say so (zkv/client.py,
# broker/core.py); "outcome unknown" wins over them, and every other message counts as unknown
# (a worker's "stale token" or "no shard assigned" may answer a re-dispatch of a request an
# earlier owner applied). When unsure, a failed write may have been applied.
_NOT_SENT = (
    ("is not reachable", "broker unreachable"),  # the client never got it out
    ("has no worker", "no worker"),  # the broker never dispatched it
)


def unavailable_failure(source: str, message: str, resent: bool) -> Failure:
    """Classify an UNAVAILABLE answer (zkv.Unavailable or HTTP 503) by its message.

    Args:
        source: names the path, for the report.
        message: the error's text.
        resent: whether the request may have been sent more than once (then an earlier
            attempt may have been applied, whatever this one's fate).
    """
    if "outcome unknown" in message:
        return Failure(Outcome.UNKNOWN, f"{source}: outcome unknown")
    for marker, name in _NOT_SENT:
        if marker in message:
            if resent:
                return Failure(Outcome.UNKNOWN, f"{source}: {name}, maybe after a resend")
            return Failure(Outcome.FAIL, f"{source}: {name}")
    return Failure(Outcome.UNKNOWN, f"{source}: {_gist(message)}")


def _gist(message: str) -> str:
    """An error message as a kind for the report: its first clause, numbers blanked."""
    return re.sub(r"[0-9]+", "N", re.split(r"[:;(]", message, maxsplit=1)[0]).strip()[:48]


def refused_failure(source: str, message: str) -> Failure:
    """Classify an ERROR answer (zkv.RequestError or HTTP 400): refused, unless a worker bug.

    A request refused as wrong is refused whatever the attempt (the refusal depends on its
    content only), so resends do not matter here.
    """
    if "outcome unknown" in message or "internal" in message:
        return Failure(Outcome.UNKNOWN, f"{source}: internal error")
    return Failure(Outcome.FAIL, f"{source}: refused")


def client_failure(exc: Exception, resent: bool) -> Failure:
    """Classify an exception raised by :class:`zkv.Client`.

    Args:
        exc: what the client raised.
        resent: whether the client's ``retries`` counter moved during the request.
    """
    match exc:
        case RequestError():
            return refused_failure("client error", str(exc))
        case Unavailable():
            return unavailable_failure("client unavailable", str(exc), resent)
        case Timeout():
            return Failure(Outcome.UNKNOWN, "client timeout")
    return Failure(Outcome.UNKNOWN, f"client {type(exc).__name__}")


def http_failure(status: int, body: bytes) -> Failure:
    """Classify an HTTP error status answered by the gateway.

    The gateway's own client resends silently, so a 503 can never prove that no earlier
    attempt was applied: every 503 is unknown.
    """
    try:
        message = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")
    if status in (400, 411, 413):
        return refused_failure(f"http {status}", message)
    if status == 503:
        return unavailable_failure("http 503", message, resent=True)
    return Failure(Outcome.UNKNOWN, f"http {status}")


# --- the three ways to talk to the cluster ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    """A request that got a definite answer."""

    outcome: Outcome
    value: str | None = None
    deadline_lo_ms: float | None = None
    deadline_hi_ms: float | None = None


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An HTTP response, read whole."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise Failure(Outcome.UNKNOWN, f"http {self.status}: not JSON") from None


def _date_interval(text: Any) -> tuple[float | None, float | None]:
    """An HTTP-date, which has whole seconds, as the interval of Unix ms it stands for."""
    if not isinstance(text, str):
        return None, None
    try:
        seconds = email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None, None
    return seconds * 1000, seconds * 1000 + 999


class Api:
    """One thread's connections: its own zkv client and fresh HTTP connections to the gateway.

    Every method takes ``via``, one of :data:`APIS`, and either returns :class:`Done` or raises
    :class:`Failure`.
    """

    def __init__(
        self,
        frontend: str,
        http_port: int,
        timeout_s: float,
        http_host: str = "127.0.0.1",
        keys: str | None = None,
    ) -> None:
        self.client = Client(frontend, timeout_s=timeout_s, keys=keys)
        self.http_host = http_host
        self.http_port = http_port
        self.http_timeout_s = timeout_s + HTTP_GRACE_S

    def close(self) -> None:
        self.client.close()

    def set(self, via: str, key: str, value: str, ttl_ms: int) -> Done:
        seconds = f"{ttl_ms / 1000:.3f}"
        if via == "client":
            deadline = self._client(lambda: self.client.set(key, value, ttl_s=ttl_ms / 1000))
            return Done(Outcome.OK, deadline_lo_ms=deadline, deadline_hi_ms=deadline)
        if via == "seed":
            path = f"/set?key={quote(key)}&value={quote(value)}&timeout={seconds}"
            answer = self._http("GET", path)
            self._expect(answer, 200)
            lo, hi = _date_interval(_field(answer, "timeout"))
            return Done(Outcome.OK, deadline_lo_ms=lo, deadline_hi_ms=hi)
        answer = self._http("PUT", f"/v1/keys/{quote(key, safe='')}?ttl={seconds}", value.encode())
        self._expect(answer, 200)
        deadline = _field(answer, "expires_at_ms")
        deadline = deadline if isinstance(deadline, int) else None
        return Done(Outcome.OK, deadline_lo_ms=deadline, deadline_hi_ms=deadline)

    def get(self, via: str, key: str) -> Done:
        if via == "client":
            try:
                item = self._client(lambda: self.client.get(key))
            except NotFound:
                return Done(Outcome.NOT_FOUND)
            deadline = item.deadline_ms
            return Done(Outcome.OK, item.value.decode(errors="replace"), deadline, deadline)
        if via == "seed":
            answer = self._http("GET", f"/get?key={quote(key)}")
            self._expect(answer, 200)
            body = answer.json()
            if body == {"error": "Data not found"}:
                return Done(Outcome.NOT_FOUND)
            if not isinstance(body, dict) or not isinstance(body.get("value"), str):
                raise Failure(Outcome.UNKNOWN, "http 200: unexpected body")
            lo, hi = _date_interval(body.get("time_out"))
            if lo is None and body.get("time_out") is not None:
                raise Failure(Outcome.UNKNOWN, "http 200: unreadable time_out")
            return Done(Outcome.OK, body["value"], lo, hi)
        answer = self._http("GET", f"/v1/keys/{quote(key, safe='')}")
        if answer.status == 404:
            return Done(Outcome.NOT_FOUND)
        self._expect(answer, 200)
        header = answer.headers.get("x-zkv-expires-at-ms")
        deadline = int(header) if header and header.isdigit() else None
        return Done(Outcome.OK, answer.body.decode(errors="replace"), deadline, deadline)

    def delete(self, via: str, key: str) -> Done:
        if via == "client":
            deleted = self._client(lambda: self.client.delete(key))
            return Done(Outcome.OK if deleted else Outcome.NOT_FOUND)
        if via == "seed":
            answer = self._http("GET", f"/delete?key={quote(key)}")
            self._expect(answer, 200)
            body = answer.json()
            if body == {"error": "Key not found"}:
                return Done(Outcome.NOT_FOUND)
            if body == {"message": "Value deleted successfully"}:
                return Done(Outcome.OK)
            raise Failure(Outcome.UNKNOWN, "http 200: unexpected body")
        answer = self._http("DELETE", f"/v1/keys/{quote(key, safe='')}")
        if answer.status == 404:
            return Done(Outcome.NOT_FOUND)
        self._expect(answer, 200)
        return Done(Outcome.OK)

    def _client(self, call: Callable[[], Any]) -> Any:
        retries = getattr(self.client, "retries", 0)
        try:
            return call()
        except NotFound:
            raise
        except Exception as exc:
            resent = getattr(self.client, "retries", 0) != retries
            raise client_failure(exc, resent) from exc

    def _http(self, method: str, path: str, body: bytes | None = None) -> HttpAnswer:
        """One request on a fresh connection. Failing to connect means nothing was sent."""
        connection = http.client.HTTPConnection(
            self.http_host, self.http_port, timeout=self.http_timeout_s
        )
        try:
            try:
                connection.connect()
            except OSError as exc:
                raise Failure(Outcome.FAIL, f"http connect: {type(exc).__name__}") from exc
            try:
                connection.request(method, path, body=body)
                response = connection.getresponse()
                data = response.read()
            except TimeoutError as exc:
                # Abandoned by us, possibly still queued in the gateway: may apply any time.
                raise Failure(Outcome.UNKNOWN, "http timeout", may_apply_late=True) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise Failure(
                    Outcome.UNKNOWN, f"http {type(exc).__name__}", may_apply_late=True
                ) from exc
            headers = {name.lower(): value for name, value in response.getheaders()}
            return HttpAnswer(response.status, headers, data)
        finally:
            connection.close()

    @staticmethod
    def _expect(answer: HttpAnswer, status: int) -> None:
        if answer.status != status:
            raise http_failure(answer.status, answer.body)


def _field(answer: HttpAnswer, name: str) -> Any:
    body = answer.json()
    return body.get(name) if isinstance(body, dict) else None


class Recorder:
    """The operations of one thread, each recorded when invoked and completed when answered.

    Recording the invocation first means a request still in flight when the history is read
    counts as unknown (it may yet apply) instead of vanishing.
    """

    def __init__(self, process: str) -> None:
        self.process = process
        self.ops: list[Op] = []

    def run(
        self,
        api: str,
        kind: Kind,
        key: str,
        call: Callable[[], Done],
        value: str | None = None,
        ttl_ms: int | None = None,
    ) -> Op:
        op = Op(self.process, api, kind, key, value, ttl_ms, start_ms=now_ms())
        self.ops.append(op)
        try:
            done = call()
        except Failure as failure:
            op.end_ms = now_ms()
            op.error = failure.error
            op.may_apply_late = failure.may_apply_late
            op.outcome = failure.outcome
            return op
        op.end_ms = now_ms()
        if kind is Kind.GET:
            op.value = done.value
        if kind is Kind.SET and ttl_ms is not None and done.deadline_lo_ms is None:
            # No deadline in the reply: the worker applied it within [start, end].
            op.deadline_lo_ms = math.floor(op.start_ms) + ttl_ms
            op.deadline_hi_ms = math.ceil(op.end_ms) + ttl_ms
        else:
            op.deadline_lo_ms, op.deadline_hi_ms = done.deadline_lo_ms, done.deadline_hi_ms
        op.error = None
        op.may_apply_late = False
        op.outcome = done.outcome
        return op


# --- the checker ------------------------------------------------------------------------------


class Verdict(enum.StrEnum):
    """Why a read is invalid."""

    MISSING = "missing"  # not found, but an acknowledged write must be there
    STALE = "stale"  # a superseded value
    FAILED_WRITE = "failed write"  # the value of a write that definitely failed
    NEVER_WRITTEN = "never written"
    FUTURE = "future"  # a write that started after the read ended
    EXPIRED = "expired"  # a value read after its deadline
    DEADLINE = "deadline"  # the deadline read is not the one the write got


LOST_VERDICTS = (Verdict.MISSING, Verdict.STALE)


@dataclass(frozen=True, slots=True)
class Finding:
    """An invalid read, or a lost write found by a final read."""

    key: str
    verdict: Verdict
    read: Op
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "verdict": str(self.verdict),
            "reason": self.reason,
            "read": self.read.as_json(),
        }


@dataclass(slots=True)
class HistoryCheck:
    """What :func:`check_history` found."""

    lost: list[Finding] = field(default_factory=list)
    invalid: list[Finding] = field(default_factory=list)
    reads_checked: int = 0
    unverified_keys: list[str] = field(default_factory=list)


def _is_acknowledged(op: Op) -> bool:
    return op.outcome in ACKNOWLEDGED


class KeyHistory:
    """The updates of one key that may have taken effect, in program order.

    Args:
        updates: the key's sets and deletes, all by one writer (so they are sequential).
    """

    def __init__(self, updates: Iterable[Op]) -> None:
        ordered = sorted(updates, key=lambda op: op.start_ms)
        self.updates = [op for op in ordered if op.outcome is not Outcome.FAIL]
        self.failed = {
            op.value: op for op in ordered if op.outcome is Outcome.FAIL and op.kind is Kind.SET
        }
        self.starts = [op.start_ms for op in self.updates]
        self.index_of_value = {
            op.value: i for i, op in enumerate(self.updates) if op.kind is Kind.SET
        }
        self.late = [i for i, op in enumerate(self.updates) if op.may_apply_late]
        # Acknowledged updates by end time, with the running maximum of their index: the last
        # update acknowledged before t is a prefix maximum, found by bisection.
        acked = sorted((op.end_ms, i) for i, op in enumerate(self.updates) if _is_acknowledged(op))
        self._acked_ends = [end for end, _ in acked]
        self._acked_last: list[int] = []
        for _, i in acked:
            self._acked_last.append(max(i, self._acked_last[-1]) if self._acked_last else i)

    def last_acknowledged_before(self, t_ms: float) -> int:
        """Index of the last update acknowledged strictly before ``t_ms``; -1 if none."""
        k = bisect.bisect_left(self._acked_ends, t_ms) - 1
        return self._acked_last[k] if k >= 0 else -1

    def candidates(self, start_ms: float, end_ms: float) -> tuple[int, list[int]]:
        """Updates that may be the latest one applied at some moment of [start_ms, end_ms].

        Returns:
            ``(low, indices)``: ``low`` is the last update acknowledged before ``start_ms``
            (-1: none, so "nothing applied yet" is possible too); ``indices`` are ``low`` and
            every later update that started before ``end_ms``, plus the earlier ones that may
            apply late.
        """
        low = self.last_acknowledged_before(start_ms)
        high = bisect.bisect_left(self.starts, end_ms) - 1
        indices = list(range(max(low, 0), high + 1))
        indices += [i for i in self.late if i < low and self.updates[i].start_ms < end_ms]
        return low, indices


def _deadline_bounds(write: Op, read: Op) -> tuple[float, float] | None:
    """Earliest and latest deadline ``write`` can have given it was seen by ``read``.

    None for a key that never expires.
    """
    if write.ttl_ms is None:
        return None
    if _is_acknowledged(write) and write.deadline_lo_ms is not None:
        hi = write.deadline_hi_ms
        return write.deadline_lo_ms, write.deadline_lo_ms if hi is None else hi
    # Unknown outcome: applied after it started and before the read that saw it ended.
    return write.start_ms + write.ttl_ms, read.end_ms + write.ttl_ms


def _earliest_absence_ms(update: Op) -> float:
    """The earliest moment the state ``update`` left can be "no such key"."""
    if update.kind is Kind.DELETE:
        return -math.inf
    if update.ttl_ms is None:
        return math.inf
    if _is_acknowledged(update) and update.deadline_lo_ms is not None:
        return update.deadline_lo_ms
    return update.start_ms + update.ttl_ms


def judge_read(
    history: KeyHistory, read: Op, margin_ms: float = MARGIN_MS, origin_ms: float = 0.0
) -> tuple[Verdict, str] | None:
    """Whether an answered read is consistent with the history of its key.

    Returns:
        None if valid, else the verdict and a sentence explaining it.
    """
    low, candidates = history.candidates(read.start_ms, read.end_ms)
    if read.outcome is Outcome.NOT_FOUND:
        if low < 0:
            return None  # nothing may have been applied yet
        for i in candidates:
            if _earliest_absence_ms(history.updates[i]) <= read.end_ms + margin_ms:
                return None
        present = history.updates[low]
        later = len(candidates) - 1
        return Verdict.MISSING, (
            f"not found, but {present.describe(origin_ms)} must be there"
            + (f" (the {later} update(s) after it cannot remove it)" if later else "")
        )

    value = read.value
    index = history.index_of_value.get(value)
    if index is None:
        failed = history.failed.get(value)
        if failed is not None:
            return Verdict.FAILED_WRITE, f"read the value of {failed.describe(origin_ms)}"
        return Verdict.NEVER_WRITTEN, f"read {value!r}, which no write of this key wrote"
    write = history.updates[index]
    if write.start_ms >= read.end_ms:
        return Verdict.FUTURE, f"read {write.describe(origin_ms)}, which started after the read"
    if index not in candidates:
        newer = history.updates[low]
        return Verdict.STALE, (
            f"read {write.describe(origin_ms)}, superseded by {newer.describe(origin_ms)} "
            "acknowledged before the read started"
        )
    bounds = _deadline_bounds(write, read)
    if bounds is not None and _is_acknowledged(write) and read.start_ms >= bounds[1] + margin_ms:
        return Verdict.EXPIRED, (
            f"read {write.describe(origin_ms)} after its deadline "
            f"(the read started at {_rel(read.start_ms, origin_ms)})"
        )
    if read.deadline_hi_ms is not None and read.start_ms >= read.deadline_hi_ms + margin_ms:
        return Verdict.EXPIRED, (
            f"the reply carried deadline {_rel(read.deadline_hi_ms, origin_ms)}, before the "
            f"read started at {_rel(read.start_ms, origin_ms)}"
        )
    if read.deadline_lo_ms is not None or read.deadline_hi_ms is not None or bounds is not None:
        if bounds is None or read.deadline_lo_ms is None or read.deadline_hi_ms is None:
            return Verdict.DEADLINE, (
                f"read {write.describe(origin_ms)} with deadline "
                f"{_rel(read.deadline_hi_ms, origin_ms)}: the expiry is not the one written"
            )
        if (
            read.deadline_lo_ms > bounds[1] + margin_ms
            or read.deadline_hi_ms < bounds[0] - margin_ms
        ):
            return Verdict.DEADLINE, (
                f"read {write.describe(origin_ms)} with deadline "
                f"{_rel(read.deadline_hi_ms, origin_ms)}, outside "
                f"[{_rel(bounds[0], origin_ms)}, {_rel(bounds[1], origin_ms)}]"
            )
    return None


def check_history(
    ops: Iterable[Op], margin_ms: float = MARGIN_MS, keys: Iterable[str] = ()
) -> HistoryCheck:
    """Check every answered read against its key's updates; final reads also count lost writes.

    Args:
        ops: the whole history; final reads have ``final`` set.
        margin_ms: precision allowed on deadlines.
        keys: every key the workload used; a key without an answered final read is listed as
            unverified (its lost writes could not be counted).
    """
    ops = list(ops)
    origin_ms = min((op.start_ms for op in ops), default=0.0)
    updates: dict[str, list[Op]] = {}
    reads: list[Op] = []
    for op in ops:
        if op.kind is Kind.GET:
            if op.outcome in ACKNOWLEDGED:
                reads.append(op)
        else:
            updates.setdefault(op.key, []).append(op)
    histories = {key: KeyHistory(key_updates) for key, key_updates in updates.items()}
    empty = KeyHistory(())
    result = HistoryCheck()
    verified: set[str] = set()
    for read in sorted(reads, key=lambda op: op.start_ms):
        result.reads_checked += 1
        if read.final:
            verified.add(read.key)
        verdict = judge_read(histories.get(read.key, empty), read, margin_ms, origin_ms)
        if verdict is None:
            continue
        finding = Finding(read.key, verdict[0], read, verdict[1])
        if read.final and finding.verdict in LOST_VERDICTS:
            result.lost.append(finding)
        else:
            result.invalid.append(finding)
    result.unverified_keys = sorted(set(keys) - verified)
    return result


# --- ownership: who believed it owned which shard, when ----------------------------------------

# A cluster-mode leader also logs "no longer leader of shard N: REASON" the moment it stops
# acknowledging (its "left" line follows after closing the shard's files): that ends it.
_OWNERSHIP = re.compile(
    r"^(?P<when>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?"
    r"\b(?:(?P<event>took|left) shard (?P<shard>\d+) epoch (?P<epoch>\d+)"
    r"|no longer leader of shard (?P<stepped>\d+))"
)


@dataclass(frozen=True, slots=True)
class Ownership:
    """One worker process owning one shard from ``start_ms`` to ``end_ms``."""

    log: str
    shard: int
    epoch: int
    start_ms: float
    end_ms: float
    ended_by: str  # "left", "killed", "took it again", "took another shard", "exited", "end of run"


def parse_ownership(
    logs: dict[str, str], ends_ms: dict[str, tuple[float, str]], run_end_ms: float
) -> list[Ownership] | None:
    """Ownership intervals from worker logs; None if no log has an ownership line.

    Args:
        logs: each worker log's name and text; timestamps are Python logging's ``asctime``
            (local time, milliseconds).
        ends_ms: for a worker that died without a ``left`` line, when and how it died
            (SIGKILL time from the nemesis, or the moment its exit was noticed).
        run_end_ms: when the cluster was stopped: the end of intervals still open.
    """
    intervals: list[Ownership] = []
    seen_any = False
    for name, text in sorted(logs.items()):
        held: tuple[int, int, float] | None = None
        for line in text.splitlines():
            match = _OWNERSHIP.match(line)
            if match is None:
                continue
            seen_any = True
            when = datetime.strptime(match["when"], "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000
            if match["stepped"] is not None:
                event, shard, epoch = "left", int(match["stepped"]), 0
            else:
                event, shard, epoch = match["event"], int(match["shard"]), int(match["epoch"])
            if event == "took":
                if held is not None:  # a worker owns one shard: a new "took" ends the old
                    how = "took it again" if held[0] == shard else "took another shard"
                    intervals.append(Ownership(name, *held, when, how))
                held = (shard, epoch, when)
            elif held is not None and held[0] == shard:
                intervals.append(Ownership(name, *held, when, "left"))
                held = None
        if held is not None:
            end_ms, how = ends_ms.get(name, (run_end_ms, "end of run"))
            intervals.append(Ownership(name, *held, max(end_ms, held[2]), how))
    return intervals if seen_any else None


def shared_epochs(intervals: Iterable[Ownership]) -> list[dict[str, Any]]:
    """(shard, epoch) pairs taken by more than one process: two leaders of one epoch (in
    cluster mode an epoch is an etcd revision, so each must have exactly one leader)."""
    takers: dict[tuple[int, int], set[str]] = {}
    for interval in intervals:
        takers.setdefault((interval.shard, interval.epoch), set()).add(interval.log)
    return [
        {"shard": shard, "epoch": epoch, "logs": sorted(logs)}
        for (shard, epoch), logs in sorted(takers.items())
        if len(logs) > 1
    ]


def double_owners(intervals: Iterable[Ownership]) -> list[dict[str, Any]]:
    """Pairs of intervals of different processes that overlap on the same shard."""
    by_shard: dict[int, list[Ownership]] = {}
    for interval in intervals:
        by_shard.setdefault(interval.shard, []).append(interval)
    found = []
    for shard, owners in sorted(by_shard.items()):
        owners.sort(key=lambda o: o.start_ms)
        for i, first in enumerate(owners):
            for second in owners[i + 1 :]:
                if second.start_ms >= first.end_ms:
                    break  # sorted by start: the later ones start after ``first`` ended too
                if first.log == second.log:
                    continue
                found.append(
                    {
                        "shard": shard,
                        "overlap_ms": round(min(first.end_ms, second.end_ms) - second.start_ms, 3),
                        "first": dataclasses.asdict(first),
                        "second": dataclasses.asdict(second),
                    }
                )
    return found


# --- the nemesis --------------------------------------------------------------------------------


@dataclass(slots=True)
class Proc:
    """A process the nemesis started, killed or watched."""

    role: str  # "worker" or "broker"
    process: subprocess.Popen[bytes]
    log: str | None
    started_ms: float
    killed_ms: float | None = None
    exited_ms: float | None = None


class Nemesis:
    """Kills processes and starts new ones, as a process manager would, on a seeded schedule.

    Only this object starts or kills processes after the cluster is up; :meth:`shutdown` takes
    its lock, so nothing is started once the cluster is being closed.
    """

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.procs: list[Proc] = []
        self.events: list[dict[str, Any]] = []
        self.kills = 0
        self.broker_restarts = 0
        self.unexpected_exits = 0
        self._lock = threading.Lock()
        self._closed = False

    # --- starting processes (also used to start the cluster) ---

    def start_broker(self) -> Proc:
        return self._spawn("broker", self.cluster.start_broker)

    def start_worker(self) -> Proc:
        return self._spawn("worker", self.cluster.start_worker)

    def _spawn(self, role: str, start: Callable[[], subprocess.Popen[bytes]]) -> Proc:
        # Cluster names each log <role>-<n>.log; the one that appeared is this process's.
        before = set(self.cluster.tmp_path.glob(f"{role}-*.log"))
        process = start()
        new = sorted(set(self.cluster.tmp_path.glob(f"{role}-*.log")) - before)
        proc = Proc(role, process, new[0].name if len(new) == 1 else None, now_ms())
        self.procs.append(proc)
        return proc

    def live_workers(self) -> int:
        return sum(p.role == "worker" and p.process.poll() is None for p in self.procs)

    def ends(self) -> dict[str, tuple[float, str]]:
        """For each worker log, when its process died (SIGKILL or noticed exit)."""
        ends: dict[str, tuple[float, str]] = {}
        for proc in self.procs:
            if proc.role != "worker" or proc.log is None:
                continue
            if proc.killed_ms is not None:
                ends[proc.log] = (proc.killed_ms, "killed")
            elif proc.exited_ms is not None:
                ends[proc.log] = (proc.exited_ms, "exited")
        return ends

    # --- the schedule ---

    def run(
        self, stop: threading.Event, duration_s: float, kill_interval_s: float, broker: bool
    ) -> None:
        """Until ``stop`` or ``duration_s``: a SIGKILL every ``kill_interval_s`` (0: none),
        and once, if ``broker``, a SIGKILL of the broker; every dead process is started again.
        """
        started = time.monotonic()
        deadline = started + duration_s
        next_kill = started + kill_interval_s if kill_interval_s > 0 else math.inf
        broker_at = started + self.rng.uniform(*BROKER_RESTART_AT) * duration_s
        broker_at = broker_at if broker else math.inf
        while not stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            self._replace_dead()
            if now >= broker_at:
                broker_at = math.inf
                self._kill_broker()
            elif now >= next_kill:
                next_kill += kill_interval_s
                self._kill_worker(kill_interval_s)
            stop.wait(min(NEMESIS_TICK_S, max(0.0, deadline - now)))

    def _kill_worker(self, interval_s: float) -> None:
        live = [p for p in self.procs if p.role == "worker" and p.process.poll() is None]
        if not live:
            return
        victim = self.rng.choice(live)
        with self._lock:
            if self._closed:
                return
            victim.killed_ms = now_ms()
            self.cluster.kill(victim.process)
        self.kills += 1
        self._event("kill -9", victim, victim.killed_ms)
        # Started again whatever happens next, so the cluster keeps its workers.
        time.sleep(self.rng.uniform(0, min(RESTART_DELAY_MAX_S, interval_s / 2)))
        self._restart(self.start_worker)

    def kill_every_worker(self) -> int:
        """SIGKILL every worker at once, then start as many: the data must come from disk.

        Returns:
            How many workers were killed.
        """
        live = [p for p in self.procs if p.role == "worker" and p.process.poll() is None]
        with self._lock:
            if self._closed:
                return 0
            for victim in live:
                victim.killed_ms = now_ms()
                self.cluster.kill(victim.process)
        for victim in live:
            self._event("kill -9 (final)", victim, victim.killed_ms)
        for _ in live:
            self._restart(self.start_worker)
        return len(live)

    def _kill_broker(self) -> None:
        victim = next(p for p in reversed(self.procs) if p.role == "broker")
        with self._lock:
            if self._closed:
                return
            victim.killed_ms = now_ms()
            self.cluster.kill(victim.process)
        self._event("kill -9", victim, victim.killed_ms)
        time.sleep(self.rng.uniform(0.2, RESTART_DELAY_MAX_S))
        if self._restart(self.start_broker) is not None:
            self.broker_restarts += 1

    def _replace_dead(self) -> None:
        """Start again what died by itself (a process manager's job), once per process."""
        for proc in list(self.procs):
            if proc.killed_ms is not None or proc.exited_ms is not None:
                continue
            status = proc.process.poll()
            if status is None:
                continue
            proc.exited_ms = now_ms()
            self.unexpected_exits += 1
            self._event(f"exited by itself with status {status}", proc)
            self._restart(self.start_broker if proc.role == "broker" else self.start_worker)

    def _restart(self, start: Callable[[], Proc]) -> Proc | None:
        with self._lock:
            if self._closed:
                return None
            proc = start()
        self._event("started", proc)
        return proc

    def _event(self, action: str, proc: Proc, at_ms: float | None = None) -> None:
        self.events.append(
            {
                "at_ms": now_ms() if at_ms is None else at_ms,
                "action": action,
                "role": proc.role,
                "pid": proc.process.pid,
                "log": proc.log,
            }
        )

    def shutdown(self) -> None:
        """From now on the nemesis starts and kills nothing."""
        with self._lock:
            self._closed = True


# --- the workload -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """One chaos run.

    Attributes:
        duration_s: how long the workload and the nemesis run (cluster start not included).
        seed: seeds every random choice (which key, which API, which victim, when).
        shards: shards of the cluster.
        workers: worker processes; more than ``shards`` leaves standbys.
        kill_interval_s: a worker is killed with SIGKILL this often; 0 for never.
        broker_restart: kill the broker with SIGKILL once, and start it again.
        final_kill: once the load has stopped, SIGKILL every worker at once and start as many
            new ones, so that each key's last value must come back from disk.
        writers: writer threads, each with keys of its own.
        readers: reader threads, reading any key.
        keys_per_writer: keys each writer owns.
        timeout_s: the zkv client's reply timeout, and the gateway's (ZKV_TIMEOUT).
        recovery_timeout_s: how long the cluster may take to own every shard at the end.
        margin_ms: clock and expiry precision allowed by the checker.
    """

    duration_s: float = 60.0
    seed: int = 1
    shards: int = 2
    workers: int = 3
    kill_interval_s: float = 3.0
    broker_restart: bool = True
    final_kill: bool = True
    writers: int = 4
    readers: int = 4
    keys_per_writer: int = 8
    timeout_s: float = 2.0
    recovery_timeout_s: float = 30.0
    margin_ms: float = MARGIN_MS


class ChaosError(Exception):
    """The run could not be carried out (not a consistency failure)."""


def writer_keys(writer: int, keys_per_writer: int) -> list[str]:
    return [f"chaos-w{writer}-k{k}" for k in range(keys_per_writer)]


def _writer(
    recorder: Recorder,
    api: Api,
    rng: random.Random,
    writer: int,
    keys: list[str],
    stop: threading.Event,
    deadline: float,
) -> None:
    seq = Counter[str]()
    while not stop.is_set() and time.monotonic() < deadline:
        k = rng.randrange(len(keys))
        key = keys[k]
        path = rng.choice(APIS)
        if rng.random() < DELETE_FRACTION:
            recorder.run(path, Kind.DELETE, key, functools.partial(api.delete, path, key))
            continue
        seq[key] += 1
        value = f"w{writer}-k{k}-{seq[key]}"
        long_lived = rng.random() < LONG_TTL_FRACTION
        ttl_ms = LONG_TTL_MS if long_lived else rng.randint(*SHORT_TTL_MS)
        call = functools.partial(api.set, path, key, value, ttl_ms)
        recorder.run(path, Kind.SET, key, call, value, ttl_ms)


def _reader(
    recorder: Recorder,
    api: Api,
    rng: random.Random,
    keys: list[str],
    stop: threading.Event,
    deadline: float,
) -> None:
    while not stop.is_set() and time.monotonic() < deadline:
        key = rng.choice(keys)
        path = rng.choice(APIS)
        recorder.run(path, Kind.GET, key, functools.partial(api.get, path, key))


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Defer Ctrl-C while the cluster is torn down, so a second one cannot leave processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted: list[int] = []
    handlers = {
        signum: signal.signal(signum, lambda signum, frame: interrupted.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if interrupted:
            raise KeyboardInterrupt


def _wait_recovered(client: Client, workers: int, timeout_s: float) -> dict[str, Any] | None:
    """PING until every shard has an owner and the broker counts exactly the ``workers`` that
    live (dead ones are still listed until their heartbeats run out, and may still "own" a
    shard). Returns the last answer, or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = client.ping()
            if info.get("owned") and all(info["owned"]) and info.get("workers") == workers:
                return info
        except Exception:
            pass
        time.sleep(0.05)
    return None


def _final_reads(api: Api, keys: list[str], budget_s: float) -> list[Op]:
    """Read every key once more through the client, retrying while the cluster settles."""
    recorder = Recorder("final")
    overall = time.monotonic() + budget_s
    for key in keys:
        deadline = min(overall, time.monotonic() + FINAL_READ_BUDGET_S)
        while True:
            op = recorder.run("client", Kind.GET, key, functools.partial(api.get, "client", key))
            op.final = True
            if op.outcome in ACKNOWLEDGED or time.monotonic() >= deadline:
                break
            recorder.ops.pop()  # only the answered attempt is part of the history
            time.sleep(0.05)
    return recorder.ops


def run_chaos(config: ChaosConfig, workdir: Path) -> dict[str, Any]:
    """Run the cluster under the nemesis, then check the history.

    Args:
        config: the run.
        workdir: an empty directory for the processes' logs and data (the caller removes it).

    Returns:
        The report: ``summary`` (the counts), the findings, the nemesis events, ownership
        intervals and the whole history.

    Raises:
        ChaosError: the cluster did not start, or a thread of the workload crashed.
    """
    return ChaosRun(config, workdir).run()


class ChaosRun:
    """The phases of one run: start, load under the nemesis, recover, read back, tear down."""

    def __init__(self, config: ChaosConfig, workdir: Path) -> None:
        if config.workers < config.shards:
            raise ChaosError(f"{config.workers} workers cannot own {config.shards} shards")
        self.config = config
        self.workdir = workdir
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(
            workdir,
            shards=config.shards,
            ZKV_DATA_DIR=str(data_dir),
            ZKV_FSYNC="always",
            ZKV_TIMEOUT=str(config.timeout_s),
        )
        self.nemesis = Nemesis(self.cluster, random.Random(f"{config.seed}-nemesis"))
        self.keys = [
            key for w in range(config.writers) for key in writer_keys(w, config.keys_per_writer)
        ]
        self.stop = threading.Event()
        self.threads: list[tuple[threading.Thread, Api]] = []
        self.recorders: list[Recorder] = []
        self.crashes: list[str] = []
        self.final_ops: list[Op] = []
        self.final_kills = 0
        self.recovered: dict[str, Any] | None = None
        self.recovery_s: float | None = None
        self.retries: int | None = None
        self.stuck = 0
        self.clock_start = (time.time(), time.monotonic())

    def run(self) -> dict[str, Any]:
        try:
            self._start_cluster()
            self._load()
            self._recover_and_read_back()
        finally:
            with _no_interrupts():
                self._tear_down()
        if self.crashes:
            raise ChaosError("the workload crashed: " + "; ".join(self.crashes))
        return self._report()

    def _start_cluster(self) -> None:
        try:
            self.nemesis.start_broker()
            for _ in range(self.config.workers):
                self.nemesis.start_worker()
            threads = 2 * (self.config.writers + self.config.readers)  # never a queue
            self.cluster.start_gateway("--threads", str(threads))
            self.cluster.wait_ready()
        except AssertionError as exc:
            raise ChaosError(f"the cluster did not start: {exc}\n{self.cluster.logs()}") from None

    def _api(self) -> Api:
        return Api(self.cluster.frontend, self.cluster.http_port, self.config.timeout_s)

    def _spawn(self, name: str, body: Callable[..., None], *args: Any) -> None:
        recorder, api = Recorder(name), self._api()
        self.recorders.append(recorder)
        rng = random.Random(f"{self.config.seed}-{name}")

        def target() -> None:
            try:
                body(recorder, api, rng, *args)
            except Exception as exc:  # a bug of this script, not of the cluster
                self.crashes.append(f"{name}: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=target, name=name, daemon=True)
        self.threads.append((thread, api))
        thread.start()

    def _load(self) -> None:
        """Writers, readers and the nemesis for ``duration_s``; then wait for them to finish."""
        config = self.config
        deadline = time.monotonic() + config.duration_s
        for n in range(config.writers):
            own = writer_keys(n, config.keys_per_writer)
            self._spawn(f"writer-{n}", _writer, n, own, self.stop, deadline)
        for n in range(config.readers):
            self._spawn(f"reader-{n}", _reader, self.keys, self.stop, deadline)
        nemesis = threading.Thread(
            target=self.nemesis.run,
            args=(self.stop, config.duration_s, config.kill_interval_s, config.broker_restart),
            name="nemesis",
            daemon=True,
        )
        nemesis.start()
        self.stop.wait(config.duration_s)
        self.stop.set()
        # Every request is bounded by its timeout, every nemesis step by a restart delay.
        join_by = time.monotonic() + config.timeout_s + HTTP_GRACE_S + 2 * RESTART_DELAY_MAX_S
        for thread in [nemesis, *(thread for thread, _ in self.threads)]:
            thread.join(max(0.0, join_by - time.monotonic()))
        self.stuck = sum(t.is_alive() for t in [nemesis, *(t for t, _ in self.threads)])

    def _recover_and_read_back(self) -> None:
        """Once every shard has an owner again, read every key through the client.

        With ``final_kill``, every worker is killed first and as many started, so the last
        values must come back from disk. ``recovery_s`` counts from here.
        """
        started = time.monotonic()
        if self.config.final_kill:
            self.final_kills = self.nemesis.kill_every_worker()
        # Until the broker has missed a dead worker's heartbeats, it still lists it as owner:
        # PING cannot tell recovery from not having noticed yet. After this long it has noticed.
        env = self.cluster.env
        interval_s = float(env.get("ZKV_HEARTBEAT_INTERVAL", zkv_defaults.HEARTBEAT_INTERVAL_S))
        liveness = int(env.get("ZKV_HEARTBEAT_LIVENESS", zkv_defaults.HEARTBEAT_LIVENESS))
        time.sleep(interval_s * (liveness + 1))
        api = self._api()
        self.threads.append((threading.current_thread(), api))
        live = self.nemesis.live_workers()
        self.recovered = _wait_recovered(api.client, live, self.config.recovery_timeout_s)
        self.recovery_s = round(time.monotonic() - started, 3)
        if self.recovered is not None:
            self.final_ops = _final_reads(api, self.keys, self.config.recovery_timeout_s)

    def _tear_down(self) -> None:
        self.stop.set()
        self.nemesis.shutdown()  # from here on nothing is started: close() gets every process
        self.retries = _retries([api for _, api in self.threads])
        for thread, api in self.threads:
            # A ZeroMQ socket must not be closed under a thread still using it (only after an
            # interrupt); the cluster going away makes that thread's request fail soon.
            if thread is threading.current_thread() or not thread.is_alive():
                api.close()
        self.cluster.close()
        self.run_end_ms = now_ms()

    def _report(self) -> dict[str, Any]:
        config = self.config
        history = [op for recorder in self.recorders for op in recorder.ops]
        checked = check_history([*history, *self.final_ops], config.margin_ms, self.keys)
        logs = {
            path.name: path.read_text(errors="replace")
            for path in sorted(self.workdir.glob("worker-*.log"))
        }
        intervals = parse_ownership(logs, self.nemesis.ends(), self.run_end_ms)
        overlaps = None if intervals is None else double_owners(intervals)
        wall_s = time.time() - self.clock_start[0]
        monotonic_s = time.monotonic() - self.clock_start[1]
        summary = _summarize(history, checked, overlaps, self.nemesis, self.stuck)
        summary.update(
            final_kills=self.final_kills,
            retries=self.retries,
            final_reads=len(self.final_ops),
            recovered=self.recovered is not None,
            recovery_s=self.recovery_s,
            clock_drift_ms=round((wall_s - monotonic_s) * 1000, 3),
        )
        summary["passed"] = (
            summary["lost"] == 0
            and summary["invalid"] == 0
            and not summary["double_owner"]
            and summary["recovered"]
            and summary["unverified_keys"] == 0
            and summary["stuck_threads"] == 0
        )
        all_ops = [*history, *self.final_ops]
        return {
            "config": dataclasses.asdict(config),
            "summary": summary,
            "lost": [f.as_json() for f in checked.lost],
            "invalid": [f.as_json() for f in checked.invalid],
            "unverified_keys": checked.unverified_keys,
            "double_owner": overlaps,
            "ownership": None if intervals is None else [dataclasses.asdict(i) for i in intervals],
            "nemesis": self.nemesis.events,
            "recovered_ping": self.recovered,
            "origin_ms": min((op.start_ms for op in all_ops), default=0.0),
            "workdir": str(self.workdir),
            "history": [op.as_json() for op in all_ops],
        }


def _retries(apis: list[Api]) -> int | None:
    """Resends counted by the clients, if the client counts them (``Client.retries``)."""
    counts = [getattr(api.client, "retries", None) for api in apis]
    if not counts or not all(isinstance(count, int) for count in counts):
        return None
    return sum(counts)  # type: ignore[arg-type]


def _summarize(
    history: list[Op],
    checked: HistoryCheck,
    overlaps: list[dict[str, Any]] | None,
    nemesis: Nemesis,
    stuck: int,
) -> dict[str, Any]:
    outcomes = Counter(str(op.outcome) for op in history)
    definite = Counter(op.error for op in history if op.outcome is Outcome.FAIL)
    unknown = Counter(op.error for op in history if op.outcome is Outcome.UNKNOWN)
    return {
        "requests": len(history),
        "by_kind": dict(Counter(str(op.kind) for op in history)),
        "by_api": dict(Counter(op.api for op in history)),
        "acknowledged": outcomes[Outcome.OK] + outcomes[Outcome.NOT_FOUND],
        "ok": outcomes[Outcome.OK],
        "not_found": outcomes[Outcome.NOT_FOUND],
        "failed_definite": outcomes[Outcome.FAIL],
        "unknown_outcome": outcomes[Outcome.UNKNOWN],
        "errors": {
            "definite": dict(definite.most_common()),
            "unknown": dict(unknown.most_common()),
        },
        "reads_checked": checked.reads_checked,
        "lost": len(checked.lost),
        "invalid": len(checked.invalid),
        "invalid_by_verdict": dict(Counter(str(f.verdict) for f in checked.invalid)),
        "unverified_keys": len(checked.unverified_keys),
        "double_owner": None if overlaps is None else len(overlaps),
        "kills": nemesis.kills,
        "broker_restarts": nemesis.broker_restarts,
        "unexpected_exits": nemesis.unexpected_exits,
        "stuck_threads": stuck,
    }


def format_summary(report: dict[str, Any]) -> str:
    """The summary table and the first findings, for a terminal."""
    s = report["summary"]
    c = report["config"]
    origin = report["origin_ms"]

    def errors(certainty: str) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in s["errors"][certainty].items())

    double = s["double_owner"]
    rows = [
        ("requests", s["requests"], ", ".join(f"{k} {v}" for k, v in s["by_api"].items())),
        ("acknowledged", s["acknowledged"], f"ok {s['ok']}, not found {s['not_found']}"),
        ("failed (definite)", s["failed_definite"], errors("definite")),
        ("unknown outcome", s["unknown_outcome"], errors("unknown")),
        ("retries", "not observable" if s["retries"] is None else s["retries"], ""),
        ("reads checked", s["reads_checked"], f"incl. {s['final_reads']} final reads"),
        ("kills", s["kills"], "worker kill -9, each replaced"),
        ("broker restarts", s["broker_restarts"], "kill -9, same endpoints"),
        ("final kills", s["final_kills"], "every worker at once, after the load"),
        ("unexpected exits", s["unexpected_exits"], ""),
        ("recovered", "yes" if s["recovered"] else "NO", f"after {s['recovery_s']} s"),
        ("lost", s["lost"], "" if not s["lost"] else "FAIL"),
        (
            "invalid reads",
            s["invalid"],
            ", ".join(f"{k} {v}" for k, v in s["invalid_by_verdict"].items()),
        ),
        ("unverified keys", s["unverified_keys"], ""),
        (
            "double_owner",
            "not checked (no ownership lines)" if double is None else double,
            "",
        ),
        ("result", "PASS" if s["passed"] else "FAIL", ""),
    ]
    lines = [
        f"zkv chaos: seed {c['seed']}, {c['duration_s']} s, {c['shards']} shards, "
        f"{c['workers']} workers, kill every {c['kill_interval_s']} s, "
        f"{c['writers']} writers, {c['readers']} readers"
    ]
    lines += [f"  {name:<18} {value!s:>8}  {note}".rstrip() for name, value, note in rows]
    for title, findings in (("lost", report["lost"]), ("invalid", report["invalid"])):
        for finding in findings[:DETAILS_SHOWN]:
            read = finding["read"]
            lines.append(
                f"  {title}: {finding['key']} read at {_rel(read['start_ms'], origin)} by "
                f"{read['process']}/{read['api']}: {finding['reason']}"
            )
        if len(findings) > DETAILS_SHOWN:
            lines.append(f"  ... and {len(findings) - DETAILS_SHOWN} more {title} in the JSON")
    for overlap in (report["double_owner"] or [])[:DETAILS_SHOWN]:
        first, second = overlap["first"], overlap["second"]
        lines.append(
            f"  double owner: shard {overlap['shard']}, {first['log']} epoch {first['epoch']} "
            f"and {second['log']} epoch {second['epoch']} for {overlap['overlap_ms']} ms"
        )
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


# --- cluster mode (tests/netns/cluster_chaos.py, on test hosts) ---------------------------------

CLUSTER_SETUP_S = 120.0  # a cluster run's start, recovery and final reads, at most


def run_cluster_chaos(config: Any, workdir: Path) -> dict[str, Any]:
    """Run tests/netns/cluster_chaos.py with ``config`` (a ClusterChaosConfig) in namespaces
    of its own (tests.hosts.run_scenario); its report. AssertionError if it failed to run."""
    from tests.hosts import run_scenario  # tests.netns.cluster_chaos imports this module

    run_scenario(
        "tests.netns.cluster_chaos",
        workdir,
        timeout_s=config.duration_s + CLUSTER_SETUP_S,
        args=["--config", json.dumps(dataclasses.asdict(config))],
    )
    return json.loads((workdir / "report.json").read_text())


def format_cluster_summary(report: dict[str, Any]) -> str:
    """:func:`format_summary` of a cluster run, with the cluster's own counts."""
    c, s = report["config"], report["summary"]
    config = {**c, "shards": 2, "workers": 4, "kill_interval_s": c["fault_interval_s"]}
    lines = format_summary({**report, "config": config}).splitlines()
    lines[0] = (
        f"zkv chaos, cluster mode on 5 test hosts: seed {c['seed']}, {c['duration_s']} s, "
        f"faults {'/'.join(c['faults'])} every <= {c['fault_interval_s']} s "
        f"(script {c['script']}), {c['writers']} writers, {c['readers']} readers"
    )
    lines.insert(
        -1,
        f"  {'cluster':<18} {'':>8}  host kills {s['host_kills']}, cuts {s['cuts']}, broker "
        f"kills {s['broker_kills']}, away {s['away']}; leader epochs {s['epochs']}, "
        f"shared epochs {s['shared_epochs']}",
    )
    for shared in report.get("shared_epochs") or []:
        lines.append(
            f"  shared epoch: shard {shared['shard']} epoch {shared['epoch']}: "
            f"{', '.join(shared['logs'])}"
        )
    return "\n".join(lines)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Run a zkv cluster under kill -9 and check every read and write.",
    )
    parser.add_argument("--duration", type=_positive, default=defaults.duration_s, help="seconds")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--shards", type=int, default=defaults.shards)
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: shards + 1)"
    )
    parser.add_argument(
        "--kill-interval",
        type=_not_negative,
        default=defaults.kill_interval_s,
        help="seconds between worker kills; 0: no worker kills",
    )
    parser.add_argument("--no-broker-restart", action="store_true", help="never kill the broker")
    parser.add_argument(
        "--no-final-kill",
        action="store_true",
        help="do not kill every worker after the load (then lost writes are rarely seen)",
    )
    parser.add_argument("--writers", type=int, default=defaults.writers)
    parser.add_argument("--readers", type=int, default=defaults.readers)
    parser.add_argument("--keys-per-writer", type=int, default=defaults.keys_per_writer)
    parser.add_argument(
        "--timeout", type=_positive, default=defaults.timeout_s, help="request timeout, seconds"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="cluster mode on test hosts (needs root): host kills, cuts, broker kills",
    )
    parser.add_argument(
        "--faults",
        default="kill,cut,broker",
        help="--cluster: the nemesis's faults, among kill, cut, broker (default all)",
    )
    parser.add_argument(
        "--cut", type=_positive, default=4.0, help="--cluster: longest cut, seconds"
    )
    parser.add_argument(
        "--away",
        type=_not_negative,
        default=60.0,
        help="--cluster: one worker host kept down this long while writes go on (0: never)",
    )
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs and data even if the run passes"
    )
    args = parser.parse_args(argv)
    for name in ("shards", "writers", "readers", "keys_per_writer"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is None:
        args.workers = args.shards + 1
    if args.workers < args.shards:
        parser.error("--workers must be at least --shards")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0 passed, 1 a check failed, 2 the run failed, 130 interrupted."""
    args = parse_args(argv)
    if args.cluster:
        return _main_cluster(args)
    config = ChaosConfig(
        duration_s=args.duration,
        seed=args.seed,
        shards=args.shards,
        workers=args.workers,
        kill_interval_s=args.kill_interval,
        broker_restart=not args.no_broker_restart,
        final_kill=not args.no_final_kill,
        writers=args.writers,
        readers=args.readers,
        keys_per_writer=args.keys_per_writer,
        timeout_s=args.timeout,
    )
    workdir = Path(tempfile.mkdtemp(prefix="zkv-chaos-"))

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = run_chaos(config, workdir)
    except KeyboardInterrupt:
        print("interrupted: every process is stopped", file=sys.stderr)
        _remove_unless(args.keep, workdir)
        return 130
    except ChaosError as exc:
        print(f"chaos run failed: {exc}", file=sys.stderr)
        _remove_unless(True, workdir)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(format_summary(report))
    if args.json:
        print(f"report written to {args.json}")
    passed = bool(report["summary"]["passed"])
    _remove_unless(args.keep or not passed, workdir)
    return 0 if passed else 1


def _main_cluster(args: argparse.Namespace) -> int:
    from tests.netns.cluster_chaos import ClusterChaosConfig

    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = set(faults) - {"kill", "cut", "broker"}
    if unknown or not faults:
        print(f"--faults: kill, cut or broker, not {args.faults!r}", file=sys.stderr)
        return 2
    config = ClusterChaosConfig(
        duration_s=args.duration,
        seed=args.seed,
        faults=faults,
        fault_interval_s=args.kill_interval or 3.0,
        cut_s=args.cut,
        away_s=args.away if args.away < args.duration / 2 else 0.0,
        final_kill=not args.no_final_kill,
        writers=args.writers,
        readers=args.readers,
        keys_per_writer=args.keys_per_writer,
        timeout_s=args.timeout,
    )
    workdir = Path(tempfile.mkdtemp(prefix="zkv-chaos-cluster-"))
    try:
        report = run_cluster_chaos(config, workdir)
    except AssertionError as exc:
        print(f"chaos run failed: {exc}", file=sys.stderr)
        _remove_unless(True, workdir)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(format_cluster_summary(report))
    passed = bool(report["summary"]["passed"])
    _remove_unless(args.keep or not passed, workdir)
    return 0 if passed else 1


def _remove_unless(keep: bool, workdir: Path) -> None:
    """The logs and data of a run: kept for a failed run (or on request), else removed."""
    if keep:
        print(f"logs and data kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
