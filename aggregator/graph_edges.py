"""The edges of a window's graph as data: store columns -> nodes and JSON edges -> the response,
and networkx only when analysis needs it.

Stage: query side, between the store (its `edges` query: aggregator/store/duckdb_edges.py, each
edge's JSON written by DuckDB; or ClickHouse's `edge_counts` + `edge_volumes` rows turned into
the same columns by `columns_of_rows` here) and the API. Out: `GraphData`, whose `json_bytes()` is the
GET /api/v1/graph document (docs/api.md) and whose `graph()` is the `nx.DiGraph` that analysis,
diff and the text renderers use (built once, on first use, from the same edges).

Why: with 10,000 edges, building a DiGraph, walking it back into dicts and `json.dumps` cost as
much as the SQL (bench/bench_graph_api.py); here Python touches one string per edge.
"""

from __future__ import annotations

from bisect import insort
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter, itemgetter
from typing import Any

import msgspec
import networkx as nx

from aggregator.encrypted_edges import mark_all

OTHER = "other"
NULLABLE = frozenset({"packets_c2s", "packets_s2c"})  # null: none of the edge's connections counted
SUMMED = ("connections_opened", "connections_active", "connections_closed", "connections_failed",
          "resets", "retransmits", "bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c",
          "byte_mismatches")
EDGE_FIELDS = (*SUMMED, "rtt_us", "ports", "protocols", "first_seen", "last_seen", "complete",
               "observed_by", "folded", "drops")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()

Node = tuple[str | None, str | None, str | None]  # name, namespace, kind
# source, target, the edge's JSON object, weight (bytes both ways, opened), first/last seen µs
JsonEdge = tuple[str, str, str, tuple[int, int], int | None, int | None]


def iso(v: Any) -> Any:
    return v.isoformat().replace("+00:00", "Z") if isinstance(v, datetime) else v


def us_of(t: datetime | int | None) -> int | None:
    if t is None or isinstance(t, int):
        return t
    return (t - _EPOCH) // timedelta(microseconds=1)


