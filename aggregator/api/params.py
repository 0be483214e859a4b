"""Query parameters shared by the read routes: windows, grouping, formats, unknown names.

Stage: API boundary. In: the request's query string. Out: validated values, or a ConfigError
that the app turns into a 400 naming the parameter and the value (never a 500).
Filters are NOT parsed here: `eastwest.filters.Filter.from_query` is the one filter language.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from fastapi import Request

from eastwest.dns_filter import DnsEdgeFilter
from eastwest.errors import ConfigError
from eastwest.filters import DIMENSIONS, LINK_LOCAL_PARAM, Filter, parse_time

if TYPE_CHECKING:
    from aggregator.service_view import ServiceNames

DEFAULT_WINDOW = timedelta(minutes=15)
GROUP_BY = ("workload", "namespace", "host", "service")
LINK_LOCAL_HELP = ("true: include link-local and multicast traffic (fe80::/10, ff00::/8, 224.0.0.0/4, "
                   "255.255.255.255: neighbour discovery, MLD, mDNS, DHCP), hidden by default")
FILTER_PARAMS = frozenset({*DIMENSIONS, *(f"not_{d}" for d in DIMENSIONS), LINK_LOCAL_PARAM})


def check_names(request: Request, allowed: set[str] | frozenset[str], *, filters: bool) -> None:
    """A parameter this route does not know is an error, named (a typo must not widen a query)."""
    for name in request.query_params:
        if name in allowed or (filters and name in FILTER_PARAMS):
            continue
        known = sorted(allowed | (FILTER_PARAMS if filters else set()))
        raise ConfigError(name, request.query_params[name],
                          f"unknown parameter; this route takes {', '.join(known)}")


def dns_filter(request: Request) -> DnsEdgeFilter:
    """The graph's DNS edge filters (`dns_name`, `dns_rcode`; eastwest/dns_filter.py)."""
    qp = request.query_params
    return DnsEdgeFilter.build(qp.getlist("dns_name"), qp.getlist("dns_rcode"),
                               name_flag="dns_name", rcode_flag="dns_rcode")


def query_filter(request: Request) -> Filter:
    """The request's filter; a `to_service` Service name becomes the Service's addresses."""
    flt = Filter.from_query(request.query_params.multi_items())
    if flt.service_refs():
        from aggregator.service_view import resolve_filter

        flt = resolve_filter(flt, service_names(request))
    return flt


def service_names(request: Request) -> ServiceNames:
    """What names a dialled Service address: the pipeline's identity layers."""
    from aggregator.service_view import ServiceNames

    pipeline = request.app.state.pipeline
    return ServiceNames(getattr(getattr(pipeline, "correlator", None), "resolver", None))


def window(since: str | None, until: str | None, *, since_name: str = "from",
           until_name: str = "to", now: datetime | None = None) -> tuple[datetime, datetime, bool]:
    """[since, until) in UTC, and whether the window is live (ends now)."""
    now = now or datetime.now(UTC)
    live = until is None or until.strip() == "now"
    end = now if until is None else parse_time(until_name, until, now)
    start = end - DEFAULT_WINDOW if since is None else parse_time(since_name, since, now)
    if start >= end:
        raise ConfigError(since_name, since, f"must be before {until_name} ({end.isoformat()})")
    return start, end, live


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(name, value, f"must be one of {', '.join(allowed)}")
    return value


def positive_int(name: str, value: str | None, default: int, maximum: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise ConfigError(name, value, f"must be an integer 1..{maximum}")
    return int(value)
