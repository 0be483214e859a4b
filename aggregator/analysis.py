"""Graph analysis: upstream, downstream, impact, cycles, hubs, and the diff of two windows.

Stage: query side. In: service graphs (`nx.DiGraph`, edges client -> server) from
aggregator/graph.py. Out: plain lists and dicts for the API (docs/api.md).

Definitions (edges point from the caller to the callee):
- downstream(w): everything w depends on, transitively (its callees, their callees, ...);
- upstream(w): everything that depends on w, transitively (its callers, theirs, ...);
- impact(w): what breaks if w breaks = upstream(w), each with its distance (1 = calls w directly);
- cycles: elementary cycles (Johnson's algorithm via networkx), at most `limit`;
- hubs: nodes whose degree (distinct peers) is at least `min_degree`, by degree then bytes.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

OTHER = "other"


def downstream(g: nx.DiGraph, node: str) -> list[str]:
    return sorted(nx.descendants(g, node) - {node}) if node in g else []


def upstream(g: nx.DiGraph, node: str) -> list[str]:
    return sorted(nx.ancestors(g, node) - {node}) if node in g else []


def impact(g: nx.DiGraph, node: str) -> list[dict[str, Any]]:
    if node not in g:
        return []
    dist = nx.single_source_shortest_path_length(g.reverse(copy=False), node)
    return [{"workload": n, "distance": d} for n, d in sorted(dist.items(), key=lambda x: (x[1], x[0]))
            if n != node]


def cycles(g: nx.DiGraph, limit: int = 100) -> list[list[str]]:
    out = []
    for c in nx.simple_cycles(g):
        if len(c) == 1 and c[0] == OTHER:
            continue
        i = c.index(min(c))  # rotate to start at the smallest name: stable output, same cycle
        out.append(c[i:] + c[:i])
        if len(out) >= limit:
            break
    return sorted(out, key=lambda c: (len(c), c))


def hubs(g: nx.DiGraph, min_degree: int = 3, limit: int = 20) -> list[dict[str, Any]]:
    rows = []
    for n in g.nodes:
        if n == OTHER:
            continue
        peers = (set(g.predecessors(n)) | set(g.successors(n))) - {n}
        if len(peers) < min_degree:
            continue
        nbytes = sum(a["bytes_c2s"] + a["bytes_s2c"] for *_, a in g.in_edges(n, data=True))
        nbytes += sum(a["bytes_c2s"] + a["bytes_s2c"] for *_, a in g.out_edges(n, data=True))
        rows.append({"workload": n, "degree": len(peers), "callers": g.in_degree(n),
                     "callees": g.out_degree(n), "bytes": nbytes})
    rows.sort(key=lambda r: (-r["degree"], -r["bytes"], r["workload"]))
    return rows[:limit]


CHANGE_KEYS = ("connections_opened", "connections_failed", "resets", "bytes_c2s", "bytes_s2c")


def diff(a: nx.DiGraph, b: nx.DiGraph, threshold: float = 0.5) -> dict[str, Any]:
    """Edges added (in b only), removed (in a only), and changed: an edge in both whose failures
    appeared or vanished, or whose connections or bytes moved by more than `threshold`
    (0.5 = 50 %) of the larger value."""
    ea, eb = set(a.edges), set(b.edges)
    added = [{"source": u, "target": v, **_pick(b.edges[u, v])} for u, v in sorted(eb - ea)]
    removed = [{"source": u, "target": v, **_pick(a.edges[u, v])} for u, v in sorted(ea - eb)]
    changed = []
    for u, v in sorted(ea & eb):
        x, y = a.edges[u, v], b.edges[u, v]
        why = []
        for k in CHANGE_KEYS:
            hi = max(x[k], y[k])
            if k in ("connections_failed", "resets"):
                if (x[k] == 0) != (y[k] == 0):
                    why.append(k)
            elif hi and abs(x[k] - y[k]) > threshold * hi:
                why.append(k)
        if why:
            changed.append({"source": u, "target": v, "changed": why, "a": _pick(x), "b": _pick(y)})
    return {"added": added, "removed": removed, "changed": changed,
            "nodes_added": sorted(set(b.nodes) - set(a.nodes)),
            "nodes_removed": sorted(set(a.nodes) - set(b.nodes))}


def _pick(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: attrs[k] for k in CHANGE_KEYS}
