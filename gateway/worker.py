"""gunicorn's worker class for the gateway: one asyncio loop per process (gateway/http11.py).

gunicorn's master still does what it does for every worker class: it binds the port, forks and
watches the workers, restarts a dead one, and turns SIGTERM into a graceful stop within
``graceful_timeout``. This class is what runs in each worker process: an event loop that serves
every connection of the process with gateway/http11.py and talks to the broker through one
batching client (gateway/bridge.py).

Signals: SIGTERM stops gracefully (no new connections, idle ones closed, requests in hand
answered for up to the graceful timeout); SIGINT and SIGQUIT stop at once, as in gunicorn.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from gunicorn.sock import ssl_context
from gunicorn.workers.base import Worker

from gateway.http11 import HttpServer, ServerConfig

TICK_S = 0.5  # how often the worker tells the master it lives, and checks for a stop


class EventLoopWorker(Worker):
    """A gunicorn worker serving the app on an asyncio loop, requests in greenlets.

    The application object (gateway.server.GatewayServer) gives the server's limits as its
    ``http_config`` attribute, and ``close_clients()`` closes the zkv clients of this process.
    """

    def init_process(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._stop_requested: asyncio.Event | None = None
        # A little under the master's own graceful timeout, after which it kills the worker.
        self._grace_s = max(0.0, float(self.cfg.graceful_timeout) - 0.5)
        super().init_process()  # loads the app, installs the signals, then calls run()

    def init_signals(self) -> None:
        super().init_signals()
        # Through the loop, so that a stop is noticed at once, not at the next tick.
        self.loop.add_signal_handler(signal.SIGTERM, self._request_stop, None)
        self.loop.add_signal_handler(signal.SIGINT, self._request_stop, 0.0)
        self.loop.add_signal_handler(signal.SIGQUIT, self._request_stop, 0.0)

    def _request_stop(self, grace_s: float | None) -> None:
        self.alive = False
        if grace_s is not None:
            self._grace_s = grace_s
        if self._stop_requested is not None:
            self._stop_requested.set()

    def run(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        app_config: ServerConfig = getattr(self.app, "http_config", None) or ServerConfig(
            max_body_bytes=1024 * 1024
        )
        config = ServerConfig(
            max_body_bytes=app_config.max_body_bytes,
            keepalive_s=float(self.cfg.keepalive),
            read_timeout_s=app_config.read_timeout_s,
            max_connections=int(self.cfg.worker_connections),
            max_connections_per_client=app_config.max_connections_per_client,
            evict_after_s=app_config.evict_after_s,
            write_timeout_s=app_config.write_timeout_s,
            access_log=app_config.access_log,
            max_set_target_bytes=app_config.max_set_target_bytes,
        )
        host, port = _server_address(self.sockets[0].sock.getsockname() if self.sockets else None)
        make_shortcut = getattr(self.app, "shortcut", None)  # GatewayServer's fast lane
        shortcut = make_shortcut() if make_shortcut is not None else None
        self.log.info(
            "worker %d: fast lane %s",
            self.pid,
            "on: plain /get, /set and /delete are served without Bottle"
            if shortcut is not None
            else "off: the Bottle app serves every request",
        )
        # TLS (--certfile/--keyfile): gunicorn's own context for its settings, the handshake
        # by asyncio on this loop, bounded by the read timeout (else a client that connects
        # and says nothing would hold its slot for asyncio's default of 60 s).
        tls = ssl_context(self.cfg) if self.cfg.is_ssl else None
        server = HttpServer(
            self.wsgi,
            config,
            self.loop,
            server_name=host,
            server_port=port,
            shortcut=shortcut,
            tls=tls,
        )
        await server.start(listener.sock for listener in self.sockets)
        parent = self.ppid
        while self.alive:
            self.notify()
            if os.getppid() != parent:
                self.log.info("worker %d: the master is gone, stopping", self.pid)
                break
            try:
                await asyncio.wait_for(self._stop_requested.wait(), TICK_S)
            except TimeoutError:
                pass
        self.notify()
        await server.stop(self._grace_s)
        self.log.info(
            "worker %d: stopped after %d requests, %d of them in the fast lane",
            self.pid,
            server.app_requests + server.shortcut_requests,
            server.shortcut_requests,
        )
        close = getattr(self.app, "close_clients", None)
        if close is not None:
            await close()


def _server_address(address: Any) -> tuple[str, int]:
    """``SERVER_NAME`` and ``SERVER_PORT`` for the environ, from gunicorn's bind address."""
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return "localhost", 0
