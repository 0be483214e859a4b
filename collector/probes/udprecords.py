"""Record building for UDP flows: one kernel `UdpState` -> one `FlowRecord` (source="socket").

Stage: after the UDP flow tracker (collector/probes/udptrack.py), before the sink.
In: `UdpState`s, whether each is final, the collector's attach time and idle timeout.
Out: `FlowRecord`s with protocol "udp", as docs/flow-record.md defines them: cumulative
datagrams (`packets_*`) and payload bytes (`bytes_*`) per direction, the owner process, netns
and cgroup, `connect` "refused" after ECONNREFUSED, else null.

Orientation (docs/collector.md, "UDP"): the client is the end that sent the flow's first
datagram. The probes know it only for flows that began at least one idle timeout after they
were attached: an earlier datagram of the same flow would have been sent before the probes
saw anything, and the flow would not have idled out since. For flows first seen before that,
this observer cannot know, and the port rule every observer shares decides
(collector/orientation.py, as the wire view does).

The local address: the socket's bound address, or for a wildcard-bound socket the address the
kernel's routing picks to reach the peer in the socket's namespace (`LocalAddresses`).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from collector.orientation import client_by_ports
from collector.probes.conn import AF_INET
from collector.probes.records import STAGE, RecordBuilder, address
from collector.probes.udpflow import FIRST_SENT, UdpState
from eastwest.record import Endpoint, FlowRecord

log = logging.getLogger("eastwest.collector.probes")
CLONE_NEWNET = 0x40000000
ZERO16 = bytes(16)


def local_is_client(s: UdpState, known: bool) -> bool:
    """Whether this socket's end is the flow's client: the first datagram's sender when the
    observer knows it (`known`), else the shared port rule (equal ports: the first datagram)."""
    first_sent = s.first == FIRST_SENT
    if known:
        return first_sent
    by_ports = client_by_ports(s.lport, s.rport)
    return first_sent if by_ports is None else by_ports


class LocalAddresses:
    """The source address the kernel picks for a peer in a network namespace, the way it does
    for a datagram from a wildcard-bound socket: a UDP socket in that namespace is connected to
    the peer (no packet leaves) and asked for its name. Cached per (netns, peer).

    The namespace is entered through /proc/PID/ns/net of the socket's owner, in a short-lived
    thread (setns changes only the calling thread). `resolve` is injectable for tests."""

    def __init__(self, resolve: Callable[[int, int, str], str | None] | None = None,
                 entries: int = 65536) -> None:
        self._resolve = resolve or self._route
        self._cache: dict[tuple[int, str], str | None] = {}
        self.entries = entries
        self._own_netns = _netns_of("self")
        self._paths: dict[int, str] = {}  # netns -> a file that held it last time

    def source_for(self, netns: int, pid: int, peer: str) -> str | None:
        key = (netns, peer)
        if key not in self._cache:
            if len(self._cache) >= self.entries:
                self._cache.clear()
            self._cache[key] = self._resolve(netns, pid, peer)
        return self._cache[key]

    def _route(self, netns: int, pid: int, peer: str) -> str | None:
        out: list[str] = []

        def work() -> None:
            try:
                if netns and netns != self._own_netns:
                    path = self._netns_path(netns, pid)
                    if path is None:
                        return  # no handle on that namespace any more: unknown
                    libc = ctypes.CDLL(None, use_errno=True)
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        if libc.setns(fd, CLONE_NEWNET) != 0:
                            return
                    finally:
                        os.close(fd)
                fam = socket.AF_INET6 if ":" in peer else socket.AF_INET
                with socket.socket(fam, socket.SOCK_DGRAM) as s:
                    s.connect((peer, 9))
                    out.append(s.getsockname()[0])
            except OSError as exc:
                log.debug("no source address for %s in netns %d: %s", peer, netns, exc)

        t = threading.Thread(target=work, name="ew-udp-route", daemon=True)
        t.start()
        t.join(5)
        return str(ipaddress.ip_address(out[0].split("%")[0])) if out else None


    def _netns_path(self, netns: int, pid: int) -> str | None:
        """A file that holds the namespace: the owner's /proc/PID/ns/net, else a name under
        /run/netns, else any process's that lives in it (the owner may be gone already)."""
        own = f"/proc/{pid}/ns/net"
        if _inode(own) == netns:
            return own
        cached = self._paths.get(netns)
        if cached is not None and _inode(cached) == netns:
            return cached
        candidates = [str(p) for p in Path("/run/netns").glob("*")]
        candidates += [f"{p}/ns/net" for p in Path("/proc").glob("[0-9]*")]
        for path in candidates:
            if _inode(path) == netns:
                self._paths[netns] = path
                return path
        return None


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def _netns_of(pid: str) -> int:
    return _inode(f"/proc/{pid}/ns/net")


