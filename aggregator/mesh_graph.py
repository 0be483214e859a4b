"""Service-mesh calls on the graph of a window: each edge's `mesh`, and the proxies on demand.

Stage: query side, between the store's edges (aggregator/graph_edges.py `GraphData`) and the
API (aggregator/graph.py `graph_data`), after the cardinality budget. In: the window's
`GraphData`, the store, the query; the window's meshed connections (`mesh` not null, matching
the filter: `ConnectionQuery(meshed=True)`). Out: the same `GraphData`, changed in place:
- every edge gets `mesh`: null, or `{proxy, connections, wire_bytes_c2s, wire_bytes_s2c}` when
  some of its connections (overlapping the window) were folded mesh calls: how many, the
  sidecar most of them named (ties: by name), and the bytes the wire carried for them (their
  path views' totals: the app's bytes plus the proxies' framing; null when no wire saw any);
- `show_proxies`: every meshed edge app -> app is split into its hops, app ->
  `<client node>~<proxy>` -> `<server node>~<proxy>` -> app, the two proxy nodes of kind
  `proxy`; each hop edge is counted from the meshed connections (as the store counts an edge),
  its bytes the hops' (`app-proxy` the client side's, `proxy-proxy` the client side's else the
  server side's, `proxy-app` the server side's; a hop no observer reported: the connection's
  bytes, the wire's for `proxy-proxy`; its ports the hop's server ports), and carries `mesh`
  with `hop` added. What stays of
  the app -> app edge (its connections that were not meshed) keeps its counts, its volumes
  less the meshed connections' totals (at least 0), as the DNS split does (aggregator/
  dns_graph.py). By default the proxies are no nodes: they are not workloads.
Grouped by Service (`group_by=service`) a call to a Service ends at the Service: its edges
carry `mesh` only for the connections that dialled no Service.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec

from aggregator import mesh
from aggregator.graph_edges import (
    GraphData,
    JsonEdge,
    columns_of_rows,
    counts_of_rows,
    ends_of,
    merge_same_pairs,
    minus_parts,
)
from aggregator.store.base import ReadStore
from aggregator.store.query import ConnectionQuery, EdgeQuery

CONN_LIMIT = 200_000  # meshed connections read per graph (as aggregator/dns_graph.py)
PROXY_KIND = "proxy"
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()
_NULL = ',"mesh":null}'


def _sum(values: list[int | None]) -> int | None:
    got = [v for v in values if v is not None]
    return sum(got) if got else None


def _annotation(rows: list[tuple[dict[str, Any], tuple[Any, ...]]]) -> dict[str, Any]:
    proxies = Counter(mesh.proxy_of(sides) for _, sides in rows)
    proxy = min(proxies, key=lambda p: (-proxies[p], p))
    return {"proxy": proxy, "connections": len(rows),
            "wire_bytes_c2s": _sum([r["path_bytes_c2s"] for r, _ in rows]),
            "wire_bytes_s2c": _sum([r["path_bytes_s2c"] for r, _ in rows])}


def apply_mesh(data: GraphData, store: ReadStore, q: EdgeQuery, show_proxies: bool = False) -> None:
    rows = store.connections(ConnectionQuery(filter=q.filter, since=q.since, until=q.until,
                                             limit=CONN_LIMIT, meshed=True))
    by_edge: dict[tuple[str, str], list[tuple[dict[str, Any], tuple[Any, ...]]]] = {}
    for r in rows:
        ends = ends_of(r, data.group_by)
        sides = mesh.sides_of(r["mesh"])
        if ends is not None and sides:
            by_edge.setdefault(ends, []).append((r, sides))
    out: list[JsonEdge] = []
    notes: dict[tuple[str, str], list[dict[str, Any]]] = {}
    split = False
    for e in data.edges:
        conns = by_edge.get((e[0], e[1]))
        if not conns:
            out.append((e[0], e[1], e[2][:-1] + _NULL, e[3], e[4], e[5]))
            continue
        note = _annotation(conns)
        obj = _dec.decode(e[2])
        obj["mesh"] = note
        edge = (e[0], e[1], _enc.encode(obj).decode(), e[3], e[4], e[5])
        if not show_proxies:
            out.append(edge)
            continue
        split = True
        hops = _hop_edges(data, e[0], e[1], conns, note, q)
        for h in hops:
            notes.setdefault((h[0], h[1]), []).append(_dec.decode(h[2])["mesh"])
        out += hops
        rest = _rest(edge, _counted(e[0], e[1], conns, q, None))
        if rest is not None:
            out.append(rest)
    if not split:
        data.edges = out
        return
    merged = []
    for e in merge_same_pairs(out):  # hop edges shared by several app edges (a client's own sidecar)
        got = notes.get((e[0], e[1]), [])
        if len(got) > 1:
            obj = _dec.decode(e[2])
            obj["mesh"] = {**_combined(got), "hop": got[0]["hop"]}
            e = (e[0], e[1], _enc.encode(obj).decode(), e[3], e[4], e[5])
        merged.append(e)
    data.edges = sorted(merged)
    used = {n for e in data.edges for n in (e[0], e[1])}
    data.nodes = {n: a for n, a in data.nodes.items() if n in used}


def _rest(edge: JsonEdge, meshed: JsonEdge) -> JsonEdge | None:
    """What stays of an app -> app edge once its meshed connections moved to their hops: its
    other connections (None: none)."""
    rest = minus_parts(edge, [meshed])
    if rest is None:
        return None
    obj = _dec.decode(rest[2])
    if not (obj["connections_opened"] or obj["connections_active"]
            or obj["connections_closed"]):
        return None
    obj["mesh"] = None
    return (rest[0], rest[1], _enc.encode(obj).decode(), rest[3], rest[4], rest[5])


def _combined(notes: list[dict[str, Any]]) -> dict[str, Any]:
    proxies = Counter[str]()
    for n in notes:
        proxies[n["proxy"]] += n["connections"]
    return {"proxy": min(proxies, key=lambda p: (-proxies[p], p)),
            "connections": sum(n["connections"] for n in notes),
            "wire_bytes_c2s": _sum([n["wire_bytes_c2s"] for n in notes]),
            "wire_bytes_s2c": _sum([n["wire_bytes_s2c"] for n in notes])}


def _hop_of(sides: tuple[Any, ...], hop: str) -> Any:
    """The connection's hop as its client's (its server's for proxy-app) collector told it,
    else the other's; None when neither did."""
    order = ("client", "server") if hop != "proxy-app" else ("server", "client")
    for obs in order:
        for s in sides:
            if s.observer == obs:
                for h in s.hops:
                    if h.hop == hop:
                        return h
    return None


def _hop_bytes(sides: tuple[Any, ...], hop: str, row: dict[str, Any]) -> tuple[int, int]:
    """A connection's bytes on one hop (the module docstring's rule)."""
    h = _hop_of(sides, hop)
    if h is not None:
        return h.bytes_c2s, h.bytes_s2c
    if hop == "proxy-proxy" and row["path_bytes_c2s"] is not None:
        return row["path_bytes_c2s"], row["path_bytes_s2c"]
    return int(row["bytes_c2s"] or 0), int(row["bytes_s2c"] or 0)


def _hop_edges(data: GraphData, src: str, dst: str,
               conns: list[tuple[dict[str, Any], tuple[Any, ...]]], note: dict[str, Any],
               q: EdgeQuery) -> list[JsonEdge]:
    proxy = note["proxy"]
    a, b = f"{src}~{proxy}", f"{dst}~{proxy}"
    for node, app in ((a, src), (b, dst)):
        name, namespace, _ = data.nodes.get(app, (app, None, None))
        data.nodes.setdefault(node, (f"{name}~{proxy}", namespace, PROXY_KIND))
    out = []
    for s, d, hop in ((src, a, "app-proxy"), (a, b, "proxy-proxy"), (b, dst, "proxy-app")):
        e = _counted(s, d, conns, q, hop)
        obj = _dec.decode(e[2])
        obj["mesh"] = {**note, "hop": hop}
        out.append((s, d, _enc.encode(obj).decode(), e[3], e[4], e[5]))
    return out


def _counted(src: str, dst: str, conns: list[tuple[dict[str, Any], tuple[Any, ...]]],
             q: EdgeQuery, hop: str | None) -> JsonEdge:
    """An edge counted from these connections by the rules of the store's edge query
    (aggregator/store/duckdb_edges.py WINDOW_COUNTS), its volumes their totals: on `hop`, the
    hop's bytes; None: the connections' own."""
    rows = [r for r, _ in conns]
    if hop is None:
        count = counts_of_rows(src, dst, rows, q.since, q.until)
    else:  # a hop's bytes and server ports (the sidecar's outbound port for app-proxy: 15001)
        count = counts_of_rows(
            src, dst, rows, q.since, q.until,
            volumes=[_hop_bytes(sides, hop, r) for r, sides in conns],
            ports=[r["server_port"] if (h := _hop_of(sides, hop)) is None else h.server.port
                   for r, sides in conns])
    cols = columns_of_rows([count], None)
    return (src, dst, cols["json"][0], (cols["w_bytes"][0], cols["w_opened"][0]),
            cols["first_us"][0], cols["last_us"][0])
