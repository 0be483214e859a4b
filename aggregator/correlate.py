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

import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aggregator.connection import Connection, Identity, ProcInfo, Tunnel, View
from aggregator.identity import Facts, IdentityResolver
from eastwest.record import FlowRecord

RollupKey = tuple[datetime, str, str, str, str, int, str]
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
        self._commits = 0

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
        # oldest first: a connection's interim records arrive in order of their end
        for rec in sorted(records, key=lambda r: r.end):
            self._apply(plan, rec)
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
        if self._commits % 50 == 0:
            self.prune()

    def prune(self) -> int:
        """Forget connections that can no longer be joined: closed ones `keep_closed` after
        their last record, open ones `keep_open` after it (times of the records, not the wall
        clock: replays and tests behave the same)."""
        if self.high_water is None:
            return 0
        gone = 0
        for key in list(self.index):
            keep = []
            for c in self.index[key]:
                horizon = self.keep_closed if c.closed else self.keep_open
                if c.last_seen >= self.high_water - horizon:
                    keep.append(c)
                else:
                    gone += 1
            if keep:
                self.index[key] = keep
            else:
                del self.index[key]
        return gone

    def _raise_high_water(self, t: datetime) -> None:
        if self.high_water is None or t > self.high_water:
            self.high_water = t

    def _candidates(self, plan: Plan, key: tuple) -> list[Connection]:
        out = []
        for c in self.index.get(key, ()):
            out.append(plan.connections.get(c.conn_id, c))
        out += [plan.connections[cid] for cid in plan.new_by_key.get(key, ())]
        return out

    def _find(self, plan: Plan, rec: FlowRecord, view: View) -> Connection | None:
        best: tuple[float, Connection] | None = None
        for c in self._candidates(plan, key_of(rec)):
            mine = c.views.get(view.slot)
            if mine is not None:
                if mine.start != rec.start:
                    continue
                dist = 0.0
            else:
                lo, hi = c.start - self.slack, c.last_seen + self.slack
                if rec.end < lo or rec.start > hi:
                    continue
                same = c.views.get(rec.observer) if rec.observer != "path" else None
                if same is not None and same.final and rec.start > same.end + self.slack:
                    continue
                dist = abs((c.start - rec.start).total_seconds())
            if best is None or dist < best[0]:
                best = (dist, c)
        return best[1] if best else None

    def _apply(self, plan: Plan, rec: FlowRecord) -> None:
        view = view_of(rec)
        found = self._find(plan, rec, view)
        if found is None:
            conn = self._new(rec)
            plan.created.add(conn.conn_id)
            plan.new_by_key.setdefault(conn.key, []).append(conn.conn_id)
            plan.connections[conn.conn_id] = conn
            before = (0, 0, 0, 0, 0, 0)
        else:
            conn = plan.connections.get(found.conn_id)
            if conn is None:
                conn = found.clone()
                plan.connections[conn.conn_id] = conn
            old = conn.views.get(view.slot)
            if old is not None and old.end > rec.end and (old.final or not rec.final):
                # a late interim record: the newer cumulative one supersedes it. A final record
                # always wins over interims (one final per observer): a packet source's interim
                # `end` is its tick time, later than the flow's last packet, its final's `end`
                return
            before = conn.best()
        conn.views[view.slot] = view
        self._absorb_side_facts(conn, rec)
        after = conn.best()
        delta = [max(0, a - b) for a, b in zip(after, before, strict=True)]
        if any(delta):
            rk: RollupKey = (minute_of(rec.end), conn.client.wid, conn.server.wid,
                             conn.client.host or "", conn.server.host or "", conn.server_port,
                             conn.protocol)
            acc = plan.rollups.setdefault(rk, [0] * 6)
            for i, d in enumerate(delta):
                acc[i] += d
            plan.identities[rk] = (conn.client, conn.server)

    def _new(self, rec: FlowRecord) -> Connection:
        cfacts = sfacts = Facts()
        proc = rec.process
        if rec.observer == "client":
            cfacts = Facts(rec.client_workload, proc.comm if proc else None, rec.container, rec.collector)
            sfacts = Facts(rec.server_workload)
        elif rec.observer == "server":
            sfacts = Facts(rec.server_workload, proc.comm if proc else None, rec.container, rec.collector)
            cfacts = Facts(rec.client_workload)
        else:
            cfacts, sfacts = Facts(rec.client_workload), Facts(rec.server_workload)
        client = self.resolver.resolve(rec.client.ip, rec.client.port, cfacts)
        # a client's ephemeral port says nothing: static ip:port entries name server ports
        server = self.resolver.resolve(rec.server.ip, rec.server.port, sfacts)
        k = key_of(rec)
        return Connection(conn_id=uuid.uuid4().hex, protocol=rec.protocol, family=rec.family,
                          client_ip=k[1], client_port=k[2], server_ip=k[3], server_port=k[4],
                          scope=k[5], client=client, server=server)

    def _absorb_side_facts(self, conn: Connection, rec: FlowRecord) -> None:
        if rec.observer in ("client", "server"):
            p = rec.process
            info = ProcInfo(pid=p.pid if p else None, comm=p.comm if p else None, netns=rec.netns,
                            container=rec.container, collector=rec.collector)
            if rec.observer == "client":
                conn.client_proc = info
            else:
                conn.server_proc = info
        if rec.tunnel is not None and conn.tunnel is None:
            t = rec.tunnel
            conn.tunnel = Tunnel(vni=t.vni, vtep_src=t.outer_src, vtep_dst=t.outer_dst,
                                 vtep_src_host=self.resolver.host_of(t.outer_src),
                                 vtep_dst_host=self.resolver.host_of(t.outer_dst))
