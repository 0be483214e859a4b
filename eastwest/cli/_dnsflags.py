"""`eastwest flows --dns-name GLOB --dns-rcode CODE`: the DNS filters of `eastwest graph`, on flows.

In: the flags (eastwest/dns_filter.py `DnsEdgeFilter`, the graph's, built and checked once: a bad
code exits 2 naming the flag). Out: the API parameters `dns_name`/`dns_rcode` of GET
/api/v1/flows (the aggregator matches each stored flow's `dns`), and `kept(rows)` for a file's
rows (a record's `dns` summary, or an API flow object's `dns`, matched in memory alike).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator

from eastwest.cli._flowrow import FlowRow
from eastwest.dns_filter import RCODES, DnsEdgeFilter


def add_dns_flags(p: argparse.ArgumentParser, kind: str = "flows") -> None:
    """`--dns-name`, `--dns-rcode` on `p`: `kind` "flows" (`eastwest flows`) or "edges" (the
    graph commands: an edge to a resolver, the DNS its clients sent)."""
    if kind == "edges":
        group, asked = "edges to a resolver: the DNS their clients sent", "edges to a resolver whose clients asked"
    else:
        group, asked = "flows to a resolver: the DNS they carried", "flows to a resolver that asked"
    d = p.add_argument_group(f"DNS ({group})")
    d.add_argument("--dns-name", action="append", default=[], metavar="GLOB",
                   help=f"only {asked} a name matching GLOB (a shell pattern, case-insensitive: "
                   "*.example.com); repeatable, OR-ed")
    d.add_argument("--dns-rcode", action="append", default=[], metavar="CODE",
                   help=f"only {kind} to a resolver that got this response code: "
                   f"{', '.join(RCODES)} (timeout: queries without an answer); repeatable, "
                   "OR-ed; with --dns-name: a matching name got it")


def dns_filter_of(args: argparse.Namespace) -> DnsEdgeFilter:
    return DnsEdgeFilter.build(getattr(args, "dns_name", None) or (),
                               getattr(args, "dns_rcode", None) or ())


def kept(rows: Iterable[FlowRow], dns: DnsEdgeFilter) -> Iterator[FlowRow]:
    """The rows whose `dns` matches (all of them without DNS flags)."""
    for row in rows:
        if dns.empty or (isinstance(row.obj, dict) and dns.matches(row.obj.get("dns"))):
            yield row
