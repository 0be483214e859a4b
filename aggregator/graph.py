"""The service graph of a time window: store rows -> a networkx DiGraph -> JSON, DOT, Mermaid, GraphML.

Stage: query side (the API's /graph, /workloads, /diff). In: a window [since, until), a grouping
(workload | namespace | host), a compiled `Filter`. Out: a `nx.DiGraph` whose nodes are
workloads (or namespaces, hosts) and whose edges go client -> server, carrying the attributes
listed in `EDGE_FIELDS` (docs/api.md); renderers for the API's formats.

Counts (opened, active, closed, failed, reset) come from the `connections` table, exact to the
microsecond; volumes (bytes, packets, retransmits) from the minute `rollups` (the minutes that
the window touches). When the filter has a dimension the rollups do not carry (an IP, the
client port, outcome, observer, VNI), volumes come from the matching connections instead and
the graph says so (`volume_source`).

Cardinality budget: past `budget` edges the heaviest (by bytes, then connections) are kept and
the rest are folded into one edge `other -> other` that carries their sums and `folded` = how
many edges it stands for, so no view and no metric explodes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import networkx as nx

from aggregator.store.base import FlowStore
from aggregator.store.duckdb_derived import CONN_FILTER_COLUMNS, ROLLUP_FILTER_COLUMNS
from eastwest.filters import Filter

OTHER = "other"
SUMMED = ("connections_opened", "connections_active", "connections_closed", "connections_failed",
          "resets", "retransmits", "bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c",
          "byte_mismatches")
EDGE_FIELDS = (*SUMMED, "rtt_us", "ports", "protocols", "first_seen", "last_seen", "complete",
               "observed_by", "folded")


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime


def rollups_can_answer(flt: Filter) -> bool:
    from eastwest.filters import DIMENSIONS

    return all(all(f in ROLLUP_FILTER_COLUMNS for f in DIMENSIONS[c.dim].fields) for c in flt.clauses)


def build_graph(store: FlowStore, window: Window, *, group_by: str = "workload",
                flt: Filter | None = None, budget: int | None = None) -> nx.DiGraph:
    flt = flt or Filter()
    where, params = flt.to_sql(CONN_FILTER_COLUMNS)
    counts = store.edge_counts(window.since, window.until, group_by, where, params)
    from_rollups = rollups_can_answer(flt)
    volumes: dict[tuple[str, str], dict[str, Any]] = {}
    if from_rollups:
        rwhere, rparams = flt.to_sql(ROLLUP_FILTER_COLUMNS)
        for r in store.edge_volumes(window.since, window.until, group_by, rwhere, rparams):
            volumes[(r["src"], r["dst"])] = r
    g = nx.DiGraph(since=window.since, until=window.until, group_by=group_by,
                   volume_source="rollups" if from_rollups else "connections",
                   filter=str(flt))
    for r in counts:
        _node(g, r["src"], r["src_name"], r["src_namespace"], r["src_kind"], group_by)
        _node(g, r["dst"], r["dst_name"], r["dst_namespace"], r["dst_kind"], group_by)
        vol = volumes.pop((r["src"], r["dst"]), None)
        if from_rollups:
            v = vol or {}
            b = (v.get("bytes_c2s"), v.get("bytes_s2c"), v.get("packets_c2s"),
                 v.get("packets_s2c"), v.get("retransmits"))
        else:
            b = (r["conn_bytes_c2s"], r["conn_bytes_s2c"], None, None, r["conn_retransmits"])
        observed = {k.strip(","): int(n) for k, n in (r["observed_by"] or {}).items()}
        g.add_edge(r["src"], r["dst"],
                   connections_opened=int(r["opened"]), connections_active=int(r["active"]),
                   connections_closed=int(r["closed"]), connections_failed=int(r["failed"]),
                   resets=int(r["reset"]), byte_mismatches=int(r["byte_mismatches"]),
                   bytes_c2s=int(b[0] or 0), bytes_s2c=int(b[1] or 0),
                   packets_c2s=int(b[2] or 0), packets_s2c=int(b[3] or 0),
                   retransmits=int(b[4] or 0),
                   rtt_us=None if r["rtt_min"] is None else
                   {"min": int(r["rtt_min"]), "avg": int(round(r["rtt_avg"])), "max": int(r["rtt_max"])},
                   ports=[int(p) for p in r["ports"]], protocols=list(r["protocols"]),
                   first_seen=r["first_seen"], last_seen=r["last_seen"],
                   complete=not r["incomplete"], observed_by=observed, folded=1)
    for (src, dst), v in volumes.items():  # volumes in the window's minutes, no connection in it
        if not any(v.get(k) for k in ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c")):
            continue
        for n in (src, dst):
            _node(g, n, n.rsplit("/", 1)[-1], n.split("/", 1)[0] if "/" in n else None, None, group_by)
        g.add_edge(src, dst, **{k: 0 for k in SUMMED}, rtt_us=None, ports=[], protocols=[],
                   first_seen=None, last_seen=None, complete=True, observed_by={}, folded=1)
        for k in ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "retransmits"):
            g.edges[src, dst][k] = int(v.get(k) or 0)
    if budget is not None:
        fold(g, budget)
    return g


def _node(g: nx.DiGraph, nid: str, name: str | None, namespace: str | None, kind: str | None,
          group_by: str) -> None:
    if nid in g:
        return
    if group_by == "workload":
        g.add_node(nid, name=name or nid, namespace=namespace, kind=kind)
    else:
        g.add_node(nid, name=nid, namespace=nid if group_by == "namespace" else None,
                   kind="Namespace" if group_by == "namespace" else "Host")


def _weight(attrs: dict[str, Any]) -> tuple[int, int]:
    return (attrs["bytes_c2s"] + attrs["bytes_s2c"], attrs["connections_opened"])


def fold(g: nx.DiGraph, budget: int) -> int:
    """Keep the `budget - 1` heaviest edges, fold the rest into other -> other. Returns how
    many edges were folded (0 when the graph fits)."""
    if budget < 1 or g.number_of_edges() <= budget:
        return 0
    ranked = sorted(g.edges(data=True), key=lambda e: (_weight(e[2]), e[0], e[1]), reverse=True)
    folded = ranked[budget - 1:]
    acc: dict[str, Any] = {k: 0 for k in SUMMED}
    ports: set[int] = set()
    protos: set[str] = set()
    observed: dict[str, int] = {}
    complete = True
    for u, v, a in folded:
        for k in SUMMED:
            acc[k] += a[k]
        ports.update(a["ports"])
        protos.update(a["protocols"])
        for k, n in a["observed_by"].items():
            observed[k] = observed.get(k, 0) + n
        complete = complete and a["complete"]
        g.remove_edge(u, v)
    g.remove_nodes_from([n for n in list(g.nodes) if g.degree(n) == 0])
    g.add_node(OTHER, name=OTHER, namespace=None, kind="Other")
    g.add_edge(OTHER, OTHER, **acc, rtt_us=None, ports=sorted(ports)[:100], protocols=sorted(protos),
               first_seen=min((a["first_seen"] for _, _, a in folded if a["first_seen"]), default=None),
               last_seen=max((a["last_seen"] for _, _, a in folded if a["last_seen"]), default=None),
               complete=complete, observed_by=observed, folded=len(folded))
    g.graph["folded_edges"] = len(folded)
    return len(folded)


# -- renderers ---------------------------------------------------------------------------------
def _iso(v: Any) -> Any:
    return v.isoformat().replace("+00:00", "Z") if isinstance(v, datetime) else v


def to_json(g: nx.DiGraph) -> dict[str, Any]:
    return {
        "since": _iso(g.graph["since"]), "until": _iso(g.graph["until"]),
        "group_by": g.graph["group_by"], "volume_source": g.graph["volume_source"],
        "filter": g.graph["filter"], "folded_edges": g.graph.get("folded_edges", 0),
        "nodes": [{"id": n, **a, "in_degree": g.in_degree(n), "out_degree": g.out_degree(n)}
                  for n, a in sorted(g.nodes(data=True))],
        "edges": [{"source": u, "target": v, **{k: _iso(x) for k, x in a.items()}}
                  for u, v, a in sorted(g.edges(data=True), key=lambda e: (e[0], e[1]))],
    }


def _label(a: dict[str, Any]) -> str:
    return f"{a['connections_opened']} conns, {a['bytes_c2s'] + a['bytes_s2c']} B"


def to_dot(g: nx.DiGraph) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["digraph eastwest {", "  rankdir=LR;", "  node [shape=box];"]
    for n in sorted(g.nodes):
        lines.append(f"  {q(n)};")
    for u, v, a in sorted(g.edges(data=True), key=lambda e: (e[0], e[1])):
        style = "" if a["complete"] else ", style=dashed"
        lines.append(f"  {q(u)} -> {q(v)} [label={q(_label(a))}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(g: nx.DiGraph) -> str:
    ids = {n: f"n{i}" for i, n in enumerate(sorted(g.nodes))}

    def esc(s: str) -> str:  # Mermaid labels: quote, and HTML-escape what could break out
        return html.escape(s, quote=True).replace("|", "&#124;")

    lines = ["graph LR"]
    for n, i in ids.items():
        lines.append(f'  {i}["{esc(n)}"]')
    for u, v, a in sorted(g.edges(data=True), key=lambda e: (e[0], e[1])):
        lines.append(f'  {ids[u]} -->|"{esc(_label(a))}"| {ids[v]}')
    return "\n".join(lines) + "\n"


def to_graphml(g: nx.DiGraph) -> str:
    flat = nx.DiGraph()
    for n, a in g.nodes(data=True):
        flat.add_node(n, **{k: ("" if v is None else str(v)) for k, v in a.items()})
    for u, v, a in g.edges(data=True):
        flat.add_edge(u, v, **{k: (x if isinstance(x, int) and not isinstance(x, bool) else
                                   "" if x is None else str(_iso(x))) for k, x in a.items()})
    return "\n".join(nx.generate_graphml(flat)) + "\n"
