"""NAT folding: a record of a translated connection is rewritten to its real ends, and keeps the
translations in `nat` (issue 16, "One connection per Service call").

Stage: enrichment, between the sources and the sink (every source's records pass through it, in
the sink's lock). In: `FlowRecord`s, and the conntrack translations of the collector's namespaces
(collector/conntrack.py: ctnetlink NEW/DESTROY events, read just before each batch is folded).
Out: the same records, those of translated connections rewritten:

- a client's socket record to a dialled address that conntrack translated (a ClusterIP call:
  original tuple client -> VIP:port, reply tuple backend -> client) gets `server` = the backend and
  `nat` = [dnat VIP:port -> backend] (`redirect` when the backend is a loopback address);
- a server's socket record, or a path (wire) record, of a connection conntrack translated on this
  host (looked up by the reply tuple, server -> the client it saw) gets `client` = the original
  client and `nat` = [dnat dialled -> server, if any; snat original client -> seen client, if any]:
  a server on the host that masqueraded it learns its real client; the NodePort's middle host,
  whose wire capture sees the translated leg, reports the whole translation on its path records.

So the client's, the server's and the wire's records of one Service call carry the same key
(protocol, client, backend): the aggregator joins them without knowing NAT, and a partitioned
aggregator (hash of the key) sends them to one replica. Lookups repeat through the namespaces'
tables (a sidecar's REDIRECT in the pod, then kube-proxy's DNAT in the node), each translation
used once, in the order applied from the client towards the server.

A connection folded once keeps its fold (`memo`, bounded, dropped at its final record), even
when its conntrack entry has left the bounded table since. What cannot be known is said:
`incomplete: nat` on a client's socket record (where a Service's DNAT would apply; loopback
excluded) when a namespace's conntrack cannot be read, or when its events were lost (ENOBUFS) and
the connection started in that interval and found no translation.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from collector.conntrack import ConntrackEvents, NatTable, Translation
from collector.pipeline import Sink
from eastwest.errors import ConfigError
from eastwest.record import Endpoint, FlowRecord, Nat, NatType

log = logging.getLogger("eastwest.collector.nat")
NAT_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
INCOMPLETE = "nat"
LOSS_SLACK = timedelta(seconds=1)  # a lost event's connection started at most this before the drain


class EventReader(Protocol):
    """What folding needs of a conntrack reader (`ConntrackEvents`, or a fake in tests)."""

    table: NatTable
    lost: int

    def drain(self) -> int: ...
    def close(self) -> None: ...


Opener = Callable[[str | None], EventReader]


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


class NatFolder:
    """Folds records by the translations of the namespaces `netns` (names under /run/netns;
    None: this process's own). A namespace whose conntrack cannot be opened is listed in
    `unreadable` (name -> why) and its collector's client records say `incomplete: nat`."""

    def __init__(self, netns: Sequence[str | None], *, opener: Opener | None = None,
                 inode_of: Callable[[str | None], int | None] | None = None,
                 memo_capacity: int = 65536) -> None:
        open_ = opener or (lambda ns: ConntrackEvents(ns))
        inode = inode_of or _inode
        self.readers: list[tuple[int | None, EventReader]] = []
        self.unreadable: dict[str, str] = {}
        for ns in dict.fromkeys(netns):
            if ns is not None and ns.isdigit():
                self.unreadable[ns] = "a namespace given by inode number cannot be opened"
                continue
            try:
                self.readers.append((inode(ns), open_(ns)))
            except (OSError, ConfigError) as exc:
                self.unreadable[ns or "(this namespace)"] = str(exc)
        for ns, why in self.unreadable.items():
            log.warning("conntrack of %s not readable, NAT not resolved there (records say "
                        "incomplete: nat): %s", ns, why)
        self.memo_capacity = memo_capacity
        self._memo: OrderedDict[tuple, tuple[Endpoint, Endpoint, list[Nat]]] = OrderedDict()
        self._lost = 0
        self._drained_at: datetime | None = None
        self._loss_windows: list[tuple[datetime, datetime]] = []  # (from, to), newest last
        self.folded = 0  # records rewritten
        self.marked = 0  # records marked incomplete: nat

    def close(self) -> None:
        for _, r in self.readers:
            r.close()

    # -- events -------------------------------------------------------------------------------
    def drain(self, now: datetime) -> None:
        """Read every waiting conntrack event; note the interval where events were lost."""
        lost = 0
        for _, r in self.readers:
            r.drain()
            lost += r.lost
        if lost > self._lost:
            since = (self._drained_at or now) - LOSS_SLACK
            self._loss_windows = [*self._loss_windows[-63:], (since, now)]
            log.warning("conntrack events lost (%d overruns): connections started since %s "
                        "may lack their translation", lost - self._lost, since.isoformat())
        self._lost = lost
        self._drained_at = now

    # -- folding ------------------------------------------------------------------------------
    def fold(self, records: list[FlowRecord], now: datetime) -> list[FlowRecord]:
        self.drain(now)
        return [self.fold_one(r) for r in records]

    def fold_one(self, r: FlowRecord) -> FlowRecord:
        if r.protocol not in NAT_PROTOCOLS or r.loopback or r.nat is not None:
            return r
        key = (r.observer, r.netns, r.protocol, r.client.ip, r.client.port, r.server.ip,
               r.server.port, r.start)
        hit = self._memo.get(key)
        if hit is None:
            chain, client, server = self._resolve(r)
            if chain:
                hit = (client, server, chain)
                self._memo[key] = hit
                if len(self._memo) > self.memo_capacity:
                    self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(key)
        if hit is not None:
            if r.final:  # its last record: the connection will not be seen again
                self._memo.pop(key, None)
            self.folded += 1
            return r.replace(client=hit[0], server=hit[1], nat=list(hit[2]))
        if r.observer == "client" and r.source == "socket" and self._unknown(r):
            self.marked += 1
            return r.replace(incomplete=[*r.incomplete, INCOMPLETE])
        return r

    def _unknown(self, r: FlowRecord) -> bool:
        """Whether a translation could have applied to client record `r` and not be known."""
        if INCOMPLETE in r.incomplete:
            return False
        if self.unreadable:
            return True
        return any(a <= r.start <= b for a, b in self._loss_windows)

    def _resolve(self, r: FlowRecord) -> tuple[list[Nat], Endpoint, Endpoint]:
        if r.observer == "client":
            return self._forward(r)
        return self._backward(r)

    def _forward(self, r: FlowRecord) -> tuple[list[Nat], Endpoint, Endpoint]:
        """From the client's side: original tuple (client -> dialled) gives the backend."""
        chain: list[Nat] = []
        src, dst = (r.client.ip, r.client.port), (r.server.ip, r.server.port)
        used: set[int] = set()
        while True:
            found = self._find(used, NatTable.for_client, r.protocol, src, dst)
            if found is None:
                break
            inode, t = found
            if t.dnat:
                chain.append(Nat(_dnat_type(t), Endpoint(*dst), Endpoint(*t.backend), inode))
                dst = t.backend
            if t.snat:
                chain.append(Nat("snat", Endpoint(*src), Endpoint(*t.seen_client), inode))
                src = t.seen_client
        return chain, r.client, Endpoint(*dst)

    def _backward(self, r: FlowRecord) -> tuple[list[Nat], Endpoint, Endpoint]:
        """From the server's side (or the wire's past the translation): the reply tuple (server
        -> the client it saw) gives the original client and what it dialled."""
        chain: list[Nat] = []
        server, seen = (r.server.ip, r.server.port), (r.client.ip, r.client.port)
        used: set[int] = set()
        while True:
            found = self._find(used, NatTable.for_server, r.protocol, server, seen)
            if found is None:
                break
            inode, t = found
            hop: list[Nat] = []
            if t.dnat:
                hop.append(Nat(_dnat_type(t), Endpoint(*t.original[2:]), Endpoint(*t.backend),
                               inode))
            if t.snat:
                hop.append(Nat("snat", Endpoint(*t.original[:2]), Endpoint(*t.seen_client), inode))
            chain[:0] = hop  # found walking back from the server: earlier hops go first
            server, seen = (t.original[2], t.original[3]), (t.original[0], t.original[1])
        return chain, Endpoint(*seen), r.server

    def _find(self, used: set[int],
              look: Callable[[NatTable, str, tuple[str, int], tuple[str, int]], Translation | None],
              protocol: str, a: tuple[str, int], b: tuple[str, int],
              ) -> tuple[int | None, Translation] | None:
        """The first table not `used` yet that knows the connection, and its translation."""
        for i, (inode, reader) in enumerate(self.readers):
            if i in used:
                continue
            t = look(reader.table, protocol, a, b)
            if t is not None:
                used.add(i)
                return inode, t
        return None


def _dnat_type(t: Translation) -> NatType:
    return "redirect" if _loopback(t.backend[0]) else "dnat"


def _inode(netns: str | None) -> int | None:
    from collector.netns import resolve

    if netns is None:
        return os.stat("/proc/self/ns/net").st_ino
    return resolve(netns)


class NatFoldingSink:
    """A sink that folds every batch before handing it on (`collector.pipeline.Sink`)."""

    def __init__(self, inner: Sink, folder: NatFolder, now: Callable[[], datetime]) -> None:
        self.inner = inner
        self.folder = folder
        self.now = now

    def write(self, records: list[FlowRecord]) -> None:
        self.inner.write(self.folder.fold(records, self.now()))

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.folder.close()


def folder_for(args: object) -> NatFolder | None:
    """The folder the collector's flags ask for: one reader per named `--netns` (this
    namespace when none is named); None with `--no-nat` or a capture file."""
    if getattr(args, "no_nat", False) or getattr(args, "pcap", None):
        return None
    names: list[str | None] = list(getattr(args, "netns", None) or []) or [None]
    return NatFolder(names)
