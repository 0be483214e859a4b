"""The service graph of a time window: store rows -> nodes and edges -> JSON, networkx, DOT,
Mermaid, GraphML.

Stage: query side (the API's /graph, /workloads, /diff). In: a window [since, until), a grouping
(workload | namespace | host | service: aggregator/service_view.py), a compiled `Filter`. Out: `GraphData` (aggregator/graph_edges.py):
the JSON document of GET /api/v1/graph straight from the store's per-edge columns, and on demand
the `nx.DiGraph` (nodes: workloads, or namespaces, hosts; edges client -> server carrying
`EDGE_FIELDS`, docs/api.md) that analysis and the text renderers use.

Counts (opened, active, closed, failed, reset) come from the `connections` table, exact to the
microsecond; volumes (bytes, packets, retransmits) from the minute `rollups` of every minute the
window touches, [volume_since, volume_until) = [since rounded down, until rounded up to a minute],
which the response states (a window starting or ending inside a minute counts that whole minute). When the filter has a dimension the rollups do not carry (an IP, the
client port, outcome, observer, VNI), volumes come from the matching connections instead and
the graph says so (`volume_source`).

Cardinality budget: past `budget` edges the heaviest (by bytes, then connections) are kept and
the rest are folded into one edge `other -> other` that carries their sums and `folded` = how
many edges it stands for, so no view and no metric explodes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import networkx as nx

from aggregator.dns_graph import apply_dns
from aggregator.graph_edges import (
    EDGE_FIELDS,
    OTHER,
    SUMMED,
    GraphData,
    fold_attrs,
    rank,
)
from aggregator.graph_edges import iso as _iso
from aggregator.mesh_graph import apply_mesh
from aggregator.nodeport_graph import hold_halves
from aggregator.store.base import ReadStore
from aggregator.store.query import NODEPORT_RANGE, EdgeQuery
from eastwest.dns_filter import DnsEdgeFilter
from eastwest.filters import Filter

if TYPE_CHECKING:
    from aggregator.service_view import ServiceNames

__all__ = ["EDGE_FIELDS", "OTHER", "SUMMED", "GraphData", "Window", "build_graph", "fold",
           "graph_data", "to_dot", "to_graphml", "to_json", "to_mermaid"]


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime


def graph_data(store: ReadStore, window: Window, *, group_by: str = "workload",
               flt: Filter | None = None, budget: int | None = None,
               dns: DnsEdgeFilter | None = None,
               names: ServiceNames | None = None, show_proxies: bool = False,
               nodeport_hold: timedelta = timedelta(0), now: datetime | None = None,
               nodeport_ports: tuple[int, int] = NODEPORT_RANGE) -> GraphData:
    """`names`: what names a Service in the `service` grouping (aggregator/service_view.py);
    `show_proxies`: a meshed edge split into its hops through its sidecars
    (aggregator/mesh_graph.py); `nodeport_hold`: an edge made only of NodePort halves that
    started less than this before `now` (default: the time now) is held back, as the middle
    host's record may still join them (aggregator/nodeport_graph.py; `nodeport_ports`: the
    cluster's NodePort range)."""
    q = EdgeQuery(window.since, window.until, group_by, flt or Filter())
    if group_by == "service":
        from aggregator.service_view import service_graph

        data = service_graph(store, window.since, window.until, q.filter, names)
    else:
        data = GraphData.of_columns(store.edges(q), window.since, window.until, group_by,
                                    "rollups" if q.volumes_from_rollups else "connections",
                                    str(q.filter))
    hold_halves(data, store, q, now or datetime.now(UTC), nodeport_hold, nodeport_ports)
    apply_dns(data, store, q, dns)  # names from DNS answers, DNS of resolver edges
    data.fold(budget)
    apply_mesh(data, store, q, show_proxies)  # service-mesh calls (their hops on demand)
    return data


def build_graph(store: ReadStore, window: Window, *, group_by: str = "workload",
                flt: Filter | None = None, budget: int | None = None,
                dns: DnsEdgeFilter | None = None,
                names: ServiceNames | None = None, show_proxies: bool = False) -> nx.DiGraph:
    return graph_data(store, window, group_by=group_by, flt=flt, budget=budget, dns=dns,
                      names=names, show_proxies=show_proxies).graph()


def fold(g: nx.DiGraph, budget: int) -> int:
    """Keep the `budget - 1` heaviest edges, fold the rest into other -> other. Returns how
    many edges were folded (0 when the graph fits)."""
    if budget < 1 or g.number_of_edges() <= budget:
        return 0
    folded = rank(g.edges(data=True), lambda e: (e[2]["bytes_c2s"] + e[2]["bytes_s2c"],
                                                 e[2]["connections_opened"]))[budget - 1:]
    other = fold_attrs([a for _, _, a in folded])
    for u, v, _ in folded:
        g.remove_edge(u, v)
    g.remove_nodes_from([n for n in list(g.nodes) if g.degree(n) == 0])
    g.add_node(OTHER, name=OTHER, namespace=None, kind="Other")
    g.add_edge(OTHER, OTHER, **other, mesh=None)  # as the JSON path's (aggregator/mesh_graph.py)
    g.graph["folded_edges"] = len(folded)
    return len(folded)


# -- renderers ---------------------------------------------------------------------------------
def to_json(g: nx.DiGraph) -> dict[str, Any]:
    return {
        "since": _iso(g.graph["since"]), "until": _iso(g.graph["until"]),
        "group_by": g.graph["group_by"], "volume_source": g.graph["volume_source"],
        "volume_since": _iso(g.graph.get("volume_since")),
        "volume_until": _iso(g.graph.get("volume_until")),
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
