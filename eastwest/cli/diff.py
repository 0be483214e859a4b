"""`eastwest diff`: what changed between two windows: edges added, removed and changed.

In:  `--a START..END` and `--b START..END` (each end a duration ago, RFC 3339 or `now`), and the
     aggregator's `GET /api/v1/diff?a_from=&a_to=&b_from=&b_to=`.
Out: one line per edge that differs (`+` only in B, `-` only in A, `~` in both with different
     numbers), with both windows' connections, failures and bytes; or the API's JSON unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from eastwest.cli._common import add_connection_flags, add_output_flags, results
from eastwest.cli._filterflags import FILTER_HELP, add_filter_flags, filter_spec
from eastwest.cli.graph import GROUP_BY

FORMATS = ("table", "json")
DIFF_PATH = "/api/v1/diff"

EPILOG = f"""\
{FILTER_HELP}

examples:
  eastwest diff --a 1h..30m --b 30m..now            the last half hour against the one before
  eastwest diff --a 2026-11-27T00:00Z..2026-11-28T00:00Z --b 1d..now
  eastwest diff --a 1h..30m --b 30m..now --to-workload db -o json

+ an edge only in B (a new dependency), - only in A (gone), ~ in both, with other numbers."""


def register(sub: Any) -> None:
    p = sub.add_parser("diff", help="what changed between two windows",
                       description="Edges added, removed and changed between window A and "
                       "window B.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_filter_flags(p, window=False)
    g = p.add_argument_group("windows")
    g.add_argument("--a", required=True, metavar="START..END", help="the earlier window")
    g.add_argument("--b", required=True, metavar="START..END", help="the later window")
    g.add_argument("--group-by", choices=GROUP_BY, default="workload",
                   help="what a node is (default workload)")
    g.add_argument("--threshold", type=float, default=0.5, metavar="R",
                   help="relative change of connections or bytes that counts as changed "
                   "(default 0.5 = 50%%); failures appearing or vanishing always count")
    add_output_flags(p, FORMATS)
    add_connection_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eastwest.cli._common import client_from_args
    from eastwest.cli._window import rfc3339, span
    from eastwest.errors import ConfigError
    from eastwest.output import to_json_text, write_table

    now = datetime.now(UTC)  # one `now` for both windows: 30m..now and 1h..30m meet exactly
    a0, a1 = span("--a", args.a, now)
    b0, b1 = span("--b", args.b, now)
    if not 0 <= args.threshold <= 1:
        raise ConfigError("--threshold", args.threshold, "must be 0..1")
    params = [*filter_spec(args).query_params(), ("a_from", rfc3339(a0)), ("a_to", rfc3339(a1)),
              ("b_from", rfc3339(b0)), ("b_to", rfc3339(b1)), ("group_by", args.group_by),
              ("threshold", str(args.threshold))]
    with results(args) as (out, color):
        with client_from_args(args) as client:
            doc = client.get_json(DIFF_PATH, params)
        rows = diff_rows(doc)  # -o json too: a body the table cannot read is not printed
        if args.output == "json":
            out.write(to_json_text(doc, indent=2) + "\n")
        elif write_table(out, HEADERS, rows, color=color) == 0:
            print("eastwest diff: no edge differs between the two windows", file=sys.stderr)
    return 0


HEADERS = ("", "CLIENT", "SERVER", "CONNS A", "CONNS B", "FAILED A", "FAILED B", "BYTES A",
           "BYTES B", "WHAT CHANGED")


def diff_rows(doc: Any) -> list[tuple[Any, ...]]:
    """The table rows of a diff document (docs/api.md), or a TransportError naming the fault."""
    from eastwest.cli._edges import Edge
    from eastwest.errors import TransportError
    from eastwest.output import Cell, human_bytes

    if not isinstance(doc, Mapping):
        raise TransportError(f"{DIFF_PATH} answered with something that is not an object")
    if not all(isinstance(doc.get(k), list) for k in ("added", "removed", "changed")):
        raise TransportError(f"{DIFF_PATH} answered without added, removed and changed lists")
    rows: list[tuple[Any, ...]] = []
    for mark, key, style in (("+", "added", "green"), ("-", "removed", "red"),
                             ("~", "changed", "yellow")):
        for item in doc[key]:
            a_obj, b_obj = _sides(item, key)
            a = Edge.from_api(a_obj) if a_obj is not None else None
            b = Edge.from_api(b_obj) if b_obj is not None else None
            e = b or a
            assert e is not None
            rows.append((Cell(mark, style), Cell(e.client, "cyan"), Cell(e.server, "cyan"),
                         a.connections if a else None, b.connections if b else None,
                         a.failed if a else None, b.failed if b else None,
                         Cell(human_bytes(a.bytes_total) if a else "", right=True),
                         Cell(human_bytes(b.bytes_total) if b else "", right=True),
                         ",".join(str(c) for c in item.get("changed") or ())
                         if isinstance(item, Mapping) else ""))
    return rows


def _sides(item: Any, key: str) -> tuple[Any, Any]:
    """(edge in A, edge in B) of one diff entry; an added edge has no A, a removed one no B, a
    changed one carries both as `a` and `b` (without its ends, which the entry holds)."""
    if not isinstance(item, Mapping):
        return item, item  # Edge.from_api names the problem
    if key == "changed":
        ends = {"source": item.get("source"), "target": item.get("target")}
        a, b = item.get("a") or {}, item.get("b") or {}
        if not isinstance(a, Mapping) or not isinstance(b, Mapping):
            return a, b  # Edge.from_api names the problem
        return {**ends, **a}, {**ends, **b}
    return (None, item) if key == "added" else (item, None)
