"""``python -m workers.repair <log>``: cut a damaged shard log at its first bad record.

A worker refuses to replay a log that is damaged before its end (see workers/aof.py, "torn tail
or corruption?"), because either choice it could make alone loses acknowledged writes silently.
This tool makes the choice explicit, as ``redis-check-aof --fix`` does:

1. it copies the log, byte for byte, to ``<log>.corrupt-<UTC timestamp>``, so nothing is lost
   for good and the damage can be studied;
2. it truncates the log at the first bad record, dropping that record and everything after it
   (records after a damaged one cannot be trusted to be complete in between: one of them could
   be a DEL whose loss brings a deleted value back, whatever we keep);
3. it prints what was dropped: the byte range, and every record still recognisable in it, so
   an operator knows which keys to check.

It takes the shard's owner lock while it works, so it never races a worker appending to the
same log, and it refuses to run if the lock stays busy. It also refuses a log whose first bad
record has a matching checksum (:class:`workers.aof.Unreadable`: a newer version's record
type, or a writer's bug), and a log of another format version: that is not damage, and the
version that wrote it reads it. Exit status: 0 if the log is (now)
sound, 1 if it could not be repaired, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from workers import aof
from workers.aof import MAGIC, DelRecord, LogReader, MemoRecord, MemosRecord, SetRecord
from workers.ownership import OwnerFile, OwnershipError
from workers.persist import TAKE_LOCK_TIMEOUT_S

EXIT_OK = 0
EXIT_FAILED = 1
SHOWN_RECORDS_MAX = 50  # dropped records printed one per line; the rest are only counted


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.repair",
        description="Keep a copy of a damaged zkv shard log, then truncate it at its first bad "
        "record, printing what was dropped.",
    )
    parser.add_argument("log", type=Path, help="the log file, e.g. data/shard-0/log")
    args = parser.parse_args(argv)
    path: Path = args.log
    if not path.is_file():
        print(f"error: {path} is not a file", file=sys.stderr)
        return EXIT_FAILED
    owner: OwnerFile | None = None
    owner_path = path.parent / "owner"
    try:
        if owner_path.exists():
            owner = OwnerFile(owner_path)
            owner.lock(TAKE_LOCK_TIMEOUT_S)
        return repair(path)
    except OwnershipError as exc:
        print(f"error: {exc}; is a worker using this shard?", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if owner is not None:
            owner.close()


def repair(path: Path) -> int:
    """Check ``path``; if damaged, back it up and truncate it (see the module docstring)."""
    with LogReader(path) as reader:
        records = 0
        try:
            for _ in reader.records():
                records += 1
        except aof.CorruptLog:
            pass  # reader.damage says where
        damage = reader.damage
        size = reader.size
    if damage is None:
        print(f"{path}: {records} records, {size} bytes, no damage found; nothing to do")
        return EXIT_OK
    if isinstance(damage.reason, aof.Unreadable):
        # Checksums match: a newer version's log (or a writer's bug), not a crash's damage.
        # Cutting it off would drop acknowledged writes that the right version reads.
        print(f"error: {path}: byte {damage.offset}: {damage.reason}", file=sys.stderr)
        print("  not damage (its checksums match): left as it is", file=sys.stderr)
        return EXIT_FAILED
    kind = "a torn last record" if damage.torn else "corruption with valid records after it"
    # The report is made first and printed after the repair: a reader that goes away (piped
    # to head) used to kill the tool with a broken pipe before the backup and the truncation.
    report = [
        f"{path}: {kind} at byte {damage.offset}: {damage.reason}",
        f"  kept: {records} valid records, bytes 0..{damage.offset}",
        f"  dropped: bytes {damage.offset}..{size} ({size - damage.offset} bytes)",
        *_describe_dropped(path, damage.offset),
    ]
    backup = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    shutil.copy2(path, backup)
    _fsync_path(backup)
    report.append(f"  original saved as {backup}")
    with open(path, "r+b") as file:
        file.truncate(damage.offset)
        if damage.offset < len(MAGIC):
            file.seek(0)
            file.truncate(0)
            file.write(MAGIC)  # a log that was nothing but a bad magic starts over, empty
        file.flush()
        os.fsync(file.fileno())
    aof.fsync_dir(path.parent)
    report.append(
        f"{path}: truncated to {max(damage.offset, len(MAGIC))} bytes; the shard can start"
    )
    try:
        print("\n".join(report))
        sys.stdout.flush()
    except BrokenPipeError:  # the repair is done; only its report had no reader
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _describe_dropped(path: Path, offset: int) -> list[str]:
    """Lines naming the records still recognisable in the dropped part (scanning byte by
    byte)."""
    lines: list[str] = []
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read()
    view = memoryview(data)
    shown = found = 0
    position = 1  # the bad record itself is not recognisable, by definition
    while position + aof.PREFIX_BYTES <= len(data):
        parsed = aof.parse_at(view, position)
        if isinstance(parsed, str):
            position += 1
            continue
        record, end = parsed
        found += 1
        if shown < SHOWN_RECORDS_MAX:
            lines.append(f"    at byte {offset + position}: {_describe(record)}")
            shown += 1
        position = end
    view.release()
    if found > shown:
        lines.append(f"    ... and {found - shown} more")
    lines.append(f"  recognisable records in the dropped part: {found}")
    return lines


def _describe(record: aof.Record) -> str:
    match record:
        case SetRecord(request_id, key, value, deadline_ms):
            expiry = "never expires" if deadline_ms is None else f"deadline {deadline_ms} ms"
            return f"SET {key!r} ({len(value)} value bytes, {expiry}, request {request_id})"
        case DelRecord(request_id, key):
            return f"DEL {key!r} (request {request_id})"
        case MemoRecord(request_id, kind, _, _, _, key):
            return f"MEMO of request {request_id} (kind {kind}, key {key!r})"
        case MemosRecord(entries):
            return f"MEMOS: {len(entries)} remembered request(s)"
    return repr(record)


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


if __name__ == "__main__":
    sys.exit(main())
