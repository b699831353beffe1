"""What gateway/http11.py reads, fed straight into a connection: no sockets, no clock.

Raw UTF-8 in a request target (which llhttp refuses) reaches the app %-escaped, while bodies
pass byte for byte, however the input is split into reads; a seed /set target may be as long
as its key and value limits need, every other target is bounded at 8190 bytes.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.http11 import (
    CAREFUL_BYTES_PER_PIECE,
    LIMIT_REQUEST_LINE_BYTES,
    MAX_CAREFUL_PIECES,
    HttpConnection,
    HttpServer,
    ServerConfig,
    set_target_limit,
)

pytestmark = pytest.mark.unit

MAX_BODY = 4096
SET_LIMIT = set_target_limit(64, 4000)  # 13,216 bytes: keys of 64 bytes, values of 4000


class Transport:
    """What a connection asks of its asyncio transport; keeps what is written."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 4000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    abort = close


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    body = environ["wsgi.input"].read()
    seen = {
        "path": environ["PATH_INFO"],
        "query": environ["QUERY_STRING"],
        "thing": environ.get("HTTP_X_THING"),
        "body": body.hex(),
    }
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(seen).encode()]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class CountingParser:
    """The connection's parser, counting the calls that feed it."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.feeds = 0

    def feed_data(self, data: bytes) -> None:
        self.feeds += 1
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


def feed(
    loop: asyncio.AbstractEventLoop, pieces: list[bytes], counted: list[int] | None = None
) -> list[tuple[int, Any]]:
    """Feed ``pieces`` as successive reads of one connection; the answers, in order.

    Args:
        counted: if given, receives the number of parser calls of each read.
    """
    server = HttpServer(
        echo, ServerConfig(max_body_bytes=MAX_BODY, max_set_target_bytes=SET_LIMIT), loop
    )
    connection = HttpConnection(server)
    parser = CountingParser(connection.parser)
    connection.parser = parser  # type: ignore[assignment]
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    for piece in pieces:
        before = parser.feeds
        connection.data_received(piece)
        if counted is not None:
            counted.append(parser.feeds - before)
    answers = []
    out = bytes(transport.written)
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.partition(": ")[::2] for line in lines[1:])
        length = int(fields["Content-Length"])
        body, out = rest[:length], rest[length:]
        answers.append((int(lines[0].split()[1]), json.loads(body)))
    return answers


def request(target: bytes, *headers: bytes, body: bytes = b"", chunked: bool = False) -> bytes:
    head = [b"PUT " + target + b" HTTP/1.1", b"Host: t", *headers]
    if chunked:
        head.append(b"Transfer-Encoding: chunked")
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif body:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


BINARY = bytes(range(256)) + b"\n\r\n\xff\xd0\xba\r\n\r\n0\r\n\r\n"  # not a head, not a chunk
STREAM = [
    request("/get?key=ключ&v=é+x%20".encode()),
    request(b"/v1/keys/a", body=BINARY),
    request("/v1/keys/ключ/é?key=%D0%BA".encode(), b"X-Thing: caf\xc3\xa9"),
    request(b"/v1/keys/b", body=BINARY, chunked=True),
    request("/set?key=ü&value=€".encode()),
]
EXPECTED = [
    {"path": "/get", "query": "key=%D0%BA%D0%BB%D1%8E%D1%87&v=%C3%A9+x%20", "thing": None},
    {"path": "/v1/keys/a", "query": "", "thing": None, "body": BINARY.hex()},
    {
        "path": "/v1/keys/ключ/é".encode().decode("latin-1"),
        "query": "key=%D0%BA",
        "thing": "caf%C3%A9",
    },
    {"path": "/v1/keys/b", "query": "", "thing": None, "body": BINARY.hex()},
    {"path": "/set", "query": "key=%C3%BC&value=%E2%82%AC", "thing": None},
]


def expected() -> list[tuple[int, Any]]:
    return [(200, {"body": "", **seen}) for seen in EXPECTED]


def test_raw_utf8_in_targets_reaches_the_app_escaped_and_bodies_untouched(loop) -> None:
    assert feed(loop, [b"".join(STREAM)]) == expected()


def test_many_pipelined_requests_answered_at_once_in_one_read(loop) -> None:
    """Each answered by the app at once (as a 400 is): answering them used to recurse once
    per request, and a few hundred in one read ended in a RecursionError."""
    one = "GET /get?key=ключ HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    seen = {"path": "/get", "query": "key=%D0%BA%D0%BB%D1%8E%D1%87", "thing": None, "body": ""}
    assert feed(loop, [one * 2000]) == [(200, seen)] * 2000
    ascii_only = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n" * 2000
    assert len(feed(loop, [ascii_only])) == 2000


def test_the_same_split_into_reads_anywhere(loop) -> None:
    data = b"".join(STREAM)
    assert feed(loop, [data[i : i + 1] for i in range(len(data))]) == expected()
    rng = random.Random(13)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert feed(loop, pieces) == expected(), cuts


def test_a_seed_set_target_may_be_as_long_as_its_limits_need(loop) -> None:
    value = "ж" * 2000  # 4000 bytes of UTF-8, the value limit here
    raw = f"/set?key={'k' * 64}&value={value}&timeout=1e3".encode()
    [(status, seen)] = feed(loop, [request(raw)])
    assert status == 200 and len(seen["query"]) > LIMIT_REQUEST_LINE_BYTES
    escaped = b"/set?key=" + b"%6B" * 64 + b"&value=" + b"%D0%B6" * 2000 + b"&timeout=1"
    assert len(escaped) <= SET_LIMIT
    assert feed(loop, [request(escaped)])[0][0] == 200


@pytest.mark.parametrize(
    "target",
    [
        b"/set?value=" + b"v" * SET_LIMIT,
        b"/get?key=" + b"k" * LIMIT_REQUEST_LINE_BYTES,
        b"/set/?key=" + b"k" * LIMIT_REQUEST_LINE_BYTES,  # not the seed /set
        b"/v1/keys/" + "é".encode() * LIMIT_REQUEST_LINE_BYTES,
    ],
)
def test_a_target_over_its_bound_is_414_json(loop, target: bytes) -> None:
    [(status, answer)] = feed(loop, [request(target)])
    assert status == 414
    assert answer == {
        "error": f"request target longer than {LIMIT_REQUEST_LINE_BYTES} bytes "
        f"(seed /set: {SET_LIMIT} bytes)"
    }


def test_a_long_target_grows_in_linear_time(loop) -> None:
    """Pieces of a few bytes each: appended to one buffer, not copied whole per piece."""
    target = b"/set?key=k&timeout=1&value=" + b"v" * 1000
    data = request(target)
    assert feed(loop, [data[i : i + 3] for i in range(0, len(data), 3)])[0][0] == 200


def test_a_read_costs_a_bounded_number_of_parser_calls(loop) -> None:
    """Reads holding bytes above 0x7F are fed in pieces, but never one per line unbounded: a
    read of empty lines, or a chunked body of short lines, would cost a call per 2 bytes."""
    counted: list[int] = []
    lines = b"\r\n" * 30_000 + request("/get?key=ü".encode())
    assert feed(loop, [lines], counted)[0][0] == 200  # llhttp skips empty lines between requests
    body = (b"\n\x80" * 20_000)[:MAX_BODY]
    chunked = request(b"/v1/keys/c", body=body, chunked=True)
    [(status, seen)] = feed(loop, [chunked], counted)
    assert (status, seen["body"]) == (200, body.hex())
    bound = MAX_CAREFUL_PIECES + len(chunked) // CAREFUL_BYTES_PER_PIECE + 1
    assert counted[-1] <= bound < len(chunked.split(b"\n")), counted
    assert counted[0] <= 20, counted  # the empty lines in one piece
    feed(loop, [request(b"/v1/keys/c", body=body)], counted)
    assert counted[-1] <= 20, counted  # a head a line at a time, the body in one call
