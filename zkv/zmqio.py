"""ZeroMQ calls on the hot paths of the broker and the workers, without pyzmq's sugar.

pyzmq's flag constants are enums, and ``send_multipart``/``recv_multipart`` check and combine
them per frame: for the two or three small frames of a zkv message that costs more than the
sends themselves (2 us frame by frame with int flags against 5 us, measured here). Frames of
:data:`COPY_THRESHOLD` bytes or more are sent without a copy, where pyzmq's zero-copy
bookkeeping costs less than the memcpy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import zmq

COPY_THRESHOLD = 65_536  # frames this large are sent without a copy (pyzmq's own threshold)
POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)


def send_frames(socket: zmq.Socket, frames: Sequence[bytes]) -> None:
    """``socket.send_multipart(frames, zmq.NOBLOCK)``, cheaper. Raises zmq.Again, as it does,
    when the message cannot be queued (ZeroMQ queues a message whole, so the first frame is the
    one refused)."""
    send = socket.send
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        flags = NOBLOCK if index == last else SNDMORE_NOBLOCK
        if len(frame) < COPY_THRESHOLD:
            send(frame, flags)
        else:
            send(frame, flags, copy=False)


def recv_frames(socket: zmq.Socket) -> list[bytes]:
    """``socket.recv_multipart(zmq.NOBLOCK)``, cheaper. Raises zmq.Again if nothing is there."""
    recv = socket.recv
    frames = [recv(NOBLOCK)]
    while socket.get(RCVMORE):
        frames.append(recv(NOBLOCK))
    return frames


def recv_bounded(socket: zmq.Socket, max_frames: int) -> tuple[list[bytes], int]:
    """:func:`recv_frames` for a peer that may send anything: at most ``max_frames`` frames
    are copied out; the rest of the message is received without a copy and dropped at once.

    Returns:
        The first frames, and how many more the message had (0 for a message within bounds).

    libzmq delivers a multipart message only once every frame of it has arrived, and bounds
    each frame alone (ZMQ_MAXMSGSIZE), so by the time this runs the whole message is in
    memory already: this only keeps Python from copying the excess, and frees it at once.
    """
    recv = socket.recv
    frames = [recv(NOBLOCK)]
    while socket.get(RCVMORE):
        if len(frames) == max_frames:
            extra = 0
            while socket.get(RCVMORE):
                recv(NOBLOCK, copy=False)  # a zmq.Frame, freed as it is dropped
                extra += 1
            return frames, extra
        frames.append(recv(NOBLOCK))
    return frames, 0


# A sender counts every byte it hands to libzmq for one peer in a SendLedger until libzmq is
# known to be done with it. ZeroMQ's high-water marks count messages, not bytes, so without
# this what waits in a pipe is bounded by 100,000 messages of up to 64 MiB each.
TRACK_EVERY_BYTES = 1024 * 1024  # untracked bytes (small frames) that make the next send tracked


class SendLedger:
    """Bytes sent to one peer (one pipe: ZeroMQ sends a peer's messages in order) that libzmq
    may still hold.

    A message whose last frame is COPY_THRESHOLD bytes or more is sent with a
    :class:`zmq.MessageTracker` (pyzmq's zero-copy send, which it is anyway; tracking costs
    nothing measurable there). Smaller messages are copied into libzmq and cannot be
    tracked, so their bytes gather in :attr:`untracked` until they reach TRACK_EVERY_BYTES;
    then the next message's last frame is sent tracked (zero-copy, however small) and carries
    them: libzmq takes a pipe's messages in order, so when it is done with that frame it is
    done with every message before it.

    A tracker is done once libzmq has released the frame: written to the kernel on plain TCP,
    or encrypted into the connection's own copy under CURVE (the one message being written);
    pyzmq's garbage-collector thread then drops Python's reference and sets it.

    Attributes:
        tracked: bytes carried by trackers not yet seen done.
        untracked: bytes of small messages since the last tracked one (< TRACK_EVERY_BYTES).
        trackers: ``(tracker, nbytes)`` in send order.
    """

    __slots__ = ("tracked", "trackers", "untracked")

    def __init__(self) -> None:
        self.tracked = 0
        self.untracked = 0
        self.trackers: deque[tuple[zmq.MessageTracker, int]] = deque()

    @property
    def queued(self) -> int:
        """Every byte that may still be in libzmq: tracked and untracked."""
        return self.tracked + self.untracked

    def settle(self) -> int:
        """Drop the trackers libzmq is done with (a prefix: sends complete in order); returns
        the bytes they carried. Costs one ``done`` (about 1 us) when the oldest is not done."""
        trackers = self.trackers
        freed = 0
        while trackers and trackers[0][0].done:
            freed += trackers.popleft()[1]
        self.tracked -= freed
        return freed


def send_counted(socket: zmq.Socket, frames: Sequence[bytes], ledger: SendLedger) -> int:
    """:func:`send_frames`, counting the message in ``ledger`` (see :class:`SendLedger`).

    Returns:
        The bytes that became tracked with this message (0 if it was not tracked): what the
        caller adds to any total it keeps of tracked bytes.

    Raises:
        zmq.Again: as send_frames; then nothing was queued or counted.
    """
    send = socket.send
    last = len(frames) - 1
    nbytes = 0
    for index in range(last):
        frame = frames[index]
        size = len(frame)
        nbytes += size
        if size < COPY_THRESHOLD:
            send(frame, SNDMORE_NOBLOCK)
        else:
            send(frame, SNDMORE_NOBLOCK, copy=False)
    frame = frames[last]
    size = len(frame)
    carried = ledger.untracked + nbytes + size
    if size >= COPY_THRESHOLD or carried >= TRACK_EVERY_BYTES:
        # A zmq.Frame made with copy_threshold 0, not the bytes: pyzmq copies anything under
        # its copy threshold (64 KiB), zero-copy asked or not, and hands back a tracker that
        # is done at once, so a small message standing for a MiB of replies released it at
        # once and a client reading nothing of its 60 KB values grew the broker by a GB.
        tracked = zmq.Frame(frame, track=True, copy=False, copy_threshold=0)
        tracker = send(tracked, NOBLOCK, copy=False, track=True)
        ledger.trackers.append((tracker, carried))
        ledger.tracked += carried
        ledger.untracked = 0
        return carried
    send(frame, NOBLOCK)
    ledger.untracked = carried
    return 0
