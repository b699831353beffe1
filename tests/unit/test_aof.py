"""The append-only log: record round trips, torn tails, corruption, and the fsync policies."""

from __future__ import annotations

import random
import struct
import zlib
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
    MemosRecord,
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
    MemosRecord((aof.MEMOS_ENTRY.pack(6, 1, 0x02, 0, 7, 0xFFFFFFFF) + b"k",)),
    MemosRecord(
        (
            aof.MEMOS_ENTRY.pack(7, 0, 0x03, 0, 0, 0),
            aof.MEMOS_ENTRY.pack(0, 65_535, 0x02, 0, 2**64 - 1, 1) + b"\x00" * 65_535,
            aof.MEMOS_ENTRY.pack(2**64 - 1, 3, 0x02, 0, 1, 2) + b"key",
        )
    ),
    aof.TimeRecord(1_700_000_000_000),
    aof.TimeRecord(2**64 - 1),
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


def memos_entry(request_id: int, key: bytes, deadline_ms: int = 0) -> bytes:
    fingerprint = request_id & 0xFFFF
    return aof.MEMOS_ENTRY.pack(request_id, len(key), 0x02, 0, deadline_ms, fingerprint) + key


def test_encode_memos_puts_every_entry_in_order_a_few_hundred_to_a_record() -> None:
    entries: list[bytes | tuple[bytes, bytes]] = [
        memos_entry(i + 1, b"k%d" % i) for i in range(1300)
    ]
    # The idempotency memory keeps a long key beside its head: a tuple, not one bytes.
    long_entry = memos_entry(501, b"L" * 300)
    entries[500] = (long_entry[: aof.MEMOS_ENTRY.size], b"L" * 300)
    records = list(aof.encode_memos(entries))
    assert len(records) == 3  # 512 + 512 + 276
    parsed: list[bytes] = []
    for data in records:
        record, end = aof.parse_at(memoryview(data), 0)  # type: ignore[misc]
        assert isinstance(record, MemosRecord) and end == len(data)
        assert len(record.entries) <= aof.MEMOS_PER_RECORD
        parsed.extend(record.entries)
    assert parsed == [e if isinstance(e, bytes) else e[0] + e[1] for e in entries]
    assert parsed[500] == long_entry
    assert list(aof.encode_memos([])) == []


def test_memos_record_reads_back_as_memo_records() -> None:
    deleted = aof.MEMOS_ENTRY.pack(10, 0, 0x03, 0, 0, 0)
    record = MemosRecord((memos_entry(9, b"abc", 1_700_000_000_000), deleted))
    assert record.memos() == [
        MemoRecord(9, 0x02, 0, 1_700_000_000_000, 9, b"abc"),
        MemoRecord(10, 0x03, 0, None, 0, b""),
    ]


def framed(body: bytes) -> bytes:
    """A record with a correct length and CRC around any body."""
    crc = zlib.crc32(body, zlib.crc32(struct.pack("!I", len(body))))
    return struct.pack("!II", len(body), crc) + body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x04\x00\x00", "MEMOS record too short"),
        (b"\x04" + struct.pack("!I", 2) + struct.pack("!QH", 1, 0) + bytes(14), "entry 1 of 2"),
        (b"\x04" + struct.pack("!I", 1) + struct.pack("!QH", 1, 5) + bytes(16), "entry 0 of 1"),
        (b"\x04" + struct.pack("!I", 1) + struct.pack("!QH", 1, 0) + bytes(15), "1 bytes after"),
        (b"\x04" + struct.pack("!I", 1) + bytes(23), "entry 0 of 1"),
        (b"\x04" + struct.pack("!I", 0) + b"x", "1 bytes after its 0 entries"),
    ],
)
def test_a_memos_record_that_does_not_add_up_is_refused_by_name(body: bytes, reason: str) -> None:
    parsed = aof.parse_at(memoryview(framed(body)), 0)
    assert isinstance(parsed, str) and reason in parsed


def test_random_memos_bodies_with_valid_checksums_never_raise() -> None:
    rng = random.Random(4)
    good = aof.encode(RECORDS[8])[aof.PREFIX_BYTES :]
    accepted = 0
    for _ in range(3000):
        body = bytearray(good)
        mode = rng.randrange(3)
        if mode == 0:  # bytes changed in place: valid unless a count or key length is hit
            for _ in range(rng.randrange(1, 4)):
                body[rng.randrange(1, len(body))] = rng.randrange(256)
        elif mode == 1:  # cut short
            del body[rng.randrange(1, len(body)) :]
        else:  # bytes added
            body += rng.randbytes(rng.randrange(1, 40))
        parsed = aof.parse_at(memoryview(framed(bytes(body))), 0)
        if not isinstance(parsed, str):
            record, _ = parsed
            assert isinstance(record, MemosRecord)
            assert aof.encode(record) == framed(bytes(body))  # what parses re-encodes the same
            accepted += 1
    assert 0 < accepted < 3000


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


def test_a_torn_last_record_whose_value_holds_a_record_is_a_torn_tail(tmp_path: Path) -> None:
    # Issue 10, item 11: the value of the torn SET holds the bytes of a valid record (a value
    # that is a log, say); the scan must not take that "record" for a successor of the damage.
    path = tmp_path / "log"
    inner = aof.encode(SetRecord(9, b"inner", b"x" * 40, None))
    records = [SetRecord(1, b"a", b"1", None), SetRecord(2, b"b", b"<" + inner + b">" * 500, None)]
    offsets = write_log(path, records)
    full = path.read_bytes()
    inner_end = full.index(inner) + len(inner)
    for cut in (inner_end, inner_end + 1, inner_end + 100, len(full) - 1):
        path.write_bytes(full[:cut])
        found, reader = read_all(path)
        assert found == records[:1], cut
        assert reader.damage is not None and reader.damage.torn, cut
        assert reader.valid_end == offsets[1], cut


