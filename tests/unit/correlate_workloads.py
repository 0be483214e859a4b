"""Generated correlation workloads, and how to compare a reference `Correlator` with a
`ColumnCorrelator` on them batch by batch (tests/unit/test_correlate_columns.py).

A workload: a few connections that share keys (reused client ports inside and outside the
slack, loopback connections in several namespaces), each reported by any subset of its
observers (client, server, several wire collectors) with clock skew per host, interim records
then a final one, late interim records, processes, containers, tunnels, RTTs, collector-reported
workloads (observers disagreeing), NAT chains with a dialled Service address (observers knowing
it or not, sometimes disagreeing), IPv4 and IPv6, link-local addresses, drop sources (records
of source `drops`: one or more reasons, interim and final, alone or beside the connection's
other observers, before or after them); split into batches in
any order; between batches the wall clock moves (names settle), a plan may be rolled back, the
correlators may restart from their own connections, or prune.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import types
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aggregator import correlate as correlate_module
from aggregator.connection import Connection, Identity
from aggregator.correlate import Correlator, Plan
from aggregator.correlate_columns import ColumnCorrelator
from aggregator.correlate_plan import ColumnPlan
from aggregator.identity import IdentityResolver, StaticMap
from aggregator.store.derived import DUCKDB_CONN_SCHEMA, Derived, _views_dec
from eastwest.record import (
    Drop,
    Endpoint,
    FlowRecord,
    Mesh,
    MeshHop,
    Nat,
    Process,
    Rtt,
    Tunnel,
    Workload,
)

T0 = datetime(2026, 11, 28, 4, 0, 10, tzinfo=UTC)
WALL0 = datetime(2026, 11, 28, 5, 0, 0, tzinfo=UTC)
V4 = ["10.244.1.11", "10.244.1.12", "10.244.2.11", "10.1.0.5", "192.168.9.9", "224.0.0.251"]
V6 = ["fd00::1", "fd00::2", "2001:db8::5", "fe80::1"]
TUNNEL_TYPES = ("vxlan", "geneve", "vxlan-gpe")
OUTER = ["10.213.0.1", "10.213.0.2", "10.213.0.3", "fd99::7"]
HOSTS = ["h1", "h2", "h3"]
WORKLOAD_NAMES = ["frontend", "web", "api", "db"]


def static_map() -> StaticMap:
    """CIDR and ip:port entries, labels, a node map for VTEP hosts."""
    return StaticMap([
        {"match": "10.244.1.0/24", "name": "frontend", "namespace": "shop", "host": "h1",
         "labels": {"app": "frontend", "tier": "web"}},
        {"match": "10.244.2.11/32", "name": "api", "namespace": "shop", "host": "h2"},
        {"match": "10.1.0.5:80", "name": "lb", "kind": "Service"},
        {"match": "[fd00::2]:9090", "name": "v6svc", "namespace": "v6"},
        {"match": "fd00::/120", "name": "v6net"},
        {"match": "10.213.0.1/32", "name": "node-h1", "kind": "Node", "host": "h1"},
        {"match": "10.213.0.2/32", "name": "node-h2", "kind": "Node"},
    ])


class Source:
    """A pluggable resolver layer (as Kubernetes): knows one service by ip:port, owned by one
    pod or another depending on the time asked for (an address reused: both correlators must
    ask for the same time, the record's start)."""

    def lookup(self, ip: str, port: int, at: datetime) -> Identity | None:
        if ip == "192.168.9.9" and port == 9090:
            pod = "pod-9" if at.second % 2 == 0 else "pod-9b"
            return Identity(pod, "k8s", "Pod", "h3", {"pod": pod}, "kubernetes")
        return None


def resolver_of(kind: int) -> IdentityResolver:
    """0: nothing configured; 1: static map; 2: static map, CIDR group, reverse DNS, a source."""
    if kind == 0:
        return IdentityResolver()
    if kind == 1:
        return IdentityResolver(static_map())
    return IdentityResolver(
        static_map(), sources=[Source()],
        cidr_groups=[(ipaddress.ip_network("192.168.0.0/16"), "lab")],
        reverse_dns=lambda ip: "fe80-host.example" if ip == "fe80::1" else None)


class Wall:
    """The aggregator's wall clock, moved by the test."""

    def __init__(self) -> None:
        self.t = WALL0

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return (self.t - WALL0).total_seconds()


def counter(start: int) -> Any:
    c = itertools.count(start)
    return lambda n: b"".join(next(c).to_bytes(16, "big") for _ in range(n))


def fake_uuid(start: int) -> Any:
    """What tests put in place of the reference's `uuid` module: ids from a counter."""
    c = itertools.count(start)
    return types.SimpleNamespace(uuid4=lambda: types.SimpleNamespace(hex=f"{next(c):032x}"))


# -- generating ---------------------------------------------------------------------------------
@dataclass
class Scenario:
    records: list[FlowRecord]
    steps: list[tuple[str, Any]] = field(default_factory=list)
    resolver: int = 0
    settle: float = 10.0
    kw: dict[str, timedelta] = field(default_factory=dict)


_seq = itertools.count(1)


def _workload(rnd: random.Random) -> Workload | None:
    if rnd.random() < 0.8:
        return None
    return Workload(rnd.choice(WORKLOAD_NAMES), rnd.choice([None, "shop"]), None,
                    rnd.choice([None, "h2"]), rnd.choice([{}, {"app": "x"}]))


Key = tuple[int, bool, str, str, int, int, str]


def a_key(rnd: random.Random) -> Key:
    family = rnd.choice([4, 4, 6])
    loop = rnd.random() < 0.15
    if loop:
        cip = sip = "127.0.0.1" if family == 4 else "::1"
    else:
        cip, sip = rnd.sample(V4 if family == 4 else V6, 2)
    return (family, loop, cip, sip, rnd.choice([40000, 40001]), rnd.choice([80, 9090]),
            rnd.choice(["tcp", "tcp", "udp"]))


VIPS = {4: ["10.96.0.10", "10.96.0.11"], 6: ["fd00:96::10", "fd00:96::11"]}


def _nat(key: Key, slot: str, start: datetime) -> list[Nat] | None:
    """An observer's translations of the connection, drawn from a generator of its own (seeded
    by the connection and the observer) so the workloads' other draws stay as they were: none,
    a DNAT from one of two VIPs (observers may disagree), or a chain with a masquerade or a
    sidecar's redirect in front."""
    family, loop, cip, sip, cport, sport, protocol = key
    nrnd = random.Random(f"{cip} {sip} {cport} {sport} {protocol} {slot} {start.isoformat()}")
    if loop or nrnd.random() < 0.6:
        return None
    vip = Endpoint(nrnd.choice(VIPS[family]), nrnd.choice([80, sport]))
    chain = [Nat("dnat", vip, Endpoint(sip, sport), nrnd.choice([None, 4026531840]))]
    roll = nrnd.random()
    if roll < 0.2:
        chain.insert(0, Nat("snat", Endpoint(cip, cport), Endpoint(nrnd.choice(VIPS[family]),
                                                                    61000)))
    elif roll < 0.35:
        lo = Endpoint("127.0.0.1" if family == 4 else "::1", 15001)
        chain = [Nat("redirect", vip, lo, 7), Nat("dnat", lo, Endpoint(sip, sport), None)]
    return chain


def _mesh(key: Key, slot: str, start: datetime, k: int) -> Mesh | None:
    """A socket observer's folded mesh call (docs/flow-record.md "mesh") for its k-th record,
    from a generator of its own (as `_nat`): a third of the connections are meshed; their
    records mostly carry it (some not: a newer record without one drops the observer's hops),
    with the hops of the observer's side, their bytes growing with k."""
    family, loop, cip, sip, cport, sport, protocol = key
    if slot not in ("client", "server") or protocol != "tcp":
        return None
    if random.Random(f"mesh {cip} {sip} {cport} {sport} {start.isoformat()}").random() < 0.66:
        return None
    mrnd = random.Random(f"{cip} {sip} {cport} {sport} {slot} {start.isoformat()} {k}")
    if mrnd.random() < 0.2:
        return None
    lo = "127.0.0.1" if family == 4 else "::1"
    n = 100 * (k + 1)
    proxy = mrnd.choice(["ew-sidecar", "envoy"])
    net = MeshHop("proxy-proxy", Endpoint(cip, cport), Endpoint(sip, 15006 if slot == "server"
                                                                 else sport),
                  n + 40, 2 * n + 40, proxy, 31)
    if slot == "client":
        hops = [MeshHop("app-proxy", Endpoint(lo, 41000 + k), Endpoint(lo, 15001), n, 2 * n,
                        proxy, 30), net]
    else:
        hops = [net, MeshHop("proxy-app", Endpoint("127.0.0.6", 42000), Endpoint(lo, sport), n,
                             2 * n, None, None)]
    return Mesh(proxy, hops[::-1] if mrnd.random() < 0.3 else hops)


def flow_records(rnd: random.Random, skew: dict[str, float], key: Key) -> list[FlowRecord]:
    """The records of one connection, from a random subset of its observers."""
    family, loop, cip, sip, cport, sport, protocol = key
    netns = rnd.choice([111, 222, None]) if loop else rnd.choice([None, 4026531840])
    start = T0 + timedelta(seconds=rnd.choice([0, 0, 1.5, 2.5, 6, 30, 65]))
    dur = rnd.choice([0.5, 2.0, 20.0, 70.0])
    c2s, s2c = rnd.randrange(1, 5000), rnd.randrange(1, 90000)
    hc, hs = rnd.choice(HOSTS), rnd.choice(HOSTS)
    slots = rnd.sample(["client", "server", "path:h1", "path:h2", "path:h3", "drops:h1",
                        "drops:h2"], rnd.randint(1, 4))
    out = []
    for slot in slots:
        obs, _, wire = slot.partition(":")
        if obs == "drops":
            out += drop_records(rnd, wire, start + timedelta(seconds=skew[wire]), dur, key, netns)
            continue
        coll = {"client": hc, "server": hs}.get(obs, wire)
        sk = timedelta(seconds=skew[coll])
        extra = rnd.choice([0, 0, 0, 1460, 3000]) if obs == "path" else rnd.choice([0, 0, -7])
        retrans = rnd.choice([0, 0, 1, 3])
        n_interim = rnd.choice([0, 0, 1, 2])
        ends = sorted(rnd.uniform(0.1, dur) for _ in range(n_interim)) + [dur]
        # each observer's tunnel type from what is drawn already (the draws stay as they were):
        # the observers of one connection may name different types, the first one's is kept
        ttype = TUNNEL_TYPES[(cport + ord(slot[-1])) % 3]
        tunnel = (Tunnel(ttype, rnd.choice([42, 43]), rnd.choice(OUTER), rnd.choice(OUTER), 4789)
                  if (obs == "path" and rnd.random() < 0.7) or rnd.random() < 0.05 else None)
        proc = (Process(rnd.randrange(1, 9), rnd.choice(["ew-frontend", "ew-api", "curl", ""]))
                if obs != "path" and rnd.random() < 0.75 else None)
        container = rnd.choice([None, None, "", "c0ffee0123456789abcd"]) if obs != "path" else None
        nat = _nat(key, slot, start)
        for k, end in enumerate(ends):
            final = k == len(ends) - 1 and rnd.random() < 0.85
            frac = (k + 1) / len(ends)
            b1 = max(0, int((c2s + extra) * frac))
            b2 = max(0, int((s2c + max(extra, 0)) * frac))
            out.append(FlowRecord(
                record_id=f"{coll}:{next(_seq)}", collector=coll,
                source="socket" if obs != "path" else rnd.choice(["vxlan", "pcap"]),
                start=start + sk, end=start + sk + timedelta(seconds=end), final=final,
                protocol=protocol, family=family, client=Endpoint(cip, cport),
                server=Endpoint(sip, sport), observer=obs,  # type: ignore[arg-type]
                bytes_c2s=b1, bytes_s2c=b2,
                packets_c2s=b1 // 1000 + 1 if obs == "path" and rnd.random() < 0.8 else None,
                packets_s2c=b2 // 1000 + 1 if obs == "path" and rnd.random() < 0.8 else None,
                connect=rnd.choice([None, "ok", "ok", "refused", "timeout", "reset"]),
                retransmits=retrans if frac == 1 else 0, resets=rnd.choice([0, 0, 1]),
                rtt_us=Rtt(10, 20 + k, 90) if obs != "path" and rnd.random() < 0.6 else None,
                process=proc, netns=netns if obs != "path" else None, container=container,
                tunnel=tunnel, client_workload=_workload(rnd), server_workload=_workload(rnd),
                loopback=loop, incomplete=["no_start"] if rnd.random() < 0.05 else [],
                nat=nat, mesh=_mesh(key, slot, start, k)))
        if n_interim and rnd.random() < 0.3:  # a late interim record, sent again later
            out.append(out[-2].replace(record_id=f"{coll}:{next(_seq)}"))
    return out


DROP_REASONS = ["NETFILTER_DROP", "NO_SOCKET", "TCP_CSUM"]


def drop_records(rnd: random.Random, coll: str, start: datetime, dur: float, key: Key,
                 netns: int | None) -> list[FlowRecord]:
    """A drop source's records of one flow: cumulative packets per reason, reasons appearing in
    later interim records too, a final one (mostly), sometimes a late interim sent again."""
    family, loop, cip, sip, cport, sport, protocol = key
    first = start + timedelta(seconds=rnd.choice([0, 0, 0.2, 1.0]))
    reasons = rnd.sample(DROP_REASONS, rnd.randint(1, 3))
    n = rnd.choice([1, 1, 2, 3])
    ends = sorted(rnd.uniform(0.0, dur) for _ in range(n - 1)) + [dur]
    counts: dict[str, int] = {}
    out = []
    for k, end in enumerate(ends):
        for r in reasons[:k + 1]:
            counts[r] = counts.get(r, 0) + rnd.randint(1, 4)
        out.append(FlowRecord(
            record_id=f"{coll}:{next(_seq)}", collector=coll, source="drops", start=first,
            end=first + timedelta(seconds=end), final=k == n - 1 and rnd.random() < 0.85,
            protocol=protocol, family=family, client=Endpoint(cip, cport),
            server=Endpoint(sip, sport), observer="path", netns=netns, loopback=loop,
            drops=[Drop(r, c) for r, c in counts.items()],
            incomplete=["lost_events"] if rnd.random() < 0.1 else [],
            # what a drop source never reports, and both correlators ignore in one
            **({"bytes_c2s": 7, "packets_s2c": 2, "connect": "timeout", "retransmits": 1,
                "resets": 1, "rtt_us": Rtt(1, 2, 3)} if rnd.random() < 0.1 else {})))
    if n > 1 and rnd.random() < 0.3:
        out.append(out[-2].replace(record_id=f"{coll}:{next(_seq)}"))
    return out


def make_workload(rnd: random.Random) -> Scenario:
    skew = {h: rnd.choice([0.0, 0.0, 0.8, -1.5, 1.5]) for h in HOSTS}
    keys = [a_key(rnd) for _ in range(rnd.randint(1, 3))]  # reused: ports, in and out of slack
    recs = [r for _ in range(rnd.randint(1, 7))
            for r in flow_records(rnd, skew, rnd.choice(keys) if rnd.random() < 0.6
                                  else a_key(rnd))]
    if rnd.random() < 0.4:
        rnd.shuffle(recs)
    else:  # roughly by time, as collectors send
        recs.sort(key=lambda r: r.end + timedelta(seconds=rnd.uniform(-3, 3)))
    w = Scenario(recs, resolver=rnd.choice([0, 1, 2]), settle=rnd.choice([0.0, 5.0, 10.0]),
                 kw={"slack": timedelta(seconds=rnd.choice([1, 5])),
                     "keep_closed": timedelta(seconds=rnd.choice([10, 300])),
                     "keep_open": timedelta(seconds=rnd.choice([40, 1800]))})
    i = 0
    while i < len(recs):
        k = rnd.randint(1, 9)
        w.steps.append(("batch", recs[i:i + k]))
        i += k
        roll = rnd.random()
        if roll < 0.15:
            w.steps.append(("clock", rnd.choice([1, 4, 5, 10, 11, 60])))
        elif roll < 0.2:
            w.steps.append(("rollback", recs[i:i + rnd.randint(1, 6)]))
        elif roll < 0.25:  # sometimes with another workload map: names may become static
            w.steps.append(("restart", rnd.choice([None, None, 0, 1, 2])))
        elif roll < 0.28:
            w.steps.append(("prune", None))
        elif roll < 0.31:
            w.steps.append(("refresh", (rnd.randrange(1000), rnd.randrange(4))))
        elif roll < 0.34:
            w.steps.append(("compact", None))
    w.steps += nodeport_steps(random.Random(repr((len(recs), recs[0].start, recs[0].client))),
                              skew)
    return w


NODE = Endpoint("10.213.0.2", 30080)


def nodeport_steps(nrnd: random.Random, skew: dict[str, float]) -> list[tuple[str, Any]]:
    """NodePort calls with SNAT (aggregator/nodeport.py), drawn from a generator of their own
    (the workload's other draws stay as they were), after the workload's steps: each call's
    pieces from a random subset of the client's socket (to the node), the server's (from the
    masquerade's address) and the middle host's wire (the real key, `nat` = DNAT then SNAT),
    interims and finals, in any order, in random batches with restarts, prunes and rollbacks
    between them. Ports are reused: a later call may take a half's key again."""
    if nrnd.random() < 0.4:
        return []
    recs: list[FlowRecord] = []
    for _ in range(nrnd.randint(1, 3)):
        client = Endpoint(nrnd.choice(V4[:3]), nrnd.choice([40000, 40001]))
        backend = Endpoint(nrnd.choice(["10.244.2.11", "10.244.3.13"]), 8080)
        seen = Endpoint("10.244.2.1", nrnd.choice([51000, 51001]))
        chain = [Nat("dnat", NODE, backend, 4026532001), Nat("snat", client, seen, 4026532001)]
        start = T0 + timedelta(seconds=nrnd.choice([0, 1.0, 30, 65, 200]))
        dur = nrnd.choice([0.5, 4.0, 70.0])
        for piece in nrnd.sample(["client", "server", "middle"], nrnd.randint(1, 3)):
            coll, obs, cl, sv, nat = {"client": ("h1", "client", client, NODE, None),
                                      "server": ("h3", "server", seen, backend, None),
                                      "middle": ("h2", "path", client, backend, chain)}[piece]
            sk = timedelta(seconds=skew[coll])
            n = nrnd.choice([1, 2])
            for k in range(n):
                frac = (k + 1) / n
                recs.append(FlowRecord(
                    record_id=f"{coll}:{next(_seq)}", collector=coll,
                    source="socket" if obs != "path" else "vxlan", start=start + sk,
                    end=start + sk + timedelta(seconds=dur * frac),
                    final=k == n - 1 and nrnd.random() < 0.9, protocol="tcp", family=4,
                    client=cl, server=sv, observer=obs,  # type: ignore[arg-type]
                    bytes_c2s=int(1000 * frac) + (40 if obs == "path" else 0),
                    bytes_s2c=int(5000 * frac),
                    packets_c2s=3 if obs == "path" else None, connect="ok" if k else None,
                    retransmits=nrnd.choice([0, 1]),
                    process=Process(5, "ew-web") if obs == "server" and nrnd.random() < 0.7
                    else None,
                    tunnel=Tunnel("vxlan", 42, "10.213.0.2", "10.213.0.3", 4789)
                    if obs == "path" else None,
                    nat=nat))
    nrnd.shuffle(recs)
    steps: list[tuple[str, Any]] = []
    i = 0
    while i < len(recs):
        k = nrnd.randint(1, 4)
        steps.append(("batch", recs[i:i + k]))
        i += k
        roll = nrnd.random()
        if roll < 0.15:
            steps.append(("restart", None))
        elif roll < 0.25:
            steps.append(("clock", nrnd.choice([5, 11])))
        elif roll < 0.3:
            steps.append(("prune", None))
        elif roll < 0.35:
            steps.append(("rollback", recs[i:i + 2]))
    return steps


# -- comparing ------------------------------------------------------------------------------------
def ref_rows(plan: Plan) -> list[dict[str, Any]]:
    rows = Derived(plan).connection_rows()
    return rows.to_pylist() if rows is not None else []


def assert_same_plan(plan: Plan, cp: ColumnPlan) -> None:
    """Field by field: rows (views compared decoded and as bytes), flags, deltas, rollups
    (as a multiset), workloads (in order)."""
    want, got = ref_rows(plan), cp.rows.to_pylist()
    assert [r["conn_id"] for r in got] == [r["conn_id"] for r in want]
    for a, b in zip(want, got, strict=True):
        va, vb = a.pop("views"), b.pop("views")
        assert _views_dec.decode(vb) == _views_dec.decode(va)
        assert vb == va, "the views blob differs in its bytes"
        assert b == a, {k: (a[k], b[k]) for k in a if a[k] != b.get(k)}
    ids = [r["conn_id"] for r in want]
    assert cp.created.tolist() == [i in plan.created for i in ids]
    assert cp.renamed.tolist() == [i in plan.renamed for i in ids]
    assert cp.has_delta.tolist() == [i in plan.deltas for i in ids]
    assert cp.deltas.tolist() == [plan.deltas.get(i, [0] * 6) for i in ids]
    conns = list(plan.connections.values())
    assert cp.names_final_in_s.tolist() == [
        (c.naming.until - plan.at).total_seconds() if c.naming is not None and plan.at else 0.0
        for c in conns]
    d = Derived(plan)
    for name in ("rollups", "workloads"):
        a, b = getattr(d, name), getattr(cp, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert b.schema == a.schema
            ra, rb = a.to_pylist(), b.to_pylist()
            if name == "rollups":
                ra, rb = sorted(ra, key=repr), sorted(rb, key=repr)
            assert rb == ra, name
    assert cp.rows.schema == DUCKDB_CONN_SCHEMA


def conns_of(ref: Correlator) -> list[Connection]:
    return [c for bucket in ref.index.values() for c in bucket]


def assert_same_state(ref: Correlator, col: ColumnCorrelator, *, deep: bool = True) -> None:
    assert len(col) == len(ref)
    assert col.high_water == ref.high_water
    assert col.settled == ref.settled
    assert (col.renames, col.late_names) == (ref.renames, ref.late_names)
    if deep:
        want, got = conns_of(ref), col.connections()
        assert [c.conn_id for c in got] == [c.conn_id for c in want]
        for a, b in zip(want, got, strict=True):
            assert b == a
            assert list(b.views) == list(a.views)  # insertion order
        held = col.stats()
        if col.native:  # the pools hold exactly what the connections do: nothing leaks
            assert held["views"] == sum(len(c.views) for c in got)
            assert held["volumes"] == sum(len(c.naming.volumes) for c in got if c.naming)
            assert held["keys"] == len({c.key for c in got})


class Pair:
    """A reference correlator and a column correlator fed the same batches."""

    def __init__(self, resolver: int, settle: float, *, native_core: bool | None = True,
                 **kw: Any) -> None:
        self.kind, self.settle, self.kw, self.native_core = resolver, settle, kw, native_core
        self.wall = Wall()
        self.restarts = 0
        self._uuid = correlate_module.uuid  # type: ignore[attr-defined]
        self.ref, self.col = self._new()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        correlate_module.uuid = self._uuid  # type: ignore[attr-defined]

    def _new(self) -> tuple[Correlator, ColumnCorrelator]:
        start = 1 + 1_000_000 * self.restarts
        correlate_module.uuid = fake_uuid(start)  # type: ignore[attr-defined]
        settle = timedelta(seconds=self.settle)
        ref = Correlator(resolver_of(self.kind), settle=settle, clock=self.wall, **self.kw)
        col = ColumnCorrelator(resolver_of(self.kind), settle=settle, clock=self.wall,
                               ids=counter(start), native_core=self.native_core, **self.kw)
        return ref, col

    def batch(self, recs: list[FlowRecord]) -> None:
        p, cp = self.ref.plan(recs), self.col.plan_records(recs)
        assert_same_plan(p, cp)
        assert cp.removed == p.removed  # NodePort halves merged (aggregator/nodeport.py)
        assert dict(cp.connections) == p.connections  # the lazy objects too
        self.ref.commit(p)
        self.col.commit(cp)
        assert_same_state(self.ref, self.col)

    def rollback(self, recs: list[FlowRecord]) -> None:
        before = self.held()
        self.ref.plan(recs)  # planned, never committed
        cp = self.col.plan_records(recs)
        self.col.rollback(cp)
        assert self.held() == before  # every view and volume minute of the plan freed
        assert_same_state(self.ref, self.col)

    def held(self) -> dict[str, int]:
        return {k: v for k, v in self.col.stats().items() if k not in ("bytes", "resolver_calls")}

    def refresh(self, pick: int, variant: int) -> None:
        """A shared store's copy of one key: none, one fewer, the same, in reverse order."""
        keys = list(self.ref.index)
        if not keys:
            return
        key = keys[pick % len(keys)]
        conns = self.ref.index[key]
        fresh = {key: [[], conns[:-1], list(conns), conns[::-1]][variant]}
        self.ref.refresh(fresh)
        self.col.refresh(fresh)
        assert_same_state(self.ref, self.col)

    def restart(self, resolver: int | None = None) -> None:
        self.restarts += 1
        if resolver is not None:
            self.kind = resolver
        old_ref, old_col = self.ref, self.col
        self.ref, self.col = self._new()
        self.ref.load(conns_of(old_ref))
        self.col.load(old_col.connections())
        assert_same_state(self.ref, self.col)

    def compact(self) -> None:
        """The column correlator forgets unused dictionary entries: nothing else changes."""
        core = self.col.core
        assert core is not None
        core.compact()
        assert_same_state(self.ref, self.col)

    def prune(self) -> None:
        assert self.col.prune() == self.ref.prune()
        assert_same_state(self.ref, self.col, deep=False)

    def run(self, w: Scenario) -> None:
        for step, arg in w.steps:
            if step == "batch":
                self.batch(arg)
            elif step == "clock":
                self.wall.t += timedelta(seconds=arg)
            elif step == "rollback":
                self.rollback(arg)
            elif step == "restart":
                self.restart(arg)
            elif step == "refresh":
                self.refresh(*arg)
            elif step == "compact":
                self.compact()
            else:
                self.prune()
        assert_same_state(self.ref, self.col)
