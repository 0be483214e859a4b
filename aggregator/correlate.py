"""Correlation: the records of one connection, from any subset of observers, -> ONE connection.

Stage: ingest -> correlate -> store. In: validated `FlowRecord`s of one batch. Out: a `Plan`:
the new versions of every connection the batch touched, the minute rollup deltas, and the
workloads seen, all written by the store in the SAME transaction as the raw batch; `commit(plan)`
then makes it the correlator's state (so a failed store write leaves no trace in memory).

Key: (protocol, client ip, client port, server ip, server port, scope), scope = the netns inode
for loopback connections (addresses overlap across namespaces), else 0. Orientation is the
connection's (docs/flow-record.md), so the client's, the server's and the wire's records share it.

Join rule (reused ports, clock skew): a record joins a connection with its key when
- the connection already has this observer's view with the same `start` (the same observer
  reports the same start for every record of one connection), or
- the connection has no view of this observer yet, and the record's [start, end] overlaps the
  connection's [start - slack, last_seen + slack] (slack: clock skew between hosts).
Otherwise it opens a new connection. Among several candidates the closest start wins.

Volumes: counters are cumulative per observer; the increase of the connection's best counters
(aggregator/connection.py) at each record is a delta, attributed to the minute of the record's
`end`, keyed by (minute, client workload, server workload, client host, server host, server
port, protocol). No edge is counted twice: a connection is one row, whoever reported it.
"""

from __future__ import annotations

import operator
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aggregator.connection import Connection, Identity, ProcInfo, Tunnel, View
from aggregator.identity import Facts, IdentityResolver
from eastwest.record import FlowRecord

_uuid = uuid
RollupKey = tuple[datetime, str, str, str, str, int, str]
_END = operator.attrgetter("end")
_ZERO = (0, 0, 0, 0, 0, 0)
# bytes_c2s, bytes_s2c, packets_c2s, packets_s2c, retransmits, resets
Counters = list[int]


@dataclass
class Plan:
    connections: dict[str, Connection] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    new_by_key: dict[tuple, list[str]] = field(default_factory=dict)
    rollups: dict[RollupKey, Counters] = field(default_factory=dict)
    workloads: dict[str, Identity] = field(default_factory=dict)
    identities: dict[RollupKey, tuple[Identity, Identity]] = field(default_factory=dict)


