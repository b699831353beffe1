"""A process that compacts a shard's log and dies by SIGKILL at one step of the compaction.

``python -m tests.crashpoint DATA_DIR STEP`` (STEP: a ``RewriteStep`` name) opens shard 0 under
DATA_DIR as a worker does (``ShardFiles.take``, then ``replay``), serves a scripted history of
SETs (overwrites, TTLs, one that expires at once) and DELs through ``Shard.handle_batch``, the
worker's own code (so every batch runs in ``fenced()`` and is fsynced by ``commit()``), starts a
compaction, keeps writing while it runs (records that must reach the new log through the
rewrite buffer), and at STEP kills itself with SIGKILL: no ``finally``, no close, no fsync, no
removal of ``log.rewrite``, a real crash as the kernel sees it.

The crash point is the ``ShardFiles.crash_at`` hook: it raises SimulatedCrash right after the
step, which is caught here and turned into the SIGKILL. (Before raising, the hook stops the
compaction thread and closes its descriptor, which is what the process's death does anyway.)

Output, for the test that runs it: one JSON line on stdout per acknowledged request, printed and
flushed only after ``handle_batch`` returned (the moment a worker would send the reply), then
``{"reached": STEP}`` just before the kill. Exit status: killed by SIGKILL (-9 to the parent)
when the step was reached; 1 if the compaction finished without reaching it.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys
from pathlib import Path

from workers.aof import FsyncPolicy
from workers.idempotency import RequestMemory
from workers.persist import Durability, RewriteStep, ShardFiles, SimulatedCrash
from workers.shard import Shard
from workers.store import TTLStore
from zkv.protocol import Dispatch, Kind, Request, Status

SHARD = 0
EPOCH = 1
TTL_MS = 600_000  # long enough to outlive the test
EXPIRES_AT_ONCE_MS = 1  # a key dead before any successor reads it
ROUNDS = 5  # every "key-N" is written this many times
KEYS = 10
DELETED = 3  # "gone-N": written, then deleted
WAIT_S = 5.0  # for the compaction thread, which needs milliseconds


class Writer:
    """Serves requests to the shard one batch at a time and reports each acknowledged one."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.tokens = itertools.count(1)
        # Random ids as the client picks them, from a sequence the parent need not know.
        self.ids = random.Random(int.from_bytes(os.urandom(8), "big"))

    def set(self, key: str, value: str, ttl_ms: int | None = None) -> None:
        request = Request(Kind.SET, self._id(), key.encode(), value.encode(), ttl_ms)
        self._serve(request, value=value, ttl_ms=ttl_ms)

    def delete(self, key: str) -> None:
        self._serve(Request(Kind.DEL, self._id(), key.encode()), value=None, ttl_ms=None)

    def _id(self) -> int:
        return self.ids.getrandbits(64) or 1

    def _serve(self, request: Request, value: str | None, ttl_ms: int | None) -> None:
        (reply,) = self.shard.handle_batch([Dispatch(next(self.tokens), request)])
        if reply.status != Status.OK:
            raise SystemExit(f"{request.kind.name} {request.key!r} answered {reply.status.name}")
        acknowledged = {
            "kind": request.kind.name,
            "id": request.request_id,
            "key": request.key.decode(),
            "value": value,
            "ttl_ms": ttl_ms,
            "deadline_ms": reply.deadline_ms,
        }
        print(json.dumps(acknowledged), flush=True)


def crash(step: RewriteStep) -> None:
    print(json.dumps({"reached": step.name}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    data_dir, step = Path(argv[0]), RewriteStep[argv[1]]
    # Automatic compaction never starts (the log stays far below 1 MiB): this one is started
    # by hand, after the history below.
    files = ShardFiles(Durability(data_dir, FsyncPolicy.ALWAYS), SHARD)
    files.take(EPOCH)
    store, memory = TTLStore(), RequestMemory()
    files.replay(store, memory)
    shard = Shard(SHARD, store, memory=memory, files=files, epoch=files.epoch)
    writer = Writer(shard)

    for round_ in range(ROUNDS):  # overwritten keys, even ones with a deadline
        for i in range(KEYS):
            writer.set(f"key-{i}", f"value {i} of round {round_}", TTL_MS if i % 2 == 0 else None)
    for i in range(DELETED):
        writer.set(f"gone-{i}", "deleted below")
        writer.delete(f"gone-{i}")
    writer.set("expired", "dead before anyone reads it", EXPIRES_AT_ONCE_MS)
    writer.set("forever", "no deadline")

    files.crash_at = step
    try:
        files.start_rewrite(store, memory)
        # Acknowledged while the compaction runs: in the old log and in the rewrite buffer.
        writer.set("key-0", "written during the compaction", TTL_MS)
        writer.delete("key-1")
        writer.set("during", "a new key during the compaction", TTL_MS)
        if not files.wait_rewrite(WAIT_S):
            raise SystemExit(f"the compaction thread did not finish within {WAIT_S} s")
        files.tick(store, memory)  # the loop's timer finishes the compaction
    except SimulatedCrash:
        crash(step)
    print(f"the compaction ended without reaching {step.name}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
