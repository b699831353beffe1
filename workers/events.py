"""A worker's change events: one XPUB socket per worker process, connected to the broker's
events backend (docs/protocol.md, "Change events").

How events flow: the shard appends ``(event_code, key, version, deadline_ms)`` to
``Shard.events`` for every change it applies, and for every key its active expiry removes
(workers/shard.py, workers/store.py). The loop that owns the shard calls
:meth:`EventPublisher.publish` right after it has sent a pass's replies (cluster mode: when
the held replies are released, after the in-sync followers have the records), so an event
never announces a write that was not acknowledged; expiry events go out after each expiry
pass. The broker's XSUB/XPUB proxy (broker/events.py) hands them to every subscriber whose
prefix matches the key (the key is the first frame: ZeroMQ's own prefix subscriptions).

Sequence numbers, so that a subscriber can tell what it missed: ``seq = stream << 32 | n``,
``stream`` = ``zkv.protocol.event_stream(epoch)`` of the shard's owner epoch (ownership epoch
single-host: a broker token whose high half is the broker's own epoch, so an owner under a restarted
broker gets another stream; leader epoch in cluster mode), ``n`` = 1, 2, ... per shard and stream.
Consecutive ``n`` within one stream means nothing was missed; a new stream (another owner took the
shard, or this worker took it again) starts at n = 1 and says "start over" (the subscriber cannot
know what the old owner published after the last event it got). ``n`` wraps from 2**32 - 1 to 1
(after 4 billion events of one owner), which a subscriber sees as a gap.

Bounds, never blocking the worker's loop: the socket's SNDHWM (:data:`EVENTS_SNDHWM`
messages per connected broker) and non-blocking sends. The socket drops a message for a
peer whose queue is full, silently (ZeroMQ does not tell the sender), so the drop shows only
as a gap in ``n`` on the subscriber's side. The socket is an XPUB (a PUB that also receives the
subscriptions its peers forward): it filters by prefix as a PUB does, and the worker counts the
prefixes subscribed, so that while nobody watches it sends nothing at all (a write's event then
costs one getsockopt per pass, not two sends).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import zmq

from zkv.keys import KeyPair
from zkv.protocol import event_header, event_stream

log = logging.getLogger(__name__)

# Messages queued towards one broker's events backend before ZeroMQ drops (per connection).
# A burst of a million expiries is drained by the broker at several hundred thousand a second;
# 100,000 (the broker's EVENTS_HWM too) keeps the worst case at about 100 MB of keys queued.
EVENTS_SNDHWM = 100_000
SEQ_N_BITS = 32  # the low bits of seq: the event's number within its stream
SEQ_N_MASK = (1 << SEQ_N_BITS) - 1
MAX_SUBSCRIPTION_MESSAGES = 1000  # read per publish call (a burst of new prefixes)
DISABLED = "none"  # --events-backend none: no socket, Shard.events stays None (zero cost)


def stream_of(epoch: int) -> int:
    """The stream number of an owner epoch: zkv.protocol.event_stream, both halves of the
    u64 folded (the low half alone restarts under a new broker: its events would then look
    older than the last owner's)."""
    return event_stream(epoch)


class Sequencer:
    """The sequence numbers of the shards this process publishes for (no sockets: unit tested).

    One counter per shard: a shard taken again (a new epoch) starts a new stream at n = 1.
    """

    __slots__ = ("_streams",)

    def __init__(self) -> None:
        self._streams: dict[int, tuple[int, int]] = {}  # shard -> (stream, last n)

    def take(self, shard: int, epoch: int, count: int) -> int:
        """Reserve ``count`` numbers of ``shard``'s stream for ``epoch``; returns the first
        ``seq`` (the others follow it: seq + 1, ... within the stream, see :meth:`after`)."""
        stream = stream_of(epoch)
        held = self._streams.get(shard)
        last = held[1] if held is not None and held[0] == stream else 0
        first = last % SEQ_N_MASK + 1
        self._streams[shard] = (stream, (last + count - 1) % SEQ_N_MASK + 1)
        return stream << SEQ_N_BITS | first

    @staticmethod
    def after(seq: int) -> int:
        """The next seq of the same stream (n wraps from 2**32 - 1 to 1)."""
        n = seq & SEQ_N_MASK
        return (seq & ~SEQ_N_MASK) | (n % SEQ_N_MASK + 1)


class EventPublisher:
    """The worker process's XPUB socket and its shards' sequence numbers.

    Args:
        context: the worker's ZeroMQ context.
        endpoints: the events backends to connect to (one per broker in cluster mode).
        curve: ``(the worker's keypair, the broker's public key)`` when the backend uses
            CURVE (the worker's backend socket does then), else None.
        hwm: messages queued per broker before ZeroMQ drops.
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoints: Iterable[str],
        curve: tuple[KeyPair, bytes] | None = None,
        hwm: int = EVENTS_SNDHWM,
    ) -> None:
        socket = context.socket(zmq.XPUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, hwm)
        if curve is not None:
            pair, server_key = curve
            socket.curve_secretkey = pair.secret
            socket.curve_publickey = pair.public
            socket.curve_serverkey = server_key
        self.socket = socket
        self.endpoints: set[str] = set()
        self.sequencer = Sequencer()
        self.published = 0  # events handed to ZeroMQ (those it dropped included)
        # Distinct prefixes subscribed through the brokers (see _read_subscriptions).
        self.subscriptions = 0
        self.connect(endpoints)

    def connect(self, endpoints: Iterable[str]) -> None:
        """Be connected to exactly ``endpoints`` (cluster mode: the brokers in etcd)."""
        wanted = set(endpoints)
        for endpoint in self.endpoints - wanted:
            try:
                self.socket.disconnect(endpoint)
            except zmq.ZMQError as exc:
                log.warning("events: disconnecting from %s: %s", endpoint, exc)
            log.info("events: no longer publishing to %s", endpoint)
        for endpoint in wanted - self.endpoints:
            self.socket.connect(endpoint)
            log.info("events: publishing to %s", endpoint)
        self.endpoints = wanted

    def publish(self, shard: int, epoch: int, events: list[tuple[int, bytes, int, int]]) -> None:
        """Send ``events`` (a shard's drained list, in apply order) and empty the list.

        Never blocks: a send that would (it cannot on PUB, but a future socket type could)
        drops the rest of the list, which subscribers see as a gap.
        """
        count = len(events)
        if not count:
            return
        if self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            self._read_subscriptions()
        if not self.subscriptions:
            # Nobody watches: number the changes (a subscriber's tracking starts at its first
            # event anyway) and send nothing. A write then costs this one getsockopt a pass.
            self.sequencer.take(shard, epoch, count)
            events.clear()
            return
        seq = self.sequencer.take(shard, epoch, count)
        wraps = (seq & SEQ_N_MASK) + count - 1 > SEQ_N_MASK  # n passes 2**32 - 1 in this list
        send = self.socket.send
        more = zmq.SNDMORE | zmq.NOBLOCK
        sent = 0
        # Per event: two sends and a struct.pack (about 2 us), nothing else: this runs for
        # every write of a pass, and for every key of an expiry wave.
        try:
            for code, key, version, deadline_ms in events:
                send(key, more)
                send(event_header(code, shard, seq, version, deadline_ms), zmq.NOBLOCK)
                seq = Sequencer.after(seq) if wraps else seq + 1
                sent += 1
        except zmq.Again:
            log.warning("events: queue full, %d event(s) of shard %d dropped", count - sent, shard)
        finally:
            self.published += sent
            events.clear()

    def poll_subscriptions(self) -> None:
        """Read the subscription messages waiting (the worker's heartbeat timer calls this):
        libzmq queues them without a bound until read, and a worker with no writes would
        otherwise never read them."""
        if self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            self._read_subscriptions(MAX_SUBSCRIPTION_MESSAGES * 100)

    def _read_subscriptions(self, most: int = 0) -> None:
        """Count the prefixes subscribed: the socket is an XPUB, which passes up each prefix's
        first subscription (``\x01`` + prefix, from any broker) and its last unsubscription
        (``\x00`` + prefix, also when a broker's connection ends), so a counter is exact and
        holds no prefix. At most MAX_SUBSCRIPTION_MESSAGES a call: the rest wait for the next."""
        socket = self.socket
        for _ in range(most or MAX_SUBSCRIPTION_MESSAGES):
            try:
                message = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01":
                self.subscriptions += 1
            elif message[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)

    def close(self) -> None:
        self.socket.close(linger=0)
