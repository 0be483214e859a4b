"""A capture file through the native helper: records walked, frames decoded and summed into
flow sessions in C, in one pass, batch by batch; Python runs per session, never per packet.

Stage: the bulk path of `PcapSource` when the native helper is built (`native.load()`). In: a
capture file, the decoding policy (`packets.Policy`), the tick interval and the flow table. Out: `FlowRecord`s handed to
`emit` per batch (the table's finals and interims), then the table's flush; the same records,
in the same order, as the numpy path (`pcapfile.read_index` -> `bulk.decode_bulk` ->
`FlowTable.add`), which tests/unit/test_vxlan_native.py and the golden tests hold it to.

The file is read through a 256 KiB window (pread; the resident set does not grow with the
file), once. A corrupt file must stop with its `CaptureError` (naming the byte offset) before
any record is emitted, as on the numpy path, which indexes the whole file first; so records
are held back until the scan reaches the end of the file (the scan checks every record header
it reads). If more than `HOLD` records pile up first, the rest of the file is walked once for
its headers only (a clone of the walker), and from then on records go out batch by batch.
Batches are cut exactly where `source.chunks` cuts: where the running maximum of packet time
enters a new interval (then the table ticks), and every `CHUNK` records. numpy is not imported.
`scan_block` does the same for a live capture block (pcap records in memory, written by the
ring drain; live.py ticks the table on wall time, so packet time never cuts a batch there).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

from collector.pipeline import Emit
from collector.vxlan import native
from collector.vxlan.flows import FlowTable
from collector.vxlan.packets import REASONS, Policy, as_policy
from collector.vxlan.pcapfile import FMT_PCAP, LINKTYPE_ETHERNET, open_capture, walk_error
from collector.vxlan.rows import NFIELDS
from eastwest.record import FlowRecord

log = logging.getLogger("eastwest.collector.vxlan")


_REASON_CODES = range(1, len(REASONS) + 1)  # drop codes of ew_scan_drops (packets.REASONS)
HOLD = 16_384  # records held back (a few MiB) before the rest of the file is checked apart


def scan_file(lib: ctypes.CDLL, path: str, policy: Policy | tuple[int, ...], interval_us: int,
              chunk: int, table: FlowTable, emit: Emit, stop: threading.Event) -> None:
    policy = as_policy(policy)
    fd, size, form = open_capture(path)
    walk = scan = None
    try:
        walk = lib.ew_walk_new(None, fd, size, form.fmt, form.big, form.nano, form.linktype,
                               form.start)
        scan = lib.ew_scan_new()
        if not walk or not scan:
            raise MemoryError("ew_walk_new / ew_scan_new")
        packets = _batches(lib, walk, scan, path, policy, interval_us, chunk, table, emit, stop)
    finally:
        lib.ew_scan_free(scan)
        lib.ew_walk_free(walk)
        os.close(fd)
    log.info("%s: %d packets", path, packets)
    emit(table.flush())


def _batches(lib: ctypes.CDLL, walk: int, scan: int, path: str, policy: Policy,
             interval_us: int, chunk: int, table: FlowTable, emit: Emit,
             stop: threading.Event) -> int:
    """Scan batch after batch to the end of the file (or `stop`); the records read."""
    kinds, plain = native.policy_args(policy)
    out = (ctypes.c_int64 * 5)()
    packets = 0
    held: list[FlowRecord] | None = []  # None once the whole file is known to be sound
    while not stop.is_set():
        records = _step(lib, walk, scan, path, kinds, plain, interval_us, chunk, table, out)
        consumed, has_tick, tick, at_end, _ = out
        packets += consumed
        if has_tick:
            records += table.tick(tick)
        if held is None:
            emit(records)
        else:
            held += records
            if len(held) > HOLD and not at_end:
                _check_rest(lib, walk, path)
                emit(held)
                held = None
        if at_end:
            break
    if held:
        emit(held)
    return packets


def _step(lib: ctypes.CDLL, walk: int, scan: int, what: str, kinds: object, plain: int,
          interval_us: int, chunk: int, table: FlowTable, out: ctypes.Array) -> list[FlowRecord]:
    """One `ew_scan_batch`: its drops counted, its session rows merged into `table`; `out`
    holds (consumed, has_tick, tick, at_end, sessions)."""
    rc = lib.ew_scan_batch(scan, walk, kinds, plain, table.idle_us, interval_us, chunk, out)
    if rc == -1:
        raise _error(lib, walk, what)
    if rc != 0:
        raise MemoryError("ew_scan_batch: out of memory")
    consumed, sessions = out[0], out[4]
    drops = lib.ew_scan_drops(scan)
    counts = [(code, drops[code]) for code in _REASON_CODES if drops[code]]
    table.count_drops(counts)
    table.packets += consumed - sum(n for _, n in counts)
    rows: list[int] = []
    if sessions:
        flat = ctypes.string_at(lib.ew_scan_rows(scan), sessions * NFIELDS * 8)
        rows = memoryview(flat).cast("Q").tolist()
    return table.merge(rows)


def _check_rest(lib: ctypes.CDLL, walk: int, path: str) -> None:
    """Walk the headers of the rest of the file (a clone: `walk` stays where it is)."""
    rest = lib.ew_walk_clone(walk)
    if not rest:
        raise MemoryError("ew_walk_clone")
    try:
        if lib.ew_walk_count(rest) < 0:
            raise _error(lib, rest, path)
    finally:
        lib.ew_walk_free(rest)


def _error(lib: ctypes.CDLL, walk: int, path: str) -> Exception:
    err = lib.ew_walk_error(walk)
    return walk_error(path, int(err[0]), int(err[1]), int(err[2]), int(err[3]))


NO_TICK_US = 1 << 62  # live blocks: the table ticks on wall time (live.py), never on packet time
BLOCK_CHUNK = 1 << 17  # more than a live block holds (capture.MAX_BLOCK_PACKETS): one batch


def scan_block(lib: ctypes.CDLL, scan: int, buf: object, size: int,
               policy: Policy | tuple[int, ...],
               table: FlowTable, linktype: int = LINKTYPE_ETHERNET) -> list[FlowRecord]:
    """A live block of pcap records (`capture.Block` with pcap=True: `buf` its address, `size`
    its bytes) decoded and summed in C by `scan` (one `ew_scan_new` per interface), merged into
    `table`: the records `table.add(decode_bulk(block))` would give."""
    walk = lib.ew_walk_new(buf, -1, size, FMT_PCAP, sys.byteorder == "big", 0, linktype, 0)
    if not walk:
        raise MemoryError("ew_walk_new")
    kinds, plain = native.policy_args(as_policy(policy))
    out = (ctypes.c_int64 * 5)()
    records: list[FlowRecord] = []
    try:
        while True:
            records += _step(lib, walk, scan, "live block", kinds, plain, NO_TICK_US,
                             BLOCK_CHUNK, table, out)
            if out[3]:  # at the end of the block
                return records
    finally:
        lib.ew_walk_free(walk)
