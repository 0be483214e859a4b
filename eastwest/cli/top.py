"""`eastwest top`: top talkers of a window, by bytes, connections, failures, resets,
retransmits or DNS errors.

In:  a window, the filter flags and `--group-by` (as `eastwest graph`), `--by`, `--limit`;
     the aggregator's `GET /api/v1/graph` edges (built from the matching connections).
Out: the top edges (client -> server) sorted by the metric, largest first (ties by name), as a
     table, json (the API's edge objects) or csv. The ranking is done here, on the graph's
     edges: the graph already counts connections once whichever observers saw them. Each
     metric is one column of the table (`--by failures` is FAILED: never established).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eastwest.cli._common import add_connection_flags, add_output_flags, results
from eastwest.cli.graph import GRAPH_PATH, add_graph_scope, graph_params

FORMATS = ("table", "json", "csv")

EPILOG = """\
examples:
  eastwest top                                   top 10 edges by bytes, last 15 minutes
  eastwest top --to-workload db                  who talks to db, by bytes
  eastwest top --by failures --since 1d          which calls fail most to connect
  eastwest top --by resets --since 1d            which connections break most once open
  eastwest top --to-workload db --by failures --not --outcome ok --since 1h
  eastwest top --by retransmits --group-by host  lossy host pairs
  eastwest top --group-by service --by failures  which Services fail most (BACKENDS: who served)
  eastwest top --by dns-errors                   which clients' DNS fails most
  eastwest top --by drops --since 1h             where the kernel drops packets, and why

FAILED counts connections never established (refused, timed out or dropped), RESETS those reset
after they were established (--not --outcome ok selects both); --by ranks by the column it names.
SEEN BY: each set of observers (client, server, path = the wire, drops = a drop source) with
the connections it saw. DNS (shown when an edge goes to a resolver that carried DNS) and
--by dns-errors: responses other than NOERROR (NXDOMAIN, SERVFAIL, REFUSED, ...) plus queries
that got no answer (timeouts), per client. DROPS (shown when any edge has some): packets the
kernel dropped, by reason (collector --drops; docs/policy.md, "Drops")."""


def register(sub: Any) -> None:
    from eastwest.cli._edges import METRICS

    p = sub.add_parser("top", help="top talkers by bytes, connections, failures, resets, "
                       "retransmits, DNS errors or drops",
                       description="The busiest (or worst) client -> server edges of a window.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("ranking")
    g.add_argument("--by", choices=tuple(METRICS), default="bytes",
                   help="rank by bytes (both ways), connections, failures (the FAILED column: "
                   "connections refused, timed out or dropped), resets (connections reset once "
                   "established), retransmits, dns-errors (DNS responses other than NOERROR "
                   "plus unanswered queries, on edges to a resolver) or drops (packets the "
                   "kernel dropped: the DROPS column) (default bytes)")
    g.add_argument("-n", "--limit", type=int, default=10, metavar="N",
                   help="show the top N (default 10; 0 = all)")
    add_graph_scope(p)
    add_output_flags(p, FORMATS)
    add_connection_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eastwest.cli._common import client_from_args
    from eastwest.cli._edges import METRICS, edges_of, service_columns
    from eastwest.errors import ConfigError
    from eastwest.output import to_json_text, write_csv, write_table

    if args.limit < 0:
        raise ConfigError("--limit", args.limit, "must be >= 0 (0 = all)")
    params = graph_params(args)
    with results(args) as (out, color):
        with client_from_args(args) as client:
            edges = edges_of(client.get_json(GRAPH_PATH, params))
        attr = METRICS[args.by][0]
        edges.sort(key=lambda e: (-getattr(e, attr), e.client, e.server))
        edges = [e for e in edges if getattr(e, attr) > 0]
        if args.limit:
            edges = edges[: args.limit]
        headers, csv_headers, cells = service_columns(args.group_by, edges)
        if args.output == "json":
            out.write(to_json_text([e.obj for e in edges], indent=2) + "\n")
        elif args.output == "csv":
            write_csv(out, csv_headers, (cells(e, True) for e in edges))
        elif write_table(out, ("#", *headers), ((i, *cells(e, False)) for i, e in
                                                 enumerate(edges, 1)), color=color) == 0:
            print(f"eastwest top: no edge with any {args.by} in this window", file=sys.stderr)
    return 0
