"""The data directory's manifest: which cluster its shards belong to, and how many there are.

Nothing else ties a shard to its data. Without it, a worker started with another data directory
(or ``--in-memory``) took a durable shard over from an empty log, and acknowledged writes
vanished; a data directory restarted under another shard count served keys from the wrong
shards (12 of 20 keys lost in a test, one listed twice). So::

    <data-dir>/manifest   {"format": 1, "cluster": "<16 hex digits>", "shards": N, "durable": true}

* ``cluster``: a random 64-bit id, drawn by the first worker that opens the directory (under a
  lock on the directory, so that processes started together agree on one). Workers announce
  it in READY, and the broker gives shards only to durable workers of the cluster that first
  owned one (broker/registry.py, ``Registry.refusal``).
* ``shards``: the shard count of the first ASSIGN the directory saw. An ASSIGN with another
  count is refused: the worker exits with status 2 (a configuration error; its supervisor then
  stops every worker) and says why. Until resharding exists, a changed count is never guessed.
* ``durable``: always true here; READY says it. A worker ``--in-memory`` writes no manifest
  (it writes nothing: its data directory only holds the keys), but it refuses to start on a
  directory holding a durable cluster's data (:func:`durable_data`): the broker's refusal
  works only while it knows a durable worker of the cluster, and on a full restart the
  workers in memory took every shard with 0 keys. A durable worker may later start on a
  directory an in-memory cluster used: it finds no manifest and makes one.

A directory written by an earlier version (shard directories, no manifest) is given a manifest
with a new cluster id, and takes the first ASSIGN's count unless it holds a shard directory at
or above that count (which proves the count was larger). docs/persistence.md, section 2.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers import aof

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest"
FORMAT = 1
MAX_MANIFEST_BYTES = 4096  # a manifest is about 80 bytes; a larger file is not ours: refused
LOCK_TIMEOUT_S = 2.0  # waiting for another process creating the manifest (microseconds of work)
_LOCK_POLL_S = 0.005
_SHARD_DIR = re.compile(r"shard-(\d{1,9})")


class ManifestError(Exception):
    """The data directory cannot be used by this worker: the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a data directory's manifest says.

    Attributes:
        cluster: the cluster id, never 0.
        shards: the shard count, None until the first ASSIGN.
        durable: always True for a manifest on disk.
    """

    cluster: int
    shards: int | None
    durable: bool = True

    def encode(self) -> bytes:
        body = {
            "format": FORMAT,
            "cluster": f"{self.cluster:016x}",
            "shards": self.shards,
            "durable": self.durable,
        }
        return (json.dumps(body) + "\n").encode()


def parse(path: Path, data: bytes) -> Manifest:
    """A manifest's bytes, checked field by field (the file may be damaged or not ours).

    Raises:
        ManifestError: it is not a manifest this version reads.
    """

    def bad(why: str) -> ManifestError:
        return ManifestError(
            f"manifest {path} is unreadable ({why}): it names the cluster and shard count this "
            f"data directory belongs to, so no shard is served from it. Restore it from a "
            f"backup, or move it away only if this directory is known to be this cluster's"
        )

    if len(data) > MAX_MANIFEST_BYTES:
        raise bad(f"{len(data)} bytes, a manifest has at most {MAX_MANIFEST_BYTES}")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise bad(f"not a format-{FORMAT} manifest")
    cluster = body.get("cluster")
    if not isinstance(cluster, str) or not re.fullmatch(r"[0-9a-f]{16}", cluster):
        raise bad("cluster is not 16 hex digits")
    shards = body.get("shards")
    if shards is not None and (type(shards) is not int or not 1 <= shards <= 0xFFFF_FFFF):
        raise bad("shards is not a count")
    if body.get("durable") is not True or int(cluster, 16) == 0:
        raise bad("not a durable cluster's manifest")
    return Manifest(int(cluster, 16), shards)


def open_manifest(data_dir: Path, fsync: Callable[[int], None] = os.fsync) -> Manifest:
    """The directory's manifest, created (with a new cluster id) if it has none.

    Raises:
        ManifestError: it is unreadable, or the directory's lock stayed held.
        OSError: the directory cannot be read or written (disk full, permissions).
    """
    path = data_dir / MANIFEST_NAME
    data_dir.mkdir(parents=True, exist_ok=True)
    with _DirLock(data_dir):
        try:
            return parse(path, path.read_bytes())
        except FileNotFoundError:
            pass
        manifest = Manifest(_new_cluster_id(), None)
        _write(data_dir, manifest, fsync)
        earlier = sorted(p.name for p in data_dir.iterdir() if _SHARD_DIR.fullmatch(p.name))
        log.info(
            "data directory %s: new cluster id %016x%s",
            data_dir,
            manifest.cluster,
            f" (shard directories of an earlier version found: {', '.join(earlier)})"
            if earlier
            else "",
        )
        return manifest


def durable_data(data_dir: Path) -> str | None:
    """Why a worker ``--in-memory`` must not use ``data_dir``, or None if it may.

    A directory holding a manifest (readable or not) or shard directories holds a durable
    cluster's data: serving its shards from memory would answer every key "not found" until
    the next durable start. Only names are looked at, so this is cheap and never fails on a
    damaged file (an unreadable directory counts as empty: nothing there to protect from us).
    """
    try:
        names = sorted(p.name for p in data_dir.iterdir())
    except OSError:
        return None
    shards = [name for name in names if _SHARD_DIR.fullmatch(name)]
    if MANIFEST_NAME not in names and not shards:
        return None
    found = f"manifest {data_dir / MANIFEST_NAME}" if MANIFEST_NAME in names else ", ".join(shards)
    return (
        f"data directory {data_dir} holds a durable cluster's data ({found}): an --in-memory "
        f"worker would serve it empty; use another --data-dir (ZKV_DATA_DIR) for a cache, or "
        f"drop --in-memory (ZKV_IN_MEMORY)"
    )


def bind_shards(
    data_dir: Path, manifest: Manifest, shards: int, fsync: Callable[[int], None] = os.fsync
) -> Manifest:
    """Check the broker's shard count against the directory's; record it the first time.

    Returns:
        The manifest, with ``shards`` set.

    Raises:
        ManifestError: the counts differ: serving would look for keys in the wrong shards.
        OSError: the manifest could not be written.
    """
    path = data_dir / MANIFEST_NAME
    if manifest.shards == shards:
        return manifest
    with _DirLock(data_dir):
        current = parse(path, path.read_bytes())  # another process may have bound it since
        if current.cluster != manifest.cluster:
            raise ManifestError(
                f"manifest {path} changed under this worker (cluster {current.cluster:016x}, "
                f"was {manifest.cluster:016x}): restart it"
            )
        if current.shards is None:
            numbers = [
                int(m.group(1)) for p in data_dir.iterdir() if (m := _SHARD_DIR.fullmatch(p.name))
            ]
            beyond = [n for n in numbers if n >= shards]
            if beyond:
                raise ManifestError(
                    f"data directory {data_dir} holds shard-{max(beyond)}, so it was written "
                    f"with more than the {shards} shards the broker runs (ZKV_SHARDS): refusing "
                    f"to serve from it (keys would be looked for in the wrong shards). Start "
                    f"the broker with the count this directory was written with"
                )
            current = Manifest(current.cluster, shards)
            _write(data_dir, current, fsync)
            log.info("data directory %s: bound to %d shards", data_dir, shards)
            return current
        if current.shards != shards:
            raise ManifestError(
                f"data directory {data_dir} holds a cluster of {current.shards} shards "
                f"(manifest {path}), but the broker runs {shards} (ZKV_SHARDS): refusing to "
                f"serve from it, since keys would be looked for in the wrong shards. Start the "
                f"broker with --shards {current.shards}; changing the shard count of a cluster "
                f"that holds data (resharding) is not supported"
            )
        return current


def bind_cluster(
    data_dir: Path,
    manifest: Manifest,
    cluster: int,
    shards: int,
    fsync: Callable[[int], None] = os.fsync,
) -> Manifest:
    """Cluster mode: tie the directory to the cluster etcd names (its ``cluster_id``), then
    check the shard count as :func:`bind_shards` does.

    A directory that holds no shard yet (a new one, or one whose manifest was just made)
    adopts the cluster's id; one that holds shard data of another cluster is refused, since
    serving from it would mix two clusters' data (and a follower of this cluster must not
    start from it either).

    Raises:
        ManifestError: the directory belongs to another cluster, or the counts differ.
    """
    path = data_dir / MANIFEST_NAME
    if manifest.cluster != cluster:
        with _DirLock(data_dir):
            current = parse(path, path.read_bytes())
            if current.cluster != cluster:
                held = sorted(p.name for p in data_dir.iterdir() if _SHARD_DIR.fullmatch(p.name))
                if held:
                    raise ManifestError(
                        f"data directory {data_dir} holds data of cluster {current.cluster:016x} "
                        f"({', '.join(held[:4])}), but the coordinator's cluster is "
                        f"{cluster:016x}: refusing to start (give this worker an empty "
                        f"--data-dir, or the coordinator of the cluster this data belongs to)"
                    )
                current = Manifest(cluster, current.shards)
                _write(data_dir, current, fsync)
                log.info("data directory %s: joined cluster %016x", data_dir, cluster)
        manifest = current
    return bind_shards(data_dir, manifest, shards, fsync)


def _new_cluster_id() -> int:
    while True:
        cluster = secrets.randbits(64)
        if cluster:
            return cluster


def _write(data_dir: Path, manifest: Manifest, fsync: Callable[[int], None]) -> None:
    """Replace the manifest atomically and durably: a temporary file, fsync, rename, fsync dir."""
    path = data_dir / MANIFEST_NAME
    scratch = data_dir / f"{MANIFEST_NAME}.tmp-{os.getpid()}"
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        aof.write_all(fd, manifest.encode())
        fsync(fd)
    except BaseException:
        os.close(fd)
        scratch.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(scratch, path)
    aof.fsync_dir(data_dir, fsync)


class _DirLock:
    """flock on the data directory itself, so processes started together draw one cluster id.
    Polled with LOCK_NB up to LOCK_TIMEOUT_S: never blocks forever."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self._fd = -1

    def __enter__(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ManifestError(
                        f"data directory {self._dir} stayed locked for {LOCK_TIMEOUT_S} s "
                        f"(another process is stopped while creating its manifest?)"
                    ) from None
                time.sleep(_LOCK_POLL_S)
        self._fd = fd

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing drops the lock
