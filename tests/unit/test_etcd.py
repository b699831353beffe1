"""zkv.etcd reads every answer as hostile: a malformed one is an EtcdError that names the field,
never a KeyError, TypeError or a wrong value. No sockets: the transport is replaced by a script
of (status, body) answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from zkv.etcd import (
    KV,
    Compare,
    Etcd,
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    Result,
    Target,
    delete,
    get,
    parse_endpoint,
    prefix_end,
    put,
)

pytestmark = pytest.mark.unit

HEADER = {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "2"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kv(key: str = "k", value: str = "v", **fields: Any) -> dict[str, Any]:
    item = {
        "key": b64(key),
        "value": b64(value),
        "create_revision": "3",
        "mod_revision": "5",
        "version": "2",
    }
    item.update(fields)
    return item


class Scripted(Etcd):
    """An Etcd whose endpoints answer from a script: one (status, body) per request."""

    def __init__(self, *answers: tuple[int, Any], endpoints: int = 1) -> None:
        super().__init__([f"http://127.0.0.1:{2379 + n}" for n in range(endpoints)], 1.0)
        self.answers: Iterator[tuple[int, Any]] = iter(answers)
        self.sent: list[tuple[int, str, dict[str, Any]]] = []

    def _post(self, index: int, path: str, payload: bytes) -> tuple[int, bytes]:
        self.sent.append((index, path, json.loads(payload)))
        status, body = next(self.answers)
        if isinstance(body, BaseException):
            raise body
        if isinstance(body, bytes):
            return status, body
        return status, json.dumps(body).encode()


def ok(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, {"header": HEADER, **body}


# --- well-formed answers ----------------------------------------------------------------------


def test_get_reads_a_key_with_every_field() -> None:
    etcd = Scripted(ok({"kvs": [kv(lease="9")], "count": "1"}))
    assert etcd.get("k") == KV(b"k", b"v", 3, 5, 2, 9)
    assert etcd.sent[0][1:] == ("/v3/kv/range", {"key": b64("k")})


def test_absent_fields_are_zero_or_empty_as_the_gateway_leaves_them_out() -> None:
    etcd = Scripted(ok({}), ok({"kvs": [kv(value="")]}))
    assert etcd.get("k") is None  # no "kvs" at all: nothing found
    found = etcd.get("k")
    assert found is not None and found.value == b"" and found.lease == 0


def test_txn_answers_per_operation_of_the_branch_that_ran() -> None:
    etcd = Scripted(
        ok(
            {
                "succeeded": True,
                "responses": [
                    {"response_put": {"header": {"revision": "7"}}},
                    {"response_delete_range": {"deleted": "1"}},
                    {"response_range": {"kvs": [kv()]}},
                ],
            }
        )
    )
    result = etcd.txn([Compare.absent("k")], [put("k", "v", 5), delete("d"), get("k")], [])
    assert result.succeeded and result.revision == 7
    assert result.responses == (None, 1, [KV(b"k", b"v", 3, 5, 2, 0)])
    sent = etcd.sent[0][2]
    assert sent["compare"] == [
        {"key": b64("k"), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
    ]
    assert sent["success"][0] == {"request_put": {"key": b64("k"), "value": b64("v"), "lease": "5"}}


def test_a_failed_txn_is_checked_against_the_failure_branch() -> None:
    etcd = Scripted(ok({"responses": [{"response_range": {}}]}))  # "succeeded" left out: false
    result = etcd.txn([Compare.absent("k")], [put("k", "v")], [get("k")])
    assert not result.succeeded and result.responses == ([],)


def test_lease_calls() -> None:
    etcd = Scripted(
        ok({"ID": "77", "TTL": "2"}),
        (200, {"result": {"header": HEADER, "ID": "77", "TTL": "2"}}),
        (200, {"result": {"header": HEADER, "ID": "77"}}),  # TTL left out: the lease is gone
        (404, {"error": "etcdserver: requested lease not found", "code": 5}),
    )
    assert etcd.lease_grant(1) == (77, 2)
    assert etcd.lease_keepalive(77) == 2
    assert etcd.lease_keepalive(77) == 0
    etcd.lease_revoke(77)  # already gone: not an error


def test_compare_json() -> None:
    assert Compare.value_equals("k", "x").to_json()["value"] == b64("x")
    ranged = Compare.unchanged_since("p/", 9).to_json()
    assert ranged["range_end"] == b64("p0") and ranged["mod_revision"] == "10"
    assert ranged["result"] == "LESS"
    with pytest.raises(TypeError):
        Compare(b"k", Target.MOD, Result.EQUAL, b"x").to_json()


def test_prefix_end() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


# --- hostile answers --------------------------------------------------------------------------

HOSTILE_RANGES = [
    (200, b"not json"),
    (200, b"\xff\xfe"),
    (200, []),
    (200, "text"),
    (200, None),
    ok({"kvs": "no list"}),
    ok({"kvs": [None]}),
    ok({"kvs": [[]]}),
    ok({"kvs": [kv(key="")]}),
    ok({"kvs": [kv(key="other")]}),
    ok({"kvs": [kv(), kv()]}),
    ok({"kvs": [{**kv(), "key": "%%%"}]}),
    ok({"kvs": [{**kv(), "key": 5}]}),
    ok({"kvs": [{**kv(), "value": ["x"]}]}),
    ok({"kvs": [kv(create_revision="x")]}),
    ok({"kvs": [kv(create_revision="0")]}),
    ok({"kvs": [kv(mod_revision="-4")]}),
    ok({"kvs": [kv(version=True)]}),
    ok({"kvs": [kv(version=1.5)]}),
    ok({"kvs": [kv(lease="99999999999999999999")]}),
    ok({"kvs": [kv(lease="1" * 400)]}),
    ok({"kvs": [kv(lease={"a": 1})]}),
    ok({"more": True, "kvs": [kv()]}),
    ok({"more": "yes"}),
]


@pytest.mark.parametrize("answer", HOSTILE_RANGES)
def test_a_malformed_range_answer_is_an_etcd_error(answer: tuple[int, Any]) -> None:
    with pytest.raises(EtcdError) as raised:
        Scripted(answer).get("k")
    assert type(raised.value) is EtcdError
    assert "http://127.0.0.1:2379/v3/kv/range" in str(raised.value)


@pytest.mark.parametrize(
    "body",
    [
        {},  # no header
        {"header": None},
        {"header": []},
        {"header": {"revision": "0"}},
        {"header": {"revision": None}},
        {"header": {"revision": "7e3"}},
    ],
)
def test_a_put_answer_without_a_valid_revision_is_an_etcd_error(body: dict[str, Any]) -> None:
    with pytest.raises(EtcdError, match=r"header|revision"):
        Scripted((200, body)).put("k", "v")


@pytest.mark.parametrize(
    "body",
    [
        {"succeeded": 1, "responses": []},
        {"succeeded": True},  # no responses for one operation
        {"succeeded": True, "responses": [{}]},
        {"succeeded": True, "responses": [{"response_range": {}}]},  # wrong kind for a put
        {"succeeded": True, "responses": [None]},
        {"succeeded": True, "responses": [{"response_put": {}}, {"response_put": {}}]},
        {"succeeded": True, "responses": {"response_put": {}}},
    ],
)
def test_a_malformed_txn_answer_is_an_etcd_error(body: dict[str, Any]) -> None:
    with pytest.raises(EtcdError):
        Scripted(ok(body)).txn([], [put("k", "v")], [get("k")])


@pytest.mark.parametrize(
    "body",
    [
        {"result": None},
        {"result": "x"},
        {"header": HEADER, "ID": "77", "TTL": "2"},  # not wrapped in "result" as a stream is
        {"result": {"ID": "78", "TTL": "2"}},  # another lease renewed
        {"result": {"ID": "77", "TTL": "-1"}},
        {"result": {"ID": "77", "TTL": "two"}},
    ],
)
def test_a_malformed_keepalive_answer_is_an_etcd_error(body: dict[str, Any]) -> None:
    with pytest.raises(EtcdError):
        Scripted((200, body)).lease_keepalive(77)


@pytest.mark.parametrize(
    "body", [{"ID": "0", "TTL": "2"}, {"ID": "77"}, {"ID": "77", "TTL": "0"}, {"TTL": "2"}]
)
def test_a_grant_without_an_id_and_ttl_is_an_etcd_error(body: dict[str, Any]) -> None:
    with pytest.raises(EtcdError):
        Scripted(ok(body)).lease_grant(1)


def test_an_error_answer_names_the_server_text_clipped() -> None:
    etcd = Scripted((400, {"error": "x" * 10_000, "code": 3, "message": "bad"}))
    with pytest.raises(EtcdError) as raised:
        etcd.put("k", "v")
    assert type(raised.value) is EtcdError
    assert "code 3" in str(raised.value) and len(str(raised.value)) < 500


@pytest.mark.parametrize(
    "answer",
    [
        (404, {"error": "etcdserver: requested lease not found", "code": 5}),
        (200, {"error": {"grpc_code": 5, "message": "etcdserver: requested lease not found"}}),
    ],
)
def test_lease_not_found_is_its_own_error(answer: tuple[int, Any]) -> None:
    with pytest.raises(LeaseNotFound):
        Scripted(answer).put("k", "v", lease=77)


@pytest.mark.parametrize(
    "answer",
    [
        (404, b"Not Found"),
        (500, {"error": "boom", "code": [14]}),  # an unhashable code: not a retry code
        (500, {"error": "boom", "code": True}),
        (200, {"error": None, "code": 2, "header": None}),
    ],
)
def test_odd_error_answers_are_etcd_errors(answer: tuple[int, Any]) -> None:
    with pytest.raises(EtcdError):
        Scripted(answer).put("k", "v")


# --- endpoints in turn ------------------------------------------------------------------------


def test_an_endpoint_that_cannot_serve_moves_on_to_the_next_and_is_remembered() -> None:
    etcd = Scripted(
        (503, b"<html>unavailable</html>"),
        ok({"header": {"revision": "8"}}),
        ok({"header": {"revision": "9"}}),
        endpoints=2,
    )
    assert etcd.put("k", "v") == 8
    assert etcd.put("k", "v") == 9
    assert [index for index, _, _ in etcd.sent] == [0, 1, 1]  # starts where the last answered


@pytest.mark.parametrize("code", [4, 8, 14])
def test_etcd_saying_not_now_moves_on(code: int) -> None:
    etcd = Scripted(
        (503, {"error": "etcdserver: no leader", "code": code}),
        ok({"header": {"revision": "8"}}),
        endpoints=2,
    )
    assert etcd.put("k", "v") == 8


def test_no_endpoint_answering_is_unavailable_naming_each() -> None:
    etcd = Scripted(
        (0, ConnectionRefusedError("refused")), (0, TimeoutError("timed out")), endpoints=2
    )
    with pytest.raises(EtcdUnavailable) as raised:
        etcd.get("k")
    assert "2379: refused" in str(raised.value) and "2380: timed out" in str(raised.value)


def test_a_malformed_answer_does_not_move_on() -> None:
    """A garbage answer is reported at once, not hidden behind the next endpoint's."""
    etcd = Scripted((200, b"garbage"), ok({}), endpoints=2)
    with pytest.raises(EtcdError):
        etcd.get("k")
    assert len(etcd.sent) == 1


@pytest.mark.parametrize(
    "url",
    ["localhost:2379", "ftp://h:1", "http://h", "http://h:0x", "http://h:1/v3", "http://u@h:1", ""],
)
def test_bad_endpoints_are_refused_naming_the_url(url: str) -> None:
    with pytest.raises(ValueError, match=r"etcd|port"):
        parse_endpoint(url)


def test_endpoints_must_be_a_list() -> None:
    with pytest.raises(TypeError):
        Etcd("http://127.0.0.1:2379")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Etcd([])


def test_a_test_needing_etcd_fails_when_there_is_none(monkeypatch, tmp_path) -> None:
    """Fails, not skips: a suite that skipped the coordination tests would pass untested."""
    from tests import etcd as fixture

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(fixture, "DEBIAN_ETCD", str(tmp_path / "etcd"))
    with pytest.raises(pytest.fail.Exception, match="apt-get install etcd-server"):
        fixture.EtcdServer(tmp_path).start()
