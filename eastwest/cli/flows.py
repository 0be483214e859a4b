"""`eastwest flows`: query stored flows, tail live ones, or filter a file of records offline.

In:  filter flags (eastwest/cli/_filterflags.py), and one source: the aggregator's
     `GET /api/v1/flows` (stored, cursor-paginated), `GET /api/v1/flows/stream` (live, SSE), or
     `--input-file` (JSON lines of flow records, docs/flow-record.md, or a pcap / pcapng
     capture decoded as the collector does, docs/vxlan.md; no aggregator needed).
Out: flows printed as table, compact, json, jsonl or csv (eastwest/output.py). The same filter
     object filters everywhere: the API parses the query parameters built here with
     `Filter.from_query`, and files are matched in memory with `Filter.matches`.

Exit codes: 0 done (also when nothing matched), 1 the aggregator or the file failed, or a file
held lines that are not records (each is named on stderr and skipped; the good records are
printed: one bad line spoils nothing else), or a workload filter met a file whose records carry
no workload names (said on stderr; `--workload-map` names them), 2 a usage error naming the flag.
A failure prints nothing on stdout (eastwest/cli/_common.py `results`), except what a live source
(`--follow`, `--input-file -`) printed before it: those lines stay, whole.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from eastwest.cli._common import add_connection_flags, add_output_flags, results
from eastwest.cli._dnsflags import add_dns_flags, dns_filter_of, kept
from eastwest.cli._filterflags import FILTER_HELP, FilterSpec, add_filter_flags, filter_spec
from eastwest.cli._flowprint import FlowPrinter
from eastwest.cli._flowrow import FlowRow
from eastwest.dns_filter import DnsEdgeFilter
from eastwest.errors import ConfigError, EastwestError
from eastwest.output import to_json_text

FORMATS = ("table", "compact", "json", "jsonl", "csv")
SORTS = tuple(s for k in ("start", "last_seen", "bytes", "client_workload", "server_workload")
              for s in (k, f"-{k}"))
SORT_DEFAULT = "-start"
API_LIMIT_DEFAULT = 100
BAD_LINES_SHOWN = 5

EPILOG = f"""\
{FILTER_HELP}

examples:
  eastwest flows --to-workload db                       who talks to db, how much, how it went
  eastwest flows --to-workload db --not --outcome ok    only the calls to db that failed
  eastwest flows --from-ip 10.244.1.0/24 --port 5432 --port 5433 --since 1h -o csv
  eastwest flows --sort -bytes --limit 10               the 10 biggest connections
  eastwest flows --follow --to-workload auth -o compact live, as connections close
  eastwest flows --input-file records.jsonl --outcome reset    offline, no aggregator
  eastwest flows --input-file records.jsonl --workload-map workloads.yaml --to-workload db
  eastwest collector --stdout | eastwest flows --input-file - --observer client
  eastwest flows --input-file incident.pcap --port 443    the flows of a capture file
  eastwest flows --to-workload db --not --port 5432 --print-filter
  eastwest flows --dns-rcode nxdomain --since 1h       lookups of names that do not exist
  eastwest flows --dns-name '*.example.com' --dns-rcode timeout   unanswered example.com lookups