def test_a_record_inside_a_damaged_length_still_shows_corruption(tmp_path: Path) -> None:
    # The other side of the rule above: a length made longer by a flipped bit, still inside
    # the file, hides the next record in the declared extent; the bad record's checksum with
    # the length that ends it there tells that only the length was damaged.
    path = tmp_path / "log"
    records = [SetRecord(1, b"a", b"1", None), SetRecord(2, b"b", b"22", None), *RECORDS]
    offsets = write_log(path, records)
    data = bytearray(path.read_bytes())
    length = struct.unpack_from("!I", data, offsets[1])[0]
    struct.pack_into("!I", data, offsets[1], length + 64)
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


def test_new_logs_say_version_4_and_version_1_to_3_logs_are_read(tmp_path: Path) -> None:
    path = tmp_path / "log"
    aof.create_log(path)
    assert path.read_bytes() == b"ZKVLOG4\n" == MAGIC
    for magic in (aof.MAGIC_V1, aof.MAGIC_V2, aof.MAGIC_V3):
        path.write_bytes(magic + aof.encode(RECORDS[0]))
        assert read_all(path)[0] == [RECORDS[0]]


def test_setv_delv_and_version_records_round_trip(tmp_path: Path) -> None:
    """Issue 12: the versioned records read back as written, with their versions, and old SET
    and DEL records still read with version 0; each record type is its own byte."""
    path = tmp_path / "log"
    records = [
        SetRecord(5, b"k", b"v", 1_700_000_000_000, 1_700_000_000_000_001),
        SetRecord(0, b"\x00lock\x00n", bytes(17), None, 2**53 - 1),
        DelRecord(6, b"k", 1_700_000_000_000_002),
        aof.VersionRecord(1_700_000_000_000_003),
        SetRecord(7, b"old", b"v", None),
        DelRecord(8, b"old"),
    ]
    write_log(path, records)
    assert read_all(path)[0] == records
    assert aof.encode(records[0])[8] == aof.RecordType.SETV
    assert aof.encode(records[2])[8] == aof.RecordType.DELV
    assert aof.encode(records[3])[8] == aof.RecordType.VERSION
    assert aof.encode(records[4])[8] == aof.RecordType.SET
    assert aof.encode_setv(5, b"k", b"v", 1_700_000_000_000, 1_700_000_000_000_001) == (
        aof.encode(records[0])
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (struct.pack("!BQQQ", 0x06, 1, 0, 1), "SETV record too short"),
        (struct.pack("!BQQQI", 0x06, 1, 0, 1, 9) + b"k", "SETV record key runs past its end"),
        (struct.pack("!BQ", 0x07, 1), "DELV record too short"),
        (struct.pack("!BQB", 0x08, 1, 0), "VERSION record of the wrong size"),
    ],
)
def test_malformed_versioned_records_are_reported_not_trusted(body: bytes, reason: str) -> None:
    crc = zlib.crc32(body, zlib.crc32(struct.pack("!I", len(body))))
    record = struct.pack("!II", len(body), crc)
    assert aof.parse_at(memoryview(MAGIC + record + body), len(MAGIC)) == reason


def test_a_log_of_another_version_is_refused_as_such_not_as_damage(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"ZKVLOG9\n" + aof.encode(RECORDS[0]))
    with LogReader(path) as reader, pytest.raises(CorruptLog) as caught:
        list(reader.records())
    assert caught.value.offset == 0 and "another version" in caught.value.reason
    assert "run the zkv version that wrote it" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x7f" + bytes(20), "record type 0x7f is unknown to this version"),
        (  # a SET whose key is longer than the wire allows
            struct.pack("!BQQI", 0x01, 1, 0, 70_000) + bytes(70_000) + b"v",
            "a key of 70000 bytes",
        ),
        (struct.pack("!BQ", 0x02, 1) + bytes(70_000), "a key of 70000 bytes"),  # a DEL's
        (b"\x04" + struct.pack("!I", 2) + struct.pack("!QH", 1, 0) + bytes(14), "entry 1 of 2"),
    ],
    ids=["unknown type", "SET key too long", "DEL key too long", "MEMOS short of entries"],
)
def test_an_intact_record_this_version_cannot_read_is_never_a_torn_tail(
    tmp_path: Path, body: bytes, reason: str
) -> None:
    # Its checksum matches, so no crash cut it short: last in the file or not, the log is
    # refused whole (a newer version's record, or a writer's bug), never truncated.
    path = tmp_path / "log"
    data = MAGIC + aof.encode(RECORDS[0]) + framed(body)
    path.write_bytes(data)
    with LogReader(path) as reader, pytest.raises(CorruptLog) as caught:
        list(reader.records())
    assert reason in caught.value.reason
    assert isinstance(caught.value.reason, aof.Unreadable)
    assert caught.value.offset == len(MAGIC) + len(aof.encode(RECORDS[0]))
    assert "checksums match" in str(caught.value)
    assert path.read_bytes() == data
    # The same bytes with a wrong checksum are a torn tail, as any damage at the end is.
    torn = bytearray(data)
    torn[-1] ^= 0xFF
    path.write_bytes(bytes(torn))
    records, reader = read_all(path)
    assert records == [RECORDS[0]] and reader.damage is not None and reader.damage.torn


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
