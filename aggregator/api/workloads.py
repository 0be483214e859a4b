"""GET /api/v1/workloads, /api/v1/workloads/{id} and /api/v1/analysis (cycles, hubs).

In: a window (from/to) and grouping. Out: workloads of the window's graph with their peers, and
per workload its upstream, downstream and impact (what breaks if it breaks), docs/api.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from aggregator import analysis
from aggregator.api.graph import TIME_HELP
from aggregator.api.params import LINK_LOCAL_HELP, check_names, positive_int, query_filter, window
from aggregator.api.state import graph_for, reader
from aggregator.auth import require_read
from aggregator.graph import Window

router = APIRouter(dependencies=[Depends(require_read)])


def _iso(v: Any) -> Any:
    return v.isoformat().replace("+00:00", "Z") if isinstance(v, datetime) else v


@router.get("/api/v1/workloads", summary="Workloads seen in a window, with callers and callees")
def workloads(request: Request,
              from_: str | None = Query(None, alias="from", description=TIME_HELP),
              to: str | None = Query(None, description=TIME_HELP),
              link_local: str | None = Query(None, description=LINK_LOCAL_HELP)) -> dict[str, Any]:
    check_names(request, {"from", "to"}, filters=True)
    since, until, live = window(from_, to)
    g = graph_for(request, Window(since, until), "workload", query_filter(request), live)
    known = {r["wid"]: r for r in reader(request).workload_rows()}
    out = []
    for n, a in sorted(g.nodes(data=True)):
        k = known.get(n, {})
        out.append({"id": n, "name": a["name"], "namespace": a["namespace"], "kind": a["kind"],
                    "host": k.get("host"),
                    # a node named by DNS answers is no stored workload (docs/aggregator.md)
                    "resolved_by": k.get("source") or ("dns" if a["kind"] == "DNS" else None),
                    "first_seen": _iso(k.get("first_seen")), "last_seen": _iso(k.get("last_seen")),
                    "callers": sorted(g.predecessors(n)), "callees": sorted(g.successors(n))})
    return {"from": _iso(since), "to": _iso(until), "workloads": out}


@router.get("/api/v1/workloads/{workload:path}",
            summary="One workload: its upstream, downstream and impact in a window")
def workload(request: Request, workload: str,
             from_: str | None = Query(None, alias="from", description=TIME_HELP),
             to: str | None = Query(None, description=TIME_HELP),
             link_local: str | None = Query(None, description=LINK_LOCAL_HELP)) -> dict[str, Any]:
    check_names(request, {"from", "to", "link_local"}, filters=False)
    since, until, live = window(from_, to)
    g = graph_for(request, Window(since, until), "workload", query_filter(request), live)
    node = workload
    if node not in g:  # a bare name is enough when it is unambiguous
        named = [n for n, a in g.nodes(data=True) if a.get("name") == workload]
        if len(named) != 1:
            raise HTTPException(404, f"workload={workload!r}: not seen in this window"
                                + (f" (ambiguous: {', '.join(sorted(named))})" if named else ""))
        node = named[0]
    a = g.nodes[node]

    def edge(u: str, v: str) -> dict[str, Any]:
        e = g.edges[u, v]
        return {"source": u, "target": v, "connections_opened": e["connections_opened"],
                "connections_failed": e["connections_failed"], "bytes_c2s": e["bytes_c2s"],
                "bytes_s2c": e["bytes_s2c"], "ports": e["ports"]}

    return {"id": node, "name": a["name"], "namespace": a["namespace"], "kind": a["kind"],
            "from": _iso(since), "to": _iso(until),
            "callers": [edge(u, node) for u in sorted(g.predecessors(node))],
            "callees": [edge(node, v) for v in sorted(g.successors(node))],
            "upstream": analysis.upstream(g, node), "downstream": analysis.downstream(g, node),
            "impact": analysis.impact(g, node)}


@router.get("/api/v1/analysis", summary="Cycles and hubs of a window's graph")
def graph_analysis(request: Request,
                   from_: str | None = Query(None, alias="from", description=TIME_HELP),
                   to: str | None = Query(None, description=TIME_HELP),
                   group_by: str = Query("workload", description="workload | namespace | host"),
                   min_degree: str | None = Query(None, description="hub: at least this many peers (default 3)"),
                   link_local: str | None = Query(None, description=LINK_LOCAL_HELP)) -> dict[str, Any]:
    from aggregator.api.params import GROUP_BY, choice

    check_names(request, {"from", "to", "group_by", "min_degree"}, filters=True)
    since, until, live = window(from_, to)
    g = graph_for(request, Window(since, until), choice("group_by", group_by, GROUP_BY),
                  query_filter(request), live)
    return {"from": _iso(since), "to": _iso(until), "cycles": analysis.cycles(g),
            "hubs": analysis.hubs(g, positive_int("min_degree", min_degree, 3, 100000))}
