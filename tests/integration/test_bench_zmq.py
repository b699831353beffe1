"""bench.zmq_load's reply helper on real (in-process) ZeroMQ sockets."""

from __future__ import annotations

import pytest
import zmq

from bench import zmq_load
from zkv.protocol import Reply, Status, encode_reply

pytestmark = pytest.mark.integration


def test_queued_replies_waits_for_one_then_takes_every_queued_reply() -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    try:
        router.bind("inproc://queued-replies")
        dealer.connect("inproc://queued-replies")
        with pytest.raises(zmq_load.Failed, match=r"no reply within 0.01 s \(GET\)"):
            list(zmq_load.queued_replies(dealer, 0.01, "GET"))
        dealer.send(b"hello")
        identity, _ = router.recv_multipart()
        for request_id in (7, 8):
            router.send_multipart([identity, *encode_reply(Reply(Status.OK, request_id))])
        got = list(zmq_load.queued_replies(dealer, 5.0, "GET"))
        assert [reply.request_id for reply in got] == [7, 8]
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()
