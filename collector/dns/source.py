"""DNS source: the DNS of the watched namespaces as flow records with a `dns` summary.

Stage: source (collector/pipeline.py). In: `--dns` specs (NETNS, NETNS/IF or /IF; a namespace
means all of its interfaces) opened as `DnsCapture`s.  Out: every `interval`, records of the flows
to resolvers that changed (source `wire`, observer `path`, `dns` set; final once idle), built by
`DnsFlowTable`. DNS is a few packets per connection made, so packets are read and parsed one at
a time in Python; the kernel filter keeps everything else out, and the kernel's own drops of the
socket are counted (`dns`, `kernel_drop`).
"""

from __future__ import annotations

import select
import struct
import threading
import time

from collector.dns.capture import DnsCapture
from collector.dns.flows import DnsFlowTable
from collector.pipeline import CollectorContext, Emit

SOL_PACKET, PACKET_STATISTICS = 263, 6


class DnsSource:
    name = "dns"

    def __init__(self, ctx: CollectorContext, specs: list[str], *, interval: float = 5.0,
                 idle_timeout: float = 30.0, query_timeout: float = 5.0,
                 top_names: int = 10) -> None:
        self.ctx = ctx
        self.interval = interval
        # open now: a test (or an operator) knows the sockets are there before traffic starts
        self.captures = [DnsCapture(s) for s in specs]
        self.table = DnsFlowTable(ctx.collector_id, ctx.next_record_id, ctx.drops,
                                  top_names=top_names, query_timeout=query_timeout,
                                  idle_timeout=idle_timeout)
        self.ready = threading.Event()
        self.ready.set()

    def _kernel_drops(self, cap: DnsCapture) -> None:
        _, drops = struct.unpack("II", cap.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        if drops:
            self.ctx.drops.count("dns", "kernel_drop", drops)

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` for packets and feed every one that arrived to the table."""
        ready, _, _ = select.select(self.captures, [], [], max(0.0, timeout))
        for cap in ready:
            for ts, (proto, family, src, sport, dst, dport, payload) in cap.packets():
                self.table.packet(ts, proto, family, src, sport, dst, dport, payload)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        try:
            next_tick = time.monotonic() + self.interval
            while not stop.is_set():
                self.poll(min(0.2, next_tick - time.monotonic()))
                if time.monotonic() >= next_tick:
                    next_tick += self.interval
                    for cap in self.captures:
                        cap.refresh_addresses()
                        self._kernel_drops(cap)
                    records = self.table.expire(time.time_ns() // 1000)
                    if records:
                        emit(records)
            self.poll(0.0)
            records = self.table.expire(time.time_ns() // 1000, flush=True)
            if records:
                emit(records)
        finally:
            for cap in self.captures:
                cap.close()

