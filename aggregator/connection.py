"""The merged connection: one row per connection, whatever subset of observers reported it.

Stage: the data model between correlation (aggregator/correlate.py) and the store.
In:  `View`s, one per observer of a connection (its client's collector, its server's collector,
     each collector that saw it on the wire), each the latest cumulative record of that observer.
Out: the derived, stored values of the connection: best counters, outcome, who observed it, the
     per-observer byte counts, and the `byte_mismatch` flag.

Rules (docs/aggregator.md):
- Counters are cumulative per observer (docs/flow-record.md); the connection's counters are the
  BEST view: the maximum over the socket views (client, server), which count application
  payload exactly; path views (which also count retransmitted payload) only when no socket view
  exists. Retransmits add the client's and the server's (each counts its own sending side).
  Packets likewise: the maximum over the socket views that counted them (UDP socket views count
  datagrams, exactly; TCP socket views count none), else over the path views that did; in the
  stored row null, not 0, when no view counted them (`packets()`).
- `byte_mismatch`: the client's and the server's final byte counts (or a final path count against
  them) differ by more than the retransmitted segments can explain (retransmits x MSS). A
  meshed connection (`mesh`, aggregator/mesh.py) compares its socket views only: its wire
  carries the proxies' framing besides the application's bytes.
- Drops (records of source `drops`): one view per collector and drop reason (slot
  `drops:<collector>:<reason>`, its packets in `packets_c2s`). They count for the connection's
  time span, `observed_by` and `incomplete`, never for its counters, connect or byte checks; they
  close it only when nothing else observed it (a drop source's final record means "no drop for
  a while", not "closed"). `drops()`: packets by reason, summed over the collectors.
  One exception for connect: a UDP datagram dropped as `NO_SOCKET` went to a port where nobody
  listens (the kernel answered ICMP port unreachable), so that drops view carries connect
  `refused` (`refused_by_drop`), the connection's connect when no other view has one: how an
  unconnected client socket, which learns nothing of the ICMP error, gets its `refused`.

The properties below define each value; `summary()` computes all of them in one pass over the
views (what the store writes for every connection a batch touched), and must agree with them
(tests/unit/test_correlate.py checks it on random connections).
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import msgspec

from eastwest.filters import dropped_outcome, outcome_of
from eastwest.record import MeshHop

MSS = 1460  # the bytes one retransmitted segment can add on the wire (Ethernet MSS)
_NO_BYTES = (None, None)
# observed_by as stored (",client,path,": sorted, comma-wrapped) by bit set client=1 path=2 server=4
# (drops=8: appended, it sorts after client)
_OBSERVED = {m: "," + ",".join(n for b, n in ((1, "client"), (8, "drops"), (2, "path"), (4, "server"))
                               if m & b) + ","
             for m in range(1, 16)}
_OBS_BIT = {"client": 1, "path": 2, "server": 4, "drops": 8}
DROPS = "drops"  # the observer of a drops view (a record of source `drops`)


def refused_by_drop(protocol: str, reason: str | None) -> bool:
    """Whether a drop makes its connection `refused`: a UDP datagram no socket wanted
    (net/ipv4/udp.c and net/ipv6/udp.c `__udp*_lib_rcv`: ICMP port unreachable, then the drop
    with SKB_DROP_REASON_NO_SOCKET)."""
    return protocol == "udp" and reason == "NO_SOCKET"


def _mismatch(client: View | None, server: View | None, final_paths: list[View],
              retrans: int) -> bool:
    """The final client and server byte counts, or a final path count against them, differ by
    more than `retrans` retransmitted segments explain (the wire may exceed them by its own
    retransmits, never fall short)."""
    tolerance = retrans * MSS
    c = client if client is not None and client.final else None
    s = server if server is not None and server.final else None
    if c is not None and s is not None:
        if (abs(c.bytes_c2s - s.bytes_c2s) > tolerance
                or abs(c.bytes_s2c - s.bytes_s2c) > tolerance):
            return True
    if c is None and s is None:
        return False
    socket = [v for v in (c, s) if v is not None]
    for p in final_paths:
        path_tol = max(tolerance, p.retransmits * MSS)
        for v in socket:
            if (p.bytes_c2s - v.bytes_c2s > path_tol or v.bytes_c2s - p.bytes_c2s > 0
                    or p.bytes_s2c - v.bytes_s2c > path_tol or v.bytes_s2c - p.bytes_s2c > 0):
                return True
    return False


class Summary(NamedTuple):
    """Every derived value of a connection (the store's columns), from one pass over its views."""

    start: datetime
    last_seen: datetime
    closed_at: datetime | None          # closed = closed_at is not None
    observed_by: str                    # ",client,path,server," (sorted, comma-wrapped)
    connect: str | None
    best: tuple[int, int, int, int, int, int]
    packets: tuple[int | None, int | None]  # best's packets, None where no view counted them
    rtt: tuple[int, int, int] | None
    client_bytes: tuple[int | None, int | None]
    server_bytes: tuple[int | None, int | None]
    path_bytes: tuple[int | None, int | None]
    byte_mismatch: bool
    incomplete: bool
    drops: tuple[tuple[str, int], ...] | None = None  # packets by reason (sorted); None: no drops view


# gc=False (as for FlowRecord): the correlator's index holds these for every recent connection,
# and the cyclic GC's full collections kept walking all of them; they cannot form reference
# cycles (a connection holds its views, identities, processes and tunnel; none points back).
# Nothing else changes: fields, encoding, equality.
class View(msgspec.Struct, frozen=True, gc=False):
    """One observer's latest cumulative view of the connection."""

    observer: str          # client | server | path | drops
    collector: str
    start: datetime
    end: datetime
    final: bool
    bytes_c2s: int = 0
    bytes_s2c: int = 0
    packets_c2s: int | None = None
    packets_s2c: int | None = None
    retransmits: int = 0
    resets: int = 0
    connect: str | None = None
    rtt: tuple[int, int, int] | None = None
    incomplete: bool = False
    reason: str | None = None  # a drops view's drop reason (appended: older states have none)

    @property
    def slot(self) -> str:
        """Views are keyed by observer; every wire observer (collector) has its own, and every
        drop source one per drop reason."""
        obs = self.observer
        if obs == "client" or obs == "server":
            return obs
        if obs == DROPS:
            return f"drops:{self.collector}:{self.reason}"
        return f"path:{self.collector}"


class Identity(msgspec.Struct, frozen=True, gc=False):
    """A resolved workload, stored with the connection so history never changes."""

    name: str
    namespace: str | None = None
    kind: str | None = None
    host: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    source: str = "external"  # static | collector | kubernetes | process | dns | cidr | external

    @property
    def wid(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class ProcInfo(msgspec.Struct, frozen=True, gc=False):
    pid: int | None = None
    comm: str | None = None
    netns: int | None = None
    container: str | None = None
    collector: str | None = None


class Tunnel(msgspec.Struct, frozen=True, gc=False):
    vni: int
    vtep_src: str
    vtep_dst: str
    vtep_src_host: str | None = None
    vtep_dst_host: str | None = None
    # the record's tunnel.type (eastwest.record.TunnelType) of whoever supplied the tunnel;
    # states stored before it existed were VXLAN
    type: str = "vxlan"


Counters6 = tuple[int, int, int, int, int, int]


class MeshSide(msgspec.Struct, frozen=True, gc=False):
    """What one socket observer's record told of a service-mesh call (its `mesh`,
    docs/flow-record.md): the sidecar's name and the hops on that observer's host. Kept per
    observer, from the record that made the observer's view (aggregator/mesh.py)."""

    observer: str  # client | server
    proxy: str
    hops: tuple[MeshHop, ...] = ()


class Naming(msgspec.Struct, frozen=True, gc=False):
    """While a connection's end names may still change (docs/aggregator.md, "Naming both ends"):
    until when, and the volumes attributed so far under the current names, by minute, so that
    they move with a name that changes. A connection whose `naming` is None has final names."""

    until: datetime  # the aggregator's wall clock: names are final from then on
    volumes: tuple[tuple[datetime, Counters6], ...] = ()


class Connection(msgspec.Struct, gc=False):
    """One connection, merged. Mutable inside the correlator; stored as a row (and this struct
    as msgpack, so the correlator's index can be rebuilt from the table after a restart)."""

    conn_id: str
    protocol: str
    family: int
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    scope: int                      # netns inode for loopback connections, else 0
    client: Identity
    server: Identity
    views: dict[str, View] = msgspec.field(default_factory=dict)
    client_proc: ProcInfo | None = None
    server_proc: ProcInfo | None = None
    tunnel: Tunnel | None = None
    naming: Naming | None = None    # None: both names are final
    # the address the client dialled when NAT took it to `server_ip` (a Service's ClusterIP
    # and port, from the records' `nat`; aggregator/service.py); None: not translated or unknown
    service_ip: str | None = None
    service_port: int | None = None
    # a folded service-mesh call (aggregator/mesh.py): what the client's and the server's
    # records told of their sidecars, client first; None: not meshed (appended: older states
    # have none)
    mesh: tuple[MeshSide, ...] | None = None

    def clone(self) -> Connection:
        return msgspec.structs.replace(self, views=dict(self.views))

    @property
    def key(self) -> tuple[str, str, int, str, int, int]:
        return (self.protocol, self.client_ip, self.client_port, self.server_ip,
                self.server_port, self.scope)

    def ends_known(self) -> bool:
        """Whether every end is named by what its best-placed observer knows: the static map,
        or the end's own socket observer has reported (its process). Later records can then
        only change a name by a collector-reported workload, rare: the live stream waits for
        this (at most a second), not for `naming` to end (aggregator/fanout.py)."""
        if self.naming is None:
            return True
        views = self.views
        return ((self.client.source == "static" or "client" in views)
                and (self.server.source == "static" or "server" in views))

    # -- derived values -----------------------------------------------------------------------
    @property
    def start(self) -> datetime:
        it = iter(self.views.values())
        t = next(it).start
        for v in it:
            if v.start < t:
                t = v.start
        return t

    @property
    def last_seen(self) -> datetime:
        it = iter(self.views.values())
        t = next(it).end
        for v in it:
            if v.end > t:
                t = v.end
        return t

    @property
    def observed_by(self) -> list[str]:
        return sorted({v.observer for v in self.views.values()})

    def _closing(self) -> list[View]:
        """The views whose `final` closes the connection: all but the drops views, or the drops
        views when nothing else observed it."""
        views = [v for v in self.views.values() if v.observer != DROPS]
        return views or list(self.views.values())

    @property
    def closed(self) -> bool:
        return any(v.final for v in self._closing())

    @property
    def closed_at(self) -> datetime | None:
        ends = [v.end for v in self._closing() if v.final]
        return min(ends) if ends else None

    def drops(self) -> dict[str, int] | None:
        """Dropped packets by reason, summed over the drop sources; None without drops views."""
        out: dict[str, int] | None = None
        for v in self.views.values():
            if v.observer == DROPS:
                out = out if out is not None else {}
                out[v.reason or "UNKNOWN"] = out.get(v.reason or "UNKNOWN", 0) + (v.packets_c2s or 0)
        return dict(sorted(out.items())) if out is not None else None

    def outcome(self) -> str:
        """One word for how it went (eastwest.filters `outcome_of`; `dropped` when it has drops
        and never got through)."""
        connect = self.connect
        return outcome_of(connect, self.best()[5], dropped_outcome(
            connect, self.drops() is not None, self.dropped_only))

    @property
    def dropped_only(self) -> bool:
        """Only drop sources observed it (a SYN dropped before any socket or wire saw it)."""
        return all(v.observer == DROPS for v in self.views.values())

    def best(self) -> tuple[int, int, int, int, int, int]:
        """(bytes_c2s, bytes_s2c, packets_c2s, packets_s2c, retransmits, resets), cumulative."""
        sock = spk = False  # a socket view; a socket view that counted packets
        sb1 = sb2 = sret = pb1 = pb2 = pk1 = pk2 = sk1 = sk2 = pret = res = 0
        for k, v in self.views.items():
            if v.observer == DROPS:
                continue
            if v.resets > res:
                res = v.resets
            if k == "client" or k == "server":
                sock = True
                if v.bytes_c2s > sb1:
                    sb1 = v.bytes_c2s
                if v.bytes_s2c > sb2:
                    sb2 = v.bytes_s2c
                if v.packets_c2s is not None or v.packets_s2c is not None:
                    spk = True
                    if (v.packets_c2s or 0) > sk1:
                        sk1 = v.packets_c2s or 0
                    if (v.packets_s2c or 0) > sk2:
                        sk2 = v.packets_s2c or 0
                sret += v.retransmits
            else:
                if v.bytes_c2s > pb1:
                    pb1 = v.bytes_c2s
                if v.bytes_s2c > pb2:
                    pb2 = v.bytes_s2c
                if (v.packets_c2s or 0) > pk1:
                    pk1 = v.packets_c2s or 0
                if (v.packets_s2c or 0) > pk2:
                    pk2 = v.packets_s2c or 0
                if v.retransmits > pret:
                    pret = v.retransmits
        if spk:
            pk1, pk2 = sk1, sk2
        if sock:
            return (sb1, sb2, pk1, pk2, sret, res)
        return (pb1, pb2, pk1, pk2, pret, res)

    def packets(self) -> tuple[int | None, int | None]:
        """(packets_c2s, packets_s2c) as the connection's row shows them: `best()`'s, or None
        in a direction that no view counted (TCP socket probes count no packets: not counted is
        not zero). `best()` keeps 0 there, for the rollup deltas."""
        b = self.best()
        counted = [False, False]
        for v in self.views.values():
            if v.observer == DROPS:
                continue
            counted[0] = counted[0] or v.packets_c2s is not None
            counted[1] = counted[1] or v.packets_s2c is not None
        return (b[2] if counted[0] else None, b[3] if counted[1] else None)

    @property
    def connect(self) -> str | None:
        """The client's, else the server's, else any other view's (in order), else a drops
        view's (`refused_by_drop`)."""
        for slot in ("client", "server"):
            v = self.views.get(slot)
            if v is not None and v.connect is not None:
                return v.connect
        for v in self.views.values():
            if v.connect is not None and v.observer != DROPS:
                return v.connect
        for v in self.views.values():
            if v.connect is not None:
                return v.connect
        return None

    @property
    def rtt(self) -> tuple[int, int, int] | None:
        for slot in ("client", "server"):
            v = self.views.get(slot)
            if v is not None and v.rtt is not None:
                return v.rtt
        return next((v.rtt for v in self.views.values() if v.rtt is not None), None)

    @property
    def incomplete(self) -> bool:
        return any(v.incomplete for v in self.views.values())

    def side_bytes(self, observer: str) -> tuple[int | None, int | None]:
        if observer == "path":
            paths = [v for v in self.views.values() if v.observer == "path"]
            if not paths:
                return None, None
            return max(v.bytes_c2s for v in paths), max(v.bytes_s2c for v in paths)
        v = self.views.get(observer)
        return (v.bytes_c2s, v.bytes_s2c) if v is not None else (None, None)

    @property
    def byte_mismatch(self) -> bool:
        return self._mismatch(self.best()[4])

    def _mismatch(self, retrans: int) -> bool:
        views = self.views
        return _mismatch(views.get("client"), views.get("server"),
                         [v for k, v in views.items() if v.final and k.startswith("path:")]
                         if self.mesh is None else [], retrans)

    def summary(self) -> Summary:
        """All derived values in one pass over the views (the same as the properties)."""
        start = last = closed_at = None
        mask = 0
        inc = False
        client = server = None
        sock = False
        sb1 = sb2 = sret = pb1 = pb2 = pk1 = pk2 = sk1 = sk2 = pret = res = 0
        spk = False  # a socket view counted packets (UDP datagrams)
        paths = 0
        hp1 = hp2 = False  # a view counted packets (c2s, s2c)
        connect = rtt = drops_connect = None
        final_paths = []
        drops: dict[str, int] | None = None
        drops_closed = None  # the drops views' closing time (used when nothing else saw it)
        for k, v in self.views.items():
            s, e = v.start, v.end
            if start is None or s < start:
                start = s
            if last is None or e > last:
                last = e
            if v.observer == DROPS:
                mask |= 8
                if v.incomplete:
                    inc = True
                if v.final and (drops_closed is None or e < drops_closed):
                    drops_closed = e
                drops = drops if drops is not None else {}
                r = v.reason or "UNKNOWN"
                drops[r] = drops.get(r, 0) + (v.packets_c2s or 0)
                if drops_connect is None:
                    drops_connect = v.connect
                continue
            if v.final:
                if closed_at is None or e < closed_at:
                    closed_at = e
                if k != "client" and k != "server":
                    final_paths.append(v)
            mask |= _OBS_BIT[v.observer]
            if v.incomplete:
                inc = True
            if v.resets > res:
                res = v.resets
            if connect is None and v.connect is not None:
                connect = v.connect
            if rtt is None and v.rtt is not None:
                rtt = v.rtt
            if k == "client" or k == "server":
                if k == "client":
                    client = v
                else:
                    server = v
                sock = True
                if v.bytes_c2s > sb1:
                    sb1 = v.bytes_c2s
                if v.bytes_s2c > sb2:
                    sb2 = v.bytes_s2c
                if v.packets_c2s is not None:
                    spk = hp1 = True
                    if v.packets_c2s > sk1:
                        sk1 = v.packets_c2s
                if v.packets_s2c is not None:
                    spk = hp2 = True
                    if v.packets_s2c > sk2:
                        sk2 = v.packets_s2c
                sret += v.retransmits
            else:
                paths += 1
                if v.bytes_c2s > pb1:
                    pb1 = v.bytes_c2s
                if v.bytes_s2c > pb2:
                    pb2 = v.bytes_s2c
                if v.packets_c2s is not None:
                    hp1 = True
                    if v.packets_c2s > pk1:
                        pk1 = v.packets_c2s
                if v.packets_s2c is not None:
                    hp2 = True
                    if v.packets_s2c > pk2:
                        pk2 = v.packets_s2c
                if v.retransmits > pret:
                    pret = v.retransmits
        if spk:
            pk1, pk2 = sk1, sk2
        best = (sb1, sb2, pk1, pk2, sret, res) if sock else (pb1, pb2, pk1, pk2, pret, res)
        # connect and rtt: the client's first, then the server's, then any view's (dict order)
        for side in (client, server):
            if side is not None and side.connect is not None:
                connect = side.connect
                break
        if connect is None:
            connect = drops_connect
        for side in (client, server):
            if side is not None and side.rtt is not None:
                rtt = side.rtt
                break
        assert start is not None and last is not None, "a connection has at least one view"
        if mask == 8:
            closed_at = drops_closed
        return Summary(
            start, last, closed_at, _OBSERVED[mask], connect, best,
            (pk1 if hp1 else None, pk2 if hp2 else None), rtt,
            (client.bytes_c2s, client.bytes_s2c) if client is not None else _NO_BYTES,
            (server.bytes_c2s, server.bytes_s2c) if server is not None else _NO_BYTES,
            (pb1, pb2) if paths else _NO_BYTES,
            closed_at is not None and _mismatch(client, server,
                                                final_paths if self.mesh is None else [],
                                                best[4]), inc,
            tuple(sorted(drops.items())) if drops is not None else None)
