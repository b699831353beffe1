"""A cluster-mode worker's id: one that belongs to its data, so it outlives the process.

etcd's in-sync sets list the workers holding every acknowledged write of a shard, and only a
worker in that list may become the shard's leader. If the id were drawn per process, a
worker restarted on the same disk (after a crash, or every worker of a cluster after a power
cut) would no longer be in any list: its shards would stay without a leader for good. If the
id were per host, a worker started on a wiped disk would be taken for one holding data it
lacks, and could lead a shard from an empty log.

So the id is drawn once per data directory and *slot* and stored there, in
``<data-dir>/members/<slot>``: a process claims the lowest slot nobody holds (an flock on the
file, released by the kernel when the process dies, even by SIGKILL), so several worker
processes on one directory (``--processes``) get distinct ids, and a restarted one gets its
predecessor's back. A new or wiped directory draws new ids. The worker's id is
``<host-id>-<the stored id>``.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

MEMBERS_DIR = "members"
MAX_SLOTS = 64  # worker processes that may share one data directory in cluster mode
ID_HEX = 12
HOST_FILE = "host"


class MemberError(Exception):
    """No slot is free, or a member file is unreadable."""


class Member:
    """A claimed slot: its id, held for as long as this object is open.

    Args:
        data_dir: the worker's data directory.
        host: this worker's host id (``ZKV_HOST_ID``), recorded in ``members/host`` the first
            time: a directory is on one host, and two copies of a shard must never share one,
            so a worker started on the directory under another host id is refused (two
            processes with different ids on one directory defeated the placement rule).
    """

    def __init__(self, data_dir: Path, host: str | None = None) -> None:
        directory = data_dir / MEMBERS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        if host is not None:
            _check_host(directory / HOST_FILE, host)
        for slot in range(MAX_SLOTS):
            path = directory / str(slot)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                self.id = _read_or_draw(fd, path)
            except BaseException:
                os.close(fd)
                raise
            self.slot = slot
            self._fd: int | None = fd
            return
        raise MemberError(f"all {MAX_SLOTS} worker slots of {data_dir} are held by running workers")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_or_draw(fd: int, path: Path) -> str:
    data = os.pread(fd, 64, 0).strip()
    if data:
        text = data.decode("ascii", "replace")
        if len(text) != ID_HEX or any(c not in "0123456789abcdef" for c in text):
            raise MemberError(f"{path}: not a member id ({text[:20]!r}); remove it to draw anew")
        return text
    text = secrets.token_hex(ID_HEX // 2)
    os.pwrite(fd, text.encode() + b"\n", 0)
    os.fsync(fd)
    return text


def _check_host(path: Path, host: str) -> None:
    """Record ``host`` in ``path`` (first use), or refuse another one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        recorded = path.read_text(encoding="utf-8", errors="replace").strip()
        if recorded != host:
            raise MemberError(
                f"{path.parent.parent} belongs to host {recorded!r} (its {path}), not "
                f"{host!r}: a data directory is one host's disk (two copies of a shard must "
                f"never share one); give this worker its own --data-dir, or --host-id {recorded}"
            ) from None
        return
    try:
        os.write(fd, host.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
