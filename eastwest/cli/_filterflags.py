"""Filter flags for every query command: argparse flags -> (dimension, value, negated) triples ->
the one `eastwest.filters.Filter`, plus the time window.

In:  the command line (`--to-workload db --port 5432 --port 5433 --not --outcome ok --since 1h`).
Out: `FilterSpec` (the `Filter`, since, until), and the API query parameters it becomes
     (`to_workload=db&port=5432&port=5433&not_outcome=ok&since=...`), which the aggregator parses
     back with the same `Filter.from_query`: one language for the CLI, the API, SSE and files.

`--not` is handled here and only here: it is an argparse action that marks the next filter flag
as negated, as in `hubble observe` (cilium/hubble cmd/observe flags: a pending blacklist bit
consumed by the next filter flag). A `--not` that no filter flag follows, or two in a row, is a
usage error naming `--not`. Flags are declared from `eastwest.filters.DIMENSIONS`, so a new
dimension is a flag everywhere at once.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eastwest.errors import ConfigError
from eastwest.filters import DIMENSIONS, LINK_LOCAL_PARAM, Filter, parse_time

_PENDING = "_ew_not_pending"
_TRIPLES = "filter_triples"

FILTER_HELP = """\
Filters: a flag given twice is OR-ed (--port 80 --port 443: either port); different flags are
AND-ed (--to-workload db --outcome refused: refused calls to db); --not negates the one filter
flag after it (--not --outcome ok: everything that failed). IPs take CIDRs (10.244.0.0/16).
Link-local and multicast traffic (neighbour discovery, mDNS, ...) is hidden unless --link-local."""


class _NotAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, _PENDING, False):
            parser.error("--not: given twice in a row; it negates the one filter flag after it")
        setattr(namespace, _PENDING, True)


class _FilterAction(argparse.Action):
    """Appends (dimension, raw value, negated) and consumes a pending `--not`."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, dimension: str,
                 **kwargs: Any) -> None:
        self.dimension = dimension
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        negated = bool(getattr(namespace, _PENDING, False))
        setattr(namespace, _PENDING, False)
        triples = list(getattr(namespace, _TRIPLES, None) or [])
        triples.append((self.dimension, str(values), negated))
        setattr(namespace, _TRIPLES, triples)


def add_filter_flags(parser: argparse.ArgumentParser, *, window: bool = True) -> None:
    """Declare every filter dimension as a flag (repeatable), `--not`, and the time window."""
    g = parser.add_argument_group("filters", FILTER_HELP)
    for d in DIMENSIONS.values():
        metavar = {"net": "IP|CIDR", "member": "WHO"}.get(d.kind, d.name.split("_")[-1].upper())
        metavar = "IP|CIDR|NS/NAME" if d.name == "to_service" else metavar
        g.add_argument(d.flag, action=_FilterAction, dimension=d.name, dest=_TRIPLES,
                       metavar=metavar, help=d.help)
    g.add_argument("--not", action=_NotAction, dest=_PENDING, default=False,
                   help="negate the next filter flag (--not --to-workload db)")
    g.add_argument("--link-local", action="store_true", dest="link_local",
                   help="include link-local and multicast traffic (fe80::/10, ff00::/8, "
                   "224.0.0.0/4, 255.255.255.255: neighbour discovery, MLD, mDNS, DHCP), "
                   "hidden by default")
    parser.set_defaults(**{_TRIPLES: []})
    if window:
        add_window_flags(g)


def add_window_flags(g: Any, *, since_default: str | None = None) -> None:
    g.add_argument("--since", metavar="WHEN", default=since_default,
                   help="from this time: a duration ago (30s, 5m, 2h, 7d), RFC 3339, or now"
                   + (f" (default {since_default})" if since_default else ""))
    g.add_argument("--until", metavar="WHEN", help="up to this time (same forms; default now)")


@dataclass(frozen=True)
class FilterSpec:
    filter: Filter
    since: datetime | None = None
    until: datetime | None = None

    def query_params(self, window: tuple[str, str] = ("since", "until")) -> list[tuple[str, str]]:
        """The API query parameters of this filter (repeatable keys, `not_` for negation) and
        of its window (`since`/`until` for flows, `from`/`to` for the graph routes)."""
        out: list[tuple[str, str]] = []
        for c in self.filter.clauses:
            key = ("not_" if c.negate else "") + c.dim
            out += [(key, _param_value(v)) for v in c.values]
        if self.filter.link_local:
            out.append((LINK_LOCAL_PARAM, "true"))
        if self.since is not None:
            out.append((window[0], _rfc3339(self.since)))
        if self.until is not None:
            out.append((window[1], _rfc3339(self.until)))
        return out

    def in_window(self, start: datetime, end: datetime) -> bool:
        """A connection is in the window when it overlaps it: it ended at or after `since` and
        started before `until`."""
        if self.since is not None and end < self.since:
            return False
        return not (self.until is not None and start >= self.until)

    def describe(self) -> dict[str, Any]:
        return {"filter": str(self.filter), "clauses": self.filter.describe(),
                "since": _rfc3339(self.since) if self.since else None,
                "until": _rfc3339(self.until) if self.until else None,
                "query": self.query_params()}


def filter_spec(args: argparse.Namespace, now: datetime | None = None) -> FilterSpec:
    """Build the filter from parsed flags; a bad value raises ConfigError naming the flag."""
    if getattr(args, _PENDING, False):
        raise ConfigError("--not", "(at the end)", "must be followed by a filter flag, "
                          "e.g. --not --outcome ok")
    flt = Filter.build(getattr(args, _TRIPLES, None) or [],
                       link_local=bool(getattr(args, "link_local", False)))
    since = until = None
    now = now or datetime.now(UTC)  # one `now` for both ends
    if getattr(args, "since", None):
        since = parse_time("--since", args.since, now)
    if getattr(args, "until", None):
        until = parse_time("--until", args.until, now)
    if since is not None and until is not None and until <= since:
        raise ConfigError("--until", args.until, f"is not after --since {args.since}")
    return FilterSpec(flt, since, until)


def _param_value(v: Any) -> str:
    if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(v.network_address) if v.prefixlen == v.max_prefixlen else str(v)
    return str(v)


def _rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")
