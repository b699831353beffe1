"""workers/cluster.py's decisions that need no sockets: a fake control plane records the steps
the worker asks of etcd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from workers.cluster import ClusterWorker
from workers.control import Outcome
from workers.roles import Leader, View
from workers.worker import WorkerConfig

pytestmark = pytest.mark.unit


class FakeControl:
    def __init__(self) -> None:
        self.asked: list[tuple[str, int | None, dict]] = []
        self.view: View | None = None
        self.brokers: dict[str, str] = {}
        self.reachable = True
        self.readings = 1
        self.valid = True

    def ask(self, action: str, shard: int | None, **args: object) -> None:
        self.asked.append((action, shard, args))

    def outcomes(self) -> list:
        return []

    def lease_valid(self) -> bool:
        return self.valid


@pytest.fixture
def worker() -> Iterator[tuple[ClusterWorker, FakeControl]]:
    context = zmq.Context()
    control = FakeControl()
    cluster_worker = ClusterWorker(WorkerConfig(), "h1-aaaa", control, context=context)  # type: ignore[arg-type]
    yield cluster_worker, control
    cluster_worker.close_links()
    context.term()


def test_a_leader_whose_lease_looks_lapsed_steps_down_and_resigns_its_key(worker) -> None:
    # A stall made the lease look lapsed by the worker's clock while etcd kept it: the key
    # lived on and the shard was routed to a worker serving nothing until it died.
    cluster_worker, control = worker
    cluster_worker.role, cluster_worker.role_shard, cluster_worker.led_epoch = "leader", 0, 7
    control.valid = False
    control.view = View(2, 1, {"h1-aaaa": "h1"}, {0: Leader("h1-aaaa", 7, "tcp://x:1")})
    cluster_worker._control_pass()
    assert cluster_worker.role == "standby"
    assert ("resign", 0, {"epoch": 7}) in control.asked


def test_a_standby_still_named_leader_resigns_and_a_refused_step_waits(worker) -> None:
    cluster_worker, control = worker
    control.view = View(2, 1, {"h1-aaaa": "h1"}, {0: Leader("h1-aaaa", 7, "tcp://x:1")})
    cluster_worker._control_pass()
    assert control.asked == [("resign", 0, {"epoch": 7})]
    # etcd refused it (a race): it is not asked again at once (campaigns refused were asked
    # 30 to 50 times a second), but after STEP_RETRY_S.
    cluster_worker._on_outcome(Outcome("resign", 0, False, error="refused"))
    cluster_worker._control_pass()
    assert len(control.asked) == 1
