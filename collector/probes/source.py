"""The socket probe source: kernel states -> records, every interval and at every close.

Stage: a collector source (`collector.pipeline.Source`).
In: a `KernelSide` (the loaded BPF program, or a fake in tests); the context's clock
(`ctx.clock`) paces the intervals and dates the records.
Out: lists of `FlowRecord` through `emit`: final records as close events arrive, interim
(`final=False`) records of every live connection every `interval` seconds, and at stop the
last close events plus interim records of what is still open.
UDP flows (collector/probes/udptrack.py) are drained at the same interval: interim records,
and final ones for flows idle or closed; their kernel losses (`UDP_LOSSES`) mark UDP records.

Loss accounting: the kernel's `stats` counters are read every interval; their increases go to
`Drops` (stage "socket") and mark the records of that interval `incomplete: lost_events`.
`close_overflowed` and `close_deferred` are not losses: those connections are finalised from
the kernel's `overflow` map (at the next poll) or from the connection map (below).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from collector.pipeline import CollectorContext, Emit
from collector.probes.conn import ConnState, KernelSide
from collector.probes.records import STAGE, RecordBuilder
from collector.probes.udptrack import UdpTracker
from eastwest.record import FlowRecord

log = logging.getLogger("eastwest.collector.probes")
LOSSES = ("conn_map_full", "listen_map_full", "deferred_lost", "bad_event_size")
# UDP datagrams the kernel saw and could not account (udp.bpf.c): they mark UDP records only
UDP_LOSSES = ("udp_no_peer", "udp_bad_addr", "udp_map_full", "udp_mmsg_over")
CHUNK = 4096  # records built and emitted at a time by an interval drain


class ProbeLoop:
    """The userspace half, independent of bcc: unit-tested against a fake kernel side."""

    name = "socket"

    def __init__(self, ctx: CollectorContext, kernel_factory: Callable[[], KernelSide],
                 builder: RecordBuilder, interval: float = 5.0,
                 udp: UdpTracker | None = None) -> None:
        self.ctx = ctx
        self.udp = udp  # UDP flows (collector/probes/udptrack.py), when the probes see them
        self._udp_lossy = False
        self.kernel_factory = kernel_factory
        self.builder = builder
        self.interval = interval
        self.ready = threading.Event()  # set once the probes are attached
        self._stats: dict[str, int] = {}
        self._lossy = False
        self.tracked: int | None = None  # entries of the connection map at the last drain

    def gauges(self, capacity: int, udp_capacity: int | None = None,
               ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """BPF map fill and the kernel's own counters, for the collector's /metrics: a map near
        its capacity is the warning before `conn_map_full` (`udp_map_full`) losses begin."""
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
            ("eastwest_probe_map_capacity", (("map", "conns"),)): float(capacity)}
        if self.tracked is not None:
            out[("eastwest_probe_map_entries", (("map", "conns"),))] = float(self.tracked)
        if self.udp is not None and udp_capacity is not None:
            out[("eastwest_probe_map_capacity", (("map", "udp_flows"),))] = float(udp_capacity)
            if self.udp.tracked is not None:
                out[("eastwest_probe_map_entries", (("map", "udp_flows"),))] = \
                    float(self.udp.tracked)
        for name, total in sorted(self._stats.items()):
            out[("eastwest_probe_kernel_events_total", (("event", name),))] = float(total)
        return out

    def run(self, emit: Emit, stop: threading.Event) -> None:
        kernel = self.kernel_factory()
        try:
            self.ready.set()
            clock = self.ctx.clock
            next_drain = clock.monotonic() + self.interval
            while not stop.is_set():
                timeout = max(0.0, min(0.2, next_drain - clock.monotonic()))
                self._emit(emit, self.finals(kernel.poll(timeout)))
                if clock.monotonic() >= next_drain:
                    for chunk in self.drain_chunks(kernel):
                        self._emit(emit, chunk)
                    next_drain += self.interval
                    if next_drain < clock.monotonic():  # fell behind: do not burst
                        next_drain = clock.monotonic() + self.interval
            # flush: every close the kernel has sent, then where the open ones stand
            self._emit(emit, self.finals(kernel.poll(0)))
            for chunk in self.drain_chunks(kernel):
                self._emit(emit, chunk)
        finally:
            kernel.close()

    @staticmethod
    def _emit(emit: Emit, records: list[FlowRecord]) -> None:
        if records:
            emit(records)

    def finals(self, states: list[ConnState]) -> list[FlowRecord]:
        if not states:
            return []
        extra = ("lost_events",) if self._lossy else ()
        return self.builder.build_many(states, final=True, now=self.ctx.clock.now(),
                                       extra_incomplete=extra)

    def drain(self, kernel: KernelSide) -> list[FlowRecord]:
        """One interval: loss counters, interim records of live connections, deferred finals."""
        return [r for chunk in self.drain_chunks(kernel) for r in chunk]

    def drain_chunks(self, kernel: KernelSide) -> Iterator[list[FlowRecord]]:
        """`drain` in lists of at most CHUNK records, each built when the previous one has been
        emitted: with 100,000 connections and flows the records of one interval would otherwise
        all be in memory at once (about 1 KB each, and their JSON)."""
        self._account(kernel.stats())
        extra = ("lost_events",) if self._lossy else ()
        now = self.ctx.clock.now()
        live: list[ConnState] = []
        deferred: list[ConnState] = []
        tracked = 0
        for s in kernel.live():  # decoded a chunk at a time by the kernel side
            tracked += 1
            # deferred: the ring buffer was full at its close: finalise it from the map
            (deferred if s.deferred else live).append(s)
            if len(live) == CHUNK:
                yield self.builder.build_many(live, final=False, now=now, extra_incomplete=extra)
                live = []
        self.tracked = tracked
        if live:
            yield self.builder.build_many(live, final=False, now=now, extra_incomplete=extra)
        del live
        if deferred:
            yield self.builder.build_many(deferred, final=True, now=now, extra_incomplete=extra)
            kernel.forget(deferred)
        if self.udp is not None:
            yield from self.udp.drain_chunks(now, ("lost_events",) if self._udp_lossy else (),
                                             CHUNK)

    def _account(self, stats: dict[str, int]) -> None:
        lossy = udp_lossy = False
        for name, total in stats.items():
            delta = total - self._stats.get(name, 0)
            if delta > 0 and (name in LOSSES or name in UDP_LOSSES):
                if name in LOSSES:
                    lossy = True
                else:
                    udp_lossy = True
                self.ctx.drops.count(STAGE, name, delta, detail=f"{delta} in the kernel ({name})")
            elif delta > 0 and name in ("close_deferred", "close_overflowed"):
                log.info("%d close events waited in a map (ring buffer full): %s", delta, name)
        self._stats = dict(stats)
        self._lossy = lossy
        self._udp_lossy = udp_lossy
