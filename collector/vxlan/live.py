"""Live capture: capture -> bulk decoder -> flow table, per interface.

Stage: source. Two kinds, one class:
- the VXLAN underlay (`eastwest collector`, unless `--no-vxlan`): `--underlay IF|NETNS/IF`
  (repeatable; default, unless `--wire-interface` is given: the lower devices of this host's
  VXLAN links, read from netlink `IFLA_LINKINFO`/`IFLA_VXLAN_LINK` with pyroute2); the kernel
  keeps only UDP to the tunnel ports, and only tunnelled packets become flows (source="vxlan");
- wire interfaces (`--wire-interface IF|NETNS/IF`, repeatable): every packet, tunnelled ones
  decapsulated, plain ones flows of their own (source="wire").
In also: `--vxlan-port`, `--geneve-port`, `--gpe-port`, `--decoder`, `--interval`,
`--idle-timeout`. Out: `FlowRecord`s with observer="path", `tunnel` filled when tunnelled.

Each interface is its own observation point with its own flow table (a packet seen leaving one
host and entering another is two observations, never one flow counted twice). No Python runs per
packet: one call to the native helper drains the socket into one buffer (a recv_into loop in
Python without it); decoding and accounting run per block on the bulk path, every `BLOCK_S`
seconds, 65,536 packets or a full 32 MiB buffer (the flow table's merge costs Python time per
flow per block: fewer, larger blocks cost less). Kernel drops (PACKET_STATISTICS) are counted as
`vxlan/kernel_drop`. Blocks, pauses and ticks keep the context's clock (`ctx.clock`): ticks fall
on multiples of `--interval` of its wall time.
"""

from __future__ import annotations

import argparse
import logging
import selectors
import threading

import numpy as np

from collector.pipeline import CollectorContext, Emit
from collector.vxlan import native
from collector.vxlan.bulk import decode_bulk
from collector.vxlan.capture import UnderlayCapture
from collector.vxlan.flows import FlowTable
from collector.vxlan.scan import scan_block
from collector.vxlan.source import check_timing, policy_from

BLOCK_S = 0.25
# After a wake-up that emptied the sockets, wait this long before the next select: under a steady
# stream each wake-up then reads a batch instead of a packet or two (the per-wake-up Python cost
# stays small), at the price of that much latency, as libpcap's TPACKET_V3 block timeout does.
# The socket buffer (64 MiB) holds far more than this many seconds of packets.
PAUSE_S = 0.002
log = logging.getLogger("eastwest.collector.vxlan")


def vxlan_underlays() -> list[str]:
    """Names of the devices under this namespace's VXLAN links (their `dev`)."""
    from pyroute2 import IPRoute

    found: list[str] = []
    with IPRoute() as ipr:
        links = ipr.get_links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            if not info or info.get_attr("IFLA_INFO_KIND") != "vxlan":
                continue
            data = info.get_attr("IFLA_INFO_DATA")
            lower = data.get_attr("IFLA_VXLAN_LINK") if data else None
            if lower and names.get(lower) and names[lower] not in found:
                found.append(names[lower])
    return found


def live_capture_wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "underlay", None)) or bool(vxlan_underlays())


class LiveVxlanSource:
    def __init__(self, ctx: CollectorContext, args: argparse.Namespace, *,
                 wire: bool = False) -> None:
        self.ctx = ctx
        self.policy = policy_from(args, plain=wire)
        self.decoder = getattr(args, "decoder", "bulk") or "bulk"
        interval, idle = check_timing(args)
        self.interval = interval
        if wire:
            specs = list(args.wire_interface)
            self.captures = [UnderlayCapture(spec, None, flag="--wire-interface")
                             for spec in specs]
        else:
            specs = list(getattr(args, "underlay", None) or vxlan_underlays())
            self.captures = [UnderlayCapture(spec, self.policy.ports) for spec in specs]
        self.name = ("wire:" if wire else "vxlan:") + ",".join(specs)
        self.tables = [FlowTable(ctx, "wire" if wire else "vxlan", idle_timeout=idle)
                       for _ in specs]
        self.lib = native.load()
        self.scans: dict[int, int] = {}  # per table: the native scan state (ew_scan_new)
        self.ready = threading.Event()
        self.ready.set()  # the captures are open (above): packets from now on are seen

    def _decode_block(self, cap: UnderlayCapture, table: FlowTable) -> list:
        block = cap.take()
        if len(block.off) == 0:
            return []
        if self.decoder == "scapy":
            from collector.vxlan.reference import decode_reference

            frames = [block.buf[o:o + c].tobytes()
                      for o, c in zip(block.off.tolist(), block.cap.tolist(), strict=True)]
            decoded = decode_reference(frames, block.ts_us, self.policy,
                                       np.full(len(frames), cap.linktype, dtype=np.uint16))
        elif block.pcap and self.lib is not None:  # decoded and summed in C
            scan = self.scans.get(id(table))
            if scan is None:
                scan = self.scans[id(table)] = self.lib.ew_scan_new()
                if not scan:
                    raise MemoryError("ew_scan_new")
            return scan_block(self.lib, scan, block.buf.ctypes.data, len(block.buf), self.policy,
                              table, cap.linktype)
        else:
            decoded = decode_bulk(block.buf, block.off, block.cap, block.ts_us, self.policy,
                                  np.full(len(block.off), cap.linktype, dtype=np.uint16))
        return table.add(decoded)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        sel = selectors.DefaultSelector()
        for i, cap in enumerate(self.captures):
            sel.register(cap, selectors.EVENT_READ, i)
        clock = self.ctx.clock
        next_tick = (clock.now().timestamp() // self.interval + 1) * self.interval
        next_block = clock.monotonic() + BLOCK_S
        try:
            while not stop.is_set():
                ready = sel.select(timeout=BLOCK_S / 2)
                for key, _ in ready:
                    i = key.data
                    if self.captures[i].drain():
                        emit(self._decode_block(self.captures[i], self.tables[i]))
                if ready:
                    clock.sleep(PAUSE_S)
                if clock.monotonic() >= next_block:
                    next_block = clock.monotonic() + BLOCK_S
                    for cap, table in zip(self.captures, self.tables, strict=True):
                        emit(self._decode_block(cap, table))
                if clock.now().timestamp() >= next_tick:
                    now_us = int(next_tick * 1_000_000)
                    next_tick += self.interval
                    for cap, table in zip(self.captures, self.tables, strict=True):
                        dropped = cap.read_kernel_drops()
                        if dropped:
                            self.ctx.drops.count("vxlan", "kernel_drop", dropped)
                        emit(table.tick(now_us))
            for cap, table in zip(self.captures, self.tables, strict=True):  # what is queued
                while cap.drain():
                    emit(self._decode_block(cap, table))
                records = self._decode_block(cap, table)
                dropped = cap.read_kernel_drops()
                if dropped:
                    self.ctx.drops.count("vxlan", "kernel_drop", dropped)
                emit(records + table.flush())
        finally:
            sel.close()
            for cap in self.captures:
                cap.close()
            for scan in self.scans.values():
                self.lib.ew_scan_free(scan)  # type: ignore[union-attr]  # scans only with lib
            self.scans.clear()
