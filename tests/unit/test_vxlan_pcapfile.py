"""Capture file reader: pcap (µs and ns, both byte orders), pcapng (if_tsresol), and errors
that name the file and the byte offset."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from collector.vxlan.pcapfile import read_index
from eastwest.errors import CaptureError

FRAME = bytes(range(60))


def pcap(endian: str, magic: int, frac: int) -> bytes:
    head = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
    return head + struct.pack(endian + "IIII", 1_700_000_000, frac, 60, 60) + FRAME


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcap_microseconds_and_nanoseconds(tmp_path: Path, endian: str) -> None:
    for magic, frac, want in ((0xA1B2C3D4, 250_000, 250_000), (0xA1B23C4D, 250_000_999, 250_000)):
        p = tmp_path / "x.pcap"
        p.write_bytes(pcap(endian, magic, frac))
        ix = read_index(str(p))
        assert ix.ts_us.tolist() == [1_700_000_000_000_000 + want]
        assert ix.buf[ix.off[0]:ix.off[0] + ix.cap[0]].tobytes() == FRAME


def block(btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def test_pcapng_with_nanosecond_resolution(tmp_path: Path) -> None:
    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = block(1, struct.pack("<HHI", 1, 0, 65535) + struct.pack("<HHB3x", 9, 1, 9)
                + struct.pack("<HH", 0, 0))
    ticks = 1_700_000_000_123_456_789
    epb = block(6, struct.pack("<IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, 60, 60) + FRAME)
    p = tmp_path / "x.pcapng"
    p.write_bytes(shb + idb + epb)
    ix = read_index(str(p))
    assert ix.ts_us.tolist() == [1_700_000_000_123_456]
    assert ix.linktype.tolist() == [1]
    assert ix.buf[ix.off[0]:ix.off[0] + 60].tobytes() == FRAME


def test_errors_name_file_and_offset(tmp_path: Path) -> None:
    p = tmp_path / "bad.pcap"
    data = pcap("<", 0xA1B2C3D4, 0)
    p.write_bytes(data[:24] + struct.pack("<IIII", 0, 0, 10_000_000, 60))
    with pytest.raises(CaptureError, match=r"bad.pcap at byte 24: corrupt pcap record header"):
        read_index(str(p))
    p.write_bytes(b"")
    with pytest.raises(CaptureError, match=r"at byte 0: empty file"):
        read_index(str(p))
    with pytest.raises(CaptureError, match=r"nope.pcap: cannot open"):
        read_index(str(tmp_path / "nope.pcap"))
