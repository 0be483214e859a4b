"""Capture files: pcap and pcapng -> packet index (offsets into one memory map).

Stage: input of `PcapSource` (`--decoder scapy`, and files when the native helper is not built;
the native file path, `scan.py`, reads the file itself and shares `open_capture` and
`walk_error`). In: a file path. Out: `PacketIndex`, the whole file as one read-only numpy byte
array plus, per packet, the offset of its data, its captured and wire lengths, its time in µs
since the epoch and its link type. Nothing is copied per packet: the decoders gather what they
need from the map.

The record headers are walked by `ew_walk_index` (ewvxlan_walk.c) when the native helper is
built, else by the Python loops below: a pcap file is a linked list (each record's length gives
the next record's offset), so there is nothing to vectorize; C does it at memory speed.

Formats: libpcap (magic a1b2c3d4 µs / a1b23c4d ns, either byte order; see
draft-ietf-opsawg-pcap) and pcapng (draft-ietf-opsawg-pcapng: Section Header, Interface
Description with `if_tsresol`, Enhanced / Simple / obsolete Packet blocks; other blocks skipped).
A file that is neither, or that is cut or corrupt, raises `CaptureError` naming the file and the
byte offset of the bad header; both walkers give the same message (`walk_error`).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eastwest.errors import CaptureError

if TYPE_CHECKING:
    import numpy as np

LINKTYPE_ETHERNET = 1
MAX_RECORD = 256 * 1024  # larger than any snap length tcpdump or dumpcap writes
FMT_PCAP, FMT_PCAPNG = 1, 2
INT64_MAX = 2**63 - 1

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1), b"\xa1\xb2\xc3\xd4": (">", 1),
    b"\x4d\x3c\xb2\xa1": ("<", 1000), b"\xa1\xb2\x3c\x4d": (">", 1000),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"

# walk errors: the codes of ewvxlan.h (EW_E_*), with their messages
(E_PCAP_TOO_BIG, E_PCAP_CUT, E_PCAP_HDR_CUT, E_NG_HDR_CUT, E_NG_BOM, E_NG_BLOCK, E_NG_IFACE,
 E_NG_OVERRUN, E_NG_SPB_NO_IF, E_TIME, E_NOMEM, E_IO) = range(1, 13)
_MESSAGES = {
    E_PCAP_TOO_BIG: "corrupt pcap record header: captured length {a} > " + str(MAX_RECORD),
    E_PCAP_CUT: "pcap record cut short: needs {a} bytes, file has {b}",
    E_PCAP_HDR_CUT: "pcap record header cut short ({a} of 16 bytes)",
    E_NG_HDR_CUT: "pcapng block header cut short ({a} bytes)",
    E_NG_BOM: "pcapng byte-order magic is {a:08x}",
    E_NG_BLOCK: "corrupt pcapng block: type {a:#x}, length {b}",
    E_NG_IFACE: "packet names interface {a}, only {b} described",
    E_NG_OVERRUN: "packet block data ({a} bytes) overruns its block",
    E_NG_SPB_NO_IF: "simple packet block before any interface",
    E_TIME: "packet time out of range (if_tsresol too coarse for its ticks)",
    E_NOMEM: "out of memory for a record of {a} bytes",
    E_IO: "read failed (errno {a}; 0: the file shrank while it was read)",
}


def walk_error(path: str, code: int, offset: int, a: int = 0, b: int = 0) -> CaptureError:
    return CaptureError(path, _MESSAGES[code].format(a=a, b=b), offset)


@dataclass(frozen=True)
class Format:
    """What the first bytes of a capture say: how to walk the rest."""

    fmt: int            # FMT_PCAP or FMT_PCAPNG
    big: bool = False   # pcap: big-endian headers (pcapng: each section says)
    nano: bool = False  # pcap: ns fractions
    linktype: int = LINKTYPE_ETHERNET  # pcap: the file's link type
    start: int = 0      # offset of the first record / block


def open_capture(path: str) -> tuple[int, int, Format]:
    """Open `path` and read its first header: (fd, size, format); the caller closes fd.
    CaptureError names the file (and the offset) when it is not a capture we read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CaptureError(path, f"cannot open: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CaptureError(path, "empty file, not a pcap or pcapng capture", 0)
        head = os.pread(fd, 24, 0)
        if head[:4] == _PCAPNG_SHB:
            return fd, size, Format(FMT_PCAPNG)
        if head[:4] not in _PCAP_MAGICS:
            raise CaptureError(path, f"not a pcap or pcapng file (magic {head[:4].hex()})", 0)
        endian, tick_ns = _PCAP_MAGICS[head[:4]]
        if size < 24:
            raise CaptureError(path, f"pcap global header cut short ({size} of 24 bytes)", 0)
        major, minor, _, _, _, link = struct.unpack_from(endian + "HHiIII", head, 4)
        if major != 2:
            raise CaptureError(path, f"unsupported pcap version {major}.{minor}", 4)
        # upper bits of the link type: FCS length flags
        return fd, size, Format(FMT_PCAP, endian == ">", tick_ns == 1000, link & 0xFFFF, 24)
    except BaseException:
        os.close(fd)
        raise


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
    import numpy as np

    from collector.vxlan import native

    fd, _, form = open_capture(path)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    buf = np.frombuffer(mm, dtype=np.uint8)
    lib = native.load()
    if lib is not None:
        cols = _native_index(lib, path, buf, form)
    elif form.fmt == FMT_PCAP:
        cols = _read_pcap(path, mm, form)
    else:
        cols = _read_pcapng(path, mm)
    off, cap, wire, ts, link = cols
    return PacketIndex(buf, np.asarray(off, dtype=np.int64), np.asarray(cap, dtype=np.int64),
                       np.asarray(wire, dtype=np.int64), np.asarray(ts, dtype=np.int64),
                       np.asarray(link, dtype=np.uint16))


def _native_index(lib, path: str, buf: np.ndarray, form: Format) -> tuple:  # noqa: ANN001
    import numpy as np

    w = lib.ew_walk_new(buf.ctypes.data, -1, len(buf), form.fmt, form.big, form.nano,
                        form.linktype, form.start)
    if not w:
        raise MemoryError("ew_walk_new")
    try:
        n = lib.ew_walk_count(w)
        if n >= 0:
            lib.ew_walk_rewind(w)
            cols = [np.empty(n, dtype=np.int64) for _ in range(4)] + [np.empty(n, np.uint16)]
            got = lib.ew_walk_index(w, n, *(c.ctypes.data for c in cols))
            if got == n:
                return tuple(cols)
        err = lib.ew_walk_error(w)
        raise walk_error(path, int(err[0]), int(err[1]), int(err[2]), int(err[3]))
    finally:
        lib.ew_walk_free(w)


def _read_pcap(path: str, mm: mmap.mmap, form: Format) -> tuple:
    size = len(mm)
    unpack = struct.Struct((">" if form.big else "<") + "IIII").unpack_from
    off: list[int] = []
    cap: list[int] = []
    wire: list[int] = []
    ts: list[int] = []
    addo, addc, addw, addt = off.append, cap.append, wire.append, ts.append
    pos = form.start
    nano = form.nano  # ns files carry ns fractions; keep µs
    while pos + 16 <= size:
        sec, frac, incl, orig = unpack(mm, pos)
        if incl > MAX_RECORD:
            raise walk_error(path, E_PCAP_TOO_BIG, pos, incl)
        data = pos + 16
        pos = data + incl
        if pos > size:
            raise walk_error(path, E_PCAP_CUT, data - 16, incl, size - data)
        addo(data)
        addc(incl)
        addw(orig)
        addt(sec * 1_000_000 + (frac // 1000 if nano else frac))
    if pos != size:
        raise walk_error(path, E_PCAP_HDR_CUT, pos, size - pos)
    return off, cap, wire, ts, [form.linktype] * len(off)


def _read_pcapng(path: str, mm: mmap.mmap) -> tuple:
    size = len(mm)
    off: list[int] = []
    cap: list[int] = []
    wire: list[int] = []
    ts: list[int] = []
    link: list[int] = []
    interfaces: list[tuple[int, int]] = []  # (linktype, ticks per second)
    endian = "<"
    pos = 0
    while pos < size:
        if pos + 12 > size:
            raise walk_error(path, E_NG_HDR_CUT, pos, size - pos)
        if mm[pos:pos + 4] == _PCAPNG_SHB:
            bom = mm[pos + 8:pos + 12]
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise walk_error(path, E_NG_BOM, pos + 8, int.from_bytes(bom, "big"))
            interfaces = []
        btype, blen = struct.unpack_from(endian + "II", mm, pos)
        if blen < 12 or blen % 4 or pos + blen > size:
            raise walk_error(path, E_NG_BLOCK, pos, btype, blen)
        body = pos + 8
        if btype == 1:  # Interface Description Block
            ltype = struct.unpack_from(endian + "H", mm, body)[0]
            interfaces.append((ltype, _tsresol(mm, endian, body + 8, pos + blen - 4)))
        elif btype in (6, 2):  # Enhanced / obsolete Packet Block
            if blen < 32:  # too short for its own fields
                raise walk_error(path, E_NG_BLOCK, pos, btype, blen)
            ifid, hi, lo, incl, orig = struct.unpack_from(endian + "IIIII", mm, body)
            if btype == 2:  # a 16-bit interface id, then a 16-bit drop count
                ifid = struct.unpack_from(endian + "H", mm, body)[0]
            if ifid >= len(interfaces):
                raise walk_error(path, E_NG_IFACE, pos, ifid, len(interfaces))
            if body + 20 + incl > pos + blen - 4:
                raise walk_error(path, E_NG_OVERRUN, pos, incl)
            ltype, per_s = interfaces[ifid]
            us = ((hi << 32) | lo) * 1_000_000 // per_s
            if us > INT64_MAX:
                raise walk_error(path, E_TIME, pos)
            off.append(body + 20)
            cap.append(incl)
            wire.append(orig)
            ts.append(us)
            link.append(ltype)
        elif btype == 3:  # Simple Packet Block: no time, first interface
            if not interfaces:
                raise walk_error(path, E_NG_SPB_NO_IF, pos)
            if blen < 16:
                raise walk_error(path, E_NG_BLOCK, pos, btype, blen)
            orig = struct.unpack_from(endian + "I", mm, body)[0]
            off.append(body + 4)
            cap.append(min(orig, blen - 16))
            wire.append(orig)
            ts.append(0)
            link.append(interfaces[0][0])
        pos += blen
    return off, cap, wire, ts, link


def _tsresol(mm: mmap.mmap, endian: str, pos: int, end: int) -> int:
    """Ticks per second from the if_tsresol option (code 9); default µs."""
    while pos + 4 <= end:
        code, length = struct.unpack_from(endian + "HH", mm, pos)
        if code == 0:
            break
        if code == 9 and length >= 1:
            v = mm[pos + 4]
            return 2 ** (v & 0x7F) if v & 0x80 else 10 ** v
        pos += 4 + (length + 3) // 4 * 4
    return 1_000_000
