"""`eastwest graph`: the service dependency graph of a time window.

In:  a window (`--since`/`--until`), the filter flags of `eastwest flows`, `--group-by`, and
     the aggregator's `GET /api/v1/graph` (JSON, or `format=dot|mermaid` rendered by the API).
Out: the edges as a table (client -> server, connections, failures, bytes, RTT, observers) or csv,
     the API's JSON unchanged, or its DOT / Mermaid text (every line escaped for the terminal).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eastwest.cli._common import add_connection_flags, add_output_flags, results
from eastwest.cli._dnsflags import add_dns_flags, dns_filter_of
from eastwest.cli._filterflags import FILTER_HELP, add_filter_flags, filter_spec

FORMATS = ("table", "json", "csv", "dot", "mermaid")
TEXT_STARTS = {"dot": ("digraph", "graph", "strict"), "mermaid": ("graph", "flowchart")}
GROUP_BY = ("workload", "namespace", "host", "service")
GRAPH_PATH = "/api/v1/graph"

EPILOG = f"""\
{FILTER_HELP}

examples:
  eastwest graph                                   the last 15 minutes, workload to workload
  eastwest graph --since 1d --group-by namespace   a day, namespace to namespace
  eastwest graph --workload db                     db and its neighbours
  eastwest graph --not --outcome ok                only failed connections
  eastwest graph -o dot | dot -Tsvg > graph.svg    Graphviz
  eastwest graph -o mermaid                        paste into Markdown
  eastwest graph --group-by service                calls to a Service as one edge to it
  eastwest graph --to-service shop/api             who calls the Service shop/api
  eastwest graph --dns-rcode nxdomain              who asks for names that do not exist
  eastwest graph --dns-name '*.example.com'        who resolves names of example.com
  eastwest graph --show-proxies                    service-mesh calls through their sidecars

Edges go client -> server and count connections, never records: a connection seen by its
client, its server and the wire is one connection. SEEN BY: each set of observers with the
connections it saw, most first (client+path+server 323, client+path 16: 16 connections had no
server-side view). FAILED: connections never established (refused or timed out); RESETS:
connections reset after they were established. DNS (edges to a resolver): queries, NXDOMAIN
(nx), SERVFAIL (sf), timeouts (to: queries without an answer) and the average latency. A server
named by a DNS answer its client got (api.example.com instead of external:203.0.113.7) is
marked * when an answer named it only after its TTL (a hint; docs/aggregator.md).

--group-by service: a connection whose client dialled a Service (a ClusterIP, DNATed by
kube-proxy to a backend) is counted once, on the edge client -> svc:NAMESPACE/NAME
(svc:IP:PORT when no identity layer names the address), and BACKENDS lists the workloads that
served it with their connections; a connection that dialled no Service stays on its
workload -> workload edge. --group-by workload (the default) puts every connection on the
edge to its backend. Both views count the same connections, none twice.

Service mesh: a call through sidecars (Istio, Linkerd, Consul; folded by the collector) is one
app -> app connection with the app's bytes; MESH shows the sidecar and how many of the edge's
connections were meshed. --show-proxies draws the sidecars: the edge becomes app ->
CLIENT~PROXY -> SERVER~PROXY -> app, each hop with its own bytes (proxy-proxy: with the
proxies' framing, what the wire carried)."""


def register(sub: Any) -> None:
    p = sub.add_parser("graph", help="the service dependency graph of a window",
                       description="The graph of who called whom in a time window, from the "
                       "aggregator: one edge per client -> server pair.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_scope(p)
    p.add_argument("--show-proxies", action="store_true",
                   help="split the edges of folded service-mesh calls into their hops: app -> "
                   "CLIENT~PROXY -> SERVER~PROXY -> app (default: the sidecars are no nodes, an "
                   "edge's MESH column counts its meshed calls)")
    add_output_flags(p, FORMATS)
    add_connection_flags(p)
    p.set_defaults(func=run)


def add_graph_scope(p: argparse.ArgumentParser, *, group_by: bool = True) -> None:
    """The window (`--since`/`--until`), the filter flags of `eastwest flows` (the graph is
    built from the connections that match), and `--group-by`."""
    add_filter_flags(p, window=False)
    g = p.add_argument_group("window")
    g.add_argument("--since", metavar="WHEN", help="from this time: a duration ago (30m, 2h, "
                   "7d), RFC 3339 (default: the aggregator's, 15 minutes before --until)")
    g.add_argument("--until", metavar="WHEN", help="up to this time (default now)")
    if group_by:
        g.add_argument("--group-by", choices=GROUP_BY, default="workload",
                       help="what a node is (default workload); service: a call to a "
                       "Service ends at the Service, its backends listed")
        add_dns_flags(p, "edges")


def graph_params(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Filter, window (`from`/`to`) and grouping as the graph routes' query parameters."""
    params = filter_spec(args).query_params(window=("from", "to"))
    if getattr(args, "group_by", None):
        params.append(("group_by", args.group_by))
    if getattr(args, "show_proxies", False):
        params.append(("show_proxies", "true"))
    return params + dns_filter_of(args).query_params()


def run(args: argparse.Namespace) -> int:
    from eastwest.cli._common import client_from_args
    from eastwest.cli._edges import edges_of, service_columns
    from eastwest.errors import TransportError
    from eastwest.output import escape, to_json_text, write_csv, write_table

    params = graph_params(args)
    with results(args) as (out, color), client_from_args(args) as client:
        if args.output in TEXT_STARTS:
            text = client.get_text(GRAPH_PATH, [*params, ("format", args.output)])
            if not text.lstrip().startswith(TEXT_STARTS[args.output]):  # a proxy's login page
                kind = "DOT" if args.output == "dot" else "Mermaid"
                raise TransportError(f"the aggregator at {client.settings.server} answered "
                                     f"{GRAPH_PATH} with something that is not {kind}")
            out.write("".join(escape(line) + "\n" for line in text.splitlines()))
            return 0
        doc = client.get_json(GRAPH_PATH, params)
        edges = sorted(edges_of(doc), key=lambda e: (e.client, e.server))  # -o json too: checked
        headers, csv_headers, cells = service_columns(args.group_by, edges)
        if args.output == "json":
            out.write(to_json_text(doc, indent=2) + "\n")
        elif args.output == "csv":
            write_csv(out, csv_headers, (cells(e, True) for e in edges))
        elif write_table(out, headers, (cells(e, False) for e in edges), color=color) == 0:
            print("eastwest graph: no edges in this window", file=sys.stderr)
    return 0
