"""`eastwest workloads`: the workloads of a window with their upstreams and downstreams.

In:  a window, optionally one workload NAME; the aggregator's `GET /api/v1/workloads` and
     `GET /api/v1/workloads/{name}`.
Out: a table (name, namespace, kind, upstream and downstream counts), json (the API's objects),
     `names` (one name a line: what shell completion reads), or for one workload its upstreams,
     downstreams and impact (what breaks if it breaks).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from eastwest.cli._common import add_connection_flags, add_output_flags, stdout_and_color

FORMATS = ("table", "json", "names")
WORKLOADS_PATH = "/api/v1/workloads"

EPILOG = """\
examples:
  eastwest workloads                    every workload seen in the last hour, with counts
  eastwest workloads db                 who calls db, whom db calls, what breaks without db
  eastwest workloads -o names           one name a line (shell completion uses this)

Upstream = who calls it (its clients); downstream = whom it calls (its servers)."""


def register(sub: Any) -> None:
    p = sub.add_parser("workloads", help="workloads with their upstream and downstream counts",
                       description="Workloads the aggregator saw, with the workloads they call "
                       "(downstream) and that call them (upstream).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", metavar="NAME", help="show this one workload in detail")
    g = p.add_argument_group("scope")
    g.add_argument("--since", metavar="WHEN", default="1h",
                   help="from this time: a duration ago (30m, 2h, 7d), RFC 3339 (default 1h)")
    g.add_argument("--until", metavar="WHEN", help="up to this time (default now)")
    add_output_flags(p, FORMATS)
    add_connection_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eastwest.cli._common import client_from_args
    from eastwest.cli._window import window
    from eastwest.errors import ConfigError, TransportError
    from eastwest.output import escape, to_json_text

    if args.name is not None and not args.name:
        raise ConfigError("NAME", args.name, "must not be empty")
    if args.name and args.output == "names":
        raise ConfigError("--output", "names", "lists every workload; leave out NAME")
    params = window(args.since, args.until)
    path = WORKLOADS_PATH + (f"/{quote(args.name, safe='')}" if args.name else "")
    with client_from_args(args) as client:
        doc = client.get_json(path, params)
    out, color = stdout_and_color(args)
    if args.output == "json":
        out.write(to_json_text(doc, indent=2) + "\n")
        return 0
    if args.name:
        if not isinstance(doc, Mapping):
            raise TransportError(f"{path} answered with something that is not an object")
        _detail(out, doc, color)
        return 0
    items = doc.get("workloads") if isinstance(doc, Mapping) else doc
    if not isinstance(items, list):
        raise TransportError(f"{WORKLOADS_PATH} answered without a workloads list")
    rows = sorted((_row(w) for w in items), key=lambda r: (r[1] or "", r[0]))
    if args.output == "names":
        out.write("".join(escape(r[0]) + "\n" for r in rows))
        return 0
    from eastwest.output import write_table

    if write_table(out, ("NAME", "NAMESPACE", "KIND", "UPSTREAM", "DOWNSTREAM"), rows,
                   color=color) == 0:
        print("eastwest workloads: no workloads in this window", file=sys.stderr)
    return 0


def _names(v: Any) -> list[str]:
    if isinstance(v, int):
        return []
    return [str(x.get("name")) if isinstance(x, Mapping) else str(x) for x in (v or [])]


def _count(w: Mapping[str, Any], key: str) -> int:
    v = w.get(key, w.get(f"{key}_count", 0))
    return v if isinstance(v, int) else len(v or [])


def _row(w: Any) -> tuple[str, str | None, str | None, int, int]:
    if not isinstance(w, Mapping):
        return (str(w), None, None, 0, 0)
    return (str(w.get("name")), w.get("namespace"), w.get("kind"), _count(w, "upstream"),
            _count(w, "downstream"))


def _detail(out: Any, doc: Mapping[str, Any], color: bool) -> None:
    from eastwest.output import escape, paint

    name = escape(doc.get("name"))
    ns = doc.get("namespace")
    out.write(paint(name, "bold", color) + (f"  (namespace {escape(ns)})" if ns else "") + "\n")
    for key, title in (("upstream", "upstream (calls it)"), ("downstream", "downstream (it calls)"),
                       ("impact", "impact (breaks if it breaks)")):
        names = _names(doc.get(key))
        out.write(f"  {title}: {len(names)}\n")
        out.write("".join(f"    {escape(n)}\n" for n in sorted(names)))
