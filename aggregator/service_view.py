"""Services on the read side (issue 16): a connection's Service by name, the graph's Service view,
and `to_service` filters by name.

Stage: query side (the API's /graph, /flows, /diff). In: connections whose `service_ip`/
`service_port` keep the address the client dialled before kube-proxy's DNAT (the server end is
the backend that really served it), and the identity layers of the aggregator's resolver: the
static workload map's `services` section (or a workload entry of kind Service), then the
pluggable sources such as Kubernetes (an address whose owner is of kind Service).
Out:
- `ServiceNames.name_of(ip, port, at)`: the Service a dialled address belongs to, resolved at
  read time, like the graph's other names; `flow_service`: the flow JSON's `service` object;
- `service_graph`: the graph grouped by Service (`group_by=service`, docs/api.md): a connection
  that dialled a Service is counted once, on the edge client workload -> `svc:<namespace>/<name>`
  (`svc:<ip>:<port>` when no layer names the address), and that edge lists the backends that
  served its connections (`backends`: workload, connections); a connection that dialled no
  Service stays on its workload -> workload edge. Every connection is on exactly one edge, so
  the two views count the same connections, bytes and failures. The grouping is the store's,
  in its SQL (aggregator/store/service_edges.py): here the window's dialled addresses (one
  small query) are named, and the store groups with those names;
- `resolve_filter`: `to_service=namespace/name` -> the Service's addresses (a 400 naming the
  value when no layer knows it).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aggregator.graph_edges import GraphData
from aggregator.store.query import EdgeQuery, ServiceAddress
from aggregator.store.service_edges import PREFIX, unnamed_node
from eastwest.errors import ConfigError
from eastwest.filters import Clause, Filter, ServiceRef

if TYPE_CHECKING:
    from aggregator.identity import IdentityResolver
    from aggregator.store.base import ReadStore

__all__ = ["PREFIX", "ServiceNames", "flow_service", "resolve_filter", "service_graph",
           "service_query"]


class ServiceNames:
    """The Service of a dialled address, from the resolver's layers (None: none knows it)."""

    def __init__(self, resolver: IdentityResolver | None) -> None:
        self.resolver = resolver

    def name_of(self, ip: str, port: int, at: datetime | None = None) -> ServiceRef | None:
        r = self.resolver
        if r is None:
            return None
        if r.static is not None:
            hit = r.static.service_at(ip, port)
            if hit is not None:
                return ServiceRef(hit[0], hit[1])
            ident = r.static.lookup(ip, port)
            if ident is not None and ident.kind == "Service":
                return ServiceRef(ident.namespace, ident.name)
        when = at or datetime.now(UTC)
        for src in r.sources:
            ident = src.lookup(ip, port, when)
            if ident is not None and ident.kind == "Service" and ident.name:
                return ServiceRef(ident.namespace, ident.name)
        return None

    def addresses(self, ref: ServiceRef) -> list[str]:
        """The addresses (ClusterIPs) of a Service by name, from every layer that knows it."""
        r = self.resolver
        out: set[str] = set()
        if r is None:
            return []
        if r.static is not None:
            out.update(ip for (ip, _), (ns, name) in r.static.services.items()
                       if (ns, name) == (ref.namespace, ref.name))
            out.update(ip for (ip, _), ident in r.static.by_ip_port.items()
                       if ident.kind == "Service" and (ident.namespace, ident.name)
                       == (ref.namespace, ref.name))
        for src in r.sources:
            more = getattr(src, "service_addresses", None)
            if more is not None:
                out.update(more(ref.namespace, ref.name))
        return sorted(out)


def resolve_filter(flt: Filter, names: ServiceNames, param: str = "to_service") -> Filter:
    """`flt` with each Service name of `to_service` replaced by that Service's addresses."""
    if not flt.service_refs():
        return flt
    clauses = []
    for c in flt.clauses:
        values: list[Any] = []
        for v in c.values:
            if not isinstance(v, ServiceRef):
                values.append(v)
                continue
            ips = names.addresses(v)
            if not ips:
                raise ConfigError(param, str(v), "no Service of this name is known (names come "
                                  "from the Kubernetes layer or the workload map's `services`); "
                                  "give its ClusterIP instead")
            values += [ipaddress.ip_network(ip) for ip in ips]
        clauses.append(Clause(c.dim, tuple(dict.fromkeys(values)), c.negate))
    return Filter(clauses, flt.link_local)


def flow_service(names: ServiceNames | None, ip: str | None, port: int | None,
                 at: datetime | None) -> dict[str, Any] | None:
    """A flow's `service` (docs/api.md): the dialled Service's namespace and name, None when the
    client dialled no Service or no layer names its address."""
    if ip is None or names is None:
        return None
    ref = names.name_of(ip, port or 0, at)
    return None if ref is None else {"namespace": ref.namespace, "name": ref.name}


def service_query(store: ReadStore, since: datetime, until: datetime, flt: Filter,
                  names: ServiceNames | None) -> EdgeQuery:
    """The Service view's query: the window's dialled addresses, each with its Service node
    (named at the window's end, or now for a window that has not ended)."""
    q = EdgeQuery(since, until, "service", flt)
    at = min(until, datetime.now(UTC))
    services = []
    for ip, port in store.service_addresses(q):
        ref = names.name_of(ip, port, at) if names is not None else None
        services.append(ServiceAddress(ip, port, unnamed_node(ip, port)) if ref is None else
                        ServiceAddress(ip, port, f"{PREFIX}{ref}", ref.name, ref.namespace))
    return replace(q, services=tuple(services))


def service_graph(store: ReadStore, since: datetime, until: datetime, flt: Filter,
                  names: ServiceNames | None) -> GraphData:
    """The window's graph grouped by Service (the module docstring), before the cardinality
    budget (aggregator/graph.py folds it): grouped, counted and written by the store."""
    q = service_query(store, since, until, flt, names)
    return GraphData.of_columns(store.edges(q), since, until, "service", "connections", str(flt))
