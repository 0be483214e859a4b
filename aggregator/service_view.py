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
  the two views count the same connections, bytes and failures;
- `resolve_filter`: `to_service=namespace/name` -> the Service's addresses (a 400 naming the
  value when no layer knows it).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from datetime import UTC, datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import msgspec

from aggregator.graph_edges import GraphData
from aggregator.store.query import EdgeQuery
from eastwest.errors import ConfigError
from eastwest.filters import Clause, Filter, ServiceRef

if TYPE_CHECKING:
    from aggregator.identity import IdentityResolver
    from aggregator.store.base import ReadStore

_enc = msgspec.json.Encoder()
PREFIX = "svc:"
# what `ReadStore.service_calls` answers, one row per (client, dialled address, backend)
SERVICE_CALL_COLUMNS = ("src", "service_ip", "service_port", "wid", "n", "opened", "name",
                        "namespace", "kind")


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


def service_graph(store: ReadStore, since: datetime, until: datetime, flt: Filter,
                  names: ServiceNames | None) -> GraphData:
    """The window's graph grouped by Service (the module docstring), before the cardinality
    budget (aggregator/graph.py folds it)."""
    calls = store.service_calls(EdgeQuery(since, until, "service", flt))
    at = min(until, datetime.now(UTC))
    node_of: dict[tuple[str, int], str] = {}
    refs: dict[str, ServiceRef | None] = {}
    for ip, port in sorted({(r["service_ip"], int(r["service_port"] or 0)) for r in calls}):
        ref = names.name_of(ip, port, at) if names is not None else None
        nid = f"{PREFIX}{ref}" if ref is not None else f"{PREFIX}{ip}:{port}"
        node_of[(ip, port)] = nid
        refs[nid] = ref
    index = {nid: i for i, nid in enumerate(sorted(refs))}
    by_index = {i: nid for nid, i in index.items()}
    q = EdgeQuery(since, until, "service", flt,
                  tuple((ip, port, index[nid]) for (ip, port), nid in sorted(node_of.items())))
    data = GraphData.of_columns(store.edges(q), since, until, "service", "connections", str(flt))
    # per (client, Service node): its addresses and its backends' connections
    addrs: dict[str, set[str]] = defaultdict(set)
    backends: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in calls:
        port = int(r["service_port"] or 0)
        nid = node_of[(r["service_ip"], port)]
        host = f"[{r['service_ip']}]" if ":" in r["service_ip"] else r["service_ip"]
        addrs[nid].add(f"{host}:{port}")
        b = backends[(r["src"], nid)].setdefault(r["wid"], {
            "id": r["wid"], "name": r["name"], "namespace": r["namespace"], "kind": r["kind"],
            "connections": 0, "connections_opened": 0})
        b["connections"] += int(r["n"])
        b["connections_opened"] += int(r["opened"])

    def rename(n: str) -> str:
        return by_index[int(n[4:])] if n.startswith("svc#") else n

    nodes = {}
    for n, attrs in data.nodes.items():
        nid = rename(n)
        if nid.startswith(PREFIX):
            ref = refs.get(nid)
            attrs = ((ref.name, ref.namespace, "Service") if ref is not None
                     else (nid[len(PREFIX):], None, "Service"))
        nodes[nid] = attrs
    # the edges' JSON as DuckDB (or columns_of_rows) wrote it, extended by splicing: no decode
    # of the 10,000 edges (`"target":"svc#3"` appears once: any quote inside `source` is escaped)
    plain = ',"service":null,"backends":[]}'
    service_json: dict[str, tuple[str, str]] = {}
    edges = []
    for src, dst, text, weight, first, last in data.edges:
        if not dst.startswith("svc#"):
            edges.append((src, dst, text[:-1] + plain, weight, first, last))
            continue
        nid = rename(dst)
        if nid not in service_json:  # once per Service, not per edge
            ref = refs.get(nid)
            service_json[nid] = (_enc.encode(nid).decode(), _enc.encode({
                "id": nid, "name": ref.name if ref else None,
                "namespace": ref.namespace if ref else None,
                "addresses": sorted(addrs.get(nid, ()))}).decode())
        target, service = service_json[nid]
        served = sorted(backends.get((src, nid), {}).values(), key=itemgetter("id"))
        text = text.replace(f'"target":"{dst}"', '"target":' + target, 1)
        edges.append((src, nid, f'{text[:-1]},"service":{service},'
                                f'"backends":{_enc.encode(served).decode()}}}', weight, first,
                      last))
    data.nodes, data.edges = nodes, sorted(edges, key=itemgetter(0, 1))
    return data
