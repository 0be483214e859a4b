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
from eastwest.record import Cgroup, Endpoint, FlowRecord, Rtt

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
    """Turns kernel states into records; holds the caches that make that cheap.

    Per record the work is a few dict lookups and one `FlowRecord` construction (which still
    validates): address texts, loopback flags, `Process` and `Cgroup` objects and the
    `incomplete` prefix are computed once per distinct value and reused."""

    def __init__(self, ctx: CollectorContext, kclock: KernelClock,
                 procs: ProcessCache | None = None, missing: tuple[str, ...] = (),
                 cache_entries: int = 65536) -> None:
        self.ctx = ctx
        self.kclock = kclock
        self.procs = procs or ProcessCache()
        self.missing = tuple(missing)  # measurements the running probes cannot make
        self.cache_entries = cache_entries
        # (family, raw address) -> (4|6, text, is loopback)
        self._addrs: dict[tuple[int, bytes], tuple[int, str, bool]] = {}
        # (ip, port) of servers -> Endpoint: few listening ends serve many connections
        self._servers: dict[tuple[str, int], Endpoint] = {}
        # cgroup id -> (Cgroup, container id), once its path is known
        self._cgroups: dict[int, tuple[Cgroup, str | None]] = {}
        # extra incomplete labels -> self.missing + those, without duplicates
        self._incomplete: dict[tuple[str, ...], tuple[str, ...]] = {}

    def _address(self, family: int, raw: bytes) -> tuple[int, str, bool]:
        key = (family, raw)
        hit = self._addrs.get(key)
        if hit is None:
            fam, text = address(family, raw)  # ValueError: counted by the caller
            hit = (fam, text, ipaddress.ip_address(text).is_loopback)
            if len(self._addrs) >= self.cache_entries:
                self._addrs.clear()
            self._addrs[key] = hit
        return hit

    def _server(self, ip: str, port: int) -> Endpoint:
        key = (ip, port)
        ep = self._servers.get(key)
        if ep is None:
            ep = Endpoint(ip, port)
            if len(self._servers) >= self.cache_entries:
                self._servers.clear()
            self._servers[key] = ep
        return ep

    def _cgroup(self, cgroup_id: int) -> tuple[Cgroup, str | None]:
        hit = self._cgroups.get(cgroup_id)
        if hit is not None:
            return hit
        path = self.procs.cgroup_path(cgroup_id)
        out = (Cgroup(id=cgroup_id, path=path), container_id(path))
        if path is not None:  # an unknown id may be found by a later rescan: not cached
            if len(self._cgroups) >= self.cache_entries:
                self._cgroups.clear()
            self._cgroups[cgroup_id] = out
        return out

    def cgroup(self, cgroup_id: int) -> tuple[Cgroup, str | None]:
        """The cgroup (id and path) and container id of a cgroup id, cached."""
        return self._cgroups.get(cgroup_id) or self._cgroup(cgroup_id)

    def _incomplete_base(self, extra: tuple[str, ...]) -> tuple[str, ...]:
        base = self._incomplete.get(extra)
        if base is None:
            base = self.missing + tuple(x for x in extra if x not in self.missing)
            self._incomplete[extra] = base
        return base

    def build(self, s: ConnState, *, final: bool, now: datetime,
              extra_incomplete: tuple[str, ...] = ()) -> FlowRecord | None:
        """The record of one state, or None (counted in Drops) when it cannot be one."""
        out = self.build_many([s], final=final, now=now, extra_incomplete=extra_incomplete)
        return out[0] if out else None

    def build_many(self, states: list[ConnState], *, final: bool, now: datetime,
                   extra_incomplete: tuple[str, ...] = ()) -> list[FlowRecord]:
        """The records of a batch of states, in order; a state that cannot be a record is
        skipped and counted in Drops. One loop with everything it needs bound once per batch:
        this runs twice per connection."""
        ctx = self.ctx
        collector, next_id = ctx.collector_id, ctx.next_record_id
        to_utc = self.kclock.to_utc
        addrs, servers, cgroups = self._addrs, self._servers, self._cgroups
        process_of = self.procs.process
        base = self._incomplete_base(extra_incomplete)
        out: list[FlowRecord] = []
        for s in states:
            (sk, start_ns, role, phase, family, saddr, daddr, sport, dport, netns, end_ns,
             bytes_sent, bytes_recv, rtt_sum_us, rtt_count, rtt_min_us, rtt_max_us, retransmits,
             resets_sent, resets_recv, pid, cgroup_id, owner, _sk_err, _oldstate, _tcp_closed,
             _deferred, comm) = s
            if phase == PHASE_CONNECTING and not final:
                continue  # the handshake has not finished: nothing to report yet
            if not sport or not dport:
                ctx.drops.count(STAGE, "no_tuple", detail=f"socket {sk:#x} without ports")
                continue
            a = addrs.get((family, saddr))
            b = addrs.get((family, daddr))
            if a is None or b is None:
                try:
                    a = self._address(family, saddr)
                    b = self._address(family, daddr)
                except ValueError:
                    ctx.drops.count(STAGE, "bad_address", detail=f"family {family}")
                    continue
            fam, local, local_lo = a
            if fam != b[0]:  # a mapped and a real v6 address: keep both as IPv6
                local, remote = (str(ipaddress.IPv6Address(saddr[:16])),
                                 str(ipaddress.IPv6Address(daddr[:16])))
                local_lo = ipaddress.IPv6Address(local).is_loopback
                remote_lo = ipaddress.IPv6Address(remote).is_loopback
                fam = 6
            else:
                remote, remote_lo = b[1], b[2]
            is_client = role == ROLE_CLIENT
            if is_client:
                client = Endpoint(local, sport)
                server = servers.get((remote, dport)) or self._server(remote, dport)
                c2s, s2c = bytes_sent, bytes_recv
            else:
                client = Endpoint(remote, dport)
                server = servers.get((local, sport)) or self._server(local, sport)
                c2s, s2c = bytes_recv, bytes_sent
            start = to_utc(start_ns)
            end = to_utc(end_ns) if (final and end_ns) else now
            if end < start:
                end = start
            incomplete = list(base)
            if owner != OWNER_NONE:
                process = process_of(pid, comm)
            else:
                process = None
                incomplete.append("process")
            cgroup: Cgroup | None = None
            cont: str | None = None
            if cgroup_id:
                cgroup, cont = cgroups.get(cgroup_id) or self._cgroup(cgroup_id)
            rtt = None
            if rtt_count:
                avg = rtt_sum_us // rtt_count
                rtt = Rtt(min=rtt_min_us, avg=min(max(avg, rtt_min_us), rtt_max_us),
                          max=rtt_max_us)
            out.append(FlowRecord(
                record_id=next_id(), collector=collector, source="socket",
                start=start, end=end, final=final, protocol="tcp", family=fam,  # type: ignore[arg-type]
                client=client, server=server, observer="client" if is_client else "server",
                bytes_c2s=c2s, bytes_s2c=s2c, connect=connect_outcome(s, final),  # type: ignore[arg-type]
                retransmits=retransmits, resets=resets_sent + resets_recv, rtt_us=rtt,
                process=process, netns=netns or None, cgroup=cgroup, container=cont,
                loopback=local == remote or local_lo or remote_lo, incomplete=incomplete,
            ))
        return out
