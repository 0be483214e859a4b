"""Capture files: pcap and pcapng -> packet index (offsets into one memory map).

Stage: input of `PcapSource`. In: a file path. Out: `PacketIndex`, the whole file as one read-only
numpy byte array plus, per packet, the offset of its data, its captured and wire lengths, its time
in µs since the epoch and its link type. Nothing is copied per packet: the decoders gather what
they need from the map with fancy indexing.

Formats: libpcap (magic a1b2c3d4 µs / a1b23c4d ns, either byte order; see
draft-ietf-opsawg-pcap) and pcapng (draft-ietf-opsawg-pcapng: Section Header, Interface
Description with `if_tsresol`, Enhanced / Simple / obsolete Packet blocks; other blocks skipped).
A file that is neither, or that is cut or corrupt, raises `CaptureError` naming the file and the
byte offset of the bad header.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from eastwest.errors import CaptureError

LINKTYPE_ETHERNET = 1
MAX_RECORD = 256 * 1024  # larger than any snap length tcpdump or dumpcap writes

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1), b"\xa1\xb2\xc3\xd4": (">", 1),
    b"\x4d\x3c\xb2\xa1": ("<", 1000), b"\xa1\xb2\x3c\x4d": (">", 1000),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"


@dataclass
class PacketIndex:
    buf: np.ndarray        # uint8 view of the whole file
    off: np.ndarray        # int64 offset of each packet's first byte
    cap: np.ndarray        # int64 captured length
    wirelen: np.ndarray    # int64 length on the wire
    ts_us: np.ndarray      # int64 µs since the epoch
    linktype: np.ndarray   # uint16

    def __len__(self) -> int:
        return len(self.off)


def read_index(path: str) -> PacketIndex:
    """Map `path` and index every packet; CaptureError names the file and offset when it is bad."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CaptureError(path, f"cannot open: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CaptureError(path, "empty file, not a pcap or pcapng capture", 0)
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    head = mm[:4]
    if head in _PCAP_MAGICS:
        return _read_pcap(path, mm, *_PCAP_MAGICS[head])
    if head == _PCAPNG_SHB:
        return _read_pcapng(path, mm)
    raise CaptureError(path, f"not a pcap or pcapng file (magic {head.hex()})", 0)


def _finish(mm: mmap.mmap, off: list[int], cap: list[int], wire: list[int], ts: list[int],
            link: list[int] | int) -> PacketIndex:
    n = len(off)
    links = (np.full(n, link, dtype=np.uint16) if isinstance(link, int)
             else np.asarray(link, dtype=np.uint16))
    return PacketIndex(np.frombuffer(mm, dtype=np.uint8), np.asarray(off, dtype=np.int64),
                       np.asarray(cap, dtype=np.int64), np.asarray(wire, dtype=np.int64),
                       np.asarray(ts, dtype=np.int64), links)


def _read_pcap(path: str, mm: mmap.mmap, endian: str, tick_ns: int) -> PacketIndex:
    size = len(mm)
    if size < 24:
        raise CaptureError(path, f"pcap global header cut short ({size} of 24 bytes)", 0)
    major, minor, _, _, _, link = struct.unpack_from(endian + "HHiIII", mm, 4)
    if major != 2:
        raise CaptureError(path, f"unsupported pcap version {major}.{minor}", 4)
    link &= 0xFFFF  # upper bits: FCS length flags
    rec = struct.Struct(endian + "IIII")
    unpack = rec.unpack_from
    off: list[int] = []
    cap: list[int] = []
    wire: list[int] = []
    ts: list[int] = []
    addo, addc, addw, addt = off.append, cap.append, wire.append, ts.append
    pos = 24
    nano = tick_ns == 1000  # ns files carry ns fractions; keep µs
    while pos + 16 <= size:
        sec, frac, incl, orig = unpack(mm, pos)
        if incl > MAX_RECORD:
            raise CaptureError(path, f"corrupt pcap record header: captured length {incl} > "
                               f"{MAX_RECORD}", pos)
        data = pos + 16
        pos = data + incl
        if pos > size:
            raise CaptureError(path, f"pcap record cut short: needs {incl} bytes, file has "
                               f"{size - data}", data - 16)
        addo(data)
        addc(incl)
        addw(orig)
        addt(sec * 1_000_000 + (frac // 1000 if nano else frac))
    if pos != size:
        raise CaptureError(path, f"pcap record header cut short ({size - pos} of 16 bytes)", pos)
    return _finish(mm, off, cap, wire, ts, link)


def _read_pcapng(path: str, mm: mmap.mmap) -> PacketIndex:
    size = len(mm)
    off: list[int] = []
    cap: list[int] = []
    wire: list[int] = []
    ts: list[int] = []
    link: list[int] = []
    interfaces: list[tuple[int, int, int]] = []  # (linktype, ticks per second numerator, denom)
    endian = "<"
    pos = 0
    while pos < size:
        if pos + 12 > size:
            raise CaptureError(path, f"pcapng block header cut short ({size - pos} bytes)", pos)
        if mm[pos:pos + 4] == _PCAPNG_SHB:
            bom = mm[pos + 8:pos + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise CaptureError(path, f"pcapng byte-order magic is {bom.hex()}", pos + 8)
            interfaces = []
        btype, blen = struct.unpack_from(endian + "II", mm, pos)
        if blen < 12 or blen % 4 or pos + blen > size:
            raise CaptureError(path, f"corrupt pcapng block: type {btype:#x}, length {blen}", pos)
        body = pos + 8
        if btype == 1:  # Interface Description Block
            ltype = struct.unpack_from(endian + "H", mm, body)[0]
            interfaces.append((ltype, *_tsresol(mm, endian, body + 8, pos + blen - 4)))
        elif btype in (6, 2):  # Enhanced / obsolete Packet Block
            ifid, hi, lo, incl, orig = struct.unpack_from(endian + "IIIII", mm, body)
            if btype == 2:
                ifid &= 0xFFFF
            if ifid >= len(interfaces):
                raise CaptureError(path, f"packet names interface {ifid}, only "
                                   f"{len(interfaces)} described", pos)
            if body + 20 + incl > pos + blen - 4:
                raise CaptureError(path, f"packet block data ({incl} bytes) overruns its block",
                                   pos)
            ltype, per_s, _ = interfaces[ifid]
            ticks = (hi << 32) | lo
            off.append(body + 20)
            cap.append(incl)
            wire.append(orig)
            ts.append(ticks * 1_000_000 // per_s)
            link.append(ltype)
        elif btype == 3:  # Simple Packet Block: no time, first interface
            if not interfaces:
                raise CaptureError(path, "simple packet block before any interface", pos)
            orig = struct.unpack_from(endian + "I", mm, body)[0]
            off.append(body + 4)
            cap.append(min(orig, blen - 16))
            wire.append(orig)
            ts.append(0)
            link.append(interfaces[0][0])
        pos += blen
    return _finish(mm, off, cap, wire, ts, link)


def _tsresol(mm: mmap.mmap, endian: str, pos: int, end: int) -> tuple[int, int]:
    """Ticks per second from the if_tsresol option (code 9); default µs."""
    while pos + 4 <= end:
        code, length = struct.unpack_from(endian + "HH", mm, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:
            v = mm[pos + 4]
            return (2 ** (v & 0x7F) if v & 0x80 else 10 ** v), 1
        pos += 4 + (length + 3) // 4 * 4
    return 1_000_000, 1
