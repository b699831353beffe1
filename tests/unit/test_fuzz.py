"""The fuzz targets (tests/fuzz/targets.py) as plain functions: their seeds pass, every input
that once found a bug passes now, and each target does catch the failures it is there for.

No atheris here: the targets read their input in plain Python, so any input replays as is.
"""

from __future__ import annotations

import pytest

import gateway.app as gateway_app
from tests.fuzz import targets
from tests.fuzz.targets import TARGETS, Finding
from zkv import protocol

pytestmark = pytest.mark.unit

# Inputs that found a bug, by target: each passes since its fix. Add what a fuzz run finds
# (python -m tests.fuzz writes it to fuzz-findings/), as bytes, with what it found.
REGRESSIONS: list[tuple[str, bytes, str]] = [
    (
        "wsgi",
        b"2\x04\x00\x06\x00\x06\x05a\n\n\n\n\n\n\n\n\n\n\n%",
        # Found by atheris within seconds on the routes before 8686f44 (and by Schemathesis):
        # PUT /v1/keys/<a key with a newline> answered 404 (tests/unit/test_gateway_found.py).
        "PUT of the key b'\\x00\\x06\\x05a\\n\\n' answered 404",
    ),
]

_REPLY = int(protocol.Kind.REPLY)  # a seed's kind byte: its count byte, then version, kind


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_passes(name: str) -> None:
    target, seeds = TARGETS[name]
    inputs = list(seeds())
    assert inputs
    for data in inputs:
        target(data)


@pytest.mark.parametrize(
    ("name", "data", "found"),
    REGRESSIONS,
    ids=[f"{name}-{number}" for number, (name, _, _) in enumerate(REGRESSIONS)],
)
def test_what_fuzzing_found_passes(name: str, data: bytes, found: str) -> None:
    TARGETS[name][0](data)


def test_any_input_is_read_without_atheris() -> None:
    for target, _ in TARGETS.values():
        for data in (b"", b"\x00", b"\xff" * 100, bytes(range(256))):
            target(data)


def test_the_protocol_target_lets_only_protocol_errors_escape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reply = next(
        seed for seed in targets.protocol_seeds() if seed[2:3] == bytes([int(protocol.Kind.REPLY)])
    )

    def broken(frames: object) -> object:
        raise IndexError("a decoder bug")

    monkeypatch.setattr(protocol, "decode_reply", broken)
    with pytest.raises(IndexError):
        targets.protocol_target(reply)


def test_the_protocol_target_finds_a_fast_path_that_disagrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reply = next(seed for seed in targets.protocol_seeds() if seed[2:3] == bytes([_REPLY]))
    targets.protocol_target(reply)
    monkeypatch.setattr(protocol, "peek_reply", lambda frames: (0, 0))
    with pytest.raises(Finding, match="peek_reply"):
        targets.protocol_target(reply)


@pytest.mark.parametrize("control", [0, 1], ids=["app", "fast lane"])
def test_the_http_target_finds_a_500(monkeypatch: pytest.MonkeyPatch, control: int) -> None:
    def broken(self: object, item: object) -> object:
        raise KeyError("a route bug")

    monkeypatch.setattr(gateway_app.SeedApi, "got", broken)
    request = b"GET /get?key=a HTTP/1.1\r\n\r\n"
    with pytest.raises(Finding, match=r"500|logged ERROR"):
        targets.http_target(bytes([control, 255]) + request)


def test_the_http_target_serves_through_the_fast_lane_and_the_app() -> None:
    request = b"GET /get?key=a HTTP/1.1\r\n\r\nGET /v1/keys/a HTTP/1.1\r\n\r\n"
    targets.http_target(bytes([1, 255]) + request)
    assert (targets.last_server.shortcut_requests, targets.last_server.app_requests) == (1, 1)
    targets.http_target(bytes([0, 255]) + request)
    assert (targets.last_server.shortcut_requests, targets.last_server.app_requests) == (0, 2)


def test_the_http_target_finds_an_answer_that_is_not_json() -> None:
    with pytest.raises(Finding, match="not JSON"):
        targets._check_answer(b"GET", 404, [("Content-Type", "text/html")], b"<html>")
    with pytest.raises(Finding, match="answered 500"):
        targets._check_answer(b"GET", 500, [("Content-Type", "application/json")], b"{}")
    with pytest.raises(Finding, match="responses on the wire"):
        targets._check_wire(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2)


def test_the_wsgi_target_finds_a_500(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(text: str | None) -> int:
        raise ZeroDivisionError("a route bug")

    monkeypatch.setattr(gateway_app, "parse_limit", broken)
    listing = [seed for seed in targets.wsgi_seeds() if b"limit=" in seed]
    with pytest.raises(Finding, match=r"500|logged ERROR"):
        targets.wsgi_target(listing[0])


def test_the_protocol_target_finds_an_extension_block_that_does_not_round_trip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block = next(seed for seed in targets.protocol_seeds() if seed[:2] == b"\x01\x03")
    targets.protocol_target(block)
    split = protocol.split_ext
    monkeypatch.setattr(protocol, "split_ext", lambda value: (None, *split(value)[1:]))
    with pytest.raises(Finding, match="extension block"):
        targets.protocol_target(block)


def test_the_protocol_target_finds_a_request_read_otherwise_in_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch record that loses a flag of the lone request (here GET's TTL: a touch read as
    a plain GET) is a finding."""
    touch = next(  # the seed of a lone GET with flags TTL, KEYS_ONLY and STAMPED
        seed
        for seed in targets.protocol_seeds()
        if seed[0] == 1 and seed[2:4] == bytes([int(protocol.Kind.GET), 0x07])
    )
    targets.protocol_target(touch)
    record = protocol.request_record

    def lossy(frames: list[bytes]) -> bytes:
        packed = bytearray(record(frames))
        packed[1] = 0
        packed[16:24] = bytes(8)
        return bytes(packed)

    monkeypatch.setattr(protocol, "request_record", lossy)
    with pytest.raises(Finding, match="in a batch"):
        targets.protocol_target(touch)
