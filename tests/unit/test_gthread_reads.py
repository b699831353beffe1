"""gateway/gthread.py: a request begun must arrive whole within READ_TIMEOUT_S between reads.

A client that stopped half-way held one of gunicorn's threads for ever; as many such clients
as threads locked everyone out (a hostile test: 8 connections froze a gateway of 8 threads).
"""

from __future__ import annotations

import socket
import time

import pytest
from gunicorn.http import errors

from gateway import gthread

pytestmark = pytest.mark.unit


def test_a_read_that_waits_past_the_bound_ends_the_request(monkeypatch) -> None:
    monkeypatch.setattr(gthread, "READ_TIMEOUT_S", 0.2)
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(True)
        gthread._bound_reads(ours)
        ours.setblocking(True)  # as gunicorn does before each request: the bound holds
        source = gthread._TimedSource(ours)
        theirs.sendall(b"GET / HT")
        assert source.recv(100) == b"GET / HT"
        started = time.monotonic()
        with pytest.raises(errors.NoMoreData):
            source.recv(100)  # the client stopped half-way
        assert time.monotonic() - started < 5.0
    finally:
        ours.close()
        theirs.close()
