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


def add_dns_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("DNS (flows to a resolver: the DNS they carried)")
    d.add_argument("--dns-name", action="append", default=[], metavar="GLOB",
                   help="only flows to a resolver that asked a name matching GLOB (a shell "
                   "pattern, case-insensitive: *.example.com); repeatable, OR-ed")
    d.add_argument("--dns-rcode", action="append", default=[], metavar="CODE",
                   help=f"only flows to a resolver that got this response code: {', '.join(RCODES)} "
                   "(timeout: queries without an answer); repeatable, OR-ed; with --dns-name: a "
                   "matching name got it")


def dns_filter_of(args: argparse.Namespace) -> DnsEdgeFilter:
    return DnsEdgeFilter.build(getattr(args, "dns_name", None) or (),
                               getattr(args, "dns_rcode", None) or ())


def kept(rows: Iterable[FlowRow], dns: DnsEdgeFilter) -> Iterator[FlowRow]:
    """The rows whose `dns` matches (all of them without DNS flags)."""
    for row in rows:
        if dns.empty or (isinstance(row.obj, dict) and dns.matches(row.obj.get("dns"))):
            yield row
