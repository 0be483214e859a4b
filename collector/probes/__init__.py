"""eBPF socket probes: every TCP connection and UDP flow of every process, from stable tracepoints.

Stage: a collector source. In: the running kernel (tracepoints `sock:inet_sock_set_state`,
`sock:sock_send_length`, `sock:sock_recv_length`, `tcp:*`, the send/recv `syscalls:*`; see
socket.bpf.c and udp.bpf.c). Out: `FlowRecord`s with source="socket", one per connection (UDP:
flow) per interval (`final=False`) and one at its end.

Modules: `btf` (struct offsets and raw tracepoint prototypes from the running kernel's BTF),
`kernel` (compile, attach, read maps), `conn` (the kernel's per-socket state as Python and the
`KernelSide` interface), `records` (state -> record), `source` (the drain loop); UDP:
`udpflow` (a flow's state, `UdpKernelSide`), `udprecords` (flow -> record, orientation, local
address), `udptrack` (idle timeout, closed sockets).
`collector.capabilities` decides which hooks run; `collector.proc` and `collector.netns` attribute.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path

from collector.pipeline import CollectorContext, Emit
from collector.probes.kernel import ENTRY_PAIR_BYTES, ProbeConfig, program_text
from collector.probes.sizing import map_sizes
from eastwest.clock import KernelClock
from eastwest.errors import ConfigError

__all__ = ["SocketProbeSource", "bpf_source", "probe_config"]
log = logging.getLogger("eastwest.collector.probes")


def probe_config(args: argparse.Namespace, hooks: frozenset[str] | None = None) -> ProbeConfig:
    """Settings of the probes from the collector's flags (names the bad value)."""
    from collector.netns import resolve_all

    sizes = map_sizes(getattr(args, "map_entries", None), ENTRY_PAIR_BYTES)
    interval = float(getattr(args, "interval", 5.0))
    if not interval > 0:
        raise ConfigError("--interval", interval, "must be > 0 seconds")
    idle_timeout(args)
    cfg = ProbeConfig(conn_entries=sizes.entries, udp_entries=sizes.entries,
                      udp_call_entries=sizes.udp_calls,
                      netns=resolve_all(list(getattr(args, "netns", []) or [])))
    if hooks is None:
        hooks = cfg.hooks
    if getattr(args, "no_udp", False):  # the syscall hooks tax every send/recv call: opt out
        hooks = hooks - {"udp"}
    return ProbeConfig(conn_entries=cfg.conn_entries, udp_entries=cfg.udp_entries,
                       udp_call_entries=cfg.udp_call_entries, netns=cfg.netns, hooks=hooks)


def idle_timeout(args: argparse.Namespace) -> float:
    """`--idle-timeout`: seconds without a datagram after which a UDP flow ends."""
    idle = float(getattr(args, "idle_timeout", 30.0))
    if not idle > 0:
        raise ConfigError("--idle-timeout", idle, "must be > 0 seconds")
    return idle


def cgroup_root(args: argparse.Namespace) -> Path | None:
    """`--cgroup-root`: a cgroup v2 tree (its root holds `cgroup.controllers`; on a hybrid host
    the tmpfs above it, whose `unified/` is the tree), else None (this system's own mount)."""
    given = getattr(args, "cgroup_root", None)
    if not given:
        return None
    for root in (Path(given), Path(given) / "unified"):  # a hybrid host's tmpfs: its cgroup2
        if (root / "cgroup.controllers").is_file():
            return root
    raise ConfigError("--cgroup-root", given, "is not a cgroup v2 tree (no cgroup.controllers "
                      "in it or in its unified/); give the host's cgroup2 mount, e.g. "
                      "/sys/fs/cgroup")


def bpf_source(args: argparse.Namespace) -> str:
    """The BPF C program exactly as it would be compiled on this kernel with these flags."""
    from collector.capabilities import probe

    caps = probe()
    return program_text(caps.offsets, probe_config(args, caps.features()),  # type: ignore[arg-type]
                        caps.udp_offsets)  # type: ignore[arg-type]


class SocketProbeSource:
    """`collector.pipeline.Source` over the eBPF socket probes. `ready` is set once attached."""

    name = "socket"

    def __init__(self, ctx: CollectorContext, args: argparse.Namespace) -> None:
        from collector.capabilities import probe
        from collector.probes.records import RecordBuilder
        from collector.probes.source import ProbeLoop
        from collector.probes.udprecords import UdpRecordBuilder
        from collector.probes.udptrack import UdpTracker
        from collector.proc import ProcessCache

        caps = probe()
        caps.require()  # CapabilityError naming what is missing
        caps.warn_once(log)
        self.config = probe_config(args, caps.features())
        self.offsets = caps.offsets
        self.procs = ProcessCache(cgroup_root=cgroup_root(args))
        builder = RecordBuilder(ctx, KernelClock(), self.procs, caps.missing_measurements())
        self.udp_offsets = caps.udp_offsets if self.config.udp() else None
        self.udp: UdpTracker | None = None
        if self.udp_offsets is not None:
            idle = idle_timeout(args)
            self.udp = UdpTracker(UdpRecordBuilder(builder, int(idle * 1e9)), idle)
        self.loop = ProbeLoop(ctx, self._load, builder, interval=float(args.interval),
                              udp=self.udp)
        self.ready: threading.Event = self.loop.ready

    def _load(self):  # noqa: ANN202 - a KernelSide
        from collector.probes.kernel import BccKernel
        from collector.proc import listening_owners

        owners = listening_owners(self.config.netns, cache=self.procs)
        kernel = BccKernel(self.offsets, self.config, owners,  # type: ignore[arg-type]
                           on_process=self.procs.process,
                           udp=self.udp_offsets)  # type: ignore[arg-type]
        if self.udp is not None:
            self.udp.attach(kernel, time.monotonic_ns())
        log.info("socket probes attached: %s; netns scope %s; %d existing listeners; maps of "
                 "%d connections and %d UDP flows, %.1f MiB of kernel memory",
                 ", ".join(sorted(self.config.hooks)), list(self.config.netns) or "all",
                 len(owners), self.config.conn_entries, self.config.udp_entries,
                 kernel.bpf.memlock() / 2**20)
        return kernel

    def run(self, emit: Emit, stop: threading.Event) -> None:
        self.loop.run(emit, stop)

    def gauges(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """`eastwest_probe_map_entries` / `_capacity{map="conns"}` and the kernel's counters
        (`eastwest_probe_kernel_events_total{event}`), read at each interval drain; the kernel
        memory of each map and ring (`eastwest_probe_map_memory_bytes{map}`)."""
        out = self.loop.gauges(self.config.conn_entries,
                               self.config.udp_entries if self.udp is not None else None)
        for name, _, size in self.config.map_memory():  # preallocated: fixed for the process
            label = name.split()[0]  # "events (ring)" -> events
            out[("eastwest_probe_map_memory_bytes", (("map", label),))] = float(size)
        return out
