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

Drops (records of source `drops`, docs/aggregator.md "Drops"): the observer is the drop source of
the record's collector, and the rule above applies to it (its view: any drops view of that
collector); the record's packets go to one view per drop reason (`drops:<collector>:<reason>`),
each superseded like any view. A drops record that joins nothing opens a connection of its own
(a SYN dropped by policy before any socket or wire saw it); a socket record that arrives later
joins it by the same rule, so the order of arrival does not matter.

Mesh (aggregator/mesh.py): a socket record's `mesh` (a call its collector folded from the
sidecars' sockets) goes with its view: the connection keeps, per socket observer, the hops of
the record that made that observer's view, so a newer record replaces its observer's hops.

Volumes: counters are cumulative per observer; the change of the connection's best counters
(aggregator/connection.py) at each record is a delta, attributed to the minute of the record's
`end` (negative when the first socket view arrives behind a wire view: the deltas always add up
to the connection's counters), keyed by (minute, client workload, server workload, client host, server host, server
port, protocol, link-local). No edge is counted twice: a connection is one row, whoever
reported it.

Names (docs/aggregator.md, "Naming both ends"): each end is named by the most specific layer
(aggregator/identity.py `LAYERS`) that ANY of the connection's observers knows, whatever order
their records arrive in: the server's own record knows the server's process, the client's only
its address. A record that knows more of an end than its current name renames it, and the
volumes already attributed under the old names move to the new ones (negative deltas under the
old rollup key, positive under the new, in the same plan). Names may change for `settle` after
the connection was created (the aggregator's wall clock, `Naming.until`, kept with the
connection so a restart keeps it), then they are final: a record that arrives later and would
have named an end better is counted (`late_names`) and changes nothing, so history stays put.
"""

from __future__ import annotations

import operator
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aggregator import mesh, service
from aggregator.connection import (
    DROPS,
    Connection,
    Counters6,
    Identity,
    Naming,
    ProcInfo,
    Tunnel,
    View,
    refused_by_drop,
)
from aggregator.identity import Facts, IdentityResolver, better
from aggregator.nodeport import NodePortJoin, volumes_of
from eastwest.clock import Clock, SystemClock
from eastwest.filters import is_link_local
from eastwest.record import FlowRecord, dialled_of

_uuid = uuid
# minute, client wid, server wid, client host, server host, server port, protocol, link-local
RollupKey = tuple[datetime, str, str, str, str, int, str, bool]
SETTLE = timedelta(seconds=10)
_END = operator.attrgetter("end")
_ZERO = (0, 0, 0, 0, 0, 0)
# bytes_c2s, bytes_s2c, packets_c2s, packets_s2c, retransmits, resets
Counters = list[int]


@dataclass
class Plan:
    connections: dict[str, Connection] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    new_by_key: dict[tuple, list[str]] = field(default_factory=dict)
    # rollup deltas; negative where a renamed connection's volumes left their old names
    rollups: dict[RollupKey, Counters] = field(default_factory=dict)
    workloads: dict[str, Identity] = field(default_factory=dict)
    identities: dict[RollupKey, tuple[Identity, Identity]] = field(default_factory=dict)
    # per connection: the increase of its best counters in this plan (the exporters' input)
    deltas: dict[str, Counters] = field(default_factory=dict)
    renamed: set[str] = field(default_factory=set)  # connections whose names changed
    at: datetime | None = None  # the aggregator's wall clock when planned (naming deadlines)
    # NodePort halves merged into their real connection (aggregator/nodeport.py): conn_id ->
    # its key; the store deletes their rows, `commit` forgets them, and their rollup volumes
    # are taken back in `rollups`
    removed: dict[str, tuple[str, str, int, str, int, int]] = field(default_factory=dict)


def minute_of(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def _add_minute(volumes: tuple[tuple[datetime, Counters6], ...], minute: datetime,
                delta: Sequence[int]) -> tuple[tuple[datetime, Counters6], ...]:
    """`volumes` (by minute) with `delta` added to `minute`."""
    out = list(volumes)
    for i, (m, acc) in enumerate(out):
        if m == minute:
            out[i] = (m, _six([a + d for a, d in zip(acc, delta, strict=True)]))
            return tuple(out)
    out.append((minute, _six(delta)))
    return tuple(out)


def _six(v: Sequence[int]) -> Counters6:
    return (v[0], v[1], v[2], v[3], v[4], v[5])


def _superseded(old: View | None, rec: FlowRecord) -> bool:
    """Whether the view `old` of the record's slot supersedes the record (see `_apply`)."""
    return old is not None and ((old.final and not rec.final)
                                or (old.end > rec.end and (old.final or not rec.final)))


