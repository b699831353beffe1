"""``python -m workers.repair``: keep a copy, cut at the first bad record, say what was dropped."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from workers import aof, repair
from workers.aof import MAGIC, DelRecord, SetRecord
from workers.persist import Durability
from workers.shard import take_shard

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RECORDS: list[aof.Record] = [
    SetRecord(1, b"alpha", b"1", None),
    SetRecord(2, b"beta", b"2", 1_700_000_005_000),
    DelRecord(3, b"alpha"),
    SetRecord(4, b"gamma", b"3", None),
]


def damaged_log(tmp_path: Path, flip_record: int) -> tuple[Path, list[int], bytes]:
    """A shard directory whose log has a flipped byte in record ``flip_record``."""
    shard_dir = tmp_path / "data" / "shard-0"
    shard_dir.mkdir(parents=True)
    path = shard_dir / "log"
    data = bytearray(MAGIC)
    offsets = []
    for record in RECORDS:
        offsets.append(len(data))
        data += aof.encode(record)
    data[offsets[flip_record] + 10] ^= 0x01
    path.write_bytes(bytes(data))
    return path, offsets, bytes(data)


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob("log.corrupt-*"))


def test_corruption_in_the_middle_is_cut_and_the_original_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, offsets, original = damaged_log(tmp_path, flip_record=1)
    assert repair.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"corruption with valid records after it at byte {offsets[1]}" in out
    assert f"dropped: bytes {offsets[1]}..{len(original)}" in out
    # What was lost, so an operator knows which keys to check:
    assert f"at byte {offsets[2]}: DEL b'alpha' (request 3)" in out
    assert "SET b'gamma'" in out
    assert "recognisable records in the dropped part: 2" in out
    (backup,) = backups(path)
    assert backup.read_bytes() == original
    assert path.read_bytes() == original[: offsets[1]]
    # The shard starts again, with what came before the damage.
    shard = take_shard(0, 1, None, Durability(tmp_path / "data"), FakeClock()).shard
    assert [e.key for e in shard.store.entries()] == [b"alpha"]
    shard.close()


def test_a_torn_tail_is_cut_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, offsets, original = damaged_log(tmp_path, flip_record=3)
    assert repair.main([str(path)]) == 0
    assert "a torn last record at byte" in capsys.readouterr().out
    assert path.read_bytes() == original[: offsets[3]]
    assert len(backups(path)) == 1


def test_a_sound_log_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log"
    path.write_bytes(MAGIC + b"".join(aof.encode(r) for r in RECORDS))
    before = path.read_bytes()
    assert repair.main([str(path)]) == 0
    assert "no damage found" in capsys.readouterr().out
    assert path.read_bytes() == before
    assert backups(path) == []


def test_a_file_that_is_not_a_log_becomes_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"not a log at all")
    assert repair.main([str(path)]) == 0
    assert path.read_bytes() == MAGIC
    assert backups(path)[0].read_bytes() == b"not a log at all"


def test_a_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert repair.main([str(tmp_path / "nope")]) == 1
    assert "is not a file" in capsys.readouterr().err


def test_the_command_line_entry_point(tmp_path: Path) -> None:
    path, offsets, _ = damaged_log(tmp_path, flip_record=2)
    result = subprocess.run(
        [sys.executable, "-m", "workers.repair", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert f"truncated to {offsets[2]} bytes" in result.stdout


def test_repair_refuses_an_intact_record_it_cannot_read(tmp_path: Path) -> None:
    # A newer version's record type with a matching checksum: not damage, and cutting it off
    # would drop what that version wrote.
    shard_dir = tmp_path / "data" / "shard-0"
    shard_dir.mkdir(parents=True)
    path = shard_dir / "log"
    body = b"\x7f" + bytes(12)
    crc = zlib.crc32(body, zlib.crc32(struct.pack("!I", len(body))))
    data = MAGIC + aof.encode(RECORDS[0]) + struct.pack("!II", len(body), crc) + body
    path.write_bytes(data)
    assert repair.main([str(path)]) == repair.EXIT_FAILED
    assert path.read_bytes() == data
    assert not list(shard_dir.glob("log.corrupt-*"))


def test_a_reader_that_goes_away_does_not_stop_the_repair(tmp_path: Path) -> None:
    # `python -m workers.repair LOG | head -1`: the report is printed after the backup and the
    # truncation; before, a closed pipe killed the tool first and left the log as it was.
    path, offsets, original = damaged_log(tmp_path, flip_record=1)
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads the report at all
    try:
        result = subprocess.run(
            [sys.executable, "-m", "workers.repair", str(path)],
            cwd=ROOT,
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    finally:
        os.close(writer)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == original[: offsets[1]]
    (backup,) = backups(path)
    assert backup.read_bytes() == original
