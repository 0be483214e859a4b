"""Record building: one kernel `ConnState` -> one `FlowRecord` (source="socket").

Stage: after the kernel side (map drains and close events), before the sink.
In: `ConnState`s, whether each is final, what the running probes cannot measure.
Out: `FlowRecord`s as docs/flow-record.md defines them: cumulative counters, orientation from
the socket's role (client: it called connect(), server: it was accepted), the owner process.

Rules (kernel facts from include/trace/events/sock.h and net/ipv4/tcp_input.c tcp_reset()):
- client record: client = (saddr, sport), bytes_c2s = bytes the socket sent; server record:
  client = (daddr, dport), bytes_c2s = bytes it received.
- connect: `refused` when a SYN_SENT socket closed with ECONNREFUSED (or after an RST),
  `timeout` when it closed with any other error, null when the application gave up first;
  for established connections `reset` when an RST ended them (sent or received), else `ok`.
- IPv4-mapped IPv6 addresses of dual-stack sockets are reported as IPv4 (family 4).
- loopback: a loopback address, or both ends on the same address (the namespace talking to
  itself).
"""

from __future__ import annotations

import ipaddress
from datetime import datetime

from collector.pipeline import CollectorContext
from collector.probes.conn import (
    AF_INET,
    ECONNREFUSED,
    OWNER_NONE,
    PHASE_CONNECTING,
    ROLE_CLIENT,
    TCP_SYN_SENT,
    ConnState,
)
from collector.proc import ProcessCache, container_id
from eastwest.clock import KernelClock
from eastwest.record import Cgroup, Endpoint, FlowRecord, Process, Rtt

STAGE = "socket"


def address(family: int, raw: bytes) -> tuple[int, str]:
    """(4|6, canonical text) of a tracepoint address; IPv4-mapped IPv6 becomes IPv4."""
    if family == AF_INET:
        return 4, str(ipaddress.IPv4Address(raw[:4]))
    v6 = ipaddress.IPv6Address(raw[:16])
    if v6.ipv4_mapped is not None:
        return 4, str(v6.ipv4_mapped)
    return 6, str(v6)


def connect_outcome(s: ConnState, final: bool) -> str | None:
    if s.phase == PHASE_CONNECTING or (s.tcp_closed and s.close_oldstate == TCP_SYN_SENT):
        if not s.tcp_closed:
            return None
        if s.sk_err == ECONNREFUSED or s.resets_recv:
            return "refused"
        return "timeout" if s.sk_err else None
    if final and (s.resets_sent or s.resets_recv):
        return "reset"
    return "ok"


class RecordBuilder:
    """Turns kernel states into records; holds the caches that make that cheap."""

    def __init__(self, ctx: CollectorContext, kclock: KernelClock,
                 procs: ProcessCache | None = None, missing: tuple[str, ...] = ()) -> None:
        self.ctx = ctx
        self.kclock = kclock
        self.procs = procs or ProcessCache()
        self.missing = tuple(missing)  # measurements the running probes cannot make

    def build(self, s: ConnState, *, final: bool, now: datetime,
              extra_incomplete: tuple[str, ...] = ()) -> FlowRecord | None:
        """The record of one state, or None (counted in Drops) when it cannot be one."""
        if s.phase == PHASE_CONNECTING and not final:
            return None  # the handshake has not finished: nothing to report yet
        if not s.sport or not s.dport:
            self.ctx.drops.count(STAGE, "no_tuple", detail=f"socket {s.sk:#x} without ports")
            return None
        try:
            fam_s, local = address(s.family, s.saddr)
            fam_d, remote = address(s.family, s.daddr)
        except ValueError:
            self.ctx.drops.count(STAGE, "bad_address", detail=f"family {s.family}")
            return None
        if fam_s != fam_d:  # a mapped and a real v6 address: keep both as IPv6
            local, remote = (str(ipaddress.IPv6Address(s.saddr[:16])),
                             str(ipaddress.IPv6Address(s.daddr[:16])))
            fam_s = 6
        is_client = s.role == ROLE_CLIENT
        if is_client:
            client, server = Endpoint(local, s.sport), Endpoint(remote, s.dport)
            c2s, s2c = s.bytes_sent, s.bytes_recv
        else:
            client, server = Endpoint(remote, s.dport), Endpoint(local, s.sport)
            c2s, s2c = s.bytes_recv, s.bytes_sent
        start = self.kclock.to_utc(s.start_ns)
        end = self.kclock.to_utc(s.end_ns) if (final and s.end_ns) else now
        if end < start:
            end = start
        incomplete = list(self.missing) + [x for x in extra_incomplete if x not in self.missing]
        process = None
        if s.owner != OWNER_NONE:
            process = Process(pid=s.pid, comm=s.comm, cmdline=self.procs.cmdline(s.pid, s.comm))
        else:
            incomplete.append("process")
        cgroup = cont = None
        if s.cgroup_id:
            path = self.procs.cgroup_path(s.cgroup_id)
            cgroup, cont = Cgroup(id=s.cgroup_id, path=path), container_id(path)
        rtt = None
        if s.rtt_count:
            avg = s.rtt_sum_us // s.rtt_count
            rtt = Rtt(min=s.rtt_min_us, avg=min(max(avg, s.rtt_min_us), s.rtt_max_us),
                      max=s.rtt_max_us)
        return FlowRecord(
            record_id=self.ctx.next_record_id(), collector=self.ctx.collector_id, source="socket",
            start=start, end=end, final=final, protocol="tcp", family=fam_s,  # type: ignore[arg-type]
            client=client, server=server, observer="client" if is_client else "server",
            bytes_c2s=c2s, bytes_s2c=s2c, connect=connect_outcome(s, final),  # type: ignore[arg-type]
            retransmits=s.retransmits, resets=s.resets_sent + s.resets_recv, rtt_us=rtt,
            process=process, netns=s.netns or None, cgroup=cgroup, container=cont,
            loopback=_loopback(client.ip, server.ip), incomplete=incomplete,
        )


def _loopback(a: str, b: str) -> bool:
    return a == b or ipaddress.ip_address(a).is_loopback or ipaddress.ip_address(b).is_loopback
