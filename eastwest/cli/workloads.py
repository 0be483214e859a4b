"""`eastwest workloads`: the workloads of a window with their upstreams and downstreams.

In:  a window, optionally one workload NAME; the aggregator's `GET /api/v1/workloads` and
     `GET /api/v1/workloads/{name}`.
Out: a table (workload, namespace, kind, how many workloads call it and it calls), json (the
     API's objects), `names` (one bare name a line: what shell completion reads), or for one
     workload its callers and callees with their numbers, its transitive upstream and
     downstream, and its impact (what breaks if it breaks). A NAME the aggregator did not see
     in the window is one line naming the window (`workload 'x' was not seen in this window
     (1h..now); ...`), exit 1: not a question of versions, which only a route unknown to the
     aggregator is (eastwest/client.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from eastwest.cli._common import add_connection_flags, add_output_flags, results

FORMATS = ("table", "json", "names")
WORKLOADS_PATH = "/api/v1/workloads"

EPILOG = """\
examples:
  eastwest workloads                    every workload of the last 15 minutes, with counts
  eastwest workloads db                 who calls db, whom db calls, what breaks without db
  eastwest workloads -o names           one name a line (shell completion uses this)

Callers call it (it is their server); callees are called by it. Upstream and downstream are
the same, transitively: everything that depends on it, everything it depends on."""


def register(sub: Any) -> None:
    p = sub.add_parser("workloads", help="workloads with their upstream and downstream counts",
                       description="Workloads the aggregator saw, with the workloads they call "
                       "(downstream) and that call them (upstream).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", metavar="NAME", help="show this one workload in detail")
    g = p.add_argument_group("scope")
    g.add_argument("--since", metavar="WHEN", help="from this time: a duration ago (30m, 2h, "
                   "7d), RFC 3339 (default: the aggregator's, 15 minutes before --until)")
    g.add_argument("--until", metavar="WHEN", help="up to this time (default now)")
    g.add_argument("--link-local", action="store_true", help="include link-local and "
                   "multicast traffic (neighbour discovery, MLD, mDNS, DHCP), hidden by default")
    add_output_flags(p, FORMATS)
    add_connection_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eastwest.cli._common import client_from_args
    from eastwest.cli._window import window
    from eastwest.client import NotFound
    from eastwest.errors import ConfigError, TransportError
    from eastwest.output import escape, to_json_text, write_table

    if args.name is not None and not args.name:
        raise ConfigError("NAME", args.name, "must not be empty")
    if args.name and args.output == "names":
        raise ConfigError("--output", "names", "lists every workload; leave out NAME")
    params = window(args.since, args.until)
    if args.link_local:
        params = [*params, ("link_local", "true")]
    path = WORKLOADS_PATH + (f"/{quote(args.name, safe='')}" if args.name else "")
    with results(args) as (out, color):
        with client_from_args(args) as client:
            try:
                doc = client.get_json(path, params)
            except NotFound as exc:
                if not args.name:
                    raise
                raise TransportError(not_seen(args.name, exc.detail, args.since,
                                              args.until)) from None
        if args.name:
            _check_detail(path, doc)  # before any format is written, -o json too
            if args.output == "json":
                out.write(to_json_text(doc, indent=2) + "\n")
                return 0
            try:
                _detail(out, doc, color)
            except (TypeError, ValueError) as exc:
                raise TransportError(f"{path} answered with a workload this CLI cannot read "
                                     f"({exc})") from None
            return 0
        items = doc.get("workloads") if isinstance(doc, Mapping) else doc
        if not isinstance(items, list):
            raise TransportError(f"{WORKLOADS_PATH} answered without a workloads list")
        try:
            rows = sorted((_row(w) for w in items), key=lambda r: r[0])
        except (TypeError, ValueError):
            raise TransportError(f"{WORKLOADS_PATH} answered with a workload this CLI cannot "
                                 "read") from None
        if args.output == "json":
            out.write(to_json_text(doc, indent=2) + "\n")
        elif args.output == "names":  # bare names, what --to-workload takes
            names = sorted({str(w.get("name")) for w in items})
            out.write("".join(escape(n) + "\n" for n in names))
        elif write_table(out, ("WORKLOAD", "NAMESPACE", "KIND", "CALLERS", "CALLEES"), rows,
                         color=color) == 0:
            print("eastwest workloads: no workloads in this window", file=sys.stderr)
    return 0


AMBIGUOUS = re.compile(r"\(ambiguous: (?P<ids>[^)]*)\)\s*$")


def not_seen(name: str, detail: str, since: str | None, until: str | None) -> str:
    """The one line for a workload the aggregator answered 404 for: not seen in the window, or
    a bare name that several namespaces have (the API's reason says which; the names in it
    are escaped, a monitored host sets them)."""
    from eastwest.output import escape

    if since:
        span = f"{since}..{until or 'now'}"
    elif until:
        span = f"the 15 minutes before {until}, the default; --since widens it"
    else:
        span = "the last 15 minutes, the default; --since widens it"
    ambiguous = AMBIGUOUS.search(detail)
    if ambiguous:
        return (f"workload {name!r} is ambiguous in this window ({span}): "
                f"{escape(ambiguous.group('ids'))}; name one as namespace/name")
    if "not seen" in detail:
        return (f"workload {name!r} was not seen in this window ({span}); `eastwest workloads` "
                "lists the known ones")
    return f"workload {name!r}: {escape(detail)} (404)"


def _check_detail(path: str, doc: Any) -> None:
    """One workload as docs/api.md has it, or a TransportError naming what is not."""
    from eastwest.errors import TransportError

    if not isinstance(doc, Mapping):
        raise TransportError(f"{path} answered with something that is not an object")
    for key in ("callers", "callees", "upstream", "downstream", "impact"):
        items = doc.get(key) or []
        if not isinstance(items, list) or (key not in ("upstream", "downstream") and not all(
                isinstance(x, Mapping) for x in items)):
            raise TransportError(f"{path} answered with a {key} this CLI cannot read")


def _count(w: Mapping[str, Any], key: str) -> int:
    v = w.get(key)
    return v if isinstance(v, int) else len(v or [])


def _row(w: Any) -> tuple[str, str | None, str | None, int, int]:
    if not isinstance(w, Mapping):
        raise ValueError(w)
    return (str(w.get("id") or w.get("name")), w.get("namespace"), w.get("kind"),
            _count(w, "callers"), _count(w, "callees"))


def _detail(out: Any, doc: Mapping[str, Any], color: bool) -> None:
    """Direct callers and callees with their numbers, then the transitive upstream, downstream
    and impact (workloads that break if this one breaks, nearest first)."""
    from eastwest.output import escape, human_bytes, paint, write_table

    ns = doc.get("namespace")
    out.write(paint(escape(doc.get("id") or doc.get("name")), "bold", color)
              + (f"  namespace {escape(ns)}" if ns else "")
              + (f"  kind {escape(doc.get('kind'))}" if doc.get("kind") else "") + "\n")
    for key, peer, title in (("callers", "source", "called by"), ("callees", "target", "calls")):
        edges = doc.get(key) or []
        out.write(f"\n{title} ({len(edges)}):\n")
        if edges:
            write_table(out, ("  WORKLOAD", "CONNS", "FAILED", "C->S", "S->C", "PORTS"), [
                ("  " + str(e.get(peer)), e.get("connections_opened"), e.get("connections_failed"),
                 human_bytes(e.get("bytes_c2s")), human_bytes(e.get("bytes_s2c")),
                 ",".join(str(p) for p in e.get("ports") or ())) for e in edges], color=color)
    for key, title in (("upstream", "upstream, all who depend on it"),
                       ("downstream", "downstream, all it depends on")):
        names = [str(x) for x in doc.get(key) or []]
        out.write(f"\n{title} ({len(names)}): {escape(', '.join(names)) or '-'}\n")
    impact = doc.get("impact") or []
    out.write(f"\nimpact, what breaks if it breaks ({len(impact)}): "
              + (escape(", ".join(f"{i.get('workload')} ({i.get('distance')})" for i in impact
                                  if isinstance(i, Mapping))) or "-") + "\n")
