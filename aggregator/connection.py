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
- `byte_mismatch`: the client's and the server's final byte counts (or a final path count against
  them) differ by more than the retransmitted segments can explain (retransmits x MSS).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

MSS = 1460  # the bytes one retransmitted segment can add on the wire (Ethernet MSS)


class View(msgspec.Struct, frozen=True):
    """One observer's latest cumulative view of the connection."""

    observer: str          # client | server | path
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

    @property
    def slot(self) -> str:
        """Views are keyed by observer; every wire observer (collector) has its own."""
        return self.observer if self.observer != "path" else f"path:{self.collector}"


class Identity(msgspec.Struct, frozen=True):
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


class ProcInfo(msgspec.Struct, frozen=True):
    pid: int | None = None
    comm: str | None = None
    netns: int | None = None
    container: str | None = None
    collector: str | None = None


class Tunnel(msgspec.Struct, frozen=True):
    vni: int
    vtep_src: str
    vtep_dst: str
    vtep_src_host: str | None = None
    vtep_dst_host: str | None = None


class Connection(msgspec.Struct):
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

    def clone(self) -> Connection:
        return msgspec.structs.replace(self, views=dict(self.views))

    @property
    def key(self) -> tuple[str, str, int, str, int, int]:
        return (self.protocol, self.client_ip, self.client_port, self.server_ip,
                self.server_port, self.scope)

    # -- derived values -----------------------------------------------------------------------
    @property
    def start(self) -> datetime:
        return min(v.start for v in self.views.values())

    @property
    def last_seen(self) -> datetime:
        return max(v.end for v in self.views.values())

    @property
    def observed_by(self) -> list[str]:
        return sorted({v.observer for v in self.views.values()})

    @property
    def closed(self) -> bool:
        return any(v.final for v in self.views.values())

    @property
    def closed_at(self) -> datetime | None:
        ends = [v.end for v in self.views.values() if v.final]
        return min(ends) if ends else None

    def _socket_views(self) -> list[View]:
        return [v for k, v in self.views.items() if k in ("client", "server")]

    def _counting_views(self) -> list[View]:
        return self._socket_views() or list(self.views.values())

    def best(self) -> tuple[int, int, int, int, int, int]:
        """(bytes_c2s, bytes_s2c, packets_c2s, packets_s2c, retransmits, resets), cumulative."""
        vs = self._counting_views()
        paths = [v for v in self.views.values() if v.observer == "path"]
        socket = self._socket_views()
        retrans = (sum(v.retransmits for v in socket) if socket
                   else max((v.retransmits for v in paths), default=0))
        return (max(v.bytes_c2s for v in vs), max(v.bytes_s2c for v in vs),
                max((v.packets_c2s or 0 for v in paths), default=0),
                max((v.packets_s2c or 0 for v in paths), default=0),
                retrans, max(v.resets for v in self.views.values()))

    @property
    def connect(self) -> str | None:
        for slot in ("client", "server"):
            v = self.views.get(slot)
            if v is not None and v.connect is not None:
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
        finals = {k: v for k, v in self.views.items() if v.final}
        retrans = self.best()[4]
        tolerance = retrans * MSS
        c, s = finals.get("client"), finals.get("server")
        if c is not None and s is not None:
            if (abs(c.bytes_c2s - s.bytes_c2s) > tolerance
                    or abs(c.bytes_s2c - s.bytes_s2c) > tolerance):
                return True
        socket = [v for v in (c, s) if v is not None]
        for k, p in finals.items():
            if not k.startswith("path:") or not socket:
                continue
            path_tol = max(tolerance, p.retransmits * MSS)
            for v in socket:
                # the wire also carries retransmitted payload: it may exceed, never fall short
                if (p.bytes_c2s - v.bytes_c2s > path_tol or v.bytes_c2s - p.bytes_c2s > 0
                        or p.bytes_s2c - v.bytes_s2c > path_tol or v.bytes_s2c - p.bytes_s2c > 0):
                    return True
        return False
