"""``python -m tests.netns.agent``: makes requests inside a test host for a scenario outside.

Reads one JSON request per line on stdin, answers one JSON line on stdout, until stdin ends
(tests/hosts.py's Agent is the other side). A request is
``{"op": "http", "method", "url", "body", "headers", "timeout_s"}`` or
``{"op": "client", "call", "args", "frontend", "keys", "timeout_s"}``; the answer
``{"ok": true, "value": ..., "elapsed_s": s}`` or
``{"ok": false, "error": "<exception class>", "message": "...", "elapsed_s": s}``.
Bytes travel as latin-1 text (every byte one character, so nothing is lost).
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from zkv.client import Client

Clients = dict[tuple[str, str | None, float], Client]


def text(data: bytes) -> str:
    return data.decode("latin-1")


def http_request(request: dict[str, Any]) -> Any:
    """One request on a fresh connection: ``[status, headers, body]``."""
    url = urlsplit(request["url"])
    target = url.path + (f"?{url.query}" if url.query else "")
    body = request.get("body")
    connection = http.client.HTTPConnection(
        url.hostname, url.port or 80, timeout=request["timeout_s"]
    )
    try:
        connection.request(
            request["method"],
            target or "/",
            body=None if body is None else body.encode("latin-1"),
            headers=request.get("headers") or {},
        )
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return [response.status, headers, text(response.read())]
    finally:
        connection.close()


def client_call(request: dict[str, Any], clients: Clients) -> Any:
    """A call of a client kept per frontend, keys and timeout; its result as JSON."""
    key = (request["frontend"], request.get("keys"), float(request["timeout_s"]))
    client = clients.get(key)
    if client is None:
        client = clients[key] = Client(key[0], timeout_s=key[2], keys=key[1])
    call, args = request["call"], request.get("args") or []
    if call == "set":
        return client.set(*args)
    if call == "get":
        item = client.get(*args)
        return [text(item.value), item.deadline_ms]
    if call == "delete":
        return client.delete(*args)
    if call == "all":
        return [[text(e.key), text(e.value), e.deadline_ms] for e in client.all(*args)]
    if call == "ping":
        return client.ping()
    raise ValueError(f"unknown call {call!r}")


def main() -> int:
    clients: Clients = {}
    for line in sys.stdin:
        started_s = time.monotonic()
        try:
            request = json.loads(line)
            if request["op"] == "http":
                answer = {"ok": True, "value": http_request(request)}
            elif request["op"] == "client":
                answer = {"ok": True, "value": client_call(request, clients)}
            else:
                raise ValueError(f"unknown op {request['op']!r}")
        except Exception as exc:  # every failure is an answer: the scenario judges it
            answer = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        answer["elapsed_s"] = time.monotonic() - started_s
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for client in clients.values():
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
