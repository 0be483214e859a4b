"""NodePort + SNAT: the three pieces of one call joined into ONE connection (issue 16).

Stage: correlation, before the join (aggregator/correlate.py `Correlator.plan`, and
aggregator/correlate_columns.py for the C core). In: a batch's records, and the connections
the correlator holds of a few keys. Out: the batch with its NodePort halves rewritten to their
real key, plus the records of the halves' connections that were held already (to be merged),
and which held connections those were (to be removed, their rollup volumes moved).

A call to `NODE:30080` that the node DNATs to a pod on another host and masquerades has three
pieces (docs/collector.md, "The NodePort middle host"): the client's host sees
`client -> NODE:30080`, the backend's host sees `NODE':P' -> backend`, and the middle node's
collector reports its wire records as `client -> backend` with
`nat = [dnat NODE:30080 -> backend, snat client -> NODE':P']`. Such a record (a DNAT followed by
an SNAT) names both halves' keys; this module learns them as **aliases** (half key -> the real
ends and the chain, for the time the middle records span) and:

- a half's record that arrives after the middle record is rewritten to the real key (client =
  the original client, server = the backend, `nat` = the chain): it joins the connection like
  any record, and the connection keeps the NodePort dialled (`service_ip`, `service_port`);
- a half's connection the correlator already holds when the middle record arrives (the half
  came first) is **merged**: its views become records of the real key (the same cumulative
  counters, times, process, tunnel) joined in the same plan, and the half's connection is
  removed (its stored row deleted) with its rollup volumes taken back from its names (by
  minute while its names could still change, `Naming.volumes`; after that all at the minute of
  its last record).

So the result is the same whatever the order of the three pieces and of their batches. An
alias is kept as long as an open connection is (`keep_open` after its last middle record,
record times); after a restart the aliases are learnt again from the stored records that carry
a NAT chain (`learn`), for the same horizon as the connections reloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from aggregator.connection import DROPS, Connection, Counters6
from eastwest.record import Drop, Endpoint, FlowRecord, Mesh, Nat, Process, Rtt, Tunnel

Key = tuple[str, str, int, str, int, int]
NAT_PROTOCOLS = frozenset({"tcp", "udp", "sctp"})
_DPORT = {"vxlan": 4789, "geneve": 6081, "vxlan-gpe": 4790}
CAPACITY = 65536  # aliases held at most (the oldest go first)


@dataclass
class Alias:
    """What a half key stands for: the real ends, the chain, and when (the middle records')."""

    client: Endpoint
    server: Endpoint
    nat: list[Nat]
    start: datetime
    last: datetime


def halves(rec: FlowRecord) -> tuple[Key, Key] | None:
    """The client's half key and the server's half key named by a middle record (a DNAT
    followed by an SNAT in its `nat`), or None."""
    nat = rec.nat
    if nat is None or len(nat) < 2 or rec.loopback or rec.protocol not in NAT_PROTOCOLS:
        return None
    dnat = next((i for i, n in enumerate(nat) if n.type != "snat"), None)
    if dnat is None:
        return None
    snat = next((n for n in reversed(nat[dnat + 1:]) if n.type == "snat"), None)
    if snat is None:
        return None
    d = nat[dnat].original
    p = rec.protocol
    return ((p, rec.client.ip, rec.client.port, d.ip, d.port, 0),
            (p, snat.translated.ip, snat.translated.port, rec.server.ip, rec.server.port, 0))


def _overlaps(a: Alias, start: datetime, end: datetime, slack: timedelta) -> bool:
    return not (end < a.start - slack or start > a.last + slack)


@dataclass
class Merge:
    """A batch prepared: its records (halves rewritten, merged halves' views appended) and the
    held half connections to remove (conn_id -> the connection as held)."""

    records: list[FlowRecord]
    removed: dict[str, Connection]


class NodePortJoin:
    """The aliases of one correlator (see the module docstring)."""

    def __init__(self, slack: timedelta, keep_open: timedelta, capacity: int = CAPACITY) -> None:
        self.slack, self.keep_open, self.capacity = slack, keep_open, capacity
        self.aliases: OrderedDict[Key, list[Alias]] = OrderedDict()
        self.merged = 0  # half connections merged (committed or not)

    def __len__(self) -> int:
        return sum(len(v) for v in self.aliases.values())

    def clear(self) -> None:
        self.aliases.clear()

    # -- learning -----------------------------------------------------------------------------
    def learn(self, records: Iterable[FlowRecord]) -> list[tuple[Key, Alias]]:
        """Learn the aliases of the middle records among `records`; the (half key, alias)
        pairs they made or extended."""
        touched: list[tuple[Key, Alias]] = []
        for rec in records:
            ks = halves(rec)
            if ks is None:
                continue
            for k in ks:
                got = self.aliases.get(k)
                a = None
                if got is not None:
                    a = next((x for x in got if x.client == rec.client and x.server == rec.server
                              and _overlaps(x, rec.start, rec.end, self.slack)), None)
                if a is None:
                    a = Alias(rec.client, rec.server, list(rec.nat or ()), rec.start, rec.end)
                    self.aliases.setdefault(k, []).append(a)
                    self.aliases.move_to_end(k)
                    while len(self.aliases) > self.capacity:
                        self.aliases.popitem(last=False)
                else:
                    a.start, a.last = min(a.start, rec.start), max(a.last, rec.end)
                touched.append((k, a))
        return touched

    def alias_of(self, key: Key, start: datetime, end: datetime) -> Alias | None:
        got = self.aliases.get(key)
        if not got:
            return None
        return next((a for a in got if _overlaps(a, start, end, self.slack)), None)

    def prune(self, high_water: datetime | None) -> int:
        """Forget aliases whose middle records ended `keep_open` before the high water."""
        if high_water is None:
            return 0
        after = high_water - self.keep_open
        gone = 0
        for k in list(self.aliases):
            keep = [a for a in self.aliases[k] if a.last >= after]
            gone += len(self.aliases[k]) - len(keep)
            if keep:
                self.aliases[k] = keep
            else:
                del self.aliases[k]
        return gone

    # -- a batch ------------------------------------------------------------------------------
    def prepare(self, records: Sequence[FlowRecord],
                held: Callable[[Key], list[Connection]]) -> Merge:
        """The batch with its halves rewritten; the held half connections that the batch's
        middle records name, merged (`held(key)`: the correlator's connections of a key)."""
        touched = self.learn(records)
        if not self.aliases:
            return Merge(list(records), {})
        out = [self.rewrite(r) for r in records]
        removed: dict[str, Connection] = {}
        extra: list[FlowRecord] = []
        for k, a in touched:
            for c in held(k):
                if c.conn_id in removed or not _overlaps(a, c.start, c.last_seen, self.slack):
                    continue
                removed[c.conn_id] = c
                extra.extend(records_of_half(c, a))
        self.merged += len(removed)
        return Merge(extra + out, removed)

    def rewrite(self, rec: FlowRecord) -> FlowRecord:
        """`rec` under its real key when it is a half of a known NodePort call."""
        if rec.nat is not None or rec.loopback:
            return rec
        a = self.alias_of((rec.protocol, rec.client.ip, rec.client.port, rec.server.ip,
                           rec.server.port, 0), rec.start, rec.end)
        if a is None:
            return rec
        return rec.replace(client=a.client, server=a.server, nat=list(a.nat))

    def wants_records(self, records: Sequence[FlowRecord]) -> bool:
        """Whether the batch has a middle record or a known half's record (else `prepare`
        would change nothing: the usual path)."""
        al = self.aliases
        for r in records:
            if r.nat is not None:
                if halves(r) is not None:
                    return True
            elif al and (r.protocol, r.client.ip, r.client.port, r.server.ip, r.server.port,
                         0) in al:
                return True
        return False

    def wants(self, keys: Iterable[Key]) -> bool:
        """Whether any of these keys is a known half (a cheap test before `prepare`)."""
        al = self.aliases
        return any(k in al for k in keys)


def records_of_half(c: Connection, a: Alias) -> list[FlowRecord]:
    """A held half connection's views as records of the real connection: what each observer
    reported last (its cumulative counters, times, final flag), its process, the tunnel, and
    a socket observer's service-mesh side (aggregator/mesh.py)."""
    out: list[FlowRecord] = []
    tunnel = c.tunnel
    meshes = {s.observer: Mesh(s.proxy, list(s.hops)) for s in c.mesh or ()}
    for i, v in enumerate(c.views.values()):
        obs = v.observer
        proc = c.client_proc if obs == "client" else c.server_proc if obs == "server" else None
        drops = None
        if obs == DROPS:
            source, obs, drops = "drops", "path", [Drop(v.reason or "NOT_SPECIFIED",
                                                        v.packets_c2s or 0)]
        elif obs == "path":
            source = "wire"
        else:
            source = "socket"
        tun = None
        if obs == "path" and drops is None and tunnel is not None:
            tun = Tunnel(tunnel.type, tunnel.vni, tunnel.vtep_src,  # type: ignore[arg-type]
                         tunnel.vtep_dst, _DPORT.get(tunnel.type, 4789))
        out.append(FlowRecord(
            record_id=f"{v.collector}:nodeport-{c.conn_id}-{i}", collector=v.collector,
            source=source, start=v.start, end=v.end, final=v.final,  # type: ignore[arg-type]
            protocol=c.protocol, family=c.family,  # type: ignore[arg-type]
            client=a.client, server=a.server, observer=obs,  # type: ignore[arg-type]
            bytes_c2s=v.bytes_c2s, bytes_s2c=v.bytes_s2c, packets_c2s=v.packets_c2s,
            packets_s2c=v.packets_s2c, connect=v.connect,  # type: ignore[arg-type]
            retransmits=v.retransmits, resets=v.resets,
            rtt_us=Rtt(*v.rtt) if v.rtt is not None else None,
            process=(Process(proc.pid, proc.comm or "")
                     if proc is not None and proc.pid is not None else None),
            netns=proc.netns if proc is not None else None,
            container=proc.container if proc is not None else None,
            tunnel=tun, incomplete=["nat"] if v.incomplete else [], drops=drops,
            nat=list(a.nat), mesh=meshes.get(obs) if drops is None else None))
    return out


def volumes_of(c: Connection, minute_of: Callable[[datetime], datetime]
               ) -> list[tuple[datetime, Counters6]]:
    """The rollup volumes attributed to a connection's names, by minute: exact while its names
    could change (`Naming.volumes`), else its counters at the minute of its last record."""
    if c.naming is not None:
        return [(m, v) for m, v in c.naming.volumes if any(v)]
    best = c.best()
    return [(minute_of(c.last_seen), best)] if any(best) else []
