"""The data directory's manifest: cluster id and shard count (workers/manifest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    bind_shards,
    open_manifest,
)

pytestmark = pytest.mark.unit


def no_fsync(fd: int) -> None:
    pass


def test_the_first_open_draws_a_cluster_id_and_later_opens_read_it(tmp_path: Path) -> None:
    first = open_manifest(tmp_path / "data", no_fsync)
    assert first.cluster != 0 and first.shards is None and first.durable
    assert open_manifest(tmp_path / "data", no_fsync) == first
    assert open_manifest(tmp_path / "other", no_fsync).cluster != first.cluster


def test_the_first_assign_binds_the_shard_count_and_another_count_is_refused(
    tmp_path: Path,
) -> None:
    manifest = open_manifest(tmp_path, no_fsync)
    bound = bind_shards(tmp_path, manifest, 2, no_fsync)
    assert bound == Manifest(manifest.cluster, 2)
    assert open_manifest(tmp_path, no_fsync) == bound  # on disk
    assert bind_shards(tmp_path, bound, 2, no_fsync) is bound
    with pytest.raises(ManifestError, match=r"cluster of 2 shards .* the broker runs 3"):
        bind_shards(tmp_path, bound, 3, no_fsync)
    # Another process of the same directory, started before the binding, is refused too.
    with pytest.raises(ManifestError, match="--shards 2"):
        bind_shards(tmp_path, manifest, 1, no_fsync)


def test_a_directory_of_an_earlier_version_is_refused_a_count_its_shards_exceed(
    tmp_path: Path,
) -> None:
    (tmp_path / "shard-0").mkdir()
    (tmp_path / "shard-3").mkdir()
    manifest = open_manifest(tmp_path, no_fsync)
    with pytest.raises(ManifestError, match="holds shard-3"):
        bind_shards(tmp_path, manifest, 2, no_fsync)
    assert bind_shards(tmp_path, manifest, 4, no_fsync).shards == 4


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe not json",
        b"[]",
        b'{"format": 2, "cluster": "0000000000000001", "shards": 1, "durable": true}',
        b'{"format": 1, "cluster": "xyz", "shards": 1, "durable": true}',
        b'{"format": 1, "cluster": "0000000000000000", "shards": 1, "durable": true}',
        b'{"format": 1, "cluster": "0000000000000001", "shards": 0, "durable": true}',
        b'{"format": 1, "cluster": "0000000000000001", "shards": true, "durable": true}',
        b'{"format": 1, "cluster": "0000000000000001", "shards": 1, "durable": false}',
        b" " * (MAX_MANIFEST_BYTES + 1),
    ],
)
def test_a_damaged_manifest_is_refused_with_a_message(tmp_path: Path, content: bytes) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ManifestError, match="is unreadable"):
        open_manifest(tmp_path, no_fsync)
