"""`eastwest policy`: Kubernetes NetworkPolicy from observed traffic.

  check FILE...  what-if: which observed connections of a window a policy set would deny
  suggest        the NetworkPolicies that allow exactly the traffic of a window

In:  policy files (YAML, checked against the Kubernetes OpenAPI schema: eastwest/policy/load.py),
     a window and the filter flags, and the aggregator's `GET /api/v1/policy/observed` and
     `GET /api/v1/policy/suggest`.
Out: check: the denied edges (client -> server:port/protocol, connections, which side denies,
     the policies selecting it) as a table or json; exit 1 when something would be denied.
     suggest: the objects as YAML (with a comment on each rule) or JSON (a `List`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eastwest.cli._common import add_connection_flags, add_output_flags, results

OBSERVED_PATH = "/api/v1/policy/observed"
SUGGEST_PATH = "/api/v1/policy/suggest"

EPILOG = """\
examples:
  eastwest policy suggest --namespace shop --since 24h > shop-policies.yaml
  eastwest policy check shop-policies.yaml --since 1h     what would this set deny?
  eastwest policy check deny-all.yaml allow-api.yaml      several files are one set
  eastwest policy suggest --workload api -o json          one workload's policy, as a List

Semantics: Kubernetes NetworkPolicy (networking.k8s.io/v1), docs/policy.md."""

CHECK_EPILOG = """\
examples:
  eastwest policy check policies.yaml                  the last hour's connections
  eastwest policy check a.yaml b.yaml --since 1d       a day, two files as one set
  eastwest policy check policies.yaml --namespace shop only edges with an end in shop
  eastwest policy check policies.yaml -o json | jq '.denied[] | .server'

FILE: YAML with one or more networking.k8s.io/v1 NetworkPolicy documents (--- separated), or a
List of them; `-` reads stdin. Each document is checked against the Kubernetes 1.31 schema.
A connection is allowed when the client's egress and the server's ingress allow it (a side
no policy selects allows everything). DENIED BY: ingress (the server's policies), egress (the
client's) or both; POLICIES: the namespace/name of the policies selecting that side.
Exit status: 0 nothing would be denied, 1 something would, 2 a bad flag or policy file."""

SUGGEST_EPILOG = """\
examples:
  eastwest policy suggest                            every workload, the last 24 hours
  eastwest policy suggest --namespace shop           the workloads of shop
  eastwest policy suggest --workload api --since 7d  one workload, a week
  eastwest policy suggest -o json > list.json        a List for kubectl apply -f

One NetworkPolicy per workload (podSelector: its labels), isolated both ways, allowing the
observed clients (ingress) and servers (egress) on the observed ports; pods of another
namespace by namespaceSelector (kubernetes.io/metadata.name), addresses outside the cluster by
ipBlock /32 or /128. Each rule says how many connections of which window justify it. Traffic
never observed in the window is not allowed: review before applying (docs/policy.md)."""


def register(sub: Any) -> None:
    from eastwest.cli.graph import add_graph_scope

    p = sub.add_parser("policy", help="Kubernetes NetworkPolicy: check a set against traffic, "
                       "suggest one from it",
                       description="Kubernetes NetworkPolicy from observed traffic.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    c = psub.add_parser("check", help="which observed connections a policy set would deny",
                        description="Evaluate the connections of a window against NetworkPolicy "
                        "files with the Kubernetes semantics.", epilog=CHECK_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("files", nargs="+", metavar="FILE", help="NetworkPolicy YAML (or - for stdin)")
    add_graph_scope(c, group_by=False)
    add_output_flags(c, ("table", "json"))
    add_connection_flags(c)
    c.set_defaults(func=run_check)
    _since_default(c, "1h")
    s = psub.add_parser("suggest", help="NetworkPolicies that allow exactly the observed traffic",
                        description="Suggest NetworkPolicies from the traffic of a window.",
                        epilog=SUGGEST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_graph_scope(s, group_by=False)
    add_output_flags(s, ("yaml", "json"), default="yaml")
    add_connection_flags(s)
    s.set_defaults(func=run_suggest)
    _since_default(s, "24h")


def _since_default(p: argparse.ArgumentParser, when: str) -> None:
    for a in p._actions:
        if a.dest == "since":
            a.default = when
            a.help = f"from this time: a duration ago (30m, 2h, 7d) or RFC 3339 (default {when})"


def run_check(args: argparse.Namespace) -> int:
    from eastwest.cli._common import client_from_args
    from eastwest.cli.graph import graph_params
    from eastwest.output import to_json_text, write_table
    from eastwest.policy.check import check
    from eastwest.policy.load import load_files
    from eastwest.policy.observed import edges_of

    policies = load_files(args.files)  # a bad file fails before any request
    params = graph_params(args)
    with results(args) as (out, color):
        with client_from_args(args) as client:
            doc = client.get_json(OBSERVED_PATH, params)
            edges = edges_of(doc, f"{client.settings.server}{OBSERVED_PATH}")
        findings = check(policies, edges)
        denied = [f for f in findings if f.denied]
        unknown = [f for f in findings if not f.denied]
        win = f"{doc.get('from')}..{doc.get('to')}"
        if args.output == "json":
            out.write(to_json_text({"window": {"from": doc.get("from"), "to": doc.get("to")},
                                    "policies": [p.ref for p in policies], "edges": len(edges),
                                    "denied": [f.to_json() for f in denied],
                                    "unknown": [f.to_json() for f in unknown]}, indent=2) + "\n")
        else:
            write_table(out, ("CLIENT", "SERVER", "PORT", "CONNECTIONS", "VERDICT", "DENIED BY",
                              "POLICIES"),
                        ((f.edge.client.id, f.edge.server.id, f"{f.edge.port}/{f.edge.protocol}",
                          f.edge.connections, "denied" if f.denied else "unknown",
                          f.side, ", ".join(f.policies)) for f in findings), color=color)
        n = sum(f.edge.connections for f in denied)
        if denied:
            print(f"eastwest policy check: {len(denied)} of {len(edges)} edges ({n} connections "
                  f"in {win}) would be denied by {len(policies)} policies", file=sys.stderr)
        else:
            print(f"eastwest policy check: the {len(policies)} policies deny none of the "
                  f"{len(edges)} edges of {win}", file=sys.stderr)
        if unknown:
            print(f"eastwest policy check: {len(unknown)} edges cannot be evaluated: a rule names "
                  "a port the server's container port names would resolve, and they are unknown",
                  file=sys.stderr)
    return 1 if denied else 0


def run_suggest(args: argparse.Namespace) -> int:
    from eastwest.cli._common import client_from_args
    from eastwest.cli.graph import graph_params
    from eastwest.errors import TransportError

    params = [*graph_params(args), ("format", args.output)]
    with results(args) as (out, _color), client_from_args(args) as client:
        text = client.get_text(SUGGEST_PATH, params)
        if args.output == "json" and not text.lstrip().startswith("{"):
            raise TransportError(f"the aggregator at {client.settings.server} answered "
                                 f"{SUGGEST_PATH} with something that is not JSON")
        out.write(text if text.endswith("\n") or not text else text + "\n")
        if not text.strip() or '"items": []' in text:
            print("eastwest policy suggest: no pod workload in scope had traffic in this window",
                  file=sys.stderr)
    return 0
