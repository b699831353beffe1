"""The issue-12 bench rows (bench/issue12.py): the ids it measures are the scenarios' ids, and
the compare-and-set loop carries each write's version to the next. No load is run here."""

from __future__ import annotations

import pytest

from bench import client_pipeline, issue12
from bench.scenarios import all_scenarios
from zkv import calls
from zkv.errors import PreconditionFailed
from zkv.protocol import Kind

pytestmark = pytest.mark.unit


def test_every_issue12_row_is_one_the_run_measures_and_its_peers_exist() -> None:
    rows = {s.id: s for s in all_scenarios() if s.target == "issue12"}
    measured = (
        {issue12.pipelined_id(op) for op in issue12.PIPELINED_OPS}
        | {issue12.single_id(op) for op in issue12.ONE_AT_A_TIME}
        | {issue12.redis_id(op) for op in issue12.REDIS_COMMANDS}
    )
    assert set(rows) == measured
    ids = {s.id for s in all_scenarios()}
    assert all(peer.scenario in ids for row in rows.values() for peer in row.peers)


def test_the_compare_and_set_loop_writes_each_key_at_its_last_version() -> None:
    ops = client_pipeline.build_extended("set-ifv", b"v", 2, 0)
    refused = PreconditionFailed("version is 9, not 8")
    after = client_pipeline.next_cas(ops, [(41, None), refused], b"v")
    code, key, (kind, value, extra), ttl_ms = after[0]
    assert (code, key, kind, value) == (calls.C_PUT, ops[0][1], Kind.SET, b"v")
    assert extra == {"if_version": 41, "versioned": True} and ttl_ms == ops[0][3]
    assert after[1] is ops[1]  # refused: sent again as it was
    record = calls.pack(after[0], 7)  # a valid operation, packed on the fast path
    assert record == calls.pack(
        calls.set_op(key, b"v", ttl_ms / 1000, if_version=41, versioned=True), 7
    )
