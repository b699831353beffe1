"""The seed's /get, /set and /delete as a bare ASGI app, to measure other HTTP servers.

Issue 10 item 20: would a well-kept server (uvicorn with httptools, granian) carry the gateway
as fast as gateway/http11.py? This app does exactly the fast lane's work (gateway/fastlane.py:
the same parsing, the same batching asyncio zkv client, the same JSON), so the two differ only
in the HTTP server. Not used in production; run as, e.g.::

    ZKV_FRONTEND=tcp://127.0.0.1:5555 uvicorn bench.asgi_candidate:app --workers 2 \
        --http httptools --loop asyncio --port 5001 --no-access-log
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from gateway.app import SeedApi
from gateway.fastlane import FastLane
from zkv import defaults
from zkv.aio import AsyncClient

_client: AsyncClient | None = None


def _get_client() -> AsyncClient:
    global _client  # one per process, made on its loop at the first request
    if _client is None:
        _client = AsyncClient(os.environ.get("ZKV_FRONTEND"))
    return _client


_lane = FastLane(SeedApi(defaults.MAX_KEY_BYTES, defaults.MAX_VALUE_BYTES, time.time), _get_client)
_NOT_FOUND = b'{"error": "not served by this benchmark app"}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI 3: the fast lane's answer, or 404 for anything it declines."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    query = scope.get("query_string", b"")
    target = scope.get("raw_path") or scope["path"].encode()
    taken = _lane(scope["method"].encode(), target + b"?" + query if query else target)
    if taken is None:
        status, headers, body = "404 Not Found", [("Content-Type", "application/json")], _NOT_FOUND
    else:
        future, finish = taken
        if not future.done():
            await asyncio.wait((future,))  # finish() reads its outcome, error or not
        status, headers, body = finish(future)
    await send(
        {
            "type": "http.response.start",
            "status": int(status[:3]),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
