"""The drop source: the kernel's drop counts -> flow records with `drops: [{reason, packets}]`.

Stage: a collector source (`collector.pipeline.Source`), beside the socket probes and the wire.
In: a `DropKernel` (collector/drops/kernel.py, or a fake in tests) drained every `interval`
seconds; a `to_utc` for kernel times (eastwest/clock.py KernelClock).
Out: one record per flow with drops (source `drops`, observer `path`): the flow's 5-tuple
oriented as its connection is, the packets dropped per reason, cumulative since the first drop
(docs/flow-record.md: counters are cumulative). Interim (`final=false`) while drops keep
coming; final once a flow had none for `idle_timeout` seconds, and at stop.

Orientation: a dropped SYN names its sender the client, a dropped SYN-ACK its receiver; other
packets follow the port rule every observer shares (collector/orientation.py). Both directions
of one flow count into one record. A flow is keyed by network namespace too: the same addresses
can exist in two namespaces (the lab's hosts see their pods' packets on the bridge).

Kernel losses (map full, packets without a network header) go to `Drops` (stage "drops") and
mark the records of that drain `incomplete: lost_events`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from collector.drops.kernel import DropCount, DropKernel
from collector.orientation import client_by_ports
from collector.pipeline import CollectorContext, Emit
from eastwest.record import Drop, Endpoint, FlowRecord

log = logging.getLogger("eastwest.collector.drops")
STAGE = "drops"
LOSSES = ("map_full", "no_header")
PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6", 47: "gre", 50: "esp"}
SYN, ACK = 0x02, 0x10
FlowKey = tuple[int, str, int, str, int, str, int]  # netns, proto, family, client ip/port, server


def orient(c: DropCount) -> tuple[bool, FlowKey]:
    """(whether the packet went client -> server, the flow's key)."""
    k = c.key
    if k.protocol == 6 and k.tcp_flags & SYN:
        forward = not k.tcp_flags & ACK  # SYN from the client, SYN-ACK from the server
    else:
        by_ports = client_by_ports(k.sport, k.dport)
        forward = True if by_ports is None else by_ports
    proto = PROTO_NAMES.get(k.protocol, "other")
    if forward:
        return True, (k.netns, proto, k.family, k.src, k.sport, k.dst, k.dport)
    return False, (k.netns, proto, k.family, k.dst, k.dport, k.src, k.sport)


@dataclass
class DropFlow:
    start_ns: int
    last_ns: int
    packets: dict[str, int] = field(default_factory=dict)
    record_id: str | None = None
    dirty: bool = True
    lossy: bool = False


class DropTracker:
    """Userspace state of the drop source, independent of bcc."""

    def __init__(self, ctx: CollectorContext, to_utc: Callable[[int], datetime],
                 idle_timeout: float = 30.0) -> None:
        self.ctx = ctx
        self.to_utc = to_utc
        self.idle_ns = int(idle_timeout * 1e9)
        self.flows: dict[FlowKey, DropFlow] = {}

    def add(self, counts: list[DropCount], lossy: bool = False) -> None:
        for c in counts:
            _, key = orient(c)
            f = self.flows.get(key)
            if f is None:
                f = self.flows[key] = DropFlow(c.first_ns, c.last_ns)
            f.start_ns = min(f.start_ns, c.first_ns)
            f.last_ns = max(f.last_ns, c.last_ns)
            f.packets[c.key.reason] = f.packets.get(c.key.reason, 0) + c.packets
            f.dirty = True
            f.lossy = f.lossy or lossy

    def _record(self, key: FlowKey, f: DropFlow, final: bool) -> FlowRecord:
        netns, proto, family, cip, cport, sip, sport = key
        return FlowRecord(
            record_id=self.ctx.next_record_id(), collector=self.ctx.collector_id, source="drops",
            start=self.to_utc(f.start_ns), end=self.to_utc(f.last_ns), final=final,
            protocol=proto, family=family, client=Endpoint(cip, cport),  # type: ignore[arg-type]
            server=Endpoint(sip, sport), observer="path", netns=netns,
            drops=[Drop(r, n) for r, n in sorted(f.packets.items())],
            incomplete=["lost_events"] if f.lossy else [])

    def records(self, now_ns: int, flush: bool = False) -> list[FlowRecord]:
        """Interim records of flows with new drops, final ones of idle flows (all at flush)."""
        out = []
        for key in list(self.flows):
            f = self.flows[key]
            final = flush or now_ns - f.last_ns >= self.idle_ns
            if final or f.dirty:
                out.append(self._record(key, f, final))
                f.dirty = False
            if final:
                del self.flows[key]
        return out


class DropSource:
    """Drains the kernel every `interval` seconds; emits the tracker's records."""

    name = "drops"

    def __init__(self, ctx: CollectorContext, kernel_factory: Callable[[], DropKernel],
                 tracker: DropTracker, now_ns: Callable[[], int], interval: float = 5.0) -> None:
        self.ctx = ctx
        self.kernel_factory = kernel_factory
        self.tracker = tracker
        self.now_ns = now_ns
        self.interval = interval
        self.ready = threading.Event()
        self._stats: dict[str, int] = {}

    def _drain(self, kernel: DropKernel) -> None:
        stats = kernel.stats()
        lossy = False
        for name in LOSSES:
            grew = stats.get(name, 0) - self._stats.get(name, 0)
            if grew > 0:
                self.ctx.drops.count(STAGE, name, grew, f"{grew} in the kernel ({name})")
                lossy = True
        self._stats = stats
        self.tracker.add(kernel.drain(), lossy)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        kernel = self.kernel_factory()
        self.ready.set()
        try:
            while not self.ctx.clock.sleep(self.interval, until=stop):
                self._drain(kernel)
                recs = self.tracker.records(self.now_ns())
                if recs:
                    emit(recs)
            self._drain(kernel)
            recs = self.tracker.records(self.now_ns(), flush=True)
            if recs:
                emit(recs)
        finally:
            kernel.close()


def drop_source(ctx: CollectorContext, args: object) -> DropSource:
    """The drop source the collector's flags ask for (`--drops`, scoped by `--netns`, drained
    every `--interval`, flows final after `--idle-timeout`)."""
    import time

    from collector.drops.kernel import BccDrops
    from collector.netns import resolve_all
    from collector.probes import idle_timeout, probe_config
    from eastwest.clock import KernelClock

    cfg = probe_config(args)  # type: ignore[arg-type]  # validates --interval, --netns, ...
    netns = resolve_all(list(getattr(args, "netns", []) or []))
    entries = min(cfg.conn_entries, 65536)
    kclock = KernelClock()
    return DropSource(ctx, lambda: BccDrops(entries=entries, netns=netns),
                      DropTracker(ctx, kclock.to_utc, idle_timeout(args)),  # type: ignore[arg-type]
                      lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                      interval=float(getattr(args, "interval", 5.0)))