def key_of(rec: FlowRecord) -> tuple[str, str, int, str, int, int]:
    scope = (rec.netns or 0) if rec.loopback else 0
    return (rec.protocol, rec.client.ip, rec.client.port, rec.server.ip, rec.server.port, scope)


class Correlator:
    """The in-memory index of recent and open connections, and the join logic."""

    def __init__(self, resolver: IdentityResolver, *, slack: timedelta = timedelta(seconds=5),
                 keep_closed: timedelta = timedelta(minutes=5),
                 keep_open: timedelta = timedelta(minutes=30), settle: timedelta = SETTLE,
                 clock: Clock | None = None) -> None:
        if settle < timedelta(0):
            raise ValueError(f"settle {settle}: must be >= 0")
        self.resolver = resolver
        self.settle = settle
        self.clock: Clock = clock or SystemClock()
        self.renames = 0     # ends renamed by a later observer's knowledge (committed or not)
        self.late_names = 0  # records that knew an end better after its name was final
        self.slack = slack
        self.keep_closed = keep_closed
        self.keep_open = keep_open
        self.index: dict[tuple[str, str, int, str, int, int], list[Connection]] = {}
        self.high_water: datetime | None = None
        self.lock = threading.Lock()  # callers hold it across plan -> store -> commit
        self._since_prune = 0
        self._ids: list[str] = []
        # forgotten by prune, so never to change again: the store may settle them (the
        # correlation worker hands them over with the next step and clears what it handed)
        self.settled: list[str] = []
        self.nodeport = NodePortJoin(slack, keep_open)  # NodePort halves' aliases

    # -- state --------------------------------------------------------------------------------
    def load(self, connections: Iterable[Connection]) -> int:
        """Rebuild the index (after a restart) from the store's recent connections."""
        n = 0
        for c in connections:
            self.index.setdefault(c.key, []).append(c)
            self._raise_high_water(c.last_seen)
            n += 1
        return n

    def reset(self) -> None:
        """Forget everything (before `load` again: a failed store write, aggregator/worker.py)."""
        self.index.clear()
        self.high_water = None
        del self.settled[:]

    def refresh(self, fresh: dict[tuple[str, str, int, str, int, int], list[Connection]]) -> None:
        """Replace what the index holds of these keys by the store's connections of them (a
        store shared by several aggregators: what another one wrote since)."""
        for key, conns in fresh.items():
            if conns:
                self.index[key] = list(conns)
                for c in conns:
                    self._raise_high_water(c.last_seen)
            else:
                self.index.pop(key, None)

    def __len__(self) -> int:
        return sum(len(v) for v in self.index.values())

    def learn_nat(self, records: Iterable[FlowRecord]) -> int:
        """Learn the NodePort aliases of these records (after a restart: the stored records
        with a NAT chain of the reload horizon, aggregator/nodeport.py); how many."""
        return len(self.nodeport.learn(records))

    # -- the join -----------------------------------------------------------------------------
    def plan(self, records: Sequence[FlowRecord]) -> Plan:
        plan = Plan(at=self.clock.now())
        bests: dict[str, tuple[int, int, int, int, int, int]] = {}  # each touched conn, as of now
        apply = self._apply
        if self.nodeport.wants_records(records):
            records = self._nodeport(plan, records)
        # oldest first: a connection's interim records arrive in order of their end
        for rec in sorted(records, key=_END):
            apply(plan, rec, bests)
        # a key whose deltas add up to nothing (volumes that moved away with a rename, a drop
        # and a rise within this plan) is no rollup row
        for rk in [k for k, v in plan.rollups.items() if not any(v)]:
            del plan.rollups[rk]
            del plan.identities[rk]
        return plan

    def _nodeport(self, plan: Plan, records: Sequence[FlowRecord]) -> list[FlowRecord]:
        """NodePort halves (aggregator/nodeport.py): rewritten to their real key, or merged
        when held already (removed at commit, their volumes taken back from their names)."""
        merge = self.nodeport.prepare(records, lambda k: list(self.index.get(k, ())))
        for cid, h in merge.removed.items():
            plan.removed[cid] = h.key
            for minute, vol in volumes_of(h, minute_of):
                self._add(plan, self._rollup_key(h, minute), [-x for x in vol], h.client,
                          h.server)
        return merge.records

    def commit(self, plan: Plan) -> None:
        for cid, key in plan.removed.items():
            left = [c for c in self.index.get(key, ()) if c.conn_id != cid]
            if left:
                self.index[key] = left
            else:
                self.index.pop(key, None)
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
        self._since_prune += 1
        if self._since_prune >= 50:
            self._since_prune = 0
            self.prune()

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
        self.nodeport.prune(self.high_water)
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
        if plan.removed:  # merged NodePort halves are no connection to join any more
            cands = [c for c in cands if c.conn_id not in plan.removed]
        if fresh:
            cands += [conns[cid] for cid in fresh]
        best: tuple[float, Connection] | None = None
        slack = self.slack
        for c in cands:
            if slot.startswith("drops:"):  # the drop source's view: any of its reasons
                mine = next((v for v in c.views.values()
                             if v.observer == DROPS and v.collector == rec.collector), None)
            else:
                mine = c.views.get(slot)
            if mine is not None:
                if mine.start != rec.start:
                    continue
                dist = 0.0
            else:
                c_start = c.start
                if rec.end < c_start - slack or rec.start > c.last_seen + slack:
                    continue
                dist = abs((c_start - rec.start).total_seconds())
            if best is None or dist < best[0]:
                best = (dist, c)
        return best[1] if best else None

    def _apply(self, plan: Plan, rec: FlowRecord,
               bests: dict[str, tuple[int, int, int, int, int, int]]) -> None:
        obs: str = rec.observer
        if rec.source == "drops":
            obs = DROPS
            slot = "drops:" + rec.collector
        else:
            slot = obs if obs != "path" else "path:" + rec.collector
        c_ep, s_ep = rec.client, rec.server
        key = (rec.protocol, c_ep.ip, c_ep.port, s_ep.ip, s_ep.port,
               (rec.netns or 0) if rec.loopback else 0)
        indexed = self.index.get(key)
        fresh = plan.new_by_key.get(key)
        found = self._find(plan, rec, slot, indexed, fresh) if indexed or fresh else None
        if found is None:
            conn = self._new(rec, key, plan.at)
            cid = conn.conn_id
            plan.created.add(cid)
            plan.new_by_key.setdefault(key, []).append(cid)
            plan.connections[cid] = conn
            before = _ZERO
            if obs == DROPS:
                self._drops(conn, rec)
                return
        else:
            cid = found.conn_id
            planned = plan.connections.get(cid)
            if planned is None:
                planned = plan.connections[cid] = found.clone()
            conn = planned
            if obs == DROPS:
                self._drops(conn, rec)
                return
            old = conn.views.get(slot)
            if _superseded(old, rec):
                # an interim after the observer's final, or a late interim: the final (or the
                # newer cumulative) view supersedes it. A final record always wins over interims
                # (one final per observer) and an interim never reopens a final view: a packet
                # source's interim `end` is its tick time, later than the flow's last packet
                return
            before = bests.get(cid) or conn.best()
        t = rec.rtt_us
        conn.views[slot] = View(obs, rec.collector, rec.start, rec.end, rec.final, rec.bytes_c2s,
                                rec.bytes_s2c, rec.packets_c2s, rec.packets_s2c, rec.retransmits,
                                rec.resets, rec.connect, (t.min, t.avg, t.max) if t else None,
                                bool(rec.incomplete))
        if obs != "path" or (rec.tunnel is not None and conn.tunnel is None):
            self._absorb_side_facts(conn, rec)
        if rec.nat is not None:
            dialled = dialled_of(rec.nat)
            if dialled is not None and service.wins(dialled.ip, dialled.port, conn.service_ip,
                                                    conn.service_port):
                conn.service_ip, conn.service_port = dialled.ip, dialled.port
        if (obs == "client" or obs == "server") and (rec.mesh is not None
                                                     or conn.mesh is not None):
            # the observer's hops are its view's record's (aggregator/mesh.py)
            conn.mesh = mesh.merged(conn.mesh, obs, mesh.side_of(rec))
        if found is not None and (obs != "path" or rec.client_workload is not None
                                  or rec.server_workload is not None):
            self._rename(plan, conn, rec)
        after = conn.best()
        bests[cid] = after
        if after == before:
            return
        # signed: the best counters drop when the first socket view arrives behind a wire view
        # (its interim, or the wire also counted retransmitted payload); the deltas add up to
        # the connection's counters exactly, whatever the order (clipped at 0, the climb back
        # would be counted twice)
        delta = [a - b for a, b in zip(after, before, strict=True)]
        if any(delta):
            minute = minute_of(rec.end)
            self._add(plan, self._rollup_key(conn, minute), delta, conn.client, conn.server)
            acc = plan.deltas.get(cid)
            if acc is None:
                plan.deltas[cid] = list(delta)
            else:
                for i, d in enumerate(delta):
                    acc[i] += d
            naming = conn.naming
            if naming is not None:  # remembered, to move with a name that changes
                conn.naming = Naming(naming.until, _add_minute(naming.volumes, minute, delta))

    @staticmethod
    def _drops(conn: Connection, rec: FlowRecord) -> None:
        """A drops record's packets, one view per reason (in the record's order), each kept
        unless the view it would replace supersedes it. Drops add no volumes (best counters)
        and name no end (the drop source knows addresses only); a UDP datagram no socket
        wanted makes the connection refused (aggregator/connection.py `refused_by_drop`)."""
        inc = bool(rec.incomplete)
        for d in rec.drops or ():
            slot = f"drops:{rec.collector}:{d.reason}"
            if _superseded(conn.views.get(slot), rec):
                continue
            connect = "refused" if refused_by_drop(rec.protocol, d.reason) else None
            conn.views[slot] = View(DROPS, rec.collector, rec.start, rec.end, rec.final, 0, 0,
                                    d.packets, None, 0, 0, connect, None, inc, d.reason)

    @staticmethod
    def _rollup_key(conn: Connection, minute: datetime) -> RollupKey:
        client, server = conn.client, conn.server
        return (minute, client.wid, server.wid, client.host or "", server.host or "",
                conn.server_port, conn.protocol,
                is_link_local(conn.client_ip) or is_link_local(conn.server_ip))

    @staticmethod
    def _add(plan: Plan, rk: RollupKey, delta: Sequence[int], client: Identity,
             server: Identity) -> None:
        acc = plan.rollups.get(rk)
        if acc is None:
            plan.rollups[rk] = list(delta)
        else:
            for i, d in enumerate(delta):
                acc[i] += d
        plan.identities[rk] = (client, server)

    def _new(self, rec: FlowRecord, k: tuple[str, str, int, str, int, int],
             at: datetime | None = None) -> Connection:
        client = self._identity(rec, rec.client.ip, rec.client.port, "client")
        # a client's ephemeral port says nothing: static ip:port entries name server ports
        server = self._identity(rec, rec.server.ip, rec.server.port, "server")
        conn = Connection(conn_id=self._new_id(), protocol=rec.protocol, family=rec.family,
                          client_ip=k[1], client_port=k[2], server_ip=k[3], server_port=k[4],
                          scope=k[5], client=client, server=server)
        if self.settle and not (client.source == "static" and server.source == "static"):
            conn.naming = Naming((at or self.clock.now()) + self.settle)
        return conn

    # -- names ----------------------------------------------------------------------------------
    def _rename(self, plan: Plan, conn: Connection, rec: FlowRecord) -> None:
        """Name each end by the best that this record's observer knows of it, if that is better
        than its current name; move the volumes attributed so far with the names."""
        client = self._improve(conn, rec, "client", conn.client)
        server = self._improve(conn, rec, "server", conn.server)
        if client is conn.client and server is conn.server:
            return
        naming = conn.naming
        at = plan.at or self.clock.now()
        if naming is None or at >= naming.until:
            conn.naming = None  # final: history stays as it was told
            self.late_names += 1
            return
        for minute, counters in naming.volumes:
            self._add(plan, self._rollup_key(conn, minute), [-x for x in counters],
                      conn.client, conn.server)
        conn.client, conn.server = client, server
        for minute, counters in naming.volumes:
            self._add(plan, self._rollup_key(conn, minute), counters, client, server)
        if client.source == "static" and server.source == "static":
            conn.naming = None  # nothing names an end better than the static map
        plan.renamed.add(conn.conn_id)
        self.renames += 1

    def _improve(self, conn: Connection, rec: FlowRecord, side: str, cur: Identity) -> Identity:
        """`cur`, or what `rec`'s observer knows of `side` if that names it better. Only a
        workload the record reports for the side, or the side's own process, can: every other
        layer looks at the address, which every observer shares."""
        if cur.source == "static":
            return cur
        workload = rec.client_workload if side == "client" else rec.server_workload
        if workload is None and not (rec.observer == side
                                     and (rec.process is not None or rec.container)):
            return cur
        if side == "client":
            cand = self._identity(rec, conn.client_ip, conn.client_port, "client")
        else:
            cand = self._identity(rec, conn.server_ip, conn.server_port, "server")
        return cand if better(cand, cur) else cur

    def _identity(self, rec: FlowRecord, ip: str, port: int, side: str) -> Identity:
        """The resolver's answer for one side, for the time the record's connection started
        (the address's owner then: pod IPs are reused); its facts are what the observer knows
        of that side (its own process when it is that side)."""
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
        return self.resolver.resolve(ip, port, facts, rec.start)

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
                                 vtep_dst_host=self.resolver.host_of(t.outer_dst), type=t.type)
