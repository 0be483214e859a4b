"""DNS on the graph of a window: ends named by the DNS answers their clients got, and the DNS
of each edge to a resolver.

Stage: query side, between the store's edges (aggregator/graph_edges.py `GraphData`) and the
API (aggregator/graph.py `graph_data`). In: the window's `GraphData`, the store, the query.
Out: the same `GraphData`, changed in place:
- **naming** (identity layer `dns`, docs/aggregator.md): the connections of an edge whose server
  is named by a layer below `dns` (`cidr`, `external`: `external:203.0.113.7`) and whose client
  got that address in a DNS answer (aggregator/dns_names.py, the rule) move to an edge whose
  target is the name (`api.example.com`, node kind `DNS`), which says how many of its
  connections the answers named within their TTL and how many as a hint after it
  (`dns_named: {ttl, hint}`). When every connection of the edge in the window gets the same
  name, the edge is renamed as it is (its rollup volumes move whole); otherwise each part is
  counted from its connections (volumes: the connections' totals, as a graph whose filter the
  rollups cannot answer). Grouped by host, nodes are hosts: nothing is renamed.
- **resolver edges**: an edge whose connections carried DNS (flows to port 53 with a `dns`
  summary) gets `dns` (aggregator/dns_names.py `edge_dns`): queries, responses, timeouts (the
  client's unanswered queries), NXDOMAIN, SERVFAIL, all response codes, latency, top names.
- **edge filters** `dns_name` (a glob on the names asked) and `dns_rcode` (a response code, or
  `timeout`), eastwest/dns_filter.py: only the edges to a resolver that match are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import msgspec

from aggregator.dns_names import DNS_PORT, LOOKBACK, DnsFacts, Named, edge_dns
from aggregator.graph_edges import (
    GraphData,
    JsonEdge,
    columns_of_rows,
    counts_of_rows,
    merge_same_pairs,
    minus_parts,
)
from aggregator.store.base import ReadStore
from aggregator.store.query import ConnectionQuery, EdgeQuery, RecordQuery
from eastwest.dns_filter import DnsEdgeFilter
from eastwest.filters import Clause, Filter

BELOW_DNS = ("cidr", "external")  # identity layers the DNS layer names better
CONN_LIMIT = 200_000  # connections read per query (to answered addresses, to resolvers)
SLACK = timedelta(seconds=5)  # a DNS flow's record vs its connection (aggregator/correlate.py)
_ADDR_CHUNK = 500  # answered addresses per connection query
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def apply_dns(data: GraphData, store: ReadStore, q: EdgeQuery,
              dns_filter: DnsEdgeFilter | None = None) -> None:
    records = store.records(RecordQuery(since=q.since - LOOKBACK, server_port=DNS_PORT))
    facts = DnsFacts.of_records(records, q.until)
    renamed: dict[str, str] = {}  # conn id -> the edge target it moved to
    if facts.answers and data.group_by != "host":
        renamed = _rename(data, store, q, facts)
    if facts.flows:
        _resolver_edges(data, store, q, facts, renamed)
    if dns_filter is not None and not dns_filter.empty:
        keep = [e for e in data.edges if dns_filter.matches(_dec.decode(e[2]).get("dns"))]
        data.edges = keep
        used = {n for e in keep for n in (e[0], e[1])}
        data.nodes = {n: a for n, a in data.nodes.items() if n in used}


def _connections(store: ReadStore, q: EdgeQuery, extra: Clause) -> list[dict[str, Any]]:
    flt = Filter([*q.filter.clauses, extra], q.filter.link_local)
    return store.connections(ConnectionQuery(filter=flt, since=q.since, until=q.until,
                                             limit=CONN_LIMIT))


def _ends(row: dict[str, Any], group_by: str) -> tuple[str, str]:
    if group_by == "namespace":
        return (row["client_namespace"] or row["client_wid"],
                row["server_namespace"] or row["server_wid"])
    return row["client_wid"], row["server_wid"]


def _rename(data: GraphData, store: ReadStore, q: EdgeQuery, facts: DnsFacts) -> dict[str, str]:
    """Move the connections the answers name (the module docstring); returns conn id -> the
    new target."""
    import ipaddress

    addrs = sorted(facts.addresses)
    rows: list[dict[str, Any]] = []
    for i in range(0, len(addrs), _ADDR_CHUNK):
        nets = tuple(ipaddress.ip_network(a) for a in addrs[i:i + _ADDR_CHUNK])
        rows += _connections(store, q, Clause("to_ip", nets))
    by_edge: dict[tuple[str, str], list[tuple[dict[str, Any], Named | None]]] = {}
    for r in rows:
        if r["server_id_source"] not in BELOW_DNS:
            continue
        named = facts.name_for(r["client_ip"], r["server_ip"], r["start_ts"])
        by_edge.setdefault(_ends(r, data.group_by), []).append((r, named))
    index = {(e[0], e[1]): i for i, e in enumerate(data.edges)}
    out: dict[str, str] = {}
    drop: set[int] = set()
    add: list[JsonEdge] = []
    for (src, dst), conns in sorted(by_edge.items()):
        names = {n.name if n else None for _, n in conns}
        if names == {None} or (src, dst) not in index:
            continue
        i = index[(src, dst)]
        # renamed whole when all of the edge's connections of the window (its counts are
        # theirs) got one name; else the named parts move and the rest stays
        if len(names) == 1 and _all_of_edge(data.edges[i], conns, q):
            name = next(iter(names))
            assert name is not None
            edge = _dec.decode(data.edges[i][2])
            edge["target"] = name
            edge["dns_named"] = _named_counts(c for _, c in conns)
            old = data.edges[i]
            add.append((src, name, _enc.encode(edge).decode(), old[3], old[4], old[5]))
            drop.add(i)
        else:  # split: each name's part counted from its connections, the rest stays
            parts: dict[str, list[tuple[dict[str, Any], Named | None]]] = {}
            for r, n in conns:
                if n is not None:
                    parts.setdefault(n.name, []).append((r, n))
            moved = [_edge_of_rows(src, target, part, q) for target, part in sorted(parts.items())]
            rest = minus_parts(data.edges[i], moved)
            add += moved + ([rest] if rest is not None else [])
            drop.add(i)
        for r, n in conns:
            if n is not None:
                out[r["conn_id"]] = n.name
                data.nodes.setdefault(n.name, (n.name, None, "DNS"))
    if drop:
        kept = [e for j, e in enumerate(data.edges) if j not in drop]
        data.edges = merge_same_pairs([*kept, *add])
        used = {n for e in data.edges for n in (e[0], e[1])}
        data.nodes = {n: a for n, a in data.nodes.items() if n in used}
    return out


def _all_of_edge(edge: JsonEdge, conns: Sequence[tuple[dict[str, Any], Named | None]],
                 q: EdgeQuery) -> bool:
    """Whether `conns` are all the connections the edge counts (its counts match theirs)."""
    e = _dec.decode(edge[2])
    return int(e["connections_opened"]) == sum(1 for r, _ in conns if r["start_ts"] >= q.since) \
        and int(e["connections_active"]) == sum(
            1 for r, _ in conns if not r["closed"] or r["closed_ts"] >= q.until)


def _named_counts(named: Any) -> dict[str, int]:
    ns = [n for n in named if n is not None]
    return {"ttl": sum(1 for n in ns if n.source == "dns"),
            "hint": sum(1 for n in ns if n.source == "dns-hint")}


def _edge_of_rows(src: str, dst: str, conns: Sequence[tuple[dict[str, Any], Named | None]],
                  q: EdgeQuery) -> JsonEdge:
    """An edge counted from its connections, by the rules of the store's edge query
    (aggregator/store/duckdb_edges.py WINDOW_COUNTS), its volumes their totals."""
    count = counts_of_rows(src, dst, [r for r, _ in conns], q.since, q.until, dst_name=dst,
                           dst_kind="DNS")
    cols = columns_of_rows([count], None)
    edge = _dec.decode(cols["json"][0])
    edge["dns_named"] = _named_counts(n for _, n in conns)
    return (src, dst, _enc.encode(edge).decode(), (cols["w_bytes"][0], cols["w_opened"][0]),
            cols["first_us"][0], cols["last_us"][0])


def _resolver_edges(data: GraphData, store: ReadStore, q: EdgeQuery, facts: DnsFacts,
                    renamed: dict[str, str]) -> None:
    """`dns` on each edge whose connections carried DNS."""
    rows = _connections(store, q, Clause("to_port", (DNS_PORT,)))
    by_key: dict[tuple[str, str, int, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["protocol"], r["client_ip"], r["client_port"], r["server_ip"],
                           r["server_port"]), []).append(r)
    per_edge: dict[tuple[str, str], list[Any]] = {}
    for f in facts.flows:
        cands = [r for r in by_key.get(f.key, ())
                 if r["start_ts"] - SLACK <= f.end and f.start <= r["last_seen"] + SLACK]
        if not cands:
            continue
        r = min(cands, key=lambda c: (abs((c["start_ts"] - f.start).total_seconds()),
                                      c["conn_id"]))
        src, dst = _ends(r, data.group_by) if data.group_by != "host" else _hosts(r)
        dst = renamed.get(r["conn_id"], dst)
        per_edge.setdefault((src, dst), []).append(f.summary)
    if not per_edge:
        return
    edges = []
    for e in data.edges:
        sums = per_edge.get((e[0], e[1]))
        if sums is None:
            edges.append(e)
            continue
        obj = _dec.decode(e[2])
        obj["dns"] = edge_dns(sums)
        edges.append((e[0], e[1], _enc.encode(obj).decode(), e[3], e[4], e[5]))
    data.edges = edges


def _hosts(r: dict[str, Any]) -> tuple[str, str]:
    return (r["client_host"] or "unknown", r["server_host"] or "unknown")
