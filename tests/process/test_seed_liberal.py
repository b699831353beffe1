"""The seed API takes what the seed's Flask app took, and every refusal is JSON, under both
gateway worker classes (the event loop with llhttp, and gunicorn's gthread with its parser).

Raw UTF-8 in a query (``/get?key=ключ``), values up to the value limit in a seed /set however
they are written, numbers in any form float() reads; a target over its bound is a JSON 414, a
malformed request a JSON 400, a head too large a JSON 431, never gunicorn's HTML pages.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import quote

import pytest

from tests.cluster import Cluster

pytestmark = [
    pytest.mark.process,
    pytest.mark.parametrize(
        "cluster",
        [{"ZKV_HTTP_WORKER": "event"}, {"ZKV_HTTP_WORKER": "gthread"}],
        ids=["event", "gthread"],
        indirect=True,
        scope="module",
    ),
]

MAX_VALUE = 1024 * 1024  # the default value limit
SET_TARGET_LIMIT = 3 * (1024 + MAX_VALUE) + 1024  # gateway.http11.set_target_limit of defaults


def raw(cluster: Cluster, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes as one request on a fresh connection; its status, headers and body."""
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer: {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(1 << 20)
            assert chunk, "closed in a body"
            body += chunk
    return int(status_line.split()[1]), headers, body


def get(cluster: Cluster, target: bytes | str) -> tuple[int, dict[str, str], bytes]:
    if isinstance(target, str):
        target = target.encode()
    return raw(cluster, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")


def json_error(answer: tuple[int, dict[str, str], bytes], status: int) -> str:
    got_status, headers, body = answer
    assert got_status == status, body[:300]
    assert headers["content-type"] == "application/json", (headers, body[:300])
    return str(json.loads(body)["error"])


def test_raw_utf8_in_the_query_and_path(cluster: Cluster) -> None:
    status, _, body = get(cluster, "/set?key=ключ&value=значение&timeout=1e3")
    assert status == 200, body
    status, _, body = get(cluster, "/get?key=ключ")
    assert status == 200 and json.loads(body)["value"] == "значение"
    status, _, body = get(cluster, "/v1/keys/ключ")
    assert (status, body) == (200, "значение".encode())
    status, _, body = get(cluster, "/delete?key=ключ")
    assert json.loads(body) == {"message": "Value deleted successfully"}


@pytest.mark.parametrize("form", ["raw", "escaped"])
def test_a_seed_set_of_a_value_at_the_limit(cluster: Cluster, form: str) -> None:
    value = "é" * (MAX_VALUE // 2)  # 1 MiB of UTF-8
    written = value if form == "raw" else quote(value)
    status, _, body = get(cluster, f"/set?key=big-{form}&value={written}&timeout=30")
    assert status == 200, body[:300]
    status, _, body = get(cluster, f"/v1/keys/big-{form}")
    assert (status, len(body)) == (200, MAX_VALUE)
    assert body == value.encode()


def test_a_value_over_the_limit_is_400_naming_it_not_414(cluster: Cluster) -> None:
    message = json_error(get(cluster, f"/set?key=k&value={'v' * (MAX_VALUE + 1)}&timeout=3"), 400)
    assert "'value'" in message and str(MAX_VALUE) in message


@pytest.mark.parametrize(
    "target",
    [
        b"/set?key=k&timeout=1&value=" + b"v" * SET_TARGET_LIMIT,
        b"/get?key=" + b"k" * 9000,
        b"/v1/keys/" + b"k" * 9000,
    ],
    ids=["set", "get", "rest"],
)
def test_a_target_over_its_bound_is_a_json_414(cluster: Cluster, target: bytes) -> None:
    message = json_error(get(cluster, target), 414)
    assert "8190" in message and str(SET_TARGET_LIMIT) in message


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /get?key=a b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
        (b"PUT /v1/keys/k HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        # A malformed chunk size (gthread: gunicorn's parser raised it in the app: a 500).
        (
            b"PUT /v1/keys/k HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n",
            400,
        ),
        # A coding list not ending with chunked: no body length (RFC 9112 6.3), 400 under both.
        (b"PUT /v1/keys/k HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ],
    ids=[
        "garbage",
        "space-in-target",
        "long-header",
        "many-headers",
        "gzip",
        "bad-chunk",
        "gzip-alone",
    ],
)
def test_malformed_requests_get_json_never_html(cluster: Cluster, data: bytes, status: int) -> None:
    assert json_error(raw(cluster, data), status)


def test_numbers_in_any_form_float_reads(cluster: Cluster) -> None:
    for timeout in ("1e3", "%201.5", "1_0", "2.5E1"):
        assert get(cluster, f"/set?key=n&value=v&timeout={timeout}")[0] == 200
    for timeout in ("nan", "inf", "-inf", "1e400"):
        message = json_error(get(cluster, f"/set?key=n&value=v&timeout={timeout}"), 400)
        assert message.startswith("parameter 'timeout' must be a finite number")
    assert get(cluster, "/v1/keys?limit=1e1")[0] == 200


def test_hundreds_of_pipelined_refusals_in_one_write_are_all_answered(cluster: Cluster) -> None:
    """Each a 400 the app answers at once, without the broker: the event server answered them
    by recursion, and a few hundred in one read killed the connection (RecursionError)."""
    count = 600
    one = b"GET /get?nokey=1 HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=30) as sock:
        sock.sendall(
            one * count + b"GET /get?key=none HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        received = b""
        while chunk := sock.recv(1 << 20):
            received += chunk
    assert received.count(b"HTTP/1.1 400 ") == count
    assert received.count(b"missing parameter 'key'") == count
    assert received.endswith(b'{"error": "Data not found"}')
