"""UDP flow lifetimes: which flows of the kernel's map live on, and which end, every interval.

Stage: inside the socket probe loop (collector/probes/source.py), once per interval.
In: the kernel's UDP flow map (`UdpKernelSide`), the kernel's monotonic clock, which sockets
still exist (`SocketLiveness`). Out: interim records of live flows, final records of flows
that ended, taken out of the map.

A flow ends when no datagram moved either way for the idle timeout (`--idle-timeout`, the
one the wire view uses, so both views cut a flow at the same silence), or when its socket is
closed. A UDP socket's close has no tracepoint (no kprobes here: `udp_destroy_sock` and
`inet_release` cannot be hooked), so the socket's inode number, kept in the flow's key, is
looked up among the live UDP sockets of its namespace (/proc/PID/net/udp and udp6 of a process
in that namespace, the sock_diag view the kernel also gives netlink) at each interval: a
closed socket's flows end within one interval. The final record's `end` is the flow's last
datagram (as for the wire view's idle flows).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path

from collector.probes.udpflow import UdpKernelSide, UdpState
from collector.probes.udprecords import UdpRecordBuilder
from eastwest.record import FlowRecord

PROC = Path("/proc")


class SocketLiveness:
    """Whether a UDP socket (by inode number) still exists, per interval.

    The live sockets of a namespace are read once per `refresh` from /proc/PID/net/udp{,6} of
    a process known to be in it (the latest owners of its flows). When none of them exists any
    more, their sockets are taken as closed (a socket inherited by a child that has not used
    it since is the exception: its flow ends early, and the child's next datagram starts a new
    one). When they exist but live in other namespaces now, the answer is "alive": the idle
    timeout ends the flow."""

    def __init__(self, proc: Path = PROC) -> None:
        self.proc = proc
        self._live: dict[int, set[int] | None] = {}

    def refresh(self, states: Iterable[UdpState]) -> None:
        pids: dict[int, set[int]] = {}
        for s in states:
            pids.setdefault(s.netns, set()).add(s.pid)
        self._live = {ns: self._inodes(ns, sorted(p)) for ns, p in pids.items()}

    def alive(self, s: UdpState) -> bool:
        if not s.ino:
            return True  # no inode to look for: only the idle timeout ends it
        live = self._live.get(s.netns)
        return True if live is None else s.ino in live

    def _inodes(self, netns: int, pids: list[int]) -> set[int] | None:
        """The inodes of the namespace's UDP sockets; an empty set when none of its processes
        exists; None when none can tell (the processes live in other namespaces now)."""
        exists = False
        for pid in pids:
            base = self.proc / str(pid)
            try:
                if os.stat(base / "ns" / "net").st_ino != netns:
                    exists = True
                    continue
                text = (base / "net" / "udp").read_text() + (base / "net" / "udp6").read_text()
            except OSError:
                continue
            return {int(f[9]) for f in (line.split() for line in text.splitlines()[1:])
                    if len(f) > 9 and f[9].isdigit()}
        return None if exists else set()


class UdpTracker:
    """Interim and final records of the kernel's UDP flows; its clock and liveness injectable."""

    def __init__(self, builder: UdpRecordBuilder, idle_timeout: float,
                 mono_ns: Callable[[], int] = time.monotonic_ns,
                 liveness: SocketLiveness | None = None) -> None:
        self.builder = builder
        self.idle_ns = int(idle_timeout * 1e9)
        self.mono_ns = mono_ns  # the kernel's bpf_ktime_get_ns() clock: CLOCK_MONOTONIC
        self.liveness = liveness or SocketLiveness()
        self.kernel: UdpKernelSide | None = None
        self.tracked: int | None = None  # flows in the map at the last drain

    def attach(self, kernel: UdpKernelSide, at_ns: int) -> None:
        """Read flows from `kernel`, whose probes were attached at `at_ns` (kernel clock)."""
        self.kernel = kernel
        self.builder.attached_at(at_ns)

    def drain(self, now: datetime, extra_incomplete: tuple[str, ...] = ()) -> list[FlowRecord]:
        """One interval: flows idle for the timeout or whose socket closed end (final
        records), the rest get interim records."""
        return [r for chunk in self.drain_chunks(now, extra_incomplete) for r in chunk]

    def drain_chunks(self, now: datetime, extra_incomplete: tuple[str, ...] = (),
                     chunk: int = 4096) -> Iterator[list[FlowRecord]]:
        """`drain` in lists of at most `chunk` records, each built after the previous one was
        taken (the records of 100,000 flows are not all in memory at once)."""
        if self.kernel is None:
            return
        states = self.kernel.udp_flows()
        self.tracked = len(states)
        if not self.tracked:
            return
        t = self.mono_ns()
        self.liveness.refresh(states)  # one pass; the states are not kept
        live: list[UdpState] = []
        ending: list[UdpState] = []
        for s in states:  # a second pass (a kernel side may decode the entries anew)
            if t - s.last_ns >= self.idle_ns or not self.liveness.alive(s):
                ending.append(s)
                continue
            live.append(s)
            if len(live) == chunk:
                yield self.builder.build_many(live, final=False, now=now,
                                              extra_incomplete=extra_incomplete)
                live = []
        del states
        if live:
            yield self.builder.build_many(live, final=False, now=now,
                                          extra_incomplete=extra_incomplete)
        del live
        for i in range(0, len(ending), chunk):
            finals = self.kernel.udp_end(ending[i:i + chunk])
            yield self.builder.build_many(finals, final=True, now=now,
                                          extra_incomplete=extra_incomplete)
