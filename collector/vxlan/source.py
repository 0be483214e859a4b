"""Capture files as a collector source: pcap/pcapng -> decoder -> flow table -> records.

Stage: source (`eastwest collector --pcap FILE`). In: a file path and the collector's flags
(`--decoder`, `--vxlan-port`, `--geneve-port`, `--gpe-port`, `--interval`, `--idle-timeout`).
Out: `FlowRecord`s with source="pcap", observer="path", `tunnel` filled for tunnelled flows and
null for plain traffic, handed to `emit` in batches; then `run` returns.

Two paths, one answer. With the native helper built and `--decoder bulk` (the default), the
file goes through `scan.scan_file`: walked, decoded and summed into flow sessions in C, without
numpy. Otherwise (`--decoder scapy`, or no C compiler at set-up) `pcapfile.read_index` indexes
it, a decoder makes `packets.Decoded` columns, and `FlowTable.add` groups them with numpy.

Time is the packets' time, never the wall clock, so one file always gives the same records:
the stream is cut where the running maximum of packet time crosses a multiple of `--interval`,
and each cut is a tick of the flow table (interim records, idle and closed flows ending). Long
stretches are also cut every `CHUNK` packets without a tick, which bounds memory; both paths cut
at the same packets, so they give the same records in the same order.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.pipeline import CollectorContext, Emit
from collector.vxlan import native
from collector.vxlan.flows import FlowTable
from collector.vxlan.packets import DEFAULT_PORTS, GENEVE_PORT, VXLAN_GPE_PORT, Policy
from eastwest.errors import ConfigError

if TYPE_CHECKING:  # numpy is imported only by the paths that need it
    import numpy as np

    from collector.vxlan.packets import Decoded
    from collector.vxlan.pcapfile import PacketIndex

CHUNK = 262_144
log = logging.getLogger("eastwest.collector.vxlan")


PORT_FLAGS = (("--vxlan-port", "vxlan_port", DEFAULT_PORTS),
              ("--geneve-port", "geneve_port", (GENEVE_PORT,)),
              ("--gpe-port", "gpe_port", (VXLAN_GPE_PORT,)))


def policy_from(args: argparse.Namespace, *, plain: bool) -> Policy:
    """The tunnel ports of `--vxlan-port`, `--geneve-port`, `--gpe-port` (each replaces its
    defaults); `plain`: whether packets outside any tunnel become flows."""
    chosen: list[tuple[int, ...]] = []
    seen: dict[int, str] = {}
    for flag, attr, default in PORT_FLAGS:
        ports = tuple(dict.fromkeys(getattr(args, attr, None) or default))
        for port in ports:
            if not 1 <= port <= 65535:
                raise ConfigError(flag, port, "must be a UDP port 1..65535")
            if port in seen:
                raise ConfigError(flag, port, f"is already a tunnel port of {seen[port]}")
            seen[port] = flag
        chosen.append(ports)
    return Policy(vxlan=chosen[0], geneve=chosen[1], gpe=chosen[2], plain=plain)


def check_timing(args: argparse.Namespace) -> tuple[float, float]:
    interval, idle = float(args.interval), float(args.idle_timeout)
    if interval <= 0:
        raise ConfigError("--interval", interval, "must be > 0 seconds")
    if idle <= 0:
        raise ConfigError("--idle-timeout", idle, "must be > 0 seconds")
    return interval, idle


def decode_index(ix: PacketIndex, sel: slice, policy: Policy, decoder: str) -> Decoded:
    """Decode packets `sel` of a file index with the chosen decoder."""
    off, cap, ts, link = ix.off[sel], ix.cap[sel], ix.ts_us[sel], ix.linktype[sel]
    if decoder == "scapy":
        from collector.vxlan.reference import decode_reference

        frames = [ix.buf[o:o + c].tobytes() for o, c in zip(off.tolist(), cap.tolist(), strict=True)]
        return decode_reference(frames, ts, policy, link)
    from collector.vxlan.bulk import decode_bulk

    return decode_bulk(ix.buf, off, cap, ts, policy, link)


def chunks(ts_us: np.ndarray, interval_us: int, chunk: int = CHUNK) -> Iterator[tuple[int, int, int | None]]:
    """(start, stop, tick time or None) pieces of a capture: a tick where packet time (running
    maximum) enters a new interval, and a piece boundary without tick every `chunk` packets."""
    import numpy as np

    n = len(ts_us)
    if n == 0:
        return
    bucket = np.maximum.accumulate(ts_us) // interval_us
    cuts = (np.flatnonzero(bucket[1:] != bucket[:-1]) + 1).tolist() + [n]
    start = 0
    for stop in cuts:
        for s in range(start, stop, chunk):
            e = min(s + chunk, stop)
            yield s, e, (int(bucket[stop - 1]) + 1) * interval_us if e == stop and stop < n else None
        start = stop


class PcapSource:
    """`eastwest collector --pcap FILE`: the flows of a capture (tunnelled ones decapsulated)."""

    def __init__(self, ctx: CollectorContext, path: str, args: argparse.Namespace) -> None:
        self.ctx, self.path = ctx, path
        self.name = f"pcap:{path}"
        self.policy = policy_from(args, plain=True)
        self.decoder = getattr(args, "decoder", "bulk") or "bulk"
        interval, idle = check_timing(args)
        self.interval_us = int(interval * 1_000_000)
        self.table = FlowTable(ctx, "pcap", idle_timeout=idle)
        self.ready = threading.Event()
        self.ready.set()  # a file: nothing to wait for

    def run(self, emit: Emit, stop: threading.Event) -> None:
        lib = native.load() if self.decoder == "bulk" else None
        if lib is not None:
            from collector.vxlan.scan import scan_file

            scan_file(lib, self.path, self.policy, self.interval_us, CHUNK, self.table, emit, stop)
            return
        if self.decoder == "bulk":  # the numpy path: same records, slower
            (log.warning if native.refused() else log.debug)(
                "VXLAN native helper not used: %s", native.why_not())
        from collector.vxlan.pcapfile import read_index

        ix = read_index(self.path)
        log.info("%s: %d packets", self.path, len(ix))
        for start, end, tick in chunks(ix.ts_us, self.interval_us, CHUNK):
            if stop.is_set():
                break
            records = self.table.add(decode_index(ix, slice(start, end), self.policy, self.decoder))
            if tick is not None:
                records += self.table.tick(tick)
            emit(records)
        emit(self.table.flush())