class UdpRecordBuilder:
    """UDP states -> records; shares the TCP builder's process, cgroup and address caches."""

    def __init__(self, base: RecordBuilder, idle_ns: int,
                 local: LocalAddresses | None = None) -> None:
        self.base = base
        self.idle_ns = idle_ns
        self.known_from_ns = 1 << 63  # flows first seen from here: orientation known
        self.local = local or LocalAddresses()

    def attached_at(self, ktime_ns: int) -> None:
        """The probes saw every datagram from `ktime_ns` (kernel monotonic clock) on."""
        self.known_from_ns = ktime_ns + self.idle_ns

    def build_many(self, states: list[UdpState], *, final: bool, now: datetime,
                   extra_incomplete: tuple[str, ...] = ()) -> list[FlowRecord]:
        b, ctx = self.base, self.base.ctx
        to_utc = b.kclock.to_utc
        out: list[FlowRecord] = []
        for s in states:
            if not s.lport or not s.rport:
                ctx.drops.count(STAGE, "no_tuple", detail=f"udp socket {s.sk:#x} without ports")
                continue
            try:
                fam, remote = address(s.family, s.raddr)
                local = self._local(s, fam, remote)
            except ValueError:
                ctx.drops.count(STAGE, "bad_address", detail=f"udp family {s.family}")
                continue
            incomplete = list(b.missing) + [x for x in extra_incomplete if x not in b.missing]
            if local is None:
                local = "0.0.0.0" if fam == 4 else "::"
                incomplete.append("local_address")
            is_client = local_is_client(s, s.start_ns >= self.known_from_ns)
            if is_client:
                client, server = Endpoint(local, s.lport), Endpoint(remote, s.rport)
                c2s, s2c = (s.bytes_sent, s.dgrams_sent), (s.bytes_recv, s.dgrams_recv)
            else:
                client, server = Endpoint(remote, s.rport), Endpoint(local, s.lport)
                c2s, s2c = (s.bytes_recv, s.dgrams_recv), (s.bytes_sent, s.dgrams_sent)
            start = to_utc(s.start_ns)
            end = to_utc(s.last_ns) if final else now
            if end < start:
                end = start
            process = b.procs.process(s.pid, s.comm) if s.pid else None
            if process is None:
                incomplete.append("process")
            cgroup, container = b.cgroup(s.cgroup_id) if s.cgroup_id else (None, None)
            lo = ipaddress.ip_address(local).is_loopback or ipaddress.ip_address(remote).is_loopback
            out.append(FlowRecord(
                record_id=ctx.next_record_id(), collector=ctx.collector_id, source="socket",
                start=start, end=end, final=final, protocol="udp", family=fam,  # type: ignore[arg-type]
                client=client, server=server, observer="client" if is_client else "server",
                bytes_c2s=c2s[0], bytes_s2c=s2c[0], packets_c2s=c2s[1], packets_s2c=s2c[1],
                connect="refused" if s.refused else None, process=process,
                netns=s.netns or None, cgroup=cgroup, container=container,
                loopback=lo or local == remote, incomplete=incomplete))
        return out

    def _local(self, s: UdpState, fam: int, remote: str) -> str | None:
        """The socket's own address for this flow (ValueError: not an address)."""
        raw = s.laddr if s.lfamily != AF_INET else s.laddr[:4]
        if raw.strip(b"\0"):
            lfam, text = address(s.lfamily, raw)
            if lfam == fam:
                return text
        # wildcard-bound (or a v6 socket's :: facing an IPv4-mapped peer): routing decides
        return self.local.source_for(s.netns, s.pid, remote)
