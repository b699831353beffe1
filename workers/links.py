"""Links from a cluster-mode worker to every broker (workers/cluster.py uses them).

What differs from the single-host worker (workers/worker.py), whose machinery this reuses:

* **Every broker.** The brokers register themselves in etcd; this worker keeps one
  :class:`Link` (a DEALER with its own send ledger, handshake watch and heartbeats) to each,
  with its routing identity set to its worker id, the name under which etcd knows it. A
  broker that leaves etcd is dropped; a new one is connected within a poll of etcd.
* **etcd decides the role.** A control thread (workers/control.py) keeps the worker's lease
  and reads the cluster's state; :func:`workers.roles.next_step` turns each reading into one
  step (campaign, follow, step down), done as one etcd transaction there.
* **Fencing by lease and epoch.** A leader serves only while its lease is valid by its own
  clock (``Control.lease_valid``: measured from before the last keepalive was sent, with a
  margin), so it stops acknowledging before etcd can give the shard to anyone else. The
  shard's epoch is its leader key's create revision, taken into the owner file too.
* **Tokens per broker.** Each broker numbers its dispatches on its own, so the shard's
  "newer token" check runs per broker: the shard's ``last_token`` is swapped in and out around
  each broker's batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq
from zmq.backend import zmq_poll

from workers.handshake import HandshakeWatch
from workers.worker import (
    MAX_POLL_S,
    SOCKET_HWM,
    Worker,
    WorkerConfig,
)
from workers.worker import (
    log as worker_log,
)
from zkv.protocol import Heartbeat, Ready, encode_control
from zkv.zmqio import POLLIN, SendLedger

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Link:
    """The connection to one broker and what the worker keeps per broker."""

    broker: str  # its id in etcd
    endpoint: str
    socket: zmq.Socket
    watch: HandshakeWatch
    ledger: SendLedger = field(default_factory=SendLedger)
    last_heard_s: float = 0.0
    next_heartbeat_s: float = 0.0
    last_token: int = 0  # the newest dispatch token of this broker the shard accepted
    handshake_ok: bool = False

    def close(self) -> None:
        self.watch.close()
        self.socket.close(linger=0)


class LinkedWorker(Worker):
    """The single-host worker's loop over several broker links (cluster mode's data path).

    Roles and etcd are added by :class:`workers.control.ClusterWorker`; this class only knows
    how to talk to a changing set of brokers: connect, heartbeat, READY claiming the shard it
    leads, receive from all, answer each broker through its own socket.
    """

    def __init__(self, config: WorkerConfig, worker_id: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, **kwargs)
        self.identity = worker_id.encode()
        self.links: dict[str, Link] = {}
        self.led_epoch = 0  # the etcd epoch of the shard led, 0 when leading none

    # --- brokers ----------------------------------------------------------------------------

    def set_brokers(self, brokers: dict[str, str]) -> None:
        """Connect to every broker in ``brokers`` (id -> backend endpoint), drop the others."""
        for broker in list(self.links):
            link = self.links[broker]
            if brokers.get(broker) != link.endpoint:
                log.info("broker %s at %s is gone from etcd: disconnecting", broker, link.endpoint)
                link.close()
                del self.links[broker]
        for broker, endpoint in brokers.items():
            if broker not in self.links:
                self.links[broker] = self._connect(broker, endpoint)
                log.info("connecting to broker %s at %s", broker, endpoint)

    def _connect(self, broker: str, endpoint: str) -> Link:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self.identity)
        keys_dir = None if self.config.keys is None else self.config.keys.directory
        watch = HandshakeWatch(socket, endpoint, keys_dir)
        if self._curve is not None:
            pair, server_key = self._curve
            socket.curve_secretkey = pair.secret
            socket.curve_publickey = pair.public
            socket.curve_serverkey = server_key
        socket.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        socket.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        try:
            socket.connect(endpoint)
        except zmq.ZMQError:
            watch.close()
            socket.close(linger=0)
            raise
        now_s = time.monotonic()
        link = Link(broker, endpoint, socket, watch, last_heard_s=now_s)
        link.next_heartbeat_s = now_s + self.config.heartbeat_interval_s
        self._use(link)
        self._send_ready()
        return link

    def _use(self, link: Link) -> None:
        """Make ``link`` the one :meth:`Worker._send` and friends talk through."""
        self._socket = link.socket
        self.ledger = link.ledger
        self._watch = link.watch

    def _send_ready(self) -> None:
        """READY claiming the shard led (the broker routes it only if etcd agrees)."""
        held = self.shard if self.led_epoch else None
        number = None if held is None else held.number
        self._send(encode_control(Ready(number, 0, self._manifest is not None, 0)))
        self._ready_sent_s = time.monotonic()

    def announce(self) -> None:
        """Tell every broker what this worker leads now (after a role change)."""
        for link in self.links.values():
            self._use(link)
            self._send_ready()

    def _on_assign(self, number: int | None, shards: int, epoch: int) -> None:
        """Brokers in cluster mode send no ASSIGN; one that does is ignored (etcd decides)."""
        worker_log.warning("ignored an ASSIGN of shard %s: in cluster mode etcd decides", number)

    # --- the loop ---------------------------------------------------------------------------

    def links_pass(self, extra: Sequence[zmq.Socket] = ()) -> list[zmq.Socket]:
        """One pass over every link: poll (with ``extra`` sockets), serve each broker's batch
        through its own socket, heartbeat. Returns the ``extra`` sockets that are readable."""
        links = list(self.links.values())
        items = [(link.socket, POLLIN) for link in links] + [(s, POLLIN) for s in extra]
        now_s = time.monotonic()
        due = min([link.next_heartbeat_s for link in links] + [self._expire_due_s(now_s)])
        timeout_ms = math.ceil(min(max(due - now_s, 0.0), MAX_POLL_S) * 1000)
        ready = zmq_poll(items, timeout_ms) if items else []
        if not items:
            time.sleep(timeout_ms / 1000)
        readable = {socket for socket, _ in ready}
        for link in links:
            if link.socket in readable:
                self._serve_link(link)
        self._link_timers(links)
        self._run_shard_timers()
        return [s for s in extra if s in readable]

    def _serve_link(self, link: Link) -> None:
        self._use(link)
        shard = self.shard
        if shard is not None:
            shard.last_token = link.last_token
        heard_s = self._last_heard_s
        batch = self._gather(link.socket, [(link.socket, POLLIN)])
        if self._last_heard_s != heard_s:  # _gather notes the time a message came
            link.last_heard_s = self._last_heard_s
        self._serve(batch)
        shard = self.shard
        if shard is not None:
            link.last_token = shard.last_token

    def _link_timers(self, links: list[Link]) -> None:
        now_s = time.monotonic()
        for link in links:
            if now_s >= link.next_heartbeat_s:
                self._use(link)
                self._send(encode_control(Heartbeat()))
                self._report(now_s)  # the figures /metrics shows, as the one-broker worker
                link.next_heartbeat_s = now_s + self.config.heartbeat_interval_s
                found = link.watch.check()
                if found.succeeded and not link.handshake_ok:
                    link.handshake_ok = True
                    log.info("registered with broker %s at %s", link.broker, link.endpoint)
                elif found.failure is not None:
                    link.handshake_ok = False
                    log.error("broker %s: %s", link.broker, found.failure)
            if now_s - link.last_heard_s >= self._silence_limit_s:
                # A broker that restarted forgot us; a fresh READY (not a new socket: the
                # broker's id in etcd is per process, so a restarted broker is a new link).
                link.last_heard_s = now_s
                self._use(link)
                self._send_ready()

    def _run_shard_timers(self) -> None:
        """The single-host worker's timers (fsync, compaction, expiry), without its one-broker
        heartbeat and liveness check: those are per link here (:meth:`_link_timers`)."""
        now_s = time.monotonic()
        self._next_heartbeat_s = now_s + 3600.0
        self._last_heard_s = now_s
        if self.events is not None:  # the one-broker worker does it on its heartbeat timer
            self.events.poll_subscriptions()
        Worker._run_timers(self)

    def close_links(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        self._socket = None
        self._watch = None
