"""The append-only log: record round trips, torn tails, corruption, and the fsync policies."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from workers import aof
from workers.aof import (
    MAGIC,
    AppendLog,
    CorruptLog,
    DelRecord,
    FsyncPolicy,
    LogReader,
    MemoRecord,
    SetRecord,
)

pytestmark = pytest.mark.unit

RECORDS: list[aof.Record] = [
    SetRecord(1, b"k", b"v", 1_700_000_000_123),
    SetRecord(2**64 - 1, b"key", b"", None),
    SetRecord(0, b"\x00" * 300, b"\xff" * 70_000, 5),
    DelRecord(3, b"k"),
    DelRecord(0, b"\x00"),
    MemoRecord(4, 0x02, 0, 1_700_000_000_999, 0xDEADBEEF, b"k"),
    MemoRecord(5, 0x03, 0, None, 0, b"gone"),
]


def write_log(path: Path, records: list[aof.Record]) -> list[int]:
    """A log file holding ``records``; returns each record's start offset."""
    offsets = []
    data = bytearray(MAGIC)
    for record in records:
        offsets.append(len(data))
        data += aof.encode(record)
    path.write_bytes(bytes(data))
    return offsets


def read_all(path: Path) -> tuple[list[aof.Record], LogReader]:
    with LogReader(path) as reader:
        return [record for _, record in reader.records()], reader


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips(record: aof.Record) -> None:
    data = aof.encode(record)
    parsed = aof.parse_at(memoryview(b"xx" + data), 2)
    assert parsed == (record, 2 + len(data))


def test_record_layout_is_length_crc_body() -> None:
    data = aof.encode_del(7, b"k")
    length, crc = struct.unpack_from("!II", data)
    body = data[8:]
    assert length == len(body) == 10
    assert body == bytes([0x02]) + (7).to_bytes(8, "big") + b"k"
    import zlib

    assert crc == zlib.crc32(data[:4] + body)


@pytest.mark.parametrize("value_bytes", [0, 16, 5000])
def test_set_records_carry_the_crc_of_length_and_body(value_bytes: int) -> None:
    # encode_set takes the CRC of the four length bytes from a cache: the same bytes as
    # computing it over length and body in one go, for a first length and a repeated one.
    for request_id in (1, 2**64 - 1):
        data = aof.encode_set(request_id, b"key", b"v" * value_bytes, 1_700_000_000_123)
        length, crc = struct.unpack_from("!II", data)
        assert length == len(data) - 8 == 21 + 3 + value_bytes
        import zlib

        assert crc == zlib.crc32(data[:4] + data[8:])
        assert aof.parse_at(memoryview(data), 0) == (
            aof.SetRecord(request_id, b"key", b"v" * value_bytes, 1_700_000_000_123),
            len(data),
        )


def test_a_log_reads_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log"
    offsets = write_log(path, RECORDS)
    with LogReader(path) as reader:
        found = list(reader.records())
        assert reader.damage is None
        assert reader.valid_end == path.stat().st_size
    assert found == list(zip(offsets, RECORDS, strict=True))


def test_an_empty_log_is_just_the_magic(tmp_path: Path) -> None:
    path = tmp_path / "log"
    aof.create_log(path)
    assert path.read_bytes() == MAGIC
    aof.create_log(path)  # never overwrites
    records, reader = read_all(path)
    assert (records, reader.damage) == ([], None)


def test_torn_last_record_at_every_byte_offset_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "log"
    records = [SetRecord(1, b"a", b"1", None), SetRecord(2, b"b", b"22", 9), DelRecord(3, b"a")]
    write_log(path, records)
    full = path.read_bytes()
    last_start = len(full) - len(aof.encode(records[-1]))
    for cut in range(last_start + 1, len(full)):
        path.write_bytes(full[:cut])
        found, reader = read_all(path)
        assert found == records[:-1], cut
        assert reader.damage is not None and reader.damage.torn, cut
        assert (reader.damage.offset, reader.valid_end) == (last_start, last_start), cut


def test_bad_checksum_in_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "log"
    offsets = write_log(path, RECORDS[:3])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    found, reader = read_all(path)
    assert found == RECORDS[:2]
    assert reader.damage == aof.Damage(offsets[2], "checksum mismatch", torn=True)


def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path: Path) -> None:
    # What a power cut can leave on some filesystems: the size grew, the data did not land.
    path = tmp_path / "log"
    write_log(path, RECORDS[:2])
    valid = path.stat().st_size
    with open(path, "ab") as file:
        file.write(bytes(5000))
    found, reader = read_all(path)
    assert found == RECORDS[:2]
    assert reader.damage is not None and reader.damage.torn
    assert reader.valid_end == valid


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        pytest.param(20, "checksum mismatch", id="body-byte"),
        pytest.param(5, "checksum mismatch", id="crc-byte"),
        pytest.param(0, "exceeds the largest possible", id="length-high-byte"),
        pytest.param(3, "checksum mismatch", id="length-low-byte"),
    ],
)
def test_damage_before_valid_records_is_refused_with_its_offset(
    tmp_path: Path, where: int, reason: str
) -> None:
    path = tmp_path / "log"
    offsets = write_log(path, RECORDS)
    data = bytearray(path.read_bytes())
    bad = offsets[1]
    data[bad + where] ^= 0x40 if where else 0xFF
    path.write_bytes(bytes(data))
    with LogReader(path) as reader, pytest.raises(CorruptLog) as caught:
        list(reader.records())
    error = caught.value
    assert (error.path, error.offset) == (str(path), bad)
    message = str(error)
    assert f"at byte {bad}" in message
    assert f"python -m workers.repair {path}" in message
    if where != 3:  # a smaller length makes the body short: any reason will do there
        assert reason in error.reason


