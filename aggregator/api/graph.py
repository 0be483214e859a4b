"""GET /api/v1/graph (the service graph of a window) and GET /api/v1/diff (two windows).

In: from/to (now, a duration ago such as 15m, or RFC 3339), group_by, format, filters
(eastwest.filters: namespace=, workload=, port=, not_*=...). Out: the graph as JSON (docs/api.md)
or DOT, Mermaid, GraphML; the diff as added/removed/changed edges.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from aggregator import analysis
from aggregator.api.params import (
    GROUP_BY,
    LINK_LOCAL_HELP,
    check_names,
    choice,
    dns_filter,
    query_filter,
    window,
)
from aggregator.api.state import graph_data_for, graph_for
from aggregator.auth import require_read
from aggregator.graph import Window, to_dot, to_graphml, to_mermaid

router = APIRouter(dependencies=[Depends(require_read)])
FORMATS = ("json", "dot", "mermaid", "graphml")
MEDIA = {"json": "application/json", "dot": "text/vnd.graphviz", "mermaid": "text/plain",
         "graphml": "application/xml"}
TIME_HELP = "now, a duration ago (15m, 2h, 7d) or RFC 3339"


@router.get("/api/v1/graph", summary="The service graph of a time window (edges client -> server)",
            description="Nodes and edges as docs/api.md describes them; each edge has `mesh`: "
            "null, or {proxy, connections, wire_bytes_c2s, wire_bytes_s2c} when some of its "
            "connections were folded service-mesh calls. `show_proxies=true` splits such an "
            "edge into its hops through `<node>~<proxy>` nodes of kind `proxy` (hop edges' "
            "`mesh` has `hop`)")
def graph(request: Request,
          from_: str | None = Query(None, alias="from", description=f"window start: {TIME_HELP}; default to - 15m"),
          to: str | None = Query(None, description=f"window end: {TIME_HELP}; default now (live)"),
          group_by: str = Query("workload", description="workload | namespace | host | service "
                                "(service: a call to a Service is one edge client -> the "
                                "Service, listing its backends)"),
          to_service: str | None = Query(None, description="the dialled Service: ClusterIP, "
                                         "CIDR or namespace/name (filter)"),
          format: str = Query("json", description="json | dot | mermaid | graphml"),
          namespace: str | None = Query(None, description="either side's namespace (filter)"),
          workload: str | None = Query(None, description="either side's workload (filter)"),
          link_local: str | None = Query(None, description=LINK_LOCAL_HELP),
          dns_name: str | None = Query(None, description="only edges to a resolver whose clients "
                                      "asked a name matching this glob (*.example.com); repeatable"),
          dns_rcode: str | None = Query(None, description="only edges to a resolver that got this "
                                       "response code (nxdomain, servfail, ...) or timeout; "
                                       "repeatable"),
          show_proxies: bool = Query(False, description="split every edge of folded "
                                     "service-mesh calls into its hops: app -> <client>~<proxy> "
                                     "-> <server>~<proxy> -> app (nodes of kind proxy); default "
                                     "false: the sidecars are no workloads")) -> Response:
    check_names(request, {"from", "to", "group_by", "format", "dns_name", "dns_rcode",
                          "show_proxies"}, filters=True)
    since, until, live = window(from_, to)
    data = graph_data_for(request, Window(since, until), choice("group_by", group_by, GROUP_BY),
                          query_filter(request), live, dns_filter(request), show_proxies)
    fmt = choice("format", format, FORMATS)
    if fmt == "json":  # straight from the edges, no networkx (the same document as to_json)
        return Response(data.json_bytes(), media_type=MEDIA["json"])
    text = {"dot": to_dot, "mermaid": to_mermaid, "graphml": to_graphml}[fmt](data.graph())
    return Response(text, media_type=MEDIA[fmt])


@router.get("/api/v1/diff", summary="Edges added, removed and changed between window a and window b")
def diff(request: Request,
         a_from: str = Query(..., description=f"window a start: {TIME_HELP}"),
         a_to: str = Query(..., description=f"window a end: {TIME_HELP}"),
         b_from: str = Query(..., description=f"window b start: {TIME_HELP}"),
         b_to: str = Query(..., description=f"window b end: {TIME_HELP}"),
         group_by: str = Query("workload", description="workload | namespace | host | service"),
         threshold: float = Query(0.5, ge=0, le=1, description="relative change that counts "
                                  "as changed (0.5 = 50 %)"),
         link_local: str | None = Query(None, description=LINK_LOCAL_HELP)) -> dict[str, Any]:
    check_names(request, {"a_from", "a_to", "b_from", "b_to", "group_by", "threshold"}, filters=True)
    grp = choice("group_by", group_by, GROUP_BY)
    flt = query_filter(request)
    a0, a1, _ = window(a_from, a_to, since_name="a_from", until_name="a_to")
    b0, b1, _ = window(b_from, b_to, since_name="b_from", until_name="b_to")
    ga = graph_for(request, Window(a0, a1), grp, flt, False)
    gb = graph_for(request, Window(b0, b1), grp, flt, False)
    out = analysis.diff(ga, gb, threshold)
    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    return {"a": {"from": iso(a0), "to": iso(a1)}, "b": {"from": iso(b0), "to": iso(b1)},
            "group_by": grp, **out}
