"""A BPF ring buffer read straight from its memory mapping, a whole batch per call.

Stage: the kernel boundary of the socket probes (used by collector/probes/kernel.py).
In: a BPF_MAP_TYPE_RINGBUF map whose records all have the same size (the close events), by
its fd (any file laid out the same way, in tests).
Out: the committed records since the last call, handed to a decoder as one buffer, then
consumed (the consumer position moves past them).

Why not libbpf's consumer (bcc's `ring_buffer_poll`): it calls back into Python once per
record, which at tens of thousands of connections per second is most of the probe's cost.
Here there is no call per record: the decoder unpacks the mapped bytes in place.

Layout (kernel/bpf/ringbuf.c; the consumer side as tools/lib/bpf/ringbuf.c does it in
`ring_buffer__add` and `ringbuf_process_ring`):
- map offset 0, one page, read-write: the consumer position (u64);
- map offset one page, read-only: the producer position (u64), then from the next page the
  data area, mapped twice in a row, so a record that wraps around the end is contiguous;
- a record: u32 length (bit 31 BUSY: reserved, not committed yet; bit 30 DISCARD), u32 page
  offset, the data; the whole rounded up to 8 bytes.
Reading stops at the first BUSY record; positions only grow (the data offset is `pos & mask`).

Waiting (`Wakeups`): epoll on the map fds, edge-triggered: it returns only when a program
submits with BPF_RB_FORCE_WAKEUP (socket.bpf.c does, every WAKEUP_EVERY events, and for every
process announcement) or the caller's timeout expires, so the reader sleeps between batches
instead of waking per record.

Memory ordering: the producer position, then the headers, then the data are read in program
order, and the consumer position is written after; x86-64 does not reorder loads with loads
nor stores with earlier loads, so this matches libbpf's acquire/release pairs there. On other
architectures `supported()` is False and the loader keeps libbpf's consumer.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import platform
import select
import struct
from collections.abc import Callable
from typing import TypeVar

BUSY_BIT, DISCARD_BIT = 1 << 31, 1 << 30
HEADER = 8
T = TypeVar("T")


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


class RingReader:
    """Consumer of one ring buffer map whose records are all `record_size` bytes long."""

    def __init__(self, map_fd: int, size: int, record_size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power of two")
        page = mmap.PAGESIZE
        self.size = size
        self.record_size = record_size
        self.stride = (HEADER + record_size + 7) & ~7
        self._mask = size - 1
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        # one aligned 8-byte store, as the kernel reads it (smp_load_acquire)
        self._cons = ct.c_uint64.from_buffer(self._cons_map)
        self._data = memoryview(self._prod_map)[page:page + 2 * size]
        self.skipped = 0  # records of another size or discarded (none are sent)

    def consume(self, decode: Callable[[memoryview], T], empty: T) -> T:
        """`decode(buffer)` of every committed record (headers included, `stride` bytes each),
        then those records are released to the producer. `empty` when there are none."""
        cons = self._cons.value
        prod = struct.unpack_from("=Q", self._prod_map, 0)[0]
        if prod <= cons:
            return empty
        start = cons & self._mask
        region = self._data[start:start + (prod - cons)]
        try:
            n = self._committed(region)
            if n:
                batch = region[:n * self.stride]
                try:
                    out = decode(batch)
                finally:
                    batch.release()
                self._cons.value = cons + n * self.stride
                return out
            if len(region) >= HEADER:
                return self._slow(cons, region, decode, empty)
            return empty
        finally:
            region.release()

    def _committed(self, region: memoryview) -> int:
        """How many leading records are committed and of the expected size."""
        whole = len(region) // self.stride
        if not whole or self.stride % 4:
            return 0
        headers = region[:whole * self.stride].cast("I")[::self.stride // 4].tolist()
        if headers.count(self.record_size) == whole:
            return whole
        for i, h in enumerate(headers):
            if h != self.record_size:
                return i
        return whole

    def _slow(self, cons: int, region: memoryview, decode: Callable[[memoryview], T],
              empty: T) -> T:
        """The first record is busy, discarded or of another size: skip the latter two."""
        pos = 0
        while pos + HEADER <= len(region):
            length = struct.unpack_from("=I", region, pos)[0]
            if length & BUSY_BIT:
                break
            end = pos + ((HEADER + (length & ~DISCARD_BIT) + 7) & ~7)
            if end > len(region):  # beyond the producer position: not a record
                break
            pos = end
            self.skipped += 1
            if pos + HEADER <= len(region) and \
                    struct.unpack_from("=I", region, pos)[0] == self.record_size:
                break
        if pos:
            self._cons.value = cons + pos
        return empty

    def close(self) -> None:
        self._data.release()
        del self._cons  # the ctypes view holds an export of the mapping
        self._cons_map.close()
        self._prod_map.close()


class Wakeups:
    """Sleeps until one of the watched ring buffers is woken by its producer, or a timeout.

    Edge-triggered epoll: a ring buffer fd polls readable whenever it holds data, so a
    level-triggered wait would return at once under load and the reader would wake per record;
    edge-triggered, only the kernel's wake-ups (BPF_RB_FORCE_WAKEUP) end the sleep."""

    def __init__(self) -> None:
        self._epoll = select.epoll()

    def watch(self, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)

    def wait(self, timeout_s: float) -> None:
        if timeout_s > 0:
            self._epoll.poll(timeout_s)

    def close(self) -> None:
        self._epoll.close()
