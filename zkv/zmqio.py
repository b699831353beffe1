"""ZeroMQ calls on the hot paths of the broker and the workers, without pyzmq's sugar.

pyzmq's flag constants are enums, and ``send_multipart``/``recv_multipart`` check and combine
them per frame: for the two or three small frames of a zkv message that costs more than the
sends themselves (2 us frame by frame with int flags against 5 us, measured here). Frames of
:data:`COPY_THRESHOLD` bytes or more are sent without a copy, where pyzmq's zero-copy
bookkeeping costs less than the memcpy.
"""

from __future__ import annotations

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
