"""The ring buffer reader against a file laid out as the kernel maps a BPF ring buffer
(consumer page, producer page, data area twice in a row): committed records are handed over
in one buffer and released, a record still being written stops the read, a record that wraps
around the end arrives whole, foreign records are skipped and counted. No root, no bcc."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.probes.ring import BUSY_BIT, DISCARD_BIT, RingReader

PAGE = mmap.PAGESIZE
SIZE = 4096  # one page of data: small, so the tests wrap around quickly
RECORD = 24  # payload bytes of every record; 32 with the header


class FakeRing:
    """The kernel's side: a producer writing records into the file."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.prod = 0

    def write(self, payload: bytes, *, busy: bool = False, discard: bool = False,
              length: int | None = None) -> None:
        n = len(payload) if length is None else length
        header = n | (BUSY_BIT if busy else 0) | (DISCARD_BIT if discard else 0)
        record = struct.pack("=II", header, 0) + payload
        record += bytes(-len(record) % 8)
        for i, b in enumerate(record):  # the data area is mapped twice in a row
            off = (self.prod + i) % SIZE
            os.pwrite(self.fd, bytes([b]), 2 * PAGE + off)
            os.pwrite(self.fd, bytes([b]), 2 * PAGE + SIZE + off)
        self.prod += len(record)
        os.pwrite(self.fd, struct.pack("=Q", self.prod), PAGE)

    def commit_first_busy(self, at: int) -> None:
        os.pwrite(self.fd, struct.pack("=I", RECORD), 2 * PAGE + at % SIZE)
        os.pwrite(self.fd, struct.pack("=I", RECORD), 2 * PAGE + SIZE + at % SIZE)

    @property
    def consumer(self) -> int:
        return struct.unpack("=Q", os.pread(self.fd, 8, 0))[0]


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[tuple[FakeRing, RingReader]]:
    fake = FakeRing(tmp_path / "ring")
    reader = RingReader(fake.fd, SIZE, RECORD)
    yield fake, reader
    reader.close()
    os.close(fake.fd)


def payloads(buf: memoryview) -> list[bytes]:
    raw = bytes(buf)
    return [raw[i + 8:i + 8 + RECORD] for i in range(0, len(raw), 32)]


def rec(i: int) -> bytes:
    return bytes([i]) * RECORD


def test_committed_records_come_in_one_buffer_and_are_released(ring):
    fake, reader = ring
    assert reader.consume(payloads, []) == []
    for i in range(5):
        fake.write(rec(i))
    assert reader.consume(payloads, []) == [rec(i) for i in range(5)]
    assert fake.consumer == 5 * 32
    assert reader.consume(payloads, []) == []


def test_a_record_still_being_written_stops_the_read_until_it_is_committed(ring):
    fake, reader = ring
    fake.write(rec(1))
    at = fake.prod
    fake.write(rec(2), busy=True)
    fake.write(rec(3))
    assert reader.consume(payloads, []) == [rec(1)]
    assert reader.consume(payloads, []) == []  # the busy one is first now
    assert fake.consumer == 32
    fake.commit_first_busy(at)
    assert reader.consume(payloads, []) == [rec(2), rec(3)]


def test_records_wrap_around_the_end_of_the_ring(ring):
    fake, reader = ring
    n = 0
    for _ in range(3):  # 3 x 100 records of 32 bytes: 2.3 times around a 4 KiB ring
        for _ in range(100):
            fake.write(rec(n % 256))
            n += 1
        got = reader.consume(payloads, [])
        assert got == [rec(i % 256) for i in range(n - 100, n)]
    assert fake.consumer == n * 32 and fake.consumer > 2 * SIZE


def test_discarded_and_foreign_records_are_skipped_and_counted(ring):
    fake, reader = ring
    fake.write(rec(1), discard=True)
    fake.write(bytes(8))  # another size
    fake.write(rec(2))
    assert reader.consume(payloads, []) == []
    assert reader.skipped == 2
    assert reader.consume(payloads, []) == [rec(2)]
    assert fake.consumer == 32 + 16 + 32


def test_a_size_that_is_not_a_power_of_two_is_refused(tmp_path):
    fake = FakeRing(tmp_path / "ring")
    with pytest.raises(ValueError, match="3000"):
        RingReader(fake.fd, 3000, RECORD)
    os.close(fake.fd)