def minute_of(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def view_of(rec: FlowRecord) -> View:
    rtt = (rec.rtt_us.min, rec.rtt_us.avg, rec.rtt_us.max) if rec.rtt_us else None
    return View(observer=rec.observer, collector=rec.collector, start=rec.start, end=rec.end,
                final=rec.final, bytes_c2s=rec.bytes_c2s, bytes_s2c=rec.bytes_s2c,
                packets_c2s=rec.packets_c2s, packets_s2c=rec.packets_s2c,
                retransmits=rec.retransmits, resets=rec.resets, connect=rec.connect, rtt=rtt,
                incomplete=bool(rec.incomplete))


def key_of(rec: FlowRecord) -> tuple[str, str, int, str, int, int]:
    scope = (rec.netns or 0) if rec.loopback else 0
    return (rec.protocol, rec.client.ip, rec.client.port, rec.server.ip, rec.server.port, scope)


class Correlator:
    """The in-memory index of recent and open connections, and the join logic."""

    def __init__(self, resolver: IdentityResolver, *, slack: timedelta = timedelta(seconds=5),
                 keep_closed: timedelta = timedelta(minutes=5),
                 keep_open: timedelta = timedelta(minutes=30)) -> None:
        self.resolver = resolver
        self.slack = slack
        self.keep_closed = keep_closed
        self.keep_open = keep_open
        self.index: dict[tuple[str, str, int, str, int, int], list[Connection]] = {}
        self.high_water: datetime | None = None
        self.lock = threading.Lock()  # callers hold it across plan -> store -> commit
        self._commits = 0  # a stamp that changes whenever stored state may have (graph cache)
        self._since_prune = 0
        self._ids: list[str] = []
        # forgotten by prune, so never to change again: the store may settle them (the
        # correlating store hands them over with the next batch and clears what it handed)
        self.settled: list[str] = []

    # -- state --------------------------------------------------------------------------------
    def load(self, connections: Iterable[Connection]) -> int:
        """Rebuild the index (after a restart) from the store's recent connections."""
        n = 0
        for c in connections:
            self.index.setdefault(c.key, []).append(c)
            self._raise_high_water(c.last_seen)
            n += 1
        return n

    def __len__(self) -> int:
        return sum(len(v) for v in self.index.values())

    # -- the join -----------------------------------------------------------------------------
    def plan(self, records: Sequence[FlowRecord]) -> Plan:
        plan = Plan()
        bests: dict[str, tuple[int, int, int, int, int, int]] = {}  # each touched conn, as of now
        apply = self._apply
        # oldest first: a connection's interim records arrive in order of their end
        for rec in sorted(records, key=_END):
            apply(plan, rec, bests)
        return plan

    def commit(self, plan: Plan) -> None:
        for cid, conn in plan.connections.items():
            bucket = self.index.setdefault(conn.key, [])
            if cid in plan.created:
                bucket.append(conn)
            else:
                for i, old in enumerate(bucket):
                    if old.conn_id == cid:
                        bucket[i] = conn
                        break
                else:
                    bucket.append(conn)
            self._raise_high_water(conn.last_seen)
        self._commits += 1
        self._since_prune += 1
        if self._since_prune >= 50:
            self._since_prune = 0
            self.prune()

    def touch(self) -> None:
        """A batch was accepted that is not correlated yet: caches keyed by `_commits` expire."""
        self._commits += 1

    def _new_id(self) -> str:
        """A random version-4 UUID as 32 hex digits (what `uuid.uuid4().hex` gives), drawn from
        one `os.urandom` call per 1,024 ids instead of one call and one UUID object per id."""
        if uuid is not _uuid:  # replaced (tests draw ids from a counter): use what replaced it
            return str(uuid.uuid4().hex)
        ids = self._ids
        if not ids:
            raw = os.urandom(16 * 1024)
            for i in range(0, len(raw), 16):
                b = bytearray(raw[i:i + 16])
                b[6] = (b[6] & 0x0F) | 0x40  # version 4
                b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
                ids.append(b.hex())
        return ids.pop()

    def prune(self) -> int:
        """Forget connections that can no longer be joined: closed ones `keep_closed` after
        their last record, open ones `keep_open` after it (times of the records, not the wall
        clock: replays and tests behave the same)."""
        if self.high_water is None:
            return 0
        gone = 0
        closed_after = self.high_water - self.keep_closed
        open_after = self.high_water - self.keep_open
        for key in list(self.index):
            keep = []
            for c in self.index[key]:
                if c.last_seen >= (closed_after if c.closed else open_after):
                    keep.append(c)
                else:
                    gone += 1
                    self.settled.append(c.conn_id)
            if keep:
                self.index[key] = keep
            else:
                del self.index[key]
        return gone

    def _raise_high_water(self, t: datetime) -> None:
        if self.high_water is None or t > self.high_water:
            self.high_water = t

    def _find(self, plan: Plan, rec: FlowRecord, slot: str, indexed: list[Connection] | None,
              fresh: list[str] | None) -> Connection | None:
        """The connection `rec` joins among those with its key (the join rule above)."""
        conns = plan.connections
        cands = [conns.get(c.conn_id, c) for c in indexed] if indexed else []
        if fresh:
            cands += [conns[cid] for cid in fresh]
        best: tuple[float, Connection] | None = None
        slack = self.slack
        for c in cands:
            mine = c.views.get(slot)
            if mine is not None:
                if mine.start != rec.start:
                    continue
                dist = 0.0
            else:
                c_start = c.start
                if rec.end < c_start - slack or rec.start > c.last_seen + slack:
                    continue
                same = c.views.get(rec.observer) if rec.observer != "path" else None
                if same is not None and same.final and rec.start > same.end + slack:
                    continue
                dist = abs((c_start - rec.start).total_seconds())
            if best is None or dist < best[0]:
                best = (dist, c)
        return best[1] if best else None

    def _apply(self, plan: Plan, rec: FlowRecord,
               bests: dict[str, tuple[int, int, int, int, int, int]]) -> None:
        obs = rec.observer
        slot = obs if obs != "path" else "path:" + rec.collector
        c_ep, s_ep = rec.client, rec.server
        key = (rec.protocol, c_ep.ip, c_ep.port, s_ep.ip, s_ep.port,
               (rec.netns or 0) if rec.loopback else 0)
        indexed = self.index.get(key)
        fresh = plan.new_by_key.get(key)
        found = self._find(plan, rec, slot, indexed, fresh) if indexed or fresh else None
        if found is None:
            conn = self._new(rec, key)
            cid = conn.conn_id
            plan.created.add(cid)
            plan.new_by_key.setdefault(key, []).append(cid)
            plan.connections[cid] = conn
            before = _ZERO
        else:
            cid = found.conn_id
            conn = plan.connections.get(cid)  # type: ignore[assignment]
            if conn is None:
                conn = found.clone()
                plan.connections[cid] = conn
            old = conn.views.get(slot)
            if old is not None and old.end > rec.end and (old.final or not rec.final):
                # a late interim record: the newer cumulative one supersedes it. A final record
                # always wins over interims (one final per observer): a packet source's interim
                # `end` is its tick time, later than the flow's last packet, its final's `end`
                return
            before = bests.get(cid) or conn.best()
        t = rec.rtt_us
        conn.views[slot] = View(obs, rec.collector, rec.start, rec.end, rec.final, rec.bytes_c2s,
                                rec.bytes_s2c, rec.packets_c2s, rec.packets_s2c, rec.retransmits,
                                rec.resets, rec.connect, (t.min, t.avg, t.max) if t else None,
                                bool(rec.incomplete))
        if obs != "path" or (rec.tunnel is not None and conn.tunnel is None):
            self._absorb_side_facts(conn, rec)
        after = conn.best()
        bests[cid] = after
        if after == before:
            return
        delta = [a - b if a > b else 0 for a, b in zip(after, before, strict=True)]
        if any(delta):
            client, server = conn.client, conn.server
            rk: RollupKey = (minute_of(rec.end), client.wid, server.wid, client.host or "",
                             server.host or "", conn.server_port, conn.protocol)
            acc = plan.rollups.get(rk)
            if acc is None:
                plan.rollups[rk] = delta
            else:
                for i, d in enumerate(delta):
                    acc[i] += d
            plan.identities[rk] = (client, server)

    def _new(self, rec: FlowRecord, k: tuple[str, str, int, str, int, int]) -> Connection:
        client = self._identity(rec, rec.client.ip, rec.client.port, "client")
        # a client's ephemeral port says nothing: static ip:port entries name server ports
        server = self._identity(rec, rec.server.ip, rec.server.port, "server")
        return Connection(conn_id=self._new_id(), protocol=rec.protocol, family=rec.family,
                          client_ip=k[1], client_port=k[2], server_ip=k[3], server_port=k[4],
                          scope=k[5], client=client, server=server)

    def _identity(self, rec: FlowRecord, ip: str, port: int, side: str) -> Identity:
        """The resolver's answer for one side; its facts are what the observer knows of that
        side (its own process when it is that side)."""
        static = self.resolver.static
        if static is not None:  # the resolver's first layer, without building the facts
            hit = static.lookup(ip, port)
            if hit is not None:
                return hit
        workload = rec.client_workload if side == "client" else rec.server_workload
        if rec.observer == side:
            proc = rec.process
            facts = Facts(workload, proc.comm if proc else None, rec.container, rec.collector)
        else:
            facts = Facts(workload)
        return self.resolver.resolve(ip, port, facts)

    def _absorb_side_facts(self, conn: Connection, rec: FlowRecord) -> None:
        if rec.observer in ("client", "server"):
            p = rec.process
            info = ProcInfo(p.pid if p else None, p.comm if p else None, rec.netns, rec.container,
                            rec.collector)
            if rec.observer == "client":
                conn.client_proc = info
            else:
                conn.server_proc = info
        if rec.tunnel is not None and conn.tunnel is None:
            t = rec.tunnel
            conn.tunnel = Tunnel(vni=t.vni, vtep_src=t.outer_src, vtep_dst=t.outer_dst,
                                 vtep_src_host=self.resolver.host_of(t.outer_src),
                                 vtep_dst_host=self.resolver.host_of(t.outer_dst))
