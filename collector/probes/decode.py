"""Bulk decoding of the kernel's connection records: raw bytes -> `ConnState`s in one pass.

Stage: the kernel boundary of the socket probes, between the ring buffer / batch map reads
(collector/probes/kernel.py, collector/probes/ring.py) and record building
(collector/probes/records.py).
In: the bytes of N `struct close_event_t` (ring buffer records, with or without their 8-byte
ring header) or N keys and N `struct conn_t` (BPF_MAP_LOOKUP_BATCH), as socket.bpf.c defines
them.
Out: a list of `ConnState`, one per entry, in input order.

Why: reading a ctypes structure field by field costs a Python attribute access per field and
per event (28 fields, two events per connection). Here numpy views the whole buffer through a
structured dtype, each field becomes a Python list in one C call (`tolist`), and `zip`/`map`
assemble the `ConnState` tuples: no Python bytecode runs per field or per event (only once
per distinct process name).

The layout is never written by hand: the dtype takes every field's offset, size and type from
the ctypes structure bcc built while compiling socket.bpf.c (`conns.Leaf`), so the C file
stays the one definition. A field of `ConnState` the structure lacks is a CapabilityError at
start-up, not a wrong value later.
"""

from __future__ import annotations

import ctypes as ct
from functools import partial

import numpy as np

from collector.probes.conn import ConnState
from eastwest.errors import CapabilityError

_FIELDS = ConnState._fields  # comm is last
_BOOLS = frozenset({"tcp_closed", "deferred"})  # u8 flags, decoded as Python bools
RING_HEADER = 8  # BPF_RINGBUF_HDR_SZ (kernel/bpf/ringbuf.c): u32 length, u32 page offset
assert _FIELDS[0] == "sk" and _FIELDS[-1] == "comm"


def _format(name: str, ctype: type) -> str:
    size = ct.sizeof(ctype)
    if name in _BOOLS:
        if size != 1:
            raise CapabilityError(f"struct conn_t.{name} is {size} bytes, expected 1")
        return "?"
    if issubclass(ctype, ct.Array):
        # char[] as S (numpy drops trailing NULs), u8[] as V (every byte kept): bytes both
        return f"S{size}" if ctype._type_ is ct.c_char else f"V{size}"  # type: ignore[attr-defined]
    return np.dtype(ctype).str  # the ctypes scalar's own size, signedness and byte order


def conn_dtype(leaf: type[ct.Structure], itemsize: int, base: int = 0,
               sk_offset: int | None = None) -> np.dtype:
    """The structured dtype, fields in ConnState order, of one `struct conn_t` at `base` in an
    item of `itemsize` bytes, with the u64 `sk` at `sk_offset` (None: the key comes apart)."""
    types = {f[0]: f[1] for f in leaf._fields_}  # type: ignore[attr-defined]
    names, formats, offsets = [], [], []
    if sk_offset is not None:
        names.append("sk")
        formats.append("=u8")
        offsets.append(sk_offset)
    for name in _FIELDS[1:]:
        if name not in types:
            raise CapabilityError(f"struct conn_t has no field {name!r}: socket.bpf.c and "
                                  "collector/probes/conn.py disagree")
        names.append(name)
        formats.append(_format(name, types[name]))
        offsets.append(base + getattr(leaf, name).offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": itemsize})


class ConnDecoder:
    """Decodes close events and map entries of one compiled program (one leaf layout).
    `event` is `struct close_event_t` as ctypes: `sk` (u64) and `conn` (the leaf)."""

    def __init__(self, leaf: type[ct.Structure], event: type[ct.Structure]) -> None:
        self.event_size = ct.sizeof(event)
        self.leaf_size = ct.sizeof(leaf)
        conn_off, sk_off = event.conn.offset, event.sk.offset  # type: ignore[attr-defined]
        self.event_dtype = conn_dtype(leaf, self.event_size, conn_off, sk_off)
        # a ring record: header, event, padding to 8 bytes (kernel/bpf/ringbuf.c)
        self.ring_record_size = (RING_HEADER + self.event_size + 7) & ~7
        self.ring_dtype = conn_dtype(leaf, self.ring_record_size, RING_HEADER + conn_off,
                                     RING_HEADER + sk_off)
        self.leaf_dtype = conn_dtype(leaf, self.leaf_size)
        self._comms: dict[bytes, str] = {}
        self._new = partial(tuple.__new__, ConnState)

    def events(self, buf: bytes | bytearray | memoryview) -> list[ConnState]:
        """States from the bytes of consecutive close events (a whole number of them)."""
        if len(buf) % self.event_size:
            raise ValueError(f"{len(buf)} bytes is not a whole number of "
                             f"{self.event_size}-byte close events")
        arr = np.frombuffer(buf, dtype=self.event_dtype)
        return self._states([arr[name].tolist() for name in _FIELDS[:-1]], arr["comm"].tolist())

    def ring_records(self, buf: bytes | bytearray | memoryview) -> list[ConnState]:
        """States from consecutive ring buffer records of close events, headers included (the
        caller has checked that each is committed and of the close event's size)."""
        arr = np.frombuffer(buf, dtype=self.ring_dtype)
        return self._states([arr[name].tolist() for name in _FIELDS[:-1]], arr["comm"].tolist())

    def entries(self, keys: list[int], values: bytes | bytearray | memoryview) -> list[ConnState]:
        """States from the keys (socket pointers) and values of a batch map read."""
        arr = np.frombuffer(values, dtype=self.leaf_dtype, count=len(keys))
        cols = [keys] + [arr[name].tolist() for name in _FIELDS[1:-1]]
        return self._states(cols, arr["comm"].tolist())

    def _states(self, cols: list[list], raw_comms: list[bytes]) -> list[ConnState]:
        known = self._comms
        unknown = set(raw_comms).difference(known)  # few distinct process names
        if len(known) + len(unknown) > 4096:
            known.clear()
            unknown = set(raw_comms)
        for raw in unknown:
            known[raw] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return list(map(self._new, zip(*cols, map(known.__getitem__, raw_comms),
                                           strict=True)))