def test_a_length_pointing_past_the_end_is_corruption_if_records_follow(tmp_path: Path) -> None:
    # A flipped bit in a length field makes a record in the middle look torn; the scan for a
    # valid record after it tells the difference.
    path = tmp_path / "log"
    offsets = write_log(path, RECORDS)
    data = bytearray(path.read_bytes())
    struct.pack_into("!I", data, offsets[1], len(data))  # plausible, but past the end
    path.write_bytes(bytes(data))
    with LogReader(path) as reader, pytest.raises(CorruptLog) as caught:
        list(reader.records())
    assert caught.value.offset == offsets[1]


def test_a_file_that_is_not_a_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"hello, I am a text file\n")
    with LogReader(path) as reader, pytest.raises(CorruptLog) as caught:
        list(reader.records())
    assert caught.value.offset == 0
    assert "not a zkv log" in caught.value.reason


@pytest.mark.parametrize("length", range(len(MAGIC)))
def test_a_cut_short_magic_is_a_torn_tail(tmp_path: Path, length: int) -> None:
    path = tmp_path / "log"
    path.write_bytes(MAGIC[:length])
    found, reader = read_all(path)
    assert found == []
    assert reader.damage is not None and reader.damage.torn and reader.valid_end == 0


# --- AppendLog and the fsync policies ---------------------------------------------------------


class FsyncCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1


class FakeSeconds:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_log(tmp_path: Path, policy: FsyncPolicy) -> tuple[AppendLog, FsyncCounter, FakeSeconds]:
    path = tmp_path / "log"
    aof.create_log(path)
    fsync = FsyncCounter()
    seconds = FakeSeconds()
    return AppendLog(path, policy, fsync, seconds), fsync, seconds


def test_always_fsyncs_once_per_batch_that_wrote(tmp_path: Path) -> None:
    log, fsync, _ = open_log(tmp_path, FsyncPolicy.ALWAYS)
    log.append(b"".join(aof.encode_del(i, b"k") for i in range(50)))
    log.commit()
    assert fsync.calls == 1
    log.commit()  # a batch that wrote nothing (reads only)
    assert fsync.calls == 1
    log.tick()
    assert fsync.calls == 1
    log.close()
    assert fsync.calls == 1  # nothing dirty at close


def test_no_never_fsyncs_until_close(tmp_path: Path) -> None:
    log, fsync, seconds = open_log(tmp_path, FsyncPolicy.NO)
    for _ in range(10):
        log.append(aof.encode_del(1, b"k"))
        log.commit()
        seconds.now += 5
        log.tick()
    assert fsync.calls == 0
    log.close()
    assert fsync.calls == 1  # a clean stop leaves everything on disk


def test_everysec_fsyncs_at_most_once_a_second_and_only_when_dirty(tmp_path: Path) -> None:
    log, fsync, seconds = open_log(tmp_path, FsyncPolicy.EVERYSEC)
    log.append(aof.encode_del(1, b"k"))
    log.commit()
    log.tick()
    assert fsync.calls == 0  # less than a second since the last sync
    seconds.now += 0.5
    log.append(aof.encode_del(2, b"k"))
    log.tick()
    assert fsync.calls == 0
    seconds.now += 0.5
    log.tick()
    assert fsync.calls == 1
    log.tick()
    seconds.now += 3
    log.tick()
    assert fsync.calls == 1  # nothing new to sync
    log.append(aof.encode_del(3, b"k"))
    log.tick()
    assert fsync.calls == 2  # dirty and more than a second since the last sync


def test_appends_land_at_the_end_and_are_counted(tmp_path: Path) -> None:
    log, _, _ = open_log(tmp_path, FsyncPolicy.ALWAYS)
    records = [aof.encode(r) for r in RECORDS]
    log.append(b"".join(records))
    assert log.size == len(MAGIC) + sum(map(len, records))
    log.close()
    found, _ = read_all(tmp_path / "log")
    assert found == RECORDS


def test_a_failed_fsync_is_a_durability_error(tmp_path: Path) -> None:
    path = tmp_path / "log"
    aof.create_log(path)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    log = AppendLog(path, FsyncPolicy.ALWAYS, failing)
    log.append(aof.encode_del(1, b"k"))
    with pytest.raises(aof.DurabilityError, match="Input/output error"):
        log.commit()
    log.close(sync=False)


def test_the_example_in_docs_persistence_md() -> None:
    assert aof.encode_del(7, b"k").hex() == "0000000aa2c0df690200000000000000076b"