def datetime_of(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def volume_window(since: datetime, until: datetime) -> tuple[datetime, datetime]:
    """What rollup volumes cover for the window [since, until): every minute it touches, from
    the minute of `since` to `until` rounded up to a minute. A minute holds the increases of the
    records whose `end` falls in it (aggregator/correlate.py), so a window starting or ending
    inside a minute counts that whole minute's volumes (docs/api.md, `volume_since`)."""
    lo = since.replace(second=0, microsecond=0)
    hi = until.replace(second=0, microsecond=0)
    return lo, hi if hi == until else hi + timedelta(minutes=1)


def node_of(nodes: dict[str, Node], nid: str, name: str | None, namespace: str | None,
            kind: str | None, group_by: str) -> None:
    """The first mention of a node names it; a namespace or host node is named by its id."""
    if nid in nodes:
        return
    if group_by in ("workload", "service"):
        nodes[nid] = (name or nid, namespace, kind)
    else:
        nodes[nid] = (nid, nid if group_by == "namespace" else None,
                      "Namespace" if group_by == "namespace" else "Host")


def drops_of(dropped: int | None, reasons_text: str | None) -> dict[str, Any] | None:
    """An edge's `drops` ({packets, reasons: {REASON: packets}}, null when none of its
    connections in the window had any) from the sum of their `dropped` and their
    `drop_reasons` texts joined by commas ("NETFILTER_DROP=3,NO_SOCKET=1,NETFILTER_DROP=2")."""
    if dropped is None:
        return None
    reasons: dict[str, int] = {}
    for part in (reasons_text or "").split(","):
        if part:
            r, _, n = part.partition("=")
            reasons[r] = reasons.get(r, 0) + int(n)
    return {"packets": int(dropped), "reasons": dict(sorted(reasons.items()))}


def add_drops(edges: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The drops of folded edges, added up (null when none of them had any)."""
    got = [d for d in edges if d is not None]
    if not got:
        return None
    reasons: dict[str, int] = {}
    for d in got:
        for r, n in d["reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
    return {"packets": sum(d["packets"] for d in got), "reasons": dict(sorted(reasons.items()))}


# -- an edge counted in Python from its connection rows (DNS-named edges, mesh hops) ----------
def counts_of_rows(src: str, dst: str, rows: list[dict[str, Any]], since: datetime,
                   until: datetime, *, volumes: list[tuple[int, int]] | None = None,
                   ports: Iterable[int] | None = None, dst_name: str | None = None,
                   dst_kind: str | None = None) -> dict[str, Any]:
    """An `edge_counts` row from its connections' rows, by the rules of the store's edge query
    (aggregator/store/duckdb_edges.py WINDOW_COUNTS), for `columns_of_rows`. `volumes`: each
    connection's (bytes c2s, bytes s2c) when not its own bytes (a mesh hop's); `ports`: the
    edge's server ports when not the connections' own."""
    rtts = [r for r in rows if r["rtt_avg_us"] is not None]
    observed: dict[str, int] = {}
    for r in rows:
        observed[r["observed_by"]] = observed.get(r["observed_by"], 0) + 1
    if volumes is None:
        volumes = [(int(r["bytes_c2s"] or 0), int(r["bytes_s2c"] or 0)) for r in rows]

    def total(k: str) -> int:
        return sum(int(r[k] or 0) for r in rows)

    return {
        "src": src, "dst": dst, "src_name": None, "src_namespace": None, "src_kind": None,
        "dst_name": dst_name, "dst_namespace": None, "dst_kind": dst_kind,
        "opened": sum(1 for r in rows if r["start_ts"] >= since),
        "active": sum(1 for r in rows if not r["closed"] or r["closed_ts"] >= until),
        "closed": sum(1 for r in rows if r["closed"] and since <= r["closed_ts"] < until),
        "failed": sum(1 for r in rows if r["start_ts"] >= since
                      and r["outcome"] in ("refused", "timeout", "dropped")),
        "reset": sum(1 for r in rows if r["start_ts"] >= since and r["outcome"] == "reset"),
        "byte_mismatches": sum(1 for r in rows if r["byte_mismatch"]),
        "incomplete": sum(1 for r in rows if r["incomplete"]),
        "conn_bytes_c2s": sum(x for x, _ in volumes), "conn_bytes_s2c": sum(y for _, y in volumes),
        "conn_retransmits": total("retransmits"),
        "conn_packets_c2s": total("packets_c2s"), "conn_packets_s2c": total("packets_s2c"),
        "packets_n_c2s": sum(1 for r in rows if r["packets_c2s"] is not None),
        "packets_n_s2c": sum(1 for r in rows if r["packets_s2c"] is not None),
        "rtt_min": min((r["rtt_min_us"] for r in rtts), default=None),
        "rtt_avg": sum(r["rtt_avg_us"] for r in rtts) / len(rtts) if rtts else None,
        "rtt_max": max((r["rtt_max_us"] for r in rtts), default=None),
        "ports": sorted(set(ports) if ports is not None else {r["server_port"] for r in rows}),
        "protocols": sorted({r["protocol"] for r in rows}),
        "observed_by": observed,
        "first_seen": min(r["start_ts"] for r in rows),
        "last_seen": max(r["last_seen"] for r in rows),
    }


# -- edges split in Python (DNS-named servers, mesh hops): what stays, what joins -----------
def ends_of(row: dict[str, Any], group_by: str) -> tuple[str, str] | None:
    """The (source, target) of the edge a connection row counts in, as the store groups it
    (aggregator/store/duckdb_edges.py `GROUPS`); None in the Service view for a connection that
    dialled a Service (its edge ends at the Service)."""
    if group_by == "namespace":
        return (row["client_namespace"] or row["client_wid"],
                row["server_namespace"] or row["server_wid"])
    if group_by == "host":
        return row["client_host"] or "unknown", row["server_host"] or "unknown"
    if group_by == "service" and row.get("service_ip") is not None:
        return None  # on an edge to its Service
    return row["client_wid"], row["server_wid"]



_COUNTS = tuple(k for k in SUMMED if k not in NULLABLE)  # summed as ints; NULLABLE apart


def minus_parts(edge: JsonEdge, parts: list[JsonEdge]) -> JsonEdge | None:
    """What stays of `edge` once `parts` moved away to edges of their own (None: nothing): counts exactly, volumes
    less the parts' connections' totals (at least 0: the rollups count the window's minutes)."""
    obj = _dec.decode(edge[2])
    gone = [_dec.decode(p[2]) for p in parts]
    for k in _COUNTS:
        obj[k] = max(0, int(obj[k]) - sum(int(g[k]) for g in gone))
    for k in ("packets_c2s", "packets_s2c"):
        if obj[k] is not None:
            obj[k] = max(0, obj[k] - sum(g[k] or 0 for g in gone))
    observed = dict(obj["observed_by"])
    for g in gone:
        for k, n in g["observed_by"].items():
            observed[k] = observed.get(k, 0) - n
    obj["observed_by"] = {k: n for k, n in observed.items() if n > 0}
    if not (obj["connections_opened"] or obj["connections_active"] or obj["connections_closed"]
            or obj["bytes_c2s"] or obj["bytes_s2c"]):
        return None
    return (edge[0], edge[1], _enc.encode(obj).decode(),
            (obj["bytes_c2s"] + obj["bytes_s2c"], obj["connections_opened"]), edge[4], edge[5])




def merge_same_pairs(edges: list[JsonEdge]) -> list[JsonEdge]:
    """Edges with the same (source, target) as one (two addresses answered for one DNS name, a
    mesh hop shared by several app edges): counts and volumes summed."""
    groups: dict[tuple[str, str], list[JsonEdge]] = {}
    for e in edges:
        groups.setdefault((e[0], e[1]), []).append(e)
    out: list[JsonEdge] = []
    for (src, dst), same in groups.items():
        if len(same) == 1:
            out.append(same[0])
            continue
        objs = [_dec.decode(e[2]) for e in same]
        acc = dict(objs[0])
        for k in _COUNTS:
            acc[k] = sum(int(o[k]) for o in objs)
        for k in ("packets_c2s", "packets_s2c"):
            counted = [o[k] for o in objs if o[k] is not None]
            acc[k] = sum(counted) if counted else None
        rtts = [(o["rtt_us"], max(1, o["connections_active"] + o["connections_closed"]))
                for o in objs if o["rtt_us"]]
        acc["rtt_us"] = None if not rtts else {
            "min": min(r["min"] for r, _ in rtts),
            "avg": round(sum(r["avg"] * w for r, w in rtts) / sum(w for _, w in rtts)),
            "max": max(r["max"] for r, _ in rtts)}
        acc["ports"] = sorted({p for o in objs for p in o["ports"]})
        acc["protocols"] = sorted({p for o in objs for p in o["protocols"]})
        observed: dict[str, int] = {}
        for o in objs:
            for k, n in o["observed_by"].items():
                observed[k] = observed.get(k, 0) + n
        acc["observed_by"] = observed
        firsts = [e[4] for e in same if e[4] is not None]
        lasts = [e[5] for e in same if e[5] is not None]
        acc["first_seen"] = min((o["first_seen"] for o in objs if o["first_seen"]), default=None)
        acc["last_seen"] = max((o["last_seen"] for o in objs if o["last_seen"]), default=None)
        acc["complete"] = all(o["complete"] for o in objs)
        named = [o["dns_named"] for o in objs if "dns_named" in o]
        if named:
            acc["dns_named"] = {k: sum(n[k] for n in named) for k in ("ttl", "hint")}
        out.append((src, dst, _enc.encode(acc).decode(),
                    (sum(e[3][0] for e in same), sum(e[3][1] for e in same)),
                    min(firsts) if firsts else None, max(lasts) if lasts else None))
    return sorted(out)


# -- a backend that aggregates counts and volumes apart: its rows -> the same columns ----------
def columns_of_rows(counts: list[dict[str, Any]], volumes: list[dict[str, Any]] | None,
                    ) -> dict[str, list[Any]]:
    """`edge_counts` rows (+ `edge_volumes` rows when the rollups answer) -> the columns of
    aggregator/store/duckdb_edges.py `EDGE_COLUMNS`, each edge's JSON written here."""
    from aggregator.store.duckdb_edges import EDGE_COLUMNS

    cols: dict[str, list[Any]] = {n: [] for n in EDGE_COLUMNS}
    vols = {(r["src"], r["dst"]): r for r in volumes or ()}

    def add(src: str, dst: str, names: tuple[Any, ...], attrs: dict[str, Any], conns: bool,
            first: int | None, last: int | None) -> None:
        edge = {"source": src, "target": dst, **attrs, "first_seen": iso(datetime_of(first)),
                "last_seen": iso(datetime_of(last))}
        row = (src, dst, *names, conns, attrs["bytes_c2s"] + attrs["bytes_s2c"],
               attrs["connections_opened"], first, last, _enc.encode(edge).decode())
        for n, v in zip(EDGE_COLUMNS, row, strict=True):
            cols[n].append(v)

    for r in sorted(counts, key=lambda r: (r["src"], r["dst"])):
        v = vols.pop((r["src"], r["dst"]), {}) if volumes is not None else None
        if v is not None:
            vol = [v.get(k) for k in ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c",
                                      "retransmits")]
        else:
            vol = [r["conn_bytes_c2s"], r["conn_bytes_s2c"], r["conn_packets_c2s"],
                   r["conn_packets_s2c"], r["conn_retransmits"]]
        # packets: null when no connection counted them and the volumes hold none
        # (aggregator/store/duckdb_edges.py PACKET_COUNTS, the same rule)
        packets = [None if not r[f"packets_n_{d}"] and not vol[i] else int(vol[i] or 0)
                   for i, d in ((2, "c2s"), (3, "s2c"))]
        attrs = {
            "connections_opened": int(r["opened"]), "connections_active": int(r["active"]),
            "connections_closed": int(r["closed"]), "connections_failed": int(r["failed"]),
            "resets": int(r["reset"]), "byte_mismatches": int(r["byte_mismatches"]),
            "bytes_c2s": int(vol[0] or 0), "bytes_s2c": int(vol[1] or 0),
            "packets_c2s": packets[0], "packets_s2c": packets[1],
            "retransmits": int(vol[4] or 0),
            "rtt_us": None if r["rtt_min"] is None else {
                "min": int(r["rtt_min"]), "avg": int(round(r["rtt_avg"])), "max": int(r["rtt_max"])},
            "ports": [int(p) for p in r["ports"]], "protocols": list(r["protocols"]),
            "first_seen": None, "last_seen": None, "complete": not r["incomplete"],
            "observed_by": {k.strip(","): int(n) for k, n in (r["observed_by"] or {}).items()},
            "folded": 1, "drops": drops_of(r.get("dropped"), r.get("drop_text"))}
        add(r["src"], r["dst"], (r["src_name"], r["src_namespace"], r["src_kind"],
                                 r["dst_name"], r["dst_namespace"], r["dst_kind"]),
            attrs, True, us_of(r["first_seen"]), us_of(r["last_seen"]))
    for (src, dst), v in sorted(vols.items()):  # volumes in the window's minutes, no connection
        if not any(v.get(k) for k in ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c")):
            continue
        attrs = {k: 0 for k in SUMMED}
        attrs.update({k: int(v.get(k) or 0) for k in ("bytes_c2s", "bytes_s2c", "retransmits")})
        attrs.update({k: int(v[k]) if v.get(k) else None for k in ("packets_c2s", "packets_s2c")})
        attrs.update(rtt_us=None, ports=[], protocols=[], first_seen=None, last_seen=None,
                     complete=True, observed_by={}, folded=1, drops=None)
        add(src, dst, (None,) * 6, attrs, False, None, None)
    return cols


# -- the cardinality budget -----------------------------------------------------------------------
def fold_attrs(folded: list[dict[str, Any]]) -> dict[str, Any]:
    """The `other -> other` edge standing for `folded` edges: their sums, ports (at most 100),
    protocols, observers, first and last seen (datetimes or µs, whatever they carry)."""
    acc: dict[str, Any] = {k: None if k in NULLABLE else 0 for k in SUMMED}
    ports: set[int] = set()
    protos: set[str] = set()
    observed: dict[str, int] = {}
    complete = True
    for a in folded:
        for k in SUMMED:
            if a[k] is not None:
                acc[k] = (acc[k] or 0) + a[k]
        ports.update(a["ports"])
        protos.update(a["protocols"])
        for k, n in a["observed_by"].items():
            observed[k] = observed.get(k, 0) + n
        complete = complete and a["complete"]
    acc.update(rtt_us=None, ports=sorted(ports)[:100], protocols=sorted(protos),
               first_seen=min((a["first_seen"] for a in folded if a["first_seen"] is not None),
                              default=None),
               last_seen=max((a["last_seen"] for a in folded if a["last_seen"] is not None),
                             default=None),
               complete=complete, observed_by=observed, folded=len(folded),
               drops=add_drops([a.get("drops") for a in folded]))
    return acc


class _Folded(msgspec.Struct, gc=False):
    """What folding reads of an edge's JSON (the other fields are skipped by the decoder);
    gc=False: 8,000 folded edges must not feed the cyclic collector (it cost more than the fold)."""
    connections_opened: int
    connections_active: int
    connections_closed: int
    connections_failed: int
    resets: int
    retransmits: int
    bytes_c2s: int
    bytes_s2c: int
    packets_c2s: int | None
    packets_s2c: int | None
    byte_mismatches: int
    ports: tuple[int, ...]
    protocols: tuple[str, ...]
    observed_by: dict[str, int]
    complete: bool
    drops: dict[str, Any] | None = None


_folded_dec = msgspec.json.Decoder(list[_Folded])


def fold_json(texts: list[str], first: list[int | None], last: list[int | None]) -> dict[str, Any]:
    """`fold_attrs` of edges given as their JSON objects (and first/last seen in µs), without
    building a dict per edge: the same result, field for field and in the same order."""
    items = _folded_dec.decode(b"[" + ",".join(texts).encode() + b"]")
    acc: dict[str, Any] = {k: sum(map(attrgetter(k), items)) for k in SUMMED if k not in NULLABLE}
    for k in NULLABLE:  # null when no folded edge counted them
        counted = [x for x in map(attrgetter(k), items) if x is not None]
        acc[k] = sum(counted) if counted else None
    acc = {k: acc[k] for k in SUMMED}  # the fields' order
    ports: set[int] = set().union(*map(attrgetter("ports"), items))
    protos: set[str] = set().union(*map(attrgetter("protocols"), items))
    observed: dict[str, int] = {}
    for a in items:
        for k, n in a.observed_by.items():
            observed[k] = observed.get(k, 0) + n
    acc.update(rtt_us=None, ports=sorted(ports)[:100], protocols=sorted(protos),
               first_seen=min((f for f in first if f is not None), default=None),
               last_seen=max((t for t in last if t is not None), default=None),
               complete=all(map(attrgetter("complete"), items)), observed_by=observed,
               folded=len(items), drops=add_drops([a.drops for a in items]))
    return acc


def rank(edges: Iterable[Any], weight: Any) -> list[Any]:
    """Heaviest first: bytes, then connections opened, ties by (source, target) descending."""
    return sorted(edges, key=lambda e: (weight(e), e[0], e[1]), reverse=True)


# -- the graph of a window ------------------------------------------------------------------------
@dataclass
class GraphData:
    since: datetime
    until: datetime
    group_by: str
    volume_source: str
    filter: str
    nodes: dict[str, Node]
    edges: list[JsonEdge]                # sorted by (source, target)
    folded_edges: int = 0
    _graph: nx.DiGraph | None = field(default=None, repr=False)

    @classmethod
    def of_columns(cls, cols: dict[str, list[Any]], since: datetime, until: datetime,
                   group_by: str, volume_source: str, filter: str) -> GraphData:
        nodes: dict[str, Node] = {}
        c = cols
        conns = c["conns"]
        # edges with connections name their nodes (the first mention), then edges with rollup
        # volumes only (node_of); one pass of plain dict probes, no call per edge
        if group_by in ("workload", "service"):
            for s, sn, sns, sk, d, dn, dns, dk, x in zip(
                    c["src"], c["src_name"], c["src_namespace"], c["src_kind"], c["dst"],
                    c["dst_name"], c["dst_namespace"], c["dst_kind"], conns, strict=True):
                if x:
                    if s not in nodes:
                        nodes[s] = (sn or s, sns, sk)
                    if d not in nodes:
                        nodes[d] = (dn or d, dns, dk)
        else:
            for s, d, x in zip(c["src"], c["dst"], conns, strict=True):
                if x:
                    node_of(nodes, s, None, None, None, group_by)
                    node_of(nodes, d, None, None, None, group_by)
        if not all(conns):
            for i, src in enumerate(c["src"]):
                if not conns[i]:
                    for n in (src, c["dst"][i]):
                        node_of(nodes, n, n.rsplit("/", 1)[-1],
                                n.split("/", 1)[0] if "/" in n else None, None, group_by)
        edges = sorted(zip(c["src"], c["dst"], mark_all(c["json"]),
                           zip(c["w_bytes"], c["w_opened"], strict=True), c["first_us"],
                           c["last_us"], strict=True))
        return cls(since, until, group_by, volume_source, filter, nodes, edges)

    @property
    def volume_span(self) -> tuple[datetime | None, datetime | None]:
        """[volume_since, volume_until): what the rollup volumes cover; None, None when the
        volumes are the matching connections' totals."""
        if self.volume_source != "rollups":
            return None, None
        return volume_window(self.since, self.until)

    def fold(self, budget: int | None) -> None:
        """The cardinality budget (aggregator/graph.py)."""
        if budget is None or budget < 1 or len(self.edges) <= budget:
            return
        ranked = rank(self.edges, lambda e: e[3])
        kept, folded = ranked[:budget - 1], ranked[budget - 1:]
        other = fold_json([e[2] for e in folded], [e[4] for e in folded], [e[5] for e in folded])
        first, last = other["first_seen"], other["last_seen"]
        text = _enc.encode({"source": OTHER, "target": OTHER, **other,
                            "first_seen": iso(datetime_of(first)),
                            "last_seen": iso(datetime_of(last))}).decode()
        used = {n for e in kept for n in (e[0], e[1])}
        self.nodes = {n: a for n, a in self.nodes.items() if n in used}
        self.nodes[OTHER] = (OTHER, None, "Other")
        self.edges = sorted(e for e in kept if (e[0], e[1]) != (OTHER, OTHER))
        insort(self.edges, (OTHER, OTHER, text, (other["bytes_c2s"] + other["bytes_s2c"],
                                                 other["connections_opened"]), first, last))
        self.folded_edges = len(folded)

    def json_bytes(self) -> bytes:
        deg_out = Counter(map(itemgetter(0), self.edges))
        deg_in = Counter(map(itemgetter(1), self.edges))
        head = _enc.encode({
            "since": iso(self.since), "until": iso(self.until), "group_by": self.group_by,
            "volume_source": self.volume_source, "volume_since": iso(self.volume_span[0]),
            "volume_until": iso(self.volume_span[1]), "filter": self.filter,
            "folded_edges": self.folded_edges,
            "nodes": [{"id": n, "name": a[0], "namespace": a[1], "kind": a[2],
                       "in_degree": deg_in.get(n, 0), "out_degree": deg_out.get(n, 0)}
                      for n, a in sorted(self.nodes.items())]})
        # one copy of the ~5 MB of edges (UTF-8 once, then one bytes join)
        edges = ",".join(map(itemgetter(2), self.edges)).encode()
        return b"".join((memoryview(head)[:-1], b',"edges":[', edges, b"]}"))

    def graph(self) -> nx.DiGraph:
        """The same graph as a networkx DiGraph (first_seen/last_seen as datetimes), built once."""
        if self._graph is None:
            g = nx.DiGraph(since=self.since, until=self.until, group_by=self.group_by,
                           volume_source=self.volume_source, volume_since=self.volume_span[0],
                           volume_until=self.volume_span[1], filter=self.filter)
            if self.folded_edges:
                g.graph["folded_edges"] = self.folded_edges
            for n, (name, namespace, kind) in self.nodes.items():
                g.add_node(n, name=name, namespace=namespace, kind=kind)
            attrs = _dec.decode(b"[" + ",".join(e[2] for e in self.edges).encode() + b"]")
            for a, e in zip(attrs, self.edges, strict=True):
                del a["source"], a["target"]
                a["first_seen"], a["last_seen"] = datetime_of(e[4]), datetime_of(e[5])
            g.add_edges_from((e[0], e[1], a) for e, a in zip(self.edges, attrs, strict=True))
            self._graph = g
        return self._graph