--input-file reads flow records (one JSON object a line, as `eastwest collector --stdout`
writes them; docs/flow-record.md) and prints one line per record, as its observer saw it; the
aggregator prints one line per connection, with every observer's view merged. A collector's
records carry no workload names: --workload-map FILE names them as the aggregator would;
without it a workload or namespace filter has nothing to match, says so on stderr, exit 1.
A pcap or pcapng file (known by its first bytes) is decoded by the collector's own capture
source: one line per flow (its final record), tunnels decapsulated, plain traffic too, and
the packets it could not decode counted on stderr (docs/vxlan.md)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "flows", help="query stored and live flows with filters",
        description="Query the flows the aggregator stored, tail live ones (--follow), or filter "
        "a JSON-lines file of flow records offline (--input-file).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_filter_flags(p)
    g = p.add_argument_group("source")
    g.add_argument("--follow", "-f", action="store_true",
                   help="tail live flows from the aggregator (Server-Sent Events) until Ctrl-C, "
                   "or until --limit flows arrived")
    g.add_argument("--input-file", metavar="FILE",
                   help="filter this JSON-lines file of flow records instead (- for stdin), "
                   "or the flows of this pcap/pcapng capture")
    g.add_argument("--workload-map", metavar="FILE",
                   help="with --input-file: name the records' ends from this static workload "
                   "map (the YAML of `eastwest aggregator --workload-map`), as the aggregator "
                   "would; a collector's records carry no workload names")
    g.add_argument("--limit", type=int, metavar="N",
                   help=f"at most N flows (default {API_LIMIT_DEFAULT} from the aggregator, all "
                   "from --input-file or --follow; 0 = no limit)")
    g.add_argument("--sort", choices=SORTS, metavar="KEY",
                   help="order of stored flows: start, last_seen, bytes (both ways), "
                   "client_workload, server_workload; a leading - is descending: --sort -bytes "
                   f"is the largest first (default {SORT_DEFAULT}: newest first; not with "
                   "--follow or --input-file, which print flows as they come)")
    g.add_argument("--print-filter", action="store_true",
                   help="print the compiled filter (and the API query it becomes) and exit")
    add_dns_flags(p)
    add_output_flags(p, FORMATS)
    add_connection_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = filter_spec(args)
    dns = dns_filter_of(args)
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit", args.limit, "must be >= 0 (0 = no limit)")
    if args.follow and args.input_file:
        raise ConfigError("--follow", "--input-file", "choose one: --follow tails the aggregator")
    if args.follow and (args.since or args.until):
        raise ConfigError("--since" if args.since else "--until", args.since or args.until,
                          "--follow shows flows as they happen; leave out the window")
    if args.workload_map and not args.input_file:
        raise ConfigError("--workload-map", args.workload_map, "names the records of "
                          "--input-file; the aggregator names what it stores with its own")
    if args.sort and (args.follow or args.input_file):
        raise ConfigError("--sort", args.sort, "orders the aggregator's stored flows; --follow "
                          "and --input-file print flows as they come")
    if args.follow and args.output == "json":
        raise ConfigError("--output", "json", "a JSON document never ends with --follow; use "
                          "-o jsonl (one object a line)")
    if args.follow and not dns.empty:
        raise ConfigError("--dns-name" if dns.names else "--dns-rcode",
                          (dns.names or dns.rcodes)[0], "filters stored flows and files; the "
                          "live stream (--follow) carries no DNS summary")
    if args.print_filter:
        print_filter(sys.stdout, spec, args.output, dns.query_params())
        return 0
    live = args.follow or args.input_file == "-"  # streams: each flow printed as it arrives
    with results(args, live=live) as (out, color):
        printer = FlowPrinter(args.output, out, color, streaming=live)
        if args.input_file:
            return _from_file(args, spec, printer, dns)
        limit = args.limit if args.limit is not None else (0 if args.follow else API_LIMIT_DEFAULT)
        from eastwest.cli._common import client_from_args
        from eastwest.cli._flowsource import api_flows, api_follow

        with client_from_args(args) as client:
            rows = (api_follow(client, spec, limit) if args.follow
                    else api_flows(client, spec, limit, args.sort or SORT_DEFAULT,
                                   dns.query_params()))
            printer.print_all(_limited(rows, limit))
    if printer.count == 0 and not args.follow:
        print(f"eastwest flows: no flows match {spec.filter}", file=sys.stderr)
    return 0


def print_filter(out: TextIO, spec: FilterSpec, fmt: str,
                 dns: list[tuple[str, str]] | None = None) -> None:
    """The filter, the window, and the API query they become (`dns`: the DNS flags' parameters)."""
    d = spec.describe()
    if dns:
        d = {**d, "dns": [{"param": k, "value": v} for k, v in dns],
             "query": [*d["query"], *dns]}
    if fmt in ("json", "jsonl"):
        out.write(to_json_text(d, indent=2 if fmt == "json" else None) + "\n")
        return
    out.write(f"filter: {d['filter']}\n")
    if dns:
        out.write("dns:    " + " AND ".join(
            " OR ".join(f"{k}={v}" for k, v in dns if k == p)
            for p in ("dns_name", "dns_rcode") if any(k == p for k, _ in dns)) + "\n")
    out.write(f"since:  {d['since'] or '(stored start)'}\nuntil:  {d['until'] or '(now)'}\n")
    query = "&".join(f"{k}={v}" for k, v in d["query"])
    out.write(f"api:    GET /api/v1/flows?{query}\n" if query else "api:    GET /api/v1/flows\n")


def _from_file(args: argparse.Namespace, spec: FilterSpec, printer: FlowPrinter,
               dns: DnsEdgeFilter) -> int:
    """Print the file's matching records; a line that is not a record is named on stderr and
    skipped, and makes the exit status 1 (the good records are printed all the same). A file
    in which no line is a record fails whole: nothing printed. A workload or namespace filter
    on records none of which carries a workload name (a collector's, without --workload-map)
    had nothing to match: one line on stderr says so, exit 1 (not an honest "nothing
    matched")."""
    from eastwest.cli._flowsource import (
        FileReport,
        capture_rows,
        file_rows,
        is_capture,
        static_namer,
    )

    name = static_namer(args.workload_map) if args.workload_map else None  # before any output
    spec = _services_named(spec, args.workload_map)
    report = FileReport(args.input_file)
    limit = args.limit or 0
    try:
        if args.input_file == "-":
            printer.print_all(report.records_or_fail(
                _limited(kept(file_rows(sys.stdin, spec, report, name), dns), limit)))
        elif is_capture(args.input_file):  # pcap / pcapng: decoded as the collector does
            printer.print_all(_limited(kept(capture_rows(args.input_file, spec, report, name),
                                            dns), limit))
        else:
            try:
                fh = open(args.input_file, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
            except OSError as exc:
                raise EastwestError(f"--input-file {args.input_file}: {exc.strerror}") from None
            with fh:
                printer.print_all(report.records_or_fail(
                    _limited(kept(file_rows(fh, spec, report, name), dns), limit)))
    finally:
        for line in report.messages(BAD_LINES_SHOWN):
            print(f"eastwest flows: {line}", file=sys.stderr)
        unnamed = report.unnamed(spec, args.workload_map)  # also when Ctrl-C ends stdin
        if unnamed is not None:
            print(f"eastwest flows: {unnamed}", file=sys.stderr)
        drops = report.drops()
        if drops is not None:
            print(f"eastwest flows: {drops}", file=sys.stderr)
    summary = report.summary()
    if summary is not None:  # (a file of no records at all raised above: nothing printed)
        print(f"eastwest flows: {summary}", file=sys.stderr)
    return 1 if summary is not None or unnamed is not None else 0


def _services_named(spec: FilterSpec, workload_map: str | None) -> FilterSpec:
    """`--to-service namespace/name` on a file: the Service's addresses from the workload map's
    `services` section (the aggregator resolves names itself)."""
    refs = spec.filter.service_refs()
    if not refs:
        return spec
    if not workload_map:
        raise ConfigError("--to-service", str(refs[0]), "a Service name is known to the "
                          "aggregator, or to --workload-map with a `services` section; give "
                          "its ClusterIP instead")
    import dataclasses

    from aggregator.identity import IdentityResolver, StaticMap
    from aggregator.service_view import ServiceNames, resolve_filter

    names = ServiceNames(IdentityResolver(StaticMap.load(workload_map)))
    try:
        return dataclasses.replace(spec, filter=resolve_filter(spec.filter, names, "--to-service"))
    except ConfigError as exc:
        raise ConfigError("--to-service", exc.value, f"{exc.reason} in --workload-map "
                          f"{workload_map}") from None


def _limited(rows: Iterable[FlowRow], limit: int) -> Iterator[FlowRow]:
    for n, row in enumerate(rows, 1):
        yield row
        if limit and n >= limit:
            return
